"""timm's model API on swinlab's registered models beyond timm's own test file (tests/test_timm_suite.py runs that):
features_only with every feature class, FX feature extraction (timm's ``feature_cls='fx'`` and torchvision's
``create_feature_extractor`` with timm's tracer settings), device/dtype at creation, ``output_fmt``, TorchScript at
other input sizes; each compared with swinlab's own ``forward_intermediates`` / eager forward on the same weights."""
import pytest
import timm
import torch
from helpers import randomize_
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor

import swinlab  # noqa: F401 - registers the swinlab_* names
from swinlab.models import create_model

PICO = ["swin_pico_patch2_window4_32", "swinv2_pico_patch2_window4_32"]
TRACER_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def _x(size=32, seed=0, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference(name):
    """swinlab's own full model of ``name``, randomised as ``randomize_`` randomises a features-only model or feature
    wrapper of it: the same draws in the same parameter order, so their shared parameters (the stem and the stages
    up to the last map; a wrapper may rename them) hold the same values."""
    return randomize_(create_model(name)).eval()


def test_features_only_through_timm_on_cpu_equals_forward_intermediates():
    """The issue's case: the tiny V2 model as a timm backbone, created with timm's device argument."""
    name = "swinv2_tiny_window8_256"
    feats = randomize_(timm.create_model(f"swinlab_{name}", features_only=True, device="cpu")).eval()
    assert feats.output_fmt == "NHWC" and feats.feature_info.channels() == [96, 192, 384, 768]
    x = _x(256, batch=1)
    with torch.no_grad():
        maps = feats(x)
        ref = _reference(name)
        expected = ref.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        fx = create_feature_extractor(ref, {f"layers.{i}": str(i) for i in range(4)}, tracer_kwargs=TRACER_KWARGS)(x)
    assert [m.shape for m in maps] == [(1, 64, 64, 96), (1, 32, 32, 192), (1, 16, 16, 384), (1, 8, 8, 768)]
    for got, fx_map, want in zip(maps, fx.values(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(fx_map, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature_cls,fmt", [(None, "NHWC"), ("getter", "NCHW"), ("fx", "NHWC"), ("list", "NHWC"),
                                             ("dict", "NHWC"), ("hook", "NHWC")])
@pytest.mark.parametrize("name", PICO)
def test_every_feature_class_gives_forward_intermediates_maps(name, feature_cls, fmt):
    """timm's feature classes wrap swinlab's model as they wrap timm's Swin: the maps of out_indices, in the layout
    ``output_fmt`` says (NHWC from the model's own output_fmt; the getter calls forward_intermediates, NCHW)."""
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
    feats = randomize_(timm.create_model(f"swinlab_{name}", features_only=True, out_indices=(1, 3), **kwargs)).eval()
    assert str(getattr(feats.output_fmt, "value", feats.output_fmt)) == fmt
    assert feats.feature_info.channels() == [32, 128] and feats.feature_info.reduction() == [4, 16]
    x = _x()
    with torch.no_grad():
        maps = feats(x)
        maps = list(maps.values()) if isinstance(maps, dict) else maps
        expected = _reference(name).forward_intermediates(x, [1, 3], output_fmt=fmt, intermediates_only=True)
    assert len(maps) == 2
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_feature_cfg_and_a_feature_class_object_are_taken_as_timm_takes_them():
    from timm.models import FeatureListNet
    name = PICO[1]
    by_cfg = timm.create_model(f"swinlab_{name}", features_only=True, feature_cfg=dict(feature_cls="fx"))
    by_class = timm.create_model(f"swinlab_{name}", features_only=True, feature_cls=FeatureListNet)
    assert type(by_cfg).__name__ == "FeatureGraphNet" and isinstance(by_class, FeatureListNet)
    assert by_cfg.pretrained_cfg["input_size"] == by_class.pretrained_cfg["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("name", PICO)
def test_device_and_dtype_at_creation(name):
    meta = timm.create_model(f"swinlab_{name}", device="meta")
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
    ref = randomize_(create_model(name)).eval()
    double = timm.create_model(f"swinlab_{name}", dtype=torch.float64).eval()
    assert {p.dtype for p in double.parameters()} == {torch.float64}
    double.load_state_dict(ref.state_dict())
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(double(x.double()).float(), ref(x), rtol=1e-4, atol=1e-4)
    # swinlab's own factory takes them too
    assert create_model(name, device="meta", dtype=torch.bfloat16).head.fc.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", PICO)
def test_output_fmt_says_the_layout_of_forward_features_and_of_the_maps(name):
    model = create_model(name).eval()
    x = _x()
    with torch.no_grad():
        assert model.output_fmt == "NHWC" and model.forward_features(x).shape == (2, 2, 2, model.num_features)
        nchw = create_model(name, features_only=True, out_indices=[1], feature_fmt="NCHW")
        assert nchw.output_fmt == "NCHW" and nchw(x)[0].shape == (2, 32, 8, 8)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 2, 2, model.num_features)  # no pooling: the NHWC map


def test_torchscript_at_another_input_size_and_with_sequential_attention_equals_eager():
    """timm's TorchScript test runs each model at its configured size; here a scripted model runs at another size
    (the shift masks of that size are built inside the script) and attends two windows at a time."""
    model = randomize_(create_model(PICO[1], attn_chunk_size=2)).eval()
    scripted = torch.jit.script(model)
    x = _x(48)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_scripted_features_only_model_gives_its_maps():
    feats = randomize_(create_model(PICO[0], features_only=True, out_indices=[0, 2], feature_fmt="NCHW")).eval()
    x = _x()
    with torch.no_grad():
        got, want = torch.jit.script(feats)(x), feats(x)
    assert [m.shape for m in got] == [(2, 16, 16, 16), (2, 64, 4, 4)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fx_graph_keeps_the_simmim_masked_forward():
    """FX traces forward's optional masking inputs as placeholders: the graph gives the logits without a mask and the
    masked feature map with one, as the eager model."""
    from torch.fx import GraphModule
    from torchvision.models.feature_extraction import NodePathTracer
    model = randomize_(create_model(PICO[1])).eval()
    graph = GraphModule(model, NodePathTracer(**TRACER_KWARGS).trace(model))
    x = _x()
    token_mask = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5
    mask_token = torch.randn(16)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x))
        torch.testing.assert_close(graph(x, token_mask, mask_token), model(x, token_mask, mask_token))
        assert model(x, token_mask, mask_token).shape == (2, 2, 2, 128)
