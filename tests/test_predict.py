"""Predictions land on disk: predictions.csv with the input, the top-k class names and their probabilities, through
Lightning's prediction writer; class names travel in the checkpoint (issue #13)."""
import csv

import lightning.pytorch as pl
import torch
from PIL import Image

from swinlab.data import ImageFolderDataModule
from swinlab.tasks import ImageClassifier
from swinlab.training.callbacks import PredictionWriter

PICO = "swinv2_pico_patch2_window4_32"


def _folder(root):
    for split in ("train", "val"):
        for c, color in (("cat", (220, 30, 30)), ("dog", (30, 220, 30)), ("emu", (30, 30, 220))):
            for j in range(3):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), color).save(root / split / c / f"{j}.png")
    return root


def _trainer(tmp_path, callbacks=(), **kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=list(callbacks), **kw)


def test_predict_writes_top_k_names_and_probabilities_for_a_folder_of_images(tmp_path):
    data = _folder(tmp_path / "data")
    torch.manual_seed(0)
    task = ImageClassifier(model_name=PICO, num_classes=3, warmup_steps=1, base_lr=1e-3, mixup=0.0, cutmix=0.0)
    dm = ImageFolderDataModule(data_dir=str(data), img_size=32, batch_size=3, num_workers=0, re_prob=0.0,
                               auto_augment=None)
    trainer = _trainer(tmp_path / "fit", max_steps=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, dm)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)

    new = tmp_path / "new"  # images the model has not seen, in a nested folder, no train/ val/ needed
    for i, color in enumerate([(200, 40, 40), (40, 40, 200)]):
        (new / "batch1").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (50, 30), color).save(new / "batch1" / f"img{i}.jpg")
    (new / "notes.txt").write_text("not an image")
    fresh = ImageClassifier(model_name=PICO, num_classes=3)
    assert fresh.class_names is None
    writer = PredictionWriter(top_k=2)
    predict_dm = ImageFolderDataModule(data_dir=str(tmp_path / "nowhere"), img_size=32, batch_size=1, num_workers=0,
                                       predict_dir=str(new))
    out = _trainer(tmp_path / "predict", callbacks=[writer]).predict(fresh, predict_dm, ckpt_path=str(ckpt),
                                                                     return_predictions=True)
    assert fresh.class_names == ["cat", "dog", "emu"]  # from the checkpoint
    rows = list(csv.reader(open(writer.path)))
    assert rows[0] == ["input", "class1", "prob1", "class2", "prob2"]
    assert [r[0] for r in rows[1:]] == [str(new / "batch1" / "img0.jpg"), str(new / "batch1" / "img1.jpg")]
    for row, batch in zip(rows[1:], out):
        probs = batch["probs"][0]
        p, c = probs.topk(2)
        assert row[1::2] == [["cat", "dog", "emu"][int(i)] for i in c]
        assert [float(v) for v in row[2::2]] == [round(float(v), 6) for v in p]
        assert float(row[2]) >= float(row[4])
    # a second predict into the same folder keeps the first file
    writer2 = PredictionWriter(top_k=1)
    _trainer(tmp_path / "predict", callbacks=[writer2]).predict(fresh, predict_dm, ckpt_path=str(ckpt))
    assert writer2.path != writer.path and writer.path.exists() and writer2.path.name == "predictions_1.csv"


def test_weights_carry_their_preprocessing_into_checkpoints_and_predict(tmp_path):
    """A run normalised with mean = std = 0.5 and crop_pct 1: its Lightning checkpoint and its exported weights record
    that, and predict with a data module left at ImageNet's defaults normalises as the weights were trained (one
    line says so); the probabilities are the model's on timm's transform from ``resolve_data_config``."""
    import warnings

    from timm.data import create_transform, resolve_data_config

    from swinlab.models import create_model, save_safetensors
    data = _folder(tmp_path / "data")
    torch.manual_seed(0)
    task = ImageClassifier(model_name=PICO, num_classes=3, warmup_steps=1, base_lr=1e-3, mixup=0.0, cutmix=0.0)
    half = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0, interpolation="bilinear")
    dm = ImageFolderDataModule(data_dir=str(data), img_size=32, batch_size=3, num_workers=0, re_prob=0.0,
                               auto_augment=None, **half)
    trainer = _trainer(tmp_path / "fit", max_steps=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, dm)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    want = dict(mean=[0.5] * 3, std=[0.5] * 3, input_size=[3, 32, 32], interpolation="bilinear", crop_pct=1.0)
    assert torch.load(ckpt, weights_only=True)["swinlab"]["pretrained_cfg"] == want
    weights = save_safetensors(task.model, tmp_path / "w.safetensors")
    for source in (ckpt, weights):
        cfg = resolve_data_config(model=create_model(PICO, checkpoint=str(source)))
        assert (cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"]) == ((0.5,) * 3, (0.5,) * 3, 1.0,
                                                                                   "bilinear")
    assert ImageClassifier(model_name=PICO, num_classes=3, checkpoint=str(weights)).weights_preprocessing() == want

    new = tmp_path / "new"
    new.mkdir()
    Image.new("RGB", (50, 30), (200, 40, 90)).save(new / "a.png")
    fresh = ImageClassifier(model_name=PICO, num_classes=3)
    predict_dm = ImageFolderDataModule(data_dir=str(tmp_path / "nowhere"), img_size=32, batch_size=1, num_workers=0,
                                       predict_dir=str(new))  # ImageNet mean/std, crop 0.875, bicubic
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _trainer(tmp_path / "predict").predict(fresh, predict_dm, ckpt_path=str(ckpt), return_predictions=True)
    named = [str(w.message) for w in caught if "preprocessing the weights were trained with" in str(w.message)]
    assert len(named) == 1 and "mean=(0.5, 0.5, 0.5)" in named[0] and "crop_pct=1.0" in named[0]
    model = create_model(PICO, checkpoint=str(ckpt)).eval()
    x = create_transform(**resolve_data_config(model=model))(Image.open(new / "a.png").convert("RGB"))
    with torch.no_grad():
        assert torch.allclose(out[0]["probs"][0], model(x[None]).softmax(-1)[0], atol=1e-6)
