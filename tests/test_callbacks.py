"""The TensorBoard attention images come from the model's own public methods (no re-implemented forward)."""
import pytest
import torch
from helpers import randomize_

from swinlab.models import create_model, read_checkpoint
from swinlab.training.callbacks import AttentionImages


def test_attention_image_is_the_blocks_attention_probs_of_the_first_window():
    torch.manual_seed(0)
    model = randomize_(create_model("swinv2_pico_patch2_window4_32", num_classes=3)).train()
    sample = torch.randn(1, 3, 32, 32)
    blk = model.layers[0].blocks[-1]  # the last (shifted) block of stage 0
    seen = []
    handle = blk.attn.register_forward_hook(lambda m, args, out: seen.append(args))
    try:
        images = dict(AttentionImages.images(model, sample, torch.device("cpu")))
    finally:
        handle.remove()
    assert model.training  # the mode is given back
    assert set(images) == {f"position_bias/stage{i}" for i in range(4)} | {"attention/stage0"}
    x, mask = seen[0]
    assert mask is not None  # a shifted block: the shift mask is part of what the image shows
    with torch.no_grad():
        probs = blk.attn.attention_probs(x[:1, :1], mask[:1])[0, 0]
        torch.testing.assert_close(images["attention/stage0"], probs)
        # the V2 bias per relative offset, written out: 16 * sigmoid(MLP(log-spaced coordinates)), (heads, 2W-1, 2W-1)
        attn = model.layers[1].blocks[0].attn
        mlp = attn.cpb_mlp
        table = mlp[2](torch.relu(mlp[0](attn.relative_coords_table[0])))  # (2W-1, 2W-1, heads)
        torch.testing.assert_close(images["position_bias/stage1"], 16 * torch.sigmoid(table).permute(2, 0, 1))


@pytest.mark.parametrize("ema", [True, False])
def test_export_takes_the_ema_weights_of_the_best_checkpoint_when_ema_is_on(tmp_path, ema):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from swinlab.data import DigitsDataModule
    from swinlab.tasks import ImageClassifier
    from swinlab.training.callbacks import ExportBest
    from swinlab.training.checkpoint_io import load_checkpoint_file

    torch.manual_seed(0)
    task = ImageClassifier(model_name="swinv2_pico_patch2_window4_32", num_classes=10, model_kwargs={"img_size": 16},
                           warmup_steps=1, base_lr=5e-3, ema_decay=0.5, mixup=0.0, cutmix=0.0)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/acc1_ema", mode="max")
    export = ExportBest(ema=ema)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                         max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[ckpt, export])
    trainer.fit(task, DigitsDataModule(img_size=16, batch_size=16))
    saved = load_checkpoint_file(ckpt.best_model_path)["state_dict"]
    exported = read_checkpoint(str(export.path))[0]
    prefix = "ema.module." if ema else "model."
    assert export.exported_ema is ema
    for k, v in exported.items():
        torch.testing.assert_close(v, saved[prefix + k].float(), rtol=0, atol=0)
    other = "model." if ema else "ema.module."
    assert any(not torch.equal(exported[k], saved[other + k]) for k in exported)  # EMA and raw weights differ


def test_tensorboard_shows_labelled_heatmaps_the_best_hp_metric_and_named_memory(tmp_path):
    """Read back from the event file as TensorBoard does: per-head heatmaps big enough to read (not 16 px tiles),
    hp_metric = the best monitored value (not -1), host memory as a peak that never decreases."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from swinlab.data import DigitsDataModule
    from swinlab.tasks import ImageClassifier
    from swinlab.training.callbacks import TrainingMonitor

    torch.manual_seed(0)
    task = ImageClassifier(model_name="swinv2_pico_patch2_window4_32", num_classes=10, model_kwargs={"img_size": 16},
                           warmup_steps=1, base_lr=5e-3, mixup=0.0, cutmix=0.0)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/acc1", mode="max")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, max_epochs=2, limit_train_batches=2,
                         limit_val_batches=1, log_every_n_steps=1,
                         callbacks=[ckpt, TrainingMonitor(), AttentionImages()])
    trainer.fit(task, DigitsDataModule(img_size=16, batch_size=16))
    ea = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert {"position_bias/stage0", "position_bias/stage3", "attention/stage0"} <= set(ea.Tags()["images"])
    for tag in ("position_bias/stage0", "attention/stage0"):
        img = ea.Images(tag)[-1]
        assert img.width >= 300 and img.height >= 200, (tag, img.width, img.height)
    hp = ea.Scalars("hp_metric")
    assert hp[-1].value == pytest.approx(float(ckpt.best_model_score)) and hp[-1].value >= 0
    rss = [e.value for e in ea.Scalars("train/host_peak_rss_bytes")]
    assert rss[0] > 50 * 2 ** 20 and rss == sorted(rss)
    assert "train/peak_mem_bytes" not in ea.Tags()["scalars"]
