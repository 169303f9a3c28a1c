"""ImageClassifier in short in-process fits: Mixup, EMA, LR scaling, resume."""
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from swinlab.data import DigitsDataModule
from swinlab.tasks import ImageClassifier

PICO = "swinv2_pico_patch2_window4_32"


def _trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                gradient_clip_val=5.0)
    args.update(kw)
    return pl.Trainer(**args)


def _module(**kw):
    args = dict(model_name=PICO, num_classes=10, model_kwargs={"img_size": 16}, warmup_steps=2, base_lr=5e-3)
    args.update(kw)
    torch.manual_seed(0)
    return ImageClassifier(**args)


class Snapshots(Callback):
    """Weights, targets and LR seen at each training step."""

    def __init__(self):
        self.weights, self.targets, self.lrs, self.steps = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.steps.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def test_mixup_ema_and_lr_scaling(tmp_path):
    module = _module(mixup=0.8, cutmix=1.0, label_smoothing=0.1, ema_decay=0.9)
    seen = []
    module.train_loss.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    snaps = Snapshots()
    dm = DigitsDataModule(img_size=16, batch_size=16)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[snaps])
    trainer.fit(module, dm)
    # Mixup/CutMix through timm: soft targets, rows sum to 1, not one-hot, label smoothing floor 0.1/10
    assert len(seen) == 3 and all(t.shape == (16, 10) and t.dtype.is_floating_point for t in seen)
    assert all(torch.allclose(t.sum(1), torch.ones(16)) for t in seen)
    assert all(t.max() < 1.0 and t.min() >= 0.01 - 1e-6 for t in seen)
    assert any(((t > 0.02).sum(1) > 1).any() for t in seen)  # two classes mixed
    # EMA (timm ModelEmaV3): copy at step 1, then ema = 0.9 ema + 0.1 w
    expected = {k: v.clone() for k, v in snaps.weights[0].items()}
    for w in snaps.weights[1:]:
        for k in expected:
            if expected[k].is_floating_point():
                expected[k] = 0.9 * expected[k] + 0.1 * w[k]
    ema = module.ema.module.state_dict()
    for k, v in expected.items():
        assert torch.allclose(ema[k], v, atol=1e-6), k
    assert not all(torch.equal(ema[k], snaps.weights[-1][k]) for k in expected)
    assert "val/acc1_ema" in trainer.callback_metrics and "val/acc5" in trainer.callback_metrics
    # base LR scaled by global batch / 512; the schedule starts at the (scaled) warmup LR
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["initial_lr"] == 5e-3 * 16 / 512
    assert snaps.lrs[0] == module.hparams.warmup_lr * 16 / 512
    assert {g["name"] for g in opt.param_groups} == {"decay", "no_decay"}


class StopAfterFirstEpoch(Callback):
    """Simulates an interrupted run: the 2-epoch schedule stops after epoch 0 (last.ckpt written at its end)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _fit(tmp_path, max_epochs, ckpt_path=None, callbacks=()):
    module = _module(mixup=0.0, cutmix=0.0, warmup_steps=3)
    dm = DigitsDataModule(img_size=16, batch_size=16, max_shift=0)
    trainer = _trainer(tmp_path, max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=0,
                       callbacks=list(callbacks), enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, module


def test_resume_continues_step_schedule_and_optimizer(tmp_path):
    full = Snapshots()
    trainer_a, module_a = _fit(tmp_path / "a", 2, callbacks=[full])
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "b"), save_last=True)
    trainer_b, _ = _fit(tmp_path / "b", 2, callbacks=[StopAfterFirstEpoch(), ckpt])
    assert trainer_b.global_step == 3
    last = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and last["swinlab"]["model"] == PICO
    resumed = Snapshots()
    trainer_c, module_c = _fit(tmp_path / "c", 2, ckpt_path=str(tmp_path / "b" / "last.ckpt"), callbacks=[resumed])
    assert trainer_a.global_step == trainer_c.global_step == 6
    assert resumed.steps == [3, 4, 5]
    assert resumed.lrs == full.lrs[3:]  # same position in the warmup/cosine schedule
    for k, v in module_a.model.state_dict().items():
        assert torch.allclose(v, module_c.model.state_dict()[k], atol=1e-6), k
    sa, sc = trainer_a.optimizers[0].state_dict(), trainer_c.optimizers[0].state_dict()
    for i, st in sa["state"].items():
        assert torch.equal(st["step"], sc["state"][i]["step"])
        assert torch.allclose(st["exp_avg_sq"], sc["state"][i]["exp_avg_sq"], atol=1e-9)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin-waiting when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_configure_model_shards_blocks_with_fsdp2(tmp_path):
    """ModelParallelStrategy sets ``device_mesh``; configure_model then applies fully_shard per block and overall."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        module = _module(mixup=0.0, cutmix=0.0)
        module._device_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
        module.configure_model()
        assert type(module.model.blocks()[0]).__name__.startswith("FSDP")
        assert type(module.model).__name__.startswith("FSDP")
        assert all(isinstance(p, DTensor) for p in module.model.parameters())
        module(torch.randn(2, 3, 16, 16)).sum().backward()
        assert all(p.grad is not None for p in module.model.parameters())
    finally:
        dist.destroy_process_group()


def test_lr_scaling_counts_gradient_accumulation_in_a_real_trainer(tmp_path):
    # 8 images x 2 accumulated batches = 16 per update: LRs x 16 / 512, as Lightning's trainer reports them
    module = _module(warmup_steps=1)
    snaps = Snapshots()
    trainer = _trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, limit_train_batches=4, limit_val_batches=0,
                       callbacks=[snaps])
    trainer.fit(module, DigitsDataModule(img_size=16, batch_size=8))
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(5e-3 * 16 / 512, rel=1e-12)
    assert snaps.lrs[0] == pytest.approx(module.hparams.warmup_lr * 16 / 512, rel=1e-12)
    assert trainer.global_step == 2 and len(snaps.lrs) == 4  # two batches per optimizer step
    assert snaps.lrs[1] == snaps.lrs[0] and snaps.lrs[2] == pytest.approx(5e-3 * 16 / 512)  # per update, not batch
