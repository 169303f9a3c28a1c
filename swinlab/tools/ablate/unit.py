"""One unit of a study: a variant with a seed. Its training, and each fine-tune, is an ordinary ``python -m swinlab
fit`` run (the config a unit writes under ``<out>/units/<unit>/`` runs as it is), so it may use any devices, nodes and
strategy a training config may; its evaluations run in the unit's own process.

A unit's state lives in its own files, which is what makes a study restartable on any launcher:

- ``<out>/weights/<variant>_seed<seed>.safetensors``: the trained weights (the train run is finished);
- ``<out>/tb/<variant>/seed<seed>[_ft<img>w<win>]/``: each fit run's folder (TensorBoard, ``checkpoints/last.ckpt``,
  and for a finished fine-tune its exported ``final.safetensors``); an unfinished run resumes from its last.ckpt;
- ``<out>/units/<unit>/rows.json``: the unit's result rows, written last (the unit is done).
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ...errors import ConfigError, SwinlabError
from ...models import create_model, save_safetensors
from .schema import Cell, Study, read_study

TASK = "swinlab.tasks.ImageClassifier"  # what every variant trains (its init arguments: the study's model: section)
DEFAULT_DATA = "swinlab.data.DigitsDataModule"
EXPORT = "final.safetensors"  # the weights a unit's fit run exports at its end (its final weights, not a best)


class UnitFailed(SwinlabError):
    """A fit run of a unit exited with an error (the message names the run's log)."""


@dataclass(frozen=True)
class Unit:
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}_seed{self.seed}"


def units_of(study: Study) -> List[Unit]:
    return [Unit(v, int(s)) for v in study.variant_names for s in study.seeds]


# ----------------------------------------------------------------------------------------------------------------
# A variant at one size as a fit config
# ----------------------------------------------------------------------------------------------------------------

def fit_config(study: Study, variant: str, img_size, window_size, finetune: bool = False) -> Dict[str, Any]:
    """One variant at one size as the sections of a ``python -m swinlab fit`` config (model, data, trainer), written
    the way a training config writes it."""
    from ...models.swin import to_2tuple

    v = study.variant(variant)
    args = study.task_args()
    trainer = study.train.trainer or {}
    if finetune:
        args.update(study.finetune.model or {})
        trainer = study.finetune.trainer or {}
    img, win = list(to_2tuple(img_size)), list(to_2tuple(window_size))
    data = copy.deepcopy(study.data)
    data_args = dict(data.get("init_args") or {})
    data_args["img_size"] = img
    model_kwargs = {**v.model_kwargs, "img_size": img, "window_size": win}
    return {"model": {"class_path": TASK, "init_args": {**args, "model_name": v.model_name,
                                                         "model_kwargs": model_kwargs}},
            "data": {"class_path": data.get("class_path") or DEFAULT_DATA, "init_args": data_args},
            "trainer": copy.deepcopy(dict(trainer))}


@functools.lru_cache(maxsize=1)
def _fit_parser():
    from ...training.cli import build_parser
    return build_parser("fit")


def parse_fit_config(cfg: Dict[str, Any], study: Study, variant: str, stage: str):
    """``cfg`` through fit's parser: keys and types against the classes' signatures, defaults filled in (a
    jsonargparse Namespace). A bad setting raises ConfigError naming the study, the variant and the key."""
    from jsonargparse import ArgumentError

    from ...training.cli import parser_message
    try:
        return _fit_parser().parse_object(copy.deepcopy(cfg))
    except ArgumentError as exc:
        raise ConfigError(f"study {study.name}, variant {variant} ({stage}): {parser_message(exc)}: a study's "
                          f"model: section takes {TASK}'s arguments, data: and trainer: what a training config takes "
                          f"(see `python -m swinlab fit --help`)") from None


def check_settings(study: Study) -> None:
    """Every variant's model, data and trainer settings through fit's parser: at the train size, and with the
    fine-tune's overrides at the first eval size. Checked before any training."""
    for variant in study.variant_names:
        parse_fit_config(fit_config(study, variant, study.train.img_size, study.train.window_size), study, variant,
                         "train")
        if study.finetune:
            first = study.eval[0]
            parse_fit_config(fit_config(study, variant, first.img_size, first.window_size, finetune=True), study,
                             variant, "finetune")


def load_study(path: str) -> Study:
    """The study file (:func:`.schema.read_study`: typed, sizes and claims checked) with every variant's model, data
    and trainer settings checked by fit's parser: one ConfigError line, before anything trains."""
    study = read_study(path)
    check_settings(study)
    return study


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def make_data(study: Study, img_size, seed: int, variant: Optional[str] = None):
    """The study's data module at ``img_size``, built from its fit config as fit's parser reads it; a data class that
    takes a ``seed`` gets the unit's seed unless the study fixes one."""
    variant = variant if variant is not None else study.variant_names[0]
    cfg = fit_config(study, variant, img_size, study.train.window_size)
    if "seed" in parse_fit_config(cfg, study, variant, "data").data.init_args:
        cfg["data"]["init_args"].setdefault("seed", int(seed))
    dm = _import(cfg["data"]["class_path"])(**cfg["data"]["init_args"])
    dm.setup("fit")
    return dm


@torch.no_grad()
def evaluate(model: torch.nn.Module, datamodule) -> Tuple[float, float, str]:
    """Top-1 / top-5 (%) over the validation split, and which images were right at top-1 (a '0'/'1' string in the
    split's order: what the paired intervals resample). On the GPU when there is one."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = model.to(device).eval()
    correct5 = total = 0
    right: List[torch.Tensor] = []
    for batch in datamodule.val_dataloader():
        x, y = batch[0].to(device), batch[1].to(device)
        logits = model(x)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        right.append((top[:, 0] == y).cpu())
        correct5 += (top == y[:, None]).any(dim=-1).sum().item()
        total += y.numel()
    hits = torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)
    bits = "".join("1" if h else "0" for h in hits.tolist())
    return 100.0 * int(hits.sum()) / max(total, 1), 100.0 * correct5 / max(total, 1), bits


def transfer(weights: str, name: str, img_size, window_size, **kwargs: Any) -> torch.nn.Module:
    """The trained weights at another size through the model's own transfer path; ``kwargs``: the variant's other
    model settings (switches, widths), as it was trained."""
    return create_model(name, checkpoint=weights, **{**kwargs, "img_size": img_size, "window_size": window_size})


# ----------------------------------------------------------------------------------------------------------------
# A unit's fit runs and files
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    """One fit run of a unit: the training (``cell`` None) or the fine-tune at ``cell``."""
    unit: Unit
    out: Path
    cell: Optional[Cell] = None

    @property
    def version(self) -> str:
        seed = f"seed{self.unit.seed}"
        return seed if self.cell is None else f"{seed}_ft{self.cell.img[0]}w{self.cell.win[0]}"

    @property
    def run_dir(self) -> Path:
        return self.out / "tb" / self.unit.variant / self.version

    @property
    def last_ckpt(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def weights(self) -> Path:
        """The phase's final weights: the unit's trained weights, or the fine-tuned ones in the run folder."""
        if self.cell is None:
            return self.out / "weights" / f"{self.unit.name}.safetensors"
        return self.run_dir / EXPORT

    @property
    def config_path(self) -> Path:
        return unit_dir(self.out, self.unit) / f"{self.version}.yaml"

    @property
    def log_path(self) -> Path:
        return unit_dir(self.out, self.unit) / f"{self.version}.log"


def unit_dir(out: Path, unit: Unit) -> Path:
    return out / "units" / unit.name


def rows_path(out: Path, unit: Unit) -> Path:
    return unit_dir(out, unit) / "rows.json"


def phases(study: Study, unit: Unit, out: Path) -> List[Phase]:
    return [Phase(unit, out)] + [Phase(unit, out, c) for c in study.cells() if c.finetuned]


def phase_config(study: Study, phase: Phase, threads: Optional[int] = None) -> Dict[str, Any]:
    """The ``fit`` config of one phase: the variant's sections at the phase's size (:func:`fit_config`; the fine-tune
    starting from the unit's trained weights), seeded with the unit's seed, logging into the phase's own run folder,
    saving ``last.ckpt`` every epoch (no best checkpoint: the unit is evaluated with its final weights, which the run
    exports)."""
    unit = phase.unit
    if phase.cell is None:
        cfg = fit_config(study, unit.variant, study.train.img_size, study.train.window_size)
    else:
        cfg = fit_config(study, unit.variant, list(phase.cell.img), list(phase.cell.win), finetune=True)
        cfg["model"]["init_args"]["checkpoint"] = str(Phase(unit, phase.out).weights)
    data_args = cfg["data"]["init_args"]
    if "seed" not in data_args and "seed" in parse_fit_config(cfg, study, unit.variant, "data").data.init_args:
        data_args["seed"] = int(unit.seed)  # the data's own randomness (order, augmentation) follows the unit's seed
    trainer = cfg["trainer"]
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(phase.out / "tb"), "name": unit.variant,
                                       "version": phase.version, "default_hp_metric": False}}
    trainer.setdefault("enable_progress_bar", False)  # the unit's log is a file
    trainer.setdefault("enable_model_summary", False)
    cfg["seed_everything"] = int(unit.seed)
    # no monitor: the newest checkpoint is kept (each epoch's end, and where max_steps stops) with last.ckpt beside
    # it, and the export at the end is that newest one: the unit's final weights
    cfg["checkpoint"] = {"monitor": None, "save_top_k": 1, "save_last": True}
    cfg["export"] = {"filename": EXPORT}
    cfg["attention_images"] = {"enabled": False}  # a unit logs scalars; its figures are the study's
    if threads:
        cfg["threads"] = int(threads)
    return cfg


def unit_spec(study: Study, unit: Unit, out: Path) -> Dict[str, Any]:
    """Everything a unit's results depend on (its fit configs, the weights it starts from, the cells it evaluates):
    a folder whose unit was made with another spec is not resumed into."""
    variant = study.variant(unit.variant)
    spec: Dict[str, Any] = {"cells": [list(c.key) for c in study.cells()], "checkpoint": variant.checkpoint,
                            "model_kwargs": variant.model_kwargs, "model_name": variant.model_name}
    for phase in phases(study, unit, out):
        if phase.cell is None and variant.checkpoint:
            continue
        cfg = phase_config(study, phase)
        spec[phase.version] = json.loads(json.dumps(cfg, default=str))
    return spec


def read_unit_rows(out: Path, unit: Unit) -> Optional[List[Dict[str, Any]]]:
    """A finished unit's rows (None while it is not finished)."""
    path = rows_path(out, unit)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{global_rank()}.{os.getpid()}.tmp")  # every task of a unit writes the same
    tmp.write_text(text)
    tmp.replace(path)


def global_rank() -> int:
    """This process's rank in a unit that runs on several tasks (SLURM), 0 otherwise."""
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")) or 0)


def _fit_env() -> Dict[str, str]:
    """The fit run imports the same swinlab as this process (its package root first on PYTHONPATH)."""
    root = str(Path(__file__).resolve().parents[3])  # the folder holding this swinlab package
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root] + extra))


def run_fit(study: Study, phase: Phase, threads: Optional[int] = None, resume: bool = False) -> None:
    """``python -m swinlab fit --config <phase config> [--ckpt_path <its last.ckpt>]``. A single-process run goes
    through fit's own entry point here; a run on several devices or nodes is started as that command, so that its
    launcher (Lightning's, or the SLURM tasks) starts the ranks, its output appended to the phase's log. A failure
    raises :class:`UnitFailed` naming the phase and, for a started command, its log and last line."""
    import yaml

    from .plan import world_size

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # the config reads as written, without &id anchors
            return True

    cfg = phase_config(study, phase, threads)
    _atomic_write(phase.config_path, yaml.dump(cfg, Dumper=Dumper, sort_keys=False))
    args = ["fit", "--config", str(phase.config_path)] + (["--ckpt_path", str(phase.last_ckpt)] if resume else [])
    if world_size(cfg["trainer"]) == 1:
        from ...training.cli import main as fit
        try:
            fit(args)
        except Exception as exc:
            raise UnitFailed(f"unit {phase.unit.name}: `python -m swinlab {' '.join(args)}` failed: "
                             f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc) else ''}"
                             ) from exc
        return
    rank = global_rank()
    cmd = [sys.executable, "-m", "swinlab", *args]
    log = phase.log_path if rank == 0 else phase.log_path.with_name(f"{phase.version}.rank{rank}.log")
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_fit_env()).returncode
    if code != 0:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        raise UnitFailed(f"unit {phase.unit.name}: `python -m swinlab {' '.join(args)}` exited with {code} "
                         f"({lines[-1][:300] if lines else 'no output'}); log: {log}")


def _wait_for(path: Path, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise UnitFailed(f"{path} did not appear within {timeout:.0f} s (written by rank 0 of the unit)")
        time.sleep(0.5)


def run_unit(study: Study, unit: Unit, out: Path, threads: Optional[int] = None,
             log: Callable[[str], None] = print, started: Optional[float] = None) -> List[Dict[str, Any]]:
    """One variant with one seed, resumable: train at the train size (a fit run; or take the given checkpoint), then
    evaluate at every cell of the study, fine-tuning (a fit run each) where it asks. A finished fit run is not run
    again, an interrupted one resumes from its last.ckpt, a finished unit only returns its rows. Deterministic:
    everything random is seeded from the unit's seed. On a multi-task (SLURM) unit every task runs the fit runs and
    rank 0 evaluates and writes."""
    done = read_unit_rows(out, unit)
    if done is not None:
        return done
    started = time.perf_counter() if started is None else started
    variant = study.variant(unit.variant)
    train = Phase(unit, out)
    todo = [(p, p.last_ckpt.exists()) for p in phases(study, unit, out) if not p.weights.exists()]
    rank0 = global_rank() == 0
    for phase, resume in todo:
        if phase.cell is None and variant.checkpoint:
            if rank0:
                model = transfer(variant.checkpoint, variant.model_name, list(study.train_cell.img),
                                 list(study.train_cell.win), **variant.model_kwargs)
                save_safetensors(model, train.weights, variant.model_name)
            continue
        if phase.cell is not None and not rank0:
            _wait_for(train.weights)  # rank 0 moves the trained weights into place after the training run
        log(f"[{time.perf_counter() - started:6.0f}s] {unit.name} {phase.version}: fit"
            f"{' (resuming ' + str(phase.last_ckpt) + ')' if resume else ''}")
        run_fit(study, phase, threads, resume=resume)
        if phase.cell is None and rank0:
            phase.weights.parent.mkdir(parents=True, exist_ok=True)
            os.replace(phase.run_dir / EXPORT, phase.weights)
    if not rank0:
        return []
    rows: List[Dict[str, Any]] = []
    t = study.train_cell
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(train.run_dir))
    for cell in study.cells():
        weights = train.weights if not cell.finetuned else Phase(unit, out, cell).weights
        model = transfer(str(weights), variant.model_name, list(cell.img), list(cell.win), **variant.model_kwargs)
        top1, top5, bits = evaluate(model, make_data(study, cell.img, unit.seed, unit.variant))
        rows.append(dict(study=study.name, variant=unit.variant, seed=unit.seed, train_img_size=t.img[0],
                         train_window=t.win[0], eval_img_size=cell.img[0], eval_window=cell.win[0],
                         finetuned=cell.finetuned, top1=round(top1, 3), top5=round(top5, 3), correct=bits))
        writer.add_scalar(f"ablate/top1_{'ft' if cell.finetuned else 'direct'}_w{cell.win[0]}", top1)
        log(f"[{time.perf_counter() - started:6.0f}s] {unit.variant} seed {unit.seed} {cell.img[0]}/W{cell.win[0]} "
            f"{'fine-tuned' if cell.finetuned else 'direct    '} top1 {top1:.2f} top5 {top5:.2f}")
    writer.close()
    _atomic_write(rows_path(out, unit), json.dumps(rows) + "\n")
    return rows
