"""Lightning CheckpointIO that writes atomically and loads without unpickling arbitrary objects.

Save: a temporary file beside the target, flushed and fsync'ed, then ``os.replace`` onto the target, so a crash, a
kill or a full disk during a save leaves the previous checkpoint (``last.ckpt`` included) intact. Load:
``torch.load(weights_only=True)``: a checkpoint carrying a pickle payload is refused before anything in it runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .errors import CheckpointError
from .models.checkpoint import safe_torch_load


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
    except OSError as exc:
        _unlink_quietly(tmp)
        reason = exc.strerror or str(exc)
        raise CheckpointError(f"could not write checkpoint {path} ({reason}): the previous checkpoint is intact; "
                              f"free disk space or set another checkpoint directory, then resume with "
                              f"--ckpt_path last") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


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
