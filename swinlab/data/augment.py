"""Training and evaluation transforms: timm's ``create_transform``, with every augmentation op's argument inside the
range Pillow accepts.

timm's posterize ops map a magnitude to the number of bits to keep: ``PosterizeIncreasing`` (RandAugment's ``inc1``
set, AugMix, AutoAugment ``v0r``/``originalr``) keeps ``4 - int(0.4 * m)`` bits, 0 at magnitude 10, which
``rand-m9-mstd0.5`` reaches whenever its Gaussian magnitude noise lands at or above 10 (about 0.15% of samples);
``Posterize`` (RandAugment without ``inc1``, AutoAugment ``v0``) keeps ``int(0.4 * m)`` bits, 0 below magnitude 2.5
(AutoAugment ``v0`` asks for it at magnitude 2 by design). Pillow before 13 turned 0 bits into an all-black image;
Pillow 13 raises ``ValueError: bits must be between or equal to 1 and 8``. :func:`pillow_safe` clamps the bits of
every posterize op of a transform to Pillow's 1..8 (0 bits become 1: the strongest posterize that keeps an image);
every other op of timm 1.0.31's ``auto_augment`` already stays inside Pillow's ranges (solarize thresholds 0..256,
enhance factors >= 0.1, see tests/test_augment.py, which sweeps every op of every policy over its magnitudes).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Tuple

from ..errors import ConfigError

POSTERIZE_BITS = (1, 8)  # PIL.ImageOps.posterize's accepted range (Pillow 13)


class ClampedBits:
    """A posterize op's level function whose bits stay in Pillow's range (a class, so transforms pickle into
    DataLoader workers under any start method)."""

    def __init__(self, level_fn: Any):
        self.level_fn = level_fn

    def __call__(self, magnitude: float, hparams: Any) -> Tuple[int]:
        (bits,) = self.level_fn(magnitude, hparams)
        return (min(POSTERIZE_BITS[1], max(POSTERIZE_BITS[0], int(bits))),)


def augment_ops(transform: Any) -> Iterator[Any]:
    """Every timm ``AugmentOp`` inside ``transform`` (a Compose, RandAugment, AugMix or AutoAugment, nested)."""
    from timm.data.auto_augment import AugmentOp
    if isinstance(transform, AugmentOp):
        yield transform
    elif isinstance(transform, (list, tuple)):  # AutoAugment's policy: a list of sub-policies, each a list of ops
        for child in transform:
            yield from augment_ops(child)
    else:
        for attr in ("transforms", "ops", "policy"):
            yield from augment_ops(getattr(transform, attr, None) or [])


def pillow_safe(transform: Any) -> Any:
    """``transform`` with the bits of each of its posterize ops clamped to Pillow's range (in place; returned)."""
    from timm.data import auto_augment
    for op in augment_ops(transform):
        if op.aug_fn is auto_augment.posterize and not isinstance(op.level_fn, ClampedBits):
            op.level_fn = ClampedBits(op.level_fn)
    return transform


def build_transform(img_size: Tuple[int, int], training: bool, *, mean: Sequence[float], std: Sequence[float],
                    interpolation: str = "bicubic", crop_pct: float = 0.875, auto_augment: Optional[str] = None,
                    color_jitter: float = 0.4, re_prob: float = 0.0, re_mode: str = "pixel") -> Any:
    """timm's ``create_transform`` (training: random-resized crop, flip, ``auto_augment``, colour jitter, random
    erasing; evaluation: resize to ``img_size / crop_pct``, centre crop), made Pillow-safe. An ``auto_augment``
    string timm cannot parse is a ConfigError naming it."""
    from timm.data import create_transform
    if not training:
        return create_transform(img_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                                mean=tuple(mean), std=tuple(std))
    try:
        transform = create_transform(img_size, is_training=True, auto_augment=auto_augment,
                                     color_jitter=color_jitter, re_prob=re_prob, re_mode=re_mode,
                                     interpolation=interpolation, mean=tuple(mean), std=tuple(std))
    except (AssertionError, KeyError, ValueError) as exc:  # timm asserts on unknown sections and policy names
        raise ConfigError(f"auto_augment={auto_augment!r} is not a timm augmentation string ({exc or 'unknown part'})"
                          f": use e.g. rand-m9-mstd0.5-inc1, augmix-m5, original, v0, or null") from None
    return pillow_safe(transform)
