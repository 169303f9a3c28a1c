"""Pretrained weights by name: timm's tags (``swinv2_tiny_window8_256.ms_in1k``) and ``hf-hub:`` repos through the
Hugging Face cache, official checkpoints by URL through the torch.hub cache; timm's pretrained configs.

Which repo holds a tag's weights, a tag's input size, mean/std, crop: timm's registry of pretrained configs
(``timm.models.get_pretrained_cfg``, ``timm.list_pretrained``); nothing is tabulated here. Downloads go through
``huggingface_hub.hf_hub_download`` (its cache, ``HF_HUB_OFFLINE=1`` honoured) and ``torch.hub.download_url_to_file``
into ``torch.hub.get_dir()/checkpoints``; the files are then read by :func:`~swinlab.models.checkpoint.read_checkpoint`
(safetensors or ``weights_only``), never unpickled.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import urlparse

from ..errors import CheckpointError, ConfigError, first_line

HF_PREFIX = "hf-hub:"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's hub layout: safetensors first


# ----------------------------------------------------------------------------------------------------------------
# timm's pretrained configs
# ----------------------------------------------------------------------------------------------------------------

def split_tag(name: str) -> Tuple[str, Optional[str]]:
    """``"arch.tag"`` -> ``("arch", "tag")``; ``"arch"`` -> ``("arch", None)``."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def list_tags(arch: str) -> List[str]:
    """timm's pretrained tags of architecture ``arch`` that have weights, the default first (``[]`` if none)."""
    import timm
    names = timm.list_pretrained(f"{arch}.*")
    tags = [split_tag(n)[1] for n in names if split_tag(n)[0] == arch]
    default = timm_pretrained_cfg(arch)
    first = default.get("tag") if default else None
    return sorted(tags, key=lambda t: (t != first, t))


def timm_pretrained_cfg(arch: str, tag: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """timm's pretrained config of ``arch.tag`` (default tag without one) as a dict, None where timm has none."""
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    except RuntimeError:  # the architecture is timm's, the tag is not
        return None
    return cfg.to_dict() if cfg is not None else None


def resolve_tag(arch: str, tag: Optional[str]) -> Dict[str, Any]:
    """The pretrained config of ``arch`` and ``tag`` (timm's default tag if None) that has weights; a one-line
    ConfigError naming the tags there are otherwise."""
    tags = list_tags(arch)
    if not tags:
        raise ConfigError(f"{arch} has no public pretrained weights (timm lists no tag for it): create it without "
                          f"pretrained, or pass checkpoint=<file, hf-hub:org/repo or URL>")
    if tag is not None and tag not in tags:
        raise ConfigError(f"unknown pretrained tag {tag!r} for {arch}: use one of {', '.join(tags)} "
                          f"(`python -m swinlab models` lists them)")
    cfg = timm_pretrained_cfg(arch, tag or tags[0])
    assert cfg is not None
    return cfg


def weights_source(cfg: Dict[str, Any]) -> str:
    """Where a pretrained config's weights are: ``hf-hub:<repo>`` (timm's hub copy) or the official URL."""
    if cfg.get("hf_hub_id"):
        return HF_PREFIX + cfg["hf_hub_id"]
    if cfg.get("url"):
        return cfg["url"]
    raise ConfigError(f"{cfg.get('architecture')}.{cfg.get('tag')} has no downloadable weights in timm's config: "
                      f"pass checkpoint=<file>")


# ----------------------------------------------------------------------------------------------------------------
# Fetching: hf-hub repos and URLs into their caches
# ----------------------------------------------------------------------------------------------------------------

def fetch(checkpoint: Union[str, os.PathLike]) -> Path:
    """A local file for ``checkpoint``: ``hf-hub:org/repo[@revision]`` through the Hugging Face cache, an
    ``http(s)://`` URL through the torch.hub cache, anything else as the path it is."""
    text = str(checkpoint)
    if text.startswith(HF_PREFIX):
        return fetch_hf(text[len(HF_PREFIX):])
    if text.startswith(("http://", "https://")):
        return fetch_url(text)
    return Path(checkpoint)


def fetch_hf(repo: str) -> Path:
    """``org/name[@revision]`` -> the cached path of its weights (``model.safetensors``, else ``pytorch_model.bin``),
    downloaded by ``hf_hub_download`` unless its cache has them."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise CheckpointError(f"hf-hub:{repo} is not a Hugging Face repo id: write hf-hub:<org>/<name>, e.g. "
                              f"hf-hub:timm/swinv2_tiny_window8_256.ms_in1k")
    cache = constants.HF_HUB_CACHE
    if not constants.is_offline_mode():
        unreachable = hub_unreachable(repo_id, revision or None)
        if unreachable is not None:  # hf_hub_download would retry for ~50 s before giving up: use the cache now
            for filename in HF_WEIGHT_FILES:
                cached = try_to_load_from_cache(repo_id, filename, revision=revision or None)
                if isinstance(cached, str):
                    return Path(cached)
            raise CheckpointError(f"hf-hub:{repo} weights are not in the Hugging Face cache ({cache}) and the Hub "
                                  f"({constants.ENDPOINT}) could not be reached ({unreachable}): check the network, "
                                  f"or copy the cache from a machine that has them")
    not_cached = False
    for filename in HF_WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None))
        except LocalEntryNotFoundError:  # offline (or unreachable) and not in the cache: try the next name
            not_cached = True
            continue
        except EntryNotFoundError:  # the repo exists online but has no such file: try the next name
            continue
        except Exception as exc:  # repository not found, gated, HTTP errors ...
            raise CheckpointError(f"cannot download hf-hub:{repo} ({type(exc).__name__}: {first_line(exc, 160)}): "
                                  f"check the repo name, or log in (`hf auth login`) for a gated repo") from None
    if not_cached and constants.is_offline_mode():
        raise CheckpointError(f"hf-hub:{repo} weights are not in the Hugging Face cache ({cache}) and "
                              f"HF_HUB_OFFLINE=1: run once online or copy the cache")
    if not_cached:
        raise CheckpointError(f"hf-hub:{repo} weights are not in the Hugging Face cache ({cache}) and the Hub could "
                              f"not be reached: check the network, or copy the cache from a machine that has them")
    raise CheckpointError(f"hf-hub:{repo} holds neither of {', '.join(HF_WEIGHT_FILES)}: is it a timm model repo?")


def hub_unreachable(repo_id: str, revision: Optional[str] = None) -> Optional[str]:
    """Ask the Hub once, without retries, for the metadata of ``repo_id``'s weights (``get_hf_file_metadata``, timeout
    ``HF_HUB_ETAG_TIMEOUT`` seconds, 10 by default): None when it answers (any answer, a 404 or 401 included:
    ``hf_hub_download`` then says what it means), else why it could not be reached (no route, name resolution, refused
    connection, timeout)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, HF_WEIGHT_FILES[0], revision=revision),
                             timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (HfHubHTTPError, EntryNotFoundError) as exc:
        if isinstance(exc, LocalEntryNotFoundError):
            return f"{type(exc).__name__}: {first_line(exc, 120)}"
        return None
    except Exception as exc:  # the transport's own errors: ConnectError, ConnectTimeout, ReadTimeout ...
        return f"{type(exc).__name__}: {first_line(exc, 120)}"
    return None


def url_cache_path(url: str) -> Path:
    """Where :func:`fetch_url` keeps ``url``: ``torch.hub.get_dir()/checkpoints/<file name>``, as torch.hub does."""
    import torch.hub
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise CheckpointError(f"{url} names no file: give the URL of the checkpoint file itself")
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def fetch_url(url: str) -> Path:
    """The torch.hub-cached copy of ``url``, downloaded (``torch.hub.download_url_to_file``) only if absent."""
    import torch.hub
    dst = url_cache_path(url)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=True)
    except Exception as exc:  # URLError, HTTPError, timeouts, disk full ...
        raise CheckpointError(f"cannot download {url} ({type(exc).__name__}: {first_line(exc, 160)}): check the "
                              f"network, or put the file at {dst}") from None
    return dst


# ----------------------------------------------------------------------------------------------------------------
# The model's pretrained_cfg
# ----------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_pretrained_cfg(config: Any, arch: Optional[str] = None, tag: Optional[str] = None,
                         num_classes: Optional[int] = None) -> Dict[str, Any]:
    """A timm-style ``pretrained_cfg`` for a model built from ``config`` (a resolved SwinConfig): timm's config of
    ``arch.tag`` (its default tag without one) where timm has one, else swinlab's defaults (ImageNet mean/std,
    bicubic, crop 0.9); input size, pool size and class count always the model's own."""
    base = timm_pretrained_cfg(arch, tag) if arch else None
    cfg: Dict[str, Any] = dict(
        url="", hf_hub_id=None, architecture=arch, tag=tag, crop_pct=0.9, crop_mode="center",
        interpolation="bicubic", fixed_input_size=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        first_conv="patch_embed.proj", classifier="head.fc", license="mit")
    if base:
        cfg.update({k: v for k, v in base.items() if v is not None})
    h, w = config.img_size
    reduction = config.patch_size * 2 ** (len(config.depths) - 1)
    cfg.update(input_size=(config.in_chans, h, w), pool_size=(h // reduction, w // reduction),
               num_classes=config.num_classes if num_classes is None else num_classes)
    return cfg


# What a model's weights expect of their input, carried in every file swinlab writes (metadata ``pretrained_cfg``):
# the run's normalisation, input size, resize interpolation and evaluation crop, as timm's pretrained_cfg names them
PREPROCESSING_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct")


def preprocessing_of(cfg: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The preprocessing keys of a pretrained_cfg (or a data module's ``preprocessing``), JSON-ready (lists)."""
    out: Dict[str, Any] = {}
    for k in PREPROCESSING_KEYS:
        v = (cfg or {}).get(k)
        if v is not None:
            out[k] = [float(x) if k != "input_size" else int(x) for x in v] if isinstance(v, (list, tuple)) else v
    return out


def check_preprocessing(saved: Any, where: str) -> Dict[str, Any]:
    """A file's ``pretrained_cfg`` metadata, validated: a CheckpointError naming the bad entry otherwise."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} has a pretrained_cfg that is not a mapping ({type(saved).__name__}): "
                              f"re-export the file")
    try:
        pp = preprocessing_of(saved)
        bad = [k for k in ("mean", "std") if k in pp and not (isinstance(pp[k], list) and pp[k])]
        bad += ["std"] if any(x <= 0 for x in pp.get("std") or []) else []
        bad += ["input_size"] if "input_size" in pp and not (isinstance(pp["input_size"], list)
                                                             and len(pp["input_size"]) == 3) else []
        bad += ["interpolation"] if not isinstance(pp.get("interpolation", ""), str) else []
        bad += ["crop_pct"] if not 0 < float(pp.get("crop_pct", 1.0)) <= 1 else []
    except (TypeError, ValueError):
        bad = ["a value"]
    if bad:
        raise CheckpointError(f"{where} has a malformed pretrained_cfg ({bad[0]} of {str(saved)[:120]}): "
                              f"re-export the file")
    return pp


def apply_preprocessing(cfg: Dict[str, Any], saved: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` (a model's pretrained_cfg) with a file's mean, std, interpolation and crop_pct; the input size stays
    the model's own (the file's unless the model was built at another size)."""
    out = dict(cfg)
    for k in ("mean", "std"):
        if k in saved:
            out[k] = tuple(saved[k])
    for k in ("interpolation", "crop_pct"):
        if k in saved:
            out[k] = saved[k]
    return out
