"""``python -m swinlab models``: the registered variants with parameters, FLOPs, timm's pretrained tags (public
weights: ``create_model("<name>.<tag>", pretrained=True)``) and (``--smoke``) a forward pass."""
from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import List

import torch

from ..models import ALIASES, REGISTRY, SwinTransformer, create_model, list_tags, model_macs


def main(argv: List[str]) -> int:
    """``argv`` without the command name."""
    parser = argparse.ArgumentParser(
        prog="python -m swinlab models",
        description="List registered Swin variants with parameters, FLOPs and pretrained tags.")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant")
    parser.add_argument("--smoke", action="store_true",
                        help="also run one forward pass of each test-sized variant on the CPU and report its time")
    args = parser.parse_args(argv)
    alias_of = {v: k for k, v in ALIASES.items()}
    rows = []
    for name, variant in REGISTRY.items():
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = SwinTransformer(variant.config)
        cfg = variant.config
        rows.append(dict(name=name, alias=alias_of.get(name, ""), version=cfg.version,
                         img_size=cfg.img_size, window=cfg.window_size,
                         params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                         gflops=round(model_macs(model) / 1e9, 2), pretrained_tags=list_tags(name)))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print("| model | alias | version | img | window | params (M) | GFLOPs | pretrained tags |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['alias']} | {r['version']} | {r['img_size']} | {r['window']} | "
                  f"{r['params_m']} | {r['gflops']} | {', '.join(r['pretrained_tags'])} |")
        print("\nGFLOPs are multiply-adds per image, as the Swin papers report them. Pretrained tags (timm's, first: "
              "the default): create_model('<model>.<tag>', pretrained=True) downloads them through the Hugging Face "
              "cache (HF_HUB_OFFLINE=1 honoured).")
    if args.smoke:
        torch.manual_seed(0)
        for name in ("swin_pico_patch2_window4_32", "swinv2_pico_patch2_window4_32"):
            model = create_model(name, num_classes=10).eval()
            x = torch.randn(8, 3, *model.img_size)
            start = time.perf_counter()
            with torch.no_grad():
                logits = model(x)
            ms = (time.perf_counter() - start) * 1e3
            ok = bool(torch.isfinite(logits).all())
            print(f"smoke: {name} forward {tuple(x.shape)} -> {tuple(logits.shape)} finite={ok} in {ms:.1f} ms")
            if not ok:
                return 1
    return 0
