"""README's "Train on your own images", run as written on a generated folder: a pretrained tag from a local Hugging
Face cache (offline), only train/ (a validation split is carved), num_classes from the folders, then predict writes
predictions.csv with the class names (issue #13)."""
import csv
import os
import shlex
import subprocess
import sys

import pytest
import timm
import torch
from helpers import ROOT
from PIL import Image
from safetensors.torch import save_file

TAG = "swinv2_tiny_window8_256.ms_in1k"
SHORT = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--data.init_args.batch_size", "4",
         "--data.init_args.num_workers", "0", "--trainer.log_every_n_steps", "1", "--threads", "1"]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- own-images -->")[1].split("<!-- /own-images -->")[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(ln) for ln in lines if ln.startswith("python -m swinlab")]


def _hf_cache(root):
    model = timm.create_model(TAG.split(".")[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    folder = root / ("models--timm--" + TAG)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "snapshots" / ("0" * 40) / "model.safetensors"))


@pytest.mark.slow
def test_readme_own_images_commands_train_and_predict(tmp_path):
    commands = readme_commands()
    assert [c[3] for c in commands] == ["fit", "predict"]
    images = tmp_path / "my_images"
    for c, color in (("apple", (200, 30, 30)), ("leaf", (30, 200, 30)), ("sky", (30, 30, 200))):
        (images / "train" / c).mkdir(parents=True)
        for j in range(5):
            Image.new("RGB", (64 + 8 * j, 48), color).save(images / "train" / c / f"{j}.jpg")
    new = tmp_path / "new_images"
    new.mkdir()
    Image.new("RGB", (80, 60), (190, 40, 40)).save(new / "a.png")
    cache = tmp_path / "hf" / "hub"
    _hf_cache(cache)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    cfg = str(ROOT / "experiments" / "finetune_folder.yaml")
    for argv in commands:
        argv = [a.replace("path/to/my_images", str(images)).replace("path/to/new_images", str(new))
                .replace("experiments/finetune_folder.yaml", cfg) for a in argv]
        res = subprocess.run([sys.executable, *argv[1:], *SHORT], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "finetune_folder"
    hparams = (run / "version_0" / "hparams.yaml").read_text()
    assert "num_classes: 3" in hparams  # from the class folders
    rows = list(csv.reader(open(run / "version_1" / "predictions.csv")))
    assert rows[0][:3] == ["input", "class1", "prob1"] and len(rows) == 2
    assert rows[1][0] == str(new / "a.png") and rows[1][1] in {"apple", "leaf", "sky"}
    assert sorted(rows[1][1:6:2]) == ["apple", "leaf", "sky"]  # top-3 of 3 classes, named


def test_short_class_names_on_the_command_line(capsys):
    """``--model ImageClassifier --data DigitsDataModule`` through ``python -m swinlab``'s entry point, which imports
    swinlab's tasks and data modules so the short names resolve (in-process here; as a real subprocess: test_cli.py's
    fit, whose config uses the short names)."""
    from swinlab.__main__ import main
    with pytest.raises(SystemExit) as done:
        main(["fit", "--model", "ImageClassifier", "--data", "DigitsDataModule", "--model.init_args.num_classes", "10",
              "--print_config"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: swinlab.tasks.ImageClassifier" in out and "class_path: swinlab.data.DigitsDataModule" in out
