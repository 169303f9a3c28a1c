"""Lightning CheckpointIO that writes atomically and loads without unpickling arbitrary objects.

Save: a temporary file beside the target, flushed and fsync'ed, then ``os.replace`` onto the target, so a crash, a
kill or a full disk during a save leaves the previous checkpoint (``last.ckpt`` included) intact. Load:
``torch.load(weights_only=True)``: a checkpoint carrying a pickle payload is refused before anything in it runs.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from ..errors import CheckpointError
from ..models.checkpoint import safe_torch_load, unpickling_reason


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename; the old file survives any failure."""
    path = Path(str(path).removeprefix("file://"))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        _unlink_quietly(tmp)
        reason = _write_reason(exc, path)
        if reason is None:
            raise
        raise CheckpointError(f"could not write checkpoint {path} ({reason}): the previous "
                              f"checkpoint is intact; free disk space or set another checkpoint directory, then "
                              f"resume with --ckpt_path last") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _write_reason(exc: BaseException, path: Path) -> Optional[str]:
    """Why a save failed, in words, when it failed to write: an OSError's own reason (also one that torch's zip writer
    turned into a ``RuntimeError``: ``unexpected pos ...``, ``file write failed``), or a full disk; None for another
    error (a bug, not the disk)."""
    import errno
    import shutil

    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    try:
        if shutil.disk_usage(path.parent).free < (1 << 20):
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    text = str(exc).strip()
    if "write" in text.lower() or "unexpected pos" in text:
        return (text.splitlines() or [type(exc).__name__])[0][:160]
    return None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``safe_torch_load`` (tensors and plain containers only: a pickle payload is refused and never runs), with
    any other failure to read the file (foreign bytes the unpickler trips over) as one CheckpointError line."""
    try:
        return safe_torch_load(path, map_location=map_location)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}): the file is truncated or not a PyTorch "
                              f"checkpoint; copy or export it again") from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic saves and ``weights_only`` loads for local paths (remote paths use Lightning's own handling)."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(str(path).removeprefix("file://"),
                                    map_location=map_location if map_location is not None else "cpu")


# -- distributed checkpoint folders (FSDP2 / DeepSpeed): checked before their libraries unpickle them ---------------
TRUST_ENV = "SWINLAB_TRUST_CHECKPOINTS"
#: torch files in checkpoint folders may hold tensors, plain containers and these classes (DeepSpeed's ZeRO state)
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment.fragment_address")
_PICKLED_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


def checkpoints_trusted() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _dcp_metadata_global(module: str, name: str) -> bool:
    """What a ``torch.distributed.checkpoint`` ``.metadata`` file may name: its own dataclasses, sizes, dtypes,
    layouts, memory formats and paths. Constructing any of them runs no code of the file's choosing."""
    if module.startswith("torch.distributed.checkpoint."):
        return True
    if (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                          ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not _dcp_metadata_global(module, name):
            raise _Unsafe(f"{module}.{name}")
        return super().find_class(module, name)


class _Unsafe(Exception):
    pass


def _deepspeed_globals() -> list:
    import importlib
    found = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return found


def _torch_load_checked(source: Any) -> None:
    """``torch.load(weights_only=True)`` with DeepSpeed's plain classes allowed; raises _Unsafe otherwise."""
    import pickle
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            torch.load(source, map_location="cpu", weights_only=True,
                       mmap=not isinstance(source, io.BytesIO) and zipfile.is_zipfile(source))
    except pickle.UnpicklingError as exc:
        raise _Unsafe(unpickling_reason(exc)) from None


def check_checkpoint_folder(path: str | os.PathLike) -> None:
    """Refuse a checkpoint folder whose pickled parts hold anything but tensors, plain containers and the
    checkpoint libraries' own metadata classes, before FSDP2's distributed checkpoint (``.metadata`` and byte items,
    unpickled with ``pickle``/``weights_only=False`` by torch) or DeepSpeed (``torch.load(weights_only=False)``) reads
    it. ``SWINLAB_TRUST_CHECKPOINTS=1`` skips the check for folders you trust."""
    if checkpoints_trusted():
        return
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            if file.name == ".metadata":
                with open(file, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
                _check_byte_items(root, metadata)
            elif file.suffix in _PICKLED_SUFFIXES:
                _torch_load_checked(str(file))
        except _Unsafe as exc:
            raise CheckpointError(
                f"checkpoint folder {root}: {file.relative_to(root)} holds objects other than tensors and plain "
                f"containers ({exc}), which loading it would unpickle and run: resume only from folders you trust; "
                f"if this one is, set {TRUST_ENV}=1") from None
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"checkpoint folder {root}: cannot read {file.relative_to(root)} "
                                  f"({type(exc).__name__}): the folder is truncated or not a checkpoint; resume from "
                                  f"another one") from None


def _check_byte_items(root: Path, metadata: Any) -> None:
    """A distributed checkpoint keeps non-tensor values as ``torch.save`` blobs inside the ``.distcp`` files, which
    torch loads with ``weights_only=False``: check each with ``weights_only=True``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    byte_keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        if index.fqn not in byte_keys:
            continue
        if getattr(info, "transform_descriptors", None):
            raise _Unsafe(f"transformed byte item {index.fqn}")
        with open(root / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = io.BytesIO(f.read(info.length))
        _torch_load_checked(blob)
