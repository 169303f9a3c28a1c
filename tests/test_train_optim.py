"""Parameter grouping (weight decay / layer decay) and the warmup + cosine schedule, without training."""
import math

import pytest
import torch

from swinlab.models import create_model
from swinlab.tasks import is_no_decay, layer_id, param_groups, warmup_cosine_scheduler


def _group_of(groups):
    return {name: g for g in groups for name in g["param_names"]}


def test_every_v2_parameter_lands_in_the_right_decay_group():
    model = create_model("swinv2_pico_patch2_window4_32", num_classes=10)
    groups = param_groups(model, weight_decay=0.05)
    where = _group_of(groups)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(where) == sorted(names)  # every parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(names)
    seen = {"cpb_mlp_w": 0, "logit_scale": 0, "q_bias": 0, "norm": 0, "qkv_w": 0}
    for name, p in model.named_parameters():
        wd = where[name]["weight_decay"]
        if "cpb_mlp" in name or "logit_scale" in name or "relative_position_bias_table" in name:
            assert wd == 0.0, name  # the V2 exclusions (2-D cpb_mlp weights included)
            seen["cpb_mlp_w" if "cpb_mlp" in name and p.ndim == 2 else "logit_scale"] += 1
        elif name.endswith(".bias") or name.endswith(("q_bias", "v_bias")) or "norm" in name:
            assert wd == 0.0, name
            seen["q_bias" if name.endswith("q_bias") else "norm"] += 1
        else:
            assert p.ndim > 1 and wd == 0.05, name
            seen["qkv_w"] += name.endswith("qkv.weight")
    n_blocks = len(model.blocks())
    assert seen["cpb_mlp_w"] == 2 * n_blocks and seen["qkv_w"] == n_blocks and seen["q_bias"] == n_blocks
    assert where["head.fc.weight"]["weight_decay"] == 0.05
    assert where["patch_embed.proj.weight"]["weight_decay"] == 0.05
    # timm's train script compares whole names against no_weight_decay() fragments: cpb_mlp weights would decay
    assert not any(n in model.no_weight_decay_keywords() for n in names)
    assert is_no_decay("layers.0.blocks.0.attn.cpb_mlp.0.weight", torch.zeros(4, 2))


def test_v1_bias_table_not_decayed():
    model = create_model("swin_pico_patch2_window4_32", num_classes=10)
    where = _group_of(param_groups(model, weight_decay=0.1))
    tables = [n for n in where if n.endswith("relative_position_bias_table")]
    assert len(tables) == len(model.blocks())
    assert all(where[n]["weight_decay"] == 0.0 for n in tables)
    assert where["layers.0.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.1


def test_layer_decay_scales():
    model = create_model("swinv2_pico_patch2_window4_32", num_classes=10)
    depths = model.config["depths"]
    total = sum(depths) + 1
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    where = _group_of(groups)
    assert where["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5 ** total)
    assert where["head.fc.weight"]["lr_scale"] == 1.0 and where["norm.weight"]["lr_scale"] == 1.0
    assert where["layers.0.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.5 ** (total - 1))
    # the patch merging opening stage 1 shares the id of stage 0's last block (official layout)
    assert layer_id("layers.1.downsample.reduction.weight", depths) == layer_id("layers.0.blocks.1.mlp.fc1.weight",
                                                                               depths)
    ids = [layer_id(f"layers.{i}.blocks.{j}.norm1.weight", depths) for i in range(4) for j in range(depths[i])]
    assert ids == list(range(1, sum(depths) + 1))
    # decay and no-decay stay separate at each depth
    g = [x for x in groups if x["name"] == "no_decay_l1"][0]
    assert g["weight_decay"] == 0.0 and all("layers.0.blocks.0" in n for n in g["param_names"])


def test_schedule_shape_warmup_then_cosine():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    q = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q], "lr_scale": 0.1}], lr=1e-3)
    total, warmup, warmup_lr, min_lr = 110, 10, 1e-6, 1e-5
    sched = warmup_cosine_scheduler(opt, total_steps=total, warmup_steps=warmup, warmup_lr=warmup_lr, min_lr=min_lr)
    lrs, scaled = [], []
    for t in range(total + 1):
        sched.step_update(num_updates=t)
        lrs.append(opt.param_groups[0]["lr"])
        scaled.append(opt.param_groups[1]["lr"])
    assert lrs[0] == pytest.approx(warmup_lr)
    warm = lrs[: warmup + 1]
    diffs = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d == pytest.approx(diffs[0]) for d in diffs)  # linear warmup
    assert lrs[warmup] == pytest.approx(1e-3)
    tail = lrs[warmup:]
    assert all(b <= a + 1e-15 for a, b in zip(tail, tail[1:]))  # monotone decay
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx((1e-3 + min_lr) / 2, rel=1e-6)  # cosine midpoint
    t = warmup + 25
    expect = min_lr + 0.5 * (1e-3 - min_lr) * (1 + math.cos(math.pi * 25 / (total - warmup)))
    assert lrs[t] == pytest.approx(expect, rel=1e-9)
    assert lrs[-1] == pytest.approx(min_lr)
    assert scaled[t] == pytest.approx(0.1 * lrs[t])  # layer-decay scale applied on top
