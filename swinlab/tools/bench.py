"""``python -m swinlab bench``: throughput, step time, peak memory, FLOPs and MFU, side by side with timm.

swinlab's model and (with ``--compare timm``) timm's model of the same name are built in the same process and
measured on the same input batch, with their steps interleaved (the order alternates each step), so machine noise
hits both alike; ``ratio`` is swinlab images/s over timm images/s. Each timed step ends with a device
synchronisation; the reported step time is the median over ``--steps`` timed steps after ``--warmup`` untimed ones.

Train mode is forward + cross-entropy + backward + AdamW step (the same optimizer settings for both models);
infer mode is a forward pass under ``torch.inference_mode``. Precision ``bf16``/``fp16`` runs under autocast.

Peak memory: on CUDA each model gets its own ``reset_peak_memory_stats`` window, measured before the interleaved
timing, and the figure is the peak allocated above what was allocated before that window (the model's activations
and transient buffers, plus its weights, gradients and optimizer state). On the CPU only the process-wide peak
RSS is available; it covers both models and is reported as such (``peak_mem_scope``).

timm's attention is timm's own setting: its V1 SDPA path is off by default ("experimental") and on with
``TIMM_FUSED_ATTN=2`` in the environment (timm reads it when imported); V2 has none. ``timm_fused_attn`` in the
JSON says which ran. ``first_step_s`` / ``timm_first_step_s``: the first step, which includes ``torch.compile``.

FLOPs are analytic (``swinlab.models.flops``: the paper's per-block formula), 2 FLOPs per multiply-add, and
3x forward for a training step. MFU = achieved FLOP/s over the device's dense peak for the precision, known for
H100/H200/A100/L40S/A10G by device name (``--peak-tflops`` overrides).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import PRESETS, create_model, get_variant, model_macs
from ..models.compile import compile_model

PRECISIONS = {"32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("infer", "train")
# dense peak TFLOPS by device-name fragment: (16-bit tensor core, fp32 without TF32)
PEAK_TFLOPS = (
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),  # SXM
    ("GH200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("A10G", 70.0, 31.2),
)


def device_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """Dense peak TFLOPS of ``device`` at ``precision`` (None where unknown or on the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, half, fp32 in PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            return fp32 if precision == "32" else half
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision], enabled=precision != "32")


def build_timm(name: str, img_size: int, num_classes: int, drop_path_rate: float) -> nn.Module:
    """timm's model of the same name (timm's default attention settings), or, for swinlab-only test sizes, timm's
    ``SwinTransformer``/``SwinTransformerV2`` class with the same architecture."""
    import timm

    variant = get_variant(name)
    if variant.name in timm.list_models():
        return timm.create_model(variant.name, pretrained=False, img_size=img_size, num_classes=num_classes,
                                 drop_path_rate=drop_path_rate)
    cfg = variant.config
    custom = any(getattr(cfg, k) not in (None, v) for k, v in PRESETS[cfg.version].items())
    if cfg.extra_norm_period or custom:
        raise ConfigError(f"timm has no counterpart of {variant.name!r} (extra norms / custom switches): "
                          f"drop --compare timm for this model")
    kw = dict(img_size=img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depths=cfg.depths,
              num_heads=cfg.num_heads, window_size=cfg.window_size, num_classes=num_classes,
              drop_path_rate=drop_path_rate)
    if cfg.version == "v2":
        from timm.models.swin_transformer_v2 import SwinTransformerV2
        pretrained = [tuple(p) for p in cfg.resolved().pretrained_window_size]  # one (h, w) per stage
        return SwinTransformerV2(pretrained_window_sizes=pretrained, **kw)
    from timm.models.swin_transformer import SwinTransformer
    return SwinTransformer(**kw)


class Runner:
    """One model, its optimizer and one step function (train or infer) on a fixed batch."""

    def __init__(self, label: str, model: nn.Module, mode: str, precision: str, device: torch.device,
                 compile_: bool, lr: float = 1e-4):
        self.label, self.mode, self.precision, self.device = label, mode, precision, device
        self.model = model.to(device)
        self.model.train(mode == "train")
        self.opt = None
        if mode == "train":
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.05)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
        self.fn: Callable[[torch.Tensor], torch.Tensor] = compile_model(self.model) if compile_ else self.model
        self.times: List[float] = []
        self.peak_mem: Optional[int] = None
        self.first_step_s: Optional[float] = None  # includes torch.compile's tracing and code generation

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.first_step_s is None:
            _sync(self.device)
            start = time.perf_counter()
            self._step(x, y)
            _sync(self.device)
            self.first_step_s = time.perf_counter() - start
        else:
            self._step(x, y)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.mode == "infer":
            with torch.inference_mode(), _autocast(self.device, self.precision):
                self.fn(x)
            return
        self.opt.zero_grad(set_to_none=True)
        with _autocast(self.device, self.precision):
            loss = F.cross_entropy(self.fn(x).float(), y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()

    def timed_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.step(x, y)
        _sync(self.device)
        return time.perf_counter() - start

    def measure_cuda_memory(self, x: torch.Tensor, y: torch.Tensor, warmup: int) -> None:
        """Peak bytes this model adds on top of what was allocated before its window (CUDA only)."""
        for _ in range(max(warmup, 1)):  # optimizer state, cuDNN/autotune workspaces, compile
            self.step(x, y)
        _sync(self.device)
        if self.opt is not None:  # what the next step frees first: count grads as part of this model's window
            self.opt.zero_grad(set_to_none=True)
        base = torch.cuda.memory_allocated(self.device)
        resident = sum(t.numel() * t.element_size() for t in self._resident_tensors())
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step(x, y)
        _sync(self.device)
        self.peak_mem = torch.cuda.max_memory_allocated(self.device) - base + resident

    def _resident_tensors(self):
        seen = set()
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p
        for b in self.model.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                yield b
        if self.opt is not None:
            for state in self.opt.state.values():
                for v in state.values():
                    if torch.is_tensor(v) and v.device.type == "cuda":
                        yield v

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)


def peak_rss_bytes() -> int:
    """Process peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu (or auto)")
    return device


def run_bench(model: str, *, img_size: Optional[int] = None, batch_size: int = 8, mode: str = "infer",
              precision: str = "32", compile: bool = False, compare: Optional[str] = None, steps: int = 10,
              warmup: int = 2, device: str = "auto", num_classes: int = 1000, attn: str = "fused",
              seed: int = 0, peak_tflops: Optional[float] = None) -> Dict[str, Any]:
    """Measure one (model, mode, precision, batch) configuration; returns one flat dict (the JSON line)."""
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is unknown: use one of {list(MODES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown: use one of {list(PRECISIONS)}")
    if compare not in (None, "timm"):
        raise ConfigError(f"--compare {compare!r} is unknown: the only comparison is --compare timm")
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ConfigError(f"batch size {batch_size}, steps {steps}, warmup {warmup}: use batch-size >= 1, "
                          f"steps >= 1 and warmup >= 0")
    if attn not in ("fused", "unfused"):
        raise ConfigError(f"attn {attn!r} is unknown: use fused or unfused")
    variant = get_variant(model)
    dev = resolve_device(device)
    if precision == "fp16" and dev.type == "cpu":
        raise ConfigError("fp16 autocast on the CPU is not a meaningful benchmark: use --precision bf16 or 32")
    img = int(img_size or variant.config.img_size)

    torch.manual_seed(seed)
    ours = create_model(variant.name, img_size=img, num_classes=num_classes, fused_attn=attn == "fused")
    runners = [Runner("swinlab", ours, mode, precision, dev, compile)]
    timm_fused = None
    if compare == "timm":
        theirs = build_timm(variant.name, img, num_classes, ours.config.drop_path_rate)
        timm_fused = any(bool(getattr(m, "fused_attn", False)) for m in theirs.modules())
        runners.append(Runner("timm", theirs, mode, precision, dev, compile))

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, img, img, generator=g).to(dev)
    y = torch.randint(0, max(num_classes, 1), (batch_size,), generator=g).to(dev)

    if dev.type == "cuda":
        for r in runners:  # each model in its own peak-memory window, before the interleaved timing
            r.measure_cuda_memory(x, y, warmup)
    for i in range(warmup):
        for r in (runners if i % 2 == 0 else runners[::-1]):
            r.step(x, y)
    for i in range(steps):
        for r in (runners if i % 2 == 0 else runners[::-1]):
            r.times.append(r.timed_step(x, y))

    macs = model_macs(ours, img)
    flops_img = 2 * macs * (3 if mode == "train" else 1)
    ref = runners[0]
    img_s = batch_size / ref.step_s
    peak = peak_tflops if peak_tflops else device_peak_tflops(dev, precision)
    out: Dict[str, Any] = dict(
        model=variant.name, mode=mode, precision=precision,
        device=(torch.cuda.get_device_name(dev) if dev.type == "cuda"
                else f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"),
        batch_size=batch_size, img_size=img, steps=steps, compile=bool(compile), attn=attn,
        img_s=round(img_s, 3), step_ms=round(ref.step_s * 1e3, 3),
        timm_img_s=None, timm_step_ms=None, ratio=None,
        peak_mem_bytes=ref.peak_mem if dev.type == "cuda" else peak_rss_bytes(),
        timm_peak_mem_bytes=None, mem_ratio=None,
        peak_mem_scope="cuda max allocated, per model" if dev.type == "cuda" else "process peak RSS (both models)",
        gflops_per_img=round(flops_img / 1e9, 4), tflops_s=round(flops_img * img_s / 1e12, 4),
        mfu=round(flops_img * img_s / (peak * 1e12), 4) if peak else None, timm_fused_attn=timm_fused,
        first_step_s=round(ref.first_step_s, 3), torch=torch.__version__,
        step_ms_all=[round(t * 1e3, 3) for t in ref.times])
    if len(runners) > 1:
        t = runners[1]
        out.update(timm_img_s=round(batch_size / t.step_s, 3), timm_step_ms=round(t.step_s * 1e3, 3),
                   ratio=round(t.step_s / ref.step_s, 4), timm_step_ms_all=[round(s * 1e3, 3) for s in t.times],
                   timm_first_step_s=round(t.first_step_s, 3),
                   # robust to bursts of machine load: best step of each, and the median of per-step pairs
                   ratio_best=round(min(t.times) / min(ref.times), 4),
                   ratio_paired=round(statistics.median(b / a for a, b in zip(ref.times, t.times)), 4))
        if dev.type == "cuda":
            out.update(timm_peak_mem_bytes=t.peak_mem, mem_ratio=round(ref.peak_mem / t.peak_mem, 4))
        import timm
        out["timm"] = timm.__version__
    return out


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if not math.isnan(v) else "nan"
    return str(v)


def run_label(row: Dict[str, Any]) -> str:
    """The model name plus what differs from the default run: ``(compiled)``, ``(swinlab unfused)`` and
    ``(timm SDPA)`` when timm's fused attention was on (``TIMM_FUSED_ATTN=2`` for V1)."""
    notes = [n for n, on in (("compiled", row.get("compile")), ("swinlab unfused", row.get("attn") == "unfused"),
                             ("timm SDPA", row.get("timm_fused_attn"))) if on]
    return f"{row['model']} ({', '.join(notes)})" if notes else str(row["model"])


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| model | mode | precision | batch | swinlab img/s | timm img/s | ratio | peak mem (MiB) | "
             "timm peak mem (MiB) | mem ratio | GFLOPs/img | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mib = lambda b: None if b is None else b / 2 ** 20
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(f"| {run_label(r)} | {r['mode']} | {r['precision']} | {r['batch_size']} | {_fmt(r['img_s'])} | "
                     f"{_fmt(r['timm_img_s'])} | {_fmt(r['ratio'], 3)} | {_fmt(mib(r['peak_mem_bytes']), 0)} | "
                     f"{_fmt(mib(r['timm_peak_mem_bytes']), 0)} | {_fmt(r['mem_ratio'], 3)} | "
                     f"{_fmt(r['gflops_per_img'], 2)} | {_fmt(mfu, 1)}{'%' if mfu is not None else ''} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m swinlab bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="registry name(s) or alias(es); several run in turn")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", nargs="+", default=["infer"], choices=MODES, help="infer, train, or both in turn")
    p.add_argument("--precision", default="32", choices=list(PRECISIONS))
    p.add_argument("--compile", action="store_true", help="torch.compile both models (swinlab.models.compile)")
    p.add_argument("--compare", default=None, choices=["timm"], help="also measure timm's model, interleaved")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:i]")
    p.add_argument("--attn", default="fused", choices=["fused", "unfused"], help="swinlab attention path")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by device name)")
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    p.add_argument("--markdown", action="store_true", help="print a markdown table of all runs at the end")
    return p


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv[1:] if argv and argv[0] == "bench" else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.getcwd(), ".cache", "inductor"))
    for name in args.model:
        get_variant(name)  # fail on a bad name before any measurement
    rows = []
    for name in args.model:
        for mode in args.mode:
            row = run_bench(name, img_size=args.img_size, batch_size=args.batch_size, mode=mode,
                            precision=args.precision, compile=args.compile, compare=args.compare, steps=args.steps,
                            warmup=args.warmup, device=args.device, num_classes=args.num_classes, attn=args.attn,
                            peak_tflops=args.peak_tflops)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                ratio = f", timm {row['timm_img_s']:.2f} img/s, ratio {row['ratio']:.3f}" if row["ratio"] else ""
                mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
                print(f"{run_label(row)} {mode} {row['precision']} b{row['batch_size']} on {row['device']}: "
                      f"{row['img_s']:.2f} img/s ({row['step_ms']:.1f} ms/step){ratio}; peak mem "
                      f"{row['peak_mem_bytes'] / 2 ** 20:.0f} MiB ({row['peak_mem_scope']}); "
                      f"{row['gflops_per_img']:.2f} GFLOPs/img{mfu}", flush=True)
    if args.markdown:
        print(markdown_table(rows))
    return 0
