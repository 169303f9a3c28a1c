"""DataModules: embedded digits (default), ImageNet-style folders, synthetic images."""
from .common import BaseDataModule
from .digits import DigitsDataModule, load_digits_tensors
from .folder import ImageFolderDataModule, SafeImageFolder, check_split
from .synthetic import SyntheticDataModule, SyntheticImages

__all__ = ["BaseDataModule", "DigitsDataModule", "ImageFolderDataModule", "SafeImageFolder", "SyntheticDataModule",
           "SyntheticImages", "check_split", "load_digits_tensors"]
