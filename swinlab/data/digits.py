"""scikit-learn's 1,797 real 8x8 handwritten digits: the embedded, download-free default data set."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError
from .common import BaseDataModule, ImgSize, aug_generator, img_pair

MEAN, STD = 0.5, 0.5


def load_digits_tensors(img_size: ImgSize = 32, in_chans: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, in_chans, H, W) float tensors in [-1, 1] (bicubic resize) and int64 labels."""
    from sklearn.datasets import load_digits

    h, w = img_pair(img_size)
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # N, 1, 8, 8 in [0, 1]
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp_(0, 1)
    x = x.sub_(MEAN).div_(STD).expand(-1, in_chans, -1, -1).contiguous()
    y = torch.from_numpy(digits.target).long()
    return x, y


class _ShiftedDigits(Dataset):
    """Tensors in memory with an optional random translation (zero-padded shift) for training.

    The shift of a sample is drawn from its own generator, seeded by the index's ``aug_seed`` (set by the training
    sampler from (seed, epoch, index)), never from the global RNG: resuming mid-epoch reproduces it exactly."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, max_shift: int = 0, seed: int = 0):
        self.x, self.y, self.max_shift, self.seed = x, y, int(max_shift), int(seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = self.x[int(i)]
        s = self.max_shift
        if s > 0:
            dy, dx = torch.randint(-s, s + 1, (2,), generator=aug_generator(i, self.seed)).tolist()
            pad = F.pad(img, (s, s, s, s), value=-MEAN / STD)
            H, W = img.shape[-2:]
            img = pad[:, s + dy:s + dy + H, s + dx:s + dx + W]
        return img, self.y[int(i)]


def pad_to_canvas(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) digits in the middle of a larger (H, W) canvas of blank pixels: the digits keep their pixel size."""
    h, w = x.shape[-2:]
    H, W = size
    top, left = (H - h) // 2, (W - w) // 2
    return F.pad(x, (left, W - w - left, top, H - h - top), value=-MEAN / STD)


class DigitsDataModule(BaseDataModule):
    """Digits resized to ``img_size`` with 3 channels, fixed stratified train/val split (``val_fraction``,
    ``split_seed``), tensors in memory (``num_workers`` 0 is fastest). ``max_shift`` pixels of random translation
    augment training (0: off).

    ``digit_size``: render the digits at this size and put them in the middle of the ``img_size`` canvas (blank
    around them) instead of scaling them to fill it. A study that trains at 32 px with ``digit_size: 32`` and evaluates
    at 96 px then sees the same digits, pixel for pixel, on a 3x larger canvas: the image grows without magnifying the
    content (the confound of growing the image size with 8x8 scans, docs/ablations.md)."""

    num_classes = 10

    def __init__(self, img_size: ImgSize = 32, batch_size: int = 64, val_fraction: float = 0.2, split_seed: int = 0,
                 max_shift: int = 2, in_chans: int = 3, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, seed: int = 0, eval_batch_size: Optional[int] = None,
                 digit_size: Optional[int] = None):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, seed=seed, eval_batch_size=eval_batch_size)
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.2)")
        if max_shift < 0:
            raise ConfigError(f"max_shift={max_shift} must be >= 0 (0 turns augmentation off)")
        self.img_size = img_pair(img_size)
        if digit_size is not None and not 1 <= digit_size <= min(self.img_size):
            raise ConfigError(f"digit_size={digit_size} must be between 1 and the image size {min(self.img_size)}: "
                              f"null to fill the image")
        self.digit_size = digit_size
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.max_shift, self.in_chans = max_shift, in_chans

    @staticmethod
    def count_classes(**_: object) -> int:
        return 10

    @property
    def class_names(self) -> List[str]:
        return [str(d) for d in range(10)]

    @property
    def preprocessing(self) -> Dict[str, Any]:
        """The digits' preprocessing in timm's pretrained_cfg terms (recorded with the weights): [0, 1] pixels
        normalised by mean = std = 0.5, the whole image bicubically resized (crop_pct 1)."""
        c = self.in_chans
        return dict(mean=(MEAN,) * c, std=(STD,) * c, input_size=(c, *self.img_size), interpolation="bicubic",
                    crop_pct=1.0)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.model_selection import train_test_split

        if self.digit_size is None:
            x, y = load_digits_tensors(self.img_size, self.in_chans)
        else:
            x, y = load_digits_tensors(self.digit_size, self.in_chans)
            x = pad_to_canvas(x, self.img_size)
        idx = torch.arange(len(y)).numpy()
        train_idx, val_idx = train_test_split(idx, test_size=self.val_fraction, random_state=self.split_seed,
                                              stratify=y.numpy())
        train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        self.train_set = _ShiftedDigits(x[train_idx], y[train_idx], self.max_shift, self.seed)
        self.val_set = _ShiftedDigits(x[val_idx], y[val_idx], 0)
