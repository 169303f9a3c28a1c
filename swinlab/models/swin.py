"""Swin Transformer V1 and V2 as one model.

Every change from V1 to V2 is an independent switch, and "v1" / "v2" are presets of those switches (``PRESETS`` in
``swinlab.models.config``, with :class:`~swinlab.models.config.SwinConfig`, everything a model is built from):

=================  ==========================================  ===================================================
switch             "v1" preset                                 "v2" preset
=================  ==========================================  ===================================================
norm_placement     "pre":  x + f(LN(x))                        "res_post": x + LN(f(x)), LN weight/bias zero-init
attention          "dot":  softmax(q k^T * head_dim^-0.5)      "cosine": softmax(cos(q, k) * exp(min(s, ln 100)))
position_bias      "table": learned (2W-1)^2 x heads table     "cpb_log": 16*sigmoid(MLP(log-spaced coords));
                                                               "cpb_linear" (linear coords) and "none" also exist
qkv_bias           "qkv":  one bias on q, k and v              "qv": q_bias and v_bias, no k bias
merge_order        "norm_reduce": LN(4C) then Linear(4C->2C)   "reduce_norm": Linear(4C->2C) then LN(2C)
extra_norm_period  0                                           0 (SwinV2-H/G: a LayerNorm every 6 blocks)
=================  ==========================================  ===================================================

Parameter names and layouts equal timm's ``swin_transformer`` / ``swin_transformer_v2`` so their state dicts load
as they are. Attention runs through ``F.scaled_dot_product_attention`` by default (``fused_attn=True``): the
position bias and the shift mask are folded into one additive mask, and V2's cosine attention becomes
``normalize(q) * logit_scale`` against ``normalize(k)`` with scale 1. The explicit softmax path stays available
(``fused_attn=False``) and gives the same outputs.

Pure PyTorch (plus timm's ``Mlp``/``DropPath``): nothing here imports Lightning.
"""
import contextlib
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_function, register_notrace_module, trunc_normal_
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .config import CHOICES as CHOICES  # re-exported: the switches and their presets are defined in config
from .config import PRESETS as PRESETS
from .config import Int2, SwinConfig, per_stage, to_2tuple
from .hub import build_pretrained_cfg

MASK_VALUE = -100.0  # the value the reference implementations add between shifted regions
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # V2: tau >= 0.01, so the cosine logits are scaled by at most 100
CPB_HIDDEN = 512
# timm's group-matcher marker (timm.models._manipulate.MATCH_PREV_GROUP, not exported): a group key ending in it joins
# the group sorted before it (tests/test_timm_api.py checks it against timm's)
MATCH_PREV_GROUP = (99999,)
# PyTorch's CPU flash-attention kernel gives no gradient to attn_mask, so in CPU training with a learned position
# bias SDPA falls back to its math kernel, which is slower than the explicit softmax path (same arithmetic): use the
# explicit path there. CUDA kernels (memory-efficient attention) take a mask gradient and keep the fused path.
SDPA_CPU_GRAD_MASK_EXPLICIT = True

# ----------------------------------------------------------------------------------------------------------------
# Geometry: windows, shifts, index buffers and masks (computed once per resolution, never per forward)
# ----------------------------------------------------------------------------------------------------------------

def stage_geometry(img_size: Union[int, Sequence[int]], patch_size: int,
                   window_size: Union[int, Sequence[Any]], num_stages: int) -> List[Dict[str, Int2]]:
    """Per stage: token resolution, effective window and shift at the configured image size.

    A window is clamped to the stage resolution and the shift dropped where the stage is not larger than the
    window, per dimension, as timm does.
    """
    img = to_2tuple(img_size)
    res = (img[0] // patch_size, img[1] // patch_size)
    out = []
    for i, target in enumerate(per_stage(window_size, num_stages, "window_size")):
        if i > 0:
            res = ((res[0] + 1) // 2, (res[1] + 1) // 2)
        window = tuple(min(r, w) for r, w in zip(res, target))
        shift = tuple(0 if r <= w else w // 2 for r, w in zip(res, target))
        out.append(dict(resolution=res, window=window, shift=shift))
    return out


def relative_position_index(window: Int2, device=None) -> torch.Tensor:
    """(N, N) index into a (2Wh-1)(2Ww-1) table for every query/key pair of a window."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                        indexing="ij")).flatten(1)  # 2, N
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N (query - key)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def relative_coords_table(window: Int2, pretrained_window: Int2, log_spaced: bool, device=None) -> torch.Tensor:
    """(1, 2Wh-1, 2Ww-1, 2) fp32 CPB inputs.

    Offsets are normalised by (pretrained_window - 1), or (window - 1) without a pretrained window, times 8; the
    log-spaced form maps them through sign(x) * log2(1 + |x|) / log2(8) as the official code does, the linear form
    divides by 8 so both span about [-1, 1] at the pretrained window.
    """
    wh, ww = window
    dh = torch.arange(-(wh - 1), wh, device=device, dtype=torch.float32)
    dw = torch.arange(-(ww - 1), ww, device=device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).unsqueeze(0)
    norm = pretrained_window if pretrained_window[0] > 0 else window
    table[..., 0] /= max(norm[0] - 1, 1)
    table[..., 1] /= max(norm[1] - 1, 1)
    table = table * 8
    if log_spaced:
        return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table / 8


def window_partition(x: torch.Tensor, window: Int2) -> torch.Tensor:
    """(B, H, W, C) -> (B, num_windows, Wh*Ww, C)."""
    B, H, W, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    x = x.view(B, H // window[0], window[0], W // window[1], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, -1, window[0] * window[1], C)


def window_reverse(windows: torch.Tensor, window: Int2, H: int, W: int) -> torch.Tensor:
    """(B, num_windows, Wh*Ww, C) -> (B, H, W, C)."""
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, H // window[0], W // window[1], window[0], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def _regions(size: int, window: int, shift: int) -> List[Tuple[int, int]]:
    """The reference's three slices (0, -window), (-window, -shift), (-shift, None) of an axis of ``size``, as
    non-negative bounds (``-0`` is 0, as in Python's slicing)."""
    a = size - window if window > 0 else 0
    b = size - shift if shift > 0 else 0
    return [(0, a), (a, b), (b, size)]


def shift_mask(padded: Int2, window: Int2, shift: Int2, device: Optional[torch.device] = None,
               value: float = MASK_VALUE) -> torch.Tensor:
    """(num_windows, N, N) additive mask: MASK_VALUE between tokens that the cyclic shift brought together."""
    Hp, Wp = padded[0], padded[1]
    labels = torch.zeros((1, Hp, Wp, 1), device=device)
    count = 0
    for h0, h1 in _regions(Hp, window[0], shift[0]):
        for w0, w1 in _regions(Wp, window[1], shift[1]):
            if h1 > h0 and w1 > w0:
                labels[:, h0:h1, w0:w1, :] = float(count)
            count += 1
    lw = window_partition(labels, window)[0, :, :, 0]  # nW, N
    diff = lw.unsqueeze(1) - lw.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, value)


_DEFER_META_LOADS: List[int] = [0]


@contextlib.contextmanager
def defer_meta_loads():
    """Inside this context, ``load_state_dict`` on a :class:`SwinTransformer` whose parameters are on the meta device
    keeps the state dict (``pending_state_dict``) for after materialisation, so ``create_model(name,
    checkpoint=...)`` under ``torch.device("meta")`` gives an empty model that still knows its weights."""
    _DEFER_META_LOADS[0] += 1
    try:
        yield
    finally:
        _DEFER_META_LOADS[0] -= 1


def _dtensor_rng_ok(tensor: torch.Tensor) -> Optional[bool]:
    """None for a plain tensor; for a DTensor, whether its mesh has DTensor's random ops (CUDA-like devices: each
    shard gets its own part of one random stream). On CPU meshes every rank would draw the same numbers."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without torch.distributed
        return None
    if not isinstance(tensor, DTensor):
        return None
    kind = tensor.device_mesh.device_type
    return kind != "cpu" and hasattr(getattr(torch, kind, None), "set_rng_state")


@torch.no_grad()
def _random_(param: torch.Tensor, fill) -> None:
    """Apply the in-place random initialiser ``fill`` to ``param``. A DTensor on a mesh without DTensor RNG support
    gets one full draw on rank 0 of its mesh, scattered so each rank keeps its own shard (one parameter at a time)."""
    if _dtensor_rng_ok(param) is not False:
        fill(param)
        return
    from torch.distributed.tensor import distribute_tensor
    local = param.to_local()
    full = torch.empty(param.shape, dtype=param.dtype, device=local.device)
    fill(full)
    local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0).to_local())


def take_indices(num_stages: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """timm's ``indices`` convention: None -> every stage, an int n -> the last n, a sequence -> those stages
    (negative ones counted from the end). Returns (sorted stage indices, the largest)."""
    if indices is None:
        taken = list(range(num_stages))
    elif isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ConfigError(f"indices={indices} asks for the last {indices} of {num_stages} stages: use 1 to "
                              f"{num_stages}, or a list of stage indices")
        taken = list(range(num_stages - indices, num_stages))
    else:
        taken = []
        for i in indices:
            j = int(i) + num_stages if int(i) < 0 else int(i)
            if not 0 <= j < num_stages:
                raise ConfigError(f"stage index {i} is out of range for {num_stages} stages: use 0 to "
                                  f"{num_stages - 1} (or -1 for the last)")
            taken.append(j)
    return taken, max(taken)


class FeatureInfoList(list):
    """``feature_info``: a list of dicts (``num_chs``, ``reduction``, ``module``, and ``index`` for a features-only
    model), with the accessors of timm's ``FeatureInfo``."""

    def channels(self) -> List[int]:
        return [d["num_chs"] for d in self]

    def reduction(self) -> List[int]:
        return [d["reduction"] for d in self]

    def module_name(self) -> List[str]:
        return [d["module"] for d in self]

    def get_dicts(self) -> List[Dict[str, Any]]:
        return [dict(d) for d in self]


def _autocast_off(device: torch.device):
    if device.type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def attention_softmax(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The explicit path's attention probabilities: softmax(q k^T * scale + mask) over the keys."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        attn = attn + mask
    return attn.softmax(dim=-1)


@register_notrace_function  # FX: forward's optional masking inputs are traced as placeholders (None by default)
def mask_tokens(tokens: torch.Tensor, token_mask: Optional[torch.Tensor],
                mask_token: Optional[torch.Tensor]) -> torch.Tensor:
    """SimMIM: the (B, H, W, C) tokens where ``token_mask`` (B, H, W) is True replaced by ``mask_token`` (C,); the
    tokens as they are without a mask."""
    if token_mask is not None and mask_token is not None:
        w = token_mask.unsqueeze(-1).to(tokens.dtype)
        return tokens * (1.0 - w) + mask_token.to(tokens.dtype) * w
    return tokens


@register_notrace_function  # FX: as mask_tokens
def logits_unless_masked(logits: torch.Tensor, features: torch.Tensor,
                         token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """forward's output: the logits, or with a token mask (SimMIM) the final normalised feature map."""
    if token_mask is None:
        return logits
    return features


# ----------------------------------------------------------------------------------------------------------------
# Modules
# FX: timm's tracer keeps the modules whose forward branches on input shapes (padding, windows, shifts) as leaves
# ----------------------------------------------------------------------------------------------------------------

class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with the V1/V2 attention, bias and qkv-bias switches."""

    def __init__(self, dim: int, num_heads: int, window: Int2, *, attention: str, position_bias: str,
                 qkv_bias: str, pretrained_window: Int2 = (0, 0), attn_drop: float = 0.0, proj_drop: float = 0.0,
                 fused: bool = True, chunk_size: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by {num_heads} heads: pick num_heads dividing it")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window = tuple(window)
        self.window_area = window[0] * window[1]
        self.pretrained_window = tuple(pretrained_window)
        self.attention, self.position_bias_kind, self.qkv_bias_kind = attention, position_bias, qkv_bias
        self.fused = fused
        self.cpu_grad_mask_explicit = SDPA_CPU_GRAD_MASK_EXPLICIT
        self.logit_scale_max = LOGIT_SCALE_MAX
        self.chunk_size = chunk_size
        self.attn_drop = attn_drop

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "qkv")
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        if attention == "cosine":
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        if position_bias == "table":
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
        elif position_bias.startswith("cpb"):
            self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN, bias=True), nn.ReLU(inplace=True),
                                         nn.Linear(CPB_HIDDEN, num_heads, bias=False))
            self.register_buffer("relative_coords_table", torch.zeros(1, 2 * window[0] - 1, 2 * window[1] - 1, 2),
                                 persistent=False)
        if position_bias != "none":
            self.register_buffer("relative_position_index",
                                 torch.zeros(self.window_area, self.window_area, dtype=torch.long), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self, device: Optional[Union[str, torch.device]] = None) -> None:
        """(Re)compute the non-persistent buffers; they are never loaded from a checkpoint. With ``device``, they
        are first moved there (e.g. parameters offloaded to the CPU, buffers on the GPU)."""
        if device is not None:
            for name, buf in self._buffers.items():
                if buf is not None:
                    self._buffers[name] = torch.empty_like(buf, device=device)
        if self.position_bias_kind == "none":
            if self.qkv_bias_kind == "qv" and self.k_bias.device.type != "meta":
                self.k_bias.zero_()
            return
        device = self.relative_position_index.device
        if device.type == "meta":
            return
        self.relative_position_index.copy_(relative_position_index(self.window, device))
        if self.position_bias_kind.startswith("cpb"):
            self.relative_coords_table.copy_(relative_coords_table(
                self.window, self.pretrained_window, self.position_bias_kind == "cpb_log", device))
        if self.qkv_bias_kind == "qv":
            self.k_bias.zero_()

    def position_bias(self) -> Optional[torch.Tensor]:
        """(heads, N, N) fp32 bias: a table lookup (V1) or 16*sigmoid of the CPB MLP (V2), once per forward."""
        # (hasattr: TorchScript compiles only the branch of the attributes this module has)
        if not hasattr(self, "relative_position_index"):  # position_bias "none"
            return None
        if hasattr(self, "relative_position_bias_table"):
            table = self.relative_position_bias_table.float()
        elif torch.jit.is_scripting():
            table = self._cpb_table()
        else:
            with _autocast_off(self.relative_coords_table.device):  # the CPB MLP in fp32 under bf16/fp16 autocast
                table = self._cpb_table()
        N = self.window_area
        return table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)

    def _cpb_table(self) -> torch.Tensor:
        """V2: 16*sigmoid of the CPB MLP of the relative coordinates, in fp32: ((2Wh-1)(2Ww-1), heads)."""
        mlp = self.cpb_mlp
        hidden = F.relu(F.linear(self.relative_coords_table.float(), mlp[0].weight.float(), mlp[0].bias.float()))
        table = F.linear(hidden, mlp[2].weight.float()).view(-1, self.num_heads)
        return 16 * torch.sigmoid(table)

    def qkv_bias(self) -> Optional[torch.Tensor]:
        """The bias of the fused qkv projection: V1's ``qkv.bias``, or V2's ``q_bias | 0 | v_bias``.

        The zero k part is a buffer; DeepSpeed's bf16/fp16 engines cast parameters but not buffers, so it takes the
        parameters' dtype here (a no-op when they already agree)."""
        if hasattr(self, "q_bias"):  # "qv"
            return torch.cat((self.q_bias, self.k_bias.to(self.q_bias.dtype), self.v_bias))
        return self.qkv.bias

    def _attend(self, q, k, v, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """q, k, v: (B, w, heads, N, hd); mask: (w or 1, heads, N, N) or None -> (B, w, heads, N, hd).

        Where the mask differs per window the windows go into the head dimension, so the mask broadcasts over the
        batch with no copy; otherwise windows go into the batch and the (1, heads, N, N) bias broadcasts.
        """
        B, w, nH, N, hd = q.shape[0], q.shape[1], q.shape[2], q.shape[3], q.shape[4]
        if mask is not None and mask.shape[0] > 1:
            q, k, v = q.reshape(B, w * nH, N, hd), k.reshape(B, w * nH, N, hd), v.reshape(B, w * nH, N, hd)
            mask = mask.reshape(1, w * nH, N, N)
        else:
            q, k, v = q.reshape(B * w, nH, N, hd), k.reshape(B * w, nH, N, hd), v.reshape(B * w, nH, N, hd)
        explicit = False
        if mask is not None:
            mask = mask.to(q.dtype)
            explicit = (self.cpu_grad_mask_explicit and q.device.type == "cpu" and mask.requires_grad
                        and torch.is_grad_enabled())
        drop = self.attn_drop if self.training else 0.0
        if self.fused and not explicit:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scale)
        else:
            out = F.dropout(attention_softmax(q, k, mask, scale), p=drop) @ v
        return out.view(B, w, nH, N, hd)

    def _qkv_mask(self, x: torch.Tensor, mask: Optional[torch.Tensor]):
        """x: (B, nW, N, C), shift mask (nW, N, N) or None -> q, k, v (B, nW, heads, N, hd) ready for the product
        (V2: cosine-normalised, q times the logit scale), the additive mask (position bias plus shift mask,
        (nW or 1, heads, N, N), or None) and the scale that multiplies q k^T."""
        B, nW, N = x.shape[0], x.shape[1], x.shape[2]
        nH, hd = self.num_heads, self.head_dim
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        qkv = qkv.view(B, nW, N, 3, nH, hd).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each B, nW, nH, N, hd
        if hasattr(self, "logit_scale"):  # attention "cosine"
            # Mixed precision, where each V2 piece runs (as in the reference implementations under AMP):
            # - logit scale: clamp and exp in fp32 (autocast off), whatever the parameters' dtype;
            # - cosine normalisation: in fp32, then back to the compute dtype. Under autocast the references get this
            #   from torch (the norm is an fp32 autocast op); with half weights and no autocast (DeepSpeed bf16/fp16)
            #   a half-precision norm would lose the eps (1e-12 underflows in fp16: padded tokens gave NaN);
            # - CPB MLP: fp32 in position_bias(); the q.k^T and attn.v matmuls run in the compute dtype.
            if torch.jit.is_scripting():
                q, k = self._cosine(q, k)
            else:
                with _autocast_off(x.device):
                    q, k = self._cosine(q, k)
            scale = 1.0
        else:
            scale = hd ** -0.5
        bias = self.position_bias()
        if mask is not None:
            mask = mask[:, None] if bias is None else mask[:, None] + bias[None]  # nW, nH|1, N, N
            if mask.shape[1] == 1:
                mask = mask.expand(-1, nH, -1, -1)
        elif bias is not None:
            mask = bias[None]
        return q, k, v, mask, scale

    def _cosine(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """V2: q and k L2-normalised (in fp32 for half inputs), q times the clamped logit scale."""
        logit_scale = torch.clamp(self.logit_scale.float(), max=self.logit_scale_max).exp()
        if q.dtype == torch.float16 or q.dtype == torch.bfloat16:
            q_half = (F.normalize(q.float(), dim=-1) * logit_scale).to(q.dtype)
            return q_half, F.normalize(k.float(), dim=-1).to(k.dtype)
        return F.normalize(q, dim=-1) * logit_scale.to(q.dtype), F.normalize(k, dim=-1)

    def attention_probs(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention probabilities of the forward pass (without dropout), from the same inputs: x (B, nW, N, C)
        and the shift mask (nW, N, N) or None -> (B, nW, heads, N, N), each row summing to 1. Computed by the
        explicit softmax path (what ``fused=False`` runs), so ``attention_probs(x, mask) @ v`` is the forward's
        output before the heads are merged and projected."""
        q, k, _, mask, scale = self._qkv_mask(x, mask)
        return attention_softmax(q, k, None if mask is None else mask.to(q.dtype), scale)

    def attention_logits(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The logits :meth:`attention_probs` takes the softmax of, from the same inputs: (B, nW, heads, N, N),
        q k^T times the scale (V1: head_dim^-0.5 on the dot product; V2: the clamped logit scale on the cosine)
        plus the position bias and the shift mask."""
        q, k, _, mask, scale = self._qkv_mask(x, mask)
        logits = (q * scale) @ k.transpose(-2, -1)
        return logits if mask is None else logits + mask.to(logits.dtype)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, num_windows, N, C); mask: (num_windows, N, N) shift mask or None."""
        B, nW, N, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        q, k, v, mask, scale = self._qkv_mask(x, mask)
        chunk = self.chunk_size
        if chunk > 0 and nW > chunk:  # sequential attention: bounded memory for very large inputs, same result
            outs: List[torch.Tensor] = []
            for s in range(0, nW, chunk):
                m = mask
                if mask is not None and mask.shape[0] > 1:
                    m = mask[s:s + chunk]
                outs.append(self._attend(q[:, s:s + chunk], k[:, s:s + chunk], v[:, s:s + chunk], m, scale))
            out = torch.cat(outs, dim=1)
        else:
            out = self._attend(q, k, v, mask, scale)
        out = out.transpose(2, 3).reshape(B, nW, N, C)
        return self.proj_drop(self.proj(out))


@register_notrace_module
class SwinBlock(nn.Module):
    """(Shifted-)window attention and MLP with pre-norm (V1) or res-post-norm (V2) residuals."""

    def __init__(self, dim: int, num_heads: int, window: Int2, shift: Int2, *, norm_placement: str,
                 extra_norm: bool, mlp_ratio: float, drop_path: float, proj_drop: float,
                 **attn_kwargs: Any):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.res_post = norm_placement == "res_post"
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, proj_drop=proj_drop, **attn_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if extra_norm:
            self.norm3 = nn.LayerNorm(dim)
        self.register_buffer("attn_mask", None, persistent=False)
        self._mask_key = (0, 0, 0, 0)  # (padded H, padded W, shift h, shift w) of the precomputed attn_mask
        self._mask_cache: Dict[Tuple[Any, ...], torch.Tensor] = {}

    def set_input_resolution(self, resolution: Int2, device: Optional[Union[str, torch.device]] = None) -> None:
        """Precompute the shift mask for the stage resolution the model was built for (on ``device``, by default
        that of the block's parameters)."""
        key = self._mask_geometry(*resolution)
        self._mask_key = key
        self._mask_cache.clear()
        device = torch.device(device) if device is not None else self.norm1.weight.device
        if any(key[2:]) and device.type != "meta":
            self.attn_mask = shift_mask(key[:2], self.window, key[2:], device)
        else:
            self.attn_mask = None

    def _mask_geometry(self, H: int, W: int) -> Tuple[int, int, int, int]:
        wh, ww = self.window
        Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
        # no shift along a dimension that holds a single window (the clamp above, or a small runtime input)
        return Hp, Wp, self.shift[0] if wh < Hp else 0, self.shift[1] if ww < Wp else 0

    def _get_mask(self, key: Tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
        if key == self._mask_key:
            mask = self.attn_mask
            if mask is not None:
                return mask
        if torch.jit.is_scripting():  # TorchScript: no cache of the masks of other input sizes
            return shift_mask((key[0], key[1]), self.window, (key[2], key[3]), device)
        else:
            cache_key = key + (str(device),)
            mask = self._mask_cache.get(cache_key)
            if mask is None:
                mask = self._mask_cache[cache_key] = shift_mask(key[:2], self.window, key[2:], device)
            return mask

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1], x.shape[2]
        key = self._mask_geometry(H, W)
        Hp, Wp, sh, sw = key
        shifted = sh != 0 or sw != 0
        if shifted:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        if Hp != H or Wp != W:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        windows = window_partition(x, self.window)
        mask: Optional[torch.Tensor] = None
        if shifted:
            mask = self._get_mask(key, x.device)
        windows = self.attn(windows, mask)
        x = window_reverse(windows, self.window, Hp, Wp)
        if Hp != H or Wp != W:
            x = x[:, :H, :W].contiguous()
        if shifted:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.res_post:
            x = x + self.drop_path1(self.norm1(self._attn(x)))
            x = x + self.drop_path2(self.norm2(self.mlp(x)))
        else:
            x = x + self.drop_path1(self._attn(self.norm1(x)))
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        if hasattr(self, "norm3"):  # extra_norm (SwinV2-H/G); hasattr: static for TorchScript
            x = self.norm3(x)
        return x


@register_notrace_module
class PatchMerging(nn.Module):
    """2x2 neighbour concat (order (0,0),(1,0),(0,1),(1,1)) then norm->reduce (V1) or reduce->norm (V2)."""

    def __init__(self, dim: int, out_dim: int, merge_order: str):
        super().__init__()
        self.reduce_first = merge_order == "reduce_norm"
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim if self.reduce_first else 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        if H % 2 != 0 or W % 2 != 0:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        if self.reduce_first:
            return self.norm(self.reduction(x))
        return self.reduction(self.norm(x))


def check_images(x: torch.Tensor, patch_size: int) -> None:
    """One clear line for a batch that is not (B, C, H, W) with H and W multiples of ``patch_size``."""
    if x.ndim != 4:
        raise ConfigError(f"expected images shaped (batch, channels, height, width), got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ConfigError(f"input size {H}x{W} is not divisible by the patch size {patch_size}: resize or crop the "
                          f"images to a multiple of {patch_size}")


@register_notrace_module
class PatchEmbed(nn.Module):
    """Non-overlapping patch projection to NHWC tokens, then LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_images(x, self.patch_size)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    """Optional patch merging (timm places it at the start of stage i > 0), then the blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, geometry: Dict[str, Int2],
                 downsample: bool, merge_order: str, extra_norm_period: int, drop_path: Sequence[float],
                 **block_kwargs: Any):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim, merge_order) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, num_heads, geometry["window"], (0, 0) if j % 2 == 0 else geometry["shift"],
                      extra_norm=extra_norm_period > 0 and (j + 1) % extra_norm_period == 0,
                      drop_path=drop_path[j], **block_kwargs)
            for j in range(depth)])
        for blk in self.blocks:
            blk.set_input_resolution(geometry["resolution"])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class ClassifierHead(nn.Module):
    """Global average pool over (H, W) of NHWC features (``pool_type="avg"``; ``""``: no pooling, the classifier
    applies at every position), dropout, Linear (``head.fc`` as in timm)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0, pool_type: str = "avg"):
        super().__init__()
        self.pool_type = pool_type
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool_type == "avg":
            x = x.mean(dim=(1, 2))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class SwinTransformer(nn.Module):
    """Swin Transformer with V1/V2 switches (see the module docstring).

    Built from a :class:`~swinlab.models.config.SwinConfig`, kept (resolved) as ``model.config``. ``version`` picks
    the preset ("v1" or "v2"); any switch given explicitly overrides the preset, so an ablation such as "V1 with
    log-spaced CPB" is ``SwinTransformer(version="v1", position_bias="cpb_log")``.
    """

    out_indices: List[int]
    __jit_unused_properties__ = ["default_cfg"]  # TorchScript: a dict of mixed values, not used by forward

    def __init__(self, config: Optional[SwinConfig] = None, **kwargs: Any):
        """``SwinTransformer(config)``, ``SwinTransformer(**fields)`` or both (the keyword arguments replace those
        fields of ``config``): the fields and their defaults are :class:`~swinlab.models.config.SwinConfig`'s."""
        super().__init__()
        cfg = (config if config is not None else SwinConfig()).replace(**kwargs).resolved()
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.global_pool = cfg.global_pool
        self.output_fmt = "NHWC"  # timm's attribute: forward_features (and a features-only model's maps) are NHWC
        self.num_layers = cfg.num_stages
        self.patch_size = cfg.patch_size
        self.img_size = tuple(cfg.img_size)
        dims = cfg.stage_dims()
        self.num_features = dims[-1]
        self.geometry = stage_geometry(cfg.img_size, cfg.patch_size, cfg.window_size, cfg.num_stages)
        self.head_hidden_size = self.num_features
        self.feature_info = FeatureInfoList(
            dict(num_chs=dims[i], reduction=cfg.patch_size * 2 ** i, module=f"layers.{i}")
            for i in range(self.num_layers))
        # features-only mode (create_model(..., features_only=True)): forward returns the maps of these stages
        self.features_only = False
        self.out_indices: List[int] = []  # TorchScript: the class annotation gives the type of an empty list
        self.feature_fmt = "NHWC"
        # timm's data config for this model (timm.data.resolve_data_config(model=...)); create_model fills it from
        # timm's pretrained config of the matching tag
        self.pretrained_cfg: Dict[str, Any] = build_pretrained_cfg(cfg)

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dims[0])
        depths = cfg.depths
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(depths), device="cpu").tolist()
        layers, start = [], 0
        for i in range(self.num_layers):
            layers.append(SwinStage(
                dims[max(i - 1, 0)], dims[i], depths[i], cfg.num_heads[i], self.geometry[i], downsample=i > 0,
                merge_order=cfg.merge_order, extra_norm_period=cfg.extra_norm_period,
                drop_path=dpr[start:start + depths[i]], norm_placement=cfg.norm_placement,
                mlp_ratio=cfg.mlp_ratio, proj_drop=cfg.proj_drop_rate, attention=cfg.attention,
                position_bias=cfg.position_bias, qkv_bias=cfg.qkv_bias,
                pretrained_window=tuple(cfg.pretrained_window_size[i]), attn_drop=cfg.attn_drop_rate,
                fused=cfg.fused_attn, chunk_size=cfg.attn_chunk_size))
            start += depths[i]
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.drop_rate, cfg.global_pool)
        if not self.is_meta():  # a meta build has no values to draw: init_weights() runs after materialising it
            self.apply(self._init_weights)
            if cfg.norm_placement == "res_post":
                self._init_respostnorm()
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    # -- initialisation -------------------------------------------------------------------------------------------
    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _init_respostnorm(self) -> None:
        for blk in self.blocks():
            for norm in (blk.norm1, blk.norm2):
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)

    @torch.no_grad()
    def reset_buffers(self, device: Optional[Union[str, torch.device]] = None) -> None:
        """Rebuild every non-persistent buffer (index tables, CPB coordinates, shift masks), e.g. after
        materialising a model that was created on the meta device. ``device``: where the buffers go (default: where
        they are; the shift masks follow the block's parameters)."""
        for i, stage in enumerate(self.layers):
            for blk in stage.blocks:
                blk.attn.reset_buffers(device)
                blk.set_input_resolution(self.geometry[i]["resolution"], device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter as an eager build does (in distribution, not bit for bit: the eager
        ``__init__`` draws in construction order), then recompute the buffers (:meth:`reset_buffers`).

        For a model created on the meta device and materialised with ``to_empty``, sharded (FSDP2 DTensor
        parameters) or not. Per kind: Linear weights (attention, MLP, patch merging, CPB MLP, head) trunc-normal
        std 0.02 and zero biases; LayerNorms weight 1 / bias 0, except the V2 res-post norms (``norm1``/``norm2``),
        which are 0 / 0; ``logit_scale`` ln 10; ``q_bias``/``v_bias`` 0; V1 ``relative_position_bias_table``
        trunc-normal 0.02; the patch-embedding convolution as ``nn.Conv2d`` initialises itself.
        """
        for module in self.modules():
            self.init_module_weights(module)
        self.reset_buffers()

    @torch.no_grad()
    def init_module_weights(self, module: nn.Module) -> None:
        """Initialise the parameters that ``module`` (a submodule of this model) holds directly, not those of its
        children: DeepSpeed ZeRO-3 gathers one module's parameters at a time for this."""
        own = dict(module.named_parameters(recurse=False))
        if not own:
            return
        if isinstance(module, nn.Linear):
            _random_(module.weight, lambda t: trunc_normal_(t, std=0.02))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Conv2d):
            # nn.Conv2d's own init: kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as its bias
            fan_in = math.prod(module.weight.shape[1:])
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            _random_(module.weight, lambda t: nn.init.uniform_(t, -bound, bound))
            if module.bias is not None:
                _random_(module.bias, lambda t: nn.init.uniform_(t, -bound, bound))
        elif isinstance(module, nn.LayerNorm):
            res_post = any(blk.res_post and (module is blk.norm1 or module is blk.norm2) for blk in self.blocks())
            module.weight.fill_(0.0 if res_post else 1.0)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, WindowAttention):
            for name, param in own.items():
                if name == "relative_position_bias_table":
                    _random_(param, lambda t: trunc_normal_(t, std=0.02))
                elif name == "logit_scale":
                    param.fill_(math.log(10.0))
                elif name in ("q_bias", "v_bias"):
                    param.zero_()
                else:
                    raise RuntimeError(f"init_weights does not know WindowAttention.{name}: add its initialisation")
        else:
            raise RuntimeError(f"init_weights does not know the parameters {sorted(own)} of {type(module).__name__}: "
                               f"add their initialisation")

    # -- loading into a model that is still on the meta device ----------------------------------------------------
    pending_state_dict: Optional[Tuple[Dict[str, torch.Tensor], bool]] = None

    def is_meta(self) -> bool:
        """True while any parameter is still on the meta device (an empty-init build not yet materialised)."""
        return any(p.is_meta for p in self.parameters())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; inside :func:`defer_meta_loads`, a model still on the meta device checks
        the keys and shapes and keeps ``state_dict`` in ``pending_state_dict`` (PyTorch would copy into meta
        tensors, a no-op) for the materialisation to load (:meth:`load_pending_state_dict`)."""
        if not (_DEFER_META_LOADS[0] and not assign and self.is_meta()):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        shapes = [k for k in state_dict if k in own and tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if shapes or (strict and (missing or unexpected)):
            raise RuntimeError(f"state dict does not fit {type(self).__name__}: missing {missing[:3]}, unexpected "
                               f"{unexpected[:3]}, shape mismatches {shapes[:3]}")
        self.pending_state_dict = ({k: v for k, v in state_dict.items() if k in own}, bool(strict))
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def pop_pending_state_dict(self) -> Optional[Tuple[Dict[str, torch.Tensor], bool]]:
        """The (state dict, strict) kept by a deferred load, removed from the model; None if there is none."""
        pending, self.pending_state_dict = self.pending_state_dict, None
        return pending

    def load_pending_state_dict(self) -> bool:
        """Load a deferred state dict into this (materialised, unsharded) model; False if there was none."""
        pending = self.pop_pending_state_dict()
        if pending is None:
            return False
        super().load_state_dict(pending[0], strict=pending[1])
        return True

    # -- switches and helpers -------------------------------------------------------------------------------------
    def blocks(self) -> List["SwinBlock"]:
        return [blk for stage in self.layers for blk in stage.blocks]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (recompute activations in backward)."""
        self.config = self.config.replace(grad_checkpointing=bool(enable))
        for stage in self.layers:
            stage.grad_checkpointing = bool(enable)

    def set_fused_attn(self, enable: bool = True) -> None:
        """Switch between ``F.scaled_dot_product_attention`` and the explicit softmax path."""
        self.config = self.config.replace(fused_attn=bool(enable))
        for blk in self.blocks():
            blk.attn.fused = bool(enable)

    def set_attn_chunk_size(self, chunk_size: int) -> None:
        """Sequential attention: at most ``chunk_size`` windows at a time (0: all at once)."""
        if chunk_size < 0:
            raise ConfigError(f"attn_chunk_size={chunk_size} must be >= 0 (0 turns sequential attention off)")
        self.config = self.config.replace(attn_chunk_size=int(chunk_size))
        for blk in self.blocks():
            blk.attn.chunk_size = int(chunk_size)

    def no_weight_decay_keywords(self) -> set:
        """Parameter-name fragments that the official recipe trains without weight decay."""
        return {"relative_position_bias_table", "cpb_mlp", "logit_scale"}

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """timm's API: the names of the parameters trained without weight decay (those holding one of
        :meth:`no_weight_decay_keywords`: V1's bias tables, V2's CPB MLP and logit scales), as timm's
        ``SwinTransformer`` / ``SwinTransformerV2`` name them."""
        keywords = self.no_weight_decay_keywords()
        return {n for n, _ in self.named_parameters() if any(kw in n for kw in keywords)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's API: regexes grouping the parameters for layer-wise LR decay (``timm.models.group_parameters``).

        ``coarse``: timm's own Swin grouping (the stem, one group per stage). Fine: the official recipe's layer ids
        (microsoft/SimMIM ``get_swin_layer``, the Swin/SwinV2 fine-tuning recipes): the stem 0, the blocks
        1..sum(depths) in order, a patch merging with the block before it (the official layout ends a stage with
        it; ``MATCH_PREV_GROUP`` joins it to that block), the final norm with the head. timm's own Swin puts a patch
        merging with the block after it and the final norm with the last block; the recipe (``tasks.optim``) and
        timm's ``train.py --layer-decay`` on a swinlab model both get the official ids from here.
        """
        stem = r"^patch_embed" if self.config.version == "v1" else r"^absolute_pos_embed|patch_embed"
        if coarse:
            return dict(stem=stem, blocks=r"^layers\.(\d+)")
        return dict(stem=stem,
                    blocks=[(r"^layers\.(\d+)\.downsample", (-1,) + MATCH_PREV_GROUP),
                            (r"^layers\.(\d+)\.blocks\.(\d+)", None)],
                    head=r"^norm|^head")

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """timm's older name for :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new (re-initialised) classifier for ``num_classes`` (0: none, ``forward`` gives pooled features), on the
        device and in the dtype of the model's parameters. ``global_pool``: "avg" or "" (no pooling); None keeps the
        current one."""
        if global_pool is None:
            global_pool = self.global_pool
        self.config = self.config.replace(num_classes=num_classes, global_pool=global_pool).resolved()
        self.num_classes, self.global_pool = num_classes, global_pool
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)
        ref = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else next(self.parameters())
        with torch.device(ref.device):
            self.head = ClassifierHead(self.num_features, num_classes, self.config.drop_rate, global_pool).to(ref.dtype)
        if not ref.is_meta:
            self.head.apply(self._init_weights)
        self.head.train(self.training)  # a new head follows the model's mode (no dropout in an eval model)

    # -- forward --------------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> final normalised features (B, H/32, W/32, C_last), NHWC as in timm."""
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                mask_token: Optional[torch.Tensor] = None) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Images -> logits (a features-only model: its feature maps, see :meth:`as_features`). With ``token_mask``
        (B, H/patch, W/patch) bool and ``mask_token`` (C,): masked image modelling (SimMIM): the patch tokens where
        the mask is True are replaced by ``mask_token`` and the final normalised feature map (B, H/32, W/32, C_last)
        is returned. Both go through the module's own call, so a sharded (FSDP2) model gathers its root parameters
        as for a plain forward."""
        if self.features_only:
            return self._feature_maps(x)
        features = self.norm(self.layers(mask_tokens(self.patch_embed(x), token_mask, mask_token)))
        return logits_unless_masked(self.forward_head(features), features, token_mask)

    def _feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """A features-only model's forward (its stages end at the last map): the maps of ``out_indices``, as
        ``forward_intermediates(x, out_indices, stop_early=True, intermediates_only=True)`` gives them."""
        x = self.patch_embed(x)
        maps: List[torch.Tensor] = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in self.out_indices:
                maps.append(x.permute(0, 3, 1, 2).contiguous() if self.feature_fmt == "NCHW" else x)
        return maps

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, Sequence[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's API: the feature maps of the stages in ``indices`` (None: all, an int n: the last n, a list: those,
        negative from the end), as ``output_fmt`` "NCHW" (timm's format) or "NHWC" (swinlab's blocks' own
        layout, no copy). ``norm`` applies the final norm to the last stage's map, ``stop_early`` stops after the
        last stage asked for. Returns the maps, or (final normalised NHWC features, maps) unless
        ``intermediates_only``; the final features are those of the last stage run, normalised only if it is the
        model's last."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ConfigError(f"output_fmt={output_fmt!r}: use 'NCHW' or 'NHWC'")
        num_stages = len(self.layers)
        taken, last = take_indices(num_stages, indices)
        stages = self.layers[:last + 1] if stop_early else self.layers
        x = self.patch_embed(x)
        intermediates = []
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in taken:
                y = self.norm(x) if norm and i == num_stages - 1 else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        if i == num_stages - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's API: drop the stages after the last of ``indices`` (and then the final norm and head, which fit
        only the last stage), the final norm if ``prune_norm``, the classifier if ``prune_head``. Returns the
        stage indices kept for :meth:`forward_intermediates`."""
        taken, last = take_indices(len(self.layers), indices)
        prune_end = last < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.layers = self.layers[:last + 1]
        self.num_layers = len(self.layers)
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0)
        return taken

    def as_features(self, out_indices: Optional[Union[int, Sequence[int]]] = None,
                    output_fmt: str = "NHWC") -> "SwinTransformer":
        """Turn this model into a feature extractor in place (``create_model(..., features_only=True)``):
        ``forward`` returns the un-normalised maps of the stages ``out_indices`` (default all), NHWC as timm's
        ``features_only`` Swin models give them (or ``output_fmt="NCHW"``); the later stages, final norm and head
        are dropped; ``feature_info`` lists the maps returned."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ConfigError(f"output_fmt={output_fmt!r}: use 'NCHW' or 'NHWC'")
        infos = self.feature_info
        taken = self.prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True)
        self.features_only, self.out_indices, self.feature_fmt = True, taken, output_fmt
        self.output_fmt = output_fmt
        self.feature_info = FeatureInfoList(dict(infos[i], index=i) for i in taken)
        return self

    def forward_pyramid(self, x: torch.Tensor, norm_last: bool = False) -> List[torch.Tensor]:
        """Multi-scale features for detection/segmentation: one NCHW map per stage, strides
        patch_size * (1, 2, 4, 8) (4/8/16/32 for the standard models). ``norm_last`` applies the final norm
        to the last map. (:meth:`forward_intermediates` with every stage.)"""
        return self.forward_intermediates(x, norm=norm_last, intermediates_only=True)

