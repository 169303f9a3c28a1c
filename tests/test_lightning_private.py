"""The private parts of Lightning that swinlab still relies on, checked against the installed Lightning.

Lightning may rename or drop anything with a leading underscore in any release. Each test here names one such
dependency and fails with a message that says what swinlab assumes, where, and what to look at, instead of letting
an upgrade silently change behaviour (an override that is never called again, an attribute that always reads empty):

- ``LightningCLI._parse_ckpt_path``: ``SwinlabCLI`` (swinlab/training/cli.py) overrides it to read the checkpoint's
  hyperparameters with swinlab's weights-only loader and one-line errors; Lightning must still call it, before the
  classes are instantiated.
- ``FSDPStrategy._activation_checkpointing_kwargs``: ``swinlab.training.sharding.strategy_checkpoints_activations``
  reads it (no public equivalent) to turn the model's own checkpointing off when FSDP1 checkpoints the blocks.

Two scans of swinlab's classes and sources keep this list complete: a new override of a Lightning private name fails
``test_no_other_override_of_a_private_lightning_name``, a new read of one through a trainer, strategy or module fails
``test_no_other_read_of_a_private_lightning_attribute``, until it is listed here with a test of its own. (torch's own
private names, such as ``nn.Module._buffers``, are not Lightning's and not in scope.)
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import types
from pathlib import Path

import pytest

import swinlab

PICO = "swinv2_pico_patch2_window4_32"
SRC = Path(swinlab.__file__).parent

#: (swinlab class, private Lightning method it overrides): each has a test below
KNOWN_OVERRIDES = {("SwinlabCLI", "_parse_ckpt_path")}
#: private Lightning attributes swinlab reads on trainers/strategies: each has a test below
KNOWN_READS = {"_activation_checkpointing_kwargs"}


def _lightning_version() -> str:
    import lightning
    return lightning.__version__


def _where(obj) -> str:
    return f"{inspect.getsourcefile(obj)} (lightning {_lightning_version()})"


# -- LightningCLI ----------------------------------------------------------------------------------------------------
def test_lightning_cli_calls_parse_ckpt_path_before_instantiating_classes():
    from lightning.pytorch.cli import LightningCLI

    from swinlab.training.cli import SwinlabCLI

    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None)), (
        f"LightningCLI has no _parse_ckpt_path ({_where(LightningCLI)}; it came in lightning 2.5.5, and this one "
        f"predates it or dropped it): SwinlabCLI._parse_ckpt_path "
        f"(swinlab/training/cli.py) is never called, so --ckpt_path hyperparameters are read by whatever replaced it "
        f"(check that it loads weights-only) and swinlab's model_name/num_classes check does not run")
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"], (
        f"LightningCLI._parse_ckpt_path takes {inspect.signature(LightningCLI._parse_ckpt_path)} now: "
        f"SwinlabCLI._parse_ckpt_path(self) must follow")
    assert SwinlabCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path
    src = inspect.getsource(LightningCLI.__init__)
    calls = {name: src.find(f"self.{name}()") for name in
             ("_parse_ckpt_path", "before_instantiate_classes", "instantiate_classes")}
    assert -1 not in calls.values() and calls["_parse_ckpt_path"] < calls["before_instantiate_classes"] < \
        calls["instantiate_classes"], (
        f"LightningCLI.__init__ ({_where(LightningCLI)}) no longer calls self._parse_ckpt_path() before "
        f"before_instantiate_classes() and instantiate_classes() (positions {calls}): SwinlabCLI's override would "
        f"update the config too late, or never")


def test_lightning_cli_runs_the_overridden_hooks_in_that_order():
    """The same, by running LightningCLI.__init__ with the hooks recorded (nothing is built or trained)."""
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    calls = []

    class Probe(LightningCLI):
        def _parse_ckpt_path(self) -> None:
            calls.append("_parse_ckpt_path")

        def before_instantiate_classes(self) -> None:
            calls.append("before_instantiate_classes")

        def instantiate_classes(self) -> None:
            calls.append("instantiate_classes")

    Probe(BoringModel, args=["--trainer.logger", "false"], run=False)
    assert calls == ["_parse_ckpt_path", "before_instantiate_classes", "instantiate_classes"], (
        f"LightningCLI (lightning {_lightning_version()}) called {calls}: SwinlabCLI overrides _parse_ckpt_path "
        f"(checkpoint hyperparameters into the config) and relies on it running before the classes are built")


# -- FSDPStrategy._activation_checkpointing_kwargs -------------------------------------------------------------------
def test_fsdp_strategy_keeps_its_activation_checkpointing_policy_where_swinlab_reads_it():
    from lightning.pytorch.strategies import FSDPStrategy

    from swinlab.models import create_model
    from swinlab.models.swin import SwinBlock
    from swinlab.training.sharding import (
        FSDP_ACTIVATION_CHECKPOINTING_ATTR,
        defer_checkpointing_to_strategy,
        strategy_checkpoints_activations,
    )

    assert FSDP_ACTIVATION_CHECKPOINTING_ATTR == "_activation_checkpointing_kwargs"
    on = FSDPStrategy(activation_checkpointing_policy={SwinBlock})
    off = FSDPStrategy()
    assert hasattr(off, FSDP_ACTIVATION_CHECKPOINTING_ATTR) and getattr(on, FSDP_ACTIVATION_CHECKPOINTING_ATTR), (
        f"FSDPStrategy(activation_checkpointing_policy=...) no longer fills {FSDP_ACTIVATION_CHECKPOINTING_ATTR} "
        f"({_where(FSDPStrategy)}): swinlab.training.sharding.strategy_checkpoints_activations must read the policy "
        f"from wherever Lightning keeps it now (or a public property, if there is one)")
    assert strategy_checkpoints_activations(on) and not strategy_checkpoints_activations(off)
    src = inspect.getsource(FSDPStrategy._setup_model)
    assert re.search(rf"\(\s*\w+\s*,\s*self\.{FSDP_ACTIVATION_CHECKPOINTING_ATTR}\s*\)", src), (
        f"FSDPStrategy._setup_model no longer applies self.{FSDP_ACTIVATION_CHECKPOINTING_ATTR} "
        f"({_where(FSDPStrategy)}): check that the strategy still checkpoints the blocks before swinlab turns the "
        f"model's own checkpointing off")
    # what swinlab does with it: the model's per-block checkpointing goes off under such a strategy only
    model = create_model(PICO, num_classes=10, grad_checkpointing=True)
    assert not defer_checkpointing_to_strategy(model, types.SimpleNamespace(strategy=off))
    assert all(stage.grad_checkpointing for stage in model.layers)
    assert defer_checkpointing_to_strategy(model, types.SimpleNamespace(strategy=on))
    assert not any(stage.grad_checkpointing for stage in model.layers)


# -- public behaviour swinlab's tasks build on -----------------------------------------------------------------------
def test_attached_trainer_uses_the_public_trainer_property():
    """``SwinTask.attached_trainer`` relies on ``LightningModule.trainer`` raising RuntimeError when no trainer is
    attached (it replaced reads of the private ``_trainer``)."""
    from lightning.pytorch import Trainer

    from swinlab.tasks import ImageClassifier

    task = ImageClassifier(PICO, num_classes=10, model_kwargs={"img_size": 16}, mixup=0, cutmix=0)
    with pytest.raises(RuntimeError):
        task.trainer  # noqa: B018 - the property itself is what is tested
    assert task.attached_trainer() is None
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1)
    task.trainer = trainer
    assert task.attached_trainer() is trainer


# -- completeness: no other private Lightning name in swinlab ----------------------------------------------------------
def _swinlab_modules():
    for info in pkgutil.walk_packages(swinlab.__path__, prefix="swinlab."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def _is_lightning(cls) -> bool:
    return cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning")


def test_no_other_override_of_a_private_lightning_name():
    """Every private name a swinlab class (or a swinlab mixin such as SwinTask) defines where a Lightning base class
    has the same name is a known, tested override."""
    overrides = set()
    for module in _swinlab_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            bases = [b for b in cls.__mro__ if _is_lightning(b)]
            if cls.__module__ != module.__name__ or not bases:
                continue
            for own in (k for k in cls.__mro__ if k.__module__.startswith("swinlab")):
                for name in vars(own):
                    if not name.startswith("_") or name.startswith("__") or name == "_abc_impl":  # abc's own
                        continue
                    shadowed = [b.__qualname__ for b in bases if hasattr(b, name)]
                    if not shadowed:
                        continue
                    overrides.add((own.__name__, name))
                    assert (own.__name__, name) in KNOWN_OVERRIDES, (
                        f"{own.__module__}.{own.__name__}.{name} overrides Lightning's private {shadowed[0]}.{name}: "
                        f"Lightning may rename it or stop calling it in any release; use a public hook, or add it to "
                        f"KNOWN_OVERRIDES in tests/test_lightning_private.py with a test that Lightning still calls it "
                        f"as assumed")
    assert overrides == KNOWN_OVERRIDES, (
        f"listed overrides {sorted(KNOWN_OVERRIDES - overrides)} no longer shadow a Lightning name: swinlab dropped "
        f"them (then drop them and their tests here), or this Lightning ({_lightning_version()}) has no such method")


def test_no_other_read_of_a_private_lightning_attribute():
    """No private attribute is read through a trainer, strategy, LightningModule or CLI object other than the known
    ones; the tasks and data modules use none of LightningModule's / LightningDataModule's private attributes."""
    import lightning.pytorch as pl
    from torch import nn

    receiver = r"(?:trainer|strategy|pl_module|lightning_module|cli)"
    patterns = [re.compile(rf"\b\w*{receiver}\w*\._([a-zA-Z]\w*)"),
                re.compile(rf"getattr\(\s*\w*{receiver}\w*\s*,\s*[\"']_([a-zA-Z]\w*)[\"']")]
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for pattern in patterns:
            for match in pattern.finditer(text):
                found.setdefault(f"_{match.group(1)}", set()).add(str(path.relative_to(SRC.parent)))
    from swinlab.tasks.base import SwinTask
    swinlab_own = {name for name in vars(SwinTask) if name.startswith("_")}  # swinlab-private names of its own tasks
    unknown = {name: sorted(paths) for name, paths in found.items() if name not in KNOWN_READS | swinlab_own}
    assert not unknown, (
        f"swinlab reads private Lightning attributes {unknown}: use the public API, or add them to KNOWN_READS in "
        f"tests/test_lightning_private.py with a test that Lightning still keeps them as assumed")
    torch_own = set(vars(nn.Module()))
    lightning_own = {name for obj in (pl.LightningModule(), pl.LightningDataModule()) for name in vars(obj)
                     if name.startswith("_") and name not in torch_own}
    assert "_trainer" in lightning_own  # what the scan is for: self._trainer gave way to attached_trainer()
    for path in sorted([*(SRC / "tasks").rglob("*.py"), *(SRC / "data").rglob("*.py")]):
        used = sorted(set(re.findall(r"\bself\.(_\w+)\b", path.read_text())) & lightning_own)
        assert not used, (f"{path.relative_to(SRC.parent)} uses LightningModule/LightningDataModule private "
                          f"attributes {used}: use the public properties (self.trainer, self.device_mesh, ...)")
    sharding = (SRC / "training" / "sharding.py").read_text()
    assert sharding.count('"_activation_checkpointing_kwargs"') == 1, (
        "FSDPStrategy's _activation_checkpointing_kwargs is named in exactly one place "
        "(swinlab.training.sharding.FSDP_ACTIVATION_CHECKPOINTING_ATTR)")
