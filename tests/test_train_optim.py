"""Parameter grouping (weight decay / layer decay) and the warmup + cosine schedule, without training."""
import math

import pytest
import torch

from swinlab.models import create_model
from swinlab.tasks import is_no_decay, layer_ids, param_groups, warmup_cosine_scheduler


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
    assert model.no_weight_decay_keywords() == {"relative_position_bias_table", "cpb_mlp", "logit_scale"}
    assert is_no_decay("layers.0.blocks.0.attn.cpb_mlp.0.weight", torch.zeros(4, 2))


def test_v1_bias_table_not_decayed():
    model = create_model("swin_pico_patch2_window4_32", num_classes=10)
    where = _group_of(param_groups(model, weight_decay=0.1))
    tables = [n for n in where if n.endswith("relative_position_bias_table")]
    assert len(tables) == len(model.blocks())
    assert all(where[n]["weight_decay"] == 0.0 for n in tables)
    assert where["layers.0.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.1


def official_swin_layer(name, depths):
    """microsoft/SimMIM's get_swin_layer (the Swin/SwinV2 fine-tuning recipe), restated for timm's layout, where the
    patch merging that ends official stage i-1 is ``layers.i.downsample``: it keeps the id of stage i-1's last block."""
    if name.startswith(("patch_embed", "absolute_pos_embed", "mask_token")):
        return 0
    if name.startswith("layers."):
        stage, kind = int(name.split(".")[1]), name.split(".")[2]
        if kind == "downsample":
            return sum(depths[:stage])
        return sum(depths[:stage]) + int(name.split(".")[3]) + 1
    return sum(depths) + 1  # the final norm and the head


@pytest.mark.parametrize("name", ["swin_pico_patch2_window4_32", "swinv2_pico_patch2_window4_32",
                                  "swinv2_giant_cpu_patch2_window4_32"])
def test_layer_ids_are_the_official_recipes(name):
    model = create_model(name, num_classes=10)
    depths = model.config.depths
    assert layer_ids(model) == {n: official_swin_layer(n, depths) for n, _ in model.named_parameters()}


def test_param_groups_default_to_the_official_weight_decay():
    groups = {g["name"]: g["weight_decay"] for g in param_groups(create_model("swin_pico_patch2_window4_32"))}
    assert groups == {"decay": 0.05, "no_decay": 0.0}  # the official recipe's 0.05


def test_layer_decay_scales():
    model = create_model("swinv2_pico_patch2_window4_32", num_classes=10)
    depths = model.config.depths
    total = sum(depths) + 1
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    where = _group_of(groups)
    assert where["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5 ** total)
    assert where["head.fc.weight"]["lr_scale"] == 1.0 and where["norm.weight"]["lr_scale"] == 1.0
    assert where["layers.0.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.5 ** (total - 1))
    # every parameter's id is the official recipe's (written out independently below)
    ids = layer_ids(model)
    assert ids == {n: official_swin_layer(n, depths) for n, _ in model.named_parameters()}
    assert ids["layers.1.downsample.reduction.weight"] == ids["layers.0.blocks.1.mlp.fc1.weight"]
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


def _fake_trainer(batch_size=8, accumulate=4, world_size=2, batches=40, total=100, precision="32-true"):
    """The trainer attributes recipe_optimizer reads (Lightning's names), nothing else."""
    from types import SimpleNamespace
    return SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch_size), accumulate_grad_batches=accumulate,
                           world_size=world_size, num_training_batches=batches, estimated_stepping_batches=total,
                           precision=precision)


def _recipe(trainer, **kw):
    from swinlab.tasks.optim import recipe_optimizer
    p = torch.nn.Parameter(torch.zeros(3, 3))
    args = dict(base_lr=5e-4, warmup_lr=5e-7, min_lr=5e-6, scale_lr=True, betas=(0.9, 0.999), eps=1e-8,
                weight_decay=0.05, warmup_epochs=0.0, warmup_steps=None)
    args.update(kw)
    return recipe_optimizer(trainer, [{"params": [p], "weight_decay": 0.05}], **args)


def test_lr_scaling_counts_batch_accumulation_and_processes():
    # 8 per process x 4 accumulated x 2 processes = 64 images per update -> every LR x 64 / 512 = x 0.125
    conf = _recipe(_fake_trainer(), warmup_steps=10)
    assert conf["lrs"] == pytest.approx({"lr": 5e-4 / 8, "warmup_lr": 5e-7 / 8, "min_lr": 5e-6 / 8}, rel=1e-12)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-7 / 8)  # the schedule starts at the scaled warmup LR
    sched.step_update(num_updates=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 / 8)
    sched.step_update(num_updates=100)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-6 / 8)
    assert (opt.defaults["betas"], opt.defaults["eps"], opt.defaults["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.05)
    opt = _recipe(_fake_trainer(), betas=[0.8, 0.95], eps=1e-6, weight_decay=0.1)["optimizer"]  # not AdamW's defaults
    assert (opt.defaults["betas"], opt.defaults["eps"], opt.defaults["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.1)
    # accumulation alone matters: 16 x 3 x 1 = 48
    conf = _recipe(_fake_trainer(batch_size=16, accumulate=3, world_size=1), warmup_steps=0)
    assert conf["lrs"]["lr"] == pytest.approx(5e-4 * 48 / 512, rel=1e-12)
    # scale_lr=False: LRs as given
    conf = _recipe(_fake_trainer(), scale_lr=False)
    assert conf["lrs"] == {"lr": 5e-4, "warmup_lr": 5e-7, "min_lr": 5e-6}


def test_lr_not_scaled_without_a_batch_size_and_unbounded_runs_refused():
    from types import SimpleNamespace

    from swinlab.errors import ConfigError
    trainer = _fake_trainer()
    trainer.datamodule = SimpleNamespace()
    with pytest.warns(UserWarning, match="LR not scaled"):
        conf = _recipe(trainer)
    assert conf["lrs"]["lr"] == 5e-4
    with pytest.raises(ConfigError, match="unbounded"):
        _recipe(_fake_trainer(total=float("inf")))
    with pytest.raises(ConfigError, match="unbounded"):
        _recipe(_fake_trainer(total=0))


def test_warmup_epochs_count_optimizer_steps_not_batches():
    # 40 batches per epoch, 4 accumulated -> 10 updates per epoch; 1.5 warmup epochs = 15 updates
    conf = _recipe(_fake_trainer(batches=40, accumulate=4, total=100), warmup_epochs=1.5, scale_lr=False)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for t in range(17):
        sched.step_update(num_updates=t)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[15] == pytest.approx(5e-4) and lrs[14] < 5e-4 and lrs[16] < 5e-4
    assert lrs[7] == pytest.approx(5e-7 + (5e-4 - 5e-7) * 7 / 15)
    # 41 batches: the partial accumulation at the end still steps (ceil)
    conf = _recipe(_fake_trainer(batches=41, accumulate=4, total=110), warmup_epochs=1.0, scale_lr=False)
    conf["lr_scheduler"]["scheduler"].step_update(num_updates=11)
    assert conf["optimizer"].param_groups[0]["lr"] == pytest.approx(5e-4)


def test_fused_adamw_except_with_fp16_grad_scaler():
    assert _recipe(_fake_trainer())["optimizer"].defaults["fused"] is True
    assert _recipe(_fake_trainer(precision="bf16-mixed"))["optimizer"].defaults["fused"] is True
    assert not _recipe(_fake_trainer(precision="16-mixed"))["optimizer"].defaults["fused"]


def test_warmup_longer_than_the_run_is_clamped_and_cosine_reaches_min_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_cosine_scheduler(opt, total_steps=5, warmup_steps=50, warmup_lr=0.0, min_lr=0.1)
    lrs = []
    for t in range(6):
        sched.step_update(num_updates=t)
        lrs.append(opt.param_groups[0]["lr"])
    # warmup clamped to total - 1 = 4 steps (0.25 per step), then one cosine step down to min_lr
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert lrs[5] == pytest.approx(0.1)


def test_is_no_decay_rules_by_hand():
    w2, w1 = torch.zeros(4, 4), torch.zeros(4)
    assert not is_no_decay("layers.0.blocks.0.attn.qkv.weight", w2)
    assert is_no_decay("layers.0.blocks.0.attn.proj.bias", w2)  # a bias, whatever its shape
    assert is_no_decay("layers.0.blocks.0.norm1.weight", w1)  # 1-D
    assert is_no_decay("layers.0.blocks.0.attn.logit_scale", torch.zeros(3, 1, 1))
    assert is_no_decay("layers.0.blocks.0.attn.relative_position_bias_table", w2)
    assert not is_no_decay("layers.0.blocks.0.attn.cpb_mlp_extra.weight", w2)  # whole components, not substrings
    # wrappers' name components are removed; the true shape decides, not a flat shard
    assert not is_no_decay("_fsdp_wrapped_module.layers.0.blocks.0.attn._orig_mod.qkv.weight", w1,
                           shapes={"layers.0.blocks.0.attn.qkv.weight": (12, 4)})
    zero3 = torch.nn.Parameter(torch.zeros(0))
    zero3.ds_shape = torch.Size([12, 4])
    assert not is_no_decay("layers.0.blocks.0.attn.qkv.weight", zero3)
    frozen = create_model("swin_pico_patch2_window4_32", num_classes=3)
    frozen.head.fc.weight.requires_grad_(False)
    names = {n for g in param_groups(frozen) for n in g["param_names"]}
    assert "head.fc.weight" not in names and "head.fc.bias" in names


def test_default_no_decay_keywords_apply_to_any_module():
    class Net(torch.nn.Module):  # no no_weight_decay_keywords(): the recipe's defaults apply
        def __init__(self):
            super().__init__()
            self.cpb_mlp = torch.nn.Linear(2, 4, bias=False)
            self.relative_position_bias_table = torch.nn.Parameter(torch.zeros(9, 2))
            self.fc = torch.nn.Linear(4, 4)

    where = _group_of(param_groups(Net(), weight_decay=0.1))
    assert {n: g["weight_decay"] for n, g in where.items()} == {
        "cpb_mlp.weight": 0.0, "relative_position_bias_table": 0.0, "fc.weight": 0.1, "fc.bias": 0.0}


def test_steps_per_epoch_global_batch_and_fused_choice_edge_cases():
    from types import SimpleNamespace

    from swinlab.tasks.optim import global_batch_size, steps_per_epoch, use_fused_adamw
    assert global_batch_size(SimpleNamespace(accumulate_grad_batches=2, world_size=2)) is None  # no data module
    assert global_batch_size(_fake_trainer(batch_size=3, accumulate=5, world_size=7)) == 105
    assert steps_per_epoch(_fake_trainer(batches=1, accumulate=4)) == 1
    assert steps_per_epoch(_fake_trainer(batches=9, accumulate=4)) == 3
    sized = SimpleNamespace(train_dataloader=lambda: list(range(10)))  # before Lightning counted the batches
    trainer = SimpleNamespace(num_training_batches=float("inf"), datamodule=sized, accumulate_grad_batches=3)
    assert steps_per_epoch(trainer) == 4
    unsized = SimpleNamespace(train_dataloader=lambda: iter(range(10)))
    trainer = SimpleNamespace(num_training_batches=float("inf"), datamodule=unsized, accumulate_grad_batches=3)
    assert steps_per_epoch(trainer) == 1
    trainer.accumulate_grad_batches = 1  # an unsized loader counts as one batch per epoch
    assert steps_per_epoch(trainer) == 1

    def param(kind, floating=True):
        return SimpleNamespace(is_floating_point=lambda: floating, device=SimpleNamespace(type=kind))

    fp32 = _fake_trainer(precision="32-true")
    assert use_fused_adamw(fp32, [{"params": [param("cpu"), param("cuda")]}])
    assert not use_fused_adamw(fp32, [{"params": [param("cpu"), param("meta")]}])
    assert not use_fused_adamw(fp32, [{"params": [param("cpu", floating=False)]}])
    assert not use_fused_adamw(fp32, [{"params": []}])
    assert not use_fused_adamw(_fake_trainer(precision="16"), [{"params": [param("cuda")]}])
    assert not use_fused_adamw(_fake_trainer(precision="16-mixed"), [{"params": [param("cuda")]}])
    assert use_fused_adamw(SimpleNamespace(), [{"params": [param("cuda")]}])  # no precision attribute: not fp16


def test_no_warmup_starts_at_the_base_lr_and_a_one_step_run_is_allowed():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_cosine_scheduler(opt, total_steps=10, warmup_steps=0, warmup_lr=0.0, min_lr=0.0)
    sched.step_update(num_updates=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    conf = _recipe(_fake_trainer(total=1), warmup_steps=0, scale_lr=False)
    conf["lr_scheduler"]["scheduler"].step_update(num_updates=0)
    assert conf["optimizer"].param_groups[0]["lr"] == pytest.approx(5e-4)


def test_param_groups_use_recorded_shapes_and_the_models_keywords():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = torch.nn.Parameter(torch.zeros(16))  # a flat shard of a 4x4 weight (FSDP1-style)
            self.fc = torch.nn.Linear(4, 4)

        def no_weight_decay_keywords(self):
            return {"fc"}

    net = Net()
    groups = param_groups(net, weight_decay=0.1)
    where = _group_of(groups)
    assert where["flat"]["weight_decay"] == 0.0 and where["fc.weight"]["weight_decay"] == 0.0  # 1-D; keyword
    net.true_param_shapes = {"flat": (4, 4)}  # recorded before sharding (record_param_shapes)
    assert _group_of(param_groups(net, weight_decay=0.1))["flat"]["weight_decay"] == 0.1
    del net.true_param_shapes
    assert _group_of(param_groups(net, weight_decay=0.1, shapes={"flat": (4, 4)}))["flat"]["weight_decay"] == 0.1
    # without layer decay (or with 1.0): exactly the two groups, no lr_scale, holding the module's own tensors
    model = create_model("swin_pico_patch2_window4_32", num_classes=3)
    for ld in (None, 1.0):
        groups = param_groups(model, weight_decay=0.05, layer_decay=ld)
        assert sorted(g["name"] for g in groups) == ["decay", "no_decay"]
        assert not any("lr_scale" in g for g in groups)
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}
