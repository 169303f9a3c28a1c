"""``SwinConfig``: what it accepts, the one-line errors for what it refuses, and its metadata round trip (pure
Python: each case costs microseconds)."""
import json

import pytest

from swinlab.errors import ConfigError
from swinlab.models.config import SwinConfig, per_stage, to_2tuple

PICO = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)


def test_replace_without_changes_is_the_same_object_and_with_changes_a_copy():
    cfg = SwinConfig(**PICO)
    assert cfg.replace() is cfg
    other = cfg.replace(embed_dim=32)
    assert other is not cfg and other.embed_dim == 32 and cfg.embed_dim == 16
    with pytest.raises(TypeError):
        cfg.replace(embed_dims=32)


def test_unknown_version_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"^version='v3' is unknown: use one of \['v1', 'v2'\]$"):
        SwinConfig(version="v3").resolved()


def test_bad_switch_value_names_the_choices():
    with pytest.raises(ConfigError, match=r"^attention='flash' is not a valid choice: use one of \['dot', 'cosine'\]$"):
        SwinConfig(attention="flash").resolved()


def test_depths_and_heads_must_pair_up():
    with pytest.raises(ConfigError, match=r"^depths \[2, 2\] and num_heads \[1\] must have one entry per stage each$"):
        SwinConfig(depths=(2, 2), num_heads=(1,)).resolved()


@pytest.mark.parametrize("img_size", [(30, 32), (32, 30), 30])
def test_image_size_must_divide_by_the_patch_size_on_both_axes(img_size):
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    with pytest.raises(ConfigError, match=rf"^img_size {h}x{w} is not divisible by the patch size 4: use a multiple "
                                          rf"of 4 \(e.g. {h // 4 * 4}\)$"):
        SwinConfig(img_size=img_size, patch_size=4).resolved()


@pytest.mark.parametrize("patch", [0, -2])
def test_patch_size_must_be_positive(patch):
    with pytest.raises(ConfigError, match=rf"^patch_size={patch} must be a positive int"):
        SwinConfig(img_size=32, patch_size=patch).resolved()


@pytest.mark.parametrize("key", ["drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"])
def test_drop_rates_are_probabilities_below_one(key):
    assert getattr(SwinConfig(**{key: 0.0}).resolved(), key) == 0.0
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=rf"^{key}={bad!r} is out of range: it must be in \[0, 1\)"):
            SwinConfig(**{key: bad}).resolved()


def test_patch_size_one_is_valid():
    cfg = SwinConfig(img_size=(7, 5), patch_size=1, depths=(2,), num_heads=(1,), window_size=5).resolved()
    assert cfg.img_size == [7, 5] and cfg.window_size == [[5, 5]]


def test_windows_must_be_positive_and_chunk_and_norm_period_not_negative():
    with pytest.raises(ConfigError, match=r"^window_size must be positive, got \[4, 0\]$"):
        SwinConfig(**{**PICO, "window_size": [4, 0]}).resolved()
    with pytest.raises(ConfigError, match=r"^attn_chunk_size=-1 must be >= 0"):
        SwinConfig(attn_chunk_size=-1).resolved()
    with pytest.raises(ConfigError, match=r"^extra_norm_period=-6 must be >= 0"):
        SwinConfig(extra_norm_period=-6).resolved()
    with pytest.raises(ConfigError, match=r"^window_size=\[4, 4, 4\] has 3 entries but the model has 4 stages"):
        SwinConfig(**{**PICO, "window_size": [4, 4, 4]}).resolved()
    with pytest.raises(ConfigError, match=r"^pretrained_window_size=\[8, 8, 8\] has 3 entries but the model has 4"):
        SwinConfig(**{**PICO, "pretrained_window_size": [8, 8, 8]}).resolved()
    assert SwinConfig(**{**PICO, "window_size": 1}).resolved().window_size == [[1, 1]] * 4  # 1x1: legal, if odd
    cfg = SwinConfig(attn_chunk_size=0, extra_norm_period=0).resolved()
    assert cfg.attn_chunk_size == 0 and cfg.extra_norm_period == 0


def test_resolved_fills_switches_from_the_preset_and_keeps_explicit_ones():
    cfg = SwinConfig(**PICO, version="v2", position_bias="table").resolved()
    assert (cfg.norm_placement, cfg.attention, cfg.position_bias, cfg.qkv_bias, cfg.merge_order) == (
        "res_post", "cosine", "table", "qv", "reduce_norm")
    assert cfg.depths == [2, 2, 2, 2] and cfg.num_heads == [1, 2, 4, 8] and cfg.img_size == [32, 32]
    assert cfg.window_size == [[4, 4]] * 4 and cfg.pretrained_window_size == [[0, 0]] * 4
    assert cfg.resolved() == cfg  # resolving twice changes nothing
    assert cfg.stage_dims() == [16, 32, 64, 128] and cfg.num_stages == 4


def test_per_stage_forms():
    assert per_stage(7, 3, "w") == [(7, 7)] * 3
    assert per_stage((6, 8), 3, "w") == [(6, 8)] * 3  # a pair for every stage
    assert per_stage([4, 5, 6], 3, "w") == [(4, 4), (5, 5), (6, 6)]  # one per stage
    assert per_stage([(4, 6), (2, 3)], 2, "w") == [(4, 6), (2, 3)]  # two stages: pairs per stage
    assert per_stage([4, 6], 2, "w") == [(4, 6), (4, 6)]  # two stages, two ints: one (h, w) pair
    with pytest.raises(ConfigError, match=r"^w=\[1, 2, 3\] has 3 entries but the model has 4 stages"):
        per_stage([1, 2, 3], 4, "w")
    with pytest.raises(ConfigError, match=r"expected an int or a pair \(h, w\), got \[1, 2, 3\]"):
        to_2tuple([1, 2, 3])


def test_to_dict_is_plain_json_and_reads_back():
    cfg = SwinConfig(**{**PICO, "window_size": ((4, 4), (2, 2), 2, 2)})
    d = cfg.to_dict()
    assert d["depths"] == [2, 2, 2, 2] and type(d["depths"]) is list
    assert d["window_size"] == [[4, 4], [2, 2], 2, 2] and type(d["window_size"][0]) is list
    assert json.loads(json.dumps(d)) == d
    back = SwinConfig.from_dict(d)
    assert back.resolved() == cfg.resolved()


def test_from_dict_names_unknown_keys():
    with pytest.raises(ConfigError, match=r"^unknown model config keys \['colour', 'depth'\]: expected some of \["):
        SwinConfig.from_dict({"depth": 2, "colour": "red", "embed_dim": 8})


@pytest.mark.parametrize("pretrained", [[0, 8], [8, 0], [-8, -8], [[8, 8], [8, 8], [8, 8], [0, 1]]])
def test_a_pretrained_window_the_cpb_cannot_have_been_trained_at_is_refused(pretrained):
    """0 means "no pretrained window" and must stand on both axes: a 0 beside a size would normalise one axis by the
    pretrained window and the other by the current one (or ignore the size given)."""
    cfg = SwinConfig(version="v2", img_size=32, patch_size=2, embed_dim=16, depths=(2, 2, 2, 2),
                     num_heads=(1, 2, 4, 8), window_size=4, pretrained_window_size=pretrained)
    with pytest.raises(ConfigError, match="is not a window a CPB was trained at: use 0 .none. or a positive size"):
        cfg.resolved()
    for fine in ([2, 3], [1, 1]):  # 1: a stage whose window was clamped to one token
        assert cfg.replace(pretrained_window_size=fine).resolved().pretrained_window_size[0] == fine
