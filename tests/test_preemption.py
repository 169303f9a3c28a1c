"""A run stopped by a signal saves, exits non-zero and resumes exactly (swinlab.training.preemption), outside SLURM:
the signal arrives during a training step, during a validation and while a checkpoint is written. (On the real
cluster, with requeue, under DDP and FSDP2: tests/test_cluster.py.)"""
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT
from test_reliability import CONFIG, _env

PHASES = {  # phase -> (SignalSelf arguments, the step last.ckpt must hold: the run stops at the next step boundary)
    "train": (["--trainer.callbacks.step=4"], 5),  # during step 5: saved after it
    # during the epoch-end validation after step 6: saved there, and the resumed run repeats that validation
    "val": (["--trainer.callbacks.step=6", "--trainer.callbacks.phase=val", "--trainer.callbacks.batch=1"], 6),
    "save": (["--trainer.callbacks.step=3", "--trainer.callbacks.phase=save"], 4),  # while step 3's is written
}


def _fit(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "swinlab", "fit", "--config", "cfg.yaml", *args], cwd=tmp_path,
                          env=_env(ROOT / "tests"), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run: its final checkpoint."""
    tmp = tmp_path_factory.mktemp("whole")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    done = _fit(tmp, "--trainer.logger.init_args.name", "whole")
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp / "runs" / "whole" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_sigterm_saves_exits_143_and_the_resumed_run_is_bit_identical(tmp_path, whole, phase):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    args, step = PHASES[phase]
    stopped = _fit(tmp_path, "--trainer.logger.init_args.name", "stopped",
                   "--trainer.callbacks+=launch_helpers.SignalSelf", *args)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    run = tmp_path / "runs" / "stopped" / "version_0"
    line = [ln for ln in stopped.stderr.splitlines() if ln.startswith("swinlab: stopped by SIGTERM")]
    assert line and "runs/stopped/version_0/checkpoints/last.ckpt" in line[0] and "--ckpt_path last" in line[0], line
    mid = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert mid["global_step"] == step
    if phase == "save":  # the resume from a step-boundary checkpoint is the "train" case's
        return

    resumed = _fit(tmp_path, "--trainer.logger.init_args.name", "stopped", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == whole["global_step"] == 12
    diff = [k for k, v in whole["state_dict"].items() if not torch.equal(v, final["state_dict"][k])]
    assert not diff, diff[:5]  # bit-identical weights


@pytest.mark.slow
def test_sigterm_during_validate_exits_143(tmp_path):
    """Outside fit, Lightning's own SIGTERM path ends the loop with SystemExit(None), a success: swinlab says 143."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    done = subprocess.run([sys.executable, "-m", "swinlab", "validate", "--config", "cfg.yaml",
                           "--trainer.callbacks+=launch_helpers.SignalSelf", "--trainer.callbacks.step=0",
                           "--trainer.callbacks.phase=val", "--trainer.callbacks.batch=0"], cwd=tmp_path,
                          env=_env(ROOT / "tests"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
