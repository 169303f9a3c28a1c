"""``python -m swinlab signal``: SwinV2's Figure 2 (signal propagation) on the digits, across the depths of T to G.

SwinV2 (sec. 3.2) replaced pre-norm with res-post-norm because, scaled up, pre-norm's residual stream grows with depth
(a 10^4 spread between its largest and smallest per-layer amplitudes) and the largest models crashed in training.
This study measures that spread on CPU-sized models whose stage depths are those of SwinV2-T, S, B, L, H and G
(stage 3 holds 6, 18, 18, 18, 18 and 42 blocks; S, B, L and H share the depths (2, 2, 18, 2), so at one narrow width
they are one model, run once), with pre-norm and res-post-norm, each with dot-product and scaled cosine attention.

Every unit (section, size, variant, seed) builds the model from ``swinv2_pico_patch2_window4_32`` with the depths
and the two switches changed (``swinlab.create_model`` overrides ``depths``, ``norm_placement``, ``attention``),
measures the per-block RMS of the residual stream on a fixed batch of validation digits (:class:`SignalProbe`, the
instrument every training run logs with), trains a fixed number of AdamW steps through Lightning
(``ImageClassifier`` on ``DigitsDataModule``, :class:`SignalMonitor` logging every step), and measures again.

Sections:

- ``depth``: all sizes and variants at a moderate learning rate, several seeds: the spread at initialisation and
  after training;
- ``failure``: the deepest model (G's depths) at an aggressive learning rate, pre-norm against res-post-norm with
  dot attention: the loss and the spread step by step.

The claims are judged from bootstrap intervals over seeds (``swinlab.tools.study_stats``) of paired differences
(the same seed: the same initial weights of the shared parts and the same batches). Amplitude spreads are compared
as log10, so a difference is a ratio.

``--out DIR`` writes ``results.csv`` (a row per unit and phase), ``results_steps.csv`` (loss and spread per training
step), ``results.md``, ``results.png`` and ``provenance.json``; ``--report DIR`` rewrites ``results.md`` and
``results.png`` from a finished study's rows; ``--sizes``, ``--variants``, ``--seeds`` and ``--sections`` run a part.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError
from .study_stats import Interval, bootstrap, verdict

BASE_MODEL = "swinv2_pico_patch2_window4_32"
# stage depths of the SwinV2 sizes (swin-facts sec. 1); S, B, L and H share theirs
SIZE_DEPTHS: Dict[str, Tuple[int, ...]] = {"T": (2, 2, 6, 2), "SBLH": (2, 2, 18, 2), "G": (2, 2, 42, 4)}
SIZE_LABELS = {"T": "T", "SBLH": "S, B, L, H", "G": "G"}
VARIANTS: Dict[str, Dict[str, str]] = {
    "pre_dot": dict(norm_placement="pre", attention="dot"),
    "pre_cosine": dict(norm_placement="pre", attention="cosine"),
    "post_dot": dict(norm_placement="res_post", attention="dot"),
    "post_cosine": dict(norm_placement="res_post", attention="cosine"),
}


@dataclass(frozen=True)
class Section:
    name: str
    sizes: Tuple[str, ...]
    variants: Tuple[str, ...]
    seeds: Tuple[int, ...]
    lr: float  # peak AdamW learning rate at the batch below (cosine to lr/10, no warmup)
    steps: int


EMBED_DIM, IMG_SIZE, BATCH, PROBE_IMAGES = 16, 16, 32, 64
SECTIONS: Dict[str, Section] = {
    "depth": Section("depth", tuple(SIZE_DEPTHS), tuple(VARIANTS), (0, 1, 2), lr=4e-3, steps=30),
    "failure": Section("failure", ("G",), ("pre_dot", "post_dot"), (0, 1), lr=1e-2, steps=40),
}
COMMAND = "python -m swinlab signal --jobs 2 --out runs/signal_propagation"
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "signal_propagation"
FIELDS = ["section", "size", "variant", "seed", "phase", "spread", "max_rms", "loss", "logit_range", "rms", "max_abs"]
STEP_FIELDS = ["section", "size", "variant", "seed", "step", "loss", "spread"]


# ------------------------------------------------------------------------------------------------------------------
# One unit
# ------------------------------------------------------------------------------------------------------------------

def build_task(size: str, variant: str, lr: float):
    from ..tasks import ImageClassifier
    kwargs = dict(img_size=IMG_SIZE, embed_dim=EMBED_DIM, depths=list(SIZE_DEPTHS[size]), **VARIANTS[variant])
    base = lr * 512 / BATCH  # the task's learning rates are per 512 images
    return ImageClassifier(model_name=BASE_MODEL, num_classes=10, model_kwargs=kwargs, base_lr=base,
                           warmup_lr=base / 10, min_lr=base / 10, warmup_steps=0, weight_decay=0.05,
                           label_smoothing=0.0, mixup=0.0, cutmix=0.0)


def run_unit(section: str, size: str, variant: str, seed: int) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Train one unit; rows for results.csv (init and trained) and results_steps.csv. Everything random is seeded
    from ``seed``: a unit gives the same rows alone or in a worker."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from ..data import DigitsDataModule
    from ..training.signal_monitor import SignalMonitor, SignalProbe, spread

    sec = SECTIONS[section]
    pl.seed_everything(seed, workers=True, verbose=False)
    task = build_task(size, variant, sec.lr)
    data = DigitsDataModule(img_size=IMG_SIZE, batch_size=BATCH, eval_batch_size=PROBE_IMAGES, max_shift=0,
                            num_workers=0, seed=seed)
    data.setup("fit")
    probe_x = next(iter(data.val_dataloader()))[0]  # the same validation digits for every unit

    steps: List[Dict[str, Any]] = []

    class Record(Callback):  # reads what SignalMonitor (before it in the list) and the task logged this step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            steps.append(dict(section=section, size=size, variant=variant, seed=seed, step=trainer.global_step,
                              loss=float(metrics["train/loss"]), spread=float(metrics["signal/rms_spread"])))

    rows = []

    def measure(phase: str, loss: float) -> None:
        found = SignalProbe(task.model).measure(probe_x)
        rows.append(dict(section=section, size=size, variant=variant, seed=seed, phase=phase,
                         spread=spread(found["rms"]), max_rms=max(found["rms"]), loss=loss,
                         logit_range=max(found["attn_logit_range"]),
                         rms=" ".join(f"{v:.6g}" for v in found["rms"]),
                         max_abs=" ".join(f"{v:.6g}" for v in found["max_abs"])))

    measure("init", math.nan)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=sec.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=5.0, log_every_n_steps=1,
                         callbacks=[SignalMonitor(image=False), Record()])
    trainer.fit(task, data)
    measure("trained", statistics.fmean(s["loss"] for s in steps[-5:]))
    return rows, steps


def _worker(unit):
    import logging
    import warnings
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Lightning's hints (srun, tips, deprecations) would drown the unit lines
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    start = time.time()
    rows, steps = run_unit(*unit)
    return unit, rows, steps, time.time() - start


def plan(sections: Sequence[str], sizes: Optional[Sequence[str]], variants: Optional[Sequence[str]],
         seeds: Optional[Sequence[int]]) -> List[Tuple[str, str, str, int]]:
    units = []
    for name in sections:
        sec = SECTIONS[name]
        for size in sec.sizes:
            for variant in sec.variants:
                for seed in sec.seeds:
                    if (sizes is None or size in sizes) and (variants is None or variant in variants) and \
                            (seeds is None or seed in seeds):
                        units.append((name, size, variant, seed))
    # the deepest first: --jobs N balances better
    return sorted(units, key=lambda u: -sum(SIZE_DEPTHS[u[1]]) * SECTIONS[u[0]].steps)


# ------------------------------------------------------------------------------------------------------------------
# Statistics and the report
# ------------------------------------------------------------------------------------------------------------------

def interval(values: Sequence[float]) -> Interval:
    """Mean over seeds with the hierarchical bootstrap of study_stats (one value per seed), in the values' units."""
    iv = bootstrap(torch.tensor([[float(v)] for v in values], dtype=torch.float64))
    return Interval(iv.mean / 100, iv.se / 100, iv.low / 100, iv.high / 100)


def _key(row: Dict[str, Any]) -> Tuple[str, str, str, str]:
    return row["section"], row["size"], row["variant"], row["phase"]


def _by_seed(rows: List[Dict[str, Any]], section: str, size: str, variant: str, phase: str,
             field: str) -> Dict[int, float]:
    return {int(r["seed"]): float(r[field]) for r in rows if _key(r) == (section, size, variant, phase)}


def _log10(v: float) -> float:
    return math.log10(v) if v > 0 and math.isfinite(v) else math.inf


def _paired(a: Dict[int, float], b: Dict[int, float], log: bool) -> Optional[Interval]:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    f = _log10 if log else float
    diffs = [f(a[s]) - f(b[s]) for s in seeds]
    if any(not math.isfinite(d) for d in diffs):
        return None
    return interval(diffs)


def _fmt_ratio(iv: Interval) -> str:
    """An interval of log10 values as ratios: 10^mean [10^low, 10^high]."""
    return f"{10 ** iv.mean:.3g}x [{10 ** iv.low:.3g}, {10 ** iv.high:.3g}]"


def _fmt(iv: Interval, nd: int = 2, signed: bool = False) -> str:
    f = f"+.{nd}f" if signed else f".{nd}f"
    return f"{iv.mean:{f}} [{iv.low:{f}}, {iv.high:{f}}]"


# (claim, section, measure, (size, variant, phase), (size, variant, phase), expected sign of a - b)
CLAIMS = [
    ("pre-norm's amplitude spread grows with depth (G's depths against T's)", "depth", "spread",
     ("G", "pre_dot", "trained"), ("T", "pre_dot", "trained"), "higher"),
    ("res-post-norm keeps the amplitudes flatter than pre-norm: T's depths, dot attention", "depth", "spread",
     ("T", "post_dot", "trained"), ("T", "pre_dot", "trained"), "lower"),
    ("... S, B, L and H's depths, dot attention", "depth", "spread", ("SBLH", "post_dot", "trained"),
     ("SBLH", "pre_dot", "trained"), "lower"),
    ("... G's depths, dot attention", "depth", "spread", ("G", "post_dot", "trained"), ("G", "pre_dot", "trained"),
     "lower"),
    ("... G's depths, scaled cosine attention", "depth", "spread", ("G", "post_cosine", "trained"),
     ("G", "pre_cosine", "trained"), "lower"),
    ("dot-product attention logits grow in training under res-post-norm (G's depths)", "depth", "logit_range",
     ("G", "post_dot", "trained"), ("G", "post_dot", "init"), "higher"),
    ("under res-post-norm, dot-product logits outgrow the scaled cosine ones (\"a few pixel pairs dominate\"; "
     "G's depths)", "depth", "logit_range", ("G", "post_dot", "trained"), ("G", "post_cosine", "trained"), "higher"),
    ("at an aggressive learning rate the deepest pre-norm model blows up: its amplitude spread ends above "
     "res-post-norm's", "failure", "spread", ("G", "pre_dot", "trained"), ("G", "post_dot", "trained"), "higher"),
    ("... and its training loss ends above res-post-norm's", "failure", "loss", ("G", "pre_dot", "trained"),
     ("G", "post_dot", "trained"), "higher"),
]


def claim_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    out = []
    for text, section, field, (sa, va, pa), (sb, vb, pb), expect in CLAIMS:
        log = field == "spread"
        diff = _paired(_by_seed(rows, section, sa, va, pa, field), _by_seed(rows, section, sb, vb, pb, field), log)
        if diff is None:
            continue
        shown = _fmt_ratio(diff) if log else _fmt(diff, signed=True)
        comparison = f"{field}: {SIZE_LABELS[sa]} {va} {pa} vs {SIZE_LABELS[sb]} {vb} {pb} ({section})"
        z = f" ({diff.z:+.1f} SE)" if diff.se > 0 else ""
        out.append(dict(claim=text, comparison=comparison, difference=shown + z,
                        verdict=verdict(diff, "better" if expect == "higher" else "worse")))
    return out


def report(rows: List[Dict[str, Any]], steps: List[Dict[str, Any]], provenance: Dict[str, Any]) -> str:
    lines = ["**Study `signal_propagation`**", ""]
    if provenance:
        v = provenance.get("versions", {})
        lines += [f"Made by `{provenance.get('command')}` at commit {provenance.get('commit')} on "
                  f"{provenance.get('date')} (swinlab {v.get('swinlab')}, torch {v.get('torch')}, lightning "
                  f"{v.get('lightning')}; Python {provenance.get('python')}; {provenance.get('cpus')} CPUs, "
                  f"{provenance.get('jobs')} job(s) x 1 thread, {provenance.get('minutes')} min"
                  + (f", {provenance['cpu_minutes']} CPU-min" if "cpu_minutes" in provenance else "") + ").", ""]
    for name, sec in SECTIONS.items():
        have = [r for r in rows if r["section"] == name]
        if not have:
            continue
        seeds = sorted({int(r["seed"]) for r in have})
        lines += [f"Section `{name}`: embed_dim {EMBED_DIM}, {IMG_SIZE}-px digits, batch {BATCH}, {sec.steps} AdamW "
                  f"steps at peak LR {sec.lr:g} (no warmup, cosine to 1/10, clip 5), seeds {seeds}. Spread = largest "
                  f"over smallest per-block RMS of the residual stream on {PROBE_IMAGES} validation digits (geometric "
                  f"mean over seeds [95% interval]); max RMS; the largest attention-logit range over the stages; "
                  f"training loss (mean of the last 5 steps).", ""]
        lines += ["| size (stage depths) | variant | spread at init | spread trained | max RMS trained | "
                  "logit range trained | loss trained |", "|---|---|---|---|---|---|---|"]
        for size in sec.sizes:
            for variant in sec.variants:
                init = _by_seed(rows, name, size, variant, "init", "spread")
                done = _by_seed(rows, name, size, variant, "trained", "spread")
                if not done:
                    continue
                cells = [f"{SIZE_LABELS[size]} {SIZE_DEPTHS[size]}", variant]
                for values in (init, done):
                    logs = [_log10(v) for v in values.values()]
                    cells.append(_fmt_ratio(interval(logs)) if all(map(math.isfinite, logs)) else "overflow")
                for field in ("max_rms", "logit_range", "loss"):
                    vals = list(_by_seed(rows, name, size, variant, "trained", field).values())
                    cells.append(_fmt(interval(vals), 3 if field == "loss" else 2)
                                 if all(map(math.isfinite, vals)) else "n/a")
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    claims = claim_rows(rows)
    if claims:
        lines += ["Claims, judged on paired differences over seeds (ratios for spreads): reproduced when the whole 95% "
                  "interval lies on the claimed side, contradicted when it lies wholly on the other side, else not "
                  "resolved at this power.", "", "| claim | comparison | difference | verdict |", "|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['comparison']} | {c['difference']} | **{c['verdict']}** |" for c in claims]
    return "\n".join(lines) + "\n"


def _geomean_curve(rows, section, size, variant, phase) -> Optional[List[float]]:
    curves = [[float(v) for v in r["rms"].split()] for r in rows if _key(r) == (section, size, variant, phase)]
    if not curves:
        return None
    return [math.exp(statistics.fmean(math.log(max(c[i], 1e-30)) for c in curves)) for i in range(len(curves[0]))]


def plot(rows: List[Dict[str, Any]], steps: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.signal_monitor import mark_stages
    sizes = [s for s in SIZE_DEPTHS if any(r["size"] == s and r["section"] == "depth" for r in rows)]
    panels = len(sizes) + (1 if any(s["section"] == "failure" for s in steps) else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), squeeze=False)
    colours = {"pre_dot": "C3", "pre_cosine": "C1", "post_dot": "C0", "post_cosine": "C2"}
    for ax, size in zip(axes[0], sizes):
        mark_stages(ax, SIZE_DEPTHS[size])
        for variant in VARIANTS:
            for phase, style in (("trained", "-"), ("init", ":")):
                curve = _geomean_curve(rows, "depth", size, variant, phase)
                if curve is not None:
                    ax.plot(range(len(curve)), curve, style, color=colours[variant], marker="o" if style == "-" else
                            None, markersize=2.5, label=f"{variant} ({phase})" if phase == "trained" else None)
        ax.set_yscale("log")
        ax.set_xlabel("block index")
        ax.set_title(f"{SIZE_LABELS[size]} depths {SIZE_DEPTHS[size]}", fontsize=9, pad=14)
    axes[0][0].set_ylabel("RMS of the residual stream (dotted: at init)")
    axes[0][0].legend(fontsize=7)
    if panels > len(sizes):
        ax = axes[0][-1]
        sec = SECTIONS["failure"]
        ax2 = ax.twinx()
        for variant in sec.variants:
            seeds = sorted({int(s["seed"]) for s in steps if (s["section"], s["variant"]) == ("failure", variant)})
            for k, seed in enumerate(seeds):
                pts = [s for s in steps if (s["section"], s["variant"], int(s["seed"])) == ("failure", variant, seed)]
                x = [int(p["step"]) for p in pts]
                ax.plot(x, [float(p["spread"]) for p in pts], color=colours[variant], alpha=0.8,
                        label=f"{variant} spread" if k == 0 else None)
                ax2.plot(x, [float(p["loss"]) for p in pts], "--", color=colours[variant], alpha=0.6,
                         label=f"{variant} loss" if k == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("RMS spread (solid)")
        ax2.set_ylabel("training loss (dashed)")
        ax.set_title(f"G depths at LR {sec.lr:g}: pre-norm blows up", fontsize=9, pad=14)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Signal propagation (SwinV2 Fig. 2 analogue): pre-norm vs res-post-norm, geometric mean over seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------------
# Files and the command
# ------------------------------------------------------------------------------------------------------------------

def read_csv(path: Path) -> List[Dict[str, Any]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: List[Dict[str, Any]], fields: Sequence[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in fields})
    os.replace(tmp, path)


def provenance(argv: Sequence[str], jobs: int, minutes: float) -> Dict[str, Any]:
    import resource
    import subprocess
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", False
    return {"commit": commit + ("+changes" if dirty else ""),
            "versions": {p: version(p) for p in ("swinlab", "torch", "lightning", "timm")},
            "python": platform.python_version(), "command": " ".join(["python -m swinlab signal", *argv]),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "cpus": os.cpu_count(), "jobs": jobs, "threads": 1,
            "minutes": round(minutes, 2),
            # CPU time of this process and its workers: what the study costs on a machine shared with other work
            "cpu_minutes": round(sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                                     for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 60, 2)}


def _rows_sorted(rows):
    order = {k: i for i, k in enumerate(SIZE_DEPTHS)}
    vorder = {k: i for i, k in enumerate(VARIANTS)}
    return sorted(rows, key=lambda r: (r["section"], order[r["size"]], vorder[r["variant"]], int(r["seed"]),
                                       r.get("phase", ""), int(r.get("step", 0))))


def write_report(out: Path) -> str:
    rows, steps = read_csv(out / "results.csv"), read_csv(out / "results_steps.csv")
    prov = json.loads((out / "provenance.json").read_text()) if (out / "provenance.json").is_file() else {}
    text = report(rows, steps, prov)
    (out / "results.md").write_text(text)
    plot(rows, steps, out / "results.png")
    return text


def measure_cost(model_name: str, img_size: Optional[int], batch_size: int, steps: int, every: int,
                 device: str = "cpu", threads: Optional[int] = None) -> Dict[str, Any]:
    """The instrument's share of a training step (forward, cross-entropy, backward, AdamW step, fp32): median step
    time with no hooks, with the hooks attached but disarmed (the steps between logging steps) and armed (a logging
    step: the reductions and :meth:`SignalProbe.collect`), the three interleaved round by round so machine noise hits
    them alike; ``cost`` is the mean step over ``every`` steps (one armed, the rest disarmed) against no hooks. On the
    CPU the clock is this process's CPU time (``time.process_time``: other jobs on a shared machine do not enter it);
    on CUDA, wall time with a synchronisation before and after each step."""
    from ..models import create_model
    from ..training.signal_monitor import SignalProbe

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = create_model(model_name, img_size=img_size, num_classes=10).to(dev).train()
    size = model.config.img_size
    x = torch.randn(batch_size, 3, *size, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    probe = SignalProbe(model)

    def step(mode: str) -> float:
        if mode == "off":
            probe.detach()
        else:
            probe.attach()
            probe.armed = mode == "armed"
        clock = time.perf_counter if dev.type == "cuda" else time.process_time
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = clock()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mode == "armed":
            probe.armed = False
            probe.collect(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return clock() - start

    modes = ("off", "hooks", "armed")
    for mode in modes:  # warm-up
        step(mode)
    times: Dict[str, List[float]] = {m: [] for m in modes}
    for r in range(steps):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            times[mode].append(step(mode))
    probe.detach()
    med = {m: statistics.median(t) for m, t in times.items()}
    mean_step = ((every - 1) * med["hooks"] + med["armed"]) / every
    direct = _direct_cost(model, x, probe, clock=time.perf_counter if dev.type == "cuda" else time.process_time,
                          sync=(lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None))
    per_step = ((every - 1) * direct["disarmed_s"] + direct["armed_s"]) / every
    return dict(model=model_name, img_size=size[0], batch_size=batch_size, device=device,
                clock="wall" if dev.type == "cuda" else "CPU time",
                threads=torch.get_num_threads(), blocks=len(probe.names), off_ms=med["off"] * 1e3,
                hooks_ms=med["hooks"] * 1e3, armed_ms=med["armed"] * 1e3, every=every,
                cost_pct=(mean_step / med["off"] - 1) * 100, direct_disarmed_us=direct["disarmed_s"] * 1e6,
                direct_armed_us=direct["armed_s"] * 1e6, direct_pct=per_step / med["off"] * 100)


def _direct_cost(model, x: torch.Tensor, probe, clock, sync, reps: int = 2000) -> Dict[str, float]:
    """The instrument's own time per step, timed directly (many repetitions, so the noise of whole steps stays out):
    ``disarmed_s``, what the hooks add to a step between logging steps (a module call with a disarmed hook against
    one without, times the number of hooks), and ``armed_s``, a logging step's work (the hooks' reductions on this
    model's real block outputs, then :meth:`SignalProbe.collect`)."""
    outputs: List[torch.Tensor] = []
    handles = [blk.register_forward_hook(lambda m, a, o: outputs.append(o.detach())) for blk in model.blocks()]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    plain, hooked = torch.nn.Identity(), torch.nn.Identity()
    hooked.register_forward_hook(probe._block_hook(0))  # the probe's own hook, disarmed
    t = torch.zeros(1)
    probe.armed = False
    timings = {}
    for name, module in (("plain", plain), ("hooked", hooked), ("plain2", plain), ("hooked2", hooked)):
        start = clock()
        for _ in range(reps):
            module(t)
        timings[name] = (clock() - start) / reps
    per_call = max(0.0, (timings["hooked"] + timings["hooked2"] - timings["plain"] - timings["plain2"]) / 2)
    hooks = len(probe.names) + len(probe.depths)  # a hook per block and one per stage's first attention
    hook_fns = [probe._block_hook(i) for i in range(len(outputs))]
    armed = []
    for _ in range(20):
        probe._stats = {}
        probe.armed = True
        sync()
        start = clock()
        for i, out in enumerate(outputs):
            hook_fns[i](None, (), out)
        probe.collect(x.device)
        sync()
        armed.append(clock() - start)
    probe.armed = False
    return {"disarmed_s": per_call * hooks, "armed_s": statistics.median(armed) + per_call * hooks}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m swinlab signal", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/signal_propagation", help="folder for the results (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="units at a time, one process and one thread each")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--sizes", nargs="+", default=None, choices=list(SIZE_DEPTHS))
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="rewrite results.md and results.png from DIR's rows and run nothing")
    cost = p.add_argument_group("the instrument's step-time cost (--cost: measure it and run no study)")
    cost.add_argument("--cost", action="store_true")
    cost.add_argument("--model", default="swinv2_pico_patch2_window4_32")
    cost.add_argument("--img-size", type=int, default=None)
    cost.add_argument("--batch-size", type=int, default=64)
    cost.add_argument("--steps", type=int, default=20, help="timed rounds (each: one step of every mode)")
    cost.add_argument("--every", type=int, default=10, help="log_every_n_steps: one armed step in this many")
    cost.add_argument("--device", default="cpu")
    cost.add_argument("--threads", type=int, default=None)
    return p


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.cost:
        if args.every < 1 or args.steps < 1:
            raise ConfigError(f"--every {args.every} and --steps {args.steps} must be >= 1")
        r = measure_cost(args.model, args.img_size, args.batch_size, args.steps, args.every, args.device,
                         args.threads)
        print(f"| model | image | batch | device, threads | blocks | step, no hooks (ms {r['clock']}) | "
              "disarmed (ms) | logging step (ms) | cost from the steps | hooks between logging steps (us, direct) | "
              "logging step's work (us, direct) | cost, direct |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {r['model']} | {r['img_size']} | {r['batch_size']} | {r['device']}, {r['threads']} | {r['blocks']} "
              f"| {r['off_ms']:.1f} | {r['hooks_ms']:.1f} | {r['armed_ms']:.1f} | {r['cost_pct']:+.2f}% | "
              f"{r['direct_disarmed_us']:.0f} | {r['direct_armed_us']:.0f} | {r['direct_pct']:.3f}% |")
        print(f"\n(cost at log_every_n_steps {r['every']}: one logging step in {r['every']})")
        return 0
    if args.report:
        folder = Path(args.report)
        if not (folder / "results.csv").is_file() or not (folder / "results_steps.csv").is_file():
            raise ConfigError(f"--report {folder}: no results.csv/results_steps.csv there: run the study with "
                              f"--out {folder} first")
        print(write_report(folder))
        return 0
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} must be >= 1")
    out = Path(args.out)
    if (out / "results.csv").exists() and not args.overwrite:
        raise ConfigError(f"{out}/results.csv exists: add --overwrite to replace it, or give another --out")
    units = plan(args.sections, args.sizes, args.variants, args.seeds)
    if not units:
        raise ConfigError("--sizes/--variants/--seeds select no unit of the chosen sections: see --help")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows: List[Dict[str, Any]] = []
    steps: List[Dict[str, Any]] = []
    if args.jobs == 1:
        results = map(_worker, units)
    else:
        import multiprocessing
        pool = multiprocessing.get_context("spawn").Pool(args.jobs)
        results = pool.imap_unordered(_worker, units)
    for unit, unit_rows, unit_steps, seconds in results:
        rows += unit_rows
        steps += unit_steps
        print(f"{'/'.join(map(str, unit))}: spread {unit_rows[0]['spread']:.3g} -> {unit_rows[1]['spread']:.3g}, "
              f"loss {unit_rows[1]['loss']:.3f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    if args.jobs > 1:
        pool.close()
        pool.join()
    write_csv(out / "results.csv", _rows_sorted(rows), FIELDS)
    write_csv(out / "results_steps.csv", _rows_sorted(steps), STEP_FIELDS)
    (out / "provenance.json").write_text(json.dumps(provenance(argv, args.jobs, (time.time() - start) / 60),
                                                    indent=1) + "\n")
    print(write_report(out))
    return 0
