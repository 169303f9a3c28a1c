"""``--plan``: what a study costs before it runs (images, analytic FLOPs, GPU-hours)."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from ...models import create_model
from .schema import Study

#: what ``--plan`` assumes by default: an H100's dense bf16 peak and the fraction of it a Swin training run reaches
PEAK_TFLOPS = 989.0
MFU = 0.35


def world_size(trainer: Dict[str, Any]) -> int:
    """Processes a Trainer section trains with: ``devices`` (a count or a list of ids; 1 for "auto") x
    ``num_nodes``."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.strip().isdigit()):
        count = max(int(devices), 1)
    else:
        count = 1
    return count * int(trainer.get("num_nodes") or 1)


def _images(trainer: Dict[str, Any], dataset: int, batch: int) -> int:
    """Images a Trainer section sees: ``max_steps`` optimizer steps x the global batch (per-device batch x
    accumulation x devices x nodes), else ``max_epochs`` x the data set."""
    steps = trainer.get("max_steps")
    if steps is not None and int(steps) > 0:
        return int(steps) * batch * int(trainer.get("accumulate_grad_batches") or 1) * world_size(trainer)
    return int(trainer.get("max_epochs") or 1000) * dataset


def plan(study: Study, train_images: int, val_images: int, peak_tflops: float = PEAK_TFLOPS,
         mfu: float = MFU) -> Dict[str, Any]:
    """What a study costs before it runs: per variant, the training and fine-tune images, the analytic FLOPs
    (``swinlab.models.flops.model_macs`` x 2; x 3 for forward + backward) and the GPU-hours at ``peak_tflops`` x
    ``mfu``, for one seed and for all of the study's seeds."""
    from ...models.flops import model_macs
    batch = int((study.data.get("init_args") or {}).get("batch_size") or 64)
    rows = []
    for name in study.variant_names:
        variant = study.variant(name)
        flops = 0.0
        images = 0
        macs: Dict[Tuple[Tuple[int, int], Tuple[int, int]], int] = {}
        for cell in study.cells():
            size = (cell.img, cell.win)
            if size not in macs:  # a size evaluated directly and after the fine-tune is built once
                with torch.device("meta"):
                    model = create_model(variant.model_name, **{**variant.model_kwargs, "img_size": list(cell.img),
                                                                 "window_size": list(cell.win)})
                macs[size] = model_macs(model)
            per_image = 2.0 * macs[size]
            flops += val_images * per_image  # every size is evaluated once
            if cell == study.train_cell and not variant.checkpoint:
                seen = _images(study.train.trainer or {}, train_images, batch)
                flops += 3 * seen * per_image
                images += seen
            if cell.finetuned:
                seen = _images(study.finetune.trainer or {}, train_images, batch)
                flops += 3 * seen * per_image
                images += seen
        hours = flops / (peak_tflops * 1e12 * mfu) / 3600
        rows.append(dict(variant=name, train_images=images, pflops=round(flops / 1e15, 1),
                         gpu_hours_per_seed=round(hours, 1), gpu_hours=round(hours * len(study.seeds), 1)))
    total = sum(r["gpu_hours"] for r in rows)
    return dict(study=study.name, seeds=len(study.seeds), units=len(rows) * len(study.seeds),
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

