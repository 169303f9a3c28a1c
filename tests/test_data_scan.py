"""Image-folder scans end and stay inside the class folder; whatever the decoder raises, oversized images included, goes
through ``on_corrupt`` (issue #14, data class)."""
import os
import signal
import warnings

import pytest
from PIL import Image

from swinlab.data import ImageFolderDataModule
from swinlab.data.folder import scan_images
from swinlab.errors import ConfigError


def _image(path, size=(24, 24), color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _tree(root):
    for split in ("train", "val"):
        for c, color in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
            for j in range(2):
                _image(root / split / c / f"{j}.png", color=color)
    return root


@pytest.fixture
def deadline():
    """A scan that loops would hang the suite: fail it after 30 s instead."""
    def expire(*_):
        raise TimeoutError("the folder scan did not end")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_links_to_the_folder_itself_end_and_add_nothing(tmp_path, deadline):
    root = _tree(tmp_path / "data")
    cat = root / "train" / "cat"
    os.symlink(".", cat / "again")
    os.symlink(".", cat / "and_again")
    (cat / "sub").mkdir()
    _image(cat / "sub" / "2.png")
    os.symlink("..", cat / "sub" / "up")  # back to cat/: already visited
    images, refused = scan_images(cat)
    assert images == [str(cat / "0.png"), str(cat / "1.png"), str(cat / "sub" / "2.png")]
    assert refused == []
    dm = ImageFolderDataModule(data_dir=str(root), img_size=32, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert [t for _, t in dm.train_set.samples] == [0, 0, 0, 1, 1]


def test_a_link_out_of_the_class_folder_is_not_followed(tmp_path, deadline):
    """A link to ``..`` inside a class folder would file the other classes' images under this label."""
    root = _tree(tmp_path / "data")
    os.symlink("..", root / "train" / "cat" / "parent")
    os.symlink(str(tmp_path), root / "train" / "dog" / "outside")
    dm = ImageFolderDataModule(data_dir=str(root), img_size=32, batch_size=2, num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    samples = dm.train_set.samples
    assert len(samples) == 4
    assert all(("/cat/" in p) == (t == 0) and ("/dog/" in p) == (t == 1) for p, t in samples)
    assert any("not followed" in str(w.message) and "parent" in str(w.message) for w in caught)


def test_a_class_folder_that_is_a_link_is_scanned_where_it_points(tmp_path):
    """ImageNet trees often link class folders to another disk: that is the class folder, followed."""
    elsewhere = tmp_path / "disk2" / "fox"
    _image(elsewhere / "a.png")
    root = _tree(tmp_path / "data")
    os.symlink(str(elsewhere), root / "train" / "fox")
    dm = ImageFolderDataModule(data_dir=str(root), img_size=32, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog", "fox"]
    assert [t for _, t in dm.train_set.samples].count(2) == 1


def test_a_decompression_bomb_goes_through_on_corrupt(tmp_path):
    """A 20000 x 20000 PNG is a few KB on disk; PIL raises DecompressionBombError (not an OSError) for it."""
    root = _tree(tmp_path / "data")
    bomb = root / "train" / "cat" / "0.png"
    Image.new("1", (20000, 20000)).save(bomb)
    assert bomb.stat().st_size < 200_000
    dm = ImageFolderDataModule(data_dir=str(root), img_size=32, batch_size=2, num_workers=0, re_prob=0.0)
    dm.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, y = dm.train_set[0]  # the next readable image stands in
    assert x.shape == (3, 32, 32) and y == 0 and dm.train_set.skipped == [str(bomb)]
    assert any("skipped unreadable image" in str(w.message) for w in caught)
    strict = ImageFolderDataModule(data_dir=str(root), img_size=32, num_workers=0, on_corrupt="error")
    strict.setup("fit")
    with pytest.raises(ConfigError) as err:
        strict.train_set[0]
    assert "0.png" in str(err.value) and "on_corrupt: skip" in str(err.value) and "\n" not in str(err.value)


def test_max_image_pixels_is_the_limit_and_is_checked(tmp_path):
    root = _tree(tmp_path / "data")
    _image(root / "train" / "cat" / "0.png", size=(40, 40))  # 1,600 pixels
    dm = ImageFolderDataModule(data_dir=str(root), img_size=32, num_workers=0, on_corrupt="error",
                               max_image_pixels=1000)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="40x40 pixels is more than max_image_pixels=1000"):
        dm.train_set[0]
    assert dm.train_set[1][1] == 0  # 24 x 24 = 576 pixels: read
    roomy = ImageFolderDataModule(data_dir=str(root), img_size=32, num_workers=0, on_corrupt="error",
                                  max_image_pixels=1600)
    roomy.setup("fit")
    assert roomy.train_set[0][0].shape == (3, 32, 32)
    with pytest.raises(ConfigError, match="max_image_pixels=0 must be >= 1"):
        ImageFolderDataModule(data_dir=str(root), max_image_pixels=0)


def test_a_folder_with_only_train_gets_a_seeded_stratified_validation_split(tmp_path):
    root = tmp_path / "data"
    for c, n in (("cat", 10), ("dog", 5), ("emu", 1)):
        for j in range(n):
            _image(root / "train" / c / f"{j}.png", color=(j * 20, 0, 0))

    def split(seed, val_split=0.2):
        dm = ImageFolderDataModule(data_dir=str(root), img_size=32, num_workers=0, seed=seed, val_split=val_split)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm.setup("fit")
        assert any("held out for validation" in str(w.message) for w in caught)
        return dm, {p for p, _ in dm.train_set.samples}, [p for p, _ in dm.val_set.samples]

    dm, train, val = split(0)
    assert dm.num_classes == 3
    labels = [t for _, t in dm.val_set.samples]
    assert labels.count(0) == 2 and labels.count(1) == 1 and labels.count(2) == 0  # 20% of 10, >= 1 of 5, 0 of 1
    assert not train & set(val) and len(train) + len(val) == 16
    assert all(("/cat/" in p) == (t == 0) for p, t in dm.val_set.samples)
    assert "RandomResizedCrop" not in str(dm.val_set.transform)  # evaluation transforms on the held-out images
    assert split(0)[2] == val and split(1)[2] != val  # the seed decides, and only the seed
    with pytest.raises(ConfigError, match="val_split=1.0 must be in"):
        ImageFolderDataModule(data_dir=str(root), val_split=1.0)
