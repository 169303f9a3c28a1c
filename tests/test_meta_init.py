"""Empty (meta-device) initialisation: ``SwinTransformer.init_weights`` draws what an eager build draws (per parameter
kind), buffers are recomputed, checkpoints load after materialisation, and the FSDP2 / DeepSpeed ZeRO-3 paths leave
every rank with its shards only; weight decay follows true shapes; compile happens per block before sharding; HSDP
on several nodes.

This file is also a script:
    python tests/test_meta_init.py rss [--model swinv2_huge_window12_192] [--ranks 2]
prints each rank's peak RSS for an FSDP2 build of the model on CPU ranks (gloo), eager vs empty init.
"""
import json
import math
import os
import pathlib
import socket
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from helpers import ROOT

PICO_V2 = "swinv2_pico_patch2_window4_32"
PICO_V1 = "swin_pico_patch2_window4_32"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kinds(model):
    """Parameter name -> kind, for every parameter (an unknown parameter fails the test that uses this)."""
    res_post = {id(m) for blk in model.blocks() if blk.res_post for m in (blk.norm1, blk.norm2)}
    kinds = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}"
            if "cpb_mlp" in mname:
                kind = f"cpb_mlp.{mname[-1]}.{pname}"
            elif isinstance(module, torch.nn.Linear):
                kind = f"linear.{pname}"
            elif isinstance(module, torch.nn.Conv2d):
                kind = f"conv.{pname}"
            elif isinstance(module, torch.nn.LayerNorm):
                kind = f"{'res_post_norm' if id(module) in res_post else 'norm'}.{pname}"
            elif pname in ("q_bias", "v_bias"):
                kind = "qv_bias"
            elif pname in ("logit_scale", "relative_position_bias_table"):
                kind = pname
            else:
                raise AssertionError(f"no kind for {name}")
            kinds[name] = kind
    return kinds


def _stats_by_kind(model):
    values = defaultdict(list)
    for name, kind in _kinds(model).items():
        values[kind].append(model.get_parameter(name).detach().float().reshape(-1))
    return {k: torch.cat(v) for k, v in values.items()}


def _assert_same_distribution(eager, empty):
    a, b = _stats_by_kind(eager), _stats_by_kind(empty)
    assert a.keys() == b.keys()
    for kind in a:
        x, y = a[kind], b[kind]
        assert x.numel() == y.numel(), kind
        if x.std() == 0:  # a constant kind (zeros, ones, ln 10): equal
            assert torch.equal(x, y), kind
            continue
        n = x.numel()
        sx, sy = float(x.std()), float(y.std())
        assert abs(sy / sx - 1) < 6 / math.sqrt(n) + 1e-3, (kind, sx, sy, n)
        assert abs(float(x.mean()) - float(y.mean())) < 6 * sx * math.sqrt(2 / n), (kind, n)
        if n >= 4096:  # the same shape of distribution (normal vs uniform), not only its moments
            q = torch.tensor([0.5, 0.99])
            qx, qy = (torch.quantile(t.abs()[:1_000_000], q) for t in (x, y))
            assert torch.allclose(qx, qy, rtol=0.1), (kind, qx, qy)
        assert not torch.equal(x, y), kind  # a fresh draw, not a copy
    return a


def _empty(name, **kwargs):
    from swinlab.models import create_model
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    assert model.is_meta()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for b in model.buffers():
            b.fill_(7)  # to_empty leaves garbage: init_weights must recompute every buffer
    model.init_weights()
    return model


# -- init_weights ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs", [
    ("swinv2_tiny_window8_256", dict(embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), img_size=64,
                                     num_classes=100)),
    ("swin_tiny_patch4_window7_224", dict(embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), img_size=56,
                                          num_classes=100)),
])
def test_init_weights_matches_an_eager_build_per_parameter_kind(name, kwargs):
    from swinlab.models import create_model
    torch.manual_seed(0)
    eager = create_model(name, **kwargs)
    torch.manual_seed(1)
    empty = _empty(name, **kwargs)
    kinds = _assert_same_distribution(eager, empty)
    expected = {"linear.weight", "linear.bias", "conv.weight", "conv.bias", "norm.weight", "norm.bias"}
    if name.startswith("swinv2"):
        expected |= {"res_post_norm.weight", "res_post_norm.bias", "logit_scale", "qv_bias", "cpb_mlp.0.weight",
                     "cpb_mlp.0.bias", "cpb_mlp.2.weight"}
    else:
        expected |= {"relative_position_bias_table"}
    assert expected == set(kinds)
    assert float(kinds["linear.weight"].std()) == pytest.approx(0.02, rel=0.02)
    if name.startswith("swinv2"):
        assert torch.all(kinds["res_post_norm.weight"] == 0) and torch.all(kinds["qv_bias"] == 0)
        assert torch.allclose(kinds["logit_scale"], torch.tensor(math.log(10.0)))


@pytest.mark.parametrize("name,kwargs", [
    (PICO_V2, {}), (PICO_V1, {}), ("swinv2_giant_cpu_patch2_window4_32", {}),
    (PICO_V2, dict(position_bias="none")), (PICO_V2, dict(img_size=24, position_bias="cpb_linear")),
])
def test_materialised_model_recomputes_buffers_and_runs(name, kwargs):
    from helpers import randomize_

    from swinlab.models import create_model
    eager = create_model(name, **kwargs)
    empty = _empty(name, **kwargs)
    bufs = dict(eager.named_buffers())
    assert bufs.keys() == dict(empty.named_buffers()).keys()
    for key, value in empty.named_buffers():
        assert torch.equal(value, bufs[key]), key
    masks = [blk.attn_mask for blk in empty.blocks() if blk.attn_mask is not None]
    assert masks and all(float(m.min()) == -100.0 for m in masks)
    empty.load_state_dict(randomize_(eager).state_dict())
    size = eager.config.img_size
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = empty.eval()(x)
        assert torch.isfinite(out).all()
        assert torch.equal(out, eager.eval()(x))


def test_eager_build_is_unchanged_by_the_empty_init_code():
    """The eager __init__ draws as before: a seeded build equals one made by hand in construction order."""
    from swinlab.models import create_model
    torch.manual_seed(0)
    a = create_model(PICO_V1)
    state = torch.get_rng_state()
    torch.manual_seed(0)
    b = create_model(PICO_V1)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # init_weights is separate: calling it re-draws (it does not replay the constructor's stream)
    torch.manual_seed(0)
    b.init_weights()
    assert not torch.equal(a.head.fc.weight, b.head.fc.weight)


# -- tasks with empty_init --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from helpers import randomize_

    from swinlab.models import create_model, save_safetensors
    out = tmp_path_factory.mktemp("meta_ckpt")
    files = {}
    for name in (PICO_V2, PICO_V1):
        src = randomize_(create_model(name, num_classes=10))
        files[name, "safetensors"] = save_safetensors(src, out / f"{name}.safetensors", name)
        ckpt = out / f"{name}.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, ckpt)
        files[name, "ckpt"] = ckpt
    return files


@pytest.mark.parametrize("name,fmt,kwargs", [
    (PICO_V2, "safetensors", {}), (PICO_V2, "ckpt", {"img_size": 16}), (PICO_V1, "ckpt", {"window_size": 2}),
])
def test_empty_init_classifier_loads_its_checkpoint_after_materialisation(saved, name, fmt, kwargs):
    from lightning.fabric.utilities.init import _has_meta_device_parameters_or_buffers

    from swinlab.models import create_model
    from swinlab.tasks import ImageClassifier
    path = saved[name, fmt]
    ref = create_model(name, checkpoint=str(path), num_classes=10, **kwargs)
    task = ImageClassifier(name, num_classes=10, checkpoint=str(path), model_kwargs=kwargs, empty_init=True)
    assert task.model.is_meta() and task.model.config == ref.config
    task.configure_model()  # no trainer: any strategy without a mesh
    assert not _has_meta_device_parameters_or_buffers(task)
    got = task.model.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in ref.state_dict().items())
    assert task.model.pending_state_dict is None


def test_empty_init_head_reset_and_simmim_encoder(saved):
    from swinlab.models import create_model
    from swinlab.tasks import ImageClassifier, MaskedImageModeling
    path = str(saved[PICO_V2, "safetensors"])
    with pytest.warns(UserWarning, match="head re-initialised"):
        task = ImageClassifier(PICO_V2, num_classes=7, checkpoint=path, empty_init=True)
    task.configure_model()
    ref = create_model(PICO_V2, checkpoint=path, num_classes=10)
    got = task.model.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in ref.state_dict().items() if not k.startswith("head."))
    assert got["head.fc.weight"].shape == (7, 128) and float(got["head.fc.weight"].std()) < 0.05
    mim = MaskedImageModeling(PICO_V2, checkpoint=path, mask_patch_size=8, empty_init=True)
    assert mim.encoder.is_meta() and mim.model is mim.encoder
    mim.configure_model()
    enc = mim.encoder.state_dict()
    assert all(torch.equal(v, enc[k]) for k, v in ref.state_dict().items() if not k.startswith("head."))


def test_empty_init_with_ema_is_refused_in_one_line():
    from swinlab.errors import ConfigError
    from swinlab.tasks import ImageClassifier
    with pytest.raises(ConfigError, match="ema_decay is set with empty_init.*ema_decay: null, or empty_init: false"):
        ImageClassifier(PICO_V2, num_classes=10, empty_init=True, ema_decay=0.999)


# -- weight decay by true shape ----------------------------------------------------------------------------------------
class _Wrapper(torch.nn.Module):
    """Stands in for FSDP1's wrapper: adds ``_fsdp_wrapped_module`` to the names below it."""

    def __init__(self, inner):
        super().__init__()
        self._fsdp_wrapped_module = inner

    def forward(self, x):
        return self._fsdp_wrapped_module(x)


def _decay_of(groups):
    return {n: g["weight_decay"] for g in groups for n in g["param_names"]}


@pytest.mark.parametrize("how", ["fsdp1_flat_views", "zero3_ds_shape"])
def test_weight_decay_follows_true_shapes_under_sharding(how):
    from swinlab.models import create_model
    from swinlab.tasks import param_groups
    from swinlab.tasks.optim import is_no_decay, record_param_shapes
    model = create_model(PICO_V2, num_classes=10)
    want = _decay_of(param_groups(model, weight_decay=0.05))
    assert 0.05 in want.values() and 0.0 in want.values()
    record_param_shapes(model)
    for stage in model.layers:  # FSDP1 auto-wrap per block: wrapper components in the names
        for j in range(len(stage.blocks)):
            stage.blocks[j] = _Wrapper(stage.blocks[j])
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if how == "fsdp1_flat_views":  # use_orig_params: flat 1-D views of the local shard
                module._parameters[pname] = torch.nn.Parameter(p.detach().reshape(-1)[: max(1, p.numel() // 2)])
            else:  # ZeRO-3: an empty partition; the real shape in ds_shape
                q = torch.nn.Parameter(torch.empty(0))
                q.ds_shape = p.shape
                module._parameters[pname] = q
    names = [n for n, _ in model.named_parameters()]
    assert any("_fsdp_wrapped_module" in n for n in names) and all(p.ndim <= 1 for p in model.parameters())
    got = _decay_of(param_groups(model, weight_decay=0.05))
    assert got == want
    if how == "fsdp1_flat_views":
        # the old rule (the tensor's own ndim) would have decayed nothing
        assert all(is_no_decay(n, p, shapes={}) for n, p in model.named_parameters())


def test_tasks_record_true_shapes_in_configure_model():
    from swinlab.tasks import MaskedImageModeling
    mim = MaskedImageModeling(PICO_V2, mask_patch_size=8, empty_init=True)
    mim.configure_model()
    assert mim.true_param_shapes["decoder.0.weight"] == (3 * 16 * 16, 128, 1, 1)
    assert mim.true_param_shapes["encoder.layers.0.blocks.0.attn.qkv.weight"] == (48, 16)
    assert mim.encoder.true_param_shapes["layers.0.blocks.0.attn.qkv.weight"] == (48, 16)


# -- HSDP mesh choice ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world,nodes,hsdp,shape", [
    (8, 1, "auto", None), (32, 4, "auto", (4, 8)), (4, 4, "auto", None), (4, 4, True, (4, 1)),
    (32, 4, False, None), (16, 2, True, (2, 8)), (2, 1, False, None),
])
def test_hsdp_mesh_shape(world, nodes, hsdp, shape):
    from swinlab.training.sharding import hsdp_mesh_shape
    assert hsdp_mesh_shape(world, nodes, hsdp) == shape


def test_hsdp_option_is_validated():
    from swinlab.errors import ConfigError
    from swinlab.training.sharding import check_sharding, hsdp_mesh_shape
    assert check_sharding({"hsdp": "auto"}) and check_sharding({"hsdp": False})
    with pytest.raises(ConfigError, match="sharding.hsdp='yes' is not valid: use auto"):
        check_sharding({"hsdp": "yes"})
    with pytest.raises(ConfigError, match="HSDP replicates across nodes"):
        hsdp_mesh_shape(8, 1, True)
    with pytest.raises(ConfigError, match="do not split evenly"):
        hsdp_mesh_shape(6, 4, "auto")


# -- FSDP2 on one gloo rank, in process ------------------------------------------------------------------------------
@pytest.fixture
def gloo_rank():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_empty_init_compiles_blocks_then_shards_then_loads(gloo_rank, saved, monkeypatch):
    import torch.distributed.fsdp as fsdp
    from lightning.fabric.utilities.init import _has_meta_device_parameters_or_buffers
    from torch.distributed.tensor import DTensor

    from swinlab.models import create_model
    from swinlab.tasks import ImageClassifier
    order = []
    real = fsdp.fully_shard

    def recording(module, **kwargs):
        order.append((type(module).__name__, getattr(module, "_compiled_call_impl", None) is not None,
                      any(p.is_meta for p in module.parameters())))
        return real(module, **kwargs)

    monkeypatch.setattr(fsdp, "fully_shard", recording)
    path = str(saved[PICO_V2, "safetensors"])
    task = ImageClassifier(PICO_V2, num_classes=10, checkpoint=path, empty_init=True, compile=True)
    task._device_mesh = gloo_rank
    task.configure_model()
    blocks = task.model.blocks()
    # compiled per block (in place), before fully_shard, which ran on the meta model: blocks, then the root
    assert order == [("SwinBlock", True, True)] * len(blocks) + [("SwinTransformer", False, True)]
    assert all(isinstance(b, fsdp.FSDPModule) and b._compiled_call_impl is not None for b in blocks)
    assert not _has_meta_device_parameters_or_buffers(task)
    assert all(isinstance(p, DTensor) for p in task.model.parameters())
    ref = create_model(PICO_V2, checkpoint=path, num_classes=10)
    got = {k: v.full_tensor() for k, v in task.model.state_dict().items()}
    assert got.keys() == ref.state_dict().keys()  # compile in place: the keys did not change
    assert all(torch.equal(v, got[k]) for k, v in ref.state_dict().items())
    for b in blocks:  # run eagerly here (compiling takes minutes on this CPU)
        b._compiled_call_impl = None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(task.model.eval()(x), ref.eval()(x), atol=1e-5)


# -- two FSDP2 ranks and DeepSpeed ZeRO-3: checks run in test_distributed.py's processes ----------------------------
def _launch(mode, ranks, out, *extra, timeout=300):
    port = str(_free_port())
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(ranks), RANK=str(rank),
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
        procs.append(subprocess.Popen([sys.executable, __file__, mode, str(out), *extra], env=env, cwd=str(out),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


def fsdp2_empty_init_checks(out: pathlib.Path) -> None:
    """Two ranks: empty-init FSDP2 build (shards differ between ranks, the full tensors draw like an eager build), a
    checkpoint loaded from rank 0, and an HSDP build as if on two nodes. Run in test_distributed.py's two processes
    (after their Lightning fits, so the gloo process group may already exist); asserted there."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    from swinlab.models import create_model
    from swinlab.tasks import ImageClassifier
    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    result = {}
    kwargs = dict(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), img_size=64)
    torch.manual_seed(0)  # the same seed on both ranks, as Lightning's seed_everything
    task = ImageClassifier("swinv2_tiny_window8_256", num_classes=100, model_kwargs=kwargs, empty_init=True)
    task._device_mesh = mesh
    task.configure_model()
    w = task.model.layers[2].blocks[0].mlp.fc1.weight
    local = w.to_local()
    other = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(other, local)
    result["shards_differ"] = not torch.equal(other[0], other[1])
    full = type(task.model)(task.model.config)  # eager reference on each rank
    sharded = {k: v.full_tensor() for k, v in task.model.state_dict().items()}
    empty = type(full)(full.config)
    empty.load_state_dict(sharded)
    _assert_same_distribution(full, empty)
    result["buffers_equal"] = all(torch.equal(b, dict(full.named_buffers())[n]) for n, b in task.model.named_buffers())
    # checkpoint: rank 0 reads, every rank gets its shards
    ckpt = out / "src.safetensors"
    if rank == 0:
        from helpers import randomize_

        from swinlab.models import save_safetensors
        save_safetensors(randomize_(create_model(PICO_V2, num_classes=10)), ckpt, PICO_V2)
    dist.barrier()
    task = ImageClassifier(PICO_V2, num_classes=10, checkpoint=str(ckpt), empty_init=True)
    task._device_mesh = mesh
    task.configure_model()
    ref = create_model(PICO_V2, checkpoint=str(ckpt), num_classes=10)
    got = {k: v.full_tensor() for k, v in task.model.state_dict().items()}
    result["checkpoint_loaded"] = all(torch.equal(v, got[k]) for k, v in ref.state_dict().items())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        result["forward_equal"] = torch.allclose(task.model.eval()(x), ref.eval()(x), atol=1e-5)
    # HSDP: two "nodes" of one rank each, forced on (auto keeps FSDP with one rank per node)
    from swinlab.training.sharding import shard_swin
    with torch.device("meta"):
        model = create_model(PICO_V2, num_classes=10)
    shard_swin(model, mesh, {"hsdp": True}, num_nodes=2)
    p = model.head.fc.weight
    result["hsdp_mesh"] = [list(p.device_mesh.mesh.shape), list(p.device_mesh.mesh_dim_names)]
    result["hsdp_placements"] = list(p.placements) == [Replicate(), Shard(0)]
    (out / f"empty_init_fsdp2_rank{rank}.json").write_text(json.dumps(result))


def zero3_empty_init_checks(out: pathlib.Path) -> None:
    """One rank, DeepSpeed on CPU: configure_model inside deepspeed.zero.Init (as Lightning's DeepSpeedStrategy runs
    it) builds partitioned parameters, initialises and loads a checkpoint module by module. Run in
    test_distributed.py's DeepSpeed process (after its Lightning fits); asserted there."""
    import types

    import deepspeed
    from lightning.fabric.utilities.init import _has_meta_device_parameters_or_buffers

    from swinlab.models import create_model, save_safetensors
    from swinlab.tasks import ImageClassifier, param_groups
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = {"train_batch_size": 2, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    from helpers import randomize_
    src = randomize_(create_model(PICO_V2, num_classes=10))
    save_safetensors(src, out / "src.safetensors", PICO_V2)
    result = {}
    for ckpt in (None, str(out / "src.safetensors")):
        task = ImageClassifier(PICO_V2, num_classes=10, checkpoint=ckpt, empty_init=True)
        trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(zero_stage_3=True,
                                                                       root_device=torch.device("cpu")),
                                        num_nodes=1)
        task._trainer = trainer
        with deepspeed.zero.Init(config_dict_or_path=config):
            task.configure_model()
        model = task.model
        tag = "ckpt" if ckpt else "init"
        result[f"{tag}_partitioned"] = all(p.numel() == 0 and hasattr(p, "ds_shape") for p in model.parameters())
        result[f"{tag}_no_meta"] = not _has_meta_device_parameters_or_buffers(task)
        decay = {g["name"]: len(g["params"]) for g in param_groups(model, weight_decay=0.05)}
        result[f"{tag}_decay_groups"] = decay
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        eager = create_model(PICO_V2, num_classes=10)
        if ckpt:
            result["ckpt_loaded"] = all(torch.equal(v, state[k]) for k, v in src.state_dict().items())
        else:
            res_post = [state[f"{n}.weight"] for n, m in model.named_modules() if n.endswith(("norm1", "norm2"))]
            result["init_res_post_zero"] = all(torch.all(t == 0).item() for t in res_post)
            scales = [v for k, v in state.items() if k.endswith("logit_scale")]
            result["init_logit_scale"] = all(torch.allclose(s, torch.tensor(math.log(10.0))) for s in scales)
            w = torch.cat([v.reshape(-1) for k, v in state.items() if k.endswith(("qkv.weight", "fc1.weight"))])
            result["init_linear_std"] = round(float(w.std()), 3)
        result[f"{tag}_buffers"] = all(torch.equal(b, dict(eager.named_buffers())[n]) for n, b in model.named_buffers())
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
        out_ = engine(torch.randn(2, 3, 32, 32))
        result[f"{tag}_forward_finite"] = bool(torch.isfinite(out_).all())
    (out / "zero3.json").write_text(json.dumps(result))


# -- peak RSS per rank (a script, not a test) ------------------------------------------------------------------------
def _rss_worker(out: pathlib.Path, model_name: str, mode: str) -> None:
    import resource

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from swinlab.tasks import ImageClassifier
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    torch.manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    task = ImageClassifier(model_name, num_classes=1000, empty_init=mode == "empty")
    task._device_mesh = mesh  # as ModelParallelStrategy does before configure_model
    task.configure_model()
    local = sum(p.to_local().numel() * p.element_size() for p in task.model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    dist.barrier()
    (out / f"rss_{mode}_rank{rank}.json").write_text(json.dumps(
        dict(rank=rank, peak_kib=peak, before_model_kib=base, local_param_bytes=local)))
    dist.destroy_process_group()


def _rss_main(argv) -> None:
    import argparse
    import tempfile
    parser = argparse.ArgumentParser(prog="python tests/test_meta_init.py rss")
    parser.add_argument("--model", default="swinv2_huge_window12_192")
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args(argv)
    from swinlab.models import count_params
    print(f"{args.model}: {count_params(args.model) / 1e6:.1f}M parameters, "
          f"{count_params(args.model) * 4 / 2 ** 30:.2f} GiB in fp32; {args.ranks} CPU ranks (gloo), FSDP2 per block")
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        for mode in ("eager", "empty"):
            _launch("rss-worker", args.ranks, out, args.model, mode, timeout=1800)
            for rank in range(args.ranks):
                r = json.loads((out / f"rss_{mode}_rank{rank}.json").read_text())
                print(f"{mode:>5} init, rank {rank}: peak RSS {r['peak_kib'] / 2 ** 20:.2f} GiB (before the model "
                      f"{r['before_model_kib'] / 2 ** 20:.2f} GiB; its shards {r['local_param_bytes'] / 2 ** 30:.2f} "
                      f"GiB)")


if __name__ == "__main__" and len(sys.argv) > 1:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    mode = sys.argv[1]
    if mode == "rss":
        _rss_main(sys.argv[2:])
    elif mode == "rss-worker":
        _rss_worker(pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4])
