"""Settings saved in a checkpoint are data: sizes, windows, channels, class names, task classes and paths read from a
file are checked before anything is built or read from them (the family's bounds, the memory a size needs on this
machine), and no path taken from a file is opened. One line for each refusal.

The members of the class: a swinlab safetensors file's metadata and a Lightning checkpoint's ``swinlab`` entry
(``create_model(checkpoint=...)``, ``model.init_args.checkpoint``); a Lightning checkpoint's hyper-parameters
(``--ckpt_path``: model name, class count, model_kwargs, the task class, the weights it was started from); its
ModelCheckpoint state (paths Lightning later reads or deletes), RNG states and class names.
"""
import json
import time
import warnings

import pytest
import torch
import yaml
from test_bad_inputs import PICO, TINY

from swinlab.errors import CheckpointError
from swinlab.models import create_model, save_safetensors
from swinlab.models.config import SwinConfig
from swinlab.models.limits import LIMITS, available_bytes, build_bytes, check_limits

# a window of 512 at 16384 pixels: within each bound, yet its index buffers and masks need petabytes
HUGE = {"img_size": 16384, "window_size": 512}


def _crafted_safetensors(tmp_path, **config):
    """A genuine swinlab export of the pico model whose saved config is then edited (what a received file can be)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    good = save_safetensors(create_model(PICO, img_size=16), tmp_path / "good.safetensors", PICO)
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    saved = {**json.loads(meta["swinlab_config"]), **config}
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path), metadata={**meta, "swinlab_config": json.dumps(saved)})
    return path


def test_the_memory_estimate_matches_what_a_built_model_holds():
    """build_bytes (analytic, nothing allocated) against the bytes of a built model's parameters and buffers after
    one forward pass (the shift masks are made then), within 2 %."""
    for name, kwargs in ((PICO, {"img_size": 32}), ("swin_pico_patch2_window4_32", {"img_size": 64})):
        model = create_model(name, **kwargs)
        with torch.no_grad():
            model(torch.zeros(1, 3, *model.config.img_size))
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        assert abs(build_bytes(check_limits(model.config)) - held) <= 0.02 * held, name


def test_a_saved_size_that_needs_more_memory_than_the_machine_is_refused_before_anything_is_built(tmp_path):
    path = _crafted_safetensors(tmp_path, **HUGE)
    need = build_bytes(check_limits(SwinConfig(**{**create_model(PICO).config.to_dict(), **HUGE})))
    assert need > 100 * available_bytes()
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        create_model(PICO, checkpoint=str(path))
    msg = str(err.value)
    assert "\n" not in msg and "crafted.safetensors" in msg and "img_size 16384x16384" in msg, msg
    assert "needs about" in msg and "this machine has free" in msg, msg
    assert time.perf_counter() - start < 5  # refused from the numbers, not after trying to allocate


@pytest.mark.parametrize("change, words", [
    ({"img_size": 10 ** 9}, ["img_size=1000000000", "out of range"]),
    ({"embed_dim": "16"}, ["embed_dim='16' is not an int"]),
    ({"in_chans": True}, ["in_chans=True is not an int"]),
    ({"num_classes": -5}, ["num_classes=-5", "out of range"]),
    ({"window_size": [[4, 4]] * 3 + [[4, -1]]}, ["window_size", "out of range"]),
    ({"depths": [2] * 1000}, ["depths=", "not a list of 1 to 8"]),
    ({"mlp_ratio": float("nan")}, ["mlp_ratio=nan", "out of range"]),
    ({"drop_path_rate": "x"}, ["drop_path_rate='x' is not a number"]),
    ({"patch_size": 0}, ["patch_size=0", "out of range"]),
])
def test_saved_settings_outside_the_family_bounds_are_one_line(tmp_path, change, words):
    path = _crafted_safetensors(tmp_path, **change)
    with pytest.raises(CheckpointError) as err:
        create_model(PICO, checkpoint=str(path))
    msg = str(err.value)
    assert "\n" not in msg and "crafted.safetensors" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_metadata_that_is_not_json_is_one_line(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = _crafted_safetensors(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, "swinlab_config": "[" * 100_000})
    with pytest.raises(CheckpointError, match=r"crafted\.safetensors has swinlab metadata that is not JSON"):
        create_model(PICO, checkpoint=str(path))


def test_the_bounds_hold_every_registered_variant():
    """The bounds are the family's: every registered variant, at its own size, is within them."""
    from swinlab.models.registry import REGISTRY
    for variant in REGISTRY.values():
        resolved = check_limits(variant.config)
        assert max(resolved.img_size) <= LIMITS["img_size"][1], variant.name


# -- a Lightning checkpoint's hyper-parameters, through python -m swinlab's entry point ---------------------------
def _lightning_ckpt(path, **hparams):
    from swinlab.tasks import ImageClassifier
    module = ImageClassifier(model_name=PICO, num_classes=10, model_kwargs={"img_size": 16})
    saved = {"_class_path": "swinlab.tasks.ImageClassifier", **dict(module.hparams), **hparams}
    torch.save({"state_dict": module.state_dict(), "epoch": 0, "global_step": 0, "callbacks": {},
                "pytorch-lightning_version": "2.6.0", "optimizer_states": [], "lr_schedulers": [],
                "hyper_parameters": saved}, path)
    return path


def _run(tmp_path, monkeypatch, capsys, *argv):
    from swinlab.__main__ import main as swinlab_main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = swinlab_main(["validate", "--config", "tiny.yaml", *argv])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("error:")], err


@pytest.mark.parametrize("hparams, words", [
    ({"model_kwargs": HUGE}, ["needs about", "img_size 16384x16384"]),
    ({"model_kwargs": {"img_size": 16, "embed_dim": 10 ** 7}}, ["embed_dim=10000000", "out of range"]),
    ({"model_kwargs": {"img_size": 16, "colour": "red"}}, ["unknown model config keys ['colour']"]),
    ({"num_classes": 10 ** 12}, ["num_classes=1000000000000", "out of range"]),
    ({"model_name": "hf-hub:someone/weights"}, ["names the model 'hf-hub:someone/weights', not a registry name"]),
    ({"_class_path": "evil_module.Task"}, ["task class evil_module.Task", "not one of swinlab's"]),
])
def test_hyper_parameters_from_ckpt_path_are_checked_before_the_model_is_built(tmp_path, monkeypatch, capsys,
                                                                              hparams, words):
    _lightning_ckpt(tmp_path / "received.ckpt", **hparams)
    rc, lines, err = _run(tmp_path, monkeypatch, capsys, "--ckpt_path", "received.ckpt")
    assert rc == 2 and len(lines) == 1 and "received.ckpt" in lines[0] and "Traceback" not in err, err[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "evil_module" not in __import__("sys").modules


def test_a_path_in_the_hyper_parameters_is_never_opened(tmp_path, monkeypatch, capsys):
    """The weights a checkpoint says it started from (``checkpoint``: a local path, an hf-hub name or a URL) and
    ``model_kwargs.pretrained`` are not fetched when it is resumed or evaluated: its own state dict is loaded. Here
    each names something that would fail loudly if it were opened; validate runs."""
    (tmp_path / "not_weights.pth").write_bytes(b"this would be refused if it were read")
    for checkpoint in (str(tmp_path / "not_weights.pth"), "hf-hub:someone/weights", "https://example.invalid/w.pth"):
        _lightning_ckpt(tmp_path / "received.ckpt", checkpoint=checkpoint,
                        model_kwargs={"img_size": 16, "pretrained": True})
        rc, lines, err = _run(tmp_path, monkeypatch, capsys, "--ckpt_path", "received.ckpt")
        assert rc == 0 and not lines, err[-2000:]


def test_class_names_from_a_checkpoint_are_checked():
    from swinlab.tasks import ImageClassifier
    module = ImageClassifier(model_name=PICO, num_classes=3, model_kwargs={"img_size": 16})
    module.on_load_checkpoint({"class_names": ["cat", "dog", "bird"]})
    assert module.class_names == ["cat", "dog", "bird"]
    for bad in (["cat", "dog"], ["cat", "dog", "x\n=cmd|' /C calc'!A0"], ["a", "b", 3], "abc", ["a", "b", "c" * 300]):
        with pytest.raises(CheckpointError, match="class_names are not 3 printable names") as err:
            module.on_load_checkpoint({"class_names": bad})
        assert "\n" not in str(err.value)


def test_damaged_rng_states_are_one_line():
    from swinlab.training.callbacks import ResumeState, _rng_states
    ResumeState().load_state_dict({"rng": _rng_states()})  # genuine
    for damage in ({"torch": torch.zeros(3, dtype=torch.uint8)}, {"numpy": ("MT19937", torch.zeros(5), 0, 0, 0.0)},
                   {"python": (3, torch.zeros(10, dtype=torch.int64), None)}, "not a dict"):
        states = damage if isinstance(damage, str) else {**_rng_states(), **damage}
        with pytest.raises(CheckpointError, match="saved random-number states are damaged"):
            ResumeState().load_state_dict({"rng": states})


def test_paths_in_a_model_checkpoint_state_outside_its_folder_are_never_read_or_removed(tmp_path):
    """ModelCheckpoint's saved state names the files Lightning later deletes (the top-k file a better one replaces)
    and that swinlab exports from (the best one); Lightning's own check of the folder does not resolve ``..``. A
    state naming a file outside the run's folder is restored without those paths, with one warning line."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from swinlab.training.checkpoint_io import guard_checkpoint_callback
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("a file outside the run")
    sneaky = f"{run}/../../victim.txt"
    state = {"dirpath": str(run), "best_model_score": torch.tensor(0.9), "best_model_path": sneaky,
             "kth_best_model_path": sneaky, "kth_value": torch.tensor(0.9), "best_k_models": {sneaky: 0.9},
             "last_model_path": sneaky, "monitor": "val/acc1", "save_last": True}
    plain = ModelCheckpoint(dirpath=str(run), monitor="val/acc1", save_top_k=1)
    plain.load_state_dict(dict(state))
    assert plain.kth_best_model_path == sneaky and plain.best_model_path == sneaky  # what Lightning would act on
    guarded = ModelCheckpoint(dirpath=str(run), monitor="val/acc1", save_top_k=1)
    guard_checkpoint_callback(guarded)
    with pytest.warns(UserWarning, match=r"victim\.txt'?, outside this run's checkpoint folder"):
        guarded.load_state_dict(dict(state))
    assert guarded.best_k_models == {} and not guarded.kth_best_model_path and not guarded.best_model_path
    assert not guarded.last_model_path
    inside = {**state, "best_model_path": f"{run}/epoch=1.ckpt", "kth_best_model_path": f"{run}/epoch=1.ckpt",
              "best_k_models": {f"{run}/epoch=1.ckpt": 0.9}, "last_model_path": f"{run}/last.ckpt"}
    kept = ModelCheckpoint(dirpath=str(run), monitor="val/acc1", save_top_k=1)
    guard_checkpoint_callback(kept)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept.load_state_dict(inside)  # a genuine state of this run: restored as it is, no warning
    assert kept.best_k_models == {f"{run}/epoch=1.ckpt": 0.9}
    assert victim.read_text() == "a file outside the run"


def test_tensor_sizes_in_a_checkpoint_folder_are_checked_before_allocation(tmp_path):
    """Exporting the best weights from an FSDP2 folder allocates each backbone tensor at the size its .metadata
    lists: a size no machine could hold is one line, nothing allocated."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from swinlab.training.callbacks import _read_sharded_backbone
    folder = tmp_path / "best.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": {"model.w": torch.arange(6.0).view(2, 3)}}, checkpoint_id=str(folder), no_dist=True)
        assert torch.equal(_read_sharded_backbone(str(folder))["w"], torch.arange(6.0).view(2, 3))
    with open(folder / ".metadata", "rb") as f:
        meta = pickle.load(f)  # our own file, written just above
    meta.state_dict_metadata["state_dict.model.w"].size = torch.Size([2 ** 20, 2 ** 20, 2 ** 10])
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=r"lists backbone tensors of 4194304\.0 GiB, more than the"):
        _read_sharded_backbone(str(folder))
