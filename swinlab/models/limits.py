"""Settings read from a file are data: the bounds of the Swin family and the memory a size needs, checked before
anything is built from them.

A checkpoint (safetensors metadata, a Lightning checkpoint's ``swinlab`` entry or hyper-parameters) carries a model
config; before a model is built at that config, :func:`check_saved_config` checks each field's type and range
(``LIMITS``: far beyond every published Swin, far below what would exhaust a machine one number at a time) and
then :func:`build_bytes`, the memory the model needs when built and first run (weights, index buffers, attention
masks; analytic, nothing allocated), against the memory this machine has free (``psutil``). Each refusal is one
line naming the file, the setting and what to do.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

from ..errors import CheckpointError, ConfigError, first_line
from .config import SwinConfig, per_stage, to_2tuple

#: field -> (lowest, highest) for every integer setting of a saved model config; sizes per side
LIMITS: Dict[str, Tuple[float, float]] = {
    "img_size": (1, 16384),
    "patch_size": (1, 64),
    "in_chans": (1, 1024),
    "num_classes": (0, 1_000_000),
    "embed_dim": (1, 8192),
    "depths": (1, 64),
    "num_heads": (1, 512),
    "window_size": (1, 512),
    "pretrained_window_size": (0, 512),
    "extra_norm_period": (0, 64),
    "attn_chunk_size": (0, 2 ** 31),
}
MAX_STAGES = 8
MLP_RATIO = (0.0, 64.0)  # exclusive low, inclusive high
CPB_HIDDEN = 512  # swin.CPB_HIDDEN: the continuous position bias MLP's width


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_ints(name: str, value: Any, shape: str) -> None:
    """Every integer in ``value`` (an int, a pair, one entry per stage, pairs per stage) within LIMITS[name]."""
    low, high = LIMITS[name]
    items = [value]
    flat = []
    while items:
        v = items.pop()
        if isinstance(v, (list, tuple)) and len(v) <= 2 * MAX_STAGES:
            items.extend(v)
        elif _is_int(v):
            flat.append(v)
        else:
            raise ConfigError(f"{name}={_short(value)} is not {shape}")
    bad = [v for v in flat if not low <= v <= high]
    if bad or not flat:
        raise ConfigError(f"{name}={_short(value)} is out of range: each entry must be in [{low}, {high}]")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_limits(config: SwinConfig) -> SwinConfig:
    """The config's fields by type and range (ConfigError, one line, naming the field), then
    :meth:`SwinConfig.resolved`; returns the resolved config."""
    c = config
    _check_ints("img_size", c.img_size, "an int or an (h, w) pair")
    for name in ("patch_size", "in_chans", "num_classes", "embed_dim", "extra_norm_period", "attn_chunk_size"):
        value = getattr(c, name)
        if not _is_int(value):
            raise ConfigError(f"{name}={_short(value)} is not an int")
        _check_ints(name, value, "an int")
    for name in ("depths", "num_heads"):
        value = getattr(c, name)
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_STAGES:
            raise ConfigError(f"{name}={_short(value)} is not a list of 1 to {MAX_STAGES} ints (one per stage)")
        _check_ints(name, list(value), "a list of ints")
    _check_ints("window_size", c.window_size, "an int, a pair or one entry per stage")
    _check_ints("pretrained_window_size", c.pretrained_window_size, "an int, a pair or one entry per stage")
    if isinstance(c.mlp_ratio, bool) or not isinstance(c.mlp_ratio, (int, float)) \
            or not MLP_RATIO[0] < c.mlp_ratio <= MLP_RATIO[1]:
        raise ConfigError(f"mlp_ratio={_short(c.mlp_ratio)} is out of range: it must be in ({MLP_RATIO[0]:g}, "
                          f"{MLP_RATIO[1]:g}]")
    for name in ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}={_short(value)} is not a number")
    for name in ("fused_attn", "grad_checkpointing"):
        if not isinstance(getattr(c, name), bool):
            raise ConfigError(f"{name}={_short(getattr(c, name))} is not true or false")
    for name in ("version", "norm_placement", "attention", "position_bias", "qkv_bias", "merge_order"):
        value = getattr(c, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name}={_short(value)} is not a string")
    resolved = c.resolved()
    for dim, heads in zip(resolved.stage_dims(), resolved.num_heads):
        if dim % heads:
            raise ConfigError(f"num_heads={list(resolved.num_heads)} does not divide the stage widths "
                              f"{resolved.stage_dims()}")
    return resolved


def build_bytes(config: SwinConfig) -> int:
    """Bytes a model at ``config`` (resolved) holds once built and run once: fp32 weights, the int64 relative
    position index and CPB coordinate table of each block, the fp32 shift masks of each shifted stage. Analytic:
    nothing is allocated."""
    c = config
    img = to_2tuple(c.img_size)
    res = (img[0] // c.patch_size, img[1] // c.patch_size)
    windows = per_stage(c.window_size, len(c.depths), "window_size")
    params = c.in_chans * c.patch_size ** 2 * c.embed_dim + 3 * c.embed_dim
    index = floats = 0
    dims = c.stage_dims()
    for i, (depth, heads, target) in enumerate(zip(c.depths, c.num_heads, windows)):
        d = dims[i]
        if i > 0:
            res = ((res[0] + 1) // 2, (res[1] + 1) // 2)
            params += 4 * dims[i - 1] * d + 2 * 4 * dims[i - 1]
        window = (min(res[0], target[0]), min(res[1], target[1]))
        n = window[0] * window[1]
        table = (2 * window[0] - 1) * (2 * window[1] - 1)
        hidden = int(d * c.mlp_ratio)
        block = 4 * d * d + 4 * d + 2 * d * hidden + hidden + d + 4 * d + heads
        block += (2 * CPB_HIDDEN + CPB_HIDDEN + CPB_HIDDEN * heads) if str(c.position_bias).startswith("cpb") \
            else table * heads
        params += depth * block
        index += depth * n * n
        floats += depth * table * 2
        if depth > 1 and (res[0] > target[0] or res[1] > target[1]):
            floats += res[0] * res[1] * n  # (windows, N, N) mask of the shifted blocks, shared by the stage
    params += dims[-1] * (c.num_classes + 3)
    return 4 * (params + floats) + 8 * index


def available_bytes() -> Optional[int]:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil missing or unable to read the machine
        return None


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_saved_config(config: SwinConfig, source: str) -> SwinConfig:
    """A model config read from ``source`` (a file): types, ranges and the memory the model needs on this machine;
    CheckpointError, one line, otherwise. Returns the config as it was (unresolved)."""
    try:
        resolved = check_limits(config)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} holds a model setting swinlab will not build from ({first_line(exc)}): "
                              f"the file is damaged or not made by swinlab; re-export it, or load its weights by "
                              f"model name") from None
    need, free = build_bytes(resolved), available_bytes()
    if free is not None and need > free:
        img = "x".join(str(s) for s in resolved.img_size)
        raise CheckpointError(f"{source} describes a model (img_size {img}, embed_dim {resolved.embed_dim}, "
                              f"{resolved.num_classes} classes) that needs about {_gib(need)} to build, more than "
                              f"the {_gib(free)} this machine has free: the file is damaged or not meant for this "
                              f"machine; load its weights by model name with the size you want (img_size=...)")
    return config


def saved_fields(data: Any) -> Dict[str, Any]:
    """A saved model config (a mapping of SwinConfig field names) as keyword arguments; ConfigError, one line, for
    anything else or an unknown key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a {type(data).__name__}, not a mapping of model settings")
    names = {f.name for f in dataclasses.fields(SwinConfig)}
    unknown = sorted(str(k)[:40] for k in data if k not in names)
    if unknown:
        raise ConfigError(f"unknown model config keys {unknown[:5]}: expected some of {sorted(names)}")
    return dict(data)
