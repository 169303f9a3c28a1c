"""``python -m swinlab data optimize``: an image folder to LitData shards.

``optimize --src FOLDER --out SHARDS [--workers N]`` reads an ImageNet-style folder (``train/<class>/``, and
``val/<class>/`` or, without it, a validation split carved from train/ as ImageFolderDataModule carves it:
``--val-split``, ``--seed``) and writes ``SHARDS/train``, ``SHARDS/val`` (LitData datasets, with LitData's progress
bar) and ``SHARDS/classes.json``. Unreadable images are skipped and named. Everything is written under a temporary
name beside SHARDS and renamed when complete, so SHARDS is either whole or absent; an existing SHARDS is refused.
Train with ``--data StreamingImageDataModule --data.init_args.data_dir SHARDS``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import ConfigError


def _samples(src: Path, val_split: float, seed: int) -> Tuple[List[str], List[Tuple[str, int]], List[Tuple[str, int]]]:
    """Class names and the (path, label) lists of train and val, as ImageFolderDataModule reads the folder."""
    from ..data.folder import ImageFolderDataModule, SafeImageFolder
    dm = ImageFolderDataModule(data_dir=str(src), val_split=val_split, seed=seed)
    classes = dm.check()
    index = {c: i for i, c in enumerate(classes)}
    train = SafeImageFolder.make_dataset(str(src / dm.train_dir), index)
    if not dm.has_val_folder():
        keep, held = dm.carve_val(train)
        print(f"no {dm.val_dir}/ folder in {src}: {len(held)} of {len(train)} training images go to val "
              f"({val_split:.0%} of each class, seed {seed}; --val-split, --seed)", file=sys.stderr)
        return classes, [train[i] for i in keep], [train[i] for i in held]
    val_root = src / dm.val_dir
    val_classes = sorted(e.name for e in os.scandir(val_root) if e.is_dir() and not e.name.startswith("."))
    val = SafeImageFolder.make_dataset(str(val_root), {c: index[c] for c in val_classes})
    return classes, train, val


def optimize_folder(src: str, out: str, workers: int = 1, val_split: float = 0.1, seed: int = 0,
                    chunk_bytes: str = "64MB", max_pixels: Optional[int] = None) -> dict:
    """Write the shards; returns a summary (per split: images listed, written)."""
    from litdata import StreamingDataset, optimize

    from ..data.folder import DEFAULT_MAX_IMAGE_PIXELS
    from ..data.streaming import CLASSES_FILE, shard_sample
    out_path, src_path = Path(out), Path(src)
    if os.path.lexists(out_path):
        raise ConfigError(f"--out {out} already exists: give a new folder (nothing there is replaced)")
    if not out_path.parent.is_dir():
        raise ConfigError(f"--out {out}: its parent folder {out_path.parent} does not exist: create it first")
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be >= 1")
    classes, train, val = _samples(src_path, val_split, seed)
    if not val:
        raise ConfigError(f"no validation images in {src}: add a val/ folder or more than one image per class")
    tmp = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
    summary = {"classes": len(classes)}
    fn = partial(shard_sample, max_pixels=DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
    try:
        tmp.mkdir()
        for split, items in (("train", train), ("val", val)):
            print(f"{split}: {len(items)} images of {len(classes)} classes", file=sys.stderr)
            with contextlib.redirect_stdout(sys.stderr):  # LitData's own messages: stdout keeps the summary only
                optimize(fn=fn, inputs=items, output_dir=str(tmp / split), num_workers=min(workers, len(items)),
                         chunk_bytes=chunk_bytes, mode=None, start_method="fork")
            written = len(StreamingDataset(str(tmp / split)))
            summary[split] = {"images": len(items), "written": written, "skipped": len(items) - written}
        (tmp / CLASSES_FILE).write_text(json.dumps(classes, indent=0) + "\n")
        os.rename(tmp, out_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def optimize_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m swinlab data optimize", description=__doc__.split("\n\n")[1])
    p.add_argument("--src", required=True, help="image folder: train/<class>/ and optionally val/<class>/")
    p.add_argument("--out", required=True, help="new folder for the shards (refused if it exists)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes that encode images")
    p.add_argument("--val-split", type=float, default=0.1, help="share of each class held out when there is no val/")
    p.add_argument("--seed", type=int, default=0, help="seed of that held-out split")
    p.add_argument("--chunk-bytes", default="64MB", help="size of one shard chunk (LitData's chunk_bytes)")
    args = p.parse_args(argv)
    if not 0.0 < args.val_split < 1.0:
        raise ConfigError(f"--val-split {args.val_split} must be in (0, 1)")
    start = time.perf_counter()
    s = optimize_folder(args.src, args.out, args.workers, args.val_split, args.seed, args.chunk_bytes)
    skipped = s["train"]["skipped"] + s["val"]["skipped"]
    print(f"wrote {s['train']['written']} train and {s['val']['written']} val images of {s['classes']} classes to "
          f"{args.out} in {time.perf_counter() - start:.1f} s" + (f"; {skipped} unreadable image(s) skipped" if skipped
                                                                 else ""))
    print(f"train from them: python -m swinlab fit ... --data StreamingImageDataModule "
          f"--data.init_args.data_dir {args.out}")
    return 0
