"""DataModules: digits split and loaders, synthetic images, image folders and their bad-input errors."""
import warnings

import pytest
import torch
from PIL import Image

from swinlab.data import DigitsDataModule, ImageFolderDataModule, SyntheticDataModule
from swinlab.errors import ConfigError


def test_digits_split_shapes_and_epoch_shuffle():
    dm = DigitsDataModule(img_size=16, batch_size=32, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == 360
    x, y = dm.val_set[0]
    assert x.shape == (3, 16, 16) and -1.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert torch.equal(x[0], x[1])  # grey digits on 3 channels
    counts = torch.bincount(dm.val_set.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    again = DigitsDataModule(img_size=16, val_fraction=0.2)
    again.setup("fit")
    assert torch.equal(again.val_set.x, dm.val_set.x)  # fixed split
    loader = dm.train_dataloader()
    assert loader.drop_last and len(loader) == len(dm.train_set) // 32
    orders = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        orders.append(list(loader.sampler))
    assert orders[0] == orders[2] and orders[0] != orders[1]
    with pytest.raises(ConfigError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)


def test_synthetic_is_deterministic():
    dm = SyntheticDataModule(img_size=[24, 16], num_classes=7, batch_size=4, train_samples=10, val_samples=6)
    dm.setup("fit")
    (x0, y0), (x1, _) = dm.train_set[3], dm.train_set[4]
    assert x0.shape == (3, 24, 16) and 0 <= y0 < 7
    assert torch.equal(dm.train_set[3][0], x0) and not torch.equal(x0, x1)
    assert not torch.equal(dm.val_set[3][0], x0)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 24, 16) and yb.dtype == torch.int64
    assert dm.num_classes == 7


def _image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), color).save(path)


def _folders(root, classes=("cat", "dog", "fox")):
    for i, c in enumerate(classes):
        for split in ("train", "val"):
            for j in range(2):
                _image(root / split / c / f"{j}.png", (40 * i, 10 * j, 200))
    return root


def test_image_folder_transforms_and_classes(tmp_path):
    dm = ImageFolderDataModule(data_dir=str(_folders(tmp_path)), img_size=32, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "fox"]
    x, y = dm.train_set[0]
    assert x.shape == (3, 32, 32)
    names = [type(t).__name__ for t in dm.train_set.transform.transforms]
    assert "RandAugment" in names and "RandomErasing" in names
    xv, yv = dm.val_set[5]
    assert xv.shape == (3, 32, 32) and yv == 2
    assert torch.equal(dm.val_set[5][0], xv)  # evaluation is deterministic (resize + centre crop)
    resize = dm.val_set.transform.transforms[0]
    assert resize.size in (36, [36], (36, 36))  # 32 / 0.875
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 3, 32, 32)


def test_image_folder_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ImageFolderDataModule(data_dir=str(tmp_path / "nope")).setup("fit")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no class folders"):
        ImageFolderDataModule(data_dir=str(tmp_path / "empty")).setup("fit")
    root = _folders(tmp_path / "d")
    (root / "train" / "owl").mkdir()
    (root / "train" / "owl" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="owl holds no images") as err:
        ImageFolderDataModule(data_dir=str(root)).setup("fit")
    assert "\n" not in str(err.value)


def test_corrupt_image_skipped_or_fatal(tmp_path):
    root = _folders(tmp_path)
    bad = root / "train" / "cat" / "0.png"
    bad.write_bytes(b"not an image at all")
    dm = ImageFolderDataModule(data_dir=str(root), img_size=32, batch_size=2, num_workers=0, re_prob=0.0)
    dm.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, y = dm.train_set[0]  # the next readable image stands in
        batches = list(dm.train_dataloader())
    assert x.shape == (3, 32, 32) and y == 0
    assert len(batches) == 3
    assert dm.train_set.skipped == [str(bad)]
    assert any("0.png" in str(w.message) and "skipped" in str(w.message) for w in caught)
    strict = ImageFolderDataModule(data_dir=str(root), img_size=32, on_corrupt="error", num_workers=0)
    strict.setup("fit")
    with pytest.raises(ConfigError, match="cannot read image .*0.png"):
        strict.train_set[0]


# ---------------------------------------------------------------------------------------------------------------
# The resumable training order, checked against DistributedSampler's rule written out here
# ---------------------------------------------------------------------------------------------------------------

def _expected_shard(n, replicas, rank, seed, epoch):
    """randperm seeded by seed + epoch, padded by wrapping to a multiple of the replicas, every replicas-th index."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    total = -(-n // replicas) * replicas
    perm = (perm + perm[: total - n])
    return perm[rank::replicas]


def _loader(n=23, replicas=2, rank=0, seed=5, batch_size=3, num_workers=0):
    from swinlab.data.common import ResumableLoader, ResumableSampler
    data = list(range(n))
    sampler = ResumableSampler(data, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
    return ResumableLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                           collate_fn=_ints)


def _ints(batch):
    return [int(i) for i in batch]


@pytest.mark.parametrize("rank", [0, 1])
def test_resumed_loader_serves_the_rest_of_this_ranks_epoch(rank):
    from swinlab.data.common import sample_seed
    epoch, seed = 3, 5
    shard = _expected_shard(23, 2, rank, seed, epoch)  # 12 indices -> 4 full batches of 3
    expected = [shard[i:i + 3] for i in range(0, 12, 3)]
    first = _loader(rank=rank)
    first.sampler.set_epoch(epoch)
    assert len(first) == 4
    it = iter(first)
    assert [next(it), next(it)] == expected[:2]
    state = first.state_dict()
    assert state["resume"] == {"epoch": epoch, "batches_served": 2, "batch_size": 3, "seed": seed,
                               "num_samples": 12, "num_workers": 0}
    resumed = _loader(rank=rank)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(epoch)  # Lightning sets the epoch again on resume, after iter()
    assert list(resumed) == expected[2:]
    assert resumed.state_dict()["resume"]["batches_served"] == 4
    # the augmentation seeds go with the sample, not with its position in the epoch
    resumed.sampler.load_state_dict({"epoch": epoch, "yielded": 6})
    idx = list(resumed.sampler)
    assert [int(i) for i in idx] == shard[6:]
    assert [i.aug_seed for i in idx] == [sample_seed(seed, epoch, int(i)) for i in idx]
    # the next epoch starts from its beginning
    resumed.sampler.set_epoch(epoch + 1)
    assert [int(i) for i in resumed.sampler] == _expected_shard(23, 2, rank, seed, epoch + 1)


@pytest.mark.parametrize("saved_workers, resumed_workers", [(2, 2), (2, 0), (0, 2)])
def test_resume_with_workers_and_with_another_worker_count_continues_at_the_same_sample(saved_workers,
                                                                                       resumed_workers):
    """torchdata's state is per worker layout: the same layout restores it, another one continues through the
    sampler's position; either way the rest of the epoch is the uninterrupted one's."""
    whole = _loader(n=40, replicas=1, batch_size=4)
    whole.sampler.set_epoch(1)
    expected = list(whole)
    first = _loader(n=40, replicas=1, batch_size=4, num_workers=saved_workers)
    first.sampler.set_epoch(1)
    it = iter(first)
    assert [next(it) for _ in range(3)] == expected[:3]
    state = first.state_dict()
    del it, first
    resumed = _loader(n=40, replicas=1, batch_size=4, num_workers=resumed_workers)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert list(resumed) == expected[3:]
    assert resumed.state_dict()["resume"]["batches_served"] == len(expected)


def test_resume_after_the_epochs_last_batch_starts_the_next_epoch_and_changed_data_starts_over():
    first = _loader(replicas=1, n=10, batch_size=4)
    first.sampler.set_epoch(0)
    it = iter(first)
    next(it), next(it)  # the last full batch: a checkpoint saved now is at the epoch's end
    state = first.state_dict()
    assert state["resume"]["batches_served"] == 2 and state["resume"]["epoch"] == 0
    resumed = _loader(replicas=1, n=10, batch_size=4)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning moves on to the next epoch
    perm = _expected_shard(10, 1, 0, 5, 1)
    assert list(resumed) == [perm[:4], perm[4:8]]
    changed = _loader(replicas=1, n=10, batch_size=2)  # another batch size: positions no longer line up
    with pytest.warns(UserWarning, match=r"training data changed .*\(4, 10, 5\) -> \(2, 10, 5\)"):
        changed.load_state_dict(state)
    changed.sampler.set_epoch(0)
    assert [int(i) for i in changed.sampler] == _expected_shard(10, 1, 0, 5, 0)


def test_a_checkpoint_of_the_earlier_loader_resumes_at_its_position():
    loader = _loader(replicas=1, n=12, batch_size=3)
    loader.load_state_dict({"epoch": 2, "batches_served": 1, "batch_size": 3, "seed": 5, "num_samples": 12})
    loader.sampler.set_epoch(2)
    perm = _expected_shard(12, 1, 0, 5, 2)
    assert list(loader) == [perm[3:6], perm[6:9], perm[9:12]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.load_state_dict({})  # nothing saved (e.g. a checkpoint without loader state): a no-op
    loader.sampler.set_epoch(3)
    assert len(list(loader)) == 4


def test_sample_seed_is_splitmix64_written_out():
    from swinlab.data.common import sample_seed
    mask = (1 << 64) - 1

    def by_hand(seed, epoch, index):
        z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return (z ^ (z >> 31)) & ((1 << 63) - 1)

    for args in [(0, 0, 0), (1, 2, 3), (7, 0, 1796), (2**40, 5, 9)]:
        assert sample_seed(*args) == by_hand(*args)
    assert len({sample_seed(0, e, i) for e in range(3) for i in range(50)}) == 150


def test_loader_state_counts_served_batches_of_its_epoch():
    loader = _loader(replicas=1, n=12, batch_size=3)
    loader.sampler.set_epoch(2)
    it = iter(loader)
    next(it)
    loader.sampler.set_epoch(3)  # the next epoch is announced but nothing of it is served yet
    assert loader.state_dict()["resume"]["epoch"] == 2 and loader.state_dict()["resume"]["batches_served"] == 1


def test_sampler_passes_shuffle_and_drop_last_through():
    from swinlab.data.common import ResumableSampler
    ordered = ResumableSampler(list(range(7)), num_replicas=2, rank=1, shuffle=False, seed=3)
    assert [int(i) for i in ordered] == [1, 3, 5, 0]  # padded by wrapping, as DistributedSampler
    dropped = ResumableSampler(list(range(7)), num_replicas=2, rank=1, shuffle=False, drop_last=True)
    assert [int(i) for i in dropped] == [1, 3, 5] and dropped.num_samples == 3
    with pytest.raises(ValueError, match="not a sampler position"):
        ordered.load_state_dict({"epoch": 0})


def test_loader_over_a_plain_sampler_is_torchdatas_own():
    from swinlab.data.common import ResumableLoader
    loader = ResumableLoader(list(range(6)), batch_size=2, collate_fn=lambda b: list(b))
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert "resume" not in state
    again = ResumableLoader(list(range(6)), batch_size=2, collate_fn=lambda b: list(b))
    again.load_state_dict(state)
    assert list(again) == [[2, 3], [4, 5]]


def test_digits_on_a_larger_canvas_keep_their_pixel_size():
    """digit_size: the digits are rendered at that size and centred on the img_size canvas, blank around them; the
    same digit at 32 px filling the image and at 32 px on a 96 px canvas is the same pixels."""
    full = DigitsDataModule(img_size=32, max_shift=0)
    canvas = DigitsDataModule(img_size=96, digit_size=32, max_shift=0)
    full.setup("fit")
    canvas.setup("fit")
    x32, y32 = full.val_set[5]
    x96, y96 = canvas.val_set[5]
    assert x96.shape == (3, 96, 96) and y96 == y32
    assert torch.equal(x96[:, 32:64, 32:64], x32)
    blank = x96.clone()
    blank[:, 32:64, 32:64] = -1.0
    assert torch.equal(blank, torch.full_like(x96, -1.0))  # nothing but blank pixels around the digit
    with pytest.raises(ConfigError, match="digit_size=40 must be between 1 and the image size 32"):
        DigitsDataModule(img_size=32, digit_size=40)
