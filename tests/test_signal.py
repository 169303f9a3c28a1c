"""The signal-propagation instrument (SignalProbe, SignalMonitor) and the study in docs/results/signal_propagation."""
import csv
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, randomize_

from swinlab.models import create_model
from swinlab.training.signal_monitor import SignalProbe, spread

PICO = "swinv2_pico_patch2_window4_32"
RESULTS = ROOT / "docs" / "results" / "signal_propagation"


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("norm, attention", [("pre", "dot"), ("res_post", "cosine")])
def test_probe_reads_the_residual_stream_after_every_block(norm, attention):
    torch.manual_seed(0)
    model = randomize_(create_model(PICO, img_size=16, num_classes=3, norm_placement=norm, attention=attention))
    x = torch.randn(4, 3, 16, 16)
    found = SignalProbe(model).measure(x)
    expect_rms, expect_max = [], []
    with torch.no_grad():  # the stream, block by block, through the model's own modules
        h = model.eval().patch_embed(x)
        for stage in model.layers:
            h = stage.downsample(h)
            for blk in stage.blocks:
                h = blk(h)
                expect_rms.append(float(h.pow(2).mean().sqrt()))
                expect_max.append(float(h.abs().max()))
    assert found["rms"] == pytest.approx(expect_rms, rel=1e-5)
    assert found["max_abs"] == pytest.approx(expect_max, rel=1e-6)
    assert len(found["attn_logit_range"]) == 4 and all(v > 0 for v in found["attn_logit_range"])
    assert not model._forward_hooks and not any(b._forward_hooks for b in model.blocks())  # hooks removed
    assert spread(found["rms"]) == pytest.approx(max(expect_rms) / min(expect_rms), rel=1e-5)


@pytest.mark.parametrize("attention", ["dot", "cosine"])
def test_attention_logits_are_what_the_softmax_of_the_forward_takes(attention):
    torch.manual_seed(0)
    model = randomize_(create_model(PICO, img_size=16, num_classes=3, attention=attention)).eval()
    attn = model.layers[0].blocks[1].attn  # shifted: the mask is part of the logits
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, args: seen.append(args))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    handle.remove()
    x, mask = seen[0]
    with torch.no_grad():
        logits = attn.attention_logits(x, mask)
        torch.testing.assert_close(logits.softmax(-1), attn.attention_probs(x, mask))
        if attention == "cosine":  # |cos| <= 1 times the clamped scale, plus 16 * sigmoid(...) of the CPB
            unmasked = attn.attention_logits(x)
            bound = attn.logit_scale.clamp(max=math.log(100)).exp().max() + 16
            assert unmasked.abs().max() <= bound


def _reduce_worker(rank, world, port, out):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    model = create_model(PICO, img_size=16, num_classes=3)
    probe = SignalProbe(model)
    # rank r read block i as a tensor of (r + 1) * (i + 1) ones, over (r + 1) elements, with its largest entry 10 r
    for i in range(len(probe.names)):
        v = float((rank + 1) * (i + 1))
        probe._stats[i] = (torch.tensor(v * v * (rank + 1), dtype=torch.float64), rank + 1, torch.tensor(10.0 * rank))
    found = probe.collect()
    torch.save(found, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_collect_is_the_global_batchs_rms_and_max_over_ranks(tmp_path):
    from helpers import free_ports
    torch.multiprocessing.spawn(_reduce_worker, args=(2, free_ports(1)[0], str(tmp_path)), nprocs=2)
    for rank in range(2):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        for i, (rms, peak) in enumerate(zip(found["rms"].tolist(), found["max_abs"].tolist())):
            # sums of squares over both ranks over their element counts: (1 * a^2 + 2 * (2a)^2) / 3, a = i + 1
            assert rms == pytest.approx(math.sqrt((i + 1) ** 2 * 9 / 3))
            assert peak == 10.0


def test_a_quickstart_run_logs_each_blocks_amplitude_and_the_figure(tmp_path):
    """`python -m swinlab fit` with the quickstart config, shortened: one signal/rms and one signal/max_abs tag per
    block, the Figure 2 image and the per-stage logit ranges, read back as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cmd = [sys.executable, "-m", "swinlab", "fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"),
           "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
           "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
           "--attention_images.enabled", "false", "--export.enabled", "false"]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ea = EventAccumulator(str(tmp_path / "runs" / "quickstart" / "version_0"), size_guidance={"scalars": 0,
                                                                                            "images": 0})
    ea.Reload()
    model = create_model(PICO)
    names = [f"s{i}b{j}" for i, stage in enumerate(model.layers) for j in range(len(stage.blocks))]
    scalars = set(ea.Tags()["scalars"])
    assert {t for t in scalars if t.startswith("signal/rms/")} == {f"signal/rms/{n}" for n in names}
    assert {t for t in scalars if t.startswith("signal/max_abs/")} == {f"signal/max_abs/{n}" for n in names}
    assert {f"signal/attn_logit_range/stage{i}" for i in range(4)} <= scalars
    first = [ea.Scalars(f"signal/rms/{n}")[0] for n in names]
    assert all(e.step == 0 for e in first)
    # step 0 is the initial weights: res-post-norm's branch norms start at zero, so every block passes on the
    # LayerNorm-ed embedding (or merged tokens) unchanged, RMS 1
    assert [e.value for e in first] == pytest.approx([1.0] * len(names), abs=1e-3)
    for step in range(3):
        rms = [ea.Scalars(f"signal/rms/{n}")[step].value for n in names]
        peak = [ea.Scalars(f"signal/max_abs/{n}")[step].value for n in names]
        assert all(p >= r for p, r in zip(peak, rms))
        assert ea.Scalars("signal/rms_spread")[step].value == pytest.approx(max(rms) / min(rms), rel=1e-5)
    image = ea.Images("signal/amplitude")[-1]
    assert image.step == 3 and image.width >= 500 and image.height >= 250


def _committed_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_one_unit_of_the_committed_study_regenerates(tmp_path):
    """Reruns depth / T / pre_dot / seed 0 with the shipped study and compares with the committed rows."""
    cmd = [sys.executable, "-m", "swinlab", "signal", "--sections", "depth", "--sizes", "T", "--variants", "pre_dot",
           "--seeds", "0", "--out", str(tmp_path / "out")]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = _committed_rows(tmp_path / "out" / "results.csv")
    committed = {(r["phase"]): r for r in _committed_rows(RESULTS / "results.csv")
                 if (r["section"], r["size"], r["variant"], r["seed"]) == ("depth", "T", "pre_dot", "0")}
    assert [r["phase"] for r in fresh] == ["init", "trained"] and set(committed) == {"init", "trained"}
    for row in fresh:
        want = committed[row["phase"]]
        for field in ("spread", "max_rms", "logit_range"):
            assert float(row[field]) == pytest.approx(float(want[field]), rel=1e-3), (row["phase"], field)
        assert [float(v) for v in row["rms"].split()] == pytest.approx([float(v) for v in want["rms"].split()],
                                                                       rel=1e-3)
    assert float(fresh[1]["loss"]) == pytest.approx(float(committed["trained"]["loss"]), rel=1e-3)


def test_docs_show_the_committed_study_as_the_runner_writes_it():
    import json

    from swinlab.tools.signal_study import read_csv, report
    prov = json.loads((RESULTS / "provenance.json").read_text())
    text = report(read_csv(RESULTS / "results.csv"), read_csv(RESULTS / "results_steps.csv"), prov)
    assert (RESULTS / "results.md").read_text() == text
    page = (ROOT / "docs" / "ablations.md").read_text()
    block = re.search(r"<!-- results: signal_propagation -->\n(.*?)<!-- end results: signal_propagation -->", page,
                      re.S)
    assert block is not None and block.group(1) == text


def test_cost_command_times_the_instrument(capsys):
    from swinlab.tools.signal_study import main
    assert main(["--cost", "--model", PICO, "--img-size", "16", "--batch-size", "8", "--steps", "2", "--every", "10",
                 "--threads", "1"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {PICO}")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[4] == "8"  # blocks
    hooks_us, armed_us, direct = float(cells[9]), float(cells[10]), float(cells[11].rstrip("%"))
    assert 0 <= hooks_us < armed_us and 0 < direct < 100  # a logging step reads 8 block outputs: more than hook calls
