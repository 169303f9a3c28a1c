"""ImageNet-style ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` folders with timm's transforms."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import List, Optional

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import ConfigError
from .common import BaseDataModule, ImgSize, img_pair, seeded_rng

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def check_split(root: Path, what: str) -> List[str]:
    """Class folder names of ``root``; a ConfigError naming the problem if it is missing, empty or has a class
    folder without images."""
    if not root.is_dir():
        raise ConfigError(f"{what} folder {root} does not exist: set data.init_args.data_dir to a folder holding "
                          f"train/<class>/ and val/<class>/ image folders")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(f"{what} folder {root} has no class folders: put each class's images in {root}/<class>/")
    for c in classes:
        has_image = any(_is_image(f) for _, _, files in os.walk(root / c, followlinks=True) for f in files)
        if not has_image:
            raise ConfigError(f"class folder {root / c} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...): "
                              f"add images or remove the folder")
    return classes


class SafeImageFolder(ImageFolder):
    """ImageFolder that skips unreadable images (warns and counts; the next readable image stands in) or, with
    ``on_corrupt='error'``, stops with the file's name. Grayscale, palette and RGBA images are converted to RGB.
    Random augmentation is seeded by the training index's ``aug_seed`` (see ``swinlab.data.common``)."""

    def __init__(self, root: str, transform=None, on_corrupt: str = "skip"):
        super().__init__(root, transform=transform)
        self.on_corrupt = on_corrupt
        self.skipped: List[str] = []

    def __getitem__(self, index: int):
        index_ = int(index)
        for attempt in range(len(self.samples)):
            i = (index_ + attempt) % len(self.samples)
            try:
                with seeded_rng(index):  # training: augmentation seeded by (seed, epoch, index)
                    return super().__getitem__(i)
            except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError, truncated files
                path = self.samples[i][0]
                if self.on_corrupt == "error":
                    raise ConfigError(f"cannot read image {path} ({type(exc).__name__}): remove or replace it, or "
                                      f"set data.init_args.on_corrupt: skip") from None
                if path not in self.skipped:
                    self.skipped.append(path)
                    warnings.warn(f"skipped unreadable image {path} ({type(exc).__name__}); {len(self.skipped)} "
                                  f"skipped so far in this loader process", stacklevel=2)
        raise ConfigError(f"no readable image in {self.root}: check the files")


class ImageFolderDataModule(BaseDataModule):
    """Train/val image folders. Training: timm's RandAugment (``auto_augment``), colour jitter, random erasing
    (``re_prob``), bicubic random-resized crops; evaluation: resize to ``img_size / crop_pct`` and centre crop
    (224/256 as the official recipe). ``on_corrupt``: ``skip`` (warn and count) or ``error``."""

    def __init__(self, data_dir: str = "data/imagenet", img_size: ImgSize = 224, batch_size: int = 128,
                 train_dir: str = "train", val_dir: str = "val", auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
                 color_jitter: float = 0.4, re_prob: float = 0.25, re_mode: str = "pixel",
                 interpolation: str = "bicubic", crop_pct: float = 224 / 256, on_corrupt: str = "skip",
                 num_workers: int = 8, pin_memory: bool = True, persistent_workers: bool = True, seed: int = 0,
                 eval_batch_size: Optional[int] = None):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, seed=seed, eval_batch_size=eval_batch_size)
        if on_corrupt not in ("skip", "error"):
            raise ConfigError(f"on_corrupt={on_corrupt!r} is unknown: use skip or error")
        if not 0.0 < crop_pct <= 1.0:
            raise ConfigError(f"crop_pct={crop_pct} must be in (0, 1] (0.875 is 224/256)")
        self.data_dir = Path(data_dir)
        self.img_size = img_pair(img_size)
        self.train_dir, self.val_dir = train_dir, val_dir
        self.auto_augment, self.color_jitter, self.re_prob, self.re_mode = auto_augment, color_jitter, re_prob, re_mode
        self.interpolation, self.crop_pct, self.on_corrupt = interpolation, crop_pct, on_corrupt
        self.classes: Optional[List[str]] = None

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.classes) if self.classes is not None else None

    def transforms(self, training: bool):
        from timm.data import create_transform
        if training:
            return create_transform(self.img_size, is_training=True, auto_augment=self.auto_augment,
                                    color_jitter=self.color_jitter, re_prob=self.re_prob, re_mode=self.re_mode,
                                    interpolation=self.interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return create_transform(self.img_size, is_training=False, interpolation=self.interpolation,
                                crop_pct=self.crop_pct, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def prepare_data(self) -> None:
        self.check()

    def check(self) -> List[str]:
        """Validate both folders before training; returns the class names."""
        if not self.data_dir.is_dir():
            raise ConfigError(f"data folder {self.data_dir} does not exist: set data.init_args.data_dir to a folder "
                              f"holding {self.train_dir}/<class>/ and {self.val_dir}/<class>/ image folders")
        train = check_split(self.data_dir / self.train_dir, "training")
        val = check_split(self.data_dir / self.val_dir, "validation")
        extra = sorted(set(val) - set(train))
        if extra:
            raise ConfigError(f"validation classes {extra[:3]} have no training folder in "
                              f"{self.data_dir / self.train_dir}: use the same class folder names in both")
        return train

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        self.classes = self.check()
        self.train_set = SafeImageFolder(str(self.data_dir / self.train_dir), self.transforms(True), self.on_corrupt)
        val = SafeImageFolder(str(self.data_dir / self.val_dir), self.transforms(False), self.on_corrupt)
        # label by the training classes even if val holds a subset
        index = {c: i for i, c in enumerate(self.classes)}
        val.samples = [(p, index[val.classes[t]]) for p, t in val.samples]
        val.targets = [t for _, t in val.samples]
        val.class_to_idx = {c: index[c] for c in val.classes}
        self.val_set = val
