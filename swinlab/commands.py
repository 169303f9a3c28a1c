"""``python -m swinlab models`` and ``python -m swinlab convert``."""
from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import List

import torch

from .models import REGISTRY, create_model, get_variant, model_macs, save_safetensors
from .models.registry import ALIASES
from .models.swin import SwinTransformer


def _models(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m swinlab models",
                                     description="List registered Swin variants with parameters and FLOPs.")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant")
    parser.add_argument("--smoke", action="store_true",
                        help="also run one forward pass of each test-sized variant on the CPU and report its time")
    args = parser.parse_args(argv)
    alias_of = {v: k for k, v in ALIASES.items()}
    rows = []
    for name, variant in REGISTRY.items():
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = SwinTransformer(**variant.model_kwargs())
        rows.append(dict(name=name, alias=alias_of.get(name, ""), version=variant.version,
                         img_size=variant.img_size, window=variant.window_size,
                         params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                         gflops=round(model_macs(model) / 1e9, 2)))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print("| model | alias | version | img | window | params (M) | GFLOPs |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['alias']} | {r['version']} | {r['img_size']} | {r['window']} | "
                  f"{r['params_m']} | {r['gflops']} |")
        print("\nGFLOPs are multiply-adds per image, as the Swin papers report them.")
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


def _convert(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swinlab convert",
        description="Load a Swin checkpoint (official, timm, Lightning or swinlab) into a variant, optionally moving "
                    "it to another image/window size, and write safetensors.")
    parser.add_argument("checkpoint")
    parser.add_argument("--model", required=True, help="registry name of the checkpoint's architecture")
    parser.add_argument("--img-size", type=int, nargs="+", default=None, help="target image size (N or H W)")
    parser.add_argument("--window-size", type=int, default=None, help="target window size")
    parser.add_argument("--pretrained-window-size", type=int, nargs="+", default=None,
                        help="V2: window(s) the CPB was trained at (default: the checkpoint's)")
    parser.add_argument("--num-classes", type=int, default=None, help="re-initialise the head for N classes")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    get_variant(args.model)
    img = None if args.img_size is None else (args.img_size[0] if len(args.img_size) == 1 else args.img_size)
    pws = args.pretrained_window_size
    pws = None if pws is None else (pws[0] if len(pws) == 1 else pws)
    model = create_model(args.model, checkpoint=args.checkpoint, img_size=img, window_size=args.window_size,
                         pretrained_window_size=pws, num_classes=args.num_classes)
    out = save_safetensors(model, args.out, args.model)
    cfg = model.config
    print(json.dumps(dict(out=str(out), model=args.model, img_size=cfg["img_size"],
                          window_size=[w[0] for w in cfg["window_size"]],
                          pretrained_window_size=[w[0] for w in cfg["pretrained_window_size"]],
                          num_classes=cfg["num_classes"])))
    return 0


def main(argv: List[str]) -> int:
    command, rest = argv[0], argv[1:]
    return _models(rest) if command == "models" else _convert(rest)
