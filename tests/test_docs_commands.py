"""The commands in docs/scaling.md and docs/slurm/v2_g.sbatch run as written (on the CPU, without a GPU).

* Every ```bash block of docs/scaling.md runs in bash with a stand-in ``python`` first on PATH that only records its
  arguments; each recorded ``python -m swinlab fit ...`` is then composed in-process by fit's own parser
  (``swinlab.training.cli.compose_config``: parsed, nothing built, so the CLI's CUDA-only pre-flight check does not
  run) and the merged config must pass ``swinlab.training.preflight.check_config`` as on a GPU machine;
  ``python -m swinlab estimate ...`` runs for real.
* The block marked ``<!-- cpu-command -->`` (the CPU stand-in for SwinV2-G) trains as written, from a fresh copy of
  the repository (``slow``).
* docs/slurm/v2_g.sbatch runs with ``bash`` in a fresh copy under a fake SLURM environment, with a stand-in ``srun``
  that runs its command with ``--print_config``; its log path must not need a directory a fresh clone lacks. (On a
  real SLURM cluster: docs/slurm/cpu.sbatch, the same script with CPU values, in tests/test_cluster.py.)
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

SCALING = ROOT / "docs" / "scaling.md"
SBATCH = Path("docs") / "slurm" / "v2_g.sbatch"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def bash_blocks(markdown: str) -> list:
    """(section heading, marker or None, code) for every ```bash block; a ``<!-- name -->`` line right before the
    fence is its marker."""
    blocks, section, marker, code = [], "", None, None
    previous = ""
    for line in markdown.splitlines():
        if code is not None:
            if line.strip() == "```":
                blocks.append((section, marker, "\n".join(code) + "\n"))
                code = None
            else:
                code.append(line)
            continue
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```bash":
            m = re.fullmatch(r"<!--\s*([\w-]+)\s*-->", previous.strip())
            marker, code = (m.group(1) if m else None), []
        previous = line
    return blocks


def _stub(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _env(path_first: Path, **extra: str) -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DATA_DIR", "RESUME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env["PATH"] = f"{path_first}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _compose(args: list) -> dict:
    """The config ``python -m swinlab <fit ...>`` composes (fit's own parser, swinlab.training.cli.compose_config);
    the merged config as a dict."""
    from swinlab.training.cli import compose_config

    return compose_config(args[1:], subcommand=args[0]).as_dict()


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    """The repository's files as a fresh clone has them (tracked plus new, not ignored: no runs/, no .venv)."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (git ls-files)")
    listed = subprocess.run([git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    dest = tmp_path_factory.mktemp("fresh_clone")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    assert (dest / SBATCH).is_file() and not (dest / "runs").exists()
    return dest


# -- docs/scaling.md: every bash block ----------------------------------------------------------------------------
def test_scaling_doc_bash_blocks_compose_and_pass_the_gpu_pre_flight(tmp_path, monkeypatch):
    from swinlab.__main__ import main
    from swinlab.training.preflight import check_config

    blocks = bash_blocks(SCALING.read_text())
    assert any(section.startswith("GPU commands") for section, _, _ in blocks)
    record = tmp_path / "recorded"
    record.mkdir()
    stub = tmp_path / "bin"
    _stub(stub, "python", 'n=$(ls "$REC" | wc -l)\nprintf "%s\\0" "$@" > "$REC/$(printf %04d "$n")"\n')
    commands = []  # (section, argv after "python")
    for section, _, code in blocks:
        if not Path("/usr/bin/time").exists():  # a measuring wrapper only; the command after it is what counts
            code = code.replace("/usr/bin/time -v ", "")
        before = len(list(record.iterdir()))
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, env=_env(stub, REC=str(record)),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"block in '{section}' failed in bash:\n{code}\n{res.stderr[-2000:]}"
        new = sorted(record.iterdir())[before:]
        assert new, f"block in '{section}' runs no python command:\n{code}"
        commands += [(section, p.read_bytes().decode().split("\0")[:-1]) for p in new]

    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository root
    gpu_fits = 0
    for section, argv in commands:
        shown = "python " + shlex.join(argv)
        if argv[0].endswith(".py"):  # a measurement script (minutes): its entry point and options, not the run
            assert (ROOT / argv[0]).is_file(), f"'{section}': {argv[0]} does not exist"
            res = subprocess.run([sys.executable, argv[0], argv[1], "--help"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=120, env=_env(tmp_path, DS_ACCELERATOR="cpu"))
            assert res.returncode == 0, f"{shown}: {res.stderr[-1500:]}"
            options = {a.split("=")[0] for a in argv[2:] if a.startswith("--")}
            assert all(o in res.stdout for o in options), f"{shown}: options not in its --help:\n{res.stdout}"
            continue
        assert argv[:2] == ["-m", "swinlab"], f"'{section}': not `python -m swinlab ...`: {shown}"
        args = argv[2:]
        if args[0] in LIGHTNING_COMMANDS:
            cfg = _compose(args)
            check_config(cfg)  # what the CLI's pre-flight check decides on a machine where these commands run
            trainer, strategy = cfg["trainer"], cfg["trainer"]["strategy"]
            if isinstance(strategy, dict) and strategy["class_path"].endswith("ModelParallelStrategy"):
                dp = strategy["init_args"]["data_parallel_size"]
                assert dp == int(trainer["devices"]) * int(trainer["num_nodes"]), f"{shown}: data_parallel_size {dp}"
            if isinstance(strategy, dict) and str(strategy["init_args"].get("config", "")).endswith(".json"):
                assert (ROOT / strategy["init_args"]["config"]).is_file(), shown
            if section.startswith("GPU commands"):
                gpu_fits += 1
                assert int(trainer["devices"]) == 1 and trainer["max_steps"] == 6, shown
                assert trainer["limit_val_batches"] == 0 and trainer["log_every_n_steps"] == 1, shown
                assert cfg["checkpoint"]["monitor"] is None and trainer["enable_checkpointing"] is False, shown
                assert cfg["export"]["enabled"] is False, shown
                assert cfg["data"]["class_path"] == "swinlab.data.SyntheticDataModule", shown
                if "fsdp2_offload.yaml" in args:
                    assert cfg["model"]["init_args"]["sharding"]["cpu_offload"] is True, shown
        elif args[0] == "estimate":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(args) == 0, shown
            assert "strategy" in out.getvalue().lower(), out.getvalue()[-500:]
        else:
            pytest.fail(f"'{section}': no check for `{shown}`: extend tests/test_docs_commands.py")
    assert gpu_fits == 5


# -- docs/scaling.md: the CPU stand-in, as written ----------------------------------------------------------------
@pytest.mark.slow
def test_cpu_stand_in_command_trains_as_written(fresh_copy, tmp_path):
    (code,) = [c for _, marker, c in bash_blocks(SCALING.read_text()) if marker == "cpu-command"]
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("python -m swinlab fit "), code
    stub = tmp_path / "bin"
    _stub(stub, "python", f'exec {shlex.quote(sys.executable)} "$@"\n')
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=fresh_copy,
                         env=_env(stub, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    runs = sorted((fresh_copy / "runs" / "v2_g_cpu").glob("version_*"))
    assert runs, "no TensorBoard run written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(runs[-1]), size_guidance={"scalars": 0})
    ea.Reload()
    losses = [e.value for e in ea.Scalars("train/loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
    assert len(ea.Scalars("val/acc1")) == 1
    assert (runs[-1] / "checkpoints" / "last.ckpt").is_dir()  # FSDP2: a sharded checkpoint directory


# -- docs/slurm/v2_g.sbatch on a fresh clone ------------------------------------------------------------------------
def test_v2_g_sbatch_composes_on_a_fresh_clone_under_slurm(fresh_copy, tmp_path):
    from swinlab.training.preflight import check_config

    script = fresh_copy / SBATCH
    directives = [ln.split(None, 1)[1].strip() for ln in script.read_text().splitlines() if ln.startswith("#SBATCH")]
    for d in directives:  # SLURM opens the log files before the script runs: their directories must already exist
        m = re.match(r"(?:--output|--error|-o|-e)[= ](\S+)", d)
        if m:
            parent = Path(m.group(1)).parent
            assert parent == Path(".") or (fresh_copy / parent).is_dir(), f"#SBATCH {d}: {parent}/ is not in a clone"
    assert any(re.match(r"--nodes[= ]\d+", d) for d in directives)

    # the script calls .venv/bin/python, which a fresh clone gets from the README's setup: here, this interpreter
    _stub(fresh_copy / ".venv" / "bin", "python", f'exec {shlex.quote(sys.executable)} "$@"\n')
    stub = tmp_path / "bin"
    _stub(stub, "srun", 'while [ "${1#-}" != "$1" ]; do shift; done\nexec "$@" --print_config\n')  # srun's options
    nodes = 3
    env = _env(stub, SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes), SLURM_NTASKS=str(8 * nodes),
               SLURM_NTASKS_PER_NODE="8", SLURM_CPUS_PER_TASK="12", SLURM_JOB_ID="4242", SLURM_JOB_NAME="swinv2_g",
               SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_SUBMIT_DIR=str(fresh_copy), DS_ACCELERATOR="cpu")
    env.pop("PYTHONPATH", None)  # `python -m swinlab` from the clone's root imports the clone's swinlab
    res = subprocess.run(["bash", str(SBATCH)], cwd=fresh_copy, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    cfg = yaml.safe_load(res.stdout)
    trainer, strategy = cfg["trainer"], cfg["trainer"]["strategy"]
    assert (trainer["num_nodes"], int(trainer["devices"]), trainer["accelerator"]) == (nodes, 8, "gpu")
    assert strategy["class_path"].endswith("ModelParallelStrategy")  # FSDP2 (fsdp2.yaml)
    assert strategy["init_args"]["data_parallel_size"] == 8 * nodes
    assert trainer["precision"] == "bf16-mixed"
    init = cfg["model"]["init_args"]
    assert init["model_name"] == "swinv2_giant_window12_192" and init["sharding"]["param_dtype"] == "bfloat16"
    assert cfg["data"]["init_args"]["data_dir"] == "data/imagenet" and cfg["ckpt_path"] is None
    check_config(cfg)
