"""Exported weights carry their preprocessing (issue #25): the quickstart (digits, mean = std = 0.5), trained briefly
through ``python -m swinlab fit``, then its best.safetensors and its ``convert`` outputs evaluated with timm's own
eval transform from ``timm.data.resolve_data_config``: they score the run's own validation accuracy."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

from swinlab.__main__ import main as swinlab_main

PICO = "swinv2_pico_patch2_window4_32"


def digits_val_images():
    """The quickstart's validation digits as the 8-bit grayscale images a user would have (DigitsDataModule's split:
    stratified, 20%, split_seed 0), and their labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from swinlab.data import DigitsDataModule
    d = load_digits()
    _, val = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    labels = torch.as_tensor(d.target[val])
    dm = DigitsDataModule()
    dm.setup("fit")
    assert torch.equal(labels, dm.val_set.y)  # the same split as the run's validation
    return [Image.fromarray(np.uint8(np.rint(d.images[i] * 255 / 16))).convert("RGB") for i in val], labels


def accuracy(model, images, labels):
    from timm.data import create_transform, resolve_data_config
    transform = create_transform(**resolve_data_config(model=model))
    x = torch.stack([transform(im) for im in images])
    with torch.no_grad():
        return (model.eval()(x).argmax(-1) == labels).float().mean().item()


@pytest.mark.slow
def test_quickstart_exports_score_their_accuracy_through_timms_transforms(tmp_path, capsys):
    import timm.data

    import swinlab
    from swinlab.tools import convert
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    config = str(ROOT / "experiments" / "quickstart.yaml")
    res = subprocess.run([sys.executable, "-m", "swinlab", "fit", "--config", config, "--trainer.max_epochs", "2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart" / "version_0"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    val_acc = float(next(v["best_model_score"] for k, v in last["callbacks"].items() if "ModelCheckpoint" in k))
    assert val_acc > 0.4  # far above chance: the comparison below can fail
    want = dict(mean=[0.5] * 3, std=[0.5] * 3, input_size=[3, 32, 32], interpolation="bicubic", crop_pct=1.0)
    assert last["swinlab"]["pretrained_cfg"] == want

    images, labels = digits_val_images()
    model = swinlab.create_model(PICO, checkpoint=str(run / "best.safetensors"))
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["mean"] == (0.5,) * 3 and cfg["std"] == (0.5,) * 3 and cfg["crop_pct"] == 1.0
    ours = accuracy(model, images, labels)
    assert ours >= val_acc - 0.03, (ours, val_acc)

    # convert's files: timm's own model with the .pth's weights and pretrained_cfg, and the torch.export program
    pth = tmp_path / "timm.pth"
    assert swinlab_main(["convert", str(run / "best.safetensors"), "--model", PICO, "--format", "timm",
                         "--out", str(pth)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["pretrained_cfg"] == want and info["pretrained_cfg_from"] == str(run / "best.safetensors")
    assert "'mean': (0.5, 0.5, 0.5)" in info["timm_load"]
    saved = torch.load(pth, weights_only=True)
    twin = convert.build_timm_twin(info["timm_model"], info["timm_kwargs"])
    twin.load_state_dict(saved["state_dict"], strict=True)
    twin.pretrained_cfg = saved["pretrained_cfg"]
    assert abs(accuracy(twin, images, labels) - ours) < 1e-9
    pt2 = tmp_path / "model.pt2"
    assert swinlab_main(["convert", str(run / "best.safetensors"), "--model", PICO, "--format", "torch_export",
                         "--out", str(pt2)]) == 0
    files = {"pretrained_cfg.json": ""}
    torch.export.load(str(pt2), extra_files=files)
    assert json.loads(files["pretrained_cfg.json"]) == want
    with capsys.disabled():  # the figures, with -s
        print(f"quickstart, 2 epochs: run's val acc1 {val_acc:.4f}, best.safetensors through timm's transforms "
              f"{ours:.4f}")
