"""LitData shards (issue #25): ``python -m swinlab data optimize`` on a folder of real photographs, then
``StreamingImageDataModule``: the same pixels as the folder, one line for bad input, disjoint samples per rank, and a
2-process run killed mid-epoch that resumes exactly."""
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, free_ports, kill_when_paused
from PIL import Image

from swinlab.training.cli import main

PICO = "swinv2_pico_patch2_window4_32"


def photo_folder(root: pathlib.Path, per_class: int, val: int = 0, seed: int = 0) -> pathlib.Path:
    """Crops of scikit-learn's two sample photographs (china, flower), one class each, written as JPEG (48-200 px,
    square); ``val`` more per class in val/."""
    from sklearn.datasets import load_sample_images
    rng = np.random.RandomState(seed)
    for name, arr in zip(("china", "flower"), load_sample_images().images):
        for split, n in (("train", per_class), ("val", val)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=bool(n))
            for j in range(n):
                s = int(rng.randint(48, 200))
                y, x = int(rng.randint(0, arr.shape[0] - s)), int(rng.randint(0, arr.shape[1] - s))
                Image.fromarray(arr[y:y + s, x:x + s]).save(folder / f"{j}.jpg", quality=90)
    if not val:
        for name in ("china", "flower"):
            (root / "val" / name).rmdir()
        (root / "val").rmdir()
    return root


def _env(extra=None):
    paths = [str(ROOT)] + ([str(extra)] if extra else [])
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")


def _swinlab(*args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "swinlab", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """72 train photos (val/ carved: 8) as shards, written by the command as users run it."""
    root = tmp_path_factory.mktemp("streaming")
    photo_folder(root / "photos", per_class=40)
    # one PNG with an alpha channel and one grayscale JPEG: stored as the folder loader decodes them
    rgba = Image.open(root / "photos" / "train" / "china" / "0.jpg").transpose(Image.Transpose.ROTATE_90)
    rgba.putalpha(128)
    rgba.save(root / "photos" / "train" / "china" / "rgba.png")
    Image.open(root / "photos" / "train" / "flower" / "0.jpg").convert("L").save(
        root / "photos" / "train" / "flower" / "gray.jpg")
    (root / "photos" / "train" / "flower" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    done = _swinlab("data", "optimize", "--src", "photos", "--out", "shards", "--workers", "2", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, done


def test_optimize_writes_train_val_and_class_names_with_progress(shards):
    root, done = shards
    assert "Progress" in done.stderr and "skipped unreadable image" in done.stderr and "broken.jpg" in done.stderr
    # 41 + 42 files, one unreadable; no val/: 10% of each class carved (4 + 4), the summary alone on stdout
    assert "no val/ folder" in done.stderr and "train: 75 images" in done.stderr and "val: 8 images" in done.stderr
    line = done.stdout.splitlines()[0]
    train, val = (int(w) for w in re.match(r"wrote (\d+) train and (\d+) val images of 2 classes", line).groups())
    assert train + val == 82 and val in (7, 8) and line.endswith("; 1 unreadable image(s) skipped")
    assert json.loads((root / "shards" / "classes.json").read_text()) == ["china", "flower"]
    assert sorted(p.name for p in (root / "shards").iterdir()) == ["classes.json", "train", "val"]
    assert not list(root.glob(".shards.partial-*"))


def test_shard_images_are_the_folders_pixels(shards):
    from litdata import StreamingDataset

    from swinlab.data.folder import load_rgb
    from swinlab.data.streaming import decode_image
    root, _ = shards
    files = {hashlib.sha1(np.asarray(load_rgb(str(p))).tobytes()).hexdigest(): p
             for p in (root / "photos" / "train").rglob("*.*g") if p.name != "broken.jpg"}
    seen = {}
    for split in ("train", "val"):
        ds = StreamingDataset(str(root / "shards" / split))
        for i in range(len(ds)):
            item = ds[i]
            digest = hashlib.sha1(np.asarray(decode_image(item["image"])).tobytes()).hexdigest()
            assert digest in files, f"{split}[{i}] is no folder image's pixels"
            assert item["label"] == ["china", "flower"].index(files[digest].parent.name)
            seen[digest] = split
    assert len(seen) == len(files) == 82  # every readable image once, in one split
    assert {files[d].name for d in seen} >= {"rgba.png", "gray.jpg"}


def test_bad_input_gets_one_line_and_nothing_is_replaced(shards, tmp_path, capsys):
    from swinlab.__main__ import main as swinlab_main
    root, _ = shards
    before = sorted((p.relative_to(root / "shards"), p.stat().st_mtime_ns) for p in (root / "shards").rglob("*"))
    cases = [
        (["--src", str(root / "photos"), "--out", str(root / "shards")], "already exists"),
        (["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "s1")], "does not exist"),
        (["--src", str(root / "photos"), "--out", str(tmp_path / "no" / "s2")], "parent folder"),
        (["--src", str(root / "photos"), "--out", str(tmp_path / "s3"), "--workers", "0"], "--workers 0"),
        (["--src", str(root / "photos"), "--out", str(tmp_path / "s4"), "--val-split", "1.5"], "--val-split 1.5"),
    ]
    for argv, expected in cases:  # the function `python -m swinlab` runs, in this process
        assert swinlab_main(["data", "optimize", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert sorted((p.relative_to(root / "shards"), p.stat().st_mtime_ns) for p in (root / "shards").rglob("*")) \
        == before
    assert not any(tmp_path.glob("s*")) and not any(tmp_path.glob(".s*"))
    # training from a folder that is not a shard folder, or from no folder: one line too
    for data_dir, expected in ((root / "photos", "is not a LitData shard folder"),
                               (tmp_path / "nope", "does not exist")):
        assert swinlab_main(["fit", "--model", "ImageClassifier", "--data", "StreamingImageDataModule",
                             "--data.init_args.data_dir", str(data_dir), "--trainer.max_steps", "1"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert expected in lines[-1] and lines[-1].startswith("error: "), lines[-3:]


CONFIG = {
    "seed_everything": 0,
    "threads": 1,
    "model": {"class_path": "swinlab.tasks.ImageClassifier",
              "init_args": {"model_name": PICO, "num_classes": None, "warmup_steps": 2, "base_lr": 0.02,
                            "model_kwargs": {"img_size": 32, "drop_path_rate": 0.1}}},
    "data": {"class_path": "swinlab.data.StreamingImageDataModule",
             "init_args": {"data_dir": "shards", "img_size": 32, "batch_size": 4, "num_workers": 0,
                           "auto_augment": "rand-m9-mstd0.5"}},
    "trainer": {"accelerator": "cpu", "max_epochs": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                "deterministic": True,
                "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": "runs", "name": "tiny"}}},
    "resume": {"every_n_train_steps": 3},
    "attention_images": {"enabled": False},
}

CALLBACKS = '''
import hashlib, json, os, time
from lightning.pytorch.callbacks import Callback

class Record(Callback):
    """Test-only: each rank appends (epoch, step, a digest of every sample in the batch) to ``{out}.{rank}``."""
    def __init__(self, out: str):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        digests = [hashlib.sha1(x.numpy().tobytes()).hexdigest()[:16] for x in batch[0]]
        with open(f"{self.out}.{trainer.global_rank}", "a") as f:
            f.write(json.dumps([trainer.current_epoch, trainer.global_step, digests]) + "\\n")

class PauseAt(Callback):
    """Test-only: at the start of the batch after ``step`` optimizer steps, say so in a file and wait to be killed."""
    def __init__(self, step: int, flag: str):
        self.step, self.flag = step, flag

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with open(f"{self.flag}.{trainer.global_rank}", "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)
'''


def _records(path):
    out = []
    for rank in range(2):
        p = pathlib.Path(f"{path}.{rank}")
        out.append([json.loads(line) for line in p.read_text().splitlines()] if p.exists() else [])
    return out


def _final(run):
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.slow
def test_two_process_fit_from_shards_killed_mid_epoch_resumes_exactly(shards, tmp_path):
    """Folder -> shards -> ``fit --trainer.devices 2`` from the shards; a second run is SIGKILLed at step 4 (after
    the mid-epoch save at step 3) and resumed with ``--ckpt_path last``: each rank's batches after the resume are
    the uninterrupted run's, and the final weights are bit-identical."""
    root, _ = shards
    os.symlink(root / "shards", tmp_path / "shards")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    (tmp_path / "record_cb.py").write_text(CALLBACKS)
    ports = iter(free_ports(3))

    def start(name, *extra):
        return subprocess.Popen(
            [sys.executable, "-m", "swinlab", "fit", "--config", "cfg.yaml", "--trainer.devices", "2",
             "--trainer.limit_train_batches", "6",
             "--trainer.strategy", "ddp", "--trainer.logger.init_args.name", name,
             "--trainer.callbacks+=record_cb.Record", f"--trainer.callbacks.out={tmp_path / name}", *extra],
            cwd=tmp_path, env=dict(_env(tmp_path), MASTER_PORT=str(next(ports))), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True)

    flag = tmp_path / "paused"
    whole = start("whole")
    killed = start("killed", "--trainer.callbacks+=record_cb.PauseAt", "--trainer.callbacks.step=4",
                   f"--trainer.callbacks.flag={flag}")
    kill_when_paused(killed, whole, flag)
    run = tmp_path / "runs" / "killed" / "version_0"
    mid = _final(run)
    assert mid["global_step"] == 3 and mid["epoch"] == 0  # a mid-epoch checkpoint; step 4 was lost on both ranks
    state = mid["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]  # LitData's loader state
    assert state["num_samples_yielded"] == 3 * 4 and state["trainer_epoch"] == 0

    resumed = start("resumed_from_killed", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert resumed.wait(300) == 0, resumed.stderr.read()[-3000:]

    records = _records(tmp_path / "whole")
    # 74 or 75 train images, 2 ranks x batch 4, drop_last: 9 batches per rank per epoch, of which 6 train
    assert [len(r) for r in records] == [12, 12]
    for epoch in (0, 1):
        per_rank = [[d for e, _, ds in r if e == epoch for d in ds] for r in records]
        assert all(len(set(p)) == len(p) == 24 for p in per_rank)  # no sample twice on a rank
        assert not set(per_rank[0]) & set(per_rank[1])  # ranks read disjoint samples
    # the resumed run trains steps 3.. on the batches the uninterrupted run trained them on, on each rank
    after = _records(tmp_path / "resumed_from_killed")
    assert [[s for _, s, _ in r] for r in after] == [list(range(3, 12))] * 2
    assert after == [r[3:] for r in records]
    before = _records(tmp_path / "killed")
    assert [r[:4] for r in before] == [r[:4] for r in records]  # the killed run saw the same first 4 batches
    whole_ckpt = _final(tmp_path / "runs" / "whole" / "version_0")
    final = _final(tmp_path / "runs" / "resumed_from_killed" / "version_0")
    assert final["global_step"] == whole_ckpt["global_step"] == 12
    diff = [k for k, v in whole_ckpt["state_dict"].items() if not torch.equal(v, final["state_dict"][k])]
    assert not diff, diff[:5]  # bit-identical weights


@pytest.mark.slow
def test_resume_from_an_epoch_end_checkpoint_starts_the_next_epoch_as_an_uninterrupted_run(shards, tmp_path,
                                                                                             monkeypatch):
    """One process, 2 epochs of 6 batches (of 9), straight and stopped after epoch 0 (a test callback sets
    ``should_stop``) then resumed with ``--ckpt_path last``: the saved position is the end of epoch 0, so the next
    epoch starts from its beginning, reshuffled, as in the uninterrupted run."""
    root, _ = shards
    os.symlink(root / "shards", tmp_path / "shards")
    cfg = {**CONFIG, "trainer": {**CONFIG["trainer"], "limit_train_batches": 6}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "stop_cb.py").write_text(
        "from lightning.pytorch.callbacks import Callback\n\n"
        "class StopAfterEpoch0(Callback):\n"
        "    def on_train_epoch_end(self, trainer, pl_module):\n"
        "        trainer.should_stop = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    n = ["--trainer.logger.init_args.name"]
    assert main(["fit", "--config", "cfg.yaml", *n, "whole"]) == 0
    assert main(["fit", "--config", "cfg.yaml", *n, "cut", "--trainer.callbacks+=stop_cb.StopAfterEpoch0"]) == 0
    mid = _final(tmp_path / "runs" / "cut" / "version_0")
    assert mid["global_step"] == 6 and mid["loops"]["fit_loop"]["state_dict"]["combined_loader"][0][
        "trainer_epoch"] == 0
    assert main(["fit", "--config", "cfg.yaml", *n, "cut", "--ckpt_path", "last"]) == 0
    whole = _final(tmp_path / "runs" / "whole" / "version_0")
    cut = _final(tmp_path / "runs" / "cut" / "version_0")
    assert (whole["global_step"], cut["global_step"]) == (12, 12)
    diff = [k for k, v in whole["state_dict"].items() if not torch.equal(v, cut["state_dict"][k])]
    assert not diff, diff[:5]


@pytest.mark.slow
def test_data_bench_reports_folder_shards_and_timm_as_json(shards, capsys):
    """The benchmark runs and its JSON has the figures (no timed asserts: a benchmark prints figures)."""
    from swinlab.__main__ import main as swinlab_main
    root, _ = shards
    assert swinlab_main(["data", "bench", "--src", str(root / "photos"), "--shards", str(root / "shards"),
                         "--compare", "timm", "--workers", "1", "--batch-size", "8", "--batches", "2", "--warmup",
                         "1", "--rounds", "2", "--img-size", "64", "--auto-augment", "rand-m9-mstd0.5",
                         "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {k: result[k] for k in ("workers", "batch_size", "img_size", "rounds")} == {
        "workers": 1, "batch_size": 8, "img_size": 64, "rounds": 2}
    assert [r["pipeline"] for r in result["pipelines"]] == ["folder", "shards", "timm"]
    for row in result["pipelines"]:
        assert row["error"] is None and len(row["rounds"]) == 2 and all(r > 0 for r in row["rounds"])
        assert row["images_per_s"] == pytest.approx(sum(row["rounds"]) / 2)  # the median of two rounds
        assert row["images_per_s_per_worker"] == row["images_per_s"] and row["peak_rss_mb"] > 100
        assert row["images_per_cpu_s"] > 0
    # shards as --src: the shards alone; a folder that is neither: one line
    assert swinlab_main(["data", "bench", "--src", str(root / "shards"), "--batch-size", "8", "--batches", "1",
                         "--warmup", "0", "--rounds", "1", "--img-size", "32", "--workers", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["pipeline", "images/s", "per"] and out[2].startswith("shards ") and len(out) == 3
    assert swinlab_main(["data", "bench", "--src", str(root / "nope")]) == 2
    assert "neither an image folder nor a shard folder" in capsys.readouterr().err
