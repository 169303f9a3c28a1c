"""``python -m swinlab convert``: any Swin checkpoint (official, timm, Lightning, swinlab) into a variant, optionally at
another image/window size, written as safetensors."""
from __future__ import annotations

import argparse
import json
from typing import List

from ..models import create_model, get_variant, save_safetensors


def main(argv: List[str]) -> int:
    """``argv`` without the command name."""
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
    print(json.dumps(dict(out=str(out), model=args.model, img_size=cfg.img_size,
                          window_size=[w[0] for w in cfg.window_size],
                          pretrained_window_size=[w[0] for w in cfg.pretrained_window_size],
                          num_classes=cfg.num_classes)))
    return 0
