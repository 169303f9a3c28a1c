"""timm's model API on swinlab's model (issue #13): forward_intermediates / prune_intermediate_layers,
features_only with feature_info, pretrained_cfg for timm's data config, no_weight_decay / group_matcher, and
swinlab's variants in timm's registry as ``swinlab_<name>``; each checked against timm's twin on the same weights."""
import pytest
import timm
import torch
from helpers import randomize_
from safetensors.torch import save_file
from test_models import PICO, timm_twin
from timm.data import resolve_data_config
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay

import swinlab
from swinlab.errors import ConfigError
from swinlab.models import SwinTransformer, create_model

NAMES = ["swin_pico_patch2_window4_32", "swinv2_pico_patch2_window4_32"]
TIMM_ARCH = {"swin_pico_patch2_window4_32": "swin_tiny_patch4_window7_224",
             "swinv2_pico_patch2_window4_32": "swinv2_tiny_window8_256"}


def _pair(name):
    ref = randomize_(timm_twin(name)).eval()
    ours = create_model(name).eval()
    ours.load_state_dict(ref.state_dict(), strict=False)
    return ours, ref


def _x(seed=0, size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _same(a, b, tol=1e-5):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v, tol)
        return
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_equal_timm(name):
    ours, ref = _pair(name)
    x = _x()
    calls = [dict(), dict(indices=2), dict(indices=[0, -1], norm=True), dict(indices=[1], stop_early=True),
             dict(indices=[1]),  # an early stage without stop_early: the final features are still the last stage's
             dict(indices=[0, 3], stop_early=True, norm=True), dict(intermediates_only=True)]
    with torch.no_grad():
        for kw in calls:
            _same(ours.forward_intermediates(x, **kw), ref.forward_intermediates(x, **kw))
        nhwc = ours.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        nchw = ref.forward_intermediates(x, intermediates_only=True)
        _same([t.permute(0, 3, 1, 2) for t in nhwc], nchw)
        _same(ours.forward_pyramid(x, norm_last=True), ref.forward_intermediates(x, norm=True,
                                                                                 intermediates_only=True))
    with pytest.raises(ConfigError, match="output_fmt"):
        ours.forward_intermediates(x, output_fmt="NLC")
    with pytest.raises(ConfigError, match="out of range"):
        ours.forward_intermediates(x, indices=[4])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("indices,prune_norm", [([1], False), (2, True), ([0, 3], False), ([0, 2], False),
                                               (None, False)])
def test_prune_intermediate_layers_equals_timm(name, indices, prune_norm):
    """``None``: the method's default indices (timm's: the last stage); ``prune_norm`` False is left to the default."""
    ours, ref = _pair(name)
    args = () if indices is None else (indices,)
    kwargs = {"prune_norm": True} if prune_norm else {}
    assert ours.prune_intermediate_layers(*args, **kwargs) == ref.prune_intermediate_layers(*args, **kwargs)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert ours.num_features == ref.num_features and ours.num_layers == len(ours.layers) == len(ref.layers)
    indices = 1 if indices is None else indices
    x = _x(1)
    with torch.no_grad():
        _same(ours.forward_intermediates(x, indices), ref.forward_intermediates(x, indices))


@pytest.mark.parametrize("name", NAMES)
def test_features_only_equals_timms_features_only_model(tmp_path, name):
    full = randomize_(timm_twin(name))
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    ref = timm.create_model(TIMM_ARCH[name], pretrained=True, features_only=True, out_indices=(1, 3),
                            pretrained_cfg_overlay=dict(file=str(path)), **PICO).eval()
    ours = create_model(name, checkpoint=str(path), features_only=True, out_indices=(1, 3)).eval()
    via_timm = timm.create_model(f"swinlab_{name}", checkpoint=str(path), features_only=True,
                                 out_indices=(1, 3)).eval()
    assert isinstance(via_timm, SwinTransformer)
    assert ours.feature_info == ref.feature_info.get_dicts()
    assert ours.feature_info.channels() == ref.feature_info.channels() == [32, 128]
    assert ours.feature_info.reduction() == ref.feature_info.reduction() == [4, 16]
    x = _x(2)
    with torch.no_grad():
        expected = ref(x)
        _same(ours(x), expected)  # NHWC, un-normalised, as timm's
        _same(via_timm(x), expected)
    assert any(k.startswith("layers.3.") for k in ours.state_dict())  # stage 3 is an output: kept
    assert not any(k.startswith(("norm.", "head.fc")) for k in ours.state_dict())  # final norm and head: dropped
    nchw = create_model(name, checkpoint=str(path), features_only=True, out_indices=[-1], feature_fmt="NCHW")
    with torch.no_grad():
        _same(nchw.eval()(x), [expected[-1].permute(0, 3, 1, 2)])
    with pytest.raises(ConfigError, match="features_only"):
        create_model(name, out_indices=(1,))


def test_pretrained_cfg_gives_timms_data_config_at_the_models_own_size():
    with torch.device("meta"):
        ours = create_model("swinv2_tiny_window8_256")
        ref = timm.create_model("swinv2_tiny_window8_256")
        small = create_model("swinv2_tiny_window8_256", img_size=128, num_classes=10)
        tagged = create_model("swin_base_patch4_window7_224.ms_in22k")
    assert resolve_data_config(model=ours) == resolve_data_config(model=ref)
    assert resolve_data_config(model=ours)["input_size"] == (3, 256, 256)
    assert ours.pretrained_cfg["hf_hub_id"] == ref.pretrained_cfg["hf_hub_id"] == "timm/swinv2_tiny_window8_256.ms_in1k"
    assert resolve_data_config(model=small)["input_size"] == (3, 128, 128)
    assert small.pretrained_cfg["num_classes"] == 10 and small.pretrained_cfg["pool_size"] == (4, 4)
    assert tagged.pretrained_cfg["tag"] == "ms_in22k" and tagged.pretrained_cfg["num_classes"] == 21841
    pico = create_model("swinv2_pico_patch2_window4_32", num_classes=10)  # no timm cfg: built from the config
    cfg = resolve_data_config(model=pico)
    assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.9
    assert pico.default_cfg is pico.pretrained_cfg and pico.pretrained_cfg["num_classes"] == 10


@pytest.mark.parametrize("name", NAMES)
def test_no_weight_decay_and_group_matcher(name):
    """no_weight_decay and the coarse grouping equal timm's; the fine grouping (layer decay) is the official recipe's,
    so timm's own layer-decay helper gives a swinlab model the official scales (tests/test_train_optim.py)."""
    from timm.models._manipulate import MATCH_PREV_GROUP

    from swinlab.models import swin
    from swinlab.tasks import layer_ids
    assert swin.MATCH_PREV_GROUP == MATCH_PREV_GROUP
    ours, ref = _pair(name)
    assert ours.no_weight_decay() == ref.no_weight_decay() and ours.no_weight_decay()
    assert ours.group_matcher(coarse=True) == ref.group_matcher(coarse=True)
    groups = group_parameters(ours, ours.group_matcher(coarse=True))
    ref_groups = group_parameters(ref, ref.group_matcher(coarse=True))
    # the same groups (V1's patch merging registers its norm after the reduction, timm's before)
    assert {k: sorted(v) for k, v in groups.items()} == {k: sorted(v) for k, v in ref_groups.items()}

    groups = param_groups_layer_decay(ours, weight_decay=0.05, no_weight_decay_list=ours.no_weight_decay(),
                                      layer_decay=0.8)
    names = {id(p): n for n, p in ours.named_parameters()}
    ids = layer_ids(ours)
    last = max(ids.values())
    for g in groups:
        for p in g["params"]:
            assert g["lr_scale"] == pytest.approx(0.8 ** (last - ids[names[id(p)]])), names[id(p)]


def test_swinlab_variants_in_timms_registry():
    names = timm.list_models(module="timm_models")
    assert sorted(names) == sorted(f"swinlab_{n}" for n in swinlab.list_models())
    assert not [n for n in set(timm.list_models()) - set(names) if n.startswith("swinlab")]  # timm's own: no clash
    model = timm.create_model("swinlab_swinv2_pico_patch2_window4_32", num_classes=5, drop_path_rate=0.0)
    assert isinstance(model, SwinTransformer) and model.num_classes == 5
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    with pytest.raises(ConfigError, match="no public pretrained weights"):
        timm.create_model("swinlab_swinv2_pico_patch2_window4_32", pretrained=True)
    with pytest.raises(ConfigError, match="unknown pretrained tag 'nope'"):
        timm.create_model("swinlab_swinv2_tiny_window8_256.nope")
    assert sorted(swinlab.models.register_timm_models()) == sorted(names)  # registering again: a no-op
    assert sorted(timm.list_models(module="timm_models")) == sorted(names)


def test_timm_pretrained_cfg_overlay_updates_swinlab_models_as_timms_own():
    """``timm.create_model(..., pretrained_cfg_overlay=...)`` replaces the named keys of the model's pretrained_cfg
    and keeps the others, for a swinlab entry point as for timm's own Swin."""
    overlay = dict(mean=(0.5, 0.5, 0.5), crop_pct=1.0)
    ours = timm.create_model("swinlab_swinv2_pico_patch2_window4_32", pretrained_cfg_overlay=overlay)
    with torch.device("meta"):
        ref = timm.create_model("swinv2_tiny_window8_256", pretrained_cfg_overlay=overlay)
    for key, value in overlay.items():
        assert ours.pretrained_cfg[key] == ref.pretrained_cfg[key] == value
    assert ours.pretrained_cfg["input_size"] == (3, 32, 32)  # the other keys stay


@pytest.mark.parametrize("method", ["forward_intermediates", "prune_intermediate_layers"])
def test_timm_api_defaults_are_timms(method):
    """The defaults of the timm-API methods equal timm's Swin's (a call without arguments means the same)."""
    import inspect
    ours = inspect.signature(getattr(SwinTransformer, method)).parameters
    ref = inspect.signature(getattr(timm.models.swin_transformer.SwinTransformer, method)).parameters
    assert {k: v.default for k, v in ours.items()} == {k: v.default for k, v in ref.items()}


@pytest.mark.parametrize("indices", [1, 2, 3, 4, [0], [3], [0, -1], [-2, 1], None])
def test_take_indices_is_timms_feature_take_indices(indices):
    from timm.models._features import feature_take_indices

    from swinlab.models.swin import take_indices
    assert take_indices(4, indices) == tuple(feature_take_indices(4, indices))


@pytest.mark.parametrize("indices, words", [(0, "use 1 to 4"), (5, "use 1 to 4"), ([4], "use 0 to 3 (or -1"),
                                            ([-5], "use 0 to 3 (or -1")])
def test_take_indices_out_of_range_is_one_line_naming_the_range(indices, words):
    from swinlab.models.swin import take_indices
    with pytest.raises(ConfigError) as err:
        take_indices(4, indices)
    assert words in str(err.value)


def test_as_features_defaults_to_timms_nhwc_maps_and_names_timms_modules():
    """``as_features()`` without arguments gives every stage's map NHWC, as timm's ``features_only`` Swin does, and
    its feature_info answers timm's FeatureInfo queries (module names, channels, reductions) as timm's does."""
    name = "swin_pico_patch2_window4_32"
    ours = create_model(name).as_features()
    ref = timm.create_model(TIMM_ARCH[name], pretrained=False, features_only=True)
    maps = ours(_x())
    assert [m.shape[-1] for m in maps] == ours.feature_info.channels()  # channels last
    assert ours.feature_info.module_name() == ref.feature_info.module_name() == [f"layers.{i}" for i in range(4)]
    assert ours.feature_info.reduction() == [2, 4, 8, 16] and ref.feature_info.reduction() == [4, 8, 16, 32]
    assert [d["module"] for d in ours.feature_info.get_dicts()] == ref.feature_info.module_name()
    with pytest.raises(ConfigError, match="output_fmt='NLC': use 'NCHW' or 'NHWC'"):
        create_model(name).as_features(output_fmt="NLC")


def test_reset_classifier_takes_timms_avg_and_no_pool_and_updates_the_pretrained_cfg():
    model = create_model("swinv2_pico_patch2_window4_32").eval()
    cfg = dict(model.pretrained_cfg)
    x = _x()
    model.reset_classifier(5, "avg")  # timm's callers pass the pool they want
    assert model.head.fc.out_features == 5 and model.pretrained_cfg == dict(cfg, num_classes=5)
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(0, "")  # no pooling: the NHWC map itself, as timm's Swin
        _same(model(x), features)
        model.reset_classifier(3)  # None keeps the pool
        assert model.global_pool == model.config.global_pool == "" and model(x).shape == (2, 2, 2, 3)
    with pytest.raises(ConfigError, match=r"global_pool='max' is not supported: use one of \['avg', ''\]"):
        model.reset_classifier(5, "max")


def test_a_name_timm_lacks_gets_timms_swin_pretrained_cfg_with_its_own_size_and_no_weights():
    """swin_pico is not in timm: its pretrained_cfg is timm's Swin-T config (the reference, read from timm) for every
    preprocessing field, no weights to download (empty url, no hf_hub_id, no tag) and the model's own size."""
    from swinlab.models.hub import build_pretrained_cfg
    ref = timm.create_model("swin_tiny_patch4_window7_224.ms_in1k", pretrained=False).pretrained_cfg
    model = swinlab.create_model("swin_pico_patch2_window4_32", num_classes=10)
    ours = model.pretrained_cfg
    same = ("crop_pct", "crop_mode", "interpolation", "fixed_input_size", "mean", "std", "first_conv", "classifier",
            "license")
    assert {k: ours[k] for k in same} == {k: ref[k] for k in same}
    mine = dict(url="", hf_hub_id=None, architecture="swin_pico_patch2_window4_32", tag=None, input_size=(3, 32, 32),
                pool_size=(2, 2), num_classes=10)
    assert ours == {**{k: ref[k] for k in same}, **mine} and all(type(v) is int for v in ours["pool_size"])
    assert build_pretrained_cfg(model.config, tag="x")["architecture"] is None
    assert build_pretrained_cfg(model.config, "a", "t", num_classes=3) == {**ours, "architecture": "a", "tag": "t",
                                                                        "num_classes": 3}
