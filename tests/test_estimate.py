"""`python -m swinlab estimate`: parameter count, ZeRO/FSDP accounting, measured activation bytes; its config is read by
`fit`'s own parser (the same files and `--a.b value` overrides)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT

from swinlab.errors import ConfigError
from swinlab.models import create_model
from swinlab.tools.estimate import activation_bytes, estimate, model_state_bytes, read_config

TASK = "swinlab.tasks.ImageClassifier"
DATA = {"class_path": "swinlab.data.SyntheticDataModule"}  # fit's parser wants a data section: any data module


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def load_configs(paths):
    """``--config a --config b`` through estimate's parser (fit's, plus --json)."""
    return read_config([a for p in paths for a in ("--config", p)])


def _checkout_env():
    """The subprocess runs the checkout's swinlab (PYTHONPATH=repo root first), not whatever swinlab is installed."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT)] + extra))


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_estimator_parameter_count_equals_timms_model(tmp_path, name):
    # an independent count: timm's own implementation of the same architecture (built on the meta device)
    import timm
    cfg = {"model": {"class_path": "swinlab.tasks.ImageClassifier",
                     "init_args": {"model_name": name, "num_classes": 10}},
           "data": DATA, "trainer": {"precision": "32-true", "devices": 2}}
    result = estimate(load_configs([write(tmp_path, "a.yaml", cfg)]))
    with torch.device("meta"):
        ref = timm.create_model(name, num_classes=10)
    assert result["params"] == sum(p.numel() for p in ref.parameters())
    assert result["world_size"] == 2


def test_configs_compose_like_the_cli(tmp_path):
    a = write(tmp_path, "a.yaml", {"model": {"class_path": TASK, "init_args": {"model_name": "v2_pico"}}, "data": DATA,
                                   "trainer": {"devices": 1}})
    b = write(tmp_path, "b.yaml", {"trainer": {"devices": 4, "num_nodes": 2, "strategy": {
        "class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": 3}}}})
    result = estimate(load_configs([a, b]))
    assert result["world_size"] == 8 and result["strategy"] == "deepspeed_stage_3"


def test_zero_stages_shard_what_they_should():
    p, n = 1_000_000, 8
    s = model_state_bytes(p, n, "bf16-mixed")
    assert s["ddp"]["total"] == 16 * p  # 2 + 2 + 12 bytes per parameter
    assert s["zero1"]["optimizer"] == 12 * p / n and s["zero1"]["grads"] == 2 * p
    assert s["zero2"]["grads"] == 2 * p / n and s["zero2"]["weights"] == 2 * p
    assert s["zero3 / fsdp"]["total"] == 16 * p / n
    assert model_state_bytes(p, 1, "32-true")["ddp"]["total"] == 16 * p  # 4 + 4 + 8


def test_activation_bytes_on_meta_equal_a_real_forward():
    with torch.device("meta"):
        lazy = create_model("swinv2_pico_patch2_window4_32").train()
    est = activation_bytes(lazy, (32, 32), torch.float32)
    real = create_model("swinv2_pico_patch2_window4_32").train()
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        real(torch.randn(1, 3, 32, 32))
    assert est["plain"] == pytest.approx(sum(seen.values()), rel=0.02)
    assert est["checkpointed"] < 0.5 * est["plain"]


def test_estimate_cli_json_and_fits_overrides(tmp_path):
    """`python -m swinlab estimate --config <file> --trainer.devices 64 --json`: a SwinV2-G file read the way `fit`
    reads it (the override wins, the rest of the file survives; issue #11), one JSON object out."""
    cfg = write(tmp_path, "g.yaml", {"model": {"class_path": TASK,
                                               "init_args": {"model_name": "swinv2_giant_window12_192",
                                                             "model_kwargs": {"grad_checkpointing": True}}},
                                     "data": {**DATA, "init_args": {"batch_size": 4}},
                                     "trainer": {"precision": "bf16-mixed", "devices": 8}})
    env = _checkout_env()
    res = subprocess.run([sys.executable, "-m", "swinlab", "estimate", "--config", cfg, "--trainer.devices", "64",
                          "--json"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert 2.9e9 < out["params"] < 3.1e9 and out["grad_checkpointing"] is True
    assert out["activation_bytes_per_image"]["checkpointed"] < out["activation_bytes_per_image"]["plain"] / 4
    assert out["world_size"] == 64 and out["model"] == "swinv2_giant_window12_192"
    assert out["batch_size_per_gpu"] == 4  # the rest of the file survives the override
    with pytest.raises(ConfigError, match="does not exist"):
        load_configs([str(tmp_path / "missing.yaml")])


def test_estimate_composes_exactly_like_fit(tmp_path):
    """Files, later-wins composition, overrides and defaults are fit's: the same dict as fit's parser gives."""
    from swinlab.training.cli import compose_config
    extra = write(tmp_path, "extra.yaml", {"trainer": {"num_nodes": 2}, "data": {"init_args": {"batch_size": 8}}})
    args = ["--config", str(ROOT / "experiments" / "quickstart.yaml"), "--config", extra, "--trainer.devices", "4",
            "--model.init_args.model_name", "swin_pico_patch2_window4_32"]
    cfg = read_config(args)
    assert cfg == compose_config(args).as_dict()
    r = estimate(cfg)
    assert r["world_size"] == 8 and r["batch_size_per_gpu"] == 8 and r["model"] == "swin_pico_patch2_window4_32"
    assert cfg["checkpoint"]["monitor"] == "val/acc1" and cfg["trainer"]["gradient_clip_val"] == 5.0  # fit's defaults


@pytest.mark.parametrize("args, words", [
    (["--trainer.devicez", "64"], ["devicez", "estimate --help"]),
    (["--trainer.num_nodes", "many"], ["num_nodes", "many"]),
    (["--model.init_args.foo", "1"], ["foo", "not accepted"]),
])
def test_bad_override_is_one_error_line(capsys, args, words):
    from swinlab.__main__ import main
    assert main(["estimate", "--config", str(ROOT / "experiments" / "quickstart.yaml"), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert all(w in lines[0] for w in words), lines[0]
    assert captured.out == ""
