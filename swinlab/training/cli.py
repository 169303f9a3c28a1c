"""``python -m swinlab fit|validate|test|predict --config experiments/<name>.yaml`` through LightningCLI.

Defaults: TensorBoard logging under ``runs/<name>/version_<n>`` (relative to the working directory), a
ModelCheckpoint on ``val/acc1`` plus ``last.ckpt``, per-group LR, throughput/memory/grad-norm/logit-scale scalars,
position-bias and attention images, per-block signal propagation (``signal/...``: SwinV2's Figure 2 of the run), and
``best.safetensors`` exported at the end of fit. ``fit --ckpt_path last`` resumes the newest run of that name in place.

Nothing already on disk changes unless asked: every value is checked before anything is written; the version folder
is reserved with ``os.mkdir`` (two runs started at the same moment never share one); a run that stops before its first
batch leaves nothing behind (:class:`RunFolder`); a resumed run writes its config beside the earlier one
(``config_resume_<n>.yaml``, :class:`SaveRunConfig`) instead of over it.

One parser for every command that reads a training config: :func:`build_parser` gives the parser ``fit`` (or
``validate``/``test``/``predict``) parses with (``--config a.yaml --config b.yaml --trainer.devices 64 ...``, the same
defaults and sections), built from the same pieces as :class:`SwinlabCLI`'s own, without instantiating anything;
:func:`compose_config` parses a command line with it, and :func:`parse_config` turns a bad value into one
:class:`~swinlab.errors.ConfigError` line. ``estimate`` and ``ablate`` read their configs through them.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional, Sequence, Union

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch import __version__ as lightning_version
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from ..errors import CheckpointError, ConfigError, SwinlabError, first_line, unwritable_reason, write_failure
from .callbacks import AttentionImages, ExportBest, PredictionWriter, ResumeState, Throughput, TrainingMonitor
from .nonfinite import NonFiniteGuard
from .preemption import Preemption, Stopped, forget_signals, slurm_restarted, slurm_run_name, stopped_by
from .signal_monitor import SignalMonitor

# ckpt_path values Lightning resolves itself (not file paths)
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "runs", "name": "swinlab"}},
    "gradient_clip_val": 5.0,
    "log_every_n_steps": 10,
}


# the subcommands that build a trainer (and log into a version folder)
RUN_COMMANDS = ("fit", "validate", "test", "predict")
# rank 0 -> the ranks Lightning's launcher starts (same argv, copied environment): the version folder it reserved
RUN_VERSION_ENV = "SWINLAB_RUN_VERSION"
# loggers that number their runs runs/<name>/version_<n> (the folder the CLI reserves)
VERSIONED_LOGGERS = ("TensorBoardLogger", "CSVLogger")


class SaveRunConfig(SaveConfigCallback):
    """Writes the run's config into its log folder and never over a file already there: ``config.yaml`` for a new
    run; where one exists (a resumed run logging into the same version folder, or an explicit ``version:``) the next
    free ``config_resume_<n>.yaml`` (``config_<n>.yaml`` when the run does not resume a checkpoint).

    ``unset``: keys written as null, as the user gave them: the version number the CLI reserved, so that a run started
    from the saved file gets a version folder of its own instead of logging into this one."""

    unset: Sequence[str] = ()
    written: Optional[Path] = None  # the file this run wrote (removed if the run stops before its first batch)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # broadcast from rank 0 (every rank calls it)
        if log_dir is not None and "://" in str(log_dir):
            return super().setup(trainer, pl_module, stage)  # a remote filesystem: Lightning's own (never overwrites)
        if trainer.is_global_zero and log_dir is not None:
            config = self.config.clone()
            for key in self.unset:
                if key in config:
                    config[key] = None
            text = self.parser.dump(config, skip_none=False)
            folder = Path(log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            stem = "config_resume" if config.get("ckpt_path") else "config"
            path, n = folder / self.config_filename, 0
            while True:
                try:
                    with open(path, "x") as f:  # exclusive create: an existing file is never replaced
                        f.write(text)
                    self.written = path
                    break
                except FileExistsError:
                    n += 1
                    path = folder / f"{stem}_{n}.yaml"
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class FirstBatch(Callback):
    """Notes when the run processes its first batch (train, validation, test or predict, sanity checks included):
    until then the run has only set up and checked, and a failure undoes what it wrote (:class:`RunFolder`)."""

    def __init__(self) -> None:
        self.seen = False

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.seen = True

    on_validation_batch_start = on_test_batch_start = on_predict_batch_start = on_train_batch_start


def is_global_zero() -> bool:
    """Before any process group exists: whether this process is the job's first (global rank 0), by the launchers'
    environment variables (Lightning's own launcher, torchrun, SLURM: absent or 0)."""
    return all(os.environ.get(var) in (None, "", "0")
               for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"))


def reserve_version(root: Union[str, Path]) -> int:
    """Create ``root/version_<n>`` and return n: the number after every existing ``version_<k>`` (as Lightning numbers
    them), or the next free one. ``os.mkdir`` either creates the folder or fails because it exists, so two runs started
    at the same moment never get the same folder: the second one's mkdir fails and it takes the next number."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[len("version_"):]) for p in root.iterdir()
             if p.name.startswith("version_") and p.name[len("version_"):].isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{n}")
            return n
        except FileExistsError:
            n += 1


class RunFolder:
    """A run's log folder and how to undo what the run wrote there, for a run that stops before its first batch.

    A folder that did not exist before (reserved by the CLI, or an explicit ``version:`` used for the first time) is
    removed, with the parent folders the run created. A folder that existed (a resumed run, ``fit --ckpt_path last``)
    gets back exactly what it held: what the run added (a TensorBoard event file, ``config_resume_<n>.yaml``) is
    removed, and small text files it rewrote (``hparams.yaml``) get their earlier bytes back."""

    TEXT = (".yaml", ".yml", ".json", ".txt", ".csv")

    def __init__(self, path: Union[str, Path], new_parents: Sequence[Path] = (), created: bool = False) -> None:
        self.path = Path(path)
        self.existed = not created and self.path.is_dir()  # created: made by this run (reserve_version)
        self.new_parents = list(new_parents)  # innermost first
        self.before: Dict[str, Optional[bytes]] = self._snapshot() if self.existed else {}

    def _entries(self):
        for top, dirs, files in os.walk(self.path):
            for name in dirs + files:
                full = os.path.join(top, name)
                yield os.path.relpath(full, self.path), full

    def _snapshot(self) -> Dict[str, Optional[bytes]]:
        state: Dict[str, Optional[bytes]] = {}
        for rel, full in self._entries():
            small_text = (os.path.isfile(full) and not os.path.islink(full) and full.endswith(self.TEXT)
                          and os.path.getsize(full) <= 1 << 20)
            state[rel] = Path(full).read_bytes() if small_text else None
        return state

    def rollback(self) -> None:
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self.new_parents:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only if empty: another run may have started there meanwhile
            return
        for rel, full in sorted(self._entries(), key=lambda e: e[0].count(os.sep), reverse=True):
            if rel not in self.before:
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(full)
            elif self.before[rel] is not None and Path(full).read_bytes() != self.before[rel]:
                Path(full).write_bytes(self.before[rel])


def _unwritable(path: Path, exc: OSError, key: str) -> str:
    return f"cannot create {path}: {unwritable_reason(path, exc)}: set {key} to a folder this run can write to"


def _claim_new(folder: Path, key: str, fix: str, place: Optional[str] = None) -> RunFolder:
    """Create ``folder`` (and its missing parents) for this run alone: ``os.mkdir`` fails if it exists, so of two runs
    started at the same moment only one gets it. An existing folder is refused in one line naming ``fix``; one that
    cannot be created names ``place`` (default ``key``), the setting that moves it."""
    parents, place = _new_parents(folder), place or key
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(folder)
    except FileExistsError as exc:
        if not folder.is_dir():
            raise ConfigError(_unwritable(folder, exc, place)) from None
        raise ConfigError(f"{folder} already exists ({key}): a new run never writes into another run's folder: "
                          f"{fix}") from None
    except OSError as exc:
        raise ConfigError(_unwritable(folder, exc, place)) from None
    return RunFolder(folder, parents, created=True)


def _next_version(root: Path) -> str:
    """The ``version_<n>`` a run without an explicit version would get under ``root`` now."""
    taken = [int(p.name[len("version_"):]) for p in root.iterdir()
             if p.name.startswith("version_") and p.name[len("version_"):].isdigit()] if root.is_dir() else []
    return f"version_{max(taken, default=-1) + 1}"


def _saves_checkpoints(cfg) -> bool:
    """Whether this run's ModelCheckpoint writes anything (top-k, last.ckpt or mid-epoch saves)."""
    return bool(cfg.get("checkpoint.save_top_k", 1) != 0 or cfg.get("checkpoint.save_last")
                or (cfg.get("resume.every_n_train_steps") or 0) > 0)


def _new_parents(path: Path) -> List[Path]:
    """The folders above ``path`` that do not exist yet, innermost first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


# the keyword arguments main() builds SwinlabCLI with (also what build_parser mirrors)
CLI_KWARGS = dict(subclass_mode_model=True, subclass_mode_data=True, trainer_defaults=TRAINER_DEFAULTS,
                  save_config_callback=SaveRunConfig, auto_configure_optimizers=False,
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


# Trainer arguments whose annotation makes a command-line value mean something else than Lightning reads it as:
# ``limit_*_batches: Union[float, int, None]`` turns ``1`` (one batch) into ``1.0`` (all of them), in a YAML file and
# on the command line alike; ``devices: Union[list[int], str, int]`` keeps ``--trainer.devices 2`` a string, which the
# pre-flight checks (a mesh that cannot fit) would not count. The same arguments with the int tried first (Annotated:
# ``Union[int, float]`` equals ``Union[float, int]``, and typing's cache would hand back Lightning's order).
_COUNT_OR_FRACTION = Optional[Union[Annotated[int, "batches"], float]]
RETYPED_TRAINER_ARGS: Dict[str, Any] = {
    **{f"limit_{split}_batches": _COUNT_OR_FRACTION for split in ("train", "val", "test", "predict")},
    "overfit_batches": Union[Annotated[int, "batches"], float],
    "devices": Union[Annotated[int, "devices"], List[int], str],
}
_RETYPED_HELP = {
    "devices": "Number of devices (an int), a list of device indices, or 'auto' (default), per node.",
    "overfit_batches": "Overfit a fraction of the training data (float) or a number of batches (int). Default: 0.0.",
}


def _add_trainer_arguments(parser: LightningArgumentParser) -> None:
    """The trainer section: Lightning's Trainer arguments as ``add_lightning_class_args`` adds them, except those in
    :data:`RETYPED_TRAINER_ARGS`, added with their int reading first (``1`` is one batch, ``1.0`` all of them)."""
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False, instantiate=False, sub_configs=True,
                               skip=set(RETYPED_TRAINER_ARGS))
    params = inspect.signature(Trainer.__init__).parameters
    for name, hint in RETYPED_TRAINER_ARGS.items():
        split = name[len("limit_"):-len("_batches")] if name.startswith("limit_") else None
        text = _RETYPED_HELP.get(name) or (f"How much of the {split} data to use per epoch: an int is that many "
                                           f"batches (1 = one batch), a float that fraction (1.0 = all). Per device. "
                                           f"Default: 1.0.")
        parser.add_argument(f"--trainer.{name}", type=hint, default=params[name].default, help=text)


def _add_core_arguments(parser: LightningArgumentParser) -> None:
    """trainer (with TRAINER_DEFAULTS), model and data: any LightningModule / LightningDataModule by class_path."""
    _add_trainer_arguments(parser)
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
    parser.add_lightning_class_args(Throughput, "throughput")
    parser.add_lightning_class_args(AttentionImages, "attention_images")
    parser.add_lightning_class_args(SignalMonitor, "signal")
    parser.add_lightning_class_args(ExportBest, "export")
    parser.add_lightning_class_args(ResumeState, "resume")
    parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
    parser.add_lightning_class_args(PredictionWriter, "predictions")
    parser.add_lightning_class_args(Preemption, "preemption")
    parser.add_argument("--threads", type=Optional[int], default=None,
                        help="torch.set_num_threads for CPU runs (default: leave torch's choice)")
    add_flag(parser, "--allow_random_weights",
             help="predict: run with the model's initial (untrained) weights when neither --ckpt_path nor "
                  "model.init_args.checkpoint gives weights (refused otherwise)")


def add_flag(parser, name: str, default: bool = False, help: str = "") -> None:
    """A boolean option that takes the bare form (``--name``: true) as well as ``--name true|false`` and ``name:
    true`` in a config file: what a message may suggest is what the parser accepts."""
    parser.add_argument(name, type=bool, nargs="?", const=True, default=default, help=help)


def build_parser(subcommand: str = "fit", **parser_kwargs: Any) -> LightningArgumentParser:
    """The parser ``python -m swinlab <subcommand>`` reads its configuration with, built and returned unused.

    Same ``--config`` composition, ``--a.b value`` overrides, sections (trainer, model, data, checkpoint, lr_monitor,
    monitor, throughput, attention_images, signal, export, resume, nonfinite, predictions, threads, seed_everything,
    ckpt_path) and defaults (``TRAINER_DEFAULTS``, the checkpoint settings) as :class:`SwinlabCLI`'s parser for that
    subcommand: both are made by the same functions. Nothing is instantiated. ``parser_kwargs`` go to
    ``LightningArgumentParser`` (default ``exit_on_error=False``: bad input raises ``jsonargparse.ArgumentError``;
    :func:`parse_config` makes it one line).
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


def config_files(args: Sequence[str]) -> List[str]:
    """The files given as ``--config X`` / ``--config=X`` / ``-c X`` in a command line."""
    args, files = list(args), []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_files(args: Sequence[str]) -> None:
    """Each ``--config`` file must be YAML holding a mapping of sections: an empty file, a list, a bare value or a
    YAML syntax error is named in one line (jsonargparse would say ``Unexpected config`` without the file)."""
    import yaml

    for name in config_files(args):
        path = Path(name)
        if not path.is_file():
            continue  # a missing file (or an inline YAML string): jsonargparse names it
        try:
            data = yaml.safe_load(path.read_text())
        except UnicodeDecodeError:
            raise ConfigError(f"config file {name} is not a text file: give a YAML file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"config file {name} is not valid YAML ({problem}{where}): fix the file") from None
        if data is None:
            raise ConfigError(f"config file {name} is empty: it must hold a mapping of sections (model:, data:, "
                              f"trainer:, ...), e.g. experiments/quickstart.yaml")
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"a single {type(data).__name__} value"
            raise ConfigError(f"config file {name} holds {kind}, not a mapping of sections (model:, data:, "
                              f"trainer:, ...): write each section as 'name:' at the start of a line, as in "
                              f"experiments/quickstart.yaml")


def parse_config(parser, args: Sequence[str], command: str):
    """``parser.parse_args(args)``; a bad file, key or value raises ConfigError with one line naming it (``command``:
    the ``python -m swinlab`` command the message points to for ``--help``). ``--help``/``--print_config`` exit."""
    from jsonargparse import ArgumentError

    if command in RUN_COMMANDS:
        check_config_files(args)
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
        self.run_folder: Optional[RunFolder] = None  # the log folder this run writes to (rank 0), while undoable
        self.claimed: List[RunFolder] = []  # other folders claimed for this run alone (checkpoint.dirpath ...)
        self.saved_config_unset: List[str] = []  # keys SaveRunConfig writes as null (the reserved version)
        self.first_batch = FirstBatch()
        self.config_saver: Optional[SaveRunConfig] = None
        saved_env = os.environ.get(RUN_VERSION_ENV)
        try:
            super().__init__(*args, **kwargs)
        except BaseException as exc:
            if not self.first_batch.seen:  # stopped while setting up: leave the disk as it was
                for folder in [self.run_folder, *self.claimed]:
                    if folder is not None:
                        folder.rollback()
                if self.config_saver is not None and self.config_saver.written is not None:
                    with contextlib.suppress(OSError):  # no log folder: the config went to default_root_dir
                        self.config_saver.written.unlink(missing_ok=True)
            failed = next((e for e in _exception_chain(exc) if write_failure(e)), None)
            if failed is not None and _swinlab_cause(exc) is None:
                where = failed.filename or self._run_dir()
                raise SwinlabError(f"could not write {where} ({unwritable_reason(where, failed)}): files written "
                                   f"before are intact; free disk space or choose a folder this run can write to "
                                   f"(trainer.logger.init_args.save_dir)") from None
            msg = str(exc)
            folder = self.ckpt_path_in_use is not None and "://" not in str(self.ckpt_path_in_use) \
                and Path(str(self.ckpt_path_in_use)).is_dir()
            if folder and not self.first_batch.seen and isinstance(exc, Exception) and _swinlab_cause(exc) is None:
                raise CheckpointError(f"cannot resume from checkpoint folder {self.ckpt_path_in_use} "
                                      f"({type(exc).__name__}: {first_line(exc, 160)}): the folder is incomplete "
                                      f"(a file or key its .metadata lists is missing) or was written by another "
                                      f"version; resume from another checkpoint") from None
            if not isinstance(exc, RuntimeError) or "Error(s) in loading state_dict" not in msg \
                    or self.ckpt_path_in_use is None:
                raise
            details = [ln.strip() for ln in msg.splitlines()[1:] if ln.strip()]
            first = details[0][:200] if details else "keys or shapes differ"
            raise CheckpointError(f"--ckpt_path {self.ckpt_path_in_use} does not fit the model ({first}): resume "
                                  f"with the config it was trained with, or start from its weights with "
                                  f"model.init_args.checkpoint (a new head or size is then allowed)") from None
        finally:
            if saved_env is None:
                os.environ.pop(RUN_VERSION_ENV, None)
            else:
                os.environ[RUN_VERSION_ENV] = saved_env

    def _undo_run_folder(self) -> None:
        if not self.first_batch.seen and self.run_folder is not None:
            self.run_folder.rollback()

    def _run_dir(self) -> str:
        """The folder this run writes into (its log folder), for a failed write that names no file."""
        if self.run_folder is not None:
            return str(self.run_folder.path)
        trainer = getattr(self, "trainer", None)
        return str(getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None) or os.getcwd())

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
        hparams = self._ckpt_hparams(ckpt_path)
        if not hparams:
            return
        self._check_ckpt_model(ckpt_path, hparams)
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    @staticmethod
    def _ckpt_hparams(ckpt_path: str) -> dict:
        """The checkpoint's hyperparameters (read with ``load_checkpoint_file``: tensors only, a pickle payload is
        refused); a file that is not a Lightning checkpoint is named in one line."""
        from .checkpoint_io import load_checkpoint_file
        ckpt = load_checkpoint_file(Path(ckpt_path), map_location="cpu")
        if not isinstance(ckpt, dict):
            raise CheckpointError(f"--ckpt_path {ckpt_path} holds a {type(ckpt).__name__}, not a Lightning "
                                  f"checkpoint: pass weights as model.init_args.checkpoint instead")
        if "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
            raise CheckpointError(f"--ckpt_path {ckpt_path} holds weights only, not a Lightning checkpoint saved "
                                  f"by fit (no state_dict, no training state): give these weights as "
                                  f"--model.init_args.checkpoint {ckpt_path}")
        hparams = ckpt.get("hyper_parameters") or {}
        if not isinstance(hparams, dict):
            raise CheckpointError(f"--ckpt_path {ckpt_path} has hyper-parameters that are a "
                                  f"{type(hparams).__name__}, not a mapping: the file is damaged or not a Lightning "
                                  f"checkpoint")
        hparams = dict(hparams)
        hparams.pop("_instantiator", None)
        return checked_hparams(hparams, ckpt_path)

    def _check_ckpt_model(self, ckpt_path: str, hparams: dict) -> None:
        """Lightning replaces the configured model (class and arguments) with the checkpoint's; another task (a SimMIM
        checkpoint under the classifier's config), architecture or class count in the config would be silently
        dropped, so it is named instead."""
        model = self.config[self.config.subcommand].get("model")
        mine, theirs = getattr(model, "class_path", None), hparams.get("_class_path")
        if theirs and theirs not in TASK_CLASS_PATHS and theirs != mine:  # importing it would run its module
            raise CheckpointError(
                f"--ckpt_path {ckpt_path} names the task class {theirs[:100]}, which is not one of swinlab's: resume "
                f"with a config whose model.class_path is that class if you trust it, or start from its weights "
                f"with model.init_args.checkpoint {ckpt_path}")
        if mine and theirs and mine != theirs:
            short = theirs.rsplit(".", 1)[-1]
            raise CheckpointError(
                f"--ckpt_path {ckpt_path} is a {short} checkpoint ({theirs}) but the config trains {mine}: "
                f"--ckpt_path continues that run with its own task; resume with the config it was trained with, or "
                f"start a new run from its weights with model.init_args.checkpoint {ckpt_path}")
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
        if self.subcommand in RUN_COMMANDS:
            from .preflight import check_config, check_machine
            check_config(cfg)  # bad trainer values, impossible strategy/precision combinations: one line, nothing built
            check_machine(cfg)  # an accelerator or device count this machine does not have
            from .launch import check_launch, rendezvous_timeout
            check_launch(cfg)  # launcher variables against the trainer's settings, master address and port
            rendezvous_timeout()  # a bad SWINLAB_RENDEZVOUS_TIMEOUT is named before anything is built
        if self.subcommand == "predict":
            self._check_predict_weights(cfg)
        self._classes_from_data(cfg)
        self._monitor_ema(cfg)
        if cfg.get("trainer.enable_checkpointing") is False:
            self._checkpointing_off(cfg)
        if self.subcommand == "fit" and cfg.get("ckpt_path") is None and slurm_restarted():
            self._resume_requeued_job(cfg)
        if self.subcommand == "fit" and cfg.get("ckpt_path") == "last" and not cfg.get("checkpoint.dirpath"):
            if self._resolve_last(cfg) and Path(cfg.ckpt_path).is_file():  # the checks of an explicit file
                hparams = self._ckpt_hparams(cfg.ckpt_path)
                if hparams:
                    self._check_ckpt_model(cfg.ckpt_path, hparams)
        ckpt = cfg.get("ckpt_path")
        if ckpt and str(ckpt).split(":")[0] not in SPECIAL_CKPT_PATHS and Path(ckpt).is_dir():
            from .checkpoint_io import check_checkpoint_folder
            check_checkpoint_folder(ckpt)  # FSDP2 / DeepSpeed folders: their libraries unpickle what they hold
            _check_folder_strategy(ckpt, cfg)  # then: a folder this run's strategy can read
        if self.subcommand in RUN_COMMANDS:
            self._claim_run_folder(cfg)  # last: every check above has passed

    @staticmethod
    def _classes_from_data(cfg) -> None:
        """``model.init_args.num_classes: null``: the class count of the data (an image folder's class folders),
        counted before the model is built, so a config for your own images needs no number."""
        init = getattr(cfg.get("model"), "init_args", None)
        if init is None or "num_classes" not in init or init.num_classes is not None:
            return
        data = cfg.get("data")
        cls = _import_class(getattr(data, "class_path", None))
        count = getattr(cls, "count_classes", None)
        n = count(**dict(data.init_args or {})) if count is not None else None
        if n is None:
            raise ConfigError(f"model.init_args.num_classes: null takes the class count from the data, which "
                              f"{getattr(data, 'class_path', 'this data module')} cannot tell: set num_classes")
        init.num_classes = int(n)

    @staticmethod
    def _monitor_ema(cfg) -> None:
        """With an EMA of the weights (``model.init_args.ema_decay``) the best checkpoint and the exported weights
        follow the EMA's accuracy (``val/acc1_ema``), as the official recipe evaluates the EMA; a monitor set by
        hand is kept."""
        init = getattr(cfg.get("model"), "init_args", None)
        if init is None or init.get("ema_decay") is None or not cfg.get("export.ema", True):
            return
        if cfg.get("checkpoint.monitor") == "val/acc1":
            cfg.checkpoint.monitor = "val/acc1_ema"
            if cfg.get("checkpoint.filename") == "epoch{epoch:03d}-acc1_{val/acc1:.4f}":
                cfg.checkpoint.filename = "epoch{epoch:03d}-acc1_ema_{val/acc1_ema:.4f}"

    @staticmethod
    def _check_predict_weights(cfg) -> None:
        """``predict`` without weights (no ``--ckpt_path``, no ``model.init_args.checkpoint``) would predict with a
        freshly initialised model: refused unless asked for with ``--allow_random_weights true``."""
        if cfg.get("ckpt_path") or cfg.get("allow_random_weights"):
            return
        init = getattr(cfg.get("model"), "init_args", None)
        if init is not None and init.get("checkpoint"):
            return
        raise ConfigError("predict has no weights to run: give --ckpt_path <run>/checkpoints/<file>.ckpt (a trained "
                          "run) or --model.init_args.checkpoint <weights>; --allow_random_weights true predicts with "
                          "the untrained initial weights")

    def _claim_run_folder(self, cfg) -> None:
        """Fix the folders the run will write to, before anything is built, and remember how to undo the run's writes
        there (:class:`RunFolder`) should it stop before its first batch. A new run never writes into a folder that
        holds another run's files: every folder it writes to is claimed with ``os.mkdir`` (atomic: of two runs started
        at the same moment, one gets it and the other a different one, or a one-line refusal).

        With no ``version`` given, rank 0 reserves the next ``version_<n>`` (:func:`reserve_version`) and sets
        ``trainer.logger.init_args.version``; the other ranks Lightning launches read that number from the
        environment. An explicit ``version`` must be a folder that does not exist yet, unless ``fit`` resumes a
        checkpoint into it (``--ckpt_path``; ``--ckpt_path last`` finds it). With the logger off the run writes into
        ``trainer.default_root_dir``: its ``checkpoints`` folder (or ``checkpoint.dirpath``) is claimed the same way."""
        if cfg.get("trainer.fast_dev_run"):
            return
        job = self._slurm_job_version(cfg)
        if not is_global_zero():
            self._share_version(cfg)
            return
        resuming = self.subcommand == "fit" and bool(cfg.get("ckpt_path"))
        logger = cfg.get("trainer.logger")
        if logger in (None, False):
            self._claim_unlogged(cfg, resuming)
            return
        if self.subcommand == "fit" and cfg.get("checkpoint.dirpath") and not resuming and _saves_checkpoints(cfg):
            self.claimed.append(_claim_new(Path(cfg.checkpoint.dirpath), "checkpoint.dirpath",
                                           "--checkpoint.dirpath <a new folder>"))
        init = getattr(logger, "init_args", None) if logger is not True else None
        class_path = str(getattr(logger, "class_path", "") or "")
        if init is None or class_path.rsplit(".", 1)[-1] not in VERSIONED_LOGGERS:
            return
        save_dir = init.get("save_dir")
        if save_dir is None or "://" in str(save_dir):
            return  # a remote filesystem: Lightning's own numbering
        root = Path(save_dir) / str(init.get("name") or "")
        version = init.get("version")
        if version is not None:
            folder = root / (version if isinstance(version, str) else f"version_{version}")
            if resuming or (job is not None and slurm_restarted()):  # a requeued job keeps its own folder
                self.run_folder = RunFolder(folder, _new_parents(folder))
                return
            fresh = f"drop trainer.logger.init_args.version (this run then gets {root / _next_version(root)}) or " \
                    f"give a version that is free"
            resume = f"resume that run with --ckpt_path {folder / 'checkpoints' / 'last.ckpt'} (or --ckpt_path " \
                     f"last), or {fresh}"
            self.run_folder = _claim_new(folder, "trainer.logger.init_args.version",
                                         resume if self.subcommand == "fit" else fresh,
                                         "trainer.logger.init_args.save_dir")
            return
        parents = _new_parents(root / "version_0")
        try:
            n = reserve_version(root)
        except OSError as exc:
            raise ConfigError(_unwritable(root, exc, "trainer.logger.init_args.save_dir (or name)")) from None
        self.run_folder = RunFolder(root / f"version_{n}", parents, created=True)
        init.version = n
        self.saved_config_unset.append("trainer.logger.init_args.version")
        os.environ[RUN_VERSION_ENV] = json.dumps({"root": str(root.resolve()), "version": n})

    @staticmethod
    def _log_root(cfg) -> Optional[Path]:
        logger = cfg.get("trainer.logger")
        init = getattr(logger, "init_args", None) if logger not in (None, True, False) else None
        class_path = str(getattr(logger, "class_path", "") or "")
        if init is None or class_path.rsplit(".", 1)[-1] not in VERSIONED_LOGGERS:
            return None
        save_dir = init.get("save_dir")
        if save_dir is None or "://" in str(save_dir):
            return None
        return Path(save_dir) / str(init.get("name") or "")

    def _slurm_job_version(self, cfg) -> Optional[str]:
        """A SLURM job without an explicit version logs into ``job<id>`` (:func:`slurm_run_name`): the same folder on
        every rank and after a requeue. Returns that name, or None outside SLURM or with a version given."""
        root = self._log_root(cfg)
        init = cfg.trainer.logger.init_args if root is not None else None
        if init is None or init.get("version") is not None:
            return None
        job = slurm_run_name()
        if job is not None:
            init.version = job
            self.saved_config_unset.append("trainer.logger.init_args.version")
        return job

    def _share_version(self, cfg) -> None:
        """A rank other than 0: log into the version rank 0 reserved (passed on in the environment)."""
        root = self._log_root(cfg)
        if root is None:
            return
        init = cfg.trainer.logger.init_args
        shared = json.loads(os.environ.get(RUN_VERSION_ENV) or "{}")
        if init.get("version") is None and shared.get("root") == str(root.resolve()):
            init.version = shared["version"]
            self.saved_config_unset.append("trainer.logger.init_args.version")

    def _claim_unlogged(self, cfg, resuming: bool) -> None:
        """``--trainer.logger false``: the run writes into ``trainer.default_root_dir`` (the working directory by
        default): ``fit`` claims its checkpoint folder (``<default_root_dir>/checkpoints`` or ``checkpoint.dirpath``)
        and must not find an earlier ``best.safetensors`` there."""
        if self.subcommand != "fit" or resuming:
            return
        root = Path(cfg.get("trainer.default_root_dir") or ".")
        if cfg.get("export.enabled", True):
            best = root / (cfg.get("export.filename") or "best.safetensors")
            if best.exists():
                raise ConfigError(f"{best} exists (another run's weights): with the logger off, fit writes into "
                                  f"trainer.default_root_dir ({root}); give --trainer.default_root_dir <a new folder>, "
                                  f"or keep the logger (each run then gets its own version folder)")
        if _saves_checkpoints(cfg):
            dirpath = cfg.get("checkpoint.dirpath")
            self.claimed.append(_claim_new(
                Path(dirpath) if dirpath else root / "checkpoints", "checkpoint.dirpath" if dirpath else
                "trainer.default_root_dir", "--trainer.default_root_dir <a new folder>, or keep the logger (each run "
                                            "then gets its own version folder)"))

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
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as exc:  # a setting Lightning refuses that check_config missed
            if _swinlab_cause(exc) is not None:
                raise
            raise ConfigError(f"the trainer settings were refused: {_one_line(exc)} (see `python -m swinlab "
                              f"{self.subcommand} --help`)") from None
        attach_safe_checkpoint_io(trainer)
        from .checkpoint_io import guard_checkpoint_callback, guard_strategy_loads
        guard_strategy_loads(trainer.strategy)  # paths Lightning resolves itself (hpc, registry) get the same check
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                guard_checkpoint_callback(callback)  # paths its saved state names: inside its folder only
        if trainer.logger is None:  # --trainer.logger false: Lightning's LR monitor refuses to run without one
            trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, LearningRateMonitor)]
        trainer.callbacks.append(self.first_batch)
        if trainer.world_size > 1:  # the ranks meet in fit/validate/...: bounded, with one line if they do not
            from .launch import RendezvousWatchdog
            watchdog = RendezvousWatchdog(on_timeout=self._undo_run_folder)
            trainer.callbacks.append(watchdog)
            watchdog.start()
        for callback in trainer.callbacks:
            if isinstance(callback, SaveRunConfig):
                callback.unset = list(self.saved_config_unset)
                self.config_saver = callback
        return trainer

    def _resume_requeued_job(self, cfg) -> None:
        """A requeued SLURM job (SLURM_RESTART_COUNT >= 1) without --ckpt_path continues from the ``last.ckpt`` in
        its own run folder (``runs/<name>/job<id>``), when the earlier start wrote one; every rank finds the same
        file. An explicit ``version`` or ``--ckpt_path`` is left as given."""
        logger = cfg.get("trainer.logger")
        init = getattr(logger, "init_args", None) if logger not in (None, True, False) else None
        if init is None or init.get("version") is not None or init.get("save_dir") is None:
            return
        last = Path(init.save_dir) / str(init.get("name") or "") / slurm_run_name() / "checkpoints" / "last.ckpt"
        if not last.exists():
            return
        cfg.ckpt_path = str(last)
        if last.is_file():
            hparams = self._ckpt_hparams(cfg.ckpt_path)
            if hparams:
                self._check_ckpt_model(cfg.ckpt_path, hparams)

    @staticmethod
    def _resolve_last(cfg) -> bool:
        """Point ``ckpt_path`` at the newest ``last.ckpt`` of this run name and log into the same version (True), or
        leave "last" to Lightning (False: a logger without a save_dir)."""
        logger = cfg.get("trainer.logger")
        init = getattr(logger, "init_args", None) if logger not in (None, True, False) else None
        if init is None or not hasattr(init, "save_dir"):
            return False  # not a TensorBoard-style logger: leave "last" to Lightning
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
        return True


#: the task classes a checkpoint may name without the config naming them too
TASK_CLASS_PATHS = ("swinlab.tasks.ImageClassifier", "swinlab.tasks.MaskedImageModeling",
                    "swinlab.tasks.classifier.ImageClassifier", "swinlab.tasks.simmim.MaskedImageModeling")
#: model_kwargs that are not SwinConfig fields but create_model's own (what the model returns; not where from)
CREATE_MODEL_KWARGS = ("features_only", "out_indices", "feature_fmt")


def checked_hparams(hparams: dict, ckpt_path: Any) -> dict:
    """A checkpoint's hyper-parameters are data: checked before the configured model is replaced by them.

    The task class must be one of swinlab's (``TASK_CLASS_PATHS``; another is taken only when the config names the
    same one, :meth:`SwinlabCLI._check_ckpt_model`); the model name a registry name (an ``hf-hub:`` name would
    download from the network); the model settings within the family's bounds and the memory this machine has
    (:func:`~swinlab.models.limits.check_saved_config`); and weights the file points to elsewhere (``checkpoint``,
    ``model_kwargs.pretrained``) are never fetched: resuming loads the checkpoint's own weights. One line per
    refusal, naming the file and the setting."""
    from ..models.config import SwinConfig
    from ..models.limits import LIMITS, check_saved_config, saved_fields
    from ..models.registry import get_variant

    where = f"--ckpt_path {ckpt_path}"
    theirs = hparams.get("_class_path")
    if theirs is not None and not isinstance(theirs, str):
        raise CheckpointError(f"{where} names a task class that is not a class path ({type(theirs).__name__}): the "
                              f"file is damaged or not made by swinlab")
    if hparams.get("checkpoint") is not None:
        hparams["checkpoint"] = None  # a path from the file: never opened (the file's own state dict is loaded)
    name = hparams.get("model_name")
    if name is None:
        return hparams
    if not isinstance(name, str) or name.startswith("hf-hub:") or "://" in name:
        raise CheckpointError(f"{where} names the model {str(name)[:80]!r}, not a registry name: the file is "
                              f"damaged or not made by swinlab (`python -m swinlab models` lists the names)")
    try:
        variant = get_variant(name.split(".")[0])
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {first_line(exc)}") from None
    kwargs = hparams.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where} has model_kwargs that are a {type(kwargs).__name__}, not a mapping: the file "
                              f"is damaged or not made by swinlab")
    kwargs = dict(kwargs)
    if kwargs.get("pretrained"):
        kwargs["pretrained"] = False  # weights from the network: the checkpoint's own are loaded instead
        hparams["model_kwargs"] = kwargs
    fields = {k: v for k, v in kwargs.items() if k not in (*CREATE_MODEL_KWARGS, "pretrained")}
    classes = hparams.get("num_classes")
    if classes is not None:
        low, high = LIMITS["num_classes"]
        if isinstance(classes, bool) or not isinstance(classes, int) or not low <= classes <= high:
            raise CheckpointError(f"{where} has num_classes={str(classes)[:40]}, out of range [{low}, {high}]: the "
                                  f"file is damaged or not made by swinlab")
        fields["num_classes"] = classes
    try:
        config = variant.config.replace(**saved_fields(fields))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where} has model_kwargs that are not model settings ({first_line(exc)}): the "
                              f"file is damaged or not made by swinlab") from None
    assert isinstance(config, SwinConfig)
    check_saved_config(config, where)
    return hparams


def _check_folder_strategy(ckpt: str, cfg) -> None:
    """A checkpoint folder is read by the strategy that wrote it: FSDP2's distributed checkpoint (``.metadata``) by
    ModelParallelStrategy, a ZeRO folder (``latest``, ``checkpoint/``) by DeepSpeed. Any other folder, or a folder
    given to a run with another strategy, is refused in one line."""
    from .preflight import strategy_family

    root = Path(ckpt)
    kind = "fsdp2" if (root / ".metadata").is_file() else \
        "deepspeed" if (root / "latest").is_file() or (root / "checkpoint").is_dir() else None
    family = strategy_family(cfg.get("trainer.strategy"))
    names = {"fsdp2": "an FSDP2 distributed checkpoint (ModelParallelStrategy, experiments/strategy/fsdp2.yaml)",
             "deepspeed": "a DeepSpeed ZeRO checkpoint (experiments/strategy/zero*.yaml)"}
    if kind is None:
        raise CheckpointError(f"--ckpt_path {ckpt} is a folder but not a checkpoint folder (no .metadata of a "
                              f"distributed checkpoint, no DeepSpeed 'latest'): give a .ckpt file or a complete "
                              f"checkpoint folder")
    if family != kind:
        raise CheckpointError(f"--ckpt_path {ckpt} is {names[kind]} but trainer.strategy is {family}: resume it with "
                              f"the strategy that wrote it (compose that experiments/strategy file)")


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


_NOT_ACCEPTED = re.compile(r"(?:Option|Key) '([\w.]+)' is not accepted|does not accept option '([\w.]+)'")
_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_CLASS_PATH = re.compile(r"Problem with given class_path '([\w.]+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: --([\w.]+)")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\]")


def _class_arguments(class_path: str) -> List[str]:
    """The constructor arguments of the class at ``class_path`` (empty if it cannot be imported)."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _parser_keys(command: Optional[str]) -> List[str]:
    """Every key ``python -m swinlab <command>`` accepts (dotted), for suggestions; empty for other commands."""
    if command not in RUN_COMMANDS:
        return []
    try:
        return list(build_parser(command).get_defaults().keys())
    except Exception:  # pragma: no cover - suggestions are a nicety: never hide the error itself
        return []


def key_suggestion(key: str, class_path: Optional[str] = None, command: Optional[str] = None) -> str:
    """`` (did you mean ...?)`` for a key the parser does not accept: among the class's arguments (a key inside a
    class_path's init_args), else among the command's keys with the same parent (``trainer.max_epochz`` ->
    ``trainer.max_epochs``), else among the top-level sections (``trainr`` -> ``trainer``)."""
    from .preflight import close_matches

    if class_path:
        return close_matches(key.rsplit(".", 1)[-1], _class_arguments(class_path))
    keys = _parser_keys(command)
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rsplit(".", 1)[-1] for k in keys if parent and k.rpartition(".")[0] == parent]
    if siblings:
        return close_matches(leaf, siblings)
    top = key.split(".", 1)[0]
    sections = sorted({k.split(".", 1)[0] for k in keys})
    return close_matches(top, sections) if top not in sections else ""


def parser_message(exc: BaseException, command: Optional[str] = None) -> str:
    """jsonargparse's nested multi-line error as one line: the key path, the innermost reason and the value given,
    with the closest accepted names for a misspelt key or choice (``command``: the swinlab command whose keys to
    suggest from)."""
    raw = str(exc).strip()
    lines = [ln.strip() for ln in raw.splitlines() if ln.strip()]
    kept = [ln[2:] if ln.startswith("- ") else ln for ln in lines if not _PARSER_NOISE.match(ln)]
    text = " ".join(dict.fromkeys(kept)).replace(": :", ":")  # each reason once (union members repeat them)
    given = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), None)
    if given and len(given) < 80 and not given.startswith(("Namespace(", "NestedArg(")) and given not in text:
        text += f" (got {given})"
    hint = ""
    unknown = _NOT_ACCEPTED.search(raw) or _UNRECOGNIZED.search(raw)
    missing = _NO_ATTRIBUTE.search(raw)
    if unknown:
        owner = _CLASS_PATH.search(raw)
        hint = key_suggestion(next(g for g in unknown.groups() if g), owner.group(1) if owner else None, command)
    elif missing:  # a misspelt class name in a class_path
        import importlib

        from .preflight import close_matches
        with contextlib.suppress(ImportError):
            module = importlib.import_module(missing.group(1))
            names = [f"{missing.group(1)}.{n}" for n in dir(module)
                     if not n.startswith("_") and inspect.isclass(getattr(module, n))]
            hint = close_matches(f"{missing.group(1)}.{missing.group(2)}", names)
    elif given:
        from .preflight import close_matches
        choices = [c.strip().strip("'\"") for lit in _LITERAL.findall(raw) for c in lit.split(",")]
        hint = close_matches(given, choices) if choices else ""
    return (text[:600] + hint) or type(exc).__name__


def _exception_chain(exc: Optional[BaseException]):
    """``exc`` and the exceptions it was raised from or during."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


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
    return ConfigError(f"invalid configuration: {parser_message(exc, command)} (see `python -m swinlab {command} "
                       f"--help` or --print_config for the accepted keys)")


def main(argv: Optional[List[str]] = None) -> int:
    """Run a LightningCLI subcommand; bad settings raise ConfigError with one line naming the problem."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    argv = list(sys.argv[1:] if argv is None else argv)
    saved_argv = sys.argv
    # Lightning's multi-device launcher starts the other ranks as ``python -m swinlab <sys.argv[1:]>``: sys.argv must
    # hold this command's arguments (also when main() is called with an explicit argv), or the workers would start
    # without a subcommand and rank 0 would wait for them forever.
    sys.argv = [sys.argv[0], *argv]
    forget_signals()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        if argv and argv[0] in RUN_COMMANDS:
            check_config_files(argv[1:])
        SwinlabCLI(LightningModule, LightningDataModule, **CLI_KWARGS)
    except SIGTERMException:  # Lightning's own SIGTERM path (outside training) exits with status None, i.e. 0
        raise Stopped(signal.SIGTERM) from None
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
        for signum, handler in handlers.items():  # Lightning restores the handlers it found: Preemption's
            if handler is not None:
                signal.signal(signum, handler)
    if stopped_by() is not None:  # a signal outside the steps (setup, export): the run did not finish as asked
        raise Stopped(stopped_by())
    return 0


def _import_class(path: Optional[str]):
    if not path or "." not in str(path):
        return None
    import importlib
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
