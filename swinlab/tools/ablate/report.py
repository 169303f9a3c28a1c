"""A study's outputs: results.csv (a row per unit and cell), results_images.csv (which validation images each row got
right: what the intervals resample), results.md (accuracy with bootstrap intervals, the change from the train window,
paired differences against the baseline, the paper claims' verdicts, provenance), provenance.json and results.png."""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .schema import Study

CSV_FIELDS = ["study", "variant", "seed", "train_img_size", "train_window", "eval_img_size", "eval_window",
              "finetuned", "top1", "top5"]
IMAGE_FIELDS = ["variant", "seed", "eval_img_size", "eval_window", "finetuned", "correct"]
RESULT_FILES = ("results.csv", "results_images.csv", "results.md", "results.png", "provenance.json")
CellKey = Tuple[int, int, bool]  # (eval_img_size, eval_window, finetuned): a cell as the rows store it


def _cells(study: Study) -> List[CellKey]:
    """The table's cells in column order."""
    return [c.key for c in study.cells()]


def _header(study: Study, cell: CellKey, train: bool = False) -> str:
    img, win, ft = cell
    return f"W{win}, I{img}" + (" (train)" if train else (" ft" if ft else " direct" if study.finetune else ""))


def cell_matrix(rows: List[Dict[str, Any]], variant: str, cell: CellKey,
                seeds: Optional[List[int]] = None) -> Optional[torch.Tensor]:
    """(seeds, images) right/wrong of one variant in one cell, seeds in ``seeds`` order (None if any is missing)."""
    from ..study_stats import correct_matrix
    by_seed = {r["seed"]: r["correct"] for r in rows if r["variant"] == variant
               and (r["eval_img_size"], r["eval_window"], r["finetuned"]) == cell}
    seeds = sorted(by_seed) if seeds is None else seeds
    if not seeds or any(s not in by_seed for s in seeds):
        return None
    return correct_matrix([by_seed[s] for s in seeds])


def _shared_seeds(rows: List[Dict[str, Any]], *variants: str) -> List[int]:
    seen = [{r["seed"] for r in rows if r["variant"] == v} for v in variants]
    return sorted(set.intersection(*seen)) if seen else []


def summarise(study: Study, rows: List[Dict[str, Any]],
              provenance: Optional[Dict[str, Any]] = None) -> str:
    """results.md: the accuracy table (mean and 95% interval over seeds and images), the paired differences against
    the baseline, the paper claims' verdicts, and where the numbers come from."""
    from ..study_stats import LEVEL, bootstrap, verdict
    cells = _cells(study)
    base = study.baseline or study.variant_names[0]
    seeds = sorted({r["seed"] for r in rows})
    pct = f"{LEVEL:.0%}"
    lines = [f"**Study `{study.name}`**", ""]  # not a heading: results.md is also embedded in docs
    if provenance:
        lines += [provenance_line(provenance), ""]
    head = [_header(study, c, train=(k == 0)) for k, c in enumerate(cells)]
    lines += [f"Top-1 (%) on the validation split: mean over seeds {seeds} [{pct} interval, bootstrap over seeds and "
              f"images]. direct = trained weights moved to the new size without training, ft = after the short "
              f"fine-tune.", "",
              f"| {study.name} | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    paper = study.paper or {}
    for variant in study.variant_names:
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
        for variant in study.variant_names:
            cols = []
            train = cell_matrix(rows, variant, cells[0])
            for cell in cells[1:]:
                m = cell_matrix(rows, variant, cell)
                cols.append("–" if m is None or train is None else bootstrap(m - train).format(signed=True))
            lines.append(f"| {variant} | " + " | ".join(cols) + " |")
    others = [v for v in study.variant_names if v != base]
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
    claims = study.claims
    if claims:
        lines += ["", "Paper claims, judged by the runner: reproduced when the whole interval of the difference lies "
                      "on the claimed side of 0, contradicted when it lies wholly on the other side, else not resolved "
                      "at this power.", "", "| claim | comparison | difference | verdict |", "|---|---|---|---|"]
        for claim in claims:
            variant, against = claim.variant, claim.baseline or base
            cell = study.claim_cell(claim).key
            shared = _shared_seeds(rows, variant, against)
            a, b = cell_matrix(rows, variant, cell, shared), cell_matrix(rows, against, cell, shared)
            sign = ">" if claim.expect == "better" else "<"
            transfer = claim.measure == "transfer"
            if transfer:
                what = f"change {cells[0][0]}/W{cells[0][1]} → {_header(study, cell)}: {variant} {sign} {against}"
                a0, b0 = cell_matrix(rows, variant, cells[0], shared), cell_matrix(rows, against, cells[0], shared)
                a = None if a is None or a0 is None else a - a0
                b = None if b is None or b0 is None else b - b0
            else:
                what = f"{variant} {sign} {against} at {_header(study, cell)}"
            if a is None or b is None:
                lines.append(f"| {claim.claim} | {what} | – | not run |")
                continue
            d = bootstrap(a - b)
            lines.append(f"| {claim.claim} | {what} | {d.format(signed=True)} ({d.z:+.1f} SE) | "
                         f"**{verdict(d, claim.expect)}** |")
    return "\n".join(lines)


def provenance(argv: List[str], jobs: int, threads: Optional[int]) -> Dict[str, Any]:
    """Where a study's numbers come from: the git commit of the checkout (and whether it had changes), the package
    versions, the exact command, the machine's cores and the process/thread counts."""
    import datetime
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[3]

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


def plot_points(study: Study, rows: List[Dict[str, Any]], finetuned: bool = False
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
    for variant in study.variant_names:
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


def plot_results(study: Study, rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [False, True] if study.finetune else [False]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    t_img, t_win = _cells(study)[0][:2]
    for ax, ft in zip(axes[0], modes):
        labels, points = plot_points(study, rows, ft)
        for variant, (xs, ys, es) in points.items():
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=variant)
        ax.set_title(f"{study.name}: {'after fine-tune' if ft else 'without fine-tune'}")
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


def write_outputs(study: Study, rows: List[Dict[str, Any]], out: Path, plot: bool = False,
                  provenance: Optional[Dict[str, Any]] = None) -> None:
    """results.csv (a row per unit and size), results_images.csv (which validation images each row got right: what
    the intervals are computed from), results.md, provenance.json and, at the end, results.png. Each file is written
    whole to a temporary name and renamed over the old one."""
    def atomic(name: str, text: str) -> None:
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)

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

