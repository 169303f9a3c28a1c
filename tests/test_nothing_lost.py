"""Nothing already written is replaced, and every failure to write or read is one line (docs/troubleshooting.md):

- never replace, only add: every folder a run writes to is its own (claimed with ``os.mkdir``); an explicit logger
  version, a ``checkpoint.dirpath`` or (logger off) ``default_root_dir/checkpoints`` that exists is refused;
- a full disk (a real tmpfs mounted by the test: root only, as in CI) and places that cannot be written (a read-only
  filesystem, a parent that is a file) end in one line naming the path, earlier files intact;
- command-line values get the types YAML gives them, and the same pre-flight checks;
- the remaining tracebacks (logger off, weights-only ``--ckpt_path``, checkpoint folders, an unreachable Hub) are one
  line.

Refusals that happen before anything is built run in-process through ``python -m swinlab``'s entry point; each class
also runs as a real ``python -m swinlab`` subprocess."""
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from helpers import ROOT
from test_bad_inputs import PICO, TINY, _lightning_ckpt, _snapshot, refused, swinlab

FS_SIZE = "12m"  # one last.ckpt of the tiny model (7.4 MB with its optimizer state) fits, a second copy does not


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return "tiny.yaml"


def run_swinlab(argv, cwd, env=None, timeout=300):
    """``python -m swinlab <argv>`` as users run it (the checkout first on PYTHONPATH): (exit code, stderr, seconds)."""
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    full = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path), **(env or {}))
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "swinlab", *argv], cwd=cwd, env=full, capture_output=True, text=True,
                         timeout=timeout)
    return res.returncode, res.stderr, time.monotonic() - start


def start_swinlab(argv, cwd):
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    return subprocess.Popen([sys.executable, "-m", "swinlab", *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


# -- a real small filesystem ----------------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of FS_SIZE mounted at tmp_path/fs for this test (unmounted after it). Mounting needs root: skipped
    otherwise, with the reason (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mounted by the test, which needs root (CI runs as root)")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()[:200]})")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(fs, leave: int) -> None:
    """Fill the filesystem at ``fs`` until ``leave`` bytes are free."""
    free = shutil.disk_usage(fs).free
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    assert shutil.disk_usage(fs).free <= leave


def read_only(fs) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)


def no_temporaries(root) -> None:
    left = [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]
    assert not left, left


# == never replace, only add ===========================================================================================

def test_shipped_configs_pin_no_logger_version():
    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        logger = (cfg.get("trainer") or {}).get("logger")
        init = (logger or {}).get("init_args") or {} if isinstance(logger, dict) else {}
        assert init.get("version") is None, f"{path.name} pins trainer.logger.init_args.version"


@pytest.fixture
def previous(cfg, tmp_path):
    """A finished run's folder runs/tiny/version_0 (config, hparams, events, last.ckpt, best.safetensors); returns a
    check that nothing under runs/ changed and no folder appeared."""
    run = tmp_path / "runs" / "tiny" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(TINY))
    (run / "hparams.yaml").write_text(f"model_name: {PICO}\nnum_classes: 10\n")
    (run / "events.out.tfevents.1.host.1.0").write_bytes(b"\x00\x01events" * 8)
    (run / "best.safetensors").write_bytes(b"the earlier run's weights")
    _lightning_ckpt(run / "checkpoints" / "last.ckpt")
    before = _snapshot(tmp_path / "runs")
    return lambda: _snapshot(tmp_path / "runs") == before


@pytest.mark.parametrize("command, args, words", [
    ("fit", ["--trainer.logger.init_args.version", "0"],
     ["runs/tiny/version_0 already exists", "--ckpt_path runs/tiny/version_0/checkpoints/last.ckpt", "version_1"]),
    ("fit", ["--trainer.logger.init_args.version", "version_0"], ["runs/tiny/version_0 already exists"]),
    ("validate", ["--trainer.logger.init_args.version", "0"], ["runs/tiny/version_0 already exists", "version_1"]),
    ("predict", ["--trainer.logger.init_args.version", "0", "--allow_random_weights"],
     ["runs/tiny/version_0 already exists", "runs/tiny/version_1"]),
    ("fit", ["--checkpoint.dirpath", "runs/tiny/version_0/checkpoints"],
     ["runs/tiny/version_0/checkpoints already exists (checkpoint.dirpath)"]),
])
def test_a_new_run_never_writes_into_an_existing_folder(previous, capsys, command, args, words):
    refused(*swinlab([command, "--config", "tiny.yaml", *args], capsys), "never writes into another run's folder",
            *words)
    assert previous()


def test_the_logger_turned_off_trains_and_a_second_run_is_refused(cfg, capsys, tmp_path):
    rc, err = swinlab(["fit", "--config", cfg, "--trainer.logger", "false"], capsys)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "best.safetensors").is_file()
    refused(*swinlab(["fit", "--config", cfg, "--trainer.logger", "false"], capsys),
            "best.safetensors exists", "--trainer.default_root_dir")
    (tmp_path / "best.safetensors").rename(tmp_path / "kept.safetensors")
    before = _snapshot(tmp_path)
    refused(*swinlab(["fit", "--config", cfg, "--trainer.logger", "false"], capsys),
            "checkpoints already exists (trainer.default_root_dir)", "never writes into another run's folder")
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_runs_started_at_the_same_moment_never_share_a_folder(cfg, tmp_path):
    """Four ``python -m swinlab fit`` at once: two with the same explicit version (one trains, the other is refused
    in one line), two without one (version_0 and version_1, each with its own files)."""
    pinned = ["--trainer.logger.init_args.version", "pinned"]
    procs = [start_swinlab(["fit", "--config", cfg, *extra], tmp_path) for extra in (pinned, pinned, [], [])]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    (rc_a, err_a), (rc_b, err_b) = results[:2]
    assert sorted([rc_a, rc_b]) == [0, 2], (err_a[-2000:], err_b[-2000:])
    refused(2, err_a if rc_a else err_b, "runs/tiny/pinned already exists", "--ckpt_path")
    assert all(rc == 0 for rc, _ in results[2:]), [e[-2000:] for _, e in results[2:]]
    root = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in root.iterdir()) == ["pinned", "version_0", "version_1"]
    for run in root.iterdir():
        assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.yaml"]
        assert len(list(run.glob("events.out.tfevents.*"))) == 1 and (run / "best.safetensors").is_file()


def test_convert_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    from swinlab.errors import ConfigError
    from swinlab.tools.convert import publish
    out, tmp = tmp_path / "w.safetensors", tmp_path / ".w.tmp"
    out.write_bytes(b"written by another convert")
    tmp.write_bytes(b"this one")
    with pytest.raises(ConfigError, match="appeared while converting .* it was kept"):
        publish(tmp, out, overwrite=False)
    assert out.read_bytes() == b"written by another convert"


# == full disks and places that cannot be written =====================================================================

@pytest.mark.slow
def test_full_disk_during_a_checkpoint_save(cfg, small_fs, capsys):
    """torch's writer reports a full disk as a RuntimeError: still one line naming last.ckpt, the previous one
    byte-identical, no temporary file left."""
    args = ["fit", "--config", cfg, "--trainer.logger.init_args.save_dir", str(small_fs / "runs"),
            "--checkpoint.save_top_k", "0", "--export.enabled", "false"]
    rc, err = swinlab(args, capsys)
    assert rc == 0, err[-3000:]
    last = small_fs / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    rc, err, _ = run_swinlab([*args, "--ckpt_path", "last", "--trainer.max_epochs", "2"], small_fs.parent)
    refused(rc, err, f"could not write checkpoint {last}", "No space left on device",
            "the previous checkpoint is intact", "--ckpt_path last")
    assert last.read_bytes() == before
    no_temporaries(small_fs)


def test_full_disk_while_writing_predictions_and_safetensors(cfg, small_fs, capsys, tmp_path):
    """predictions.csv (predict) and best.safetensors (fit's export) on a disk with 20 KiB / 64 KiB left: one line
    naming the file; an earlier file on that disk is intact, nothing half-written is left."""
    (small_fs / "earlier.txt").write_text("earlier\n")
    fill(small_fs, 20 << 10)
    rc, err = swinlab(["predict", "--config", cfg, "--trainer.logger.init_args.save_dir", str(small_fs / "runs"),
                       "--allow_random_weights"], capsys)
    refused(rc, err, "could not write predictions", "predictions.csv", "No space left on device")
    (small_fs / "filler").unlink()
    fill(small_fs, 64 << 10)
    rc, err = swinlab(["fit", "--config", cfg, "--trainer.logger.init_args.save_dir", str(small_fs / "runs"),
                       "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false"], capsys)
    refused(rc, err, "best.safetensors", "No space left on device")
    assert (small_fs / "earlier.txt").read_text() == "earlier\n"
    assert not list(small_fs.rglob("predictions*.csv")) and not list(small_fs.rglob("best*.safetensors"))
    no_temporaries(small_fs)


def test_full_disk_while_a_run_writes_its_config_and_logs(cfg, small_fs, capsys):
    """A disk with 8 KiB left: the run's config, hparams.yaml or TensorBoard file cannot be written: one line naming
    the run folder, and the run's partial folder is removed (it had not started)."""
    fill(small_fs, 8 << 10)
    refused(*swinlab(["fit", "--config", cfg, "--trainer.logger.init_args.save_dir", str(small_fs / "runs")], capsys),
            f"could not write {small_fs / 'runs' / 'tiny' / 'version_0'}", "No space left on device")
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"] or not list((small_fs / "runs").rglob("*.yaml"))


@pytest.mark.parametrize("subprocess_too", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_full_disk_through_python_m_swinlab_convert(small_fs, tmp_path, capsys, monkeypatch, subprocess_too):
    """convert on a full disk, each format: one line naming --out before anything is written (torch.export's writer
    would abort the process), the earlier file intact."""
    from swinlab.models import create_model, save_safetensors
    save_safetensors(create_model(PICO, img_size=16, num_classes=10), tmp_path / "w.safetensors")
    (small_fs / "earlier.safetensors").write_bytes(b"earlier")
    fill(small_fs, 64 << 10)
    convert = ["convert", "w.safetensors", "--model", PICO, "--img-size", "16", "--out"]
    if subprocess_too:
        rc, err, _ = run_swinlab([*convert, str(small_fs / "x.pt2"), "--format", "torch_export"], tmp_path)
        refused(rc, err, f"could not write {small_fs / 'x.pt2'}", "MiB free")
    monkeypatch.chdir(tmp_path)
    for out, fmt in (("x.safetensors", "safetensors"), ("x.pt2", "torch_export")):
        refused(*swinlab([*convert, str(small_fs / out), "--format", fmt], capsys), f"could not write {small_fs}",
                "MiB free")
    assert (small_fs / "earlier.safetensors").read_bytes() == b"earlier"
    assert sorted(p.name for p in small_fs.iterdir()) == ["earlier.safetensors", "filler"]


def _places(fs, tmp_path):
    """(read-only folder, a path under a file) for the commands below."""
    (tmp_path / "a_file").write_text("not a folder")
    return {"read-only": (fs / "ro", "read-only filesystem"), "file": (tmp_path / "a_file" / "sub", "is a file")}


@pytest.mark.parametrize("where", ["read-only", "file"])
def test_every_command_that_writes_names_a_place_it_cannot_write(cfg, small_fs, capsys, tmp_path, where):
    from test_bad_inputs import _study

    from swinlab.models import create_model, save_safetensors
    save_safetensors(create_model(PICO, img_size=16, num_classes=10), tmp_path / "w.safetensors")
    study = _study(tmp_path)
    place, words = _places(small_fs, tmp_path)[where]
    if where == "read-only":
        read_only(small_fs)
    logs = ["--trainer.logger.init_args.save_dir", str(place)]
    commands = [
        ["fit", "--config", cfg, *logs],
        ["validate", "--config", cfg, *logs],
        ["predict", "--config", cfg, *logs, "--allow_random_weights"],
        ["fit", "--config", cfg, "--trainer.logger", "false", "--trainer.default_root_dir", str(place)],
        ["convert", "w.safetensors", "--model", PICO, "--img-size", "16", "--out", str(place / "x.safetensors")],
        ["convert", "w.safetensors", "--model", PICO, "--img-size", "16", "--format", "torch_export",
         "--out", str(place / "x.pt2")],
        ["ablate", "--config", study, "--out", str(place / "study")],
    ]
    before = _snapshot(tmp_path)
    for argv in commands:
        refused(*swinlab(argv, capsys), str(place).split("/sub")[0], words)
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_an_unwritable_log_folder_through_python_m_swinlab(cfg, small_fs, tmp_path):
    read_only(small_fs)
    refused(*run_swinlab(["fit", "--config", cfg, "--trainer.logger.init_args.save_dir", str(small_fs / "runs")],
                         tmp_path)[:2], f"cannot create {small_fs / 'runs' / 'tiny'}", "read-only filesystem",
            "trainer.logger.init_args.save_dir")


# == the command line is checked like a config file ===================================================================

@pytest.mark.parametrize("key, raw, expected", [
    ("trainer.limit_val_batches", "1", 1), ("trainer.limit_val_batches", "1.0", 1.0),
    ("trainer.limit_train_batches", "0.25", 0.25), ("trainer.limit_predict_batches", "3", 3),
    ("trainer.overfit_batches", "2", 2), ("trainer.devices", "2", 2), ("trainer.devices", "auto", "auto"),
    ("trainer.devices", "[0, 1]", [0, 1]),
])
def test_command_line_values_get_the_types_yaml_gives_them(tmp_path, key, raw, expected):
    from swinlab.training.cli import compose_config
    section, name = key.split(".")
    (tmp_path / "over.yaml").write_text(f"{section}:\n  {name}: {raw}\n")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    base = ["--config", str(tmp_path / "tiny.yaml")]
    from_cli = compose_config([*base, f"--{key}", raw]).get(key)
    from_yaml = compose_config([*base, "--config", str(tmp_path / "over.yaml")]).get(key)
    assert from_cli == from_yaml == expected and type(from_cli) is type(from_yaml) is type(expected)


def test_limit_batches_1_is_one_batch_and_a_bare_flag_is_accepted(cfg, capsys, tmp_path):
    rc, err = swinlab(["predict", "--config", cfg, "--allow_random_weights", "--trainer.limit_predict_batches", "1"],
                      capsys)
    assert rc == 0, err[-3000:]
    rows = (tmp_path / "runs" / "tiny" / "version_0" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + TINY["data"]["init_args"]["batch_size"]  # the header and one batch


MESH = ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.init_args.tensor_parallel_size", "1", "--trainer.strategy.init_args.data_parallel_size",
        "3"]


def test_a_mesh_that_cannot_fit_is_refused_from_the_command_line_as_from_yaml(cfg, capsys, tmp_path):
    (tmp_path / "two.yaml").write_text("trainer: {devices: 2}\n")
    words = ["data_parallel_size=3", "devices x num_nodes = 2"]
    refused(*swinlab(["fit", "--config", cfg, "--config", "two.yaml", *MESH], capsys), *words)
    refused(*swinlab(["fit", "--config", cfg, *MESH, "--trainer.devices", "2"], capsys), *words)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_mesh_from_the_command_line_through_python_m_swinlab(cfg, tmp_path):
    refused(*run_swinlab(["fit", "--config", cfg, *MESH, "--trainer.devices", "2"], tmp_path)[:2],
            "data_parallel_size=3", "devices x num_nodes = 2")
    assert not (tmp_path / "runs").exists()


# == remaining tracebacks =============================================================================================

def _weights_only(path):
    from swinlab.tasks import ImageClassifier
    torch.save(ImageClassifier(model_name=PICO, num_classes=10, model_kwargs={"img_size": 16}).state_dict(), path)


def _distributed_checkpoint(path):
    import torch.distributed.checkpoint as dcp
    dcp.save({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, checkpoint_id=str(path), no_dist=True)


@pytest.mark.parametrize("command", ["fit", "predict"])
def test_checkpoints_that_are_not_a_run_are_one_line(previous, capsys, tmp_path, command):
    _weights_only(tmp_path / "weights.pth")
    _distributed_checkpoint(tmp_path / "dcp.ckpt")
    (tmp_path / "empty.ckpt").mkdir()
    for ckpt, words in (("weights.pth", ["weights.pth holds weights only", "--model.init_args.checkpoint"]),
                        ("dcp.ckpt", ["dcp.ckpt is an FSDP2 distributed checkpoint", "trainer.strategy is auto"]),
                        ("empty.ckpt", ["empty.ckpt is a folder but not a checkpoint folder"])):
        refused(*swinlab([command, "--config", "tiny.yaml", "--ckpt_path", ckpt], capsys), *words)
    assert previous()


@pytest.mark.slow
def test_an_incomplete_checkpoint_folder_under_its_strategy_is_one_line(cfg, tmp_path):
    """A distributed checkpoint whose .metadata lacks what Lightning's ModelParallelStrategy reads, resumed by that
    strategy (one CPU process): one line, not the strategy's traceback."""
    _distributed_checkpoint(tmp_path / "partial.ckpt")
    (tmp_path / "mp.yaml").write_text(yaml.safe_dump({"trainer": {"devices": 1, "strategy": {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1}}}}))
    rc, err, _ = run_swinlab(["fit", "--config", cfg, "--config", "mp.yaml", "--ckpt_path", "partial.ckpt"],
                             tmp_path)
    refused(rc, err, "cannot resume from checkpoint folder partial.ckpt", "incomplete")


@pytest.mark.slow
def test_an_unreachable_hub_is_asked_once_and_is_one_line(tmp_path):
    """The Hub at an address that accepts connections and never answers (HF_ENDPOINT), a 2 s HF_HUB_ETAG_TIMEOUT and
    an empty cache: one request for the weights, then one line naming the repo, the cache and the Hub
    (hf_hub_download alone retries each file six times with back-off: over a minute)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []

    def accept():
        while True:
            try:
                conn = server.accept()[0]
                conn.settimeout(5)
                held.append((conn, conn.recv(200).split(b"\r\n")[0].decode()))  # kept open, never answered
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HUB_ETAG_TIMEOUT": "2",
               "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        rc, err, seconds = run_swinlab(["convert", "hf-hub:timm/swinv2_tiny_window8_256.ms_in1k", "--model",
                                        "swinv2_tiny_window8_256", "--out", "x.safetensors"], tmp_path, env)
    finally:
        server.close()
        for conn, _ in held:
            conn.close()
    refused(rc, err, "hf-hub:timm/swinv2_tiny_window8_256.ms_in1k weights are not in the Hugging Face cache",
            str(tmp_path / "hf"), "could not be reached", "Timeout")
    asked = [line for _, line in held if "/timm/swinv2_tiny_window8_256.ms_in1k/" in line]
    assert len(asked) == 1 and asked[0].startswith("HEAD ") and "Retrying" not in err, (held, seconds, err[-2000:])
