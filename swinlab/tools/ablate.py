"""``python -m swinlab ablate --config experiments/ablations/<study>.yaml [--out DIR] [--overwrite]``:
resolution-transfer studies. Results already in ``--out`` are never replaced without ``--overwrite``.

For each variant and seed: train once at the train size/window (or take the given checkpoint), then evaluate at every
larger (img_size, window) (a) directly, through the model's transfer path (V1: bicubic bias tables; V2: the CPB MLP
re-evaluated with ``pretrained_window_size``), and (b) after a short fine-tune at that size starting from the trained
weights. Writes results.csv, results.md (paper-shaped table, mean ± std over seeds, the paper's numbers beside ours
when the study gives them), results.png and one TensorBoard run per variant (a version per seed).

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

The file is read by jsonargparse against :class:`Study` (unknown or mistyped keys are named in one line), and each
variant's model, data and trainer settings, at the train size and (when given) the fine-tune settings, go through
``python -m swinlab fit``'s own parser (``swinlab.training.cli.build_parser``) as ``model: {class_path:
swinlab.tasks.ImageClassifier, init_args: ...}``, ``data:`` and ``trainer:`` sections: the same keys and types as a
training config, checked before anything trains.
"""
from __future__ import annotations

import copy
import csv
import functools
import importlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..errors import ConfigError
from ..models import create_model, save_safetensors
from ..models.swin import to_2tuple
from ..training.cli import build_parser, parse_config, parser_message

CSV_FIELDS = ["study", "variant", "seed", "train_img_size", "train_window", "eval_img_size", "eval_window",
              "finetuned", "top1", "top5"]
IMAGE_FIELDS = ["variant", "seed", "eval_img_size", "eval_window", "finetuned", "correct"]


# ----------------------------------------------------------------------------------------------------------------
# Study config
# ----------------------------------------------------------------------------------------------------------------

TASK = "swinlab.tasks.ImageClassifier"  # what every variant trains (its init arguments: the study's model: section)
DEFAULT_DATA = "swinlab.data.DigitsDataModule"
Sizes = Union[int, List[int]]  # a square size, or [height, width]


@dataclass
class Size:
    """One (img_size, window_size) pair."""
    img_size: Optional[Sizes] = None
    window_size: Optional[Sizes] = None


@dataclass
class TrainSpec:
    """Where every variant trains: its size and window, and Trainer arguments (``max_epochs``, ``max_steps``, ...)."""
    img_size: Optional[Sizes] = None
    window_size: Optional[Sizes] = None
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
    everywhere does not count as transferring better). The runner gives it a verdict from the paired interval
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
class Study:
    """A study yaml's sections (see the module docstring). ``model``: ImageClassifier's arguments (``model_name``,
    ``num_classes``, ``model_kwargs``, recipe); ``data``: ``{class_path, init_args}`` of a LightningDataModule;
    ``variants``: per variant the ``model_kwargs`` it overrides (or ``model_name`` / ``checkpoint``); ``paper``: per
    variant the paper's table cells. The sections a study cannot do without are checked by ``load_study``."""
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


def load_study(path: str) -> Dict[str, Any]:
    """The study file as a dict of sections, read against :class:`Study`, its sizes and every variant's settings
    checked (one ConfigError line naming the file, the key and the fix)."""
    from jsonargparse import ArgumentError, ArgumentParser

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study config {p} does not exist: check the path")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Study)
    try:
        study = parser.parse_path(str(p)).as_dict()
    except ArgumentError as exc:
        raise ConfigError(f"study config {path}: {parser_message(exc)}: see swinlab/tools/ablate.py (class Study) for "
                          f"the format") from None
    for key in ("model", "data", "train", "eval", "variants"):
        if study.get(key) is None:
            raise ConfigError(f"study config {path} has no '{key}:' section: see swinlab/tools/ablate.py")
    if study["study"] is None:
        study["study"] = p.stem
    if not study["variants"]:
        raise ConfigError(f"study config {path} lists no variants: add at least one under 'variants:'")
    study["baseline"] = study.get("baseline") or next(iter(study["variants"]))
    check_study(study)
    check_claims(study, path)
    check_settings(study)
    return study


def check_claims(study: Dict[str, Any], path: str) -> None:
    """The baseline and every claim's variants and cell must be in the study."""
    variants = list(study["variants"])
    cells = [(to_2tuple(study["train"]["img_size"]), to_2tuple(study["train"]["window_size"]))] + [
        (to_2tuple(e["img_size"]), to_2tuple(e["window_size"])) for e in study["eval"]]
    if study["baseline"] not in variants:
        raise ConfigError(f"study config {path}: baseline {study['baseline']!r} is not one of the variants "
                          f"{variants}: name one of them")
    for claim in study.get("claims") or []:
        for key in ("variant", "baseline"):
            if (claim.get(key) or study["baseline"]) not in variants:
                raise ConfigError(f"study config {path}: claim {claim['claim']!r} names {key} {claim.get(key)!r}, "
                                  f"which is not one of the variants {variants}")
        if claim.get("measure", "accuracy") not in ("accuracy", "transfer"):
            raise ConfigError(f"study config {path}: claim {claim['claim']!r} has measure={claim.get('measure')!r}: "
                              f"use accuracy or transfer")
        if claim.get("expect") not in ("better", "worse"):
            raise ConfigError(f"study config {path}: claim {claim['claim']!r} has expect={claim.get('expect')!r}: use "
                              f"better or worse")
        cell = (to_2tuple(claim.get("img_size") or study["train"]["img_size"]),
                to_2tuple(claim.get("window_size") or study["train"]["window_size"]))
        if cell not in cells:
            raise ConfigError(f"study config {path}: claim {claim['claim']!r} is about img_size {cell[0][0]} / window "
                              f"{cell[1][0]}, which the study does not evaluate: use one of its eval sizes")
        if claim.get("finetuned") and not study.get("finetune"):
            raise ConfigError(f"study config {path}: claim {claim['claim']!r} is about the fine-tuned model but the "
                              f"study has no 'finetune:' section")


def _variant_model(study: Dict[str, Any], variant: str) -> Tuple[str, Dict[str, Any], Optional[str]]:
    spec = dict(study["variants"][variant] or {})
    name = spec.pop("model_name", study["model"].get("model_name"))
    ckpt = spec.pop("checkpoint", None)
    kwargs = {**dict(study["model"].get("model_kwargs") or {}), **spec}
    return name, kwargs, ckpt


def check_study(study: Dict[str, Any]) -> None:
    """Every (img_size, window) must tile the first stage's token grid exactly: checked before any training."""
    for variant in study["variants"]:
        name, kwargs, _ = _variant_model(study, variant)
        from ..models import get_variant
        patch = kwargs.get("patch_size", get_variant(name).config.patch_size)
        sizes = [("train", study["train"])] + [(f"eval #{i + 1}", e) for i, e in enumerate(study["eval"])]
        for what, spec in sizes:
            if spec.get("img_size") is None or spec.get("window_size") is None:
                raise ConfigError(f"{what} size of study {study['study']} needs img_size and window_size")
            img, win = to_2tuple(spec["img_size"]), to_2tuple(spec["window_size"])
            if img[0] % patch or img[1] % patch:
                raise ConfigError(f"{what}: img_size {img[0]}x{img[1]} is not divisible by the patch size {patch} "
                                  f"of {name}: use a multiple of {patch}")
            grid = (img[0] // patch, img[1] // patch)
            if win[0] > grid[0] or win[1] > grid[1] or grid[0] % win[0] or grid[1] % win[1]:
                raise ConfigError(f"{what}: window {win[0]}x{win[1]} cannot tile the {grid[0]}x{grid[1]} token grid "
                                  f"of img_size {img[0]}x{img[1]} (patch {patch}): pick a window dividing "
                                  f"{grid[0]}, e.g. img_size {win[0] * patch * 4} for window {win[0]}")


def fit_config(study: Dict[str, Any], variant: str, img_size, window_size, finetune: bool = False) -> Dict[str, Any]:
    """One variant at one size as the sections of a ``python -m swinlab fit`` config (model, data, trainer): what
    ``_task``, ``make_data`` and ``_trainer`` build, written the way a training config writes it."""
    name, kwargs, _ = _variant_model(study, variant)
    args = {k: v for k, v in study["model"].items() if k not in ("model_name", "model_kwargs")}
    trainer = study["train"].get("trainer") or {}
    if finetune:
        args.update((study.get("finetune") or {}).get("model") or {})
        trainer = (study.get("finetune") or {}).get("trainer") or {}
    img, win = list(to_2tuple(img_size)), list(to_2tuple(window_size))
    data = copy.deepcopy(study["data"])
    data_args = dict(data.get("init_args") or {})
    data_args["img_size"] = img
    model_kwargs = {**kwargs, "img_size": img, "window_size": win}
    return {"model": {"class_path": TASK, "init_args": {**args, "model_name": name, "model_kwargs": model_kwargs}},
            "data": {"class_path": data.get("class_path") or DEFAULT_DATA, "init_args": data_args},
            "trainer": dict(trainer)}


@functools.lru_cache(maxsize=1)
def _fit_parser():
    return build_parser("fit")


def parse_fit_config(cfg: Dict[str, Any], study: Dict[str, Any], variant: str, stage: str):
    """``cfg`` (from :func:`fit_config`) through fit's parser: keys and types against the classes' signatures, defaults
    filled in (a jsonargparse Namespace). A bad setting raises ConfigError naming the study, the variant and the key."""
    from jsonargparse import ArgumentError

    try:
        return _fit_parser().parse_object(copy.deepcopy(cfg))
    except ArgumentError as exc:
        raise ConfigError(f"study {study.get('study')}, variant {variant} ({stage}): {parser_message(exc)}: a study's "
                          f"model: section takes {TASK}'s arguments, data: and trainer: what a training config takes "
                          f"(see `python -m swinlab fit --help`)") from None


def check_settings(study: Dict[str, Any]) -> None:
    """Every variant's model, data and trainer settings through fit's parser: at the train size, and with the
    fine-tune's overrides at the first eval size. Checked before any training."""
    train = study["train"]
    for variant in study["variants"]:
        parse_fit_config(fit_config(study, variant, train["img_size"], train["window_size"]), study, variant, "train")
        if study.get("finetune"):
            first = study["eval"][0]
            parse_fit_config(fit_config(study, variant, first["img_size"], first["window_size"], finetune=True),
                             study, variant, "finetune")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------

def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def make_data(study: Dict[str, Any], img_size, seed: int, variant: Optional[str] = None):
    """The study's data module at ``img_size``; a data class that takes a ``seed`` gets the run's seed unless the
    study fixes one (whether it takes one: its signature, as fit's parser reads it)."""
    variant = variant if variant is not None else next(iter(study["variants"]))
    cfg = fit_config(study, variant, img_size, study["train"]["window_size"])
    parsed = parse_fit_config(cfg, study, variant, "data")
    args = dict(cfg["data"]["init_args"])
    if "seed" in parsed.data.init_args:
        args.setdefault("seed", seed)
    dm = _import(cfg["data"]["class_path"])(**args)
    dm.setup("fit")
    return dm


@torch.no_grad()
def evaluate(model: torch.nn.Module, datamodule) -> Tuple[float, float, str]:
    """Top-1 / top-5 (%) over the validation split, and which images were right at top-1 (a '0'/'1' string in the
    split's order: what the paired intervals resample)."""
    model.eval()
    correct5 = total = 0
    right: List[torch.Tensor] = []
    for batch in datamodule.val_dataloader():
        x, y = batch[0], batch[1]
        logits = model(x)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        right.append(top[:, 0] == y)
        correct5 += (top == y[:, None]).any(dim=-1).sum().item()
        total += y.numel()
    hits = torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)
    bits = "".join("1" if h else "0" for h in hits.tolist())
    return 100.0 * int(hits.sum()) / max(total, 1), 100.0 * correct5 / max(total, 1), bits


def _trainer(trainer_args: Dict[str, Any], logger) -> Any:
    import lightning.pytorch as pl
    args = dict(accelerator="cpu", devices=1, precision="32-true", enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=5.0, log_every_n_steps=10)
    args.update(trainer_args or {})
    devices, nodes = args.get("devices", 1), args.get("num_nodes", 1)
    if devices not in (1, "1", [0]) or nodes not in (1, "1") or args.get("strategy") not in (None, "auto"):
        raise ConfigError(f"ablate trains every variant inside this one process, so a study's trainer takes no "
                          f"strategy, devices or num_nodes (got strategy={args.get('strategy')!r}, "
                          f"devices={devices!r}, num_nodes={nodes!r}): remove them and run several studies or seeds "
                          f"side by side instead")
    return pl.Trainer(logger=logger, **args)


def _task(study: Dict[str, Any], name: str, kwargs: Dict[str, Any], checkpoint: Optional[str],
          extra: Optional[Dict[str, Any]] = None):
    from ..tasks import ImageClassifier
    args = {k: v for k, v in study["model"].items() if k not in ("model_name", "model_kwargs")}
    args.update(extra or {})
    return ImageClassifier(model_name=name, model_kwargs=kwargs, checkpoint=checkpoint, **args)


def transfer(weights: str, name: str, img_size, window_size, **kwargs: Any) -> torch.nn.Module:
    """The trained weights at another size through the model's own transfer path; ``kwargs``: the variant's other
    model settings (switches, widths), as it was trained."""
    return create_model(name, checkpoint=weights, **{**kwargs, "img_size": img_size, "window_size": window_size})


# ----------------------------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------------------------

def study_sizes(study: Dict[str, Any]) -> List[Tuple[Tuple[int, int], Tuple[int, int], bool]]:
    """Every (img_size, window, fine-tuned) a unit evaluates, in order: the train size, then each eval size directly
    and (with a fine-tune section) after the fine-tune."""
    train = study["train"]
    finetune = study.get("finetune")
    return [(to_2tuple(train["img_size"]), to_2tuple(train["window_size"]), False)] + [
        (to_2tuple(e["img_size"]), to_2tuple(e["window_size"]), ft)
        for e in study["eval"] for ft in ((False, True) if finetune else (False,))]


def run_unit(study: Dict[str, Any], variant: str, seed: int, out: Path, log=print,
             started: Optional[float] = None) -> List[Dict[str, Any]]:
    """One variant with one seed: train at the train size (or take the given checkpoint), save the weights, then
    evaluate at every size of :func:`study_sizes`. Deterministic: everything random is seeded from ``seed``."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    started = time.perf_counter() if started is None else started
    rows: List[Dict[str, Any]] = []
    train = study["train"]
    t_img, t_win = to_2tuple(train["img_size"]), to_2tuple(train["window_size"])
    finetune = study.get("finetune")
    name, kwargs, given_ckpt = _variant_model(study, variant)
    pl.seed_everything(int(seed), workers=True, verbose=False)
    logger = TensorBoardLogger(save_dir=str(out / "tb"), name=variant, version=f"seed{seed}", default_hp_metric=False)
    weights = out / "weights" / f"{variant}_seed{seed}.safetensors"
    train_kwargs = {**kwargs, "img_size": list(t_img), "window_size": list(t_win)}
    if given_ckpt:
        model = create_model(name, checkpoint=given_ckpt, **train_kwargs)
        save_safetensors(model, weights, name)
    else:
        dm = make_data(study, t_img, int(seed), variant)
        task = _task(study, name, train_kwargs, None)
        _trainer(train.get("trainer", {}), logger).fit(task, datamodule=dm)
        save_safetensors(task.model, weights, name)
    for img, win, ft in study_sizes(study):
        dm = make_data(study, img, int(seed), variant)
        if not ft:
            model = transfer(str(weights), name, list(img), list(win), **kwargs)
        else:
            pl.seed_everything(int(seed), workers=True, verbose=False)
            ft_kwargs = {**kwargs, "img_size": list(img), "window_size": list(win)}
            task = _task(study, name, ft_kwargs, str(weights), finetune.get("model"))
            ft_logger = TensorBoardLogger(save_dir=str(out / "tb"), name=variant,
                                          version=f"seed{seed}_ft{img[0]}w{win[0]}", default_hp_metric=False)
            _trainer(finetune.get("trainer", {}), ft_logger).fit(task, datamodule=dm)
            model = task.model
        top1, top5, bits = evaluate(model, dm)
        rows.append(dict(study=study["study"], variant=variant, seed=seed, train_img_size=t_img[0],
                         train_window=t_win[0], eval_img_size=img[0], eval_window=win[0], finetuned=ft,
                         top1=round(top1, 3), top5=round(top5, 3), correct=bits))
        logger.experiment.add_scalar(f"ablate/top1_{'ft' if ft else 'direct'}_w{win[0]}", top1)
        log(f"[{time.perf_counter() - started:6.0f}s] {variant} seed {seed} {img[0]}/W{win[0]} "
            f"{'fine-tuned' if ft else 'direct    '} top1 {top1:.2f} top5 {top5:.2f}")
    logger.experiment.flush()
    return rows


#: what ``--plan`` assumes by default: an H100's dense bf16 peak and the fraction of it a Swin training run reaches
PEAK_TFLOPS = 989.0
MFU = 0.35


def _images(trainer: Dict[str, Any], dataset: int, batch: int) -> int:
    """Images a Trainer section sees: ``max_steps`` optimizer steps x batch x accumulation, else ``max_epochs`` x
    the data set."""
    steps = trainer.get("max_steps")
    if steps is not None and int(steps) > 0:
        return int(steps) * batch * int(trainer.get("accumulate_grad_batches") or 1)
    return int(trainer.get("max_epochs") or 1000) * dataset


def plan(study: Dict[str, Any], train_images: int, val_images: int, peak_tflops: float = PEAK_TFLOPS,
         mfu: float = MFU) -> Dict[str, Any]:
    """What a study costs before it runs: per variant, the training and fine-tune images, the analytic FLOPs
    (``swinlab.models.flops.model_macs`` x 2; x 3 for forward + backward) and the GPU-hours at ``peak_tflops`` x
    ``mfu``, for one seed and for all of the study's seeds."""
    from ..models.flops import model_macs
    batch = int((study["data"].get("init_args") or {}).get("batch_size") or 64)
    train = study["train"]
    finetune = study.get("finetune")
    rows = []
    for variant in study["variants"]:
        name, kwargs, given = _variant_model(study, variant)
        flops = 0.0
        images = 0
        macs: Dict[Tuple[Tuple[int, int], Tuple[int, int]], int] = {}
        for img, win, ft in study_sizes(study):
            if (img, win) not in macs:  # a size evaluated directly and after the fine-tune is built once
                with torch.device("meta"):
                    model = create_model(name, **{**kwargs, "img_size": list(img), "window_size": list(win)})
                macs[(img, win)] = model_macs(model)
            per_image = 2.0 * macs[(img, win)]
            flops += val_images * per_image  # every size is evaluated once
            if (img, win, ft) == study_sizes(study)[0] and not given:
                seen = _images(train.get("trainer") or {}, train_images, batch)
                flops += 3 * seen * per_image
                images += seen
            if ft:
                seen = _images(finetune.get("trainer") or {}, train_images, batch)
                flops += 3 * seen * per_image
                images += seen
        hours = flops / (peak_tflops * 1e12 * mfu) / 3600
        rows.append(dict(variant=variant, train_images=images, pflops=round(flops / 1e15, 1),
                         gpu_hours_per_seed=round(hours, 1), gpu_hours=round(hours * len(study["seeds"]), 1)))
    total = sum(r["gpu_hours"] for r in rows)
    return dict(study=study["study"], seeds=len(study["seeds"]), units=len(rows) * len(study["seeds"]),
                peak_tflops=peak_tflops, mfu=mfu, train_images_per_epoch=train_images, val_images=val_images,
                variants=rows, gpu_hours=round(total, 1))


def format_plan(p: Dict[str, Any]) -> str:
    lines = [f"| {p['study']} | images trained (per seed) | PFLOPs (per seed) | GPU-hours per seed | GPU-hours "
             f"({p['seeds']} seed(s)) |", "|---|---|---|---|---|"]
    for r in p["variants"]:
        lines.append(f"| {r['variant']} | {r['train_images']:,} | {r['pflops']:,} | {r['gpu_hours_per_seed']} | "
                     f"{r['gpu_hours']} |")
    lines.append(f"| **total** ({p['units']} units) | | | | **{p['gpu_hours']}** |")
    lines.append("")
    lines.append(f"Analytic FLOPs (multiply-adds x 2, x 3 when training) at {p['peak_tflops']:g} TFLOP/s x "
                 f"{p['mfu']:.0%} utilisation; {p['train_images_per_epoch']:,} training images an epoch, "
                 f"{p['val_images']:,} validation images per evaluation.")
    return "\n".join(lines)


def _claim_gpu(queue) -> None:
    """``--jobs`` worker start-up: take one GPU of the machine's (CUDA_VISIBLE_DEVICES), so each unit trains on its
    own GPU; without GPUs the queue is empty and nothing changes."""
    import queue as queues
    try:
        device = queue.get_nowait()
    except queues.Empty:  # no GPU left to claim
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = str(device)


def _unit_in_worker(study: Dict[str, Any], variant: str, seed: int, out: str, threads: Optional[int],
                    started: float) -> List[Dict[str, Any]]:
    """:func:`run_unit` in a worker process of ``--jobs`` (spawned: a fresh interpreter, its own torch threads)."""
    import warnings
    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(int(threads))
    return run_unit(study, variant, seed, Path(out), log=lambda line: print(line, flush=True), started=started)


def _unit_key(study: Dict[str, Any]):
    variants, seeds = list(study["variants"]), list(study["seeds"])
    sizes = [(img[0], win[0], ft) for img, win, ft in study_sizes(study)]
    return lambda r: (variants.index(r["variant"]), seeds.index(r["seed"]),
                      sizes.index((r["eval_img_size"], r["eval_window"], r["finetuned"])))


def run_study(study: Dict[str, Any], out: Path, log=print, jobs: int = 1, threads: Optional[int] = None,
              provenance: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Every (variant, seed) unit, one after another or ``jobs`` at a time in worker processes; the results files
    are rewritten after each unit (partial results survive an interrupted study) and the rows are in study order
    whatever order the units finish in."""
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    started = time.perf_counter()
    units = [(variant, seed) for variant in study["variants"] for seed in study["seeds"]]
    key = _unit_key(study)

    def done(unit_rows: List[Dict[str, Any]]) -> None:
        rows.extend(unit_rows)
        rows.sort(key=key)
        write_outputs(study, rows, out, provenance=provenance)

    if jobs <= 1:
        for variant, seed in units:
            done(run_unit(study, variant, seed, out, log=log, started=started))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        ctx = multiprocessing.get_context("spawn")
        gpus = ctx.Queue()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d for d in visible.split(",") if d.strip()] if visible else list(range(torch.cuda.device_count()))
        for device in ids[:jobs]:
            gpus.put(device)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_claim_gpu,
                                 initargs=(gpus,)) as pool:
            futures = [pool.submit(_unit_in_worker, study, variant, seed, str(out), threads, started)
                       for variant, seed in units]
            for future in as_completed(futures):
                done(future.result())
    if provenance is not None:
        provenance["minutes"] = round((time.perf_counter() - started) / 60, 2)
    write_outputs(study, rows, out, plot=True, provenance=provenance)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------

def _cells(study: Dict[str, Any]) -> List[Tuple[int, int, bool]]:
    """The table's cells in column order: (img, window, fine-tuned) as the rows store them."""
    return [(img[0], win[0], ft) for img, win, ft in study_sizes(study)]


def _header(study: Dict[str, Any], cell: Tuple[int, int, bool], train: bool = False) -> str:
    img, win, ft = cell
    return f"W{win}, I{img}" + (" (train)" if train else (" ft" if ft else " direct" if study.get("finetune") else ""))


def cell_matrix(rows: List[Dict[str, Any]], variant: str, cell: Tuple[int, int, bool],
                seeds: Optional[List[int]] = None) -> Optional[torch.Tensor]:
    """(seeds, images) right/wrong of one variant in one cell, seeds in ``seeds`` order (None if any is missing)."""
    from .study_stats import correct_matrix
    by_seed = {r["seed"]: r["correct"] for r in rows if r["variant"] == variant
               and (r["eval_img_size"], r["eval_window"], r["finetuned"]) == cell}
    seeds = sorted(by_seed) if seeds is None else seeds
    if not seeds or any(s not in by_seed for s in seeds):
        return None
    return correct_matrix([by_seed[s] for s in seeds])


def claim_cell(study: Dict[str, Any], claim: Dict[str, Any]) -> Tuple[int, int, bool]:
    img = to_2tuple(claim.get("img_size") or study["train"]["img_size"])[0]
    win = to_2tuple(claim.get("window_size") or study["train"]["window_size"])[0]
    return img, win, bool(claim.get("finetuned"))


def _shared_seeds(rows: List[Dict[str, Any]], *variants: str) -> List[int]:
    seen = [{r["seed"] for r in rows if r["variant"] == v} for v in variants]
    return sorted(set.intersection(*seen)) if seen else []


def summarise(study: Dict[str, Any], rows: List[Dict[str, Any]],
              provenance: Optional[Dict[str, Any]] = None) -> str:
    """results.md: the accuracy table (mean and 95% interval over seeds and images), the paired differences against
    the baseline, the paper claims' verdicts, and where the numbers come from."""
    from .study_stats import LEVEL, bootstrap, verdict
    cells = _cells(study)
    base = study.get("baseline") or next(iter(study["variants"]))
    seeds = sorted({r["seed"] for r in rows})
    pct = f"{LEVEL:.0%}"
    lines = [f"**Study `{study['study']}`**", ""]  # not a heading: results.md is also embedded in docs
    if provenance:
        lines += [provenance_line(provenance), ""]
    head = [_header(study, c, train=(k == 0)) for k, c in enumerate(cells)]
    lines += [f"Top-1 (%) on the validation split: mean over seeds {seeds} [{pct} interval, bootstrap over seeds and "
              f"images]. direct = trained weights moved to the new size without training, ft = after the short "
              f"fine-tune.", "",
              f"| {study['study']} | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    paper = study.get("paper") or {}
    for variant in study["variants"]:
        cols = []
        for cell in cells:
            m = cell_matrix(rows, variant, cell)
            cols.append("–" if m is None else bootstrap(m).format())
        lines.append(f"| {variant} | " + " | ".join(cols) + " |")
        if variant in paper:
            lines.append(f"| {variant} (paper) | " + " | ".join(str(c) for c in paper[variant]) + " |")
    if len(cells) > 1:
        lines += ["", f"Change from the train window (points; the same images, seed by seed; {pct} interval): what "
                      f"moving the trained weights to another size costs each variant.", "",
                  "| change from " + head[0] + " | " + " | ".join(head[1:]) + " |", "|---" * len(head) + "|"]
        for variant in study["variants"]:
            cols = []
            train = cell_matrix(rows, variant, cells[0])
            for cell in cells[1:]:
                m = cell_matrix(rows, variant, cell)
                cols.append("–" if m is None or train is None else bootstrap(m - train).format(signed=True))
            lines.append(f"| {variant} | " + " | ".join(cols) + " |")
    others = [v for v in study["variants"] if v != base]
    if others:
        lines += ["", f"Paired difference against **{base}** (points; the same seeds and the same images; {pct} "
                      f"interval; the mean in standard errors):", "",
                  "| variant − " + base + " | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for variant in others:
            shared = _shared_seeds(rows, variant, base)
            cols = []
            for cell in cells:
                a, b = cell_matrix(rows, variant, cell, shared), cell_matrix(rows, base, cell, shared)
                if a is None or b is None:
                    cols.append("–")
                    continue
                d = bootstrap(a - b)
                cols.append(f"{d.format(signed=True)} ({d.z:+.1f} SE)")
            lines.append(f"| {variant} | " + " | ".join(cols) + " |")
    claims = study.get("claims") or []
    if claims:
        lines += ["", "Paper claims, judged by the runner: reproduced when the whole interval of the difference lies "
                      "on the claimed side of 0, contradicted when it lies wholly on the other side, else not resolved "
                      "at this power.", "", "| claim | comparison | difference | verdict |", "|---|---|---|---|"]
        for claim in claims:
            variant, against = claim["variant"], claim.get("baseline") or base
            cell = claim_cell(study, claim)
            shared = _shared_seeds(rows, variant, against)
            a, b = cell_matrix(rows, variant, cell, shared), cell_matrix(rows, against, cell, shared)
            sign = ">" if claim["expect"] == "better" else "<"
            transfer = claim.get("measure", "accuracy") == "transfer"
            if transfer:
                what = f"change {cells[0][0]}/W{cells[0][1]} → {_header(study, cell)}: {variant} {sign} {against}"
                a0, b0 = cell_matrix(rows, variant, cells[0], shared), cell_matrix(rows, against, cells[0], shared)
                a = None if a is None or a0 is None else a - a0
                b = None if b is None or b0 is None else b - b0
            else:
                what = f"{variant} {sign} {against} at {_header(study, cell)}"
            if a is None or b is None:
                lines.append(f"| {claim['claim']} | {what} | – | not run |")
                continue
            d = bootstrap(a - b)
            lines.append(f"| {claim['claim']} | {what} | {d.format(signed=True)} ({d.z:+.1f} SE) | "
                         f"**{verdict(d, claim['expect'])}** |")
    return "\n".join(lines)


def provenance(argv: List[str], jobs: int, threads: Optional[int]) -> Dict[str, Any]:
    """Where a study's numbers come from: the git commit of the checkout (and whether it had changes), the package
    versions, the exact command, the machine's cores and the process/thread counts."""
    import datetime
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {}
    for package in ("swinlab", "torch", "lightning", "timm"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    commit = git("rev-parse", "--short=10", "HEAD") or "unknown (not a git checkout)"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "swinlab", "experiments"))
    return {"commit": commit + (" + uncommitted changes" if dirty else ""), "versions": versions,
            "python": platform.python_version(), "command": "python -m swinlab ablate " + " ".join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(), "jobs": jobs, "threads": threads}


def provenance_line(p: Dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items())
    took = f", {p['minutes']} min" if p.get("minutes") is not None else ""
    return (f"Made by `{p['command']}` at commit {p['commit']} on {p['date']} ({versions}; Python {p['python']}; "
            f"{p['cpus']} CPUs, {p['jobs']} job(s) x {p['threads'] or 'default'} thread(s){took}).")


def plot_points(study: Dict[str, Any], rows: List[Dict[str, Any]], finetuned: bool = False
                ) -> Tuple[List[str], Dict[str, Tuple[List[float], List[float], List[float]]]]:
    """What ``results.png`` draws: the x tick labels (one per evaluated (image, window), the train size first) and per
    variant the x positions, the mean top-1 over seeds and its standard deviation. With one image size the x position
    is the window; with several (the coupled protocol) it is the cell's index, so that two sizes evaluated at the
    same window are never averaged into one point."""
    cells = _cells(study)
    t_img, t_win = cells[0][:2]
    sizes = list(dict.fromkeys((img, win) for img, win, _ in cells))
    numeric = len({img for img, _ in sizes}) == 1
    labels = [f"W{win}" if numeric else f"{img}/W{win}" for img, win in sizes]
    points = {}
    for variant in study["variants"]:
        xs, ys, es = [], [], []
        for k, (img, win) in enumerate(sizes):
            train = (img, win) == (t_img, t_win)
            vals = [r["top1"] for r in rows if r["variant"] == variant and r["eval_img_size"] == img
                    and r["eval_window"] == win and (r["finetuned"] == finetuned or train)]
            if vals:
                xs.append(float(win if numeric else k))
                ys.append(statistics.fmean(vals))
                es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        points[variant] = (xs, ys, es)
    return labels, points


def plot_results(study: Dict[str, Any], rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [False, True] if study.get("finetune") else [False]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    t_img, t_win = _cells(study)[0][:2]
    for ax, ft in zip(axes[0], modes):
        labels, points = plot_points(study, rows, ft)
        for variant, (xs, ys, es) in points.items():
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=variant)
        ax.set_title(f"{study['study']}: {'after fine-tune' if ft else 'without fine-tune'}")
        if labels[0].startswith("W"):
            ax.set_xlabel(f"eval window (train window {t_win}, {t_img} px)")
        else:
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel(f"eval image px / window (train {t_img}/W{t_win})")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rank_zero() -> bool:
    """Under a multi-GPU study (DDP re-launches this command per rank) only rank 0 writes the results."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def write_outputs(study: Dict[str, Any], rows: List[Dict[str, Any]], out: Path, plot: bool = False,
                  provenance: Optional[Dict[str, Any]] = None) -> None:
    """results.csv (a row per unit and size), results_images.csv (which validation images each row got right: what
    the intervals are computed from), results.md, provenance.json and, at the end, results.png. Each file is written
    whole to a temporary name and renamed over the old one."""
    if not _rank_zero():
        return

    def atomic(name: str, text: str) -> None:
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)

    import io
    for name, fields in (("results.csv", CSV_FIELDS), ("results_images.csv", IMAGE_FIELDS)):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in fields})
        atomic(name, buf.getvalue())
    atomic("results.md", summarise(study, rows, provenance) + "\n")
    if provenance is not None:
        atomic("provenance.json", json.dumps(provenance, indent=1) + "\n")
    if plot and rows:
        plot_results(study, rows, out / "results.png")


def read_rows(folder: Path) -> List[Dict[str, Any]]:
    """A study's rows back from results.csv and results_images.csv (typed as the runner makes them)."""
    images = {}
    with (folder / "results_images.csv").open() as f:
        for r in csv.DictReader(f):
            images[(r["variant"], r["seed"], r["eval_img_size"], r["eval_window"], r["finetuned"])] = r["correct"]
    rows = []
    with (folder / "results.csv").open() as f:
        for r in csv.DictReader(f):
            key = (r["variant"], r["seed"], r["eval_img_size"], r["eval_window"], r["finetuned"])
            rows.append(dict(r, seed=int(r["seed"]), train_img_size=int(r["train_img_size"]),
                             train_window=int(r["train_window"]), eval_img_size=int(r["eval_img_size"]),
                             eval_window=int(r["eval_window"]), finetuned=r["finetuned"] == "True",
                             top1=float(r["top1"]), top5=float(r["top5"]), correct=images.get(key, "")))
    return rows


def planned_outputs(study: Dict[str, Any], out: Path) -> List[Path]:
    """What a study writes under ``out``: the results files, each variant's weights per seed and its TensorBoard
    folders (the training run and one per fine-tune size)."""
    paths = [out / name for name in ("results.csv", "results_images.csv", "results.md", "results.png",
                                      "provenance.json")]
    evals = [(to_2tuple(e["img_size"])[0], to_2tuple(e["window_size"])[0]) for e in study["eval"]]
    for variant in study["variants"]:
        for seed in study["seeds"]:
            paths.append(out / "weights" / f"{variant}_seed{seed}.safetensors")
            paths.append(out / "tb" / variant / f"seed{seed}")
            if study.get("finetune"):
                paths += [out / "tb" / variant / f"seed{seed}_ft{img}w{win}" for img, win in evals]
    return paths


def check_out(study: Dict[str, Any], out: Path, overwrite: bool) -> None:
    """``--out`` must be a folder (or not exist yet), and without ``--overwrite`` hold none of the files the study
    writes: one ConfigError line naming the first one found, before any training."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"--out {out}: {folder} is a file, not a folder: give a folder for the results")
            break
    if overwrite:
        return
    existing = [p for p in planned_outputs(study, out) if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ConfigError(f"--out {out} already holds {existing[0]}{more} from an earlier study: pass --overwrite to "
                          f"replace those results, or give another --out")


def main(argv: Optional[List[str]] = None) -> int:
    from jsonargparse import ArgumentParser

    argv = list(argv or [])
    if argv and argv[0] == "ablate":
        argv = argv[1:]
    parser = ArgumentParser(prog="python -m swinlab ablate", description=__doc__.split("\n\n")[0],
                            exit_on_error=False)
    parser.add_argument("--config", type=str, required=True, help="study yaml (experiments/ablations/*.yaml)")
    parser.add_argument("--out", type=Optional[str], default=None,
                        help="output folder (default: runs/ablations/<study>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the study's seeds")
    parser.add_argument("--variants", type=str, nargs="+", default=None,
                        help="run only these of the study's variants (e.g. to rerun one and compare)")
    parser.add_argument("--finetune", type=bool, default=True,
                        help="false: skip the fine-tunes (the direct rows are the same as with them)")
    parser.add_argument("--threads", type=Optional[int], default=None,
                        help="torch.set_num_threads per process (default: the study's 'threads:', else torch's "
                             "choice)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="units (variant x seed) trained at a time, each in its own process (e.g. the CPU count "
                             "with threads: 1); the results do not depend on it")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace the results, weights and TensorBoard runs an earlier study left in --out "
                             "(refused otherwise)")
    parser.add_argument("--report", type=Optional[str], default=None,
                        help="rewrite results.md (and results.png) in this finished study's folder from its rows and "
                             "the study file's current claims and baseline, and train nothing")
    parser.add_argument("--plan", action="store_true",
                        help="print what the study costs (images, FLOPs, GPU-hours) as JSON and markdown, and run "
                             "nothing")
    parser.add_argument("--train-images", type=Optional[int], default=None,
                        help="--plan: training images an epoch (default: the data module's, when it can be read)")
    parser.add_argument("--val-images", type=Optional[int], default=None,
                        help="--plan: validation images (default: the data module's, when it can be read)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="--plan: the GPU's peak TFLOP/s")
    parser.add_argument("--mfu", type=float, default=MFU, help="--plan: the fraction of the peak a run reaches")
    args = parse_config(parser, argv, "ablate")
    study = load_study(args.config)
    threads = args.threads or study.get("threads")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} must be >= 1 (units trained at a time)")
    if threads:
        torch.set_num_threads(int(threads))
    if args.seeds:
        study["seeds"] = args.seeds
    if args.variants:
        unknown = [v for v in args.variants if v not in study["variants"]]
        if unknown:
            raise ConfigError(f"--variants {' '.join(unknown)}: not in study {study['study']} (it has "
                              f"{', '.join(study['variants'])})")
        study["variants"] = {v: study["variants"][v] for v in args.variants}
        if study["baseline"] not in study["variants"]:
            study["baseline"] = args.variants[0]
    if not args.finetune:
        study["finetune"] = None
        study["claims"] = [c for c in study.get("claims") or [] if not c.get("finetuned")]
    if args.report:
        folder = Path(args.report)
        if not (folder / "results.csv").is_file() or not (folder / "results_images.csv").is_file():
            raise ConfigError(f"--report {folder}: no results.csv and results_images.csv there: give the --out folder "
                              f"of a finished study")
        rows = read_rows(folder)
        prov_path = folder / "provenance.json"
        prov = json.loads(prov_path.read_text()) if prov_path.is_file() else None
        write_outputs(study, rows, folder, plot=True, provenance=prov)
        print(summarise(study, rows, prov))
        return 0
    if args.plan:
        train_images, val_images = args.train_images, args.val_images
        if train_images is None or val_images is None:
            try:
                dm = make_data(study, to_2tuple(study["train"]["img_size"]), 0)
            except ConfigError as exc:
                raise ConfigError(f"--plan cannot count the study's images ({exc}): give --train-images and "
                                  f"--val-images") from None
            train_images = train_images if train_images is not None else len(dm.train_set)
            val_images = val_images if val_images is not None else len(dm.val_set)
        cost = plan(study, int(train_images), int(val_images), args.peak_tflops, args.mfu)
        print(json.dumps(cost))
        print(format_plan(cost))
        return 0
    out = Path(args.out or Path("runs") / "ablations" / study["study"])
    check_out(study, out, args.overwrite)
    started = time.perf_counter()
    rows = run_study(study, out, jobs=args.jobs, threads=threads, provenance=provenance(argv, args.jobs, threads))
    print(summarise(study, rows))
    print(json.dumps(dict(out=str(out), rows=len(rows), minutes=round((time.perf_counter() - started) / 60, 2))))
    if any(not math.isfinite(r["top1"]) for r in rows):
        return 1
    return 0
