"""Images as users have them (issue #25): real photographs as EXIF-rotated JPEGs, 8- and 16-bit PNGs, grayscale,
palette with transparency, RGBA/LA, CMYK, 1x1 and 3x5 pixels, 6000x4000, truncated and not-an-image files. Each
either decodes to what a user sees (orientation applied, 16 bits scaled, transparency over white) and trains, or is
skipped with a counted warning; a val/ folder that lacks training classes is named once, at the start."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from photos import write_wild_images

from swinlab.data import ImageFolderDataModule, SafeImageFolder
from swinlab.data.common import SampleIndex
from swinlab.data.folder import ALPHA_BACKGROUND, load_rgb


@pytest.fixture(scope="module")
def wild(tmp_path_factory):
    root = tmp_path_factory.mktemp("wild")
    return root, write_wild_images(root / "train" / "wild")


def test_each_form_decodes_to_what_users_see(wild):
    _, images = wild
    assert ALPHA_BACKGROUND == (255, 255, 255)
    for name, (path, expected, tol) in images.items():
        if expected is None:
            with pytest.raises(Exception):  # noqa: B017 - whatever the decoder raises
                load_rgb(str(path))
            continue
        got = np.asarray(load_rgb(str(path)))
        assert got.dtype == np.uint8 and got.shape == expected.shape, name  # orientation: (64, 48), not (48, 64)
        step = 25 if name.startswith("large") else 1
        diff = np.abs(got[::step, ::step].astype(np.float64) - expected[::step, ::step]).mean()
        assert diff <= tol, (name, diff)
        if name == "png16_gray":
            assert got.max() < 250 and got.std() > 20  # scaled, not clipped to a white image


def test_a_folder_of_every_form_trains_and_skips_only_the_broken_files(wild):
    """The training and the evaluation transforms over the folder: every readable form yields a finite image at the
    model's size; the truncated and the not-an-image files are skipped, each warned once with a running count."""
    root, images = wild
    dm = ImageFolderDataModule(data_dir=str(root), img_size=32, num_workers=0)
    for training in (True, False):
        ds = SafeImageFolder(str(root / "train"), dm.transforms(training))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(len(ds)):
                x, _ = ds[SampleIndex(i, i) if training else i]
                assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
        skipped = [str(w.message) for w in caught if "skipped unreadable image" in str(w.message)]
        assert len(ds) == len(images) and len(skipped) == 2, skipped
        assert sorted(Path(s.split()[3]).name for s in skipped) == ["not_an_image.png", "truncated.jpg"]
        assert "2 skipped so far" in skipped[1]


def test_val_folder_lacking_training_classes_is_named_once(tmp_path):
    from PIL import Image
    for split, classes in (("train", ("cat", "dog", "fox")), ("val", ("dog",))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / split / c / "0.png")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), img_size=32, batch_size=1, num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare_data()
        dm.setup("fit")
    named = [str(w.message) for w in caught if "lacks" in str(w.message)]
    assert len(named) == 1 and "\n" not in named[0]
    assert "lacks 2 of the 3 training classes (cat, fox)" in named[0]
