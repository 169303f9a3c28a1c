"""Shared DataModule plumbing: loader options and an epoch-seeded shuffle that survives resuming."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import ConfigError

ImgSize = Union[int, Sequence[int]]


def img_pair(size: ImgSize) -> Tuple[int, int]:
    if isinstance(size, int):
        pair = (size, size)
    else:
        pair = tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) <= 0:
        raise ConfigError(f"img_size={size!r} is invalid: use a positive int or [height, width]")
    return pair  # type: ignore[return-value]


class BaseDataModule(pl.LightningDataModule):
    """Batch size, workers, pin_memory, persistent workers and the training shuffle.

    The training order is a permutation seeded by ``seed + epoch`` (Lightning calls ``set_epoch``), so a run resumed
    from an epoch-end checkpoint sees the same batches as an uninterrupted one. Under DDP Lightning's own
    DistributedSampler (also epoch-seeded) takes over. Training drops the last partial batch (Mixup needs even
    batches).
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, seed: int = 0, eval_batch_size: Optional[int] = None):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers} must be >= 0")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and num_workers > 0
        self.seed = int(seed)
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    def _loader_kwargs(self) -> Dict[str, Any]:
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory,
                    persistent_workers=self.persistent_workers)

    def _distributed(self) -> bool:
        trainer = self._trainer if hasattr(self, "_trainer") else None
        return trainer is not None and trainer.world_size > 1

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if self._distributed():
            return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                              **self._loader_kwargs())
        sampler = DistributedSampler(self.train_set, num_replicas=1, rank=0, shuffle=True, seed=self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
