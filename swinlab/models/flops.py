"""Analytic FLOPs of a Swin model, from the paper's per-block formula.

Counts multiply-adds (the unit the Swin papers report as "FLOPs": Swin-T 4.5G at 224) for the layers that matter:
patch embedding, qkv/proj/MLP linears, the two window-attention matmuls (4hwC^2 + 2M^2hwC per block, plus the MLP's
2 * mlp_ratio * hwC^2), patch merging, the CPB MLP and the classifier. Padded window tokens are counted.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from .swin import CPB_HIDDEN, SwinTransformer, to_2tuple


def model_macs(model: SwinTransformer, img_size: Optional[Union[int, Sequence[int]]] = None) -> int:
    """Multiply-adds per image for one forward pass."""
    cfg = model.config
    H, W = to_2tuple(img_size) if img_size is not None else model.img_size
    p = cfg.patch_size
    h, w = H // p, W // p
    dims = cfg.stage_dims()
    macs = h * w * dims[0] * cfg.in_chans * p * p
    for i, stage in enumerate(model.layers):
        C = dims[i]
        if i > 0:
            h, w = (h + 1) // 2, (w + 1) // 2
            macs += h * w * 4 * dims[i - 1] * C
        for blk in stage.blocks:
            wh, ww = blk.window
            hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
            n = wh * ww
            macs += hp * wp * 4 * C * C  # qkv + proj (on padded windows)
            macs += 2 * hp * wp * n * C  # q k^T and attn v
            macs += int(2 * h * w * C * C * cfg.mlp_ratio)
            if cfg.position_bias.startswith("cpb"):
                macs += (2 * wh - 1) * (2 * ww - 1) * (2 * CPB_HIDDEN + CPB_HIDDEN * blk.attn.num_heads)
    macs += dims[-1] * max(cfg.num_classes, 0)
    return macs

