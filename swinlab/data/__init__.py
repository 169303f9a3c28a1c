"""DataModules: embedded digits (default), ImageNet-style folders, LitData shards, synthetic images."""
from .common import BaseDataModule
from .digits import DigitsDataModule, load_digits_tensors
from .folder import ImageFolderDataModule, SafeImageFolder, check_split
from .streaming import StreamingImageDataModule
from .synthetic import SyntheticDataModule, SyntheticImages

__all__ = ["BaseDataModule", "DigitsDataModule", "ImageFolderDataModule", "SafeImageFolder", "StreamingImageDataModule",
           "SyntheticDataModule",
           "SyntheticImages", "check_split", "load_digits_tensors"]
