"""``python -m swinlab data bench``: images/s of the training input pipeline (read, decode, augment, collate).

``--src FOLDER`` measures the image folder (ImageFolderDataModule's training loader), the same images as LitData
shards (StreamingImageDataModule's; written to a temporary folder with ``data optimize`` unless ``--shards`` names
them) and, with ``--compare timm``, timm's own loader (``timm.data.create_dataset`` + ``create_loader``) on the same
files with the same augmentation settings. ``--src SHARDS`` measures the shards alone.

Each pipeline runs with ``--workers`` loader processes (0: in this process). Every round builds a fresh iterator per
pipeline (its workers start, run and stop before the next pipeline starts, so pipelines never compete for cores),
discards ``--warmup`` batches (worker start-up, the first chunk reads) and times the next ``--batches``; the
pipelines' order rotates each round, so machine noise falls on all of them alike. The figure is the median over
``--rounds`` of images/s, and images/s per worker process (the whole rate over ``max(workers, 1)``): what one loader
core delivers when each worker has a core to itself. ``images_per_cpu_s``: images per second of CPU time spent by
this process and its workers while timed (median over rounds), the same figure measured by CPU time instead of wall
time, so it holds on a machine whose cores are shared with other work. Peak RSS: the largest sum of the resident
memory of this process and its loader workers, sampled every 20 ms while a pipeline runs (its first round included).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import ConfigError, first_line


class PeakRSS:
    """Samples the resident memory of this process plus its children (loader workers) in a background thread."""

    def __init__(self, interval: float = 0.02):
        import psutil
        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()

    def _sample(self) -> int:
        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except Exception:  # noqa: BLE001 - a worker that just exited
                pass
        return total

    def __enter__(self) -> PeakRSS:
        self._stop.clear()
        self.peak = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._sample())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def is_shards(path: str) -> bool:
    from ..data.streaming import CLASSES_FILE, is_url
    return is_url(path) or (os.path.isfile(os.path.join(path, CLASSES_FILE))
                            and os.path.isfile(os.path.join(path, "train", "index.json")))


def _folder_module(args, src: str):
    from ..data.folder import ImageFolderDataModule
    return ImageFolderDataModule(data_dir=src, img_size=args.img_size, batch_size=args.batch_size,
                                 auto_augment=args.auto_augment, num_workers=args.workers, pin_memory=False,
                                 persistent_workers=False, seed=args.seed)


def pipelines(args) -> Dict[str, Callable[[], Any]]:
    """name -> a function building that pipeline's training loader."""
    from ..data.streaming import StreamingImageDataModule
    out: Dict[str, Callable[[], Any]] = {}
    folder = None if is_shards(args.src) else args.src
    shards = args.src if folder is None else args.shards

    if folder is not None:
        def folder_loader():
            dm = _folder_module(args, folder)
            dm.setup("fit")
            return dm.train_dataloader()
        out["folder"] = folder_loader

    def shard_loader():
        dm = StreamingImageDataModule(data_dir=shards, img_size=args.img_size, batch_size=args.batch_size,
                                      auto_augment=args.auto_augment, num_workers=args.workers, pin_memory=False,
                                      seed=args.seed)
        dm.setup("fit")
        return dm.train_dataloader()
    out["shards"] = shard_loader

    if folder is not None and args.compare == "timm":
        def timm_loader():
            import timm.data
            ref = _folder_module(args, folder)  # the same augmentation settings, read from the folder module
            train = os.path.join(folder, ref.train_dir)
            dataset = timm.data.create_dataset("", root=train, split="train", is_training=True)
            return timm.data.create_loader(
                dataset, input_size=(3, *ref.img_size), batch_size=args.batch_size, is_training=True,
                use_prefetcher=False, no_aug=False, re_prob=ref.re_prob, re_mode=ref.re_mode,
                color_jitter=ref.color_jitter, auto_augment=ref.auto_augment, interpolation=ref.interpolation,
                mean=ref.mean, std=ref.std, num_workers=args.workers, persistent_workers=False)
        out["timm"] = timm_loader
    return out


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its live children (the loader workers)."""
    import psutil
    me, total = psutil.Process(), 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # noqa: BLE001 - a worker that just exited
            pass
    return total


def _one_round(make: Callable[[], Any], warmup: int, batches: int) -> Tuple[float, float]:
    """(images per wall second, images per CPU second) over ``batches`` batches after ``warmup``."""
    loader = make()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    for _ in range(batches):
        x = next(it)[0]
        n += len(x)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    del it, loader
    return n / seconds, n / cpu if cpu > 0 else float("nan")


def run(args) -> Dict[str, Any]:
    made = pipelines(args)
    names = list(made)
    rates: Dict[str, List[float]] = {n: [] for n in names}
    per_cpu: Dict[str, List[float]] = {n: [] for n in names}
    peak: Dict[str, int] = {n: 0 for n in names}
    errors: Dict[str, str] = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if name in errors:
                continue
            try:
                with PeakRSS() as rss:
                    wall, cpu = _one_round(made[name], args.warmup, args.batches)
                rates[name].append(wall)
                per_cpu[name].append(cpu)
                peak[name] = max(peak[name], rss.peak)
            except StopIteration:
                errors[name] = (f"fewer than {args.warmup + args.batches} batches of {args.batch_size}: lower "
                                f"--batches/--warmup/--batch-size")
            except Exception as exc:  # noqa: BLE001 - reported in its row; the other pipelines go on
                errors[name] = f"{type(exc).__name__}: {first_line(exc)}"
    per = max(args.workers, 1)
    rows = []
    for name in names:
        med = statistics.median(rates[name]) if rates[name] else None
        rows.append({"pipeline": name, "images_per_s": med, "images_per_s_per_worker": med / per if med else None,
                     "images_per_cpu_s": statistics.median(per_cpu[name]) if per_cpu[name] else None,
                     "rounds": rates[name], "peak_rss_mb": peak[name] / 2**20 if peak[name] else None,
                     "error": errors.get(name)})
    import PIL
    import timm
    import torch
    try:
        import litdata
        litdata_version = litdata.__version__
    except Exception:  # noqa: BLE001
        litdata_version = None
    return {"src": args.src, "shards": args.shards, "workers": args.workers, "batch_size": args.batch_size,
            "img_size": args.img_size, "auto_augment": args.auto_augment, "batches": args.batches,
            "warmup": args.warmup, "rounds": args.rounds, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "timm": timm.__version__, "pillow": PIL.__version__,
            "litdata": litdata_version, "pipelines": rows}


def table(result: Dict[str, Any]) -> str:
    w = result["workers"]
    lines = [f"{result['src']}: batch {result['batch_size']}, {result['img_size']} px, auto_augment "
             f"{result['auto_augment']}, {w} worker(s), median of {result['rounds']} rounds of {result['batches']} "
             f"batches", f"{'pipeline':<8} {'images/s':>9} {'per worker':>10} {'per CPU-s':>9} {'peak RSS MB':>11}"]
    for r in result["pipelines"]:
        if r["error"]:
            lines.append(f"{r['pipeline']:<8} failed: {r['error']}")
        else:
            lines.append(f"{r['pipeline']:<8} {r['images_per_s']:9.1f} {r['images_per_s_per_worker']:10.1f} "
                         f"{r['images_per_cpu_s']:9.1f} {r['peak_rss_mb']:11.0f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    import inspect

    from ..data.folder import ImageFolderDataModule
    default_aa = inspect.signature(ImageFolderDataModule).parameters["auto_augment"].default
    p = argparse.ArgumentParser(prog="python -m swinlab data bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="image folder (train/<class>/...) or shard folder")
    p.add_argument("--shards", help="with a folder --src: its shards (default: written to a temporary folder)")
    p.add_argument("--workers", type=int, default=1, help="loader worker processes per pipeline (0: in-process)")
    p.add_argument("--compare", choices=["timm"], help="also timm's own loader on the same files")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--auto-augment", default=default_aa, help=f"RandAugment policy (default {default_aa}; 'none')")
    p.add_argument("--batches", type=int, default=10, help="timed batches per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.auto_augment in ("none", "None", ""):
        args.auto_augment = None
    for name in ("batch_size", "img_size", "batches", "rounds"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.workers < 0 or args.warmup < 0:
        raise ConfigError("--workers and --warmup must be >= 0")
    if not is_shards(args.src) and not os.path.isdir(args.src):
        raise ConfigError(f"--src {args.src} is neither an image folder nor a shard folder: give train/<class>/ "
                          f"images or the output of `python -m swinlab data optimize`")
    if is_shards(args.src) and args.compare:
        raise ConfigError("--compare timm needs the image files: give the image folder as --src (its shards are "
                          "written for the comparison)")
    if args.workers == 0:
        import torch
        torch.set_num_threads(1)  # one core, as in a loader worker (DataLoader gives each worker one thread)
    with tempfile.TemporaryDirectory(prefix="swinlab-bench-") as tmp:
        if not is_shards(args.src) and args.shards is None:
            from .shards import optimize_folder
            args.shards = os.path.join(tmp, "shards")
            optimize_folder(args.src, args.shards, workers=max(1, min(args.workers, os.cpu_count() or 1)),
                            seed=args.seed)
        result = run(args)
    print(json.dumps(result, indent=1) if args.json else table(result))
    sys.stdout.flush()
    return 0
