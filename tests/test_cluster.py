"""On the real two-node SLURM cluster (.ci/slurm-cluster, fixture ``slurm_cluster``): the documented sbatch commands
run as written (docs/cluster.md), and a job stopped the way schedulers stop jobs saves, is requeued and resumes to
bit-identical final weights, under DDP and FSDP2.

Every job is submitted at the start (module fixture ``jobs``) so that they overlap on the 2 cores; each test then
waits for its own. The script is docs/slurm/cpu.sbatch itself, submitted from a folder laid out like the repository
root (``docs``, ``experiments``, ``.venv``); the test's only additions are fit arguments after the script (a short
run) and, for the stopped jobs, a callback that waits at one step until the scheduler's signal has arrived.
"""
import difflib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DOC = ROOT / "docs" / "cluster.md"
CPU, GPU = ROOT / "docs" / "slurm" / "cpu.sbatch", ROOT / "docs" / "slurm" / "v2_g.sbatch"
SHORT = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
         "--attention_images.enabled", "false", "--trainer.callbacks+=launch_helpers.Probe"]
WAIT_STEP = 2  # the stopped jobs wait at the start of step 3 (mid-epoch 0) for the signal; saved after step 3


def doc_commands():
    """The ``sbatch`` lines of the block marked ``<!-- cluster-commands -->`` in docs/cluster.md: (env, args)."""
    text = DOC.read_text()
    block = re.search(r"<!-- cluster-commands -->\s*```bash\n(.*?)```", text, re.S).group(1)
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
        commands.append((env, words[len(env):]))
    return commands


def _layout(cmd):
    nodes = int(re.search(r"--nodes=(\d+)", " ".join(cmd)).group(1))
    per_node = int(re.search(r"--ntasks-per-node=(\d+)", " ".join(cmd)).group(1))
    return nodes, per_node


class Job:
    def __init__(self, cluster, folder: Path, env, cmd, extra=()):
        self.cluster, self.folder, self.env, self.cmd = cluster, folder, env, cmd
        folder.mkdir(parents=True)
        for name in ("docs", "experiments"):
            (folder / name).symlink_to(ROOT / name)
        (folder / ".venv").symlink_to(Path(sys.prefix))  # the README's .venv: this interpreter's environment
        assert cmd[0] == "sbatch"
        env = dict(env, SWINLAB_PROBE_DIR=str(folder),  # tests/ holds the test-only callbacks
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
        self.id = cluster.sbatch(*cmd[1:], *SHORT, *extra, cwd=folder, **env)
        self.nodes, self.per_node = _layout(cmd)

    @property
    def run(self) -> Path:
        return self.folder / "runs" / "quickstart" / f"job{self.id}"

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.folder.glob("slurm-*.out")))

    def wait(self, timeout=240, until=None):
        try:
            return self.cluster.wait(self.id, timeout, until)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def weights(self):
        last = self.run / "checkpoints" / "last.ckpt"
        if last.is_dir():  # FSDP2: a distributed checkpoint, read whole on this process
            from swinlab.training.callbacks import _read_sharded_backbone
            return _read_sharded_backbone(str(last))
        return {k: v for k, v in torch.load(last, weights_only=True)["state_dict"].items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    """Every job of this file, submitted at once: the four documented commands, and a stopped twin of the DDP 2x1
    and FSDP2 2x1 ones (the documented runs are their uninterrupted references)."""
    tmp = tmp_path_factory.mktemp("cluster")
    commands = {f"{env.get('STRATEGY', 'ddp')}-{'x'.join(map(str, _layout(cmd)))}": (env, cmd)
                for env, cmd in doc_commands()}
    assert sorted(commands) == ["ddp-1x2", "ddp-2x1", "fsdp2-1x2", "fsdp2-2x1"]
    out = {}
    for key in ("ddp-2x1", "fsdp2-2x1"):  # the stopped jobs first: they hold their nodes until signalled
        out[f"{key}-stopped"] = Job(slurm_cluster, tmp / f"{key}-stopped", *commands[key], [
            "--trainer.callbacks+=launch_helpers.WaitForSignal", f"--trainer.callbacks.step={WAIT_STEP}",
            f"--trainer.callbacks.flag={tmp / key}-waiting"])
    for key, (env, cmd) in commands.items():
        out[key] = Job(slurm_cluster, tmp / key, env, cmd)
    out["ddp-2x1-failing"] = Job(slurm_cluster, tmp / "failing", *commands["ddp-2x1"], [
        "--trainer.callbacks+=launch_helpers.FailOnRank", "--trainer.callbacks.rank=1"])
    yield out
    for job in out.values():
        slurm_cluster.run("scancel", job.id, check=False)


def test_the_cluster_runs_one_task_on_each_of_two_nodes(slurm_cluster, tmp_path):
    out = slurm_cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "--time=1", "--label",
                            "printenv", "SLURMD_NODENAME", cwd=tmp_path)
    assert sorted(out.splitlines()) == ["0: n1", "1: n2"]


def test_the_cpu_and_gpu_scripts_differ_only_in_the_documented_values():
    documented = ("# ", "#SBATCH --job-name=", "#SBATCH --nodes=", "#SBATCH --ntasks-per-node=",
                  "#SBATCH --gpus-per-node=", "#SBATCH --mem=", "#SBATCH --cpus-per-task=", "#SBATCH --time=",
                  "#SBATCH --signal=", "CONFIG=", "ACCELERATOR=", "PRECISION=", "PARAM_DTYPE=", "DATA=", "STRATEGY=")
    changed = [ln[1:] for ln in difflib.unified_diff(CPU.read_text().splitlines(), GPU.read_text().splitlines(),
                                                     lineterm="", n=0)
               if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    assert changed and all(ln.startswith(documented) for ln in changed), changed
    doc = DOC.read_text()
    for key in ("--job-name", "--gpus-per-node", "--cpus-per-task", "--signal", "CONFIG", "PRECISION", "DATA",
                "STRATEGY"):
        assert f"`{key}`" in doc  # each differing value has a row in the doc's table


@pytest.mark.parametrize("key, how", [("ddp-2x1", "scancel --signal=USR1"), ("fsdp2-2x1", "scontrol requeue")])
def test_a_stopped_job_saves_is_requeued_and_resumes_bit_identical(jobs, slurm_cluster, key, how):
    job, ref = jobs[f"{key}-stopped"], jobs[key]
    flags = [Path(f"{job.folder.parent / key}-waiting.{r}") for r in range(job.nodes * job.per_node)]
    end = time.monotonic() + 240
    while not all(f.exists() for f in flags):
        assert time.monotonic() < end and job.wait(1, until=lambda s: True)["JobState"] in ("PENDING", "RUNNING"), \
            job.logs()
        time.sleep(0.2)
    slurm_cluster.run(*how.split(), job.id)  # every rank is waiting at the start of step 3 (mid-epoch)
    state = job.wait(until=lambda s: s.get("JobState") == "COMPLETED" or (s.get("JobState") in (
        "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") and s.get("Restarts") == "0"))
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), job.logs()
    logs = job.logs()
    signame = "SIGUSR1" if "USR1" in how else "SIGTERM"
    saved = re.findall(rf"swinlab: stopped by {signame} at step (\d+) \(epoch 0\): saved (\S+); (.*)", logs)
    assert len(saved) == 1 and saved[0][0] == str(WAIT_STEP + 1), logs
    assert saved[0][1] == f"runs/quickstart/job{job.id}/checkpoints/last.ckpt"
    requeued_by_us = "requeued: it resumes from there" in saved[0][2]
    assert requeued_by_us == (how != "scontrol requeue"), saved  # the scheduler requeues on `scontrol requeue`
    ref_state = ref.wait()
    assert ref_state["JobState"] == "COMPLETED", ref.logs()
    final, whole = job.weights(), ref.weights()
    assert final.keys() == whole.keys() and final
    diff = [k for k in whole if not torch.equal(whole[k], final[k])]
    assert not diff, diff[:5]  # bit-identical


@pytest.mark.parametrize("key", ["ddp-1x2", "ddp-2x1", "fsdp2-1x2", "fsdp2-2x1"])
def test_the_documented_sbatch_commands_run_as_written(jobs, key):
    job = jobs[key]
    state = job.wait()
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), job.logs()
    world = job.nodes * job.per_node
    # one log per task, one run folder per job, every rank in it
    assert sorted(p.name for p in job.folder.glob("slurm-*task*.out")) == [
        f"slurm-quickstart-{job.id}-task{r}.out" for r in range(world)]
    assert [p.name for p in (job.folder / "runs" / "quickstart").iterdir()] == [f"job{job.id}"]
    assert (job.run / "best.safetensors").is_file() and (job.run / "config.yaml").is_file()
    probes = [json.loads((job.folder / f"probe_run_rank{r}.json").read_text()) for r in range(world)]
    assert [p["world_size"] for p in probes] == [world] * world and len({p["steps"][0]["images"] for p in probes}) \
        == world  # every rank trained, each on its own part of the batch
    last = job.run / "checkpoints" / "last.ckpt"
    if key.startswith("fsdp2"):
        assert len(list(last.glob("*.distcp"))) == world  # one shard per rank
        # shard within a node, replicate across nodes
        mesh = {"1x2": (["data_parallel"], [2]), "2x1": (["replicate", "shard"], [2, 1])}[key.split("-")[1]]
        assert all((p["mesh_dims"], p["mesh"]) == mesh for p in probes), probes
    else:
        assert last.is_file() and all(p["strategy"] == "DDPStrategy" for p in probes)


def test_when_one_rank_fails_the_job_ends_without_waiting_for_it(jobs):
    """Rank 1 raises at the start of step 2 while rank 0 enters the step's all-reduce: the job ends with it (srun
    --kill-on-bad-exit=1 in the script), not at a collective's 30-minute timeout."""
    job = jobs["ddp-2x1-failing"]
    state = job.wait(timeout=180)
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0", job.logs()
    assert "FailOnRank: rank 1 fails at step 1" in (job.folder / f"slurm-quickstart-{job.id}-task1.out").read_text()
    start, end = (time.mktime(time.strptime(state[k], "%Y-%m-%dT%H:%M:%S")) for k in ("StartTime", "EndTime"))
    assert end - start < 150, state  # ended with the failing rank, not at a collective's timeout


@pytest.mark.parametrize("launch, words", [
    (["srun", "--nodes=1", "--ntasks=2"], "without --ntasks-per-node"),
    (["salloc", "--nodes=1", "--ntasks-per-node=2", "srun"], "salloc's default"),
])
def test_srun_without_tasks_per_node_and_srun_under_salloc_stop_with_one_line(slurm_cluster, tmp_path, launch, words):
    cmd = [*launch, "--time=2", sys.executable, "-m", "swinlab", "fit", "--config",
           str(ROOT / "experiments" / "quickstart.yaml"), "--config", str(ROOT / "experiments" / "strategy" /
                                                                          "ddp.yaml"), "--trainer.devices", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=slurm_cluster.env(), capture_output=True, text=True, timeout=180)
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 2 and all(words in ln for ln in errors), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
