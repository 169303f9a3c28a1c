"""Every strategy file, started the way users start it: ``python -m swinlab fit --config <experiment> --config
experiments/strategy/<s>.yaml --trainer.devices 2``, the process launching its own second rank (gloo on CPU).

Each run trains a few optimizer steps in bf16-mixed, validates with every default callback on (monitor, position-bias
and attention images, export, mid-epoch resume state), saves, and a second command resumes it with ``--ckpt_path
last`` (DDP's resume: test_reliability.py's SIGKILL test with strategy/ddp.yaml; SimMIM's: test_simmim.py).
DeepSpeed runs through a test-only subclass of Lightning's DeepSpeedStrategy without its two CUDA checks
(tests/launch_helpers.py), with DeepSpeed's bf16 section on; a probe callback records what each rank trained on.
Also: torchrun and SLURM-style environments (one process per rank, started by the launcher, not by Lightning).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, free_ports

EXP = ROOT / "experiments"
STRATEGY = EXP / "strategy"
PICO = "swinv2_pico_patch2_window4_32"
CPU_DEEPSPEED = ["--trainer.strategy.class_path", "launch_helpers.CPUDeepSpeedStrategy"]
STRATEGIES = {
    "ddp": ["--config", str(STRATEGY / "ddp.yaml")],
    "fsdp2": ["--config", str(STRATEGY / "fsdp2.yaml"), "--trainer.strategy.init_args.data_parallel_size", "2"],
    "fsdp2_offload": ["--config", str(STRATEGY / "fsdp2_offload.yaml"),
                      "--trainer.strategy.init_args.data_parallel_size", "2"],
    "zero1": ["--config", str(STRATEGY / "zero1.yaml"), *CPU_DEEPSPEED],
    "zero2": ["--config", str(STRATEGY / "zero2.yaml"), *CPU_DEEPSPEED],
    "zero3": ["--config", str(STRATEGY / "zero3.yaml"), *CPU_DEEPSPEED],
}
STRATEGY_CLASS = {"ddp": "DDPStrategy", "fsdp2": "ModelParallelStrategy",
                  "fsdp2_offload": "OffloadModelParallelStrategy", "zero1": "CPUDeepSpeedStrategy",
                  "zero2": "CPUDeepSpeedStrategy", "zero3": "CPUDeepSpeedStrategy"}
SMALL = ["--config", str(EXP / "quickstart.yaml"), "--trainer.limit_val_batches", "2",
         "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar",
         "false", "--trainer.precision", "bf16-mixed", "--resume.every_n_train_steps", "2"]
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1", SWINLAB_PROBE_DIR=str(tmp_path), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _cmd(*args, tag):
    return [sys.executable, "-m", "swinlab", "fit", *args, "--trainer.callbacks+=launch_helpers.Probe",
            "--trainer.callbacks.init_args.tag", tag]


def _run(cwd, cmd, port, timeout):
    try:
        res = subprocess.run(cmd, cwd=cwd, env=_env(cwd, MASTER_PORT=str(port)), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=timeout)
        rc, out = res.returncode, res.stdout
    except subprocess.TimeoutExpired as exc:
        rc, out = -9, (exc.stdout or b"").decode(errors="replace") + f"\n(killed after {timeout} s)"
    return rc, f"{' '.join(cmd[3:])}\n{out[-5000:]}"


def _run_chains(chains, timeout):
    """Run each chain of (cwd, cmd) in order, all chains at once: a launch spends much of its time waiting (start-up
    of the second rank, rendezvous), so overlapping them costs far less than one after the other on 2 cores. Each
    command gets its own rendezvous port: free ports picked by concurrent launches themselves can coincide, and then
    one run's rank joins another run's process group. A chain stops at its first failure."""
    from concurrent.futures import ThreadPoolExecutor
    ports = iter(free_ports(sum(len(c) for c in chains)))
    chains = [[(cwd, cmd, next(ports)) for cwd, cmd in chain] for chain in chains]

    def run_chain(chain):
        results = []
        for cwd, cmd, port in chain:
            results.append(_run(cwd, cmd, port, timeout))
            if results[-1][0] != 0:
                break
        return results

    with ThreadPoolExecutor(max_workers=len(chains)) as pool:
        return list(pool.map(run_chain, chains))


# The first command (`--trainer.strategy ddp`, one epoch of the quickstart on 2 processes) is the DDP case; the
# others train 3 steps (a mid-epoch save at step 2, validation at step 3) and resume to step 5.
FIT_LENGTH = {"ddp": ["--trainer.strategy", "ddp", "--trainer.max_epochs", "1"]}
# Fit, validate and save only (every launch costs two interpreter start-ups, ~6 s of CPU each): DDP's resume through
# the launcher is test_reliability.py's SIGKILL test (strategy/ddp.yaml, bit-identical to an uninterrupted run);
# SimMIM's resume is test_simmim.py's
FIT_ONLY = {"ddp", "simmim_fsdp2"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every strategy: fit on 2 ranks, then (all but FIT_ONLY) resume with --ckpt_path last; all at once."""
    jobs = {**STRATEGIES, "simmim_fsdp2": STRATEGIES["fsdp2"]}
    dirs = {name: tmp_path_factory.mktemp(name) for name in jobs}
    # the resume is the same command plus --ckpt_path last, as users resume (a different val_check_interval would
    # restore Lightning's logging step counter differently)
    args = {name: [*SMALL, *jobs[name], "--trainer.devices", "2",
                   *([] if name in FIT_LENGTH else ["--trainer.val_check_interval", "3"])] for name in jobs}
    args["simmim_fsdp2"][1] = str(EXP / "simmim_quick.yaml")  # SimMIM pretraining instead of the classifier
    chains = [[(dirs[n], _cmd(*args[n], *FIT_LENGTH.get(n, ["--trainer.max_steps", "3"]), tag="fit")),
               (dirs[n], _cmd(*args[n], "--trainer.max_steps", "5", "--ckpt_path", "last",
                              tag="resume"))][:1 if n in FIT_ONLY else 2] for n in jobs]
    results = dict(zip(jobs, _run_chains(chains, timeout=480)))
    return {n: (dirs[n], results[n][0], results[n][1] if len(results[n]) > 1 else None) for n in jobs}


def probes(tmp_path, tag, world=2):
    found = [json.loads((tmp_path / f"probe_{tag}_rank{r}.json").read_text()) for r in range(world)]
    assert [p["rank"] for p in found] == list(range(world)) and all(p["world_size"] == world for p in found)
    return found


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def _free_port() -> int:
    return free_ports(1)[0]




@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_fits_validates_saves_and_resumes_through_the_cli(matrix, name):
    tmp_path, (rc, log), resume = matrix[name]
    assert rc == 0, log
    fit = probes(tmp_path, "fit")
    steps = list(range(1, 12)) if name == "ddp" else [1, 2, 3]  # ddp: the whole epoch, 1,437 images / (64 x 2)
    for p in fit:
        assert p["strategy"] == STRATEGY_CLASS[name] and p["precision"] == "bf16-mixed"
        assert [s["step"] for s in p["steps"]] == steps
        assert all(torch.isfinite(torch.tensor(s["loss"])) for s in p["steps"])
    seen = [{s["images"] for s in p["steps"]} for p in fit]
    assert not seen[0] & seen[1], "the two ranks trained on the same images"

    run = tmp_path / "runs" / "quickstart" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() if name == "ddp" else last.is_dir()  # sharded strategies write a folder
    ea = events(run)
    scalars = ea.Tags()["scalars"]
    assert ea.Scalars("val/acc1")  # (the events hold the resumed steps too: the fixture ran both commands)
    assert all(torch.isfinite(torch.tensor(e.value)) and e.value > 0 for e in ea.Scalars("train/grad_norm"))
    scales = [e.value for t in scalars if t.startswith("logit_scale/") for e in ea.Scalars(t)]
    assert scales and all(1.0 < v <= 100.0 for v in scales)  # exp(clamped logit scale), init 10
    assert {"position_bias/stage0", "position_bias/stage3", "attention/stage0"} <= set(ea.Tags()["images"])
    # the signal-propagation instrument under every strategy: one amplitude per block, reduced over the ranks
    blocks = {f"signal/rms/s{i}b{j}" for i in range(4) for j in range(2)}
    assert blocks <= set(scalars) and "signal/amplitude" in ea.Tags()["images"]
    assert all(0.5 < e.value < 10 for t in blocks for e in ea.Scalars(t))

    import swinlab  # the export: fp32 backbone weights, loadable by name, finite logits
    model = swinlab.create_model(PICO, checkpoint=str(run / "best.safetensors"))
    assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()
    assert not any(t.dtype == torch.bfloat16 for t in model.state_dict().values())
    if name == "ddp":  # the final Lightning checkpoint of the command loads by name too
        assert torch.isfinite(swinlab.create_model(PICO, checkpoint=str(last))(torch.randn(1, 3, 32, 32))).all()

    if name in FIT_ONLY:
        assert resume is None
        return
    assert resume is not None and resume[0] == 0, resume and resume[1]
    resumed = probes(tmp_path, "resume")
    more = [4, 5]
    for before, after in zip(fit, resumed):
        assert [s["step"] for s in after["steps"]] == more  # continued where it stopped, not from 0
        assert not {s["images"] for s in after["steps"]} & {s["images"] for s in before["steps"]}
    losses = [e.step for e in events(run).Scalars("train/loss")]
    assert losses == [s - 1 for s in steps + more]  # logged into the same run folder


@pytest.mark.slow
def test_simmim_pretrains_under_fsdp2(matrix):
    """SimMIM's masked forward goes through the encoder's own call (FSDP2's root hooks gather its parameters); the
    replicated decoder and mask token get their gradients averaged over the ranks."""
    tmp_path, (rc, log), resume = matrix["simmim_fsdp2"]
    assert rc == 0, log
    fit = probes(tmp_path, "fit")
    assert all(p["strategy"] == "ModelParallelStrategy" and [s["step"] for s in p["steps"]] == [1, 2, 3]
               for p in fit)
    assert not {s["images"] for s in fit[0]["steps"]} & {s["images"] for s in fit[1]["steps"]}
    run = tmp_path / "runs" / "simmim_quick" / "version_0"
    ea = events(run)
    assert "simmim/reconstruction" in ea.Tags()["images"]
    assert all(torch.isfinite(torch.tensor(e.value)) for e in ea.Scalars("val/loss"))
    import swinlab
    encoder = swinlab.create_model(PICO, checkpoint=str(run / "best.safetensors"))  # the exported encoder
    assert torch.isfinite(encoder.forward_features(torch.randn(1, 3, 32, 32))).all()
    assert resume is None  # FIT_ONLY


def _launch_ranks(tmp_path, args, per_rank_env, timeout=240):
    """Start one ``python -m swinlab fit`` per rank with the given environment, as torchrun or srun would."""
    procs = []
    for env in per_rank_env:
        cmd = [sys.executable, "-m", "swinlab", "fit", *args, "--trainer.callbacks+=launch_helpers.Probe"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


@pytest.mark.slow
def test_torchrun_starts_one_process_per_rank(tmp_path):
    """``torchrun --nproc-per-node 2 -m swinlab fit ...``: the ranks come from torchrun's environment."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "swinlab", "fit", *SMALL, *STRATEGIES["ddp"], "--trainer.devices", "2", "--trainer.max_steps", "2",
           "--trainer.val_check_interval", "2",
           "--trainer.callbacks+=launch_helpers.Probe"]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = probes(tmp_path, "run")
    assert all(p["strategy"] == "DDPStrategy" and len(p["steps"]) == 2 for p in ranks)
    assert ranks[0]["steps"][0]["images"] != ranks[1]["steps"][0]["images"]


@pytest.mark.slow
def test_slurm_two_nodes_fsdp2_replicates_across_nodes(tmp_path):
    """Two SLURM tasks on two "nodes" (one device each), as ``srun`` starts them: Lightning reads SLURM_PROCID /
    SLURM_LOCALID / SLURM_NODEID, and FSDP2 picks HSDP (shard within a node, replicate across nodes)."""
    port = str(_free_port())
    envs = []
    for rank in range(2):
        envs.append(_env(tmp_path, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(rank),
                         SLURM_LOCALID="0", SLURM_NODEID=str(rank), SLURM_JOB_NAME="swinlab", SLURM_JOB_ID="4242",
                         SLURM_STEP_ID="0", SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    args = [*SMALL, "--config", str(STRATEGY / "fsdp2.yaml"), "--config", str(STRATEGY / "multinode.yaml"),
            "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy.init_args.data_parallel_size",
            "2", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--model.init_args.sharding.hsdp", "true"]
    _launch_ranks(tmp_path, args, envs)
    ranks = probes(tmp_path, "run")
    assert all(p["strategy"] == "ModelParallelStrategy" and len(p["steps"]) == 2 for p in ranks)
    assert all(p["mesh_dims"] == ["replicate", "shard"] and p["mesh"] == [2, 1] for p in ranks)  # HSDP
    assert ranks[0]["steps"][0]["images"] != ranks[1]["steps"][0]["images"]
    assert (tmp_path / "runs" / "quickstart" / "job4242" / "checkpoints" / "last.ckpt").is_dir()  # the job's folder


# -- what loading a checkpoint folder may run: nothing -------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _dcp_folder_with_payload(folder, marker):
    """A distributed-checkpoint folder (as FSDP2 writes) whose `.metadata` pickle runs a command when unpickled."""
    import pickle
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "__0_0.distcp").write_bytes(b"")
    return folder


def test_a_payload_in_a_distributed_checkpoint_is_refused_through_the_cli(tmp_path, monkeypatch, capsys):
    """Through ``python -m swinlab``'s entry point, in-process (the check runs before anything is built or launched;
    test_bad_inputs.py starts a payload case as a real subprocess)."""
    from swinlab.__main__ import main as swinlab_main
    marker = tmp_path / "ran"
    folder = _dcp_folder_with_payload(tmp_path / "evil.ckpt", marker)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rc = swinlab_main(["fit", "--config", str(EXP / "quickstart.yaml"), "--config", str(STRATEGY / "fsdp2.yaml"),
                       "--trainer.strategy.init_args.data_parallel_size", "1", "--ckpt_path", str(folder)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert ".metadata" in lines[0] and "SWINLAB_TRUST_CHECKPOINTS" in lines[0] and ".system" in lines[0]
    assert not marker.exists() and not (tmp_path / "runs").exists()  # nothing ran, no run folder was made


def test_checkpoint_folder_check_covers_deepspeed_files_and_byte_items(tmp_path, monkeypatch):
    from swinlab.errors import CheckpointError
    from swinlab.training.checkpoint_io import check_checkpoint_folder

    marker = tmp_path / "ran"
    ds = tmp_path / "ds.ckpt" / "checkpoint"
    ds.mkdir(parents=True)
    (tmp_path / "ds.ckpt" / "latest").write_text("checkpoint")
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, ds / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt .*SWINLAB_TRUST_CHECKPOINTS"):
        check_checkpoint_folder(tmp_path / "ds.ckpt")
    # a real distributed checkpoint whose non-tensor (byte) item carries the payload
    import torch.distributed.checkpoint as dcp
    good = {"w": torch.arange(4.0), "note": {"lr": 0.1}}
    dcp.save(good, checkpoint_id=str(tmp_path / "ok.ckpt"), no_dist=True)
    check_checkpoint_folder(tmp_path / "ok.ckpt")  # tensors and plain values pass
    dcp.save({"w": torch.arange(4.0), "note": _Payload(marker)}, checkpoint_id=str(tmp_path / "bad.ckpt"),
             no_dist=True)
    with pytest.raises(CheckpointError, match="distcp|holds objects"):
        check_checkpoint_folder(tmp_path / "bad.ckpt")
    monkeypatch.setenv("SWINLAB_TRUST_CHECKPOINTS", "1")
    check_checkpoint_folder(tmp_path / "bad.ckpt")  # the explicit opt-in: no check (and nothing loaded here)
    assert not marker.exists()


# -- clipping where Lightning's precision plugins refuse it ---------------------------------------------------------
def _task_with(strategy, precision_plugin):
    import types

    from swinlab.tasks import ImageClassifier
    torch.manual_seed(0)
    task = ImageClassifier(PICO, num_classes=10, model_kwargs={"img_size": 16})
    task._trainer = types.SimpleNamespace(strategy=strategy, precision_plugin=precision_plugin)
    return task


def test_fsdp1_clips_through_the_root_module():
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import FSDPStrategy

    from swinlab.errors import ConfigError

    class Root(torch.nn.Module):
        calls = []

        def clip_grad_norm_(self, max_norm):
            self.calls.append(max_norm)

    strategy = FSDPStrategy()
    strategy.model = Root()
    task = _task_with(strategy, Precision())
    task.configure_gradient_clipping(None, 5.0, "norm")
    assert Root.calls == [5.0]
    with pytest.raises(ConfigError, match="gradient_clip_algorithm"):
        task.configure_gradient_clipping(None, 5.0, "value")


def test_fused_adamw_under_bf16_mixed_is_clipped_like_lightnings_base_plugin():
    """Lightning's AMP plugin refuses to clip a fused optimizer even without a GradScaler (bf16-mixed)."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.strategies import SingleDeviceStrategy

    task = _task_with(SingleDeviceStrategy(torch.device("cpu")), MixedPrecision("bf16-mixed", "cpu"))
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-3, fused=True)
    task.model(torch.randn(4, 3, 16, 16)).square().sum().mul(100).backward()
    grads = [p.grad.clone() for p in task.model.parameters()]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert total > 1.0
    task.configure_gradient_clipping(optimizer, 1.0, "norm")
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in task.model.parameters()]))
    assert clipped == pytest.approx(1.0, rel=1e-4)
    assert all(torch.allclose(p.grad, g / total, rtol=1e-4, atol=1e-9) for p, g in zip(task.model.parameters(), grads))
