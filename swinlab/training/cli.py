"""``python -m swinlab fit|validate|test|predict --config experiments/<name>.yaml`` through LightningCLI.

Defaults: TensorBoard logging under ``runs/<name>/version_<n>`` (relative to the working directory), a
ModelCheckpoint on ``val/acc1`` plus ``last.ckpt``, per-group LR, throughput/memory/grad-norm/logit-scale scalars,
position-bias and attention images, and ``best.safetensors`` exported at the end of fit. ``fit --ckpt_path last``
resumes the newest run of that name in place.

One parser for every command that reads a training config: :func:`build_parser` gives the parser ``fit`` (or
``validate``/``test``/``predict``) parses with (``--config a.yaml --config b.yaml --trainer.devices 64 ...``, the same
defaults and sections), built from the same pieces as :class:`SwinlabCLI`'s own, without instantiating anything;
:func:`compose_config` parses a command line with it, and :func:`parse_config` turns a bad value into one
:class:`~swinlab.errors.ConfigError` line. ``estimate`` and ``ablate`` read their configs through them.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch import __version__ as lightning_version
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ..errors import CheckpointError, ConfigError, SwinlabError
from .callbacks import AttentionImages, ExportBest, ResumeState, TrainingMonitor
from .nonfinite import NonFiniteGuard

# ckpt_path values Lightning resolves itself (not file paths)
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "runs", "name": "swinlab"}},
    "gradient_clip_val": 5.0,
    "log_every_n_steps": 10,
}


# the keyword arguments main() builds SwinlabCLI with (also what build_parser mirrors)
CLI_KWARGS = dict(subclass_mode_model=True, subclass_mode_data=True, trainer_defaults=TRAINER_DEFAULTS,
                  save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                  parser_kwargs={"exit_on_error": False})


def _new_parser(**kwargs: Any) -> LightningArgumentParser:
    """An empty parser with ``-c/--config`` (LightningCLI.init_parser's recipe)."""
    from jsonargparse import ActionConfigFile

    kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning_version}"])
    parser = LightningArgumentParser(**kwargs)
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="Path to a configuration file in json or yaml format (repeat to compose; later wins).")
    return parser


def _add_seed_argument(parser: LightningArgumentParser) -> None:
    parser.add_argument("--seed_everything", type=Union[bool, int], default=True,
                        help="Set to an int to run seed_everything with this value before classes instantiation. "
                             "Set to True to use a random seed.")


def _add_core_arguments(parser: LightningArgumentParser) -> None:
    """trainer (with TRAINER_DEFAULTS), model and data: any LightningModule / LightningDataModule by class_path."""
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.set_defaults({f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items() if k != "callbacks"})
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)


def _add_swinlab_arguments(parser: LightningArgumentParser) -> None:
    """The sections swinlab adds beside trainer/model/data: its callbacks and ``--threads``."""
    parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
    parser.set_defaults({"checkpoint.monitor": "val/acc1", "checkpoint.mode": "max", "checkpoint.save_last": True,
                         "checkpoint.filename": "epoch{epoch:03d}-acc1_{val/acc1:.4f}",
                         "checkpoint.auto_insert_metric_name": False})
    parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
    parser.set_defaults({"lr_monitor.logging_interval": "step"})
    parser.add_lightning_class_args(TrainingMonitor, "monitor")
    parser.add_lightning_class_args(AttentionImages, "attention_images")
    parser.add_lightning_class_args(ExportBest, "export")
    parser.add_lightning_class_args(ResumeState, "resume")
    parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
    parser.add_argument("--threads", type=Optional[int], default=None,
                        help="torch.set_num_threads for CPU runs (default: leave torch's choice)")


def build_parser(subcommand: str = "fit", **parser_kwargs: Any) -> LightningArgumentParser:
    """The parser ``python -m swinlab <subcommand>`` reads its configuration with, built and returned unused.

    Same ``--config`` composition, ``--a.b value`` overrides, sections (trainer, model, data, checkpoint, lr_monitor,
    monitor, attention_images, export, resume, nonfinite, threads, seed_everything, ckpt_path) and defaults
    (``TRAINER_DEFAULTS``, the checkpoint settings) as :class:`SwinlabCLI`'s parser for that subcommand: both are made
    by the same functions. Nothing is instantiated. ``parser_kwargs`` go to ``LightningArgumentParser`` (default
    ``exit_on_error=False``: bad input raises ``jsonargparse.ArgumentError``; :func:`parse_config` makes it one line).
    """
    methods = LightningCLI.subcommands()
    if subcommand not in methods:
        raise ValueError(f"unknown subcommand {subcommand!r}: one of {', '.join(methods)}")
    parser_kwargs.setdefault("exit_on_error", False)
    parser = _new_parser(**parser_kwargs)
    _add_seed_argument(parser)
    _add_core_arguments(parser)
    _add_swinlab_arguments(parser)
    parser.add_method_arguments(Trainer, subcommand, skip=set(methods[subcommand]))
    return parser


def parse_config(parser, args: Sequence[str], command: str):
    """``parser.parse_args(args)``; a bad file, key or value raises ConfigError with one line naming it (``command``:
    the ``python -m swinlab`` command the message points to for ``--help``). ``--help``/``--print_config`` exit."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(list(args))
    except ArgumentError as exc:
        raise config_error(exc, command) from None


def compose_config(args: Sequence[str], subcommand: str = "fit", command: Optional[str] = None):
    """The config ``python -m swinlab <subcommand> <args>`` would run with (a jsonargparse Namespace; ``.as_dict()``
    for plain dicts), composed and validated against the classes' signatures, nothing instantiated."""
    return parse_config(build_parser(subcommand), args, command or subcommand)


class SwinlabCLI(LightningCLI):
    """LightningCLI with swinlab's sections and checks. Its parsers come from the same functions as
    :func:`build_parser` (the hooks below), so ``estimate``/``ablate`` read configs exactly as ``fit`` does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ckpt_path_in_use: Optional[str] = None
        try:
            super().__init__(*args, **kwargs)
        except RuntimeError as exc:
            msg = str(exc)
            if "Error(s) in loading state_dict" not in msg or self.ckpt_path_in_use is None:
                raise
            details = [ln.strip() for ln in msg.splitlines()[1:] if ln.strip()]
            first = details[0][:200] if details else "keys or shapes differ"
            raise CheckpointError(f"--ckpt_path {self.ckpt_path_in_use} does not fit the model ({first}): resume "
                                  f"with the config it was trained with, or start from its weights with "
                                  f"model.init_args.checkpoint (a new head or size is then allowed)") from None

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        return _new_parser(**kwargs)

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        _add_seed_argument(parser)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        _add_core_arguments(parser)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        _add_swinlab_arguments(parser)

    # Private on purpose: Lightning has no public hook between parsing and instantiation that may replace the config
    # from the checkpoint (LightningCLI.__init__ calls this one right after parse_arguments). Overriding it is the
    # only way to read --ckpt_path safely (no pickle) and name a bad file in one line. tests/test_lightning_private.py
    # guards it: it fails if Lightning renames or stops calling _parse_ckpt_path.
    def _parse_ckpt_path(self) -> None:
        """Lightning's version reads the checkpoint's hyperparameters into the config; this one reads the file with
        ``swinlab.training.checkpoint_io.load_checkpoint_file`` (a pickle payload is refused and never runs) and names a
        missing, truncated or foreign file in one line."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or str(ckpt_path).split(":")[0] in SPECIAL_CKPT_PATHS or "://" in str(ckpt_path):
            return
        path = Path(ckpt_path)
        if path.is_dir():
            return  # a sharded (distributed) checkpoint: its strategy reads it
        if not path.is_file():
            raise CheckpointError(f"--ckpt_path {ckpt_path} does not exist: give an existing .ckpt file, or use "
                                  f"--ckpt_path last to resume the newest run of this name")
        from .checkpoint_io import load_checkpoint_file
        ckpt = load_checkpoint_file(path, map_location="cpu")
        if not isinstance(ckpt, dict):
            raise CheckpointError(f"--ckpt_path {ckpt_path} holds a {type(ckpt).__name__}, not a Lightning "
                                  f"checkpoint: pass weights as model.init_args.checkpoint instead")
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        self._check_ckpt_model(ckpt_path, hparams)
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def _check_ckpt_model(self, ckpt_path: str, hparams: dict) -> None:
        """Lightning replaces the configured model's arguments with the checkpoint's; a different architecture or
        class count in the config would be silently dropped, so it is named instead."""
        model = self.config[self.config.subcommand].get("model")
        init = getattr(model, "init_args", None)
        if init is None:
            return
        for key in ("model_name", "num_classes"):
            mine, theirs = init.get(key), hparams.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                raise CheckpointError(
                    f"--ckpt_path {ckpt_path} holds a model with {key}={theirs!r} but the config asks for {mine!r}: "
                    f"--ckpt_path continues that model as it is; to start from its weights with another {key}, "
                    f"pass it as model.init_args.checkpoint instead")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        threads = cfg.get("threads")
        if threads is not None:
            if int(threads) < 1:
                raise ConfigError(f"--threads {threads} must be >= 1 (or left out: torch's default)")
            torch.set_num_threads(int(threads))
        if self.subcommand in ("fit", "validate", "test", "predict"):
            from .preflight import check_config
            check_config(cfg)  # impossible strategy/precision combinations: one line before anything is built
        if cfg.get("trainer.enable_checkpointing") is False:
            self._checkpointing_off(cfg)
        if self.subcommand == "fit" and cfg.get("ckpt_path") == "last" and not cfg.get("checkpoint.dirpath"):
            self._resolve_last(cfg)
        ckpt = cfg.get("ckpt_path")
        if ckpt and str(ckpt).split(":")[0] not in SPECIAL_CKPT_PATHS and Path(ckpt).is_dir():
            from .checkpoint_io import check_checkpoint_folder
            check_checkpoint_folder(ckpt)  # FSDP2 / DeepSpeed folders: their libraries unpickle what they hold

    def after_instantiate_classes(self) -> None:
        # from here on the subcommand runs: a state-dict mismatch now comes from loading --ckpt_path (see __init__)
        if self.subcommand is not None:
            self.ckpt_path_in_use = self.config[self.subcommand].get("ckpt_path")

    @staticmethod
    def _checkpointing_off(cfg) -> None:
        """``--trainer.enable_checkpointing false``: Lightning refuses a ModelCheckpoint next to it, and the CLI always
        adds one (``--checkpoint.*``), so keep the callback but make it save nothing (no top-k, no last.ckpt, no
        mid-epoch saves); the run then writes no checkpoint, as asked."""
        cfg.trainer.enable_checkpointing = True
        cfg.checkpoint.save_top_k = 0
        cfg.checkpoint.save_last = False
        cfg.checkpoint.monitor = None
        cfg.resume.every_n_train_steps = 0

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        attach_safe_checkpoint_io(trainer)
        return trainer

    @staticmethod
    def _resolve_last(cfg) -> None:
        """Point ``ckpt_path`` at the newest ``last.ckpt`` of this run name and log into the same version."""
        logger = cfg.get("trainer.logger")
        init = getattr(logger, "init_args", None) if logger not in (None, True, False) else None
        if init is None or not hasattr(init, "save_dir"):
            return  # not a TensorBoard-style logger: leave "last" to Lightning
        root = Path(init.save_dir) / (init.get("name") or "")
        version = init.get("version")
        run = root / (version if isinstance(version, str) else f"version_{version}") if version is not None \
            else root / "version_*"
        if version is not None:
            found = run / "checkpoints" / "last.ckpt"
            found = found if found.exists() else None  # a file, or a sharded (FSDP2/DeepSpeed) folder
        else:
            runs = [p for p in root.glob("version_*/checkpoints/last.ckpt")]
            found = max(runs, key=lambda p: int(re.sub(r"\D", "", p.parent.parent.name) or -1), default=None)
        if found is None:
            raise ConfigError(f"--ckpt_path last: no last.ckpt under {run}/checkpoints: drop --ckpt_path "
                              f"to start a new run, or give the checkpoint file")
        init.version = found.parent.parent.name
        cfg.ckpt_path = str(found)


def attach_safe_checkpoint_io(trainer) -> bool:
    """Give single-file strategies (single device, DDP) ``SafeCheckpointIO``: atomic saves, ``weights_only`` loads.

    Strategies with their own checkpoint format (DeepSpeed, FSDP/ModelParallel sharded directories, XLA) and a
    checkpoint IO plugin chosen by the user are left alone. Returns whether it was attached.
    """
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    from .checkpoint_io import SafeCheckpointIO

    strategy = trainer.strategy
    if type(strategy) not in (SingleDeviceStrategy, DDPStrategy) or isinstance(strategy, DeepSpeedStrategy):
        return False
    current = strategy.checkpoint_io  # a strategy without one gets Lightning's default TorchCheckpointIO here
    if type(current) is not TorchCheckpointIO:
        return isinstance(current, SafeCheckpointIO)
    strategy.checkpoint_io = SafeCheckpointIO()
    return True


def _one_line(exc: BaseException) -> str:
    """The informative line of an exception message (DataLoader workers wrap the original in a traceback)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if len(lines) > 1:
        for ln in reversed(lines):
            m = re.match(r"^[\w.]*(ConfigError|CheckpointError|SwinlabError): (.*)$", ln)
            if m:
                return m.group(2)
    return lines[0] if lines else type(exc).__name__


_PARSER_NOISE = re.compile(r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|"
                           r"Expected a <class 'NoneType'>|Given value type:|Given value:)")


def parser_message(exc: BaseException) -> str:
    """jsonargparse's nested multi-line error as one line: the key path and the innermost reason."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    kept = [ln[2:] if ln.startswith("- ") else ln for ln in lines if not _PARSER_NOISE.match(ln)]
    text = " ".join(kept).replace(": :", ":")
    return text[:600] or type(exc).__name__


def _swinlab_cause(exc: BaseException) -> Optional[SwinlabError]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, SwinlabError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def config_error(exc: BaseException, command: str) -> SwinlabError:
    """A parser error as one line: the swinlab error behind it, or the key path and the reason plus where to look."""
    cause = _swinlab_cause(exc)
    if cause is not None:
        return type(cause)(_one_line(cause))
    return ConfigError(f"invalid configuration: {parser_message(exc)} (see `python -m swinlab {command} --help` "
                       f"or --print_config for the accepted keys)")


def main(argv: Optional[List[str]] = None) -> int:
    """Run a LightningCLI subcommand; bad settings raise ConfigError with one line naming the problem."""
    from jsonargparse import ArgumentError

    argv = list(sys.argv[1:] if argv is None else argv)
    saved_argv = sys.argv
    # Lightning's multi-device launcher starts the other ranks as ``python -m swinlab <sys.argv[1:]>``: sys.argv must
    # hold this command's arguments (also when main() is called with an explicit argv), or the workers would start
    # without a subcommand and rank 0 would wait for them forever.
    sys.argv = [sys.argv[0], *argv]
    try:
        SwinlabCLI(LightningModule, LightningDataModule, **CLI_KWARGS)
    except ArgumentError as exc:
        raise config_error(exc, argv[0] if argv else "fit") from None
    except SwinlabError as exc:
        raise type(exc)(_one_line(exc)) from None
    except Exception as exc:
        cause = _swinlab_cause(exc)
        if cause is None:
            raise
        raise type(cause)(_one_line(cause)) from None
    finally:
        sys.argv = saved_argv
    return 0
