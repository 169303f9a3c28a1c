"""Reliability: exact resume after SIGKILL mid-epoch, atomic checkpoint writes, no unpickling on any load path,
and the non-finite guard."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import ROOT, free_ports, kill_when_paused

from swinlab.errors import CheckpointError, SwinlabError
from swinlab.training.cli import main

PICO = "swinv2_pico_patch2_window4_32"

# mixup/cutmix, stochastic depth and random shifts: every source of randomness an exact resume has to reproduce
CONFIG = {
    "seed_everything": 0,
    "threads": 1,
    "model": {"class_path": "swinlab.tasks.ImageClassifier",
              "init_args": {"model_name": PICO, "num_classes": 10, "warmup_steps": 2, "base_lr": 0.02,
                            "model_kwargs": {"img_size": 16, "drop_path_rate": 0.1}, "mixup": 0.8, "cutmix": 1.0}},
    "data": {"class_path": "swinlab.data.DigitsDataModule",
             "init_args": {"img_size": 16, "batch_size": 16, "max_shift": 2}},
    "trainer": {"accelerator": "cpu", "max_epochs": 2, "limit_train_batches": 6, "limit_val_batches": 2,
                "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
                "enable_model_summary": False, "deterministic": True,
                "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": "runs", "name": "tiny"}}},
    "resume": {"every_n_train_steps": 3},
    "attention_images": {"enabled": False},
    "signal": {"image": False},  # the per-block scalars stay on; no matplotlib figure per validation
}

PAUSE = '''
import os, time
from lightning.pytorch.callbacks import Callback

class PauseAt(Callback):
    """Test-only: at the start of the batch after ``step`` optimizer steps, say so in a file and wait to be killed."""
    def __init__(self, step: int, flag: str):
        self.step, self.flag = step, flag

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with open(self.flag, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)
'''


@pytest.fixture(autouse=True)
def _restore_globals():
    """``threads: 1`` and ``deterministic: true`` must not leak into other tests."""
    n, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(det)


def _env(extra_path=None):
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")


def _final(run: pathlib.Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return ckpt, {tag: ea.Scalars(tag)[-1].value for tag in ("val/acc1", "val/loss")}


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    (tmp_path / "pause_cb.py").write_text(PAUSE)
    flag = tmp_path / "paused"
    # killed run: checkpoints at steps 3 and 6 (mid-epoch), paused at the start of the batch after step 4 and
    # killed there, so step 4 is lost and must be redone identically
    killed = subprocess.Popen(
        [sys.executable, "-m", "swinlab", "fit", "--config", "cfg.yaml", "--trainer.logger.init_args.name", "killed",
         "--trainer.callbacks+=pause_cb.PauseAt", "--trainer.callbacks.step=4", f"--trainer.callbacks.flag={flag}"],
        cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        monkeypatch.chdir(tmp_path)
        assert main(["fit", "--config", "cfg.yaml", "--trainer.logger.init_args.name", "whole"]) == 0
        deadline = time.time() + 240
        while not flag.exists():
            assert killed.poll() is None, killed.stderr.read()[-3000:]
            assert time.time() < deadline, "the killed run never reached step 4"
            time.sleep(0.2)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(30)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "killed" / "version_0"
    mid = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert mid["global_step"] == 3 and mid["epoch"] == 0  # a mid-epoch checkpoint, and step 4 was lost
    loader_state = mid["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]  # torchdata's StatefulDataLoader
    assert loader_state["resume"]["epoch"] == 0 and loader_state["resume"]["batches_served"] == 3
    assert mid["DigitsDataModule"]["train_loader"] == loader_state  # the DataModule's copy: restored in any case
    assert not list((run / "checkpoints").glob(".*.tmp"))  # no temporary files left behind by atomic saves

    assert main(["fit", "--config", "cfg.yaml", "--trainer.logger.init_args.name", "killed", "--ckpt_path",
                 "last"]) == 0
    assert not (tmp_path / "runs" / "killed" / "version_1").exists()
    whole, whole_metrics = _final(tmp_path / "runs" / "whole" / "version_0")
    resumed, resumed_metrics = _final(run)
    assert resumed["global_step"] == whole["global_step"] == 12
    assert resumed_metrics == whole_metrics
    diff = [k for k, v in whole["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not diff, diff[:5]  # bit-identical weights


# -- atomic writes ---------------------------------------------------------------------------------------------------

def _trainer(tmp_path, **kwargs):
    import lightning.pytorch as pl
    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
              "enable_model_summary": False, "default_root_dir": str(tmp_path), **kwargs}
    return pl.Trainer(**kwargs)


def test_safe_checkpoint_io_is_attached_only_to_single_file_strategies(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    from swinlab.training.checkpoint_io import SafeCheckpointIO
    from swinlab.training.cli import attach_safe_checkpoint_io

    class Fake:
        def __init__(self, strategy):
            self.strategy = strategy

    trainer = _trainer(tmp_path)
    assert attach_safe_checkpoint_io(trainer) and isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    ddp = Fake(DDPStrategy())
    assert attach_safe_checkpoint_io(ddp) and isinstance(ddp.strategy.checkpoint_io, SafeCheckpointIO)
    for sharded in (FSDPStrategy(), ModelParallelStrategy(), DeepSpeedStrategy()):
        before = type(sharded.checkpoint_io)
        assert not attach_safe_checkpoint_io(Fake(sharded)), type(sharded).__name__
        assert type(sharded.checkpoint_io) is before and not isinstance(sharded.checkpoint_io, SafeCheckpointIO)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    from swinlab.tasks import ImageClassifier
    from swinlab.training.cli import attach_safe_checkpoint_io

    trainer = _trainer(tmp_path)
    attach_safe_checkpoint_io(trainer)
    path = tmp_path / "last.ckpt"
    trainer.strategy.checkpoint_io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    good = path.read_bytes()

    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):  # writes part of the file, then the disk is full
        real_save(obj, f, *args, **kwargs)
        f.truncate(len(good) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    module = ImageClassifier(model_name=PICO, num_classes=10, model_kwargs={"img_size": 16})
    trainer.strategy.connect(module)
    with pytest.raises(CheckpointError) as err:
        trainer.save_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg and "No space left" in msg and "previous checkpoint is intact" in msg
    assert path.read_bytes() == good  # the old checkpoint survives, byte for byte
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_failed_export_leaves_the_previous_safetensors_intact(tmp_path, monkeypatch):
    import safetensors.torch

    from swinlab.models import create_model, save_safetensors
    from swinlab.tasks import ImageClassifier
    from swinlab.training.callbacks import ExportBest

    module = ImageClassifier(model_name=PICO, num_classes=10, model_kwargs={"img_size": 16})
    out = save_safetensors(module.model, tmp_path / "best.safetensors", PICO)
    good = out.read_bytes()

    def full_disk(state, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    export = ExportBest()
    export.path = out
    with pytest.raises(CheckpointError) as err:
        export._export(module, module.model.state_dict(), "")
    assert "\n" not in str(err.value) and "No space left" in str(err.value) and "swinlab convert" in str(err.value)
    assert out.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]
    reloaded = create_model(PICO, checkpoint=str(out), img_size=16).state_dict()
    assert reloaded.keys() == module.model.state_dict().keys()
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in reloaded.items())


# -- safe loading ----------------------------------------------------------------------------------------------------

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_pickle_payload_checkpoint_is_refused_by_the_cli(tmp_path, monkeypatch, subcommand):
    from swinlab.tasks import ImageClassifier

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    marker = tmp_path / "pwned"
    module = ImageClassifier(model_name=PICO, num_classes=10, model_kwargs={"img_size": 16})
    torch.save({"state_dict": module.state_dict(), "global_step": 0, "extra": Payload(marker)}, "evil.ckpt")
    with pytest.raises(CheckpointError) as err:
        main([subcommand, "--config", "cfg.yaml", "--ckpt_path", "evil.ckpt"])
    msg = str(err.value)
    assert "\n" not in msg and "refused to load evil.ckpt" in msg and "tensors only" in msg
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_trainer_checkpoint_loads_are_weights_only(tmp_path):
    """Past the CLI's own check, Lightning's resume/validate path reads through SafeCheckpointIO too."""
    from swinlab.training.cli import attach_safe_checkpoint_io

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "extra": Payload(marker)}, tmp_path / "evil.ckpt")
    trainer = _trainer(tmp_path)
    attach_safe_checkpoint_io(trainer)
    with pytest.raises(CheckpointError, match="refused to load"):
        trainer.strategy.load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


# -- non-finite guard -------------------------------------------------------------------------------------------------

class _Images(torch.utils.data.Dataset):
    """16 digits-sized images; those in ``nan_batches`` (batch size 4) hold a NaN pixel."""

    def __init__(self, nan_batches):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, 16, 16, generator=g)
        self.y = torch.arange(16) % 10
        for b in nan_batches:
            self.x[4 * b, 0, 0, 0] = float("nan")

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _guarded_fit(tmp_path, nan_batches, max_consecutive):
    from swinlab.tasks import ImageClassifier
    from swinlab.training.nonfinite import NonFiniteGuard

    torch.manual_seed(0)
    module = ImageClassifier(model_name=PICO, num_classes=10, model_kwargs={"img_size": 16}, mixup=0, cutmix=0,
                             warmup_steps=1, base_lr=0.05)
    guard = NonFiniteGuard(max_consecutive=max_consecutive)
    snapshots = {}

    class Snap(__import__("lightning").pytorch.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[batch_idx] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[guard, Snap()], enable_checkpointing=False,
                       gradient_clip_val=5.0, log_every_n_steps=1)
    loader = torch.utils.data.DataLoader(_Images(nan_batches), batch_size=4)
    return trainer, module, guard, snapshots, loader


def test_non_finite_steps_are_skipped_and_weights_never_change(tmp_path):
    trainer, module, guard, snaps, loader = _guarded_fit(tmp_path, nan_batches=[1, 2], max_consecutive=3)
    trainer.fit(module, train_dataloaders=loader)
    after = {k: v.clone() for k, v in module.model.state_dict().items()}
    assert guard.skipped_steps == 2 and guard.consecutive == 0 and trainer.global_step == 4
    assert all(torch.equal(snaps[1][k], snaps[2][k]) and torch.equal(snaps[2][k], snaps[3][k]) for k in snaps[1])
    assert any(not torch.equal(snaps[0][k], snaps[1][k]) for k in snaps[0])  # the finite steps did train
    assert all(torch.isfinite(v).all() for v in after.values())
    assert trainer.callback_metrics["train/skipped_steps"] == 2


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path):
    trainer, module, guard, snaps, loader = _guarded_fit(tmp_path, nan_batches=[1, 2, 3], max_consecutive=2)
    with pytest.raises(SwinlabError) as err:
        trainer.fit(module, train_dataloaders=loader)
    msg = str(err.value)
    assert "\n" not in msg and "2 optimizer steps in a row" in msg and "lower the learning rate" in msg
    assert guard.skipped_steps == 2
    assert all(torch.isfinite(v).all() for v in module.model.state_dict().values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_quickstart_v2_stays_finite_on_gpu(tmp_path, monkeypatch):
    cfg = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    cfg["trainer"].update(accelerator="gpu", precision="16-mixed", max_epochs=2)
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "q.yaml"]) == 0
    ckpt = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert ckpt["callbacks"]["NonFiniteGuard"]["skipped_steps"] <= 5  # only GradScaler calibration, if any


@pytest.mark.slow
def test_sigkill_of_a_two_process_ddp_run_then_resume_matches_an_uninterrupted_one(tmp_path):
    """Both ranks started by the CLI's own launcher (``--trainer.devices 2``), the whole process group killed with
    SIGKILL after the mid-epoch save at step 3, then ``--ckpt_path last``: the same steps and bit-identical weights
    as an uninterrupted 2-process run (each rank resumes its own shard of the epoch)."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    (tmp_path / "pause_cb.py").write_text(PAUSE.replace('open(self.flag, "w")',
                                                        'open(f"{self.flag}.{trainer.global_rank}", "w")'))
    flag = tmp_path / "paused"
    # experiments/strategy/ddp.yaml as users add it: this is that strategy file's resume check (tests/test_launch.py's
    # matrix fits with it through the command)
    ddp = ["--trainer.devices", "2", "--config", str(ROOT / "experiments" / "strategy" / "ddp.yaml")]
    ports = iter(free_ports(3))

    def start(name, *extra):
        return subprocess.Popen(
            [sys.executable, "-m", "swinlab", "fit", "--config", "cfg.yaml", *ddp, "--trainer.logger.init_args.name",
             name, *extra], cwd=tmp_path, env=dict(_env(tmp_path), MASTER_PORT=str(next(ports))),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    whole = start("whole")
    killed = start("killed", "--trainer.callbacks+=pause_cb.PauseAt", "--trainer.callbacks.step=4",
                   f"--trainer.callbacks.flag={flag}")
    kill_when_paused(killed, whole, flag)
    run = tmp_path / "runs" / "killed" / "version_0"
    mid = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert mid["global_step"] == 3 and mid["epoch"] == 0  # a mid-epoch checkpoint; step 4 was lost on both ranks

    resumed_proc = start("killed", "--ckpt_path", "last")
    assert resumed_proc.wait(300) == 0, resumed_proc.stderr.read()[-3000:]
    assert not (tmp_path / "runs" / "killed" / "version_1").exists()
    whole_ckpt, whole_metrics = _final(tmp_path / "runs" / "whole" / "version_0")
    resumed, resumed_metrics = _final(run)
    assert resumed["global_step"] == whole_ckpt["global_step"] == 12  # 2 epochs x 6 batches on each rank
    assert resumed_metrics == whole_metrics
    diff = [k for k, v in whole_ckpt["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not diff, diff[:5]  # bit-identical weights
