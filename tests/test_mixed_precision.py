"""Mixed precision: V2's numerically sensitive pieces run in fp32 where the reference implementations run them, under
autocast (DDP/FSDP2 bf16-mixed) and with half-precision weights and no autocast (DeepSpeed bf16/fp16); the
non-finite guard skips bad steps without a host sync on the steps it does not log."""
import math

import pytest
import torch

import swinlab
from swinlab.models import swin as swin_module

PICO = "swinv2_pico_patch2_window4_32"


def _model(**kw):
    torch.manual_seed(0)
    model = swinlab.create_model(PICO, img_size=32, num_classes=10, **kw).eval()
    with torch.no_grad():  # fresh V2 blocks are identities (post-norms are 0): give them weight
        for blk in model.blocks():
            for norm in (blk.norm1, blk.norm2):
                norm.weight.fill_(1.0)
    return model


@pytest.fixture
def normalize_dtypes(spy):
    return spy(swin_module.F, "normalize", lambda x, *args, **kwargs: x.dtype)


def test_fp32_islands_under_bf16_autocast(normalize_dtypes):
    model = _model()
    attn = model.layers[0].blocks[1].attn
    ref_bias = attn.position_bias()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bias = attn.position_bias()
        out = model(torch.randn(2, 3, 32, 32))
    assert bias.dtype == torch.float32 and torch.equal(bias, ref_bias)  # CPB MLP: fp32, autocast off
    assert normalize_dtypes and set(normalize_dtypes) == {torch.float32}  # cosine normalisation in fp32
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()  # the matmuls ran in bf16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_without_autocast_keep_fp32_islands(normalize_dtypes, dtype):
    """DeepSpeed's bf16/fp16 engines cast the parameters and run without autocast. Padded inputs (36 px: the zero
    padding gives all-zero keys) used to give NaN in fp16, where the normalisation's eps underflows."""
    model = _model()
    x = torch.randn(2, 3, 36, 36)
    ref = model(x)
    half = model.to(dtype)
    bias = half.layers[0].blocks[0].attn.position_bias()
    out = half(x.to(dtype))
    assert bias.dtype == torch.float32
    assert set(normalize_dtypes) == {torch.float32}
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_logit_scale_cap_holds_in_bf16():
    """exp(min(s, ln 100)): a scale beyond the cap attends exactly as the cap does, also with bf16 weights."""
    model = _model().to(torch.bfloat16)
    x = torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        for blk in model.blocks():
            blk.attn.logit_scale.fill_(math.log(200.0))  # (ln 100 itself rounds to just below the cap in bf16)
        capped = model(x)
        for blk in model.blocks():
            blk.attn.logit_scale.fill_(math.log(1000.0))
        above = model(x)
        for blk in model.blocks():
            blk.attn.logit_scale.fill_(math.log(50.0))
        below = model(x)
    assert torch.equal(capped, above)
    assert not torch.equal(capped, below)


def test_guard_skips_on_the_device_without_a_host_sync(tmp_path, monkeypatch):
    """With fused AdamW, the guard's step check reads nothing back to the host except on logging steps, and a NaN
    step still leaves the weights, moments and step count as they were."""
    import lightning.pytorch as pl

    from swinlab.tasks import ImageClassifier
    from swinlab.training.nonfinite import NonFiniteGuard

    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    x[4, 0, 0, 0] = float("nan")  # batch 1 (of 4) holds a NaN
    data = torch.utils.data.TensorDataset(x, torch.arange(16) % 10)
    module = ImageClassifier(model_name=PICO, num_classes=10, model_kwargs={"img_size": 16}, mixup=0, cutmix=0,
                             warmup_steps=1, base_lr=0.05)
    guard = NonFiniteGuard(max_consecutive=3)
    reads = {"in_guard": False, "count": 0}
    snapshots = {}

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[batch_idx] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            assert trainer.optimizers[0].defaults["fused"]  # the recipe picked the fused kernel

    real_step = guard.on_before_optimizer_step

    def watched(trainer, pl_module, optimizer):
        reads["in_guard"] = trainer.global_step % trainer.log_every_n_steps != 0
        try:
            real_step(trainer, pl_module, optimizer)
        finally:
            reads["in_guard"] = False

    for name in ("item", "__bool__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if reads["in_guard"]:
                reads["count"] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(guard, "on_before_optimizer_step", watched)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[guard, Snap()],
                         log_every_n_steps=4, gradient_clip_val=5.0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    assert reads["count"] == 0  # no host read on the non-logging steps
    assert guard.skipped_steps == 1 and trainer.global_step == 4
    assert all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])  # the NaN step changed nothing
    assert any(not torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])
    state = trainer.optimizers[0].state[next(module.model.parameters())]
    assert int(state["step"]) == 3  # four batches, one skipped: the fused kernel did not count it


def test_grad_norm_clip_and_groups_with_dtensor_shards_beside_plain_parameters(monkeypatch):
    """SimMIM under FSDP2: a sharded encoder beside a replicated decoder. The total norm, the clipping and the
    optimizer groups must treat DTensor shards and plain tensors together (one gloo rank here)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from swinlab.tasks.optim import param_groups
    from swinlab.training.sharding import clip_grad_norm, grad_total_norm

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
        fully_shard(model[0], mesh=init_device_mesh("cpu", (1,)))
        assert isinstance(model[0].weight, DTensor) and not isinstance(model[1].weight, DTensor)
        model(torch.randn(5, 6)).square().sum().mul(50).backward()
        full = [(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone() for p in model.parameters()]
        ref = torch.linalg.vector_norm(torch.cat([g.flatten() for g in full]))
        assert grad_total_norm(list(model.parameters())) == pytest.approx(float(ref), rel=1e-6)
        assert float(ref) > 1.0
        clip_grad_norm(list(model.parameters()), 1.0)
        after = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in model.parameters()]
        assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in after]))) == pytest.approx(1.0, rel=1e-4)
        assert all(torch.allclose(a, g / ref, rtol=1e-4, atol=1e-9) for a, g in zip(after, full))
        groups = {g["name"]: g["params"] for g in param_groups(model, weight_decay=0.05)}
        assert set(groups) == {"decay", "no_decay", "decay_replicated", "no_decay_replicated"}
        for name, params in groups.items():
            assert all(isinstance(p, DTensor) != name.endswith("_replicated") for p in params)
        opt = torch.optim.AdamW([{"params": p} for p in groups.values()], lr=1e-2, fused=True)
        opt.step()  # the fused kernel takes each group (one kind of tensor) without complaint
    finally:
        dist.destroy_process_group()
