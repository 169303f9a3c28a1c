"""Lightning CheckpointIO that writes atomically and loads without unpickling arbitrary objects.

Save: a temporary file beside the target, flushed and fsync'ed, then ``os.replace`` onto the target, so a crash, a
kill or a full disk during a save leaves the previous checkpoint (``last.ckpt`` included) intact. Load: the file's
opcodes are checked against an exact allowlist (:mod:`swinlab.models.pickle_scan`), then
``torch.load(weights_only=True)``: a checkpoint carrying a pickle payload is refused before anything in it runs.
Checkpoint folders (FSDP2, DeepSpeed), which their libraries unpickle without restriction, get the same opcode check
(:func:`check_checkpoint_folder`).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from ..errors import CheckpointError
from ..models.checkpoint import check_checkpoint_file, safe_torch_load
from ..models.pickle_scan import (
    DTYPE_GLOBALS,
    TENSOR_GLOBALS,
    MalformedPickle,
    UnsafePickle,
    check_torch_file,
    pickle_globals,
)


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


def _check_remote_file(path: Any) -> None:
    """The opcode check of a remote checkpoint (fsspec), before Lightning's ``weights_only`` load of it."""
    import fsspec
    try:
        with fsspec.open(str(path), "rb") as f:
            check_torch_file(f, TENSOR_GLOBALS)
    except MalformedPickle as exc:
        raise CheckpointError(f"cannot read {path} ({exc}): the file is truncated or not a PyTorch checkpoint; copy "
                              f"or export it again") from None
    except UnsafePickle as exc:
        raise CheckpointError(f"refused to load {path}: it holds Python objects that only unpickling could build "
                              f"({exc}); swinlab loads tensors only: save model.state_dict() or safetensors") from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic saves and ``weights_only`` loads for local paths (remote paths use Lightning's own handling)."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        if not _is_local(path):
            _check_remote_file(path)
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(str(path).removeprefix("file://"),
                                    map_location=map_location if map_location is not None else "cpu")


# -- distributed checkpoint folders (FSDP2 / DeepSpeed): checked before their libraries unpickle them ---------------
TRUST_ENV = "SWINLAB_TRUST_CHECKPOINTS"
#: what DeepSpeed's ZeRO files name besides tensors (its loss scalers, ZeRO stage and fragment map)
DEEPSPEED_GLOBALS: frozenset = frozenset({("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                                          ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                                          ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                                          ("deepspeed.utils.tensor_fragment", "fragment_address")})
#: what a ``torch.distributed.checkpoint`` ``.metadata`` pickle names: its own dataclasses, sizes, dtypes, layouts,
#: memory formats and the checkpoint's path
DCP_METADATA_GLOBALS: frozenset = frozenset(
    {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
       ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("torch", "Size"), ("collections", "OrderedDict")}
    | DTYPE_GLOBALS)
#: torch files in checkpoint folders (DeepSpeed's model and optimizer states, Lightning's meta.pt, DCP byte items)
FOLDER_TORCH_GLOBALS: frozenset = TENSOR_GLOBALS | DEEPSPEED_GLOBALS
_PICKLED_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


def checkpoints_trusted() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


class _Refused(Exception):
    """A file of the folder that the check refuses (the reason, and whether it is the file's content or layout)."""


class _ExactUnpickler(pickle.Unpickler):
    """Reads a ``.metadata`` pickle that :func:`pickle_globals` has passed, admitting the same exact pairs only."""

    def find_class(self, module: str, name: str):
        if (module, name) not in DCP_METADATA_GLOBALS:
            raise UnsafePickle(f"{module}.{name}")
        return super().find_class(module, name)


def check_checkpoint_folder(path: str | os.PathLike) -> None:
    """Refuse a checkpoint folder unless every pickle in it names only exact, listed globals, before FSDP2's
    distributed checkpoint (``.metadata`` and byte items, unpickled by torch with ``pickle`` and
    ``weights_only=False``), Lightning (``meta.pt``) or DeepSpeed (``*.pt``, ``torch.load(weights_only=False)``)
    reads it. Nothing is imported or resolved to decide (:mod:`swinlab.models.pickle_scan`); paths the folder names
    (DeepSpeed's ``latest``, the storage files of ``.metadata``) must be files of the folder, and links inside it are
    refused. ``SWINLAB_TRUST_CHECKPOINTS=1`` skips the check for folders you trust."""
    if checkpoints_trusted():
        return
    root = Path(path)
    current = None
    try:
        files = _folder_files(root)
        storage: set = set()
        for file in files:
            if file.name.endswith(".metadata"):
                current = file
                storage |= _check_dcp_metadata(root, file)
        current = root / "latest"
        if current.is_file():
            _check_latest(root, current)
        for file in files:
            current = file
            if file.name.endswith(".metadata") or file.name in storage:
                continue
            with open(file, "rb") as f:
                head = f.read(4)
            if file.suffix in _PICKLED_SUFFIXES or head[:1] == b"\x80" or head == b"PK\x03\x04":
                check_torch_file(str(file), FOLDER_TORCH_GLOBALS)
    except MalformedPickle as exc:
        raise CheckpointError(f"checkpoint folder {root}: cannot read {_rel(root, current)} ({exc}): the folder is "
                              f"truncated or not a checkpoint; resume from another one") from None
    except UnsafePickle as exc:
        raise CheckpointError(
            f"checkpoint folder {root}: {_rel(root, current)} holds objects other than tensors and plain "
            f"containers ({exc}), which loading it would unpickle and run: resume only from folders you trust; "
            f"if this one is, set {TRUST_ENV}=1") from None
    except _Refused as exc:
        raise CheckpointError(f"checkpoint folder {root}: {exc}; resume only from folders you trust (copy the "
                              f"checkpoint as a plain folder), or set {TRUST_ENV}=1 if this one is") from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint folder {root}: cannot read {_rel(root, current)} "
                              f"({type(exc).__name__}): the folder is truncated or not a checkpoint; resume from "
                              f"another one") from None


def _rel(root: Path, file: Optional[Path]) -> str:
    if file is None:
        return str(root)
    try:
        return str(file.relative_to(root))
    except ValueError:
        return str(file)


def _folder_files(root: Path) -> list:
    """Every regular file under ``root`` (itself may be a link, as a ``save_last="link"`` last.ckpt is); a link
    inside is refused: the libraries would follow it out of the folder, where this check does not look."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            entry = Path(dirpath) / name
            if entry.is_symlink():
                raise _Refused(f"{_rel(root, entry)} is a link, which loading would follow out of the folder")
            if name in filenames and entry.is_file():
                files.append(entry)
    return sorted(files)


def _check_latest(root: Path, latest: Path) -> None:
    """DeepSpeed reads the name of the checkpoint to load from ``latest`` and opens ``<folder>/<name>``: a name that
    is not a subfolder of this one would make it read files from anywhere."""
    if latest.stat().st_size > 4096:
        raise _Refused("latest is not DeepSpeed's one-line tag file")
    tag = latest.read_text(errors="replace").strip()
    if not _plain_name(tag) or not (root / tag).is_dir():
        raise _Refused(f"latest names {tag[:80]!r}, not a subfolder of this checkpoint")


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\x00" not in name


def _check_dcp_metadata(root: Path, file: Path) -> set:
    """Check a ``.metadata`` pickle, then read it with the same exact pairs: its storage files must be plain files
    of the folder and every byte item (a ``torch.save`` blob that torch unpickles) must pass the tensor allowlist.
    Returns the storage file names."""
    with open(file, "rb") as f:
        pickle_globals(f, DCP_METADATA_GLOBALS)
        f.seek(0)
        metadata = _ExactUnpickler(f).load()
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise _Refused(f"{_rel(root, file)} is not a distributed checkpoint's metadata")
    byte_keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    names, sizes = set(), {}
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not _plain_name(name) or not (root / name).is_file() or (root / name).is_symlink():
            raise _Refused(f"{_rel(root, file)} names the storage file {str(name)[:80]!r}, which is not a file of "
                           f"the folder")
        names.add(name)
        size = sizes.setdefault(name, (root / name).stat().st_size)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0 \
                or offset + length > size:
            raise _Refused(f"{_rel(root, file)} places an item at bytes {offset}+{length} of {name} "
                           f"({size} bytes): the folder is truncated or tampered with")
        if index.fqn not in byte_keys:
            continue
        if getattr(info, "transform_descriptors", None):
            raise UnsafePickle(f"transformed byte item {index.fqn}")
        with open(root / name, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        try:
            check_torch_file(blob, TENSOR_GLOBALS)
        except UnsafePickle as exc:
            raise UnsafePickle(f"byte item {index.fqn} in {name}: {exc}") from None
    return names


def check_checkpoint_path(path: Any) -> None:
    """The check for whatever a strategy is about to load: a folder gets :func:`check_checkpoint_folder`, a file
    :func:`~swinlab.models.checkpoint.check_checkpoint_file`; remote paths are left to their loaders."""
    if path is None or not _is_local(path):
        return
    local = Path(str(path).removeprefix("file://"))
    if local.is_dir():
        check_checkpoint_folder(local)
    elif local.is_file():
        check_checkpoint_file(local)


def guard_strategy_loads(strategy: Any) -> None:
    """Run :func:`check_checkpoint_path` before every ``strategy.load_checkpoint``, whatever chose the path (an
    explicit ``--ckpt_path``, ``last``, ``hpc``, ``registry``): the command line checks the paths it resolves before
    anything is built, this catches the ones Lightning resolves later (DeepSpeed and FSDP/ModelParallel load folders
    with their libraries' own unpicklers)."""
    original = strategy.load_checkpoint
    if getattr(original, "swinlab_checked", False):
        return

    def load_checkpoint(checkpoint_path, *args, **kwargs):
        check_checkpoint_path(checkpoint_path)
        return original(checkpoint_path, *args, **kwargs)

    load_checkpoint.swinlab_checked = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint


def _inside(path: Any, root: Optional[str]) -> bool:
    """Whether ``path`` (a string from a checkpoint) is a local path inside ``root`` once links and ``..`` are
    resolved; an empty path is nothing and passes."""
    if path in ("", None):
        return True
    if not isinstance(path, str) or root is None or "\x00" in path or not _is_local(path) or not _is_local(root):
        return False
    real = Path(os.path.realpath(path.removeprefix("file://")))
    base = Path(os.path.realpath(str(root).removeprefix("file://")))
    return base in real.parents


def guard_checkpoint_callback(callback: Any) -> None:
    """A ModelCheckpoint's saved state names files (``best_model_path``, ``kth_best_model_path``,
    ``last_model_path``, ``best_k_models``) that Lightning later reads (the best checkpoint swinlab exports) or
    deletes (the top-k file a better one replaces; Lightning's own check of the folder does not resolve ``..``).
    Before Lightning restores that state, a path outside this callback's folder is set aside: the state is
    restored as Lightning does for a run moved to another folder (no top-k bookkeeping), without that path, and
    one warning line names it. Nothing named by a checkpoint outside its run's folder is read or removed."""
    original = callback.load_state_dict
    if getattr(original, "swinlab_checked", False):
        return

    def load_state_dict(state_dict: Dict[str, Any]) -> None:
        state = dict(state_dict)
        root = callback.dirpath
        top_k = state.get("best_k_models") if isinstance(state.get("best_k_models"), dict) else {}
        named = [state.get(k) for k in ("best_model_path", "kth_best_model_path", "last_model_path")] + list(top_k)
        outside = [p for p in named if not _inside(p, root)]
        if outside:
            import warnings
            warnings.warn(f"the checkpoint's {type(callback).__name__} state names {str(outside[0])[:120]!r}, "
                          f"outside this run's checkpoint folder {root}: ignored (nothing there is read or "
                          f"removed); top-k bookkeeping starts afresh", stacklevel=2)
            state["dirpath"] = f"{root} (a state naming files outside it)"  # Lightning: restore best path only
            if not _inside(state.get("best_model_path"), root):
                state["best_model_path"] = ""
        original(state)

    load_state_dict.swinlab_checked = True  # type: ignore[attr-defined]
    callback.load_state_dict = load_state_dict
