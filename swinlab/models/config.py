"""``SwinConfig``: the one description of a Swin model (architecture, geometry, regularisation, execution switches).

A registry variant holds one (as written there: sizes and windows as single ints), ``SwinTransformer(config)`` builds
from one, ``model.config`` is the model's own (:meth:`SwinConfig.resolved`: switches filled in from the version preset,
sizes and windows expanded to one ``[h, w]`` per stage), and checkpoint metadata is its :meth:`SwinConfig.to_dict`,
read back with :meth:`SwinConfig.from_dict`.

The V1/V2 switches and their presets live here too (``PRESETS``, ``CHOICES``); ``swinlab.models.swin`` documents what
each switch does (and holds the per-stage geometry, ``stage_geometry``). Pure Python: no torch here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ConfigError

PRESETS: Dict[str, Dict[str, str]] = {
    "v1": dict(norm_placement="pre", attention="dot", position_bias="table", qkv_bias="qkv",
               merge_order="norm_reduce"),
    "v2": dict(norm_placement="res_post", attention="cosine", position_bias="cpb_log", qkv_bias="qv",
               merge_order="reduce_norm"),
}
CHOICES: Dict[str, Tuple[str, ...]] = {
    "norm_placement": ("pre", "res_post"),
    "attention": ("dot", "cosine"),
    "position_bias": ("table", "cpb_linear", "cpb_log", "none"),
    "qkv_bias": ("qkv", "qv", "none"),
    "merge_order": ("norm_reduce", "reduce_norm"),
}
# how a model runs, not what it is: a checkpoint's values of these do not override the caller's
GLOBAL_POOLS = ("avg", "")  # the head's pooling: average over (H, W), or none (timm's global_pool="")
RUNTIME_FIELDS = ("fused_attn", "attn_chunk_size", "grad_checkpointing")

Int2 = Tuple[int, int]


def to_2tuple(v: Union[int, Sequence[int]]) -> Int2:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ConfigError(f"expected an int or a pair (h, w), got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def per_stage(value: Union[int, Sequence[Any]], num_stages: int, what: str) -> List[Int2]:
    """Expand an int, an (h, w) pair or one entry per stage into one (h, w) per stage."""
    if isinstance(value, (tuple, list)) and len(value) == num_stages and num_stages != 2:
        return [to_2tuple(v) for v in value]
    if isinstance(value, (tuple, list)) and len(value) == num_stages == 2 and isinstance(value[0], (tuple, list)):
        return [to_2tuple(v) for v in value]
    if isinstance(value, (tuple, list)) and len(value) not in (2, num_stages):
        raise ConfigError(f"{what}={list(value)!r} has {len(value)} entries but the model has {num_stages} "
                          f"stages: give one int, an (h, w) pair, or one value per stage")
    return [to_2tuple(value)] * num_stages


@dataclass(frozen=True)
class SwinConfig:
    """Everything a :class:`~swinlab.models.swin.SwinTransformer` is built from; the constructor's keyword arguments
    are these fields.

    ``version`` picks the preset of the five switches (``norm_placement`` ... ``merge_order``); a switch left None
    takes the preset's value. ``img_size`` is an int or (h, w); ``window_size`` / ``pretrained_window_size`` an int,
    an (h, w) pair or one entry per stage (``pretrained_window_size`` 0: none). ``extra_norm_period`` > 0 adds a
    LayerNorm after every that many blocks of a stage (SwinV2-H/G). ``global_pool`` is the head's pooling: "avg"
    (over H and W) or "" (none: the classifier applies to every position of the NHWC map, as in timm). The last
    three fields say how the model runs (``RUNTIME_FIELDS``).
    """
    img_size: Union[int, Sequence[int]] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: Union[int, Sequence[Any]] = 7
    mlp_ratio: float = 4.0
    version: str = "v1"
    norm_placement: Optional[str] = None
    attention: Optional[str] = None
    position_bias: Optional[str] = None
    qkv_bias: Optional[str] = None
    merge_order: Optional[str] = None
    extra_norm_period: int = 0
    pretrained_window_size: Union[int, Sequence[Any]] = 0
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    fused_attn: bool = True
    attn_chunk_size: int = 0
    grad_checkpointing: bool = False

    def replace(self, **changes: Any) -> SwinConfig:
        """A copy with ``changes`` (field names; an unknown name is a TypeError, as for a constructor)."""
        return dataclasses.replace(self, **changes) if changes else self

    def resolved(self) -> SwinConfig:
        """The checked, explicit form a model keeps: every switch set (the preset's where None), ``depths`` and
        ``num_heads`` lists of ints, ``img_size`` ``[h, w]``, both window sizes ``[[h, w], ...]`` one per stage.
        Raises ConfigError, one line, on anything a model cannot be built from. Resolving twice changes nothing."""
        if self.version not in PRESETS:
            raise ConfigError(f"version={self.version!r} is unknown: use one of {sorted(PRESETS)}")
        switches = {key: preset if getattr(self, key) is None else getattr(self, key)
                    for key, preset in PRESETS[self.version].items()}
        for key, value in switches.items():
            if value not in CHOICES[key]:
                raise ConfigError(f"{key}={value!r} is not a valid choice: use one of {list(CHOICES[key])}")
        depths, num_heads = [int(d) for d in self.depths], [int(h) for h in self.num_heads]
        if len(depths) != len(num_heads):
            raise ConfigError(f"depths {depths} and num_heads {num_heads} must have one entry per stage each")
        img, patch = to_2tuple(self.img_size), self.patch_size
        if patch <= 0:
            raise ConfigError(f"patch_size={patch} must be a positive int (the side of a patch in pixels, e.g. 4)")
        if img[0] % patch or img[1] % patch:
            raise ConfigError(f"img_size {img[0]}x{img[1]} is not divisible by the patch size {patch}: use a "
                              f"multiple of {patch} (e.g. {max(patch, img[0] // patch * patch)})")
        windows = per_stage(self.window_size, len(depths), "window_size")
        if any(w <= 0 for ws in windows for w in ws):
            raise ConfigError(f"window_size must be positive, got {self.window_size!r}")
        pretrained = per_stage(self.pretrained_window_size, len(depths), "pretrained_window_size")
        for pw in pretrained:  # the CPB normalises each axis by its pretrained window; 0 means none, on both axes
            if (pw[0] == 0) != (pw[1] == 0) or pw[0] < 0 or pw[1] < 0:
                raise ConfigError(f"pretrained_window_size {list(pw)} is not a window a CPB was trained at: use 0 "
                                  f"(none) or a positive size on both axes (e.g. the checkpoint's window, 8 or 12)")
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool={self.global_pool!r} is not supported: use one of {list(GLOBAL_POOLS)}")
        if self.attn_chunk_size < 0:
            raise ConfigError(f"attn_chunk_size={self.attn_chunk_size} must be >= 0 (0 turns sequential attention "
                              f"off)")
        if self.extra_norm_period < 0:
            raise ConfigError(f"extra_norm_period={self.extra_norm_period} must be >= 0 (0 turns it off)")
        for key in ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            rate = getattr(self, key)
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"{key}={rate!r} is out of range: it must be in [0, 1) (a probability; 0 for off)")
        return dataclasses.replace(self, **switches, depths=depths, num_heads=num_heads, img_size=list(img),
                                   window_size=[list(w) for w in windows],
                                   pretrained_window_size=[list(p) for p in pretrained])

    # -- derived geometry -------------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_dims(self) -> List[int]:
        """Channel width of each stage: embed_dim doubling at every patch merging."""
        return [int(self.embed_dim * 2 ** i) for i in range(self.num_stages)]

    # -- checkpoint metadata ----------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able values (lists, not tuples), keyed by field name: the checkpoint metadata."""
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SwinConfig:
        """Read :meth:`to_dict`'s output back (also the metadata swinlab wrote before this class existed: the same
        keys). An unknown key is a ConfigError naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}: expected some of {sorted(names)}")
        return cls(**data)
