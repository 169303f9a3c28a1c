"""Scale configs and checks (single process, fast): strategy files compose with every experiment, impossible
combinations stop with one line before training, chunk sizes are validated, the estimator reads strategy files."""
import contextlib
import io

import pytest
import torch
import yaml
from helpers import ROOT

import swinlab
from swinlab.errors import ConfigError
from swinlab.training.cli import build_parser, main
from swinlab.training.preflight import (
    check_chunk_size,
    check_config,
    check_machine,
    check_run,
    close_matches,
    strategy_family,
    valid_chunk_sizes,
)

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
STRATEGIES = sorted((ROOT / "experiments" / "strategy").glob("*.yaml"))
PICO = "swinv2_pico_patch2_window4_32"


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def parser():
    """``fit``'s own parser (same arguments and defaults; swinlab.training.cli.build_parser), built once for the whole
    cross product."""
    return build_parser("fit")


def _print_config(parser, *configs):
    args = [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        parser.parse_args(args)
    assert done.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_each_strategy_file_picks_its_strategy_and_init():
    """Each file's strategy family, and meta-device init exactly where parameters are sharded at build time."""
    family = {"ddp": "ddp", "fsdp2": "fsdp2", "fsdp2_offload": "fsdp2", "fsdp1": "fsdp", "zero1": "deepspeed",
              "zero2": "deepspeed", "zero3": "deepspeed", "zero2_offload": "deepspeed", "zero3_offload": "deepspeed",
              "multinode": "auto"}
    assert {p.stem for p in STRATEGIES} == set(family)
    for path in STRATEGIES:
        cfg = yaml.safe_load(path.read_text())
        assert strategy_family((cfg.get("trainer") or {}).get("strategy")) == family[path.stem], path.stem
        empty = ((cfg.get("model") or {}).get("init_args") or {}).get("empty_init", False)
        assert empty == (path.stem.startswith("fsdp2") or path.stem.startswith("zero3")), path.stem


def _kinds_of_experiment():
    """One experiment per kind that can meet a strategy file differently: the task class, the strategy the
    experiment sets itself (none, a name, a class with its arguments) and whether it sets sharding or empty init."""
    kinds = {}
    for path in EXPERIMENTS:
        cfg = yaml.safe_load(path.read_text())
        model = cfg.get("model") or {}
        init = model.get("init_args") or {}
        kind = (model.get("class_path"), repr((cfg.get("trainer") or {}).get("strategy")), "sharding" in init,
                "empty_init" in init)
        kinds.setdefault(kind, path)
    return sorted(kinds.values())


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[p.stem for p in STRATEGIES])
def test_strategy_composes_with_every_kind_of_experiment(parser, strategy):
    """``fit --config <experiment> --config strategy/<s>.yaml --print_config`` for every strategy file and one
    experiment of each kind (the CLI's parser); every experiment alone: test_cli.py."""
    extra = yaml.safe_load(strategy.read_text())
    want = extra.get("trainer", {}).get("strategy")
    kinds = _kinds_of_experiment()
    assert 3 <= len(kinds) < len(EXPERIMENTS)
    for experiment in kinds:
        cfg = _print_config(parser, experiment, strategy)
        got = cfg["trainer"]["strategy"]
        if want is None:  # multinode.yaml: the experiment's strategy survives
            assert cfg["trainer"]["num_nodes"] == extra["trainer"]["num_nodes"], experiment.stem
        elif isinstance(want, str):
            assert got == want, experiment.stem
        else:
            assert got["class_path"] == want["class_path"], experiment.stem
        sharding = extra.get("model", {}).get("init_args", {}).get("sharding", "absent")
        if sharding != "absent":
            assert cfg["model"]["init_args"]["sharding"] == sharding, experiment.stem
        base = yaml.safe_load(experiment.read_text())
        assert cfg["model"]["init_args"]["model_name"] == base["model"]["init_args"]["model_name"]


def test_print_config_through_main(capsys):
    """The same composition through ``swinlab.training.cli.main`` (what ``python -m swinlab fit`` runs)."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "experiments" / "v2_g.yaml"), "--config",
              str(ROOT / "experiments" / "strategy" / "zero3_offload.yaml"), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    path = cfg["trainer"]["strategy"]["init_args"]["config"]
    assert path == "experiments/strategy/deepspeed_zero3_offload.json"
    import json
    zero = json.loads((ROOT / path).read_text())["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("strategy, family", [
    ("ddp", "ddp"), ("deepspeed_stage_3", "deepspeed"), ("fsdp", "fsdp"), (None, "auto"),
    ({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, "fsdp2"),
    ({"class_path": "lightning.pytorch.strategies.FSDPStrategy"}, "fsdp"),
])
def test_strategy_family(strategy, family):
    assert strategy_family(strategy) == family


MP = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
      "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1}}


def _cfg(strategy=None, accelerator="cpu", precision="32-true", model=PICO, sharding=None, **kwargs):
    return {"trainer": {"accelerator": accelerator, "strategy": strategy, "precision": precision, "devices": 1},
            "model": {"init_args": {"model_name": model, "model_kwargs": kwargs, "sharding": sharding}}}


@pytest.mark.parametrize("cfg, words", [
    (_cfg("deepspeed_stage_2"), ["DeepSpeed needs CUDA", "fsdp2.yaml"]),
    (_cfg({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy"}), ["DeepSpeed needs CUDA"]),
    (_cfg("fsdp"), ["FSDPStrategy (FSDP1) needs CUDA"]),
    (_cfg(precision="16-true"), ["16-true", "SwinV2", "16-mixed"]),
    (_cfg({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
           "init_args": {"data_parallel_size": "auto", "tensor_parallel_size": 1}}), ["data_parallel_size: 1"]),
    (_cfg({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
           "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 2}}), ["no tensor-parallel plan"]),
    (_cfg("ddp", precision="bf16-mixed", sharding={"param_dtype": "bfloat16"}), ["sharding", "ModelParallelStrategy"]),
    (_cfg(MP, sharding={"param_dtype": "bfloat16"}),
     ["param_dtype bfloat16 needs autocast", "bf16-mixed"]),
    (_cfg(MP, sharding={"param_dtype": "float16"}),
     ["param_dtype float16", "bf16-mixed"]),
    (_cfg(MP, precision="bf16-mixed",
          sharding={"param_dtype": "float16"}), ["param_dtype float16", "bfloat16"]),
    (_cfg(MP, precision="16-mixed"), ["16-mixed", "ModelParallelStrategy", "bf16-mixed"]),
])
def test_check_config_refuses(cfg, words):
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("cfg", [
    _cfg("ddp"), _cfg(precision="16-true", model="swin_pico_patch2_window4_32"),  # V1 in fp16: allowed
    _cfg(precision="16-mixed"), _cfg(precision="bf16-true"),
    _cfg(MP, precision="bf16-mixed",
         sharding={"param_dtype": "bfloat16"}),
])
def test_check_config_accepts(cfg):
    check_config(cfg)


@pytest.mark.parametrize("trainer, words", [
    ({"max_epochs": -3}, ["trainer.max_epochs=-3", "-1 for no limit"]),
    ({"max_steps": -2}, ["trainer.max_steps=-2"]),
    ({"min_epochs": -1}, ["trainer.min_epochs=-1", ">= 0"]),
    ({"num_nodes": 0}, ["trainer.num_nodes=0", ">= 1"]),
    ({"devices": 0}, ["trainer.devices=0"]), ({"devices": "0"}, ["trainer.devices=0"]),
    ({"devices": -2}, ["trainer.devices=-2", "-1 for all"]),
    ({"accumulate_grad_batches": 0}, ["accumulate_grad_batches=0"]),
    ({"limit_val_batches": -1}, ["limit_val_batches=-1"]), ({"limit_test_batches": 1.5}, ["limit_test_batches=1.5"]),
    ({"val_check_interval": 0}, ["val_check_interval=0"]), ({"val_check_interval": 1.5}, ["val_check_interval=1.5"]),
    ({"check_val_every_n_epoch": 0}, ["check_val_every_n_epoch=0"]),
    ({"gradient_clip_val": -1.0}, ["gradient_clip_val=-1.0", ">= 0"]),
    ({"num_sanity_val_steps": -2}, ["num_sanity_val_steps=-2"]),
    ({"strategy": "dpp"}, ["trainer.strategy='dpp'", "did you mean ddp", "deepspeed_stage_3"]),
    ({"strategy": "deepspeed_stage3"}, ["did you mean deepspeed_stage_3"]),
    ({"accelerator": "tpux"}, ["trainer.accelerator='tpux'", "did you mean tpu", "cpu, gpu"]),
])
def test_check_config_refuses_trainer_values(trainer, words):
    with pytest.raises(ConfigError) as err:
        check_config({"trainer": trainer})
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("trainer", [
    {"max_epochs": -1, "max_steps": -1, "min_epochs": 0}, {"max_epochs": None}, {"devices": "auto"},
    {"devices": -1}, {"devices": [0, 1]}, {"devices": "0,1"}, {"limit_val_batches": 0.5}, {"limit_val_batches": 10},
    {"limit_train_batches": 1.0}, {"limit_train_batches": 0}, {"val_check_interval": 100},
    {"val_check_interval": 0.25}, {"val_check_interval": "00:00:10:00"}, {"gradient_clip_val": 0},
    {"num_sanity_val_steps": -1}, {"strategy": "DDP"}, {"strategy": "deepspeed_stage_3_offload", "accelerator": "gpu"},
    {"strategy": "ddp_find_unused_parameters_true"}, {"accelerator": "auto"}, {"accelerator": "gpu"},
    {"accelerator": "cuda", "devices": 64}, {"check_val_every_n_epoch": None},
])
def test_check_config_accepts_what_lightning_accepts(trainer):
    """check_config judges the config, not this machine: GPU settings pass here (check_machine is the other half)."""
    check_config({"trainer": trainer})


def test_check_machine_refuses_an_accelerator_or_device_count_this_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("gpu", "cuda", "GPU"):
        with pytest.raises(ConfigError, match="no (GPU|CUDA) device.*--trainer.accelerator cpu"):
            check_machine({"trainer": {"accelerator": accelerator}})
    for accelerator in ("cpu", "auto", None):
        check_machine({"trainer": {"accelerator": accelerator, "devices": 8}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_machine({"trainer": {"accelerator": "gpu", "devices": 2}})
    check_machine({"trainer": {"accelerator": "gpu", "devices": "auto"}})
    with pytest.raises(ConfigError, match="trainer.devices=4 but this machine has 2 CUDA device"):
        check_machine({"trainer": {"accelerator": "cuda", "devices": "4"}})


def test_close_matches():
    assert close_matches("dpp", ["ddp", "fsdp", "auto"]) == " (did you mean ddp?)"
    assert close_matches("lr", ["base_lr", "warmup_lr", "min_lr", "eps"]) == \
        " (did you mean base_lr, warmup_lr or min_lr?)"
    assert close_matches("zzz", ["ddp", "fsdp"]) == ""


def test_every_experiment_passes_the_config_check(parser):
    """The shipped experiments pass check_config as they would run where they are meant to (GPU ones too)."""
    for experiment in EXPERIMENTS:
        check_config(parser.parse_args(["--config", str(experiment)]))


def test_check_config_on_parsed_cli_config(parser):
    """check_config takes the CLI's parsed Namespace (as ``before_instantiate_classes`` sees it)."""
    args = ["--config", str(ROOT / "experiments" / "quickstart.yaml"), "--config",
            str(ROOT / "experiments" / "strategy" / "zero2.yaml")]
    cfg = parser.parse_args(args)
    with pytest.raises(ConfigError, match="DeepSpeed needs CUDA"):
        check_config(cfg)
    check_config(parser.parse_args(args[:2]))


def test_valid_chunk_sizes():
    assert valid_chunk_sizes([16, 4, 1, 1]) == [1, 2, 4, 8, 16]
    assert valid_chunk_sizes([64, 16, 4, 1]) == [1, 2, 4, 8, 16, 32, 64]
    assert valid_chunk_sizes([9, 1]) == [1, 3, 9]


def test_chunk_size_that_does_not_divide_is_refused():
    model = swinlab.create_model(PICO, img_size=32, attn_chunk_size=3)  # windows per stage: 16, 4, 1, 1
    with pytest.raises(ConfigError) as err:
        check_chunk_size(model)
    msg = str(err.value)
    assert "attn_chunk_size=3" in msg and "stage 0: 16 windows" in msg and "[1, 2, 4, 8, 16]" in msg, msg
    accepted = []
    for chunk in range(0, 41):
        model.set_attn_chunk_size(chunk)
        try:
            check_chunk_size(model)
            accepted.append(chunk)
        except ConfigError:
            pass
    # 0 is off; a chunk must divide every stage it splits; 16 or more windows per chunk splits no stage
    assert accepted == [0, 1, 2, 4, 8] + list(range(16, 41))


def test_check_run_sees_the_built_model():
    class Module:
        hparams = {"sharding": None}
        model = swinlab.create_model(PICO, img_size=32)

    class Trainer:
        precision = "16-true"
        strategy = None

    with pytest.raises(ConfigError, match="16-true"):
        check_run(Trainer(), Module())
    Trainer.precision = "16-mixed"
    check_run(Trainer(), Module())
    Module.model.set_attn_chunk_size(6)
    with pytest.raises(ConfigError, match="attn_chunk_size=6"):
        check_run(Trainer(), Module())


TINY = f"""
seed_everything: 0
threads: 1
model:
  class_path: swinlab.tasks.ImageClassifier
  init_args: {{model_name: {PICO}, num_classes: 10, model_kwargs: {{img_size: 16}}, warmup_steps: 1, mixup: 0.0,
               cutmix: 0.0}}
data:
  class_path: swinlab.data.SyntheticDataModule
  init_args: {{img_size: 16, batch_size: 8, num_classes: 10, train_samples: 16, val_samples: 8}}
trainer:
  accelerator: cpu
  max_steps: 1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
"""


@pytest.mark.parametrize("args, words", [
    (["--model.init_args.model_kwargs", "{img_size: 16, attn_chunk_size: 3}"], ["attn_chunk_size=3", "[1, 2, 4]"]),
    (["--trainer.precision", "16-true"], ["16-true", "SwinV2"]),
    (["--model.init_args.sharding", "{param_dtype: float32}"], ["sharding", "ModelParallelStrategy"]),
    (["--model.init_args.sharding", "{param_dtype: int8}"], ["param_dtype", "int8"]),
    (["--model", "swinlab.tasks.MaskedImageModeling", "--model.init_args.model_name", PICO,
      "--model.init_args.mask_patch_size", "4", "--model.init_args.model_kwargs", "{img_size: 16, attn_chunk_size: 3}"],
     ["attn_chunk_size=3"]),
])
def test_bad_scale_settings_are_one_line_through_the_cli(tmp_path, monkeypatch, args, words):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        main(["fit", "--config", str(cfg), "--checkpoint.monitor", "null", *args])
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_estimator_reports_the_configured_strategy(monkeypatch):
    monkeypatch.chdir(ROOT)  # the DeepSpeed JSON paths in the strategy files are relative to the repo root
    from swinlab.tools.estimate import estimate, read_config
    exp = str(ROOT / "experiments" / "quickstart.yaml")  # the strategy's name does not depend on the model's size
    names = {}
    for s in ("ddp", "fsdp2", "fsdp2_offload", "zero3", "zero2_offload", "zero3_offload", "fsdp1"):
        r = estimate(read_config(["--config", exp, "--config", str(ROOT / "experiments" / "strategy" / f"{s}.yaml")]))
        names[s] = r["strategy"]
        assert r["model"] == PICO
    assert names["ddp"] == "ddp" and names["zero3"] == "deepspeed_stage_3"
    assert names["zero3_offload"] == "deepspeed_stage_3_offload"
    assert names["zero2_offload"] == "deepspeed_stage_2_offload"
    assert names["fsdp2"] == "ModelParallelStrategy"
    assert names["fsdp2_offload"] == "OffloadModelParallelStrategy + cpu offload"  # swinlab.training.sharding
    assert names["fsdp1"] == "FSDPStrategy"


@pytest.mark.parametrize("strategy", ["zero2", "zero3_offload", "fsdp1"])
def test_gpu_only_strategies_are_refused_by_the_cli_before_anything_is_built(strategy):
    args = ["fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"),
            "--config", str(ROOT / "experiments" / "strategy" / f"{strategy}.yaml")]
    with pytest.raises(ConfigError, match="needs CUDA GPUs") as err:
        main(args)
    assert "\n" not in str(err.value) and "fsdp2.yaml" in str(err.value)
