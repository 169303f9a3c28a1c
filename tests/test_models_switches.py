"""The model's runtime switches and helpers, each against a reference outside swinlab's own code path: the feature
pyramid (timm's ``forward_intermediates``), the fused / chunked attention switches (which kernel runs, on how many
windows at a time), autocast-off islands (the fp32 computation written out), the DTensor RNG check, deferred
loads on the meta device, the classifier reset and per-block activation checkpointing."""
import contextlib
import math
import socket
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_
from timm.models.swin_transformer import SwinTransformer as TimmV1
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmV2

from swinlab.errors import ConfigError
from swinlab.models import SwinTransformer, create_model
from swinlab.models import swin as swin_module
from swinlab.models.swin import _autocast_off, _dtensor_rng_ok, defer_meta_loads

PICO = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)
TIMM = {"v1": TimmV1, "v2": TimmV2}


def _pair(version, **kw):
    """A swinlab model and timm's with the same (random, non-trivial) weights, both in eval mode."""
    ref = randomize_(TIMM[version](**PICO, num_classes=5, **kw)).eval()
    ours = SwinTransformer(version=version, **PICO, num_classes=5, **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _model(version="v2", **kw):
    torch.manual_seed(0)
    return randomize_(SwinTransformer(version=version, **{**PICO, **kw}, num_classes=5)).eval()


# -- feature pyramid --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("norm_last", [False, True])
def test_forward_pyramid_equals_timms_intermediates(version, norm_last):
    ours, ref = _pair(version)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = ours.forward_pyramid(x, norm_last=norm_last)
        want = ref.forward_intermediates(x, norm=norm_last, intermediates_only=True)
    assert len(got) == len(want) == 4
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.is_contiguous(), (i, a.shape, b.shape)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"stage {i}")
    # norm_last touches only the last map: the final LayerNorm over channels (mean 0 over C where its weight is 1)
    plain = ours.forward_pyramid(x) if norm_last else got
    with torch.no_grad():
        normed = F.layer_norm(plain[-1].permute(0, 2, 3, 1), (ours.num_features,), ours.norm.weight, ours.norm.bias)
    torch.testing.assert_close(got[-1], normed.permute(0, 3, 1, 2) if norm_last else plain[-1], atol=1e-5, rtol=0)


# -- fused / explicit attention ---------------------------------------------------------------------------------------

@pytest.fixture
def sdpa_calls(spy):
    return spy(swin_module.F, "scaled_dot_product_attention", lambda q, *args, **kwargs: tuple(q.shape))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_set_fused_attn_switches_the_kernel_and_not_the_result(version, sdpa_calls):
    model = _model(version)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_fused_attn(True)
        fused = model(x)
        assert len(sdpa_calls) == len(model.blocks()) == 8  # one SDPA call per block
        assert model.config.fused_attn is True and all(b.attn.fused is True for b in model.blocks())
        sdpa_calls.clear()
        model.set_fused_attn(False)
        explicit = model(x)
    assert sdpa_calls == []  # the explicit softmax path
    assert model.config.fused_attn is False and all(b.attn.fused is False for b in model.blocks())
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    model.set_fused_attn()  # no argument: on
    assert model.config.fused_attn is True and all(b.attn.fused is True for b in model.blocks())


@pytest.fixture
def windows_per_call(spy):
    """The number of windows each ``_attend`` call receives, and whether it got a mask."""
    return spy(swin_module.WindowAttention, "_attend",
               lambda self, q, k, v, mask, scale: (q.shape[1], None if mask is None else mask.shape[0]))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_set_attn_chunk_size_processes_that_many_windows_at_a_time(version, windows_per_call):
    model = _model(version)
    x = torch.randn(2, 3, 32, 32)
    # 16x16 tokens, window 4: stage 0 has 4x4 = 16 windows, stage 1 2x2 = 4, stages 2-3 one window (no shift)
    with torch.no_grad():
        whole = model(x)
        assert [w for w, _ in windows_per_call] == [16, 16, 4, 4, 1, 1, 1, 1]
        windows_per_call.clear()
        model.set_attn_chunk_size(3)
        chunked = model(x)
    assert model.config.attn_chunk_size == 3 and all(b.attn.chunk_size == 3 for b in model.blocks())
    stage0, stage1 = [3, 3, 3, 3, 3, 1], [3, 1]
    assert [w for w, _ in windows_per_call] == stage0 + stage0 + stage1 + stage1 + [1, 1, 1, 1]
    # the shifted blocks (second of stages 0 and 1) give each chunk the shift mask of its own windows
    masks = [m for _, m in windows_per_call]
    assert masks[6:12] == stage0 and masks[14:16] == stage1, masks
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    windows_per_call.clear()
    model.set_attn_chunk_size(4)  # exactly the stage-1 window count: one call there
    with torch.no_grad():
        torch.testing.assert_close(model(x), whole, atol=1e-5, rtol=0)
    assert [w for w, _ in windows_per_call] == [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 1, 1, 1, 1]


def test_negative_attn_chunk_size_is_refused():
    model = _model()
    model.set_attn_chunk_size(0)
    with pytest.raises(ConfigError, match=r"attn_chunk_size=-1 must be >= 0"):
        model.set_attn_chunk_size(-1)
    assert model.config.attn_chunk_size == 0 and all(b.attn.chunk_size == 0 for b in model.blocks())


def test_chunked_shifted_windows_get_their_own_mask_slices():
    """Chunk size 1 on a shifted block: window s gets shift-mask window s (compared with timm's block output)."""
    ours, ref = _pair("v2")
    ours.set_attn_chunk_size(1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


# -- autocast-off islands ---------------------------------------------------------------------------------------------

def test_autocast_off_only_where_autocast_is_on():
    assert isinstance(_autocast_off(torch.device("cpu")), contextlib.nullcontext)  # nothing to turn off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = _autocast_off(torch.device("cpu"))
        with ctx:
            assert not torch.is_autocast_enabled("cpu")
            assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        with _autocast_off(torch.device("meta")):  # a device type autocast does not know: left alone
            assert torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("kind", ["cuda", "xpu", "cpu"])
def test_autocast_off_knows_the_autocast_device_types(kind, monkeypatch):
    """Where autocast is on (faked here: no GPU needed to build the context), CUDA, XPU and CPU get it turned off."""
    monkeypatch.setattr(swin_module.torch, "is_autocast_enabled", lambda device_type=None: True)
    ctx = _autocast_off(torch.device(kind))
    assert isinstance(ctx, torch.autocast) and ctx.device == kind and not ctx._enabled
    assert isinstance(_autocast_off(torch.device("meta")), contextlib.nullcontext)


def test_cpb_mlp_runs_in_fp32_under_bf16_autocast():
    attn = _model().layers[0].blocks[1].attn
    coords = attn.relative_coords_table.reshape(-1, 2)
    W0, b0, W2 = attn.cpb_mlp[0].weight, attn.cpb_mlp[0].bias, attn.cpb_mlp[2].weight
    table = 16 * torch.sigmoid(torch.relu(coords @ W0.T + b0) @ W2.T)  # fp32, written out
    N = attn.window_area
    want = table[attn.relative_position_index.reshape(-1)].reshape(N, N, -1).permute(2, 0, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn.position_bias()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # bf16 would be off by ~0.03 on values up to 16


def test_cosine_normalisation_and_logit_scale_in_fp32_under_bf16_autocast(spy):
    attn = _model().layers[0].blocks[1].attn
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([math.log(1000.0)]).view(1, 1, 1))  # above the cap: clamped to ln 100
    seen = spy(swin_module.F, "normalize", lambda t, *args, **kwargs: t.dtype)
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, _, _, scale = attn._qkv_mask(x, None)
        qkv16 = F.linear(x, attn.qkv.weight, attn.qkv_bias())  # bf16 under autocast, as the model's projection
    assert seen == [torch.float32, torch.float32] and scale == 1.0
    assert q.dtype == k.dtype == torch.bfloat16
    q32, k32, _ = qkv16.float().view(2, 16, 16, 3, 1, 16).permute(3, 0, 1, 4, 2, 5).unbind(0)
    want_q = (q32 / q32.norm(dim=-1, keepdim=True).clamp_min(1e-12) * 100.0).to(torch.bfloat16)
    want_k = (k32 / k32.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(torch.bfloat16)
    torch.testing.assert_close(q, want_q, atol=0, rtol=0)
    torch.testing.assert_close(k, want_k, atol=0, rtol=0)


# -- DTensor RNG ------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cpu_mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_rng_ok_per_mesh_device(cpu_mesh, monkeypatch):
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    assert _dtensor_rng_ok(torch.zeros(3)) is None
    assert _dtensor_rng_ok(torch.zeros(3, device="meta")) is None
    d = distribute_tensor(torch.zeros(4), cpu_mesh, [Replicate()])
    assert _dtensor_rng_ok(d) is False  # a CPU mesh: every rank would draw the same numbers
    # the mesh's device type decides: one with per-device RNG state (torch.cuda) has DTensor's random ops
    monkeypatch.setattr(DTensor, "device_mesh", property(lambda self: types.SimpleNamespace(device_type="cuda")))
    assert _dtensor_rng_ok(d) is True
    monkeypatch.setattr(DTensor, "device_mesh", property(lambda self: types.SimpleNamespace(device_type="nodev")))
    assert _dtensor_rng_ok(d) is False


def test_random_init_of_a_cpu_dtensor_is_one_draw_from_rank_0(cpu_mesh):
    from torch.distributed.tensor import Replicate, distribute_tensor
    d = distribute_tensor(torch.zeros(64), cpu_mesh, [Replicate()])
    torch.manual_seed(3)
    swin_module._random_(d, lambda t: t.normal_())
    torch.manual_seed(3)
    torch.testing.assert_close(d.to_local(), torch.empty(64).normal_(), atol=0, rtol=0)
    plain = torch.zeros(5)
    swin_module._random_(plain, lambda t: t.fill_(2.0))
    assert torch.equal(plain, torch.full((5,), 2.0))


# -- loading into a model on the meta device --------------------------------------------------------------------------

def _meta_model():
    with torch.device("meta"):
        return SwinTransformer(version="v2", **PICO, num_classes=5)


def _weights():
    torch.manual_seed(1)
    return randomize_(SwinTransformer(version="v2", **PICO, num_classes=5)).state_dict()


def test_deferred_load_is_kept_and_loaded_after_materialisation():
    sd = _weights()
    model = _meta_model()
    with defer_meta_loads():
        res = model.load_state_dict(sd)
    assert list(res.missing_keys) == [] and list(res.unexpected_keys) == []
    assert model.is_meta()  # nothing copied into meta tensors
    kept, strict = model.pending_state_dict
    assert strict is True and set(kept) == set(sd)
    model.to_empty(device="cpu")
    model.reset_buffers()
    assert model.load_pending_state_dict() is True
    assert model.pending_state_dict is None and model.load_pending_state_dict() is False
    # the kept strictness is the one used: a strict pending dict that lost a key is refused
    model.pending_state_dict = ({k: v for k, v in sd.items() if k != "norm.bias"}, True)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "norm.bias"'):
        model.load_pending_state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(1, 3, 32, 32)
    ref = SwinTransformer(version="v2", **PICO, num_classes=5)
    ref.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x), atol=0, rtol=0)


def test_deferred_non_strict_load_reports_missing_and_unexpected_and_keeps_only_known_keys():
    sd = _weights()
    dropped = "head.fc.bias"
    partial = {k: v for k, v in sd.items() if k != dropped}
    partial["extra.weight"] = torch.zeros(2)
    model = _meta_model()
    with defer_meta_loads():
        res = model.load_state_dict(partial, strict=False)
    assert list(res.missing_keys) == [dropped] and list(res.unexpected_keys) == ["extra.weight"]
    kept, strict = model.pending_state_dict
    assert strict is False and set(kept) == set(sd) - {dropped}
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.head.fc.bias.fill_(7.0)
    assert model.load_pending_state_dict() is True  # non-strict: the missing key is left as it is
    assert torch.equal(model.head.fc.bias, torch.full((5,), 7.0))
    assert torch.equal(model.head.fc.weight, sd["head.fc.weight"])


@pytest.mark.parametrize("case", ["missing", "unexpected"])
def test_deferred_strict_load_refuses_missing_or_unexpected_keys(case):
    sd = _weights()
    if case == "missing":
        del sd["norm.bias"]
    else:
        sd["bogus"] = torch.zeros(1)
    model = _meta_model()
    with defer_meta_loads(), pytest.raises(RuntimeError) as err:
        model.load_state_dict(sd)
    msg = str(err.value)
    assert "does not fit SwinTransformer" in msg
    assert ("missing ['norm.bias']" in msg) == (case == "missing"), msg
    assert ("unexpected ['bogus']" in msg) == (case == "unexpected"), msg
    assert model.pending_state_dict is None


@pytest.mark.parametrize("strict", [True, False])
def test_deferred_load_refuses_a_shape_mismatch_even_when_not_strict(strict):
    sd = _weights()
    sd["head.fc.weight"] = torch.zeros(3, 128)
    model = _meta_model()
    with defer_meta_loads(), pytest.raises(RuntimeError, match=r"shape mismatches \['head.fc.weight'\]"):
        model.load_state_dict(sd, strict=strict)
    assert model.pending_state_dict is None


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_loads_outside_the_context_or_with_assign_are_pytorchs():
    sd = _weights()
    model = _meta_model()
    with defer_meta_loads():
        with defer_meta_loads():
            pass
        model.load_state_dict(sd)  # still inside the outer context: deferred
    assert model.pending_state_dict is not None and model.is_meta()
    model.pending_state_dict = None
    model.load_state_dict(sd)  # outside: PyTorch's copy into meta tensors, nothing kept
    assert model.pending_state_dict is None and model.is_meta()
    with pytest.raises(KeyError), defer_meta_loads():
        raise KeyError("inside")
    assert swin_module._DEFER_META_LOADS == [0]  # an exception leaves the context too
    with defer_meta_loads():
        model.load_state_dict(sd, assign=True)  # assign: PyTorch replaces the meta tensors
    assert model.pending_state_dict is None and not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.head.fc.weight, sd["head.fc.weight"])
    real = SwinTransformer(version="v2", **PICO, num_classes=5)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict by default, as PyTorch's
        real.load_state_dict({k: v for k, v in sd.items() if k != "norm.bias"})
    with defer_meta_loads():
        real.load_state_dict(sd)  # a materialised model loads at once
    assert real.pending_state_dict is None and torch.equal(real.norm.weight, sd["norm.weight"])


# -- classifier reset -------------------------------------------------------------------------------------------------

def test_reset_classifier_builds_a_freshly_initialised_head():
    torch.manual_seed(0)
    model = SwinTransformer(version="v1", **{**PICO, "embed_dim": 64}, num_classes=5, drop_rate=0.25)
    model.reset_classifier(40)
    fc = model.head.fc
    assert fc.weight.shape == (40, 512) and model.num_classes == 40 and model.config.num_classes == 40
    assert model.head.drop.p == 0.25  # the config's head dropout is kept
    assert torch.count_nonzero(fc.bias) == 0
    std = fc.weight.std().item()  # trunc_normal_(std=0.02), as the model's init (20,480 draws)
    assert 0.019 < std < 0.021 and abs(fc.weight.mean().item()) < 1e-3, std
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 40)
        model.reset_classifier(0)
        assert not model.head.training  # the new head follows the model's mode: no dropout in an eval model
        model.train()
        model.reset_classifier(3)
        assert model.head.training
        model.eval()
        model.reset_classifier(0)
        assert model.config.num_classes == 0 and isinstance(model.head.fc, torch.nn.Identity)
        torch.testing.assert_close(model(x), model.forward_features(x).mean(dim=(1, 2)), atol=1e-6, rtol=0)


# -- stages and activation checkpointing ------------------------------------------------------------------------------

@pytest.fixture
def checkpoint_calls(monkeypatch):
    calls = []
    real = swin_module.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(swin_module, "checkpoint", spy)
    return calls


def test_stage_checkpoints_each_block_only_when_gradients_are_on(checkpoint_calls):
    model = _model("v1")
    stage = model.layers[1]
    x = torch.randn(2, 16, 16, 16)  # stage 1's input: merged down to 8x8 x 32
    want = stage.blocks[1](stage.blocks[0](stage.downsample(x)))
    assert want.shape == (2, 8, 8, 32)
    model.set_grad_checkpointing()  # no argument: on
    assert model.config.grad_checkpointing is True and all(s.grad_checkpointing for s in model.layers)
    with torch.no_grad():
        torch.testing.assert_close(stage(x), want, atol=1e-6, rtol=0)
    assert checkpoint_calls == []  # no graph to save memory on
    out = stage(x)
    assert checkpoint_calls == [{"use_reentrant": False}, {"use_reentrant": False}]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_checkpointed_stage_gives_parameters_the_same_gradients_from_a_plain_input():
    """The input needs no gradient (the first stage's input, images): the parameters' gradients must still come
    (re-entrant checkpointing would give them none) and equal the plain forward's."""
    model = _model("v2")
    x = torch.randn(2, 3, 32, 32)

    def grads(enable):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enable)
        model.layers[0](model.patch_embed(x).detach()).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.layers[0].named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert set(ckpt) == set(plain) and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-5, msg=n)
    model.set_grad_checkpointing(False)
    assert model.config.grad_checkpointing is False and not any(s.grad_checkpointing for s in model.layers)


# -- heads, masked-image forward, no-decay keywords --------------------------------------------------------------------

def test_forward_head_pre_logits_is_the_pooled_feature():
    model = _model("v1")
    feats = torch.randn(2, 2, 2, model.num_features)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean(dim=(1, 2)))
        logits = model.forward_head(feats)
        torch.testing.assert_close(model.head(feats), logits)  # the head alone: logits by default
    torch.testing.assert_close(logits, feats.mean(dim=(1, 2)) @ model.head.fc.weight.T + model.head.fc.bias)


def test_masked_forward_replaces_the_masked_tokens_by_the_mask_token():
    """SimMIM's input: where token_mask is True the patch token is mask_token (written here by indexing)."""
    model = _model("v2")
    x = torch.randn(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    token_mask = torch.rand(2, 16, 16, generator=g) < 0.5
    mask_token = torch.randn(16, generator=g)
    with torch.no_grad():
        z = model.patch_embed(x)
        z[token_mask] = mask_token
        want = model.norm(model.layers(z))
        got = model(x, token_mask=token_mask, mask_token=mask_token)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        none_masked = model(x, token_mask=torch.zeros(2, 16, 16, dtype=torch.bool), mask_token=mask_token)
        torch.testing.assert_close(none_masked, model.forward_features(x), atol=1e-6, rtol=0)


def test_no_weight_decay_keywords_name_the_position_bias_and_logit_scale_parameters():
    v1, v2 = _model("v1"), _model("v2")
    assert v1.no_weight_decay_keywords() == {"relative_position_bias_table", "cpb_mlp", "logit_scale"}
    names = [n for m in (v1, v2) for n, _ in m.named_parameters()]
    for keyword in v1.no_weight_decay_keywords():  # each keyword selects real parameters
        assert any(keyword in n for n in names), keyword


@pytest.mark.parametrize("position_bias", ["none", "table"])
def test_chunked_attention_on_two_shifted_windows_and_without_any_bias(position_bias):
    """8x4 tokens, window 4: two windows (shifted along H only), chunk 1: each chunk gets its own mask window; with
    no position bias an unshifted block has no mask at all."""
    torch.manual_seed(0)
    model = randomize_(SwinTransformer(img_size=(16, 8), patch_size=2, embed_dim=8, depths=(2,), num_heads=(2,),
                                       window_size=4, position_bias=position_bias, num_classes=3)).eval()
    assert model.layers[0].blocks[1].attn_mask.shape[0] == 2
    x = torch.randn(2, 3, 16, 8)
    with torch.no_grad():
        whole = model(x)
        model.set_attn_chunk_size(1)
        torch.testing.assert_close(model(x), whole, atol=1e-5, rtol=0)


def test_shift_masks_follow_the_device_of_the_input_at_any_size():
    """A model on the meta device run at a size it was not built for builds its shift masks on the input's device
    (``shift_mask(..., device)``, cached per device): the forward stays on meta, and a CPU mask is never served for
    a meta input from the cache."""
    from swinlab.models.swin import shift_mask
    assert shift_mask((8, 8), (4, 4), (2, 2), device="meta").device.type == "meta"
    with torch.device("meta"):
        model = create_model("swin_pico_patch2_window4_32", num_classes=10)
    out = model(torch.empty(2, 3, 64, 64, device="meta"))  # 64 px: not the built 32, so masks are made at run time
    assert out.device.type == "meta" and out.shape == (2, 10)
    block = model.layers[0].blocks[1]  # a shifted block
    key = (32, 32, 2, 2)
    cpu, meta = block._get_mask(key, torch.device("cpu")), block._get_mask(key, torch.device("meta"))
    assert cpu.device.type == "cpu" and meta.device.type == "meta"


def test_an_image_batch_of_the_wrong_rank_is_one_line_naming_the_shape():
    with pytest.raises(ConfigError, match=r"expected images shaped \(batch, channels, height, width\), got "
                                          r"\(3, 32, 32\)"):
        create_model("swin_pico_patch2_window4_32")(torch.zeros(3, 32, 32))
