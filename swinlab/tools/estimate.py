"""``python -m swinlab estimate --config X``: per-GPU memory of a training config under DDP, ZeRO and FSDP.

Model states follow the ZeRO paper's accounting for mixed-precision AdamW (per parameter: 2 bytes of bf16/fp16
weights + 2 bytes of gradients + 12 bytes of fp32 master weights, momentum and variance = 16 bytes; fp32 training
keeps 4 + 4 + 8). ZeRO-1 shards the optimizer state (and fp32 master) over the data-parallel ranks, ZeRO-2 also the
gradients, ZeRO-3 and FSDP (full shard) also the weights; optimizer offload moves the sharded optimizer state to
host memory, parameter offload the sharded weights as well.

The config is read by ``fit``'s own parser (``swinlab.training.cli.build_parser``): the same ``--config`` files, in
the same order, and the same ``--a.b value`` overrides (``--trainer.devices 64``), with the same defaults and checks.

Activations are measured, not guessed: one forward pass of the model on the meta device (no memory, no compute)
with a saved-tensor hook that adds up every tensor autograd keeps for backward, once plainly and once per block
(for activation checkpointing: what stays is each block's input plus the largest single block's activations
while it is recomputed). On the meta device attention runs the explicit path, so the figure includes the
(windows x heads x N x N) attention probabilities that a fused kernel would not keep: an upper bound there.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import torch

from ..errors import ConfigError
from ..models import create_model
from ..training.cli import build_parser, parse_config

MIXED = ("bf16-mixed", "16-mixed", "bf16", "16", "fp16", "bf16-true", "16-true")


def _init_args(section: Any) -> Dict[str, Any]:
    if isinstance(section, dict):
        return dict(section.get("init_args", section))
    return {}


def _device_count(devices: Any) -> int:
    """Trainer ``devices`` as a count: a list of ids, an int, or a string of one ("64"); "auto" / -1 count as 1."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    return devices if isinstance(devices, int) and devices > 0 else 1


def strategy_name(strategy: Any) -> str:
    if isinstance(strategy, str):
        return strategy
    if isinstance(strategy, dict):
        cls = str(strategy.get("class_path", "")).rsplit(".", 1)[-1]
        args = strategy.get("init_args", {}) or {}
        if cls == "DeepSpeedStrategy":
            ds = args.get("config")
            if isinstance(ds, str) and ds.endswith(".json"):
                try:
                    with open(ds) as fh:
                        ds = json.load(fh)
                except OSError:
                    raise ConfigError(f"DeepSpeed config {ds} not found: paths are relative to the working "
                                      f"directory (run from the repo root)") from None
            zero = ds.get("zero_optimization") if isinstance(ds, dict) else None
            if zero:  # a full DeepSpeed config (experiments/strategy/zero*_offload.yaml) overrides the arguments
                offload = bool(zero.get("offload_optimizer") or zero.get("offload_param"))
                return f"deepspeed_stage_{zero.get('stage', 0)}" + ("_offload" if offload else "")
            return f"deepspeed_stage_{args.get('stage', 2)}" + ("_offload" if args.get("offload_optimizer") else "")
        return cls or "auto"
    return "auto"


def model_state_bytes(params: int, world: int, precision: str,
                      per_node: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Per-GPU bytes of weights / gradients / optimizer state (fp32 master included) for each strategy. With
    ``per_node`` GPUs per node on several nodes, FSDP2's default HSDP (sharded within a node, replicated across
    nodes) gets its own row."""
    mixed = str(precision) in MIXED
    w, g, o = (2, 2, 12) if mixed else (4, 4, 8)
    n = max(world, 1)
    rows = {
        "ddp": (w, g, o),
        "zero1": (w, g, o / n),
        "zero2": (w, g / n, o / n),
        "zero3 / fsdp": (w / n, g / n, o / n),
        "zero2 + optimizer offload": (w, g / n, 0.0),
        "zero3 / fsdp + cpu offload": (0.0, 0.0, 0.0),
    }
    if per_node and 1 <= per_node < n:
        rows["fsdp2 hsdp (sharded within a node)"] = (w / per_node, g / per_node, o / per_node)
    return {k: dict(weights=params * a, grads=params * b, optimizer=params * c, total=params * (a + b + c))
            for k, (a, b, c) in rows.items()}


def activation_bytes(model: torch.nn.Module, img_size, dtype: torch.dtype) -> Dict[str, float]:
    """Bytes autograd saves per image, without and with per-block activation checkpointing (meta device)."""
    sizes: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        sizes[key] = max(sizes.get(key, 0), storage.nbytes())
        return t

    block_inputs, block_peaks = [], []

    def pre_hook(module, args):
        block_inputs.append(args[0].numel() * args[0].element_size())
        module._swinlab_mark = len(sizes), sum(sizes.values())

    def post_hook(module, args, output):
        _, before = module._swinlab_mark
        block_peaks.append(sum(sizes.values()) - before)

    handles = []
    for blk in model.blocks():
        handles.append(blk.register_forward_pre_hook(pre_hook))
        handles.append(blk.register_forward_hook(post_hook))
    x = torch.zeros(1, 3, *img_size, device="meta", dtype=dtype)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in handles:
            h.remove()
    total = float(sum(sizes.values()))
    in_blocks = float(sum(block_peaks))
    outside = total - in_blocks
    checkpointed = outside + float(sum(block_inputs)) + float(max(block_peaks, default=0))
    return dict(plain=total, checkpointed=checkpointed)


def estimate(config: Dict[str, Any]) -> Dict[str, Any]:
    """Per-GPU figures for a composed config (``read_config``'s result, or any dict of the same sections)."""
    model_args = _init_args(config.get("model"))
    data_args = _init_args(config.get("data"))
    trainer = config.get("trainer", {}) or {}
    name = model_args.get("model_name") or model_args.get("model")
    if not name:
        raise ConfigError("the config has no model.init_args.model_name: add the registry name of the model")
    kwargs = dict(model_args.get("model_kwargs") or {})
    kwargs.pop("compile", None)
    checkpointing = bool(kwargs.pop("grad_checkpointing", False))  # measured both ways below
    if model_args.get("num_classes") is not None:
        kwargs.setdefault("num_classes", model_args["num_classes"])
    precision = str(trainer.get("precision") or "32-true")
    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32
    with torch.device("meta"):
        model = create_model(name, **kwargs).train().to(dtype)
    params = sum(p.numel() for p in model.parameters())
    devices = _device_count(trainer.get("devices", 1))
    nodes = int(trainer.get("num_nodes", 1) or 1)
    world = devices * nodes
    batch = int(data_args.get("batch_size", 1) or 1)
    acts = activation_bytes(model, model.img_size, dtype)
    states = model_state_bytes(params, world, precision, per_node=devices if nodes > 1 else None)
    return dict(model=name, params=params, img_size=list(model.img_size), precision=precision, world_size=world,
                batch_size_per_gpu=batch, strategy=strategy_name(trainer.get("strategy", "auto"))
                + (" + cpu offload" if (model_args.get("sharding") or {}).get("cpu_offload") else ""),
                grad_checkpointing=checkpointing,
                model_states_bytes=states, activation_bytes_per_image=acts)


def _gib(b: float) -> str:
    return f"{b / 2 ** 30:.2f}"


def format_markdown(r: Dict[str, Any]) -> str:
    acts = r["activation_bytes_per_image"]
    act = acts["checkpointed" if r["grad_checkpointing"] else "plain"] * r["batch_size_per_gpu"]
    lines = [
        f"model {r['model']} at {r['img_size'][0]}x{r['img_size'][1]}: {r['params'] / 1e6:.1f}M parameters, "
        f"precision {r['precision']}, {r['world_size']} GPU(s), batch {r['batch_size_per_gpu']} per GPU, "
        f"configured strategy {r['strategy']}",
        "",
        "| per GPU (GiB) | weights | grads | optimizer | model states | + activations (batch) |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in r["model_states_bytes"].items():
        lines.append(f"| {k} | {_gib(v['weights'])} | {_gib(v['grads'])} | {_gib(v['optimizer'])} | "
                     f"{_gib(v['total'])} | {_gib(v['total'] + act)} |")
    lines += ["", f"activations per image: {_gib(acts['plain'])} GiB plain, {_gib(acts['checkpointed'])} GiB with "
                  f"activation checkpointing (this config: {'on' if r['grad_checkpointing'] else 'off'})"]
    return "\n".join(lines)


def build_estimate_parser():
    """``fit``'s parser plus ``--json``: what ``python -m swinlab estimate`` accepts."""
    parser = build_parser("fit", prog="python -m swinlab estimate",
                          description="Per-GPU memory of a training config under DDP, ZeRO and FSDP: the same "
                                      "--config files and --a.b value overrides as `python -m swinlab fit`.")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return parser


def read_config(args: List[str]) -> Dict[str, Any]:
    """``--config a.yaml --config b.yaml --trainer.devices 64 ...`` composed exactly as ``fit`` composes it (a plain
    dict of sections); bad input raises ConfigError with one line."""
    cfg = parse_config(build_estimate_parser(), args, "estimate").as_dict()
    cfg.pop("json", None)
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(argv or [])
    if argv and argv[0] == "estimate":
        argv = argv[1:]
    cfg = parse_config(build_estimate_parser(), argv, "estimate").as_dict()
    as_json = bool(cfg.pop("json"))
    result = estimate(cfg)
    print(json.dumps(result) if as_json else format_markdown(result))
    return 0
