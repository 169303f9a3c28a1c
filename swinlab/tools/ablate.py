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
    check_study(study)
    check_settings(study)
    return study


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
def evaluate(model: torch.nn.Module, datamodule) -> Tuple[float, float]:
    """Top-1 / top-5 (%) over the validation split."""
    model.eval()
    correct1 = correct5 = total = 0
    for batch in datamodule.val_dataloader():
        x, y = batch[0], batch[1]
        logits = model(x)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=-1).sum().item()
        total += y.numel()
    return 100.0 * correct1 / max(total, 1), 100.0 * correct5 / max(total, 1)


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


def transfer(weights: str, name: str, img_size, window_size) -> torch.nn.Module:
    """The trained weights at another size through the model's own transfer path."""
    return create_model(name, checkpoint=weights, img_size=img_size, window_size=window_size)


# ----------------------------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------------------------

def run_study(study: Dict[str, Any], out: Path, log=print) -> List[Dict[str, Any]]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    train = study["train"]
    t_img, t_win = to_2tuple(train["img_size"]), to_2tuple(train["window_size"])
    finetune = study.get("finetune")
    started = time.perf_counter()
    for variant in study["variants"]:
        name, kwargs, given_ckpt = _variant_model(study, variant)
        for seed in study["seeds"]:
            pl.seed_everything(int(seed), workers=True)
            logger = TensorBoardLogger(save_dir=str(out / "tb"), name=variant, version=f"seed{seed}",
                                       default_hp_metric=False)
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
            sizes = [(t_img, t_win, False)] + [(to_2tuple(e["img_size"]), to_2tuple(e["window_size"]), ft)
                                                for e in study["eval"] for ft in ((False, True) if finetune else
                                                                                  (False,))]
            for img, win, ft in sizes:
                dm = make_data(study, img, int(seed), variant)
                if not ft:
                    model = transfer(str(weights), name, list(img), list(win))
                else:
                    pl.seed_everything(int(seed), workers=True)
                    ft_kwargs = {**kwargs, "img_size": list(img), "window_size": list(win)}
                    task = _task(study, name, ft_kwargs, str(weights), finetune.get("model"))
                    ft_logger = TensorBoardLogger(save_dir=str(out / "tb"), name=variant,
                                                  version=f"seed{seed}_ft{img[0]}w{win[0]}", default_hp_metric=False)
                    _trainer(finetune.get("trainer", {}), ft_logger).fit(task, datamodule=dm)
                    model = task.model
                top1, top5 = evaluate(model, dm)
                row = dict(study=study["study"], variant=variant, seed=seed, train_img_size=t_img[0],
                           train_window=t_win[0], eval_img_size=img[0], eval_window=win[0], finetuned=ft,
                           top1=round(top1, 3), top5=round(top5, 3))
                rows.append(row)
                logger.experiment.add_scalar(f"ablate/top1_{'ft' if ft else 'direct'}_w{win[0]}", top1)
                log(f"[{time.perf_counter() - started:6.0f}s] {variant} seed {seed} {img[0]}/W{win[0]} "
                    f"{'fine-tuned' if ft else 'direct    '} top1 {top1:.2f} top5 {top5:.2f}")
            logger.experiment.flush()
            write_outputs(study, rows, out)  # partial results survive an interrupted study
    write_outputs(study, rows, out, plot=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------

def _stats(values: List[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def summarise(study: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    train = study["train"]
    t_img, t_win = to_2tuple(train["img_size"]), to_2tuple(train["window_size"])
    evals = [(to_2tuple(e["img_size"])[0], to_2tuple(e["window_size"])[0]) for e in study["eval"]]
    has_ft = bool(study.get("finetune"))
    head = [f"W{t_win[0]}, I{t_img[0]} (train)"] + [f"W{w}, I{i}" + (" (direct / ft)" if has_ft else "")
                                                       for i, w in evals]
    lines = [f"| {study['study']} | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    seeds = sorted({r["seed"] for r in rows})
    paper = study.get("paper") or {}
    for variant in study["variants"]:
        vr = [r for r in rows if r["variant"] == variant]

        def cell(img, win, ft, vr=vr):
            return _stats([r["top1"] for r in vr if r["eval_img_size"] == img and r["eval_window"] == win
                           and r["finetuned"] == ft])

        cells = [cell(t_img[0], t_win[0], False)]
        for img, win in evals:
            cells.append(f"{cell(img, win, False)} / {cell(img, win, True)}" if has_ft else cell(img, win, False))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        if variant in paper:
            lines.append(f"| {variant} (paper) | " + " | ".join(str(c) for c in paper[variant]) + " |")
    lines.append("")
    lines.append(f"top-1 (%) on the validation split, mean ± std over {len(seeds)} seed(s) {seeds}; "
                 f"direct = trained weights moved to the new size without training, ft = after the short fine-tune.")
    return "\n".join(lines)


def plot_results(study: Dict[str, Any], rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [False, True] if study.get("finetune") else [False]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    t_win = to_2tuple(study["train"]["window_size"])[0]
    for ax, ft in zip(axes[0], modes):
        for variant in study["variants"]:
            wins = sorted({r["eval_window"] for r in rows if r["variant"] == variant})
            xs, ys, es = [], [], []
            for w in wins:
                vals = [r["top1"] for r in rows if r["variant"] == variant and r["eval_window"] == w
                        and (r["finetuned"] == ft or w == t_win)]
                if vals:
                    xs.append(w)
                    ys.append(statistics.fmean(vals))
                    es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=variant)
        ax.set_title(f"{study['study']}: {'after fine-tune' if ft else 'without fine-tune'}")
        ax.set_xlabel(f"eval window (train window {t_win})")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rank_zero() -> bool:
    """Under a multi-GPU study (DDP re-launches this command per rank) only rank 0 writes the results."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def write_outputs(study: Dict[str, Any], rows: List[Dict[str, Any]], out: Path, plot: bool = False) -> None:
    if not _rank_zero():
        return
    tmp = out / "results.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in CSV_FIELDS})
    tmp.replace(out / "results.csv")
    (out / "results.md").write_text(summarise(study, rows) + "\n")
    if plot and rows:
        plot_results(study, rows, out / "results.png")


def planned_outputs(study: Dict[str, Any], out: Path) -> List[Path]:
    """What a study writes under ``out``: the results files, each variant's weights per seed and its TensorBoard
    folders (the training run and one per fine-tune size)."""
    paths = [out / "results.csv", out / "results.md", out / "results.png"]
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
    parser.add_argument("--threads", type=Optional[int], default=None,
                        help="torch.set_num_threads (default: the study's 'threads:', else torch's choice)")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace the results, weights and TensorBoard runs an earlier study left in --out "
                             "(refused otherwise)")
    args = parse_config(parser, argv, "ablate")
    study = load_study(args.config)
    threads = args.threads or study.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    if args.seeds:
        study["seeds"] = args.seeds
    out = Path(args.out or Path("runs") / "ablations" / study["study"])
    check_out(study, out, args.overwrite)
    started = time.perf_counter()
    rows = run_study(study, out)
    print(summarise(study, rows))
    print(json.dumps(dict(out=str(out), rows=len(rows), minutes=round((time.perf_counter() - started) / 60, 2))))
    if any(not math.isfinite(r["top1"]) for r in rows):
        return 1
    return 0
