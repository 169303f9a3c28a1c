"""Image shards written with LitData (``python -m swinlab data optimize``) and the DataModule that streams them.

A shard folder holds ``train/`` and ``val/`` (each a LitData dataset: ``index.json`` and ``chunk-*.bin``) and
``classes.json`` (the class names, in label order). A sample is ``{"image": bytes, "label": int}``: the image file's
own bytes for a plain RGB JPEG without an EXIF rotation (decoding them gives what the folder loader gives), and for
every other image a lossless PNG of the RGB image the folder loader decodes, so training from shards sees the same
pixels as training from the folder, with no decoder-specific handling at read time.

:class:`StreamingImageDataModule` trains from a shard folder, a local path or an object-store URL (``s3://``,
``gs://``, ... as LitData reads them; remote chunks are cached in ``cache_dir``), with ImageFolderDataModule's
transforms. LitData gives each data-parallel rank (and each loader worker) its own chunks, shuffles by ``seed`` and
epoch, and keeps its position in the loader's ``state_dict()``, which Lightning saves in every checkpoint: a run
resumed with ``--ckpt_path last`` continues with the next unseen batch. Each sample's augmentation is seeded by
(seed, epoch, sample index), as for image folders, so the resumed run trains on the same pixels.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, first_line
from .common import SampleIndex, sample_seed, seeded_rng
from .folder import DEFAULT_MAX_IMAGE_PIXELS, IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule, load_rgb

SPLITS = ("train", "val")
CLASSES_FILE = "classes.json"


def is_url(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts]) if is_url(root) else os.path.join(root, *parts)


# -- writing ---------------------------------------------------------------------------------------------------------

def encode_image(path: str, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """The bytes a shard stores for one image file (see the module docstring); raises what the decoder raises for an
    unreadable image."""
    from PIL import Image
    image = load_rgb(path, max_pixels)  # the folder loader's decode: its checks and conversions
    with open(path, "rb") as fh, Image.open(fh) as raw:
        plain = raw.format == "JPEG" and raw.mode == "RGB" and raw.getexif().get(0x0112, 1) == 1
    if plain:
        with open(path, "rb") as fh:
            return fh.read()
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: Any):
    """A shard's image bytes as an RGB PIL image."""
    from PIL import Image
    with Image.open(io.BytesIO(bytes(data))) as img:
        return img.convert("RGB")


def shard_sample(item: Tuple[str, int], max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS
                 ) -> Optional[Dict[str, Any]]:
    """LitData's per-item function: ``(path, label)`` -> a sample, or None (skipped, named on stderr) for an image the
    decoder cannot read."""
    path, label = item
    try:
        return {"image": encode_image(path, max_pixels), "label": int(label)}
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises: the image is unreadable
        import sys
        print(f"skipped unreadable image {path} ({type(exc).__name__}: {first_line(exc, 120)})", file=sys.stderr)
        return None


def read_classes(shards: str) -> List[str]:
    """The class names of a shard folder (local path or URL); a ConfigError naming the problem if absent."""
    where = join(shards, CLASSES_FILE)
    try:
        if is_url(shards):
            import obstore
            from obstore.store import from_url
            store = from_url(str(shards).rstrip("/"))
            text = bytes(obstore.get(store, CLASSES_FILE).bytes()).decode()
        else:
            with open(where) as fh:
                text = fh.read()
        classes = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - missing file, no access, not JSON: one line either way
        raise ConfigError(f"cannot read {where} ({type(exc).__name__}: {first_line(exc, 120)}): set "
                          f"data.init_args.data_dir to a folder written by `python -m swinlab data optimize`") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"{where} does not hold a list of class names: rewrite the shards with `python -m swinlab "
                          f"data optimize`")
    return classes


# -- reading ---------------------------------------------------------------------------------------------------------

# LitData's classes are subclassed on first use (importing litdata costs ~0.6 s, which every `python -m swinlab`
# process would pay otherwise); the module's __getattr__ makes them importable by name, as pickle needs.
_LAZY: Dict[str, type] = {}


def __getattr__(name: str):
    makers = {"ImageShards": _streaming_dataset_class, "ShardLoader": _loader_class}
    if name in makers:
        return makers[name]()
    raise AttributeError(name)


def _named(cls: type) -> type:
    cls.__module__, cls.__qualname__ = __name__, cls.__name__
    _LAZY[cls.__name__] = cls
    return cls


def _streaming_dataset_class():
    if "ImageShards" in _LAZY:
        return _LAZY["ImageShards"]
    from litdata import StreamingDataset

    class ImageShards(StreamingDataset):
        """A LitData dataset of shard samples, decoded and transformed: items are (image, label). Training
        augmentation is seeded by (seed, epoch, global sample index)."""

        def __init__(self, input_dir: str, transform: Optional[Callable], training: bool, seed: int = 0,
                     cache_dir: Optional[str] = None, max_cache_size: str = "50GB"):
            super().__init__(input_dir, cache_dir=cache_dir, shuffle=training, drop_last=True if training else None,
                             seed=seed, max_cache_size=max_cache_size)
            self.image_transform, self.training, self.aug_seed = transform, training, int(seed)

        def __getitem__(self, index: Any):
            item = super().__getitem__(index)
            i = int(getattr(index, "index", index))
            image = decode_image(item["image"])
            key = SampleIndex(i, sample_seed(self.aug_seed, self.current_epoch, i)) if self.training else i
            with seeded_rng(key):
                image = self.image_transform(image) if self.image_transform is not None else image
            return image, int(item["label"])

    return _named(ImageShards)


def _loader_class():
    if "ShardLoader" in _LAZY:
        return _LAZY["ShardLoader"]
    from litdata import StreamingDataLoader

    class ShardLoader(StreamingDataLoader):
        """LitData's ``StreamingDataLoader`` whose saved position applies only to the training epoch it was saved
        in: a checkpoint written after an epoch's last batch resumes with the next epoch from its start, as an
        uninterrupted run does (``epoch_of``: the trainer's current epoch)."""

        def __init__(self, *args: Any, epoch_of: Optional[Callable[[], Optional[int]]] = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._epoch_of = epoch_of or (lambda: None)
            self._pending: Optional[Dict[str, Any]] = None

        def state_dict(self) -> Dict[str, Any]:
            if self._pending is not None:
                return dict(self._pending)
            return {**super().state_dict(), "trainer_epoch": self._epoch_of()}

        def load_state_dict(self, obj: Dict[str, Any]) -> None:
            self._pending = dict(obj)  # applied when the next iteration starts, once the epoch is known

        def __iter__(self):
            # a generator: runs at the first batch, after Lightning has restored the checkpoint and set the epoch
            state, self._pending = self._pending, None
            self.restore = False  # a position loaded before is the previous iteration's (which Lightning may leave
            # unfinished: it stops at the epoch's batch count without asking for the end): this one is a new epoch
            if state:
                mine = state.pop("trainer_epoch", None)
                if mine is None or mine == self._epoch_of():
                    super().load_state_dict(state)
                else:  # that epoch is over: the next one starts, shuffled as in an uninterrupted run
                    self.current_epoch = int(state["current_epoch"])
            yield from super().__iter__()

    return _named(ShardLoader)


class StreamingImageDataModule(ImageFolderDataModule):
    """Training and validation from a shard folder written by ``python -m swinlab data optimize`` (``data_dir``: a local
    path or an object-store URL), with ImageFolderDataModule's transforms and their settings (``img_size``,
    ``auto_augment``, ``color_jitter``, ``re_prob``, ``re_mode``, ``interpolation``, ``crop_pct``, ``mean``,
    ``std``). Each data-parallel rank streams its own chunks; the training loader's position is saved in checkpoints
    (exact mid-epoch resume). ``cache_dir`` / ``max_cache_size``: where and how much of a remote data set LitData
    keeps on local disk. ``predict_dir``: images to predict on, as for ImageFolderDataModule. Training loader
    workers are started anew each epoch (LitData keeps its position inside them)."""

    def __init__(self, data_dir: str = "data/shards", img_size: Any = 224, batch_size: int = 128,
                 auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.4,
                 re_prob: float = 0.25, re_mode: str = "pixel", interpolation: str = "bicubic",
                 crop_pct: float = 224 / 256, num_workers: int = 8, pin_memory: bool = True, seed: int = 0,
                 eval_batch_size: Optional[int] = None, cache_dir: Optional[str] = None, max_cache_size: str = "50GB",
                 predict_dir: Optional[str] = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        super().__init__(data_dir=data_dir, img_size=img_size, batch_size=batch_size, auto_augment=auto_augment,
                         color_jitter=color_jitter, re_prob=re_prob, re_mode=re_mode, interpolation=interpolation,
                         crop_pct=crop_pct, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
                         seed=seed, eval_batch_size=eval_batch_size, predict_dir=predict_dir, mean=mean, std=std)
        self.shards = str(data_dir)
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size

    @staticmethod
    def count_classes(data_dir: str = "data/shards", **_: object) -> int:
        return len(read_classes(str(data_dir)))

    def check(self) -> List[str]:
        if not is_url(self.shards):
            if not os.path.isdir(self.shards):
                raise ConfigError(f"shard folder {self.shards} does not exist: set data.init_args.data_dir to a folder "
                                  f"written by `python -m swinlab data optimize` (or its object-store URL)")
            for split in SPLITS:
                if not os.path.isfile(join(self.shards, split, "index.json")):
                    raise ConfigError(f"{join(self.shards, split)} is not a LitData shard folder (no index.json): "
                                      f"write it with `python -m swinlab data optimize --src FOLDER --out "
                                      f"{self.shards}`")
        return read_classes(self.shards)

    def prepare_data(self) -> None:
        if self.predict_dir is None:
            self.check()

    def has_val_folder(self) -> bool:
        return True

    @property
    def class_names(self) -> Optional[List[str]]:
        if self.classes is None:
            self.classes = read_classes(self.shards)
        return self.classes

    def setup(self, stage: Optional[str] = None) -> None:
        if stage == "predict" and self.predict_dir is not None:
            self._predict_set()
            return
        if self.train_set is not None:
            return
        self.classes = self.check()
        shards = _streaming_dataset_class()
        kw = dict(seed=self.seed, cache_dir=self.cache_dir, max_cache_size=self.max_cache_size)
        self.train_set = shards(join(self.shards, "train"), self.transforms(True), training=True, **kw)
        self.val_set = shards(join(self.shards, "val"), self.transforms(False), training=False, **kw)

    def _epoch(self) -> Optional[int]:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else None

    def train_dataloader(self):
        if self.train_set is None:
            self.setup("fit")
        replicas, _ = self._shard()
        if len(self.train_set) < self.batch_size * replicas:
            raise ConfigError(f"the training shards hold {len(self.train_set)} samples, fewer than one batch "
                              f"({self.batch_size} x {replicas} process(es)): lower data.init_args.batch_size")
        # the loaders' own generators: creating an iterator then draws nothing from the global RNG
        loader = _loader_class()(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                                 pin_memory=self.pin_memory, drop_last=True, epoch_of=self._epoch,
                                 generator=torch.Generator().manual_seed(self.seed))
        if self._pending_loader_state:
            loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self):
        if self.val_set is None:
            self.setup("validate")
        from litdata import StreamingDataLoader
        return StreamingDataLoader(self.val_set, batch_size=self.eval_batch_size, num_workers=self.num_workers,
                                   pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.seed))

    def predict_inputs(self) -> List[str]:
        if self.predict_dir is not None:
            return super().predict_inputs()
        if self.val_set is None:
            self.setup("predict")
        return [f"val[{i}]" for i in range(len(self.val_set))]
