"""The one switchable model: parity with timm, switches, geometry, registry (every variant), FLOPs, bad input."""
import functools
import json
import math

import pytest
import timm
import torch
from helpers import randomize_
from timm.models.swin_transformer import SwinTransformer as TimmV1
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmV2

import swinlab
from swinlab.errors import ConfigError
from swinlab.models import (
    SwinConfig,
    SwinTransformer,
    count_params,
    create_model,
    get_variant,
    list_models,
    model_macs,
    stage_geometry,
)

PICO = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)


SMALL = [n for n in list_models() if n.endswith("_32")]  # test-sized: a real forward costs milliseconds


def timm_twin(name, **kw):
    """timm's model for a swinlab registry name (the tiny variants exist only in swinlab)."""
    if name == "swin_pico_patch2_window4_32":
        return TimmV1(**{**PICO, **kw})
    if name == "swinv2_pico_patch2_window4_32":
        return TimmV2(**{**PICO, **kw})
    return timm.create_model(name, **kw)


def assert_parity(ours, ref, x, tol=1e-5):
    ours.eval()
    ref.eval()
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape
    assert torch.isfinite(b).all() and b.abs().max() > 0.1, "reference logits are degenerate"
    err = (a - b).abs().max().item()
    assert err <= tol, f"max |swinlab - timm| = {err:.3g}"
    return err


@pytest.mark.parametrize("name", ["swin_pico_patch2_window4_32", "swinv2_pico_patch2_window4_32",
                                  "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_logits_equal_timm_after_randomising_every_parameter(name):
    """Fused (SDPA) and explicit attention, one pair of models built per variant."""
    ref = randomize_(timm_twin(name))
    ours = create_model(name)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, *ours.img_size)
    for fused in (True, False):
        ours.set_fused_attn(fused)
        assert_parity(ours, ref, x)


def test_fresh_v2_blocks_are_identities_so_parity_needs_randomised_weights():
    model = create_model("swinv2_pico_patch2_window4_32").eval()
    blk = model.layers[1].blocks[1]
    assert torch.count_nonzero(blk.norm1.weight) == 0 and torch.count_nonzero(blk.norm2.bias) == 0
    x = torch.randn(1, 8, 8, 32)
    assert torch.equal(blk(x), x)


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_pico_patch2_window4_32"])
def test_odd_input_size_pads_like_timm(name):
    size = (200, 300) if "tiny" in name else (38, 54)
    ref = randomize_(timm_twin(name, img_size=size))
    ours = create_model(name, img_size=size)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_parity(ours, ref, torch.randn(1, 3, *size))


def test_clamped_windows_and_dropped_shift_follow_timm():
    model = create_model("swinv2_tiny_window8_256", img_size=128)  # stage 4 is 4x4 < window 8
    ref = timm.create_model("swinv2_tiny_window8_256", img_size=128)
    for stage, tstage in zip(model.layers, ref.layers):
        for blk, tblk in zip(stage.blocks, tstage.blocks):
            assert blk.window == tuple(tblk.window_size)
            assert blk.shift == tuple(tblk.shift_size)
    assert model.layers[3].blocks[1].window == (4, 4) and model.layers[3].blocks[1].shift == (0, 0)


def test_runtime_input_of_another_size_equals_timm_built_for_that_size():
    # masks and padding made at run time for 48x40 (24x20 tokens) must equal timm's, built for that size
    # (three stages built at 64: every stage keeps W4 and its shift at both sizes, so the two must agree)
    net = dict(patch_size=2, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4, num_classes=5)
    ours = randomize_(SwinTransformer(img_size=64, **net)).eval()
    ref = TimmV1(img_size=(48, 40), **net)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 48, 40)
    assert_parity(ours, ref, x)
    blk = ours.layers[0].blocks[1]
    assert len(blk._mask_cache) == 1  # built once for 24x20 tokens
    with torch.no_grad():
        ours(x)
    assert len(blk._mask_cache) == 1  # and reused


def test_feature_pyramid_shapes_and_strides():
    model = create_model("swin_tiny_patch4_window7_224", num_classes=0).eval()
    with torch.no_grad():
        feats = model.forward_pyramid(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in feats] == [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 768)  # num_classes=0: pooled features


def test_switches_are_independent():
    base = dict(PICO, num_classes=3)
    keys = lambda m: set(m.state_dict())  # noqa: E731
    v1 = SwinTransformer(version="v1", **base)
    v1_cpb = SwinTransformer(version="v1", position_bias="cpb_log", **base)
    v1_cos = SwinTransformer(version="v1", attention="cosine", **base)
    v1_qv = SwinTransformer(version="v1", qkv_bias="qv", **base)
    k = "layers.0.blocks.0.attn."
    assert k + "relative_position_bias_table" in keys(v1) and k + "cpb_mlp.0.weight" not in keys(v1)
    assert k + "cpb_mlp.0.weight" in keys(v1_cpb) and k + "relative_position_bias_table" not in keys(v1_cpb)
    assert keys(v1_cos) - keys(v1) == {f"layers.{i}.blocks.{j}.attn.logit_scale" for i in range(4) for j in range(2)}
    assert k + "q_bias" in keys(v1_qv) and k + "qkv.bias" not in keys(v1_qv)
    post = SwinTransformer(version="v1", norm_placement="res_post", **base)
    assert torch.count_nonzero(post.layers[0].blocks[0].norm1.weight) == 0
    assert v1.layers[1].downsample.norm.normalized_shape == (64,)  # norm on 4C before reduction
    v2m = SwinTransformer(version="v1", merge_order="reduce_norm", **base)
    assert v2m.layers[1].downsample.norm.normalized_shape == (32,)  # norm on 2C after reduction
    lin = SwinTransformer(version="v2", position_bias="cpb_linear", **base)
    coords = lin.layers[0].blocks[0].attn.relative_coords_table
    assert torch.allclose(coords.abs().max(), torch.tensor(1.0))  # linear offsets span [-1, 1]
    log = SwinTransformer(version="v2", **base).layers[0].blocks[0].attn.relative_coords_table
    assert torch.allclose(log.abs().max(), torch.tensor(math.log2(9) / 3))


def test_extra_norm_every_six_blocks():
    model = create_model("swinv2_giant_cpu_patch2_window4_32")
    with_norm3 = [(i, j) for i, st in enumerate(model.layers) for j, b in enumerate(st.blocks) if hasattr(b, "norm3")]
    assert with_norm3 == [(2, 5)]
    with torch.device("meta"):
        giant = create_model("swinv2_giant_window12_192")
    assert sum(hasattr(b, "norm3") for b in giant.blocks()) == 7  # 42 blocks in stage 3


def test_grad_checkpointing_and_sequential_attention_give_the_same_gradients():
    torch.manual_seed(0)
    ref = randomize_(create_model("swinv2_pico_patch2_window4_32", num_classes=4))
    alt = create_model("swinv2_pico_patch2_window4_32", num_classes=4, grad_checkpointing=True, attn_chunk_size=3)
    alt.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (ref, alt):
        m.train()
        m(x).square().sum().backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), alt.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), n


def test_meta_device_build_then_materialise_rebuilds_buffers():
    real = randomize_(create_model("swin_pico_patch2_window4_32")).eval()
    with torch.device("meta"):
        lazy = create_model("swin_pico_patch2_window4_32")
    lazy = lazy.to_empty(device="cpu")
    lazy.reset_buffers()
    lazy.load_state_dict(real.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(lazy.eval()(x), real(x), atol=1e-6)


def test_registry_has_timm_names_and_paper_sizes():
    names = set(list_models())
    required = {f"swin_{s}_patch4_window7_224" for s in ("tiny", "small", "base", "large")}
    required |= {"swin_base_patch4_window12_384", "swin_large_patch4_window12_384"}
    required |= {f"swinv2_{s}_window{w}_256" for s in ("tiny", "small", "base") for w in (8, 16)}
    required |= {f"swinv2_{s}_window12_192" for s in ("base", "large")}
    required |= {f"swinv2_{s}_window12to{w}_192to{r}" for s in ("base", "large") for w, r in ((16, 256), (24, 384))}
    assert required <= names
    assert required <= set(timm.list_models("swin*"))  # the same names as timm
    assert 2.9e9 < count_params("swinv2_giant_window12_192") < 3.1e9  # paper: 3.0B
    assert 6.5e8 < count_params("swinv2_huge_window12_192") < 6.65e8  # paper: 658M
    timm_t = timm.create_model("swin_tiny_patch4_window7_224")
    assert count_params("v1_t") == sum(p.numel() for p in timm_t.parameters())


@functools.cache
def _on_meta(name):
    """The registry model on the meta device (no memory, no initialisation), built once per test session."""
    with torch.device("meta"):
        return create_model(name)


# -- every registered variant, the way timm's test suite walks list_models() ------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_every_variant_builds_on_meta_as_its_config_says(name):
    model = _on_meta(name)
    cfg = model.config
    assert model.is_meta() and all(p.is_meta for p in model.parameters())
    assert cfg == get_variant(name).config.resolved()
    assert SwinConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # what checkpoint metadata keeps
    assert [len(stage.blocks) for stage in model.layers] == list(cfg.depths)
    assert [stage.blocks[0].attn.num_heads for stage in model.layers] == list(cfg.num_heads)
    assert model.num_features == cfg.embed_dim * 2 ** (len(cfg.depths) - 1) and model.num_classes == cfg.num_classes
    assert model.head.fc.out_features == cfg.num_classes and tuple(model.img_size) == tuple(cfg.img_size)
    geometry = stage_geometry(cfg.img_size, cfg.patch_size, cfg.window_size, len(cfg.depths))
    assert [[blk.window for blk in stage.blocks] for stage in model.layers] == [
        [g["window"]] * d for g, d in zip(geometry, cfg.depths)]
    assert model_macs(model) > 0


@pytest.mark.parametrize("size,rate", [("tiny", 0.2), ("small", 0.3), ("base", 0.5)])
def test_paper_sizes_carry_the_papers_stochastic_depth(size, rate):
    """Stochastic depth 0.2 / 0.3 / 0.5 for T / S / B: Swin's ImageNet-1K recipe (paper A2.1), kept by SwinV2's
    ablations (A1.1); in the V1 224-px and the V2 256-px variants, and in their blocks' linear ramp up to it."""
    names = [f"swin_{size}_patch4_window7_224"] + [f"swinv2_{size}_window{w}_256" for w in (8, 16)]
    assert {get_variant(n).config.drop_path_rate for n in names} == {rate}
    last = _on_meta(names[0]).layers[-1].blocks[-1]
    assert last.drop_path1.drop_prob == pytest.approx(rate)


def _timm_names():
    return [n for n in list_models() if n in timm.list_models() or n in ("swin_pico_patch2_window4_32",
                                                                          "swinv2_pico_patch2_window4_32")]


@pytest.mark.parametrize("name", _timm_names())
def test_every_variant_in_timm_has_timms_parameters(name):
    ours = _on_meta(name)
    with torch.device("meta"):
        ref = timm_twin(name, num_classes=ours.num_classes)  # timm's 192 px V2 models default to 21841 classes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert {k: p.shape for k, p in ours.named_parameters()} == {k: p.shape for k, p in ref.named_parameters()}


def test_the_variants_timm_lacks_are_the_extra_norm_ones():
    missing = set(list_models()) - set(_timm_names())
    assert missing == {n for n in list_models() if get_variant(n).config.extra_norm_period}


@pytest.mark.parametrize("name", SMALL)
def test_every_small_variant_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = randomize_(create_model(name, num_classes=5)).train()
    out = model(torch.randn(2, 3, *model.img_size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():  # and at another (smaller) input size than the one it was built for
        assert model.eval()(torch.randn(1, 3, 16, 24)).shape == (1, 5)


@pytest.mark.parametrize("name,paper_gflops", [
    ("swin_tiny_patch4_window7_224", 4.5), ("swin_small_patch4_window7_224", 8.7),
    ("swin_base_patch4_window7_224", 15.4), ("swin_base_patch4_window12_384", 47.0),
    ("swinv2_tiny_window8_256", 5.9), ("swinv2_small_window8_256", 11.5), ("swinv2_base_window16_256", 21.8)])
def test_analytic_flops_match_the_papers(name, paper_gflops):
    with torch.device("meta"):
        model = create_model(name)
    assert abs(model_macs(model) / 1e9 - paper_gflops) / paper_gflops < 0.02


@pytest.mark.parametrize("name", ["swin_pico_patch2_window4_32", "swinv2_pico_patch2_window4_32"])
@pytest.mark.parametrize("size", [None, (36, 28), (30, 30)])
def test_analytic_macs_equal_torchs_flop_counter(name, size):
    """``model_macs`` (multiply-adds of every matmul and the patch conv, the V2 CPB MLP included) equals half of what
    torch's FlopCounterMode counts on the explicit-softmax forward, at the configured size (None) and at sizes whose
    grids the windows must pad (18 x 14 and 15 x 15 tokens)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = create_model(name, num_classes=7, fused_attn=False).eval()
    x = torch.randn(1, 3, *(size or model.img_size))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert model_macs(model, size) == counter.get_total_flops() / 2
    model.reset_classifier(0)  # no head: no head's multiply-adds
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert model_macs(model, size) == counter.get_total_flops() / 2


def test_bad_input_gets_one_clear_line():
    with pytest.raises(ConfigError, match="not divisible by the patch size 4") as e:
        create_model("swin_tiny_patch4_window7_224", img_size=225)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean .*swin_tiny_patch4_window7_224"):
        create_model("swin_tiny_patch4_window7")
    with pytest.raises(ConfigError, match="position_bias='tabel' is not a valid choice"):
        create_model("v1_pico", position_bias="tabel")
    model = create_model("v1_pico")
    with pytest.raises(ConfigError, match="not divisible by the patch size 2"):
        model(torch.randn(1, 3, 33, 32))
    with pytest.raises(ConfigError, match="window_size"):
        create_model("v1_pico", window_size=(4, 4, 4))


def test_public_api():
    assert swinlab.create_model is create_model and "swinv2_tiny_window8_256" in swinlab.list_models()
    assert "v2_g" in swinlab.list_models(include_aliases=True)


@pytest.mark.parametrize("name", ["swin_pico_patch2_window4_32", "swinv2_pico_patch2_window4_32"])
def test_dropout_and_stochastic_depth_sit_where_timms_do(name):
    """drop_rate (head), proj_drop_rate (projections, MLP), attn_drop_rate and drop_path_rate reach the same modules
    with the same probabilities as in timm's model built with the same rates; a one-class head is a Linear, as in
    timm."""
    from timm.layers import DropPath
    rates = dict(drop_rate=0.1, proj_drop_rate=0.15, attn_drop_rate=0.2, drop_path_rate=0.3)

    def probs(model):
        out = {}
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Dropout) and m.p > 0 and not n.endswith("attn_drop"):
                out[n] = m.p  # attention dropout: a Dropout in timm, dropout_p of SDPA here (checked below)
            elif isinstance(m, DropPath) and m.drop_prob > 0:
                out[n] = m.drop_prob
        return out

    ours, ref = swinlab.create_model(name, **rates), timm_twin(name, **rates)
    assert probs(ours) == pytest.approx(probs(ref)) and len(probs(ours)) > 0
    attn_p = {m.attn_drop.p if isinstance(m.attn_drop, torch.nn.Module) else m.attn_drop
              for n, m in ours.named_modules() if n.endswith(".attn")}
    assert attn_p == {0.2}
    one = swinlab.create_model(name, num_classes=1)
    assert isinstance(one.head.fc, torch.nn.Linear) and one.head.fc.out_features == 1
    assert one(torch.randn(2, 3, 32, 32)).shape == (2, 1)
    assert not any(stage.grad_checkpointing for stage in ours.layers)  # off unless asked, as in timm


def test_extra_norm_period_one_puts_a_norm_after_every_block():
    """A LayerNorm every N blocks, counted within each stage (SwinV2-H/G: N = 6); N = 1 is every block, 0 none."""
    for period, expected in ((1, [True, True]), (2, [False, True]), (0, [False, False])):
        model = swinlab.create_model("swinv2_pico_patch2_window4_32", extra_norm_period=period)
        assert [hasattr(b, "norm3") for b in model.layers[0].blocks] == expected, period


def test_the_shift_mask_at_the_built_size_is_the_buffer_not_a_second_copy():
    """At the size the model was built for, every shifted block attends with its ``attn_mask`` buffer; the per-size
    cache stays empty (no mask recomputed or kept twice). A run-time size fills the cache once."""
    model = swinlab.create_model("swin_pico_patch2_window4_32").eval()
    shifted = [b for stage in model.layers for b in stage.blocks if b.attn_mask is not None]
    assert shifted
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        assert all(b._mask_cache == {} for b in shifted)
        model(torch.randn(1, 3, 48, 48))
        model(torch.randn(1, 3, 48, 48))
    assert sum(len(b._mask_cache) for stage in model.layers for b in stage.blocks) > 0
    assert all(len(b._mask_cache) <= 1 for stage in model.layers for b in stage.blocks)


def test_an_unknown_name_suggests_at_most_three_close_names():
    from swinlab.models.registry import get_variant
    with pytest.raises(ConfigError) as err:
        get_variant("swin_tiny_patch4_window7_22")
    msg = str(err.value)
    head, _, rest = msg.partition(": did you mean ")
    assert head == "unknown model 'swin_tiny_patch4_window7_22'"
    names, _, tail = rest.partition("? ")
    assert names.split(", ")[0] == "swin_tiny_patch4_window7_224" and len(names.split(", ")) == 3
    assert tail == "(swinlab.list_models() or `python -m swinlab models` lists all)"
    with pytest.raises(ConfigError, match=r"^unknown model 'zzzz': \(swinlab\.list_models\(\) or"):
        get_variant("zzzz")
    with pytest.raises(ConfigError, match=r"^model name must be a string, got None$"):
        get_variant(None)



def test_a_small_run_time_input_is_not_shifted_where_an_axis_holds_one_window():
    """Built at 32 px (shift 2 in stages 0-2) and run at 8 px, every stage's grid fits one window on both axes:
    the output equals that of a copy whose shifts are set to zero by hand (timm's rule: no shift along an axis that
    holds a single window). At 8 x 16 px stage 0 (4 x 8 tokens) still shifts along W only."""
    import copy
    model = randomize_(swinlab.create_model("swin_pico_patch2_window4_32")).eval()
    unshifted = copy.deepcopy(model)
    for stage in unshifted.layers:
        for block in stage.blocks:
            block.shift = (0, 0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unshifted(x), atol=1e-6, rtol=1e-6)
        wide = torch.randn(2, 3, 8, 16)
        assert not torch.allclose(model(wide), unshifted(wide), atol=1e-4)  # W holds two windows in stage 0


def test_config_switches_for_checkpointing_and_attention_chunks_reach_every_stage_and_block():
    model = swinlab.create_model("swin_pico_patch2_window4_32", grad_checkpointing=True, attn_chunk_size=2)
    assert all(stage.grad_checkpointing for stage in model.layers)
    assert {b.attn.chunk_size for stage in model.layers for b in stage.blocks} == {2}
    assert model.head_hidden_size == timm_twin("swin_pico_patch2_window4_32").head_hidden_size == model.num_features
