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
