"""Checkpoints: safe reading, layout remapping (official / timm / Lightning / swinlab) and window-size transfer.

Nothing here unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)`` of a file whose opcodes
have first been checked against an exact allowlist (:mod:`swinlab.models.pickle_scan`).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, first_line, unwritable_reason
from .config import SwinConfig
from .hub import check_preprocessing, preprocessing_of
from .limits import check_saved_config, saved_fields
from .pickle_scan import TENSOR_GLOBALS, MalformedPickle, UnsafePickle, check_torch_file
from .registry import REGISTRY
from .swin import SwinTransformer, stage_geometry

BUFFER_SUFFIXES = ("relative_position_index", "attn_mask", "relative_coords_table", "k_bias")
ANCHOR = "patch_embed.proj.weight"


def read_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a checkpoint file into (backbone state_dict with its prefix removed, swinlab metadata). The metadata of a
    swinlab safetensors file or Lightning checkpoint is ``{"model": registry name, "config": SwinConfig}``, with
    ``"pretrained_cfg"`` (the preprocessing its weights were trained with: mean, std, input_size, interpolation,
    crop_pct) where the file has it (also convert's timm files); other files have none (``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    meta: Dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                raw_meta = f.metadata() or {}
                obj: Any = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path} as safetensors ({first_line(exc)}): the file is truncated "
                                  f"or not safetensors; export it again") from None
        if "swinlab_config" in raw_meta:
            try:
                saved = json.loads(raw_meta["swinlab_config"])
            except (ValueError, RecursionError) as exc:
                raise CheckpointError(f"{path} has swinlab metadata that is not JSON ({type(exc).__name__}): "
                                      f"re-export it, or load its weights by model name") from None
            meta = dict(model=raw_meta.get("swinlab_model"), config=saved)
        if "pretrained_cfg" in raw_meta:
            try:
                meta["pretrained_cfg"] = json.loads(raw_meta["pretrained_cfg"])
            except (ValueError, RecursionError):
                raise CheckpointError(f"{path} has a pretrained_cfg that is not JSON: re-export the file") from None
    else:
        obj = safe_torch_load(path)
        if isinstance(obj, dict) and isinstance(obj.get("swinlab"), dict):  # a Lightning checkpoint of swinlab's
            meta = dict(obj["swinlab"])
        elif isinstance(obj, dict) and "pretrained_cfg" in obj:  # convert --format timm's .pth
            meta = dict(pretrained_cfg=obj["pretrained_cfg"])
    if not isinstance(meta.get("model"), (str, type(None))):
        meta["model"] = None  # only ever quoted in messages
    if "config" in meta:
        meta["config"] = _saved_config(meta["config"], path)
    if "pretrained_cfg" in meta:
        meta["pretrained_cfg"] = check_preprocessing(meta["pretrained_cfg"], str(path))
    return _unwrap(obj, path), meta


def _saved_config(saved: Any, path: Path) -> Optional[SwinConfig]:
    """The model config in swinlab metadata (``SwinConfig.to_dict``: the model's config keys), None if empty; its
    values are data (:func:`~swinlab.models.limits.check_saved_config`: types, the family's bounds, the memory the
    model needs on this machine), checked before anything is built from them."""
    if not saved:
        return None
    try:
        config = SwinConfig(**saved_fields(saved))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path} has swinlab metadata that is not a model config ({first_line(exc)}): "
                              f"re-export it, or load its weights by name without the metadata") from None
    return check_saved_config(config, str(path))


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def unpickling_reason(exc: BaseException) -> str:
    """What a ``weights_only`` load refused: the dotted name of the class or function torch would not build (torch's
    message opens with a generic paragraph, with terminal colour codes, and names it further down)."""
    found = _UNSAFE_GLOBAL.search(str(exc))
    if found:
        return found.group(1)
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(exc, 120))


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` after :func:`~swinlab.models.pickle_scan.check_torch_file` has read the
    file's opcodes against an exact allowlist (tensors, parameters, plain containers), with one-line errors: a pickle
    payload is refused before anything is unpickled, a truncated or foreign file is named as such."""
    path = Path(path)
    check_checkpoint_file(path)
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects that only unpickling could build "
            f"({unpickling_reason(exc)}); swinlab loads tensors only: save model.state_dict() or safetensors"
        ) from None
    except Exception as exc:  # truncated zip, foreign format, KeyError from a malformed archive, ...
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}: {first_line(exc)}): the file is truncated "
                              f"or not a PyTorch checkpoint; copy or export it again") from None


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Refuse, in one line, a ``torch.save`` file that names anything but tensors, parameters and plain containers,
    read from its opcodes (:func:`~swinlab.models.pickle_scan.check_torch_file`): nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    try:
        check_torch_file(str(path), TENSOR_GLOBALS)  # the opcodes, before anything is unpickled
    except MalformedPickle as exc:
        raise CheckpointError(f"cannot read {path} ({exc}): the file is truncated or not a PyTorch checkpoint; copy "
                              f"or export it again") from None
    except UnsafePickle as exc:
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects that only unpickling could build ({exc}); swinlab "
            f"loads tensors only: save model.state_dict() or safetensors") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror or exc}): check the file and its "
                              f"permissions") from None


def _unwrap(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    """Find the backbone weights: Lightning's ``state_dict``, official ``model``, or a plain dict; then drop any
    module prefix (``model.``, ``module.``, ``encoder.`` ...)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict: save model.state_dict()")
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), dict) and not isinstance(obj.get(key), torch.Tensor):
            obj = obj[key]
            break
    anchors = [k[: -len(ANCHOR)] for k in obj if isinstance(k, str) and k.endswith(ANCHOR)]
    if not anchors:
        raise CheckpointError(f"no Swin weights in {path} (no key ending in {ANCHOR!r}): is this a Swin checkpoint?")
    prefix = min(anchors, key=len)
    return {k[len(prefix):]: v for k, v in obj.items()
            if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}


def remap_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official microsoft/Swin-Transformer layout -> timm/swinlab layout (a timm state_dict passes unchanged).

    Drops the index/mask/coordinate buffers (always rebuilt), moves ``layers.i.downsample`` to the start of stage
    i+1, and renames ``head.{weight,bias}`` to ``head.fc.{weight,bias}``.
    """
    official = any(k.startswith("layers.0.downsample.") for k in state_dict) or "head.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        if k.endswith(BUFFER_SUFFIXES):
            continue
        if official:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            if k in ("head.weight", "head.bias"):
                k = "head.fc." + k.split(".")[-1]
        out[k] = v
    return out


def resize_bias_table(table: torch.Tensor, src_window: Tuple[int, int], dst_window: Tuple[int, int]) -> torch.Tensor:
    """V1 window transfer: bicubic interpolation of a ((2Wh-1)(2Ww-1), heads) table, as the official fine-tuning
    code does (``F.interpolate(..., mode='bicubic')``)."""
    heads = table.shape[1]
    src = (2 * src_window[0] - 1, 2 * src_window[1] - 1)
    dst = (2 * dst_window[0] - 1, 2 * dst_window[1] - 1)
    grid = table.T.reshape(1, heads, *src).float()
    out = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    return out.reshape(heads, -1).T.contiguous().to(table.dtype)


def infer_num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    w = state_dict.get("head.fc.weight", state_dict.get("head.weight"))
    return int(w.shape[0]) if w is not None else None


def describe_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Architecture read off a (remapped) state dict."""
    sd = remap_state_dict(state_dict)
    pe = sd[ANCHOR]
    depth: Dict[int, int] = {}
    for k in sd:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depth[i] = max(depth.get(i, 0), j + 1)
    stages = sorted(depth)
    heads = []
    for i in stages:
        for suffix, dim in (("attn.logit_scale", 0), ("attn.relative_position_bias_table", 1),
                            ("attn.cpb_mlp.2.weight", 0)):
            t = sd.get(f"layers.{i}.blocks.0.{suffix}")
            if t is not None:
                heads.append(int(t.shape[dim]))
                break
    v2 = any(k.endswith(("logit_scale", "q_bias", "cpb_mlp.0.weight")) for k in sd)
    window = None
    table = sd.get("layers.0.blocks.0.attn.relative_position_bias_table")
    if table is not None:
        side = int(round(table.shape[0] ** 0.5))
        if side * side == table.shape[0]:
            window = (side + 1) // 2
    return dict(version="v2" if v2 else "v1", embed_dim=int(pe.shape[0]), patch_size=int(pe.shape[-1]),
                depths=[depth[i] for i in stages], num_heads=heads, window=window)


def fitting_variants(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Registry names whose architecture matches the state dict (same window first for V1)."""
    try:
        arch = describe_state_dict(state_dict)
    except Exception:
        return []
    hits = [v for v in REGISTRY.values()
            if v.config.version == arch["version"] and v.config.embed_dim == arch["embed_dim"]
            and v.config.patch_size == arch["patch_size"] and list(v.config.depths) == arch["depths"]
            and (not arch["num_heads"] or list(v.config.num_heads) == arch["num_heads"])]
    hits.sort(key=lambda v: v.config.window_size != arch["window"])
    return [v.name for v in hits]


def load_into_model(model: SwinTransformer, state_dict: Dict[str, torch.Tensor], *, source: SwinConfig,
                    checkpoint: str = "<state dict>", reset_head: bool = False) -> None:
    """Load weights saved at ``source`` geometry into ``model`` (possibly another size/window); ``checkpoint`` names
    the weights in errors and warnings."""
    sd = remap_state_dict(state_dict)
    own = model.state_dict()
    name = getattr(model, "variant_name", "the model")

    skipped_head = False
    hw = sd.get("head.fc.weight")
    if hw is not None and own.get("head.fc.weight") is not None and hw.shape != own["head.fc.weight"].shape:
        if reset_head:
            sd.pop("head.fc.weight")
            sd.pop("head.fc.bias", None)
            skipped_head = True
            warnings.warn(f"{checkpoint}: classifier head has {hw.shape[0]} classes, the model {model.num_classes}: "
                          f"head re-initialised, all other weights loaded", stacklevel=3)
    elif hw is not None and "head.fc.weight" not in own:  # num_classes=0: feature extractor
        sd.pop("head.fc.weight")
        sd.pop("head.fc.bias", None)
    elif hw is None and "head.fc.weight" in own:  # a pretrained backbone (e.g. SimMIM) into a classifier
        skipped_head = True
        warnings.warn(f"{checkpoint} has no classifier head (a pretrained backbone): head initialised for "
                      f"{model.num_classes} classes, all other weights loaded", stacklevel=3)

    src_geo = stage_geometry(source.img_size, source.patch_size, source.window_size, len(model.layers))
    for k in list(sd):
        if not k.endswith("relative_position_bias_table") or k not in own:
            continue
        if sd[k].shape == own[k].shape or sd[k].shape[1] != own[k].shape[1]:
            continue
        stage, block = int(k.split(".")[1]), int(k.split(".")[3])
        dst = model.layers[stage].blocks[block].attn.window
        src = src_geo[stage]["window"]
        if (2 * src[0] - 1) * (2 * src[1] - 1) != sd[k].shape[0]:  # saved at another window: read it off a square table
            side = int(round(sd[k].shape[0] ** 0.5))
            src = ((side + 1) // 2,) * 2
        if (2 * src[0] - 1) * (2 * src[1] - 1) == sd[k].shape[0]:
            sd[k] = resize_bias_table(sd[k], src, dst)

    missing = [k for k in own if k not in sd and not (skipped_head and k.startswith("head.fc."))]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{k}: {tuple(sd[k].shape)} in the checkpoint vs {tuple(own[k].shape)} in the model"
                    for k in shapes[:2]]
        problems += [f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]]
        fits = [f for f in fitting_variants(sd) if f != name]
        hint = (f"it fits {', '.join(fits[:3])}: create that model instead" if fits
                else "no registered variant fits it: check the checkpoint")
        if not missing and not unexpected and all(k.startswith("head.fc.") for k in shapes):
            hint = (f"only the classifier differs ({hw.shape[0]} classes in the checkpoint): create the model with "
                    f"num_classes={hw.shape[0]}, or load with reset_head=True to re-initialise it")
        raise CheckpointError(f"checkpoint {checkpoint} does not fit {name} "
                              f"({len(shapes)} shape mismatches, {len(missing)} missing, {len(unexpected)} unexpected "
                              f"keys; first: {'; '.join(problems)}); {hint}")
    wrong = [k for k in sd if k in own and own[k].is_floating_point() and not sd[k].is_floating_point()]
    if wrong:  # PyTorch would cast int8/uint8 (quantised or corrupt) values silently into the float weights
        raise CheckpointError(f"checkpoint {checkpoint} holds {sd[wrong[0]].dtype} values for floating-point weights "
                              f"({len(wrong)} tensors, first {wrong[0]}): quantised or not a weights file; export "
                              f"float weights (fp32/bf16/fp16) and load those")
    model.load_state_dict(sd, strict=not skipped_head)


def save_safetensors(model: SwinTransformer, path: str | os.PathLike, model_name: Optional[str] = None,
                     extra_metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the weights, the model's config and its preprocessing (``model.pretrained_cfg``'s mean, std,
    input_size, interpolation, crop_pct) as safetensors, atomically (temp file + rename)."""
    from safetensors.torch import save_file
    path = Path(path)
    name = model_name or getattr(model, "variant_name", None) or ""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "swinlab_model": name, "swinlab_config": json.dumps(model.config.to_dict())}
    preprocessing = preprocessing_of(getattr(model, "pretrained_cfg", None))
    if preprocessing:
        meta["pretrained_cfg"] = json.dumps(preprocessing)
    meta.update(extra_metadata or {})
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
        os.close(fd)
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    except Exception as exc:  # OSError, or safetensors' own error for a failed write (a full disk: IoError)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        text = str(exc).lower()
        if not isinstance(exc, OSError) and not any(w in text for w in ("ioerror", "i/o error", "os error")):
            raise
        reason = unwritable_reason(path, exc) if isinstance(exc, OSError) else first_line(exc, 160)
        raise CheckpointError(f"could not write {path} ({reason}): any previous file is intact; free disk space or "
                              f"choose another path") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
