"""Random images of any size and class count, for throughput and scaling runs (no I/O, deterministic)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .common import BaseDataModule, ImgSize, img_pair


class SyntheticImages(Dataset):
    """Sample ``i`` is the same normal-noise image and label every time (generator seeded by ``seed`` and ``i``)."""

    def __init__(self, length: int, img_size: ImgSize, num_classes: int, in_chans: int = 3, seed: int = 0):
        self.length, self.size, self.num_classes, self.in_chans, self.seed = (
            int(length), img_pair(img_size), int(num_classes), int(in_chans), int(seed))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        x = torch.randn(self.in_chans, *self.size, generator=g)
        y = int(torch.randint(self.num_classes, (1,), generator=g))
        return x, y


class SyntheticDataModule(BaseDataModule):
    """``train_samples`` / ``val_samples`` random images at ``img_size`` with ``num_classes`` labels."""

    def __init__(self, img_size: ImgSize = 224, num_classes: int = 1000, batch_size: int = 64,
                 train_samples: int = 1024, val_samples: int = 256, in_chans: int = 3, num_workers: int = 0,
                 pin_memory: bool = False,
                 persistent_workers: bool = False, seed: int = 0, eval_batch_size: Optional[int] = None):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, seed=seed, eval_batch_size=eval_batch_size)
        if num_classes < 1 or train_samples < 1 or val_samples < 1:
            raise ConfigError(f"num_classes, train_samples and val_samples must be >= 1 (got {num_classes}, "
                              f"{train_samples}, {val_samples})")
        self.img_size = img_pair(img_size)
        self.num_classes = int(num_classes)
        self.train_samples, self.val_samples, self.in_chans = int(train_samples), int(val_samples), int(in_chans)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            self.train_set = SyntheticImages(self.train_samples, self.img_size, self.num_classes, self.in_chans,
                                             seed=self.seed)
            self.val_set = SyntheticImages(self.val_samples, self.img_size, self.num_classes, self.in_chans,
                                           seed=self.seed + 7919)
