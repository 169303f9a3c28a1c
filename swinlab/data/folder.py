"""ImageNet-style ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` folders with timm's transforms."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import ConfigError
from .augment import build_transform
from .common import BaseDataModule, ImgSize, img_pair, seeded_rng

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS): larger images go through ``on_corrupt``
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def scan_images(folder: Path) -> Tuple[List[str], List[str]]:
    """The image files under one class folder, in torchvision's order (by folder, then name), and the links that were
    not followed. Links are followed only while they stay inside the class folder (a link to ``..`` would file other
    classes' images under this label); each real folder and file is visited once, so links to ``.`` end instead of
    looping. A class folder that is itself a link (data on another disk) is the root it is resolved to."""
    root = os.path.realpath(folder)
    seen_dirs, seen_files, found, refused = set(), set(), [], []
    stack = [str(folder)]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue  # unreadable folder: its images are simply absent
        for entry in entries:
            target = os.path.realpath(entry.path)
            if entry.is_symlink() and not _inside(target, root):
                refused.append(entry.path)
            elif entry.is_dir():
                stack.append(entry.path)
            elif entry.is_file() and _is_image(entry.name) and target not in seen_files:
                seen_files.add(target)
                found.append((current, entry.name))
    return [os.path.join(d, f) for d, f in sorted(found)], refused


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
        images, refused = scan_images(root / c)
        if refused:
            warnings.warn(f"{len(refused)} link(s) under {root / c} point outside the class folder and are not "
                          f"followed (first: {refused[0]})", stacklevel=2)
        if not images:
            raise ConfigError(f"class folder {root / c} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...): "
                              f"add images or remove the folder")
    return classes


# where transparent pixels go: composited on this colour (PIL's convert("RGB") would keep whatever colour the
# transparent pixels happen to store, often black)
ALPHA_BACKGROUND = (255, 255, 255)
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit grayscale (PNG, TIFF): PIL opens it as I;16 or I


def to_rgb(img, background: Sequence[int] = ALPHA_BACKGROUND):
    """``img`` as users see it, in 8-bit RGB: EXIF orientation applied (``PIL.ImageOps.exif_transpose``), 16-bit
    grayscale scaled to 8 bits (PIL's own conversion clips it at 255: a white image), transparency (RGBA, LA, PA,
    palette images with a transparent colour) composited on ``background``; CMYK, palette, 1-bit and other modes
    through PIL's conversion."""
    import numpy as np
    from PIL import Image, ImageOps
    img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_BIT_MODES:
        a = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257.0  # 0..65535 -> 0..255, not clipped
        img = Image.fromarray(np.rint(a).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGBA", img.size, tuple(int(c) for c in background) + (255,))
        return Image.alpha_composite(canvas, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, decode: bool = True,
             background: Sequence[int] = ALPHA_BACKGROUND):
    """Decode one image as RGB (:func:`to_rgb`); an image of more than ``max_pixels`` pixels is refused before it is
    decoded (a 48 KB PNG can hold 20000 x 20000 pixels). ``decode=False``: the same checks on the header only,
    nothing decoded (returns None)."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is the one that counts
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max(max_pixels, DEFAULT_MAX_IMAGE_PIXELS)
        with open(path, "rb") as fh, Image.open(fh) as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ValueError(f"{w}x{h} pixels is more than max_image_pixels={max_pixels}")
            if not decode:
                return None
            img.load()
            return to_rgb(img, background)


class PredictImages:
    """Images to predict: the image files under a folder (scanned like a class folder, sorted) or one image file,
    with the evaluation transforms. Items are (image, -1); ``paths`` names them in order."""

    def __init__(self, path: Path, transform, max_image_pixels: Optional[int], on_corrupt: str = "skip"):
        if path.is_file():
            paths = [str(path)] if _is_image(path.name) else []
        elif path.is_dir():
            paths = scan_images(path)[0]
        else:
            raise ConfigError(f"predict_dir {path} does not exist: give a folder of images or one image file")
        readable = []
        for p in paths:  # the header only: an unreadable file is named now, not halfway through the predictions
            try:
                load_rgb(p, max_image_pixels, decode=False)
                readable.append(p)
            except Exception as exc:  # noqa: BLE001 - whatever the decoder raises
                if on_corrupt == "error":
                    raise ConfigError(f"cannot read image {p} ({type(exc).__name__}): remove or replace it, or set "
                                      f"data.init_args.on_corrupt: skip") from None
                warnings.warn(f"skipped unreadable image {p} ({type(exc).__name__}): not predicted", stacklevel=2)
        if not readable:
            raise ConfigError(f"no readable images under predict_dir {path} ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
        self.paths, self.transform, self.max_image_pixels = readable, transform, max_image_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.paths[index], self.max_image_pixels)), -1


class SafeImageFolder(ImageFolder):
    """ImageFolder that skips unreadable images (warns and counts; the next readable image stands in) or, with
    ``on_corrupt='error'``, stops with the file's name. Whatever the decoder raises counts as unreadable, and so does
    an image larger than ``max_image_pixels``. Class folders are scanned by ``scan_images`` (links stay inside the
    class folder, loops end). Images become 8-bit RGB through :func:`to_rgb` (EXIF orientation applied, 16-bit
    grayscale scaled, transparency composited on white). Random augmentation is seeded by the training index's
    ``aug_seed`` (see ``swinlab.data.common``)."""

    def __init__(self, root: str, transform=None, on_corrupt: str = "skip",
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        self.max_image_pixels = max_image_pixels
        super().__init__(root, transform=transform)
        self.on_corrupt = on_corrupt
        self.skipped: List[str] = []

    @staticmethod
    def make_dataset(directory, class_to_idx: Dict[str, int], extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        samples = []
        for name, idx in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
            samples += [(p, idx) for p in scan_images(Path(directory) / name)[0]]
        if not samples and not allow_empty:
            raise ConfigError(f"no images under {directory}: put each class's images in {directory}/<class>/")
        return samples

    def __getitem__(self, index: int):
        index_ = int(index)
        for attempt in range(len(self.samples)):
            i = (index_ + attempt) % len(self.samples)
            path, target = self.samples[i]
            try:
                image = load_rgb(path, self.max_image_pixels)
            except Exception as exc:  # noqa: BLE001 - whatever the decoder raises: the image is unreadable
                if self.on_corrupt == "error":
                    raise ConfigError(f"cannot read image {path} ({type(exc).__name__}: {str(exc)[:120]}): remove "
                                      f"or replace it, or set data.init_args.on_corrupt: skip") from None
                if path not in self.skipped:
                    self.skipped.append(path)
                    warnings.warn(f"skipped unreadable image {path} ({type(exc).__name__}); {len(self.skipped)} "
                                  f"skipped so far in this loader process", stacklevel=2)
                continue
            with seeded_rng(index):  # training: augmentation seeded by (seed, epoch, index)
                image = self.transform(image) if self.transform is not None else image
            return image, (self.target_transform(target) if self.target_transform is not None else target)
        raise ConfigError(f"no readable image in {self.root}: check the files")


class ImageFolderDataModule(BaseDataModule):
    """Train/val image folders. Training: timm's RandAugment (``auto_augment``), colour jitter, random erasing
    (``re_prob``), bicubic random-resized crops; evaluation: resize to ``img_size / crop_pct`` and centre crop
    (224/256 as the official recipe). ``on_corrupt``: ``skip`` (warn and count) or ``error``, for any image the
    decoder cannot read and any image of more than ``max_image_pixels`` pixels (default: PIL's own limit, 89.5 M;
    ``null``: no limit). A folder with only ``train/`` (no ``val_dir`` folder) gets a validation split carved from it:
    ``val_split`` of each class's images (at least one per class with two or more), chosen by ``seed``.
    ``predict_dir`` (a folder of images, searched recursively, or one image file) is what ``python -m swinlab
    predict`` runs on; without it, predict runs on the validation split. ``mean``/``std`` (ImageNet's by default),
    ``img_size``, ``interpolation`` and ``crop_pct`` are the run's ``preprocessing``, recorded with the weights;
    predict uses the weights' record where it has one (:meth:`weights_transform`)."""

    def __init__(self, data_dir: str = "data/imagenet", img_size: ImgSize = 224, batch_size: int = 128,
                 train_dir: str = "train", val_dir: str = "val", auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
                 color_jitter: float = 0.4, re_prob: float = 0.25, re_mode: str = "pixel",
                 interpolation: str = "bicubic", crop_pct: float = 224 / 256, on_corrupt: str = "skip",
                 num_workers: int = 8, pin_memory: bool = True, persistent_workers: bool = True, seed: int = 0,
                 eval_batch_size: Optional[int] = None, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 val_split: float = 0.1, predict_dir: Optional[str] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, seed=seed, eval_batch_size=eval_batch_size)
        if on_corrupt not in ("skip", "error"):
            raise ConfigError(f"on_corrupt={on_corrupt!r} is unknown: use skip or error")
        if max_image_pixels is not None and int(max_image_pixels) < 1:
            raise ConfigError(f"max_image_pixels={max_image_pixels} must be >= 1 (or null: no limit)")
        self.max_image_pixels = max_image_pixels
        if not 0.0 < val_split < 1.0:
            raise ConfigError(f"val_split={val_split} must be in (0, 1): the share of each class's training images "
                              f"held out for validation when there is no {val_dir}/ folder")
        self.val_split = float(val_split)
        self.predict_dir = Path(predict_dir) if predict_dir else None
        self.predict_set: Optional[PredictImages] = None
        if not 0.0 < crop_pct <= 1.0:
            raise ConfigError(f"crop_pct={crop_pct} must be in (0, 1] (0.875 is 224/256)")
        self.data_dir = Path(data_dir)
        self.img_size = img_pair(img_size)
        self.train_dir, self.val_dir = train_dir, val_dir
        self.auto_augment, self.color_jitter, self.re_prob, self.re_mode = auto_augment, color_jitter, re_prob, re_mode
        self.interpolation, self.crop_pct, self.on_corrupt = interpolation, crop_pct, on_corrupt
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean={list(mean)} / std={list(std)} must be 3 values each (R, G, B), std > 0")
        self.classes: Optional[List[str]] = None
        self._named_missing = False

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.classes) if self.classes is not None else None

    @property
    def preprocessing(self) -> Dict[str, Any]:
        """What the evaluation transform does, in timm's pretrained_cfg terms: recorded with the weights."""
        return dict(mean=self.mean, std=self.std, input_size=(3, *self.img_size), interpolation=self.interpolation,
                    crop_pct=self.crop_pct)

    def transforms(self, training: bool):
        return build_transform(self.img_size, training, mean=self.mean, std=self.std, interpolation=self.interpolation,
                               crop_pct=self.crop_pct, auto_augment=self.auto_augment, color_jitter=self.color_jitter,
                               re_prob=self.re_prob, re_mode=self.re_mode)

    def prepare_data(self) -> None:
        if self.predict_dir is None or self.data_dir.is_dir():
            self.check()

    def check(self) -> List[str]:
        """Validate both folders before training; returns the class names."""
        if not self.data_dir.is_dir():
            raise ConfigError(f"data folder {self.data_dir} does not exist: set data.init_args.data_dir to a folder "
                              f"holding {self.train_dir}/<class>/ and {self.val_dir}/<class>/ image folders")
        train = check_split(self.data_dir / self.train_dir, "training")
        if not self.has_val_folder():
            return train
        val = check_split(self.data_dir / self.val_dir, "validation")
        extra = sorted(set(val) - set(train))
        if extra:
            raise ConfigError(f"validation classes {extra[:3]} have no training folder in "
                              f"{self.data_dir / self.train_dir}: use the same class folder names in both")
        missing = sorted(set(train) - set(val))
        if missing and not self._named_missing:
            self._named_missing = True
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            warnings.warn(f"validation folder {self.data_dir / self.val_dir} lacks {len(missing)} of the "
                          f"{len(train)} training classes ({shown}): their accuracy is not measured; add "
                          f"{self.val_dir}/<class>/ folders for them", stacklevel=2)
        return train

    @staticmethod
    def count_classes(data_dir: str = "data/imagenet", train_dir: str = "train", **_: object) -> int:
        """The class count of ``<data_dir>/<train_dir>`` (its class folders), read before anything is built."""
        return len(check_split(Path(data_dir) / train_dir, "training"))

    @property
    def class_names(self) -> Optional[List[str]]:
        if self.classes is None and self.data_dir.is_dir():
            self.classes = self.check()
        return self.classes

    def _predict_set(self) -> Optional[PredictImages]:
        if self.predict_dir is not None and self.predict_set is None:
            self.predict_set = PredictImages(self.predict_dir, self.transforms(False), self.max_image_pixels,
                                             self.on_corrupt)
        return self.predict_set

    def weights_transform(self):
        """The evaluation transform for the weights being run: the preprocessing they were trained with where the
        module knows it (``weights_preprocessing()``: a checkpoint's record), else this data module's; a difference
        is named in one line."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        trained = module.weights_preprocessing() if hasattr(module, "weights_preprocessing") else None
        if not trained:
            return self.transforms(False)
        mine = self.preprocessing
        keys = ("mean", "std", "interpolation", "crop_pct")
        want = {k: tuple(trained[k]) if isinstance(trained[k], (list, tuple)) else trained[k]
                for k in keys if k in trained}
        differ = [k for k in want if want[k] != mine[k]]
        if differ:
            warnings.warn(f"predicting with the preprocessing the weights were trained with "
                          f"({', '.join(f'{k}={want[k]}' for k in differ)}), not the data module's "
                          f"({', '.join(f'{k}={mine[k]}' for k in differ)})", stacklevel=2)
        mine = dict(mine, **want)
        return build_transform(self.img_size, False, mean=mine["mean"], std=mine["std"],
                               interpolation=mine["interpolation"], crop_pct=mine["crop_pct"])

    def predict_dataloader(self):
        if self._predict_set() is None:
            if self.val_set is None:
                self.setup("predict")
            self.val_set.transform = self.weights_transform()
            return super().predict_dataloader()
        from torch.utils.data import DataLoader
        self.predict_set.transform = self.weights_transform()
        return DataLoader(self.predict_set, batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs())

    def predict_inputs(self) -> List[str]:
        return list(self._predict_set().paths) if self.predict_dir is not None else super().predict_inputs()

    def has_val_folder(self) -> bool:
        return (self.data_dir / self.val_dir).exists()

    def carve_val(self, samples: List[Tuple[str, int]]) -> Tuple[List[int], List[int]]:
        """Indices of the training and validation samples: ``val_split`` of each class (at least one image of a class
        with two or more; a class with one image keeps it for training), drawn with ``seed``."""
        import torch
        g = torch.Generator().manual_seed(self.seed)
        by_class: Dict[int, List[int]] = {}
        for i, (_, t) in enumerate(samples):
            by_class.setdefault(t, []).append(i)
        val: List[int] = []
        for t in sorted(by_class):
            idx = by_class[t]
            n_val = max(1, round(self.val_split * len(idx))) if len(idx) >= 2 else 0
            order = torch.randperm(len(idx), generator=g).tolist()
            val += [idx[j] for j in order[:n_val]]
        chosen = set(val)
        return [i for i in range(len(samples)) if i not in chosen], sorted(val)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage == "predict" and self.predict_dir is not None:
            self._predict_set()  # the training folders need not exist: the class names come with the checkpoint
            return
        if self.train_set is not None:
            return
        self.classes = self.check()
        if not self.has_val_folder():
            train_dir = str(self.data_dir / self.train_dir)
            train = SafeImageFolder(train_dir, self.transforms(True), self.on_corrupt, self.max_image_pixels)
            val = SafeImageFolder(train_dir, self.transforms(False), self.on_corrupt, self.max_image_pixels)
            keep, held = self.carve_val(train.samples)
            warnings.warn(f"no {self.val_dir}/ folder in {self.data_dir}: {len(held)} of {len(train.samples)} training "
                          f"images held out for validation ({self.val_split:.0%} of each class, seed {self.seed}; "
                          f"data.init_args.val_split)", stacklevel=2)
            for ds, idx in ((train, keep), (val, held)):
                ds.samples = [ds.samples[i] for i in idx]
                ds.imgs, ds.targets = ds.samples, [t for _, t in ds.samples]
            self.train_set, self.val_set = train, val
            return
        self.train_set = SafeImageFolder(str(self.data_dir / self.train_dir), self.transforms(True), self.on_corrupt,
                                         self.max_image_pixels)
        val = SafeImageFolder(str(self.data_dir / self.val_dir), self.transforms(False), self.on_corrupt,
                              self.max_image_pixels)
        # label by the training classes even if val holds a subset
        index = {c: i for i, c in enumerate(self.classes)}
        val.samples = [(p, index[val.classes[t]]) for p, t in val.samples]
        val.targets = [t for _, t in val.samples]
        val.class_to_idx = {c: index[c] for c in val.classes}
        self.val_set = val
