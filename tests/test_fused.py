"""Fused (SDPA) window attention equals the explicit softmax path, and both equal timm, for V1 and V2."""
import pytest
import torch
from helpers import randomize_, requires_cuda

import swinlab
from swinlab.models import swin as swin_mod

PICO = {"v1": "swin_pico_patch2_window4_32", "v2": "swinv2_pico_patch2_window4_32"}


def _pair(version, img_size=32, **kw):
    model = randomize_(swinlab.create_model(PICO[version], img_size=img_size, num_classes=10, **kw)).eval()
    return model


def _logits(model, x, fused):
    model.set_fused_attn(fused)
    with torch.no_grad():
        return model(x)


def _timm_model(version, img_size):
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    kw = dict(img_size=img_size, patch_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
              window_size=4, num_classes=10, drop_path_rate=0.0)
    return (SwinTransformer(**kw) if version == "v1" else SwinTransformerV2(**kw)).eval()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("img_size,input_size", [
    (32, 32),  # shifted 16x16 stage, clamped 4x4 and 2x2 windows (no shift) in the last stages
    (36, 36),  # odd stage sizes 18/9/5/3: padding to whole windows in every stage, shifted + padded
    (32, 44),  # input larger than configured: shift masks from the per-resolution cache, padded
])
def test_fused_equals_unfused(version, img_size, input_size):
    model = _pair(version, img_size)
    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    fused, unfused = _logits(model, x, True), _logits(model, x, False)
    assert fused.shape == (2, 10)
    assert fused.abs().max() > 1e-2  # a randomised model, not an identity stack
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fused_matches_timm_padded(version):
    """Odd sizes (padding at every stage, shifted and clamped windows) against timm's default implementation."""
    ours = _pair(version, 36)
    theirs = _timm_model(version, 36)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("relative_position_index", "attn_mask", "k_bias",
                                              "relative_coords_table")) for k in missing)
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(x)
    torch.testing.assert_close(_logits(ours, x, True), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fused_gradients_equal_unfused(version, monkeypatch):
    # force SDPA even where the CPU dispatch would pick the explicit path for a mask that needs a gradient
    monkeypatch.setattr(swin_mod, "SDPA_CPU_GRAD_MASK_EXPLICIT", False)
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(2))
    grads = []
    for fused in (True, False):
        model = _pair(version, 36)
        model.set_fused_attn(fused)
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    cpb = [n for n in grads[0] if "cpb_mlp" in n or "relative_position_bias_table" in n]
    assert cpb and all(grads[0][n].abs().sum() > 0 for n in cpb)  # the bias is learned through the fused mask


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_position_bias_once_per_block_and_mask_cached(version, monkeypatch):
    """No per-window work: the bias (V2: the CPB MLP) runs once per block per forward, whatever the chunking,
    and a shift mask is built once per new resolution."""
    model = _pair(version, 32)
    calls = {"bias": 0, "mask": 0}
    bias_fn, mask_fn = swin_mod.WindowAttention.position_bias, swin_mod.shift_mask

    def counting_bias(self):
        calls["bias"] += 1
        return bias_fn(self)

    def counting_mask(*a, **k):
        calls["mask"] += 1
        return mask_fn(*a, **k)

    monkeypatch.setattr(swin_mod.WindowAttention, "position_bias", counting_bias)
    monkeypatch.setattr(swin_mod, "shift_mask", counting_mask)
    x = torch.randn(2, 3, 44, 44)
    ref = _logits(model, x, True)
    n_blocks = len(model.blocks())
    # 44 -> stages 22x22 and 11x11 (padded 24, 12) hold one shifted block each; the configured masks don't fit
    assert calls == {"bias": n_blocks, "mask": 2}
    model.set_attn_chunk_size(3)  # sequential over windows: still one bias evaluation per block
    chunked = _logits(model, x, True)
    assert calls == {"bias": 2 * n_blocks, "mask": 2}  # masks came from the per-resolution cache
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=0)


def test_no_graph_breaks_at_configured_size():
    from swinlab.models.compile import graph_breaks

    model = swinlab.create_model(PICO["v2"], num_classes=10).eval()
    assert graph_breaks(model, torch.randn(1, 3, 32, 32)) == 0


def test_cpu_training_with_learned_bias_takes_the_explicit_path(monkeypatch):
    """On the CPU, SDPA cannot give the mask a gradient and would run its slow math kernel: explicit path instead."""
    model = _pair("v1", 32)
    sdpa_calls = []
    real = swin_mod.F.scaled_dot_product_attention
    monkeypatch.setattr(swin_mod.F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or real(*a, **k))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
    assert len(sdpa_calls) == len(model.blocks())  # inference: SDPA in every block
    sdpa_calls.clear()
    model.train()(x).sum().backward()
    assert sdpa_calls == []


def test_compile_model_rejects_unknown_mode():
    from swinlab.models.compile import compile_model

    with pytest.raises(swinlab.ConfigError, match="compile mode"):
        compile_model(torch.nn.Linear(2, 2), mode="fastest")


def test_compile_model_hands_its_documented_defaults_and_overrides_to_torch_compile(spy):
    """Defaults: one graph specialised on the configured size (``dynamic=False``), graph breaks allowed, inductor;
    every setting and any extra keyword reach ``torch.compile``, and the compiled module shares the parameters."""
    from swinlab.models.compile import compile_model
    calls = spy(torch, "compile", lambda model, **kw: kw)
    net = torch.nn.Linear(2, 2)
    compiled = compile_model(net)
    assert calls == [dict(mode="default", dynamic=False, fullgraph=False, backend="inductor")]
    assert all(a is b for a, b in zip(compiled.parameters(), net.parameters()))
    compile_model(net, mode="max-autotune-no-cudagraphs", dynamic=True, fullgraph=True, backend="eager", disable=True)
    assert calls[1] == dict(mode="max-autotune-no-cudagraphs", dynamic=True, fullgraph=True, backend="eager",
                            disable=True)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fused_equals_unfused_cuda_bf16(version):
    model = _pair(version, 36).cuda()
    x = torch.randn(4, 3, 36, 36, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused, unfused = _logits(model, x, True).float(), _logits(model, x, False).float()
    torch.testing.assert_close(fused, unfused, atol=5e-2, rtol=5e-2)
    with torch.no_grad():
        ref = _logits(model, x, True)
    torch.testing.assert_close(_logits(model, x, False), ref, atol=1e-4, rtol=0)
