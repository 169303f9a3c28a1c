"""A study file, typed: :class:`Study` and its sections, read by jsonargparse and checked before anything trains.

A study yaml::

    study: pos_bias_transfer
    seeds: [0, 1, 2]
    model: {model_name: swinv2_pico_patch2_window4_32, num_classes: 10, model_kwargs: {...}, <ImageClassifier args>}
    data: {class_path: swinlab.data.DigitsDataModule, init_args: {batch_size: 64}}
    train: {img_size: 32, window_size: 4, trainer: {max_epochs: 8}}
    eval: [{img_size: 48, window_size: 6}, {img_size: 64, window_size: 8}]
    finetune: {trainer: {max_steps: 40}, model: {base_lr: 1e-3, warmup_epochs: 0}}   # optional
    variants:
      table: {position_bias: table}          # model_kwargs overrides (or {model_name: ..., checkpoint: ...})
      log_cpb: {position_bias: cpb_log}
    paper: {table: ["81.7", "79.4/82.7"], ...}                                      # optional
    slurm: {time: 1440, partition: gpu}                                             # optional, --launcher slurm

Each variant's model, data and trainer settings are checked by ``python -m swinlab fit``'s own parser
(``unit.load_study``), so a study takes exactly what a training config takes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ...errors import ConfigError
from ...models.swin import to_2tuple

Sizes = Union[int, List[int]]  # a square size, or [height, width]
Pair = Tuple[int, int]


@dataclass(frozen=True)
class Cell:
    """One evaluation of a unit: the image size, the window, and whether after the fine-tune."""
    img: Pair
    win: Pair
    finetuned: bool = False

    @property
    def key(self) -> Tuple[int, int, bool]:
        """As the result rows store it: (eval_img_size, eval_window, finetuned), first sides only."""
        return self.img[0], self.win[0], self.finetuned


@dataclass
class Size:
    """One (img_size, window_size) pair."""
    img_size: Optional[Sizes] = None
    window_size: Optional[Sizes] = None

    def pair(self) -> Tuple[Pair, Pair]:
        return to_2tuple(self.img_size), to_2tuple(self.window_size)


@dataclass
class TrainSpec(Size):
    """Where every variant trains: its size and window, and Trainer arguments (``max_epochs``, ``max_steps``,
    ``devices``, ``num_nodes``, ``strategy``, ...): a unit's training is a ``fit`` run with them."""
    trainer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FinetuneSpec:
    """The short fine-tune at each eval size: Trainer arguments and ImageClassifier overrides (``base_lr``, ...)."""
    trainer: Dict[str, Any] = field(default_factory=dict)
    model: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Claim:
    """A paper's claim about one cell: ``variant`` is ``expect`` (better or worse) than ``baseline`` at the given
    evaluation size (``img_size``/``window_size``; the train size when omitted), directly or after the fine-tune.
    ``measure``: ``accuracy`` compares the cell's top-1; ``transfer`` compares the change from the train window
    (cell minus train size, image by image: a difference of differences, so a variant that is simply better
    everywhere does not count as transferring better). The report gives it a verdict from the paired interval
    (``swinlab.tools.study_stats.verdict``)."""
    claim: str
    variant: str
    baseline: Optional[str] = None
    img_size: Optional[Sizes] = None
    window_size: Optional[Sizes] = None
    finetuned: bool = False
    expect: str = "better"
    measure: str = "accuracy"


@dataclass
class SlurmSpec:
    """``--launcher slurm``: what each unit's job asks the scheduler for besides the nodes, tasks and GPUs its
    trainer implies (``num_nodes``; ``devices`` tasks per node; as many GPUs when ``accelerator`` is gpu/cuda).
    ``time``: minutes per unit; ``additional``: other sbatch options (``{account: x, qos: y}``); ``setup``: shell
    lines run before each unit (``module load ...``, ``export MASTER_ADDR=...``)."""
    partition: Optional[str] = None
    time: int = 60
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    array_parallelism: int = 256
    additional: Dict[str, Any] = field(default_factory=dict)
    setup: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Variant:
    """A variant resolved against the study's model section: the registry name, its model kwargs (the study's
    ``model_kwargs`` with the variant's overrides) and the checkpoint it starts from (then it is not trained)."""
    name: str
    model_name: str
    model_kwargs: Dict[str, Any]
    checkpoint: Optional[str] = None


@dataclass
class Study:
    """A study yaml's sections (see the module docstring). ``model``: ImageClassifier's arguments (``model_name``,
    ``num_classes``, ``model_kwargs``, recipe); ``data``: ``{class_path, init_args}`` of a LightningDataModule;
    ``variants``: per variant the ``model_kwargs`` it overrides (or ``model_name`` / ``checkpoint``); ``paper``: per
    variant the paper's table cells; ``slurm``: the jobs' settings under ``--launcher slurm``. The sections a study
    cannot do without are checked by :func:`load_study`."""
    model: Optional[Dict[str, Any]] = None
    data: Optional[Dict[str, Any]] = None
    train: Optional[TrainSpec] = None
    eval: Optional[List[Size]] = None
    variants: Optional[Dict[str, Optional[Dict[str, Any]]]] = None
    study: Optional[str] = None
    seeds: List[int] = field(default_factory=lambda: [0])
    threads: Optional[int] = None
    finetune: Optional[FinetuneSpec] = None
    paper: Optional[Dict[str, List[Union[str, float]]]] = None
    baseline: Optional[str] = None
    claims: List[Claim] = field(default_factory=list)
    slurm: Optional[SlurmSpec] = None

    # -- what the code reads (the sections above are the file's) ------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.study)

    @property
    def variant_names(self) -> List[str]:
        return list(self.variants or {})

    def variant(self, name: str) -> Variant:
        spec = dict(self.variants[name] or {})
        model = self.model or {}
        model_name = spec.pop("model_name", model.get("model_name"))
        checkpoint = spec.pop("checkpoint", None)
        return Variant(name, model_name, {**dict(model.get("model_kwargs") or {}), **spec}, checkpoint)

    def task_args(self) -> Dict[str, Any]:
        """ImageClassifier's arguments other than the model: the recipe every variant trains with."""
        return {k: v for k, v in (self.model or {}).items() if k not in ("model_name", "model_kwargs")}

    @property
    def train_cell(self) -> Cell:
        img, win = self.train.pair()
        return Cell(img, win, False)

    def cells(self) -> List[Cell]:
        """Every cell a unit evaluates, in order: the train size, then each eval size directly and (with a fine-tune
        section) after the fine-tune."""
        modes = (False, True) if self.finetune else (False,)
        return [self.train_cell] + [Cell(*e.pair(), ft) for e in self.eval for ft in modes]

    def claim_cell(self, claim: Claim) -> Cell:
        return Cell(to_2tuple(claim.img_size or self.train.img_size), to_2tuple(claim.window_size or
                                                                               self.train.window_size),
                    bool(claim.finetuned))

    def claim_baseline(self, claim: Claim) -> str:
        return claim.baseline or self.baseline

    def replace(self, **changes: Any) -> Study:
        return dataclasses.replace(self, **changes)


def _instantiate(parser, cfg):
    make = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse >= 4.49 / older
    return make(cfg)


def read_study(path: str) -> Study:
    """The study file read against :class:`Study`, its sizes and claims checked (one ConfigError line naming the
    file, the key and the fix); ``swinlab.tools.ablate.unit.load_study`` also checks each variant's fit settings."""
    from jsonargparse import ArgumentError, ArgumentParser

    from ...training.cli import parser_message

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study config {p} does not exist: check the path")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Study)
    try:
        parsed = _instantiate(parser, parser.parse_path(str(p)))
    except ArgumentError as exc:
        raise ConfigError(f"study config {path}: {parser_message(exc)}: see swinlab/tools/ablate/schema.py (class "
                          f"Study) for the format") from None
    study = Study(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(Study)})
    for key in ("model", "data", "train", "eval", "variants"):
        if getattr(study, key) is None:
            raise ConfigError(f"study config {path} has no '{key}:' section: see swinlab/tools/ablate/schema.py")
    if study.study is None:
        study.study = p.stem
    if not study.variants:
        raise ConfigError(f"study config {path} lists no variants: add at least one under 'variants:'")
    study.baseline = study.baseline or study.variant_names[0]
    check_study(study)
    check_claims(study, path)
    return study


def check_claims(study: Study, path: str) -> None:
    """The baseline and every claim's variants and cell must be in the study."""
    variants = study.variant_names
    cells = {(c.img, c.win) for c in study.cells()}
    if study.baseline not in variants:
        raise ConfigError(f"study config {path}: baseline {study.baseline!r} is not one of the variants "
                          f"{variants}: name one of them")
    for claim in study.claims:
        for key in ("variant", "baseline"):
            if (getattr(claim, key) or study.baseline) not in variants:
                raise ConfigError(f"study config {path}: claim {claim.claim!r} names {key} {getattr(claim, key)!r}, "
                                  f"which is not one of the variants {variants}")
        if claim.measure not in ("accuracy", "transfer"):
            raise ConfigError(f"study config {path}: claim {claim.claim!r} has measure={claim.measure!r}: use "
                              f"accuracy or transfer")
        if claim.expect not in ("better", "worse"):
            raise ConfigError(f"study config {path}: claim {claim.claim!r} has expect={claim.expect!r}: use better "
                              f"or worse")
        cell = study.claim_cell(claim)
        if (cell.img, cell.win) not in cells:
            raise ConfigError(f"study config {path}: claim {claim.claim!r} is about img_size {cell.img[0]} / window "
                              f"{cell.win[0]}, which the study does not evaluate: use one of its eval sizes")
        if claim.finetuned and not study.finetune:
            raise ConfigError(f"study config {path}: claim {claim.claim!r} is about the fine-tuned model but the "
                              f"study has no 'finetune:' section")


def check_study(study: Study) -> None:
    """Every (img_size, window) must tile the first stage's token grid exactly: checked before any training."""
    from ...models import get_variant

    for name in study.variant_names:
        variant = study.variant(name)
        patch = variant.model_kwargs.get("patch_size", get_variant(variant.model_name).config.patch_size)
        sizes = [("train", study.train)] + [(f"eval #{i + 1}", e) for i, e in enumerate(study.eval)]
        for what, spec in sizes:
            if spec.img_size is None or spec.window_size is None:
                raise ConfigError(f"{what} size of study {study.name} needs img_size and window_size")
            img, win = spec.pair()
            if img[0] % patch or img[1] % patch:
                raise ConfigError(f"{what}: img_size {img[0]}x{img[1]} is not divisible by the patch size {patch} "
                                  f"of {variant.model_name}: use a multiple of {patch}")
            grid = (img[0] // patch, img[1] // patch)
            if win[0] > grid[0] or win[1] > grid[1] or grid[0] % win[0] or grid[1] % win[1]:
                raise ConfigError(f"{what}: window {win[0]}x{win[1]} cannot tile the {grid[0]}x{grid[1]} token grid "
                                  f"of img_size {img[0]}x{img[1]} (patch {patch}): pick a window dividing "
                                  f"{grid[0]}, e.g. img_size {win[0] * patch * 4} for window {win[0]}")


def select(study: Study, seeds: Optional[List[int]] = None, variants: Optional[List[str]] = None,
           finetune: bool = True) -> Study:
    """The part of ``study`` a command line asks for: other seeds, some of the variants, no fine-tunes (the direct
    rows do not depend on them)."""
    changes: Dict[str, Any] = {}
    if seeds:
        changes["seeds"] = list(seeds)
    if variants:
        unknown = [v for v in variants if v not in study.variant_names]
        if unknown:
            raise ConfigError(f"--variants {' '.join(unknown)}: not in study {study.name} (it has "
                              f"{', '.join(study.variant_names)})")
        changes["variants"] = {v: study.variants[v] for v in variants}
        if study.baseline not in variants:
            changes["baseline"] = variants[0]
    if not finetune:
        changes["finetune"] = None
        changes["claims"] = [c for c in study.claims if not c.finetuned]
    return study.replace(**changes)
