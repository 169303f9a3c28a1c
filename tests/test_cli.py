"""`python -m swinlab fit|validate ...` through LightningCLI: configs, errors, TensorBoard, checkpoints, resume."""
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT

from swinlab.models import list_models
from swinlab.training.cli import main

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
PICO = "swinv2_pico_patch2_window4_32"

TINY = f"""
seed_everything: 0
threads: 1
throughput: {{window_size: 2}}
model:
  class_path: ImageClassifier  # short names: `python -m swinlab` knows swinlab's tasks and data modules
  init_args: {{model_name: {PICO}, num_classes: 10, model_kwargs: {{img_size: 16}}, warmup_steps: 2,
               mixup: 0.8, cutmix: 1.0, base_lr: 0.02}}
data:
  class_path: DigitsDataModule
  init_args: {{img_size: 16, batch_size: 16}}
trainer:
  accelerator: cpu
  max_epochs: 2
  limit_train_batches: 2
  limit_val_batches: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: runs, name: tiny}}
"""


@pytest.fixture(autouse=True)
def _restore_threads():
    """The configs' ``threads: 1`` (no OpenMP spin-waiting on a shared CPU) must not leak into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _swinlab(args, cwd):
    return subprocess.run([sys.executable, "-m", "swinlab", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_prints_its_config(config, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"].startswith("swinlab.tasks.")
    assert cfg["model"]["init_args"]["model_name"] in list_models(include_aliases=True)
    assert cfg["data"]["class_path"].startswith("swinlab.data.")
    assert cfg["checkpoint"]["save_last"] is True and cfg["trainer"]["gradient_clip_val"] == 5.0
    if cfg["model"]["class_path"] == "swinlab.tasks.ImageClassifier":
        assert cfg["checkpoint"]["monitor"] == "val/acc1"


def test_experiment_names_cover_the_families():
    names = {p.stem for p in EXPERIMENTS}
    assert {"quickstart", "v1_t", "v1_s", "v1_b", "v1_l", "v2_t", "v2_s", "v2_b", "v2_l", "v2_g"} <= names
    g = yaml.safe_load((ROOT / "experiments" / "v2_g.yaml").read_text())
    assert g["model"]["init_args"]["model_kwargs"]["grad_checkpointing"] is True
    assert g["trainer"]["precision"] == "bf16-mixed" and "ModelParallel" in g["trainer"]["strategy"]["class_path"]


def test_configs_compose(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer: {max_epochs: 3}\ndata: {init_args: {batch_size: 32}}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"), "--config", str(extra),
              "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["data"]["init_args"]["batch_size"] == 32
    assert cfg["data"]["init_args"]["img_size"] == 32  # the rest of the first config survives
    assert cfg["model"]["init_args"]["model_name"] == PICO


@pytest.mark.parametrize("subcommand, configs, extra", [
    ("fit", ["quickstart.yaml"], ["--trainer.devices", "4", "--model.init_args.num_classes", "7"]),
    ("fit", ["v2_g.yaml", "strategy/fsdp2.yaml"], []),
    ("fit", ["simmim_quick.yaml"], ["--ckpt_path", "last"]),
    ("validate", ["v1_t.yaml"], []),
])
def test_build_parser_is_the_clis_parser(subcommand, configs, extra, capsys):
    """build_parser/compose_config (what estimate, ablate and the tests read configs with) give exactly what
    ``python -m swinlab <subcommand> ... --print_config`` prints: same keys, defaults, composition and overrides."""
    from swinlab.training.cli import build_parser, compose_config
    args = [a for c in configs for a in ("--config", str(ROOT / "experiments" / c))] + extra
    with pytest.raises(SystemExit) as done:
        main([subcommand, *args, "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = compose_config(args, subcommand=subcommand)
    assert yaml.safe_load(build_parser(subcommand).dump(cfg, skip_none=False)) == printed


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_fit_logs_checkpoints_exports_and_resumes(tmp_path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text(TINY)
    out = _swinlab(["fit", "--config", "tiny.yaml"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "tiny" / "version_0"
    ea = _events(run)
    scalars = set(ea.Tags()["scalars"])
    for tag in ("train/loss", "val/loss", "val/acc1", "val/acc5", "lr-AdamW/decay", "lr-AdamW/no_decay",
                "train/grad_norm", "train/device/samples_per_sec", "train/device/flops_per_sec",
                "train/host_peak_rss_bytes", "logit_scale/s0b0", "logit_scale/s3b1"):
        assert tag in scalars, (tag, sorted(scalars))
    assert ea.Scalars("train/device/samples_per_sec")[-1].value > 0
    assert ea.Scalars("train/host_peak_rss_bytes")[-1].value > 1e6
    # Lightning's ThroughputMonitor: FLOPs/s = the task's flops_per_batch (3 x 2 x MACs x 16 images) x batches/s
    from swinlab.models import create_model, model_macs
    flops = 3 * 2 * model_macs(create_model(PICO, img_size=16, num_classes=10)) * 16
    ratio = ea.Scalars("train/device/flops_per_sec")[-1].value / ea.Scalars("train/device/batches_per_sec")[-1].value
    assert ratio == pytest.approx(flops, rel=1e-3)
    decay = [e.value for e in ea.Scalars("lr-AdamW/decay")]
    assert decay[0] == pytest.approx(5e-7 * 16 / 512) and max(decay) == pytest.approx(0.02 * 16 / 512)
    assert len(ea.Scalars("val/acc1")) == 2
    images = set(ea.Tags()["images"])
    assert {f"position_bias/stage{i}" for i in range(4)} | {"attention/stage0"} <= images
    img = ea.Images("position_bias/stage3")[-1]
    assert img.width > img.height > 1  # 8 heads side by side
    assert len(ea.Images("attention/stage0")) == 2  # once per validation epoch
    plugins = {ea.summary_metadata[t].plugin_data.plugin_name for t in ea.summary_metadata}
    assert "hparams" in plugins and (run / "hparams.yaml").is_file()

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("epoch") for n in ckpts)
    best = next(p for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch"))
    from swinlab.models import create_model
    from swinlab.tasks import ImageClassifier
    exported = create_model(PICO, checkpoint=str(run / "best.safetensors")).eval()
    state = torch.load(best, weights_only=True)
    module = ImageClassifier(model_name=PICO, num_classes=10, model_kwargs={"img_size": 16})
    module.load_state_dict(state["state_dict"])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(exported(x), module.eval()(x), atol=1e-6)
    assert tuple(exported.img_size) == (16, 16)

    before = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert before["global_step"] == 4
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["version"] is None  # a run from this file gets its own folder
    config_bytes = (run / "config.yaml").read_bytes()
    # resume in-process (same CLI entry point as `python -m swinlab`, without a second interpreter start-up)
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "tiny.yaml", "--ckpt_path", "last", "--trainer.max_epochs", "3"]) == 0
    assert not (tmp_path / "runs" / "tiny" / "version_1").exists()  # resumed in place
    assert (run / "config.yaml").read_bytes() == config_bytes  # the first run's config is never rewritten
    resumed = yaml.safe_load((run / "config_resume_1.yaml").read_text())
    assert resumed["ckpt_path"].endswith("version_0/checkpoints/last.ckpt") and resumed["trainer"]["max_epochs"] == 3
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6 and last["global_step"] > before["global_step"]
    opt_before, opt_after = before["optimizer_states"][0]["state"], last["optimizer_states"][0]["state"]
    assert int(opt_after[0]["step"]) == int(opt_before[0]["step"]) + 2  # optimizer state carried over
    assert len(_events(run).Scalars("val/acc1")) == 3  # the run's curves continue


def test_an_ema_run_monitors_and_exports_the_ema_unless_told_otherwise():
    from swinlab.training.cli import SwinlabCLI, compose_config
    base = ["--config", str(ROOT / "experiments" / "quickstart.yaml")]
    cfg = compose_config([*base, "--model.init_args.ema_decay", "0.99"])
    SwinlabCLI._monitor_ema(cfg)
    assert cfg.checkpoint.monitor == "val/acc1_ema" and "val/acc1_ema" in cfg.checkpoint.filename
    plain = compose_config(base)
    SwinlabCLI._monitor_ema(plain)
    assert plain.checkpoint.monitor == "val/acc1"
    raw = compose_config([*base, "--model.init_args.ema_decay", "0.99", "--export.ema", "false"])
    SwinlabCLI._monitor_ema(raw)
    assert raw.checkpoint.monitor == "val/acc1"
    mine = compose_config([*base, "--model.init_args.ema_decay", "0.99", "--checkpoint.monitor", "val/loss"])
    SwinlabCLI._monitor_ema(mine)
    assert mine.checkpoint.monitor == "val/loss"  # a monitor set by hand is kept


def test_the_entry_point_exits_with_the_commands_code(monkeypatch):
    """``run()`` exits normally (no private exit path) with ``main()``'s code; SystemExit from argparse or LightningCLI
    passes through with its code or message."""
    import swinlab.__main__ as entry
    for result, code in ((0, 0), (2, 2), (SystemExit(None), None), (SystemExit(2), 2),
                         (SystemExit("a message for the user"), "a message for the user")):
        def fake_main(result=result):
            if isinstance(result, SystemExit):
                raise result
            return result
        monkeypatch.setattr(entry, "main", fake_main)
        with pytest.raises(SystemExit) as done:
            entry.run()
        assert done.value.code == code


@pytest.mark.parametrize("task, lrs", [
    ("ImageClassifier", (5e-4, 5e-7, 5e-6, 20.0)),  # Swin's ImageNet recipe
    ("MaskedImageModeling", (2e-4, 1e-6, 1e-5, 10.0)),  # SimMIM's
])
def test_every_task_shows_the_whole_recipe_with_its_papers_defaults(task, lrs):
    """The recipe settings both papers share are declared once (``SwinTask.__init__``) and reach a task through
    ``**recipe``: the CLI must still list them under ``model.init_args`` with their defaults (jsonargparse follows
    ``**recipe`` to the base signature), so a YAML can set them; each task keeps its own paper's LRs and warmup."""
    from swinlab.training.cli import compose_config
    cfg = compose_config(["--model", f"swinlab.tasks.{task}", "--data", "swinlab.data.SyntheticDataModule",
                          "--model.init_args.weight_decay", "0.1"])
    args = cfg.model.init_args
    assert (args.base_lr, args.warmup_lr, args.min_lr, args.warmup_epochs) == lrs
    assert (args.scale_lr, args.warmup_steps, args.weight_decay, tuple(args.betas), args.eps) == (
        True, None, 0.1, (0.9, 0.999), 1e-8)
