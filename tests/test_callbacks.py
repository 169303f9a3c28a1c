"""The TensorBoard attention images come from the model's own public methods (no re-implemented forward)."""
import pytest
import torch
from conftest import randomize_

from swinlab.models import create_model, read_checkpoint
from swinlab.training.callbacks import AttentionImages, head_grid


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
        torch.testing.assert_close(images["attention/stage0"], head_grid(probs))
        torch.testing.assert_close(images["position_bias/stage1"],
                                   head_grid(model.layers[1].blocks[0].attn.position_bias()))


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
