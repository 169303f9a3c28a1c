"""The papers' constants and formulas, each checked against an independent reference: the formula written out here
(plain loops, no swinlab helper), a hand computation, or timm's own modules. Never against swinlab's own code path.

Every test here is in-process and takes well under a second; they are the tests mutation testing leans on
(docs/testing.md)."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock as TimmV1Block
from timm.models.swin_transformer_v2 import WindowAttention as TimmV2Attention

from swinlab.models import create_model
from swinlab.models.swin import (
    WindowAttention,
    relative_coords_table,
    relative_position_index,
    shift_mask,
    stage_geometry,
)


def _attention(window=(3, 3), heads=2, dim=8, **kw):
    kw = {"attention": "cosine", "position_bias": "cpb_log", "qkv_bias": "qv", **kw}
    attn = WindowAttention(dim, heads, window, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name != "logit_scale":
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return attn.eval()


def _pairs(window):
    """Token positions of a window in row-major order (the order window_partition flattens them in)."""
    return [(r, c) for r in range(window[0]) for c in range(window[1])]


# ---------------------------------------------------------------------------------------------------------------
# V2 scaled cosine attention: logit scale initialised to ln 10, clamped at ln 100 (tau >= 0.01)
# ---------------------------------------------------------------------------------------------------------------

def test_logit_scale_starts_at_ln_10_in_eager_and_in_init_weights():
    model = create_model("swinv2_pico_patch2_window4_32")
    scales = [blk.attn.logit_scale for blk in model.blocks()]
    assert all(s.shape == (blk.attn.num_heads, 1, 1) for s, blk in zip(scales, model.blocks()))
    assert all(torch.equal(s, torch.full_like(s, math.log(10.0))) for s in scales)
    with torch.no_grad():
        for s in scales:
            s.fill_(3.0)
    model.init_weights()
    assert all(torch.equal(s, torch.full_like(s, math.log(10.0))) for s in scales)


def _cosine_attention_by_hand(attn, x, multipliers, bias=None, mask=None):
    """softmax(cos(q, k) * multiplier + bias + mask) v, then proj, written out per window and head."""
    C, nH = attn.dim, attn.num_heads
    hd = C // nH
    w = attn.qkv.weight
    q = x @ w[:C].T + attn.q_bias
    k = x @ w[C:2 * C].T  # V2: no k bias
    v = x @ w[2 * C:].T + attn.v_bias
    out = torch.zeros_like(x)
    for h in range(nH):
        sl = slice(h * hd, (h + 1) * hd)
        qh, kh = q[..., sl], k[..., sl]
        cos = (qh @ kh.transpose(-1, -2)) / (qh.norm(dim=-1, keepdim=True) * kh.norm(dim=-1)[..., None, :])
        logits = cos * multipliers[h]
        if bias is not None:
            logits = logits + bias[h]
        if mask is not None:
            logits = logits + mask
        out[..., sl] = logits.softmax(-1) @ v[..., sl]
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("fused", [True, False])
def test_logit_scale_multiplier_is_exp_of_min_s_ln100(fused):
    # head 0 between ln 50 and ln 100 (a lower cap changes it), head 1 far above (a higher or no cap changes it)
    attn = _attention(position_bias="none", fused=fused)
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([math.log(70.0), math.log(1000.0)]).view(2, 1, 1))
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = attn(x)
        expected = _cosine_attention_by_hand(attn, x, multipliers=[70.0, 100.0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cosine_attention_and_cpb_equal_timm_window_attention_above_and_below_the_cap():
    ours = _attention(window=(3, 4), heads=2, dim=8, pretrained_window=(2, 3))
    ref = TimmV2Attention(8, (3, 4), 2, qkv_bias=True, pretrained_window_size=(2, 3)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(ours.relative_coords_table, ref.relative_coords_table, atol=0, rtol=0)
    assert torch.equal(ours.relative_position_index, ref.relative_position_index)
    x = torch.randn(2, 6, 12, 8, generator=torch.Generator().manual_seed(2))
    for s in (math.log(60.0), math.log(500.0)):
        with torch.no_grad():
            ours.logit_scale.fill_(s)
            ref.logit_scale.fill_(s)
            torch.testing.assert_close(ours(x), ref(x.flatten(0, 1)).view_as(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Continuous position bias: log-spaced coordinates, 16 * sigmoid, the table lookup
# ---------------------------------------------------------------------------------------------------------------

def _log_coords_by_hand(window, pretrained):
    """The paper's / official code's formula, one offset at a time."""
    out = torch.zeros(2 * window[0] - 1, 2 * window[1] - 1, 2)
    for i, dy in enumerate(range(-(window[0] - 1), window[0])):
        for j, dx in enumerate(range(-(window[1] - 1), window[1])):
            for axis, d in enumerate((dy, dx)):
                norm = (pretrained[axis] if pretrained[0] > 0 else window[axis]) - 1
                t = d / max(norm, 1) * 8
                out[i, j, axis] = math.copysign(math.log2(abs(t) + 1) / math.log2(8), t) if t else 0.0
    return out


@pytest.mark.parametrize("window,pretrained", [((6, 4), (0, 0)), ((6, 4), (4, 3)), ((8, 8), (4, 4)), ((1, 3), (0, 0))])
def test_log_spaced_coordinates_are_the_papers_formula(window, pretrained):
    got = relative_coords_table(window, pretrained, log_spaced=True)
    assert got.shape == (1, 2 * window[0] - 1, 2 * window[1] - 1, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], _log_coords_by_hand(window, pretrained), atol=1e-6, rtol=1e-6)


def test_log_coordinates_hand_values():
    # W8 without pretrained window: offsets 0..7 / 7 * 8 -> at most 8 -> log2(9) / 3 (paper: [-2.079, 2.079] in ln)
    table = relative_coords_table((8, 8), (0, 0), log_spaced=True)
    assert table.max().item() == pytest.approx(math.log2(9) / 3)
    assert table.max().item() * math.log(8) == pytest.approx(2.197, abs=1e-3)
    # W16 from a W8 pretrained window: 15 / 7 * 8 -> log2(1 + 120/7) / 3
    table = relative_coords_table((16, 16), (8, 8), log_spaced=True)
    assert table.max().item() == pytest.approx(math.log2(1 + 120 / 7) / 3)
    assert table.min().item() == pytest.approx(-math.log2(1 + 120 / 7) / 3)


def test_linear_coordinates_span_minus_one_to_one_at_the_pretrained_window():
    table = relative_coords_table((5, 3), (0, 0), log_spaced=False)[0]
    for i, dy in enumerate(range(-4, 5)):
        for j, dx in enumerate(range(-2, 3)):
            assert table[i, j].tolist() == pytest.approx([dy / 4, dx / 2])
    wider = relative_coords_table((7, 7), (5, 5), log_spaced=False)
    assert wider.max().item() == pytest.approx(6 / 4)


def test_relative_position_index_by_hand():
    window = (2, 3)
    idx = relative_position_index(window)
    pos = _pairs(window)
    for a, (ya, xa) in enumerate(pos):
        for b, (yb, xb) in enumerate(pos):
            assert idx[a, b].item() == (ya - yb + window[0] - 1) * (2 * window[1] - 1) + (xa - xb + window[1] - 1)


def test_cpb_bias_is_16_sigmoid_of_the_mlp_looked_up_by_offset():
    window = (3, 2)
    attn = _attention(window=window, heads=2, pretrained_window=(0, 0))
    w1, b1, w2 = attn.cpb_mlp[0].weight, attn.cpb_mlp[0].bias, attn.cpb_mlp[2].weight
    coords = _log_coords_by_hand(window, (0, 0))
    with torch.no_grad():
        bias = attn.position_bias()
        pos = _pairs(window)
        for a, (ya, xa) in enumerate(pos):
            for b, (yb, xb) in enumerate(pos):
                c = coords[ya - yb + window[0] - 1, xa - xb + window[1] - 1]
                expected = 16 * torch.sigmoid(torch.relu(c @ w1.T + b1) @ w2.T)
                torch.testing.assert_close(bias[:, a, b], expected, atol=1e-5, rtol=1e-5)
    assert bias.shape == (2, 6, 6) and 0 < bias.min() and bias.max() < 16


def test_v1_table_bias_is_looked_up_by_offset():
    window = (2, 3)
    attn = _attention(window=window, heads=3, dim=12, attention="dot", position_bias="table", qkv_bias="qkv")
    table = attn.relative_position_bias_table
    with torch.no_grad():
        bias = attn.position_bias()
    for a, (ya, xa) in enumerate(_pairs(window)):
        for b, (yb, xb) in enumerate(_pairs(window)):
            row = (ya - yb + 1) * 5 + (xa - xb + 2)
            assert torch.equal(bias[:, a, b], table[row])


def test_v1_dot_attention_scale_is_head_dim_to_minus_half():
    attn = _attention(window=(2, 2), heads=2, dim=8, attention="dot", position_bias="none", qkv_bias="qkv")
    x = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).chunk(3, dim=-1)
        out = torch.zeros_like(x)
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            out[..., sl] = (q[..., sl] @ k[..., sl].transpose(-1, -2) / 2.0).softmax(-1) @ v[..., sl]  # sqrt(4)
        expected = attn.proj(out)
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def _bias_by_hand(attn, window, head):
    """(N, N) position bias of one head, one offset at a time: the V1 table row, or V2's 16 * sigmoid(MLP(log
    coordinates))."""
    pos = _pairs(window)
    out = torch.zeros(len(pos), len(pos))
    coords = _log_coords_by_hand(window, (0, 0)) if hasattr(attn, "cpb_mlp") else None
    for a, (ya, xa) in enumerate(pos):
        for b, (yb, xb) in enumerate(pos):
            dy, dx = ya - yb + window[0] - 1, xa - xb + window[1] - 1
            if coords is None:
                out[a, b] = attn.relative_position_bias_table[dy * (2 * window[1] - 1) + dx, head]
            else:
                mlp = attn.cpb_mlp
                hidden = torch.relu(coords[dy, dx] @ mlp[0].weight.T + mlp[0].bias)
                out[a, b] = 16 * torch.sigmoid(hidden @ mlp[2].weight.T)[head]
    return out


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_attention_probs_are_the_forwards_softmax_and_times_v_give_its_output(version):
    window, heads, dim, nW = (2, 3), 2, 8, 3
    N, hd = 6, 4
    kw = {} if version == "v2" else dict(attention="dot", position_bias="table", qkv_bias="qkv")
    attn = _attention(window=window, heads=heads, dim=dim, **kw)
    if version == "v2":
        with torch.no_grad():
            attn.logit_scale.copy_(torch.tensor([1.0, 5.0]).view(2, 1, 1))  # head 1 above the ln 100 cap
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, nW, N, dim, generator=g)
    mask = torch.zeros(nW, N, N)
    mask[1, :3, 3:] = mask[1, 3:, :3] = -100.0  # window 1 holds two regions the cyclic shift brought together
    with torch.no_grad():
        probs = attn.attention_probs(x, mask)
        qkv_bias = attn.qkv.bias if version == "v1" else torch.cat((attn.q_bias, torch.zeros(dim), attn.v_bias))
        q, k, v = (x @ attn.qkv.weight.T + qkv_bias).chunk(3, dim=-1)  # (B, nW, N, dim), heads side by side
        expected = torch.zeros(2, nW, heads, N, N)
        merged = torch.zeros_like(x)  # probs @ v, heads side by side again: the output before the projection
        for h in range(heads):
            sl = slice(hd * h, hd * (h + 1))
            qh, kh = q[..., sl], k[..., sl]
            if version == "v2":
                scale = math.exp(min(attn.logit_scale[h].item(), math.log(100)))
                logits = (qh / qh.norm(dim=-1, keepdim=True)) @ (kh / kh.norm(dim=-1, keepdim=True)).transpose(-1, -2)
                logits = logits * scale
            else:
                logits = qh @ kh.transpose(-1, -2) / math.sqrt(hd)
            expected[:, :, h] = (logits + _bias_by_hand(attn, window, h) + mask).softmax(-1)
            merged[..., sl] = probs[:, :, h] @ v[..., sl]
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, nW, heads, N))
        for fused in (True, False):
            attn.fused = fused
            torch.testing.assert_close(attn(x, mask), attn.proj(merged), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(attn.attention_probs(x, mask), probs)  # whatever path the forward takes


@pytest.mark.parametrize("position_bias", ["cpb_log", "none"])
def test_attention_probs_without_a_mask_equal_those_with_an_all_zero_mask(position_bias):
    """A block without shift has no mask (and with ``position_bias: none`` nothing at all is added): ``attention_probs
    (x)`` must work and equal the masked path with nothing masked."""
    attn = _attention(window=(2, 3), heads=2, dim=8, position_bias=position_bias)
    x = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = attn.attention_probs(x)
        torch.testing.assert_close(plain, attn.attention_probs(x, torch.zeros(3, 6, 6)))
    torch.testing.assert_close(plain.sum(-1), torch.ones(plain.shape[:-1]))


# ---------------------------------------------------------------------------------------------------------------
# Shifted windows: the -100 mask and the geometry
# ---------------------------------------------------------------------------------------------------------------

def _region(i, size, window, shift):
    """The official mask's region label along one axis: [0, size-window), [size-window, size-shift), the rest."""
    return 0 if i < size - window else (1 if i < size - shift else 2)


@pytest.mark.parametrize("padded,window,shift", [((8, 8), (4, 4), (2, 2)), ((6, 9), (3, 3), (1, 1)),
                                                 ((8, 6), (4, 3), (2, 0))])
def test_shift_mask_is_minus_100_between_regions(padded, window, shift):
    mask = shift_mask(padded, window, shift)
    nwh, nww = padded[0] // window[0], padded[1] // window[1]
    assert mask.shape == (nwh * nww, window[0] * window[1], window[0] * window[1])
    for wy in range(nwh):
        for wx in range(nww):
            labels = [(_region(wy * window[0] + r, padded[0], window[0], shift[0]),
                       _region(wx * window[1] + c, padded[1], window[1], shift[1])) for r, c in _pairs(window)]
            expected = torch.tensor([[0.0 if la == lb else -100.0 for lb in labels] for la in labels])
            assert torch.equal(mask[wy * nww + wx], expected), (wy, wx)
    assert set(mask.unique().tolist()) <= {0.0, -100.0} and (mask == -100.0).any()


def test_shift_mask_equals_timms_block_mask():
    ref = TimmV1Block(dim=8, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=2)
    assert torch.equal(shift_mask((8, 8), (4, 4), (2, 2)), ref.attn_mask)
    model = create_model("swin_pico_patch2_window4_32")  # stage 0: 16x16 tokens, W4, shift 2
    ref16 = TimmV1Block(dim=16, input_resolution=(16, 16), num_heads=1, window_size=4, shift_size=2)
    assert torch.equal(model.layers[0].blocks[1].attn_mask, ref16.attn_mask)
    assert model.layers[0].blocks[0].attn_mask is None  # even blocks are not shifted
    # non-square windows and shifts, on grids of 2-4 windows per side
    for res, window, shift in (((8, 16), (2, 4), (1, 2)), ((16, 8), (4, 2), (2, 1)), ((12, 12), (2, 4), (1, 1))):
        ref = TimmV1Block(dim=8, input_resolution=res, num_heads=2, window_size=window, shift_size=shift)
        assert torch.equal(shift_mask(res, window, shift), ref.attn_mask), (res, window, shift)


def test_stage_geometry_by_hand():
    geo = stage_geometry(224, 4, 7, 4)
    assert [g["resolution"] for g in geo] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [g["window"] for g in geo] == [(7, 7)] * 4
    assert [g["shift"] for g in geo] == [(3, 3), (3, 3), (3, 3), (0, 0)]  # W // 2, none where stage == window
    geo = stage_geometry((40, 24), 2, (8, 4), 3)
    assert [g["resolution"] for g in geo] == [(20, 12), (10, 6), (5, 3)]
    assert [g["window"] for g in geo] == [(8, 4), (8, 4), (5, 3)]
    assert [g["shift"] for g in geo] == [(4, 2), (4, 2), (0, 0)]


@pytest.mark.parametrize("hw", [(6, 6), (6, 5), (5, 6), (7, 7), (9, 4)])
def test_patch_merging_pads_odd_sizes_like_timm(hw):
    from timm.models.swin_transformer import PatchMerging as TimmMerging

    from swinlab.models.swin import PatchMerging
    ours = PatchMerging(4, 8, "norm_reduce")
    ref = TimmMerging(4, 8)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, *hw, 4, generator=g)
    out = ours(x)
    assert out.shape == (2, (hw[0] + 1) // 2, (hw[1] + 1) // 2, 8)
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_shift_along_one_axis_only_equals_timm(version):
    # 32x16 pixels, patch 2, W4: stage 1 is 8x4 tokens, shifted along H only (W holds a single window)
    from helpers import randomize_
    from timm.models.swin_transformer import SwinTransformer as TimmV1
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmV2

    from swinlab.models import SwinTransformer
    net = dict(img_size=(32, 16), patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
               num_classes=3)
    ref = randomize_((TimmV1 if version == "v1" else TimmV2)(**net)).eval()
    ours = SwinTransformer(version=version, **net).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.layers[1].blocks[1].shift == (2, 0)
    x = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_runtime_shift_masks_are_cached_per_size():
    model = create_model("swin_pico_patch2_window4_32").eval()
    blk = model.layers[0].blocks[1]
    with torch.no_grad():
        model(torch.randn(1, 3, 48, 40))
        first = dict(blk._mask_cache)
        model(torch.randn(1, 3, 40, 48))
        model(torch.randn(1, 3, 48, 40))
    assert len(first) == 1 and len(blk._mask_cache) == 2
    (key, mask), = first.items()
    assert blk._mask_cache[key] is mask  # reused, not rebuilt


def test_extra_norm_is_applied_on_the_main_branch():
    from swinlab.models import SwinTransformer
    model = SwinTransformer(img_size=16, patch_size=2, embed_dim=8, depths=(2,), num_heads=(1,), window_size=4,
                            version="v2", extra_norm_period=2, num_classes=0).eval()
    plain, extra = model.layers[0].blocks
    assert not hasattr(plain, "norm3") and hasattr(extra, "norm3")
    with torch.no_grad():
        extra.norm3.weight.zero_()
        extra.norm3.bias.fill_(0.5)  # LayerNorm output = bias: the block's output must be exactly 0.5
        out = extra(torch.randn(1, 8, 8, 8))
    assert torch.equal(out, torch.full_like(out, 0.5))


def test_half_precision_weights_without_autocast_run_v2():
    # DeepSpeed's bf16 engine casts parameters, not buffers: the zero k bias and the fp32 bias/mask must follow q
    from helpers import randomize_
    model = randomize_(create_model("swinv2_pico_patch2_window4_32", num_classes=3)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_dropout_only_in_training(fused):
    model = create_model("swin_pico_patch2_window4_32", num_classes=3, attn_drop_rate=0.5, drop_path_rate=0.0)
    model.set_fused_attn(fused)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        a = model(x)
        b = model(x)
    assert not torch.allclose(a, b)


def test_fused_training_gives_the_position_bias_its_gradient():
    from helpers import randomize_
    ref = randomize_(create_model("swinv2_pico_patch2_window4_32", num_classes=3, drop_path_rate=0.0))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    grads = []
    for fused in (True, False):
        ref.zero_grad()
        ref.set_fused_attn(fused)
        ref.train()(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in ref.named_parameters() if "cpb_mlp" in n})
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)


def test_position_tables_are_built_on_the_device_asked_for():
    """``relative_position_index`` / ``relative_coords_table`` honour ``device`` (buffers are rebuilt on the model's
    device after a meta-device build or a move; built elsewhere they would need a copy, or fail on GPU)."""
    assert relative_position_index((3, 4), device="meta").device.type == "meta"
    assert relative_coords_table((3, 4), (0, 0), True, device="meta").device.type == "meta"
    assert relative_coords_table((3, 4), (2, 2), False, device="meta").device.type == "meta"


def test_qkv_bias_takes_the_parameters_dtype_when_the_zero_k_buffer_was_not_cast():
    """DeepSpeed's half-precision engines cast parameters, not buffers: q_bias/v_bias bf16 beside an fp32 zero
    k_bias must still give a bf16 qkv bias (an fp32 one would promote the projection or fail in F.linear)."""
    attn = _attention(window=(2, 2), heads=2, dim=8)
    with torch.no_grad():
        attn.q_bias.data = attn.q_bias.data.bfloat16()
        attn.v_bias.data = attn.v_bias.data.bfloat16()
    assert attn.k_bias.dtype == torch.float32
    bias = attn.qkv_bias()
    assert bias.dtype == torch.bfloat16 and torch.equal(bias[8:16], torch.zeros(8, dtype=torch.bfloat16))


def test_cpb_coordinates_of_a_stage_trained_at_one_token_are_unnormalised_offsets():
    """A stage whose window was clamped to 1 token trained its CPB at window 1: moved to window 3, its offsets
    -2..2 are divided by max(1 - 1, 1) = 1 (not by the new window's 2), times 8, then log-spaced (hand values)."""
    table = relative_coords_table((3, 3), (1, 1), True)
    expected = torch.tensor([math.copysign(math.log2(8 * abs(d) + 1) / 3, d) for d in range(-2, 3)])
    torch.testing.assert_close(table[0, :, 2, 0], expected)
    torch.testing.assert_close(table[0, 2, :, 1], expected)
