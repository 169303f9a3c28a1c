"""The bad-input catalogue (docs/troubleshooting.md): each case gets one line naming the problem and the fix, or a
documented recovery, and nothing already written is lost. In-process and small, so the whole file runs in seconds."""
import errno
import pathlib
import warnings

import pytest
import torch
import yaml
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
def test_bad_cli_setting_is_one_line(cfg, args, words):
    with pytest.raises(SwinlabError) as err:
        main(["fit", "--config", cfg, *args])
    one_line(err, *words)


def test_unknown_top_level_section_in_a_config_file(cfg, tmp_path):
    (tmp_path / "typo.yaml").write_text("trainr: {max_epochs: 3}\n")
    with pytest.raises(ConfigError) as err:
        main(["fit", "--config", cfg, "--config", "typo.yaml"])
    one_line(err, "trainr")


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
