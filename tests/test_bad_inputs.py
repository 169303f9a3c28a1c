"""The bad-input catalogue (docs/troubleshooting.md): each case gets one line naming the problem and the fix, or a
documented recovery, and nothing already written is lost. In-process and small, so the whole file runs in seconds.

By class (config, data, checkpoint, CLI, security), each bad input through ``python -m swinlab``'s entry point
(``swinlab.__main__.main`` in-process, where the point is the message; a real ``python -m swinlab`` subprocess for
the config and security classes, and for ``ablate``/``convert``/``estimate`` in their own files) must exit with code
2, print exactly one ``error:`` line and no traceback, leave a previous run's folder (config.yaml, hparams.yaml,
event file, checkpoints) byte-identical and add no version folder."""
import errno
import hashlib
import os
import pathlib
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import yaml
from helpers import ROOT
from PIL import Image

from swinlab.errors import CheckpointError, ConfigError, SwinlabError
from swinlab.training.cli import main

PICO = "swinv2_pico_patch2_window4_32"
TINY = {
    "seed_everything": 0,
    "threads": 1,
    "model": {"class_path": "swinlab.tasks.ImageClassifier",
              "init_args": {"model_name": PICO, "num_classes": 10, "model_kwargs": {"img_size": 16},
                            "warmup_steps": 1, "mixup": 0.0, "cutmix": 0.0}},
    "data": {"class_path": "swinlab.data.DigitsDataModule", "init_args": {"img_size": 16, "batch_size": 16}},
    "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1,
                "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": "runs", "name": "tiny"}}},
    "attention_images": {"enabled": False},
    "signal": {"image": False},  # the per-block scalars stay on; no matplotlib figure per validation
}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return "tiny.yaml"


def one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    assert msg.strip() and len(msg) < 700, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _module(num_classes=10, **kwargs):
    from swinlab.tasks import ImageClassifier
    return ImageClassifier(model_name=PICO, num_classes=num_classes, model_kwargs={"img_size": 16}, **kwargs)


def _lightning_ckpt(path, num_classes=10, hparams=True):
    module = _module(num_classes)
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.6.0",
            "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}
    if hparams:
        ckpt["hyper_parameters"] = dict(module.hparams)
    torch.save(ckpt, path)
    return path


# -- configuration ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--model.init_args.foo", "1"], ["foo", "not accepted", "--help"]),                       # unknown key
    (["--trainer.max_epochz", "3"], ["max_epochz"]),                                         # mistyped key
    (["--data.init_args.batch_size", "abc"], ["batch_size", "abc"]),                         # wrong type
    (["--model.init_args.model_name", "swinv9"], ["unknown model 'swinv9'"]),                # unknown model
    (["--model.init_args.num_classes", "7"], ["10 classes", "num_classes: 10"]),             # data vs model classes
    (["--data.init_args.img_size", "32"], ["32x32", "16x16", "img_size"]),                   # data vs model size
    (["--data.init_args.batch_size", "2000"], ["1437 samples", "batch_size"]),               # batch > data set
    (["--threads", "0"], ["--threads 0", ">= 1"]),                                           # impossible threads
    (["--resume.every_n_train_steps", "-1"], ["every_n_train_steps=-1", ">= 0"]),            # negative interval
    (["--ckpt_path", "last"], ["no last.ckpt", "runs/tiny", "drop --ckpt_path"]),            # nothing to resume
    (["--ckpt_path", "nope.ckpt"], ["nope.ckpt does not exist", "--ckpt_path last"]),        # missing checkpoint
])
def test_bad_cli_setting_is_one_line(cfg, args, words, tmp_path):
    with pytest.raises(SwinlabError) as err:
        main(["fit", "--config", cfg, *args])
    one_line(err, *words)
    assert not (tmp_path / "runs").exists()  # also the cases refused in setup(), after the logger made its folder


def test_unknown_top_level_section_in_a_config_file(cfg, tmp_path):
    (tmp_path / "typo.yaml").write_text("trainr: {max_epochs: 3}\n")
    with pytest.raises(ConfigError) as err:
        main(["fit", "--config", cfg, "--config", "typo.yaml"])
    one_line(err, "trainr", "did you mean trainer")


def test_window_larger_than_a_stage_is_clamped_and_impossible_windows_are_refused():
    from swinlab.models import create_model
    model = create_model(PICO, img_size=16, window_size=16)  # stages are 8, 4, 2, 1 tokens wide: clamped, as timm
    windows = [tuple(stage.blocks[0].attn.window) for stage in model.layers]
    assert windows == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert torch.isfinite(model(torch.randn(1, 3, 16, 16))).all()
    with pytest.raises(ConfigError) as err:
        create_model(PICO, window_size=0)
    one_line(err, "window_size", "positive")


def test_img_size_not_divisible_by_the_patch_size():
    from swinlab.models import create_model
    with pytest.raises(ConfigError) as err:
        create_model(PICO, img_size=33)
    one_line(err, "33", "patch size 2")


def test_odd_batch_with_mixup():
    module = _module(mixup=0.8, cutmix=1.0)
    with pytest.raises(ConfigError) as err:
        module.training_step((torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])), 0)
    one_line(err, "even batch", "batch_size")


# -- image folders ----------------------------------------------------------------------------------------------------

def _image(path, mode="RGB", size=(20, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (10, 200, 30), "L": 128, "RGBA": (200, 10, 30, 120), "P": 3}[mode]
    Image.new(mode, size, color).save(path)


def _folders(root, classes=("cat", "dog")):
    for c in classes:
        for split in ("train", "val"):
            for j in range(2):
                _image(root / split / c / f"{j}.png")
    return root


def _folder_dm(root, **kwargs):
    from swinlab.data import ImageFolderDataModule
    kwargs = {"img_size": 16, "batch_size": 2, "num_workers": 0, **kwargs}
    return ImageFolderDataModule(data_dir=str(root), **kwargs)


def test_missing_data_dir(cfg):
    with pytest.raises(ConfigError) as err:
        main(["fit", "--config", cfg, "--data", "swinlab.data.ImageFolderDataModule",
              "--data.init_args.data_dir", "missing_dir", "--data.init_args.img_size", "16"])
    one_line(err, "missing_dir", "does not exist", "data_dir")


def test_split_without_class_folders(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "val").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        _folder_dm(tmp_path / "d").setup("fit")
    one_line(err, "has no class folders", "<class>/")


def test_empty_class_folder(tmp_path):
    root = _folders(tmp_path / "d")
    (root / "train" / "emu").mkdir()
    with pytest.raises(ConfigError) as err:
        _folder_dm(root).setup("fit")
    one_line(err, "emu", "holds no images", "add images or remove the folder")


def test_class_folder_with_only_non_image_files(tmp_path):
    root = _folders(tmp_path / "d")
    (root / "train" / "notes").mkdir()
    (root / "train" / "notes" / "readme.txt").write_text("not an image")
    with pytest.raises(ConfigError) as err:
        _folder_dm(root).setup("fit")
    one_line(err, "notes", "holds no images")


def test_non_image_files_beside_images_are_ignored(tmp_path):
    root = _folders(tmp_path / "d")
    (root / "train" / "cat" / "labels.csv").write_text("a,b\n")
    dm = _folder_dm(root)
    dm.setup("fit")
    assert len(dm.train_set) == 4 and all(not p.endswith(".csv") for p, _ in dm.train_set.samples)


def test_validation_class_missing_from_training(tmp_path):
    root = _folders(tmp_path / "d")
    _image(root / "val" / "emu" / "0.png")
    with pytest.raises(ConfigError) as err:
        _folder_dm(root).setup("fit")
    one_line(err, "emu", "same class folder names")


def test_corrupt_jpeg_is_skipped_with_a_warning_or_stops_when_asked(tmp_path):
    root = _folders(tmp_path / "d")
    bad = root / "train" / "cat" / "broken.jpg"
    _image(bad)
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated JPEG
    dm = _folder_dm(root)
    dm.setup("fit")
    i = [p for p, _ in dm.train_set.samples].index(str(bad))
    with pytest.warns(UserWarning, match="skipped unreadable image .*broken.jpg"):
        x, _ = dm.train_set[i]
    assert x.shape == (3, 16, 16) and dm.train_set.skipped == [str(bad)]
    strict = _folder_dm(root, on_corrupt="error")
    strict.setup("fit")
    with pytest.raises(ConfigError) as err:
        strict.train_set[i]
    one_line(err, "broken.jpg", "remove or replace it", "on_corrupt: skip")


def test_file_with_an_image_extension_that_is_not_an_image(tmp_path):
    root = _folders(tmp_path / "d")
    fake = root / "train" / "dog" / "fake.png"
    fake.write_text("<html>not a png</html>")
    dm = _folder_dm(root, on_corrupt="error")
    dm.setup("fit")
    with pytest.raises(ConfigError) as err:
        dm.train_set[[p for p, _ in dm.train_set.samples].index(str(fake))]
    one_line(err, "fake.png", "UnidentifiedImageError")


def test_grayscale_palette_and_rgba_images_become_rgb_and_train(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "val"):
        _image(root / split / "gray" / "0.png", "L")
        _image(root / split / "gray" / "1.png", "P")
        _image(root / split / "rgba" / "0.png", "RGBA")
        _image(root / split / "rgba" / "1.png", "RGBA", size=(31, 17))
    dm = _folder_dm(root, batch_size=4)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and torch.isfinite(x).all()
    module = _module(num_classes=2)
    loss = module.training_step((x, y), 0)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in module.parameters()
                                        if p.grad is not None)


# -- checkpoints ------------------------------------------------------------------------------------------------------

def test_resuming_a_checkpoint_with_another_class_count(cfg):
    _lightning_ckpt("seven.ckpt", num_classes=7)
    with pytest.raises(CheckpointError) as err:
        main(["fit", "--config", cfg, "--ckpt_path", "seven.ckpt"])
    one_line(err, "seven.ckpt", "num_classes=7", "model.init_args.checkpoint")


def test_resuming_a_checkpoint_that_does_not_fit_the_model(cfg):
    _lightning_ckpt("seven.ckpt", num_classes=7, hparams=False)  # no hyperparameters to compare: load fails
    with pytest.raises(CheckpointError) as err:
        main(["validate", "--config", cfg, "--ckpt_path", "seven.ckpt"])
    one_line(err, "seven.ckpt does not fit the model", "head.fc.weight", "model.init_args.checkpoint")


def test_truncated_checkpoint_given_to_the_cli(cfg, tmp_path):
    data = _lightning_ckpt(tmp_path / "ok.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        main(["fit", "--config", cfg, "--ckpt_path", "cut.ckpt"])
    one_line(err, "cut.ckpt", "truncated")


def test_a_file_that_is_not_a_checkpoint(cfg, tmp_path):
    (tmp_path / "notes.ckpt").write_text("hello")
    with pytest.raises(CheckpointError) as err:
        main(["test", "--config", cfg, "--ckpt_path", "notes.ckpt"])
    one_line(err, "notes.ckpt", "not a PyTorch checkpoint")


def test_pickle_payload_in_a_starting_checkpoint(cfg, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    torch.save({"state_dict": {}, "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as err:
        main(["fit", "--config", cfg, "--model.init_args.checkpoint", "evil.pth"])
    one_line(err, "refused to load", "tensors only")
    assert not marker.exists()


def test_full_disk_on_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from swinlab.training.checkpoint_io import atomic_torch_save
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1}, path)
    before = path.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(CheckpointError) as err:
        atomic_torch_save({"global_step": 2}, path)
    one_line(err, "No space left", "previous checkpoint is intact", "--ckpt_path last")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_unwritable_checkpoint_folder(tmp_path):
    from swinlab.training.checkpoint_io import atomic_torch_save
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError) as err:
        atomic_torch_save({"a": 1}, blocker / "sub" / "last.ckpt")
    one_line(err, "could not write checkpoint", "another checkpoint directory")


def test_python_m_swinlab_prints_one_error_line(cfg, capsys):
    from swinlab.__main__ import main as swinlab_main
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert swinlab_main(["fit", "--config", cfg, "--ckpt_path", "nope.ckpt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --ckpt_path nope.ckpt does not exist")


# == by class: exit code 2, one `error:` line, no traceback, nothing on disk changed ===================================

def _snapshot(root):
    """{path relative to root: sha256 of a file, or "dir"} for everything under root."""
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def previous(cfg, tmp_path):
    """A previous run of tiny.yaml on disk, as a finished ``fit`` leaves it: runs/tiny/version_0 with config.yaml,
    hparams.yaml, an event file and checkpoints/last.ckpt (a Lightning checkpoint of the tiny model). Returns a
    function asserting that nothing under runs/ changed, byte for byte, and that no folder (version_1 ...) appeared."""
    run = tmp_path / "runs" / "tiny" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(TINY))
    (run / "hparams.yaml").write_text(f"model_name: {PICO}\nnum_classes: 10\n")
    (run / "events.out.tfevents.1.host.1.0").write_bytes(b"\x00\x01events" * 8)
    _lightning_ckpt(run / "checkpoints" / "last.ckpt")
    before = _snapshot(tmp_path / "runs")

    def unchanged():
        assert _snapshot(tmp_path / "runs") == before

    return unchanged


def swinlab(argv, capsys):
    """``python -m swinlab <argv>``'s entry point, in-process: (exit code, stderr). A traceback fails the test."""
    from swinlab.__main__ import main as swinlab_main
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = swinlab_main(list(argv))
    return rc, capsys.readouterr().err


def python_m_swinlab(argv, cwd):
    """``python -m swinlab <argv>`` as users run it (the checkout first on PYTHONPATH): (exit code, stderr)."""
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    res = subprocess.run([sys.executable, "-m", "swinlab", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    return res.returncode, res.stderr


def refused(rc, err, *words):
    """Exit code 2 and exactly one ``error:`` line on stderr, naming the problem (``words``), and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err[-3000:])
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _simmim_ckpt(path):
    """A SimMIM (MaskedImageModeling) Lightning checkpoint of the tiny encoder, with the task's class path in its
    hyperparameters as the CLI saves it."""
    from swinlab.tasks import MaskedImageModeling
    module = MaskedImageModeling(model_name=PICO, model_kwargs={"img_size": 16}, mask_patch_size=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "epoch": 0, "global_step": 0, "loops": {}, "callbacks": {},
                "pytorch-lightning_version": "2.6.0", "optimizer_states": [], "lr_schedulers": [],
                "hyper_parameters": {**dict(module.hparams), "_class_path": "swinlab.tasks.MaskedImageModeling"}},
               path)
    return path


# -- config ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--model.init_args.base_lr", "-1"], ["model.init_args.base_lr=-1.0", "must be > 0"]),
    (["--model.init_args.lr", "0.1"], ["'lr' is not accepted", "did you mean base_lr"]),
    (["--model.init_args.weight_decay", "-0.05"], ["weight_decay=-0.05", ">= 0"]),
    (["--model.init_args.warmup_epochs", "-1"], ["warmup_epochs=-1.0", ">= 0"]),
    (["--model.init_args.betas", "[0.9, 1.5]"], ["betas[1]=1.5", "[0, 1)"]),
    (["--model.init_args.label_smoothing", "1.0"], ["label_smoothing=1.0", "[0, 1)"]),
    (["--model.init_args.mixup_mode", "batc"], ["mixup_mode='batc'", "did you mean batch"]),
    (["--model.init_args.ema_decay", "1.5"], ["ema_decay=1.5", "[0, 1)"]),
    (["--model.init_args.model_kwargs", "{img_size: 16, drop_path_rate: 1.5}"], ["drop_path_rate=1.5", "[0, 1)"]),
    (["--model.init_args.model_kwargs", "{img_size: 16, patch_size: 0}"], ["patch_size=0", "positive"]),
    (["--trainer.max_epochs", "-3"], ["trainer.max_epochs=-3", "-1 for no limit"]),
    (["--trainer.max_steps", "-5"], ["trainer.max_steps=-5", "-1 for no limit"]),
    (["--trainer.devices", "0"], ["trainer.devices=0", ">= 1"]),
    (["--trainer.limit_train_batches", "1.5"], ["trainer.limit_train_batches=1.5", "[0.0, 1.0]"]),
    (["--trainer.accumulate_grad_batches", "0"], ["trainer.accumulate_grad_batches=0", ">= 1"]),
    (["--trainer.strategy", "dpp"], ["trainer.strategy='dpp' is not a strategy name", "did you mean ddp", "fsdp"]),
    (["--trainer.accelerator", "gpux"], ["'gpux' is not an accelerator name", "did you mean gpu"]),
    (["--trainer.max_epochz", "3"], ["max_epochz", "did you mean max_epochs"]),
    (["--data.init_args.batch_sise", "8"], ["batch_sise", "did you mean batch_size"]),
    (["--model", "swinlab.tasks.ImageClassifer"], ["ImageClassifer", "did you mean swinlab.tasks.ImageClassifier"]),
    (["--trainer.precision", "bf32"], ["trainer.precision", "bf32", "bf16-mixed"]),
    (["--model.init_args.num_classes", "7"], ["the data has 10 classes"]),  # refused in setup(), after the logger
])
def test_config_value_is_one_line_and_nothing_is_written(previous, capsys, args, words):
    refused(*swinlab(["fit", "--config", "tiny.yaml", *args], capsys), *words)
    previous()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_gpu_accelerator_on_a_machine_without_one(previous, capsys):
    refused(*swinlab(["fit", "--config", "tiny.yaml", "--trainer.accelerator", "gpu"], capsys),
            "trainer.accelerator=gpu", "no GPU device", "--trainer.accelerator cpu")
    previous()


@pytest.mark.parametrize("text, words", [
    ("", ["bad.yaml is empty", "mapping of sections"]),
    ("- trainer\n- model\n", ["bad.yaml holds a list", "mapping of sections"]),
    ("3\n", ["bad.yaml holds a single int value"]),
    ("trainer: {max_epochs: 3\n", ["bad.yaml is not valid YAML", "line"]),
    (b"PK\x03\x04\xff\xfe\x00binary", ["bad.yaml is not a text file"]),
])
def test_config_file_that_is_empty_or_not_a_mapping_is_named(previous, capsys, tmp_path, text, words):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(*swinlab(["fit", "--config", "tiny.yaml", "--config", "bad.yaml"], capsys), *words)
    previous()


def test_config_class_through_python_m_swinlab(previous, tmp_path):
    refused(*python_m_swinlab(["fit", "--config", "tiny.yaml", "--model.init_args.base_lr", "-1"], tmp_path),
            "model.init_args.base_lr=-1.0")
    previous()


# -- data -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--data.init_args.batch_size", "2000"], ["1437 samples", "batch_size"]),  # the data module's setup()
    (["--data.init_args.img_size", "32"], ["32x32", "16x16"]),                  # the task's setup()
    (["--data", "swinlab.data.ImageFolderDataModule", "--data.init_args.data_dir", "missing_dir",
      "--data.init_args.img_size", "16"], ["missing_dir", "does not exist"]),
    (["--data.init_args.val_fraction", "1.5"], ["val_fraction=1.5"]),
])
def test_bad_data_is_one_line_and_nothing_is_written(previous, capsys, args, words):
    refused(*swinlab(["fit", "--config", "tiny.yaml", *args], capsys), *words)
    previous()


# -- checkpoints ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--ckpt_path", "last", "--trainer.max_epochs", "-3"], ["trainer.max_epochs=-3"]),      # a resume, refused early
    (["--ckpt_path", "last", "--data.init_args.batch_size", "2000"], ["1437 samples"]),     # ... or in setup()
    (["--ckpt_path", "last", "--model.init_args.num_classes", "7"], ["num_classes=10", "asks for 7"]),
    (["--ckpt_path", "nope.ckpt"], ["nope.ckpt does not exist"]),
])
def test_refused_resume_leaves_the_run_folder_byte_identical(previous, capsys, args, words):
    refused(*swinlab(["fit", "--config", "tiny.yaml", *args], capsys), *words)
    previous()


def test_simmim_checkpoint_under_the_classifier_config(previous, capsys, tmp_path):
    _simmim_ckpt(tmp_path / "simmim.ckpt")
    refused(*swinlab(["fit", "--config", "tiny.yaml", "--ckpt_path", "simmim.ckpt"], capsys),
            "simmim.ckpt is a MaskedImageModeling checkpoint", "swinlab.tasks.ImageClassifier",
            "model.init_args.checkpoint")
    previous()


def test_simmim_run_resumed_as_last_under_the_classifier_config(cfg, capsys, tmp_path):
    _simmim_ckpt(tmp_path / "runs" / "tiny" / "version_3" / "checkpoints" / "last.ckpt")  # the newest run
    before = _snapshot(tmp_path / "runs")
    refused(*swinlab(["fit", "--config", "tiny.yaml", "--ckpt_path", "last"], capsys),
            "is a MaskedImageModeling checkpoint", "resume with the config it was trained with")
    assert _snapshot(tmp_path / "runs") == before


# -- CLI ------------------------------------------------------------------------------------------------------------

def test_predict_without_weights_is_refused_unless_asked(previous, capsys, tmp_path):
    refused(*swinlab(["predict", "--config", "tiny.yaml"], capsys),
            "predict has no weights", "--ckpt_path", "model.init_args.checkpoint", "--allow_random_weights true")
    previous()
    rc, err = swinlab(["predict", "--config", "tiny.yaml", "--allow_random_weights", "true",
                       "--trainer.limit_predict_batches", "1"], capsys)
    assert rc == 0, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["version_0", "version_1"]


def test_two_runs_reserving_a_version_at_the_same_moment_get_different_folders(tmp_path):
    from swinlab.training.cli import reserve_version
    root = tmp_path / "runs" / "tiny"
    (root / "version_3").mkdir(parents=True)
    (root / "version_pretrain").mkdir()  # not a number: not counted, as Lightning numbers them
    start, got = threading.Barrier(8), []

    def run():
        start.wait()
        got.append(reserve_version(root))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(4, 12))
    assert sorted(p.name for p in root.iterdir()) == sorted(["version_pretrain"] + [f"version_{n}" for n in
                                                                                     range(3, 12)])


def _study(tmp_path):
    study = {"study": "tiny", "seeds": [0], "model": {"model_name": "swin_pico_patch2_window4_32", "num_classes": 10},
             "data": {"class_path": "swinlab.data.DigitsDataModule", "init_args": {"batch_size": 32}},
             "train": {"img_size": 32, "window_size": 4, "trainer": {"max_steps": 1}},
             "eval": [{"img_size": 32, "window_size": 8}], "variants": {"table": {"position_bias": "table"}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return "study.yaml"


def test_ablate_never_overwrites_results_without_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = _study(tmp_path)
    out = tmp_path / "out"
    (out / "weights").mkdir(parents=True)
    (out / "weights" / "table_seed0.safetensors").write_bytes(b"earlier weights")
    (out / "results.md").write_text("earlier results\n")
    before = _snapshot(out)
    refused(*swinlab(["ablate", "--config", study, "--out", "out"], capsys),
            "already holds out/results.md (and 1 more)", "--overwrite")
    assert _snapshot(out) == before
    (tmp_path / "a_file").write_text("not a folder")
    refused(*swinlab(["ablate", "--config", study, "--out", "a_file"], capsys), "a_file is a file, not a folder")
    refused(*swinlab(["ablate", "--config", study, "--out", "a_file/sub"], capsys), "a_file is a file, not a folder")
    assert (tmp_path / "a_file").read_text() == "not a folder"
    from swinlab.tools.ablate import check_out, load_study
    check_out(load_study(study), out, overwrite=True)  # asked for: allowed


# -- security -------------------------------------------------------------------------------------------------------

def _payload_ckpt(path, marker):
    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}}, path)
    return path


def test_pickle_payload_as_the_newest_runs_last_ckpt(cfg, capsys, tmp_path):
    marker = tmp_path / "pwned"
    _payload_ckpt(tmp_path / "runs" / "tiny" / "version_1" / "checkpoints" / "last.ckpt", marker)
    before = _snapshot(tmp_path / "runs")
    refused(*swinlab(["fit", "--config", "tiny.yaml", "--ckpt_path", "last"], capsys), "refused to load")
    assert not marker.exists() and _snapshot(tmp_path / "runs") == before


def test_security_class_through_python_m_swinlab(previous, tmp_path):
    marker = tmp_path / "pwned"
    _payload_ckpt(tmp_path / "evil.ckpt", marker)
    refused(*python_m_swinlab(["fit", "--config", "tiny.yaml", "--ckpt_path", "evil.ckpt"], tmp_path),
            "refused to load evil.ckpt", "tensors only")
    assert not marker.exists()
    previous()
