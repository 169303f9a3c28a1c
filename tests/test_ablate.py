"""`python -m swinlab ablate`: a tiny study end to end, transfer from the trained weights, early errors."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT

from swinlab.errors import ConfigError
from swinlab.models import create_model, read_checkpoint
from swinlab.tools.ablate import CSV_FIELDS, check_study, fit_config, load_study, make_data, transfer

TINY = {
    "study": "tiny",
    "seeds": [0],
    "model": {"model_name": "swin_pico_patch2_window4_32", "num_classes": 10, "base_lr": 1.6e-2,
              "warmup_steps": 1, "mixup": 0.0, "cutmix": 0.0},
    "data": {"class_path": "swinlab.data.DigitsDataModule",
             "init_args": {"batch_size": 32, "max_shift": 0, "val_fraction": 0.1}},
    "train": {"img_size": 32, "window_size": 4, "trainer": {"max_steps": 4}},
    "eval": [{"img_size": 32, "window_size": 8}, {"img_size": 32, "window_size": 16}],
    "finetune": {"trainer": {"max_steps": 2}, "model": {"base_lr": 1e-3, "warmup_steps": 0}},
    "variants": {"table": {"position_bias": "table"}, "log_cpb": {"position_bias": "cpb_log"}},
    "baseline": "table",
}


def _checkout_env():
    """The subprocess runs the checkout's swinlab (PYTHONPATH=repo root), not whatever swinlab is installed."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join([str(ROOT)] + extra))


def write_study(tmp_path, study):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_evaluation_after_transfer_uses_the_trained_weights(tmp_path):
    trained = create_model("swin_pico_patch2_window4_32", num_classes=10)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    from swinlab.models import save_safetensors
    path = save_safetensors(trained, tmp_path / "w.safetensors", "swin_pico_patch2_window4_32")
    moved = transfer(str(path), "swin_pico_patch2_window4_32", [32, 32], [8, 8])
    fresh = create_model("swin_pico_patch2_window4_32", num_classes=10, window_size=8)
    sd, _ = read_checkpoint(path)
    for k, v in moved.state_dict().items():
        if "relative_position_bias_table" in k:
            assert v.shape[0] == 15 * 15 or v.shape == sd[k].shape  # stage 1 and 2 tables grew to W8
        else:
            assert torch.equal(v, sd[k]), k
            if v.numel() > 1 and "norm" not in k:
                assert not torch.equal(v, fresh.state_dict()[k]), k  # not a re-initialised model


def test_a_window_that_cannot_fit_fails_before_any_training(tmp_path, capsys):
    """Through the entry point of ``python -m swinlab`` (in-process here; test_bad_inputs.py starts ``ablate`` as a
    real subprocess for its CLI class)."""
    from swinlab.__main__ import main as swinlab_main
    bad = dict(TINY, eval=[{"img_size": 32, "window_size": 5}])
    with pytest.raises(ConfigError, match="window 5x5 cannot tile the 16x16 token grid"):
        load_study(str(write_study(tmp_path, bad)))
    capsys.readouterr()
    rc = swinlab_main(["ablate", "--config", str(write_study(tmp_path, bad)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().startswith("error: eval #1: window 5x5 cannot tile"), err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="not divisible by the patch size 2"):
        load_study(str(write_study(tmp_path, dict(TINY, eval=[{"img_size": 33, "window_size": 4}]))))
    with pytest.raises(ConfigError, match="has no 'variants:' section"):
        load_study(str(write_study(tmp_path, {k: v for k, v in TINY.items() if k != "variants"})))


def test_shipped_studies_are_valid():
    for name in ("pos_bias_transfer", "norm_attn", "pos_bias_transfer_imagenet", "norm_attn_imagenet"):
        study = load_study(str(ROOT / "experiments" / "ablations" / f"{name}.yaml"))
        check_study(study)  # every evaluation window tiles its token grid
        if name.startswith("pos_bias"):  # the paper's Table 1 rows: parameterised table, linear and log CPB
            assert sorted(study.variant(v).model_kwargs["position_bias"] for v in study.variant_names) == [
                "cpb_linear", "cpb_log", "table"]
        else:  # Table 6: pre-norm/dot, +res-post-norm, +res-post-norm+scaled cosine attention
            kwargs = [study.variant(v).model_kwargs for v in study.variant_names]
            assert sorted((k["norm_placement"], k["attention"]) for k in kwargs) == [
                ("pre", "dot"), ("res_post", "cosine"), ("res_post", "dot")]
        if not name.endswith("imagenet"):
            assert len(study.seeds) >= 3
        else:  # the paper's transfer sizes (window = size / 32)
            assert all(e.window_size * 32 == e.img_size for e in study.eval)


@pytest.mark.parametrize("change, words", [
    (lambda s: s["model"].update(base_lrr=1e-3), ["variant", "base_lrr", "not accepted", "fit --help"]),
    (lambda s: s["finetune"]["model"].update(warmup_stepz=0), ["(finetune)", "warmup_stepz"]),
    (lambda s: s["data"]["init_args"].update(batch_size="many"), ["batch_size", "many"]),
    (lambda s: s["train"]["trainer"].update(max_stepz=4), ["max_stepz"]),
    (lambda s: s.update(seedz=[1]), ["study config", "seedz", "class Study"]),
    (lambda s: s.update(seeds="zero"), ["study config", "seeds"]),
])
def test_a_bad_setting_is_named_in_one_line_before_any_training(tmp_path, change, words):
    """Each variant's settings go through fit's parser (the classes' signatures), the file through Study."""
    study = yaml.safe_load(yaml.safe_dump(TINY))
    change(study)
    with pytest.raises(ConfigError) as err:
        load_study(str(write_study(tmp_path, study)))
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_variant_settings_are_a_fit_config(tmp_path):
    """What a variant trains with, written as a training config's sections, parses with fit's own parser."""
    from swinlab.training.cli import build_parser
    study = load_study(str(write_study(tmp_path, TINY)))
    cfg = fit_config(study, "log_cpb", 32, 4)
    assert cfg["model"]["init_args"]["model_kwargs"] == {"position_bias": "cpb_log", "img_size": [32, 32],
                                                         "window_size": [4, 4]}
    parsed = build_parser("fit").parse_object(cfg)
    assert parsed.model.init_args.base_lr == TINY["model"]["base_lr"] and parsed.trainer.max_steps == 4
    ft = fit_config(study, "table", 32, 8, finetune=True)
    assert ft["model"]["init_args"]["base_lr"] == 1e-3 and ft["trainer"] == {"max_steps": 2}


def test_the_data_module_gets_the_run_seed_unless_the_study_fixes_one(tmp_path):
    study = load_study(str(write_study(tmp_path, TINY)))
    assert make_data(study, 32, 7).seed == 7  # DigitsDataModule takes a seed: the run's
    fixed = load_study(str(write_study(tmp_path, {**TINY, "data": {**TINY["data"], "init_args": {
        **TINY["data"]["init_args"], "seed": 3}}})))
    assert make_data(fixed, 32, 7).seed == 3


# -- how sure a study is: the intervals and verdicts the runner writes ------------------------------------------------

def test_bootstrap_of_identical_scores_has_no_spread():
    from swinlab.tools.study_stats import bootstrap
    iv = bootstrap(torch.ones(3, 50))
    assert (iv.mean, iv.se, iv.low, iv.high) == (100.0, 0.0, 100.0, 100.0)
    iv = bootstrap(-torch.ones(2, 40))
    assert iv.mean == -100.0 and iv.z == -float("inf")


def test_bootstrap_over_images_matches_the_binomial_standard_error():
    """One seed: resampling images gives the binomial SE sqrt(p(1-p)/n) (written out here, not swinlab's)."""
    from swinlab.tools.study_stats import bootstrap
    n, right = 400, 320
    scores = torch.zeros(1, n)
    scores[0, :right] = 1
    iv = bootstrap(scores)
    p = right / n
    assert iv.mean == pytest.approx(80.0)
    assert iv.se == pytest.approx(100 * math.sqrt(p * (1 - p) / n), rel=0.08)
    assert iv.low == pytest.approx(80 - 1.96 * iv.se, abs=0.6) and iv.high == pytest.approx(80 + 1.96 * iv.se, abs=0.6)


def test_bootstrap_resamples_seeds_as_well_as_images():
    """Two seeds far apart (90% and 50%): the interval must carry the between-seed spread, about sqrt(var_seeds / 2)
    = 14 points, not only the images' (about 1.3 points)."""
    from swinlab.tools.study_stats import bootstrap
    scores = torch.zeros(2, 500)
    scores[0, :450] = 1
    scores[1, :250] = 1
    iv = bootstrap(scores)
    between = math.sqrt(((0.9 - 0.7) ** 2 + (0.5 - 0.7) ** 2) / 2 / 2) * 100
    within = math.sqrt((0.9 * 0.1 + 0.5 * 0.5) / 2 / 2 / 500) * 100
    assert iv.mean == pytest.approx(70.0)
    assert iv.se == pytest.approx(math.sqrt(between ** 2 + within ** 2), rel=0.1)


@pytest.mark.parametrize("low, high, expect, verdict", [
    (0.5, 2.0, "better", "reproduced"), (-2.0, -0.5, "better", "contradicted"), (-0.5, 2.0, "better",
                                                                                  "not resolved at this power"),
    (-2.0, -0.5, "worse", "reproduced"), (0.5, 2.0, "worse", "contradicted"), (0.0, 2.0, "better",
                                                                              "not resolved at this power"),
])
def test_a_verdict_needs_the_whole_interval_on_one_side(low, high, expect, verdict):
    from swinlab.tools.study_stats import Interval
    from swinlab.tools.study_stats import verdict as judge
    assert judge(Interval(mean=(low + high) / 2, se=0.5, low=low, high=high), expect) == verdict


def _rows(variant, seed, bits_by_cell):
    return [dict(study="s", variant=variant, seed=seed, train_img_size=32, train_window=4, eval_img_size=img,
                 eval_window=win, finetuned=ft, top1=100 * bits.count("1") / len(bits), top5=100.0, correct=bits)
            for (img, win, ft), bits in bits_by_cell.items()]


def test_results_md_has_intervals_paired_differences_and_the_runners_verdicts(tmp_path):
    """The baseline is right on 50 of 100 images at W8 and the variant on those 50 and 30 more (paired: +30 points);
    at the train window both are right on the same 90 images (+0). The claims' verdicts follow."""
    from swinlab.tools.ablate import read_rows, summarise, write_outputs
    w8_only = [{"img_size": 32, "window_size": 8}]
    study = load_study(str(write_study(tmp_path, {**TINY, "baseline": "table", "finetune": None, "eval": w8_only,
                                                  "claims": [
        {"claim": "log-CPB transfers better", "variant": "log_cpb", "baseline": "table", "img_size": 32,
         "window_size": 8},
        {"claim": "log-CPB is worse at the train window", "variant": "log_cpb", "expect": "worse"},
        {"claim": "log-CPB loses less moving to W8", "variant": "log_cpb", "img_size": 32, "window_size": 8,
         "measure": "transfer"}]})))
    train, w8 = (32, 4, False), (32, 8, False)
    rows = []
    for seed in (0, 1):
        rows += _rows("table", seed, {train: "1" * 90 + "0" * 10, w8: "1" * 50 + "0" * 50})
        rows += _rows("log_cpb", seed, {train: "1" * 90 + "0" * 10, w8: "1" * 80 + "0" * 20})
    md = summarise(study, rows)
    assert "| table | 90.0 [" in md and "| log_cpb | 90.0 [" in md
    assert "| log_cpb | +0.0 [+0.0, +0.0] (+0.0 SE) | +30.0 [" in md
    assert "| log-CPB transfers better | log_cpb > table at W8, I32 | +30.0 [" in md and "**reproduced**" in md
    assert "| log-CPB is worse at the train window | log_cpb < table at W4, I32 | +0.0 [+0.0, +0.0]" in md
    assert "**not resolved at this power**" in md
    # the change from the train window: table 90 -> 50 (-40), log_cpb 90 -> 80 (-10); their difference +30
    assert "| table | -40.0 [" in md and "| log_cpb | -10.0 [" in md
    assert "| log-CPB loses less moving to W8 | change 32/W4 → W8, I32: log_cpb > table | +30.0 [" in md
    out = tmp_path / "out"
    out.mkdir()
    write_outputs(study, rows, out, provenance={"commit": "abc", "versions": {"torch": "x"}, "python": "3",
                                                "command": "python -m swinlab ablate --config s.yaml", "date": "d",
                                                "cpus": 2, "jobs": 2, "threads": 1, "minutes": 1.5})
    assert read_rows(out) == rows  # the per-image strings survive the CSV round trip
    assert summarise(study, read_rows(out)) == summarise(study, rows)
    written = (out / "results.md").read_text()
    assert "Made by `python -m swinlab ablate --config s.yaml` at commit abc" in written
    (out / "results.md").write_text("stale")  # --report rewrites it from the rows, training nothing
    from swinlab.__main__ import main as swinlab_main
    assert swinlab_main(["ablate", "--config", str(tmp_path / "study.yaml"), "--report", str(out)]) == 0
    assert (out / "results.md").read_text() == written and not (out / "weights").exists()


def test_a_claim_about_a_cell_the_study_does_not_evaluate_is_refused(tmp_path):
    bad = {**TINY, "claims": [{"claim": "x", "variant": "log_cpb", "img_size": 32, "window_size": 12}]}
    with pytest.raises(ConfigError, match="img_size 32 / window 12, which the study does not evaluate"):
        load_study(str(write_study(tmp_path, bad)))
    with pytest.raises(ConfigError, match="names variant 'cosine', which is not one of the variants"):
        load_study(str(write_study(tmp_path, {**TINY, "claims": [{"claim": "x", "variant": "cosine"}]})))


@pytest.mark.parametrize("name, extra", [
    ("pos_bias_transfer_imagenet", ["--variants", "table", "log_cpb"]),  # both transfer paths, every size, fine-tunes
    ("norm_attn_imagenet", ["--variants", "post_cosine", "post_dot", "--finetune", "false"]),  # its own switches
])
def test_the_imagenet_study_runs_as_shipped_on_synthetic_data(tmp_path, name, extra):
    """The ImageNet studies' own files (sizes, windows, variants, fine-tune recipe, claims) through ``python -m swinlab
    ablate``, with only what a CPU cannot do swapped: synthetic images for ImageNet, one step per training on the CPU
    in fp32 on one device instead of 8 GPUs, and a narrow, one-block-per-stage SwinV2-T (same windows and position
    biases). A shipped study that cannot run (a size its windows cannot tile, a setting fit refuses) fails here."""
    from swinlab.__main__ import main as swinlab_main
    study = yaml.safe_load((ROOT / "experiments" / "ablations" / f"{name}.yaml").read_text())
    study["data"] = {"class_path": "swinlab.data.SyntheticDataModule",
                     "init_args": {"batch_size": 2, "train_samples": 2, "val_samples": 2, "num_classes": 1000}}
    study["model"]["model_kwargs"] = {**study["model"]["model_kwargs"], "embed_dim": 8, "depths": [1, 1, 1, 1],
                                      "num_heads": [1, 1, 1, 1]}
    cpu = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true", "max_steps": 1}
    for section in (study["train"], study["finetune"]):
        section["trainer"] = {**section["trainer"], **cpu}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    assert swinlab_main(["ablate", "--config", str(path), "--out", str(tmp_path / "out"), *extra]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    sizes = {(int(r["eval_img_size"]), int(r["eval_window"])) for r in rows}
    assert sizes == {(256, 8)} | {(e["img_size"], e["window_size"]) for e in study["eval"]}
    ran = sorted({r["variant"] for r in rows})
    assert len(rows) == len(ran) * (1 + (1 if "--finetune" in extra else 2) * len(study["eval"]))
    assert list(rows[0].keys()) == CSV_FIELDS
    for r in rows:
        assert math.isfinite(float(r["top1"])) and 0 <= float(r["top1"]) <= float(r["top5"]) <= 100
    out = tmp_path / "out"
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert sorted(p.name for p in (out / "tb").iterdir()) == ran  # one TensorBoard run per variant
    assert sorted(p.name for p in (out / "weights").iterdir()) == [f"{v}_seed0.safetensors" for v in ran]
    assert json.loads((out / "provenance.json").read_text())["command"].startswith("python -m swinlab ablate --config")
    md = (tmp_path / "out" / "results.md").read_text()
    for claim in study["claims"]:  # every claim about what ran is judged (any verdict: the data are noise)
        if claim["variant"] in ran and claim.get("baseline", study["baseline"]) in ran:
            assert f"| {claim['claim']} |" in md
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith(f"| {study['study']} |"))
    for variant in ran:  # the paper's cells line up with ours: all columns (Table 1), the train column (Table 6)
        row = next(line for line in lines if line.startswith(f"| {variant} (paper) |"))
        assert row.count("|") == (header.count("|") if name.startswith("pos_bias") else 3), (row, header)


# -- the committed quick-study results come from the current code ------------------------------------------------------

RESULTS = ROOT / "docs" / "results"


def test_one_unit_of_the_committed_quick_study_regenerates(tmp_path):
    """Reruns seed 0 of the V1-table variant of the committed position-bias study (its direct rows: no fine-tune)
    through ``python -m swinlab ablate`` (a real subprocess, as users start it) with the shipped study file, and
    compares with the committed rows: top-1 within 1 point and the same answer on at least 98% of the validation
    images. The run is deterministic on one machine (bit for bit); the tolerance is for another CPU's floating-point
    order. A change that moves the study's results fails here until the study is rerun and docs/results regenerated
    (docs/ablations.md)."""
    from swinlab.tools.ablate import read_rows
    committed = {(r["variant"], r["seed"], r["eval_img_size"], r["eval_window"], r["finetuned"]): r
                 for r in read_rows(RESULTS / "pos_bias_transfer")}
    res = subprocess.run([sys.executable, "-m", "swinlab", "ablate", "--config",
                          str(ROOT / "experiments" / "ablations" / "pos_bias_transfer.yaml"), "--variants", "table",
                          "--seeds", "0", "--finetune", "false", "--out", str(tmp_path / "again")],
                         cwd=tmp_path, capture_output=True, text=True, env=_checkout_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| table |" in res.stdout  # the summary is printed as well as written
    again = read_rows(tmp_path / "again")
    assert len(again) == 3  # the train window and the two larger ones, directly
    for row in again:
        old = committed[(row["variant"], row["seed"], row["eval_img_size"], row["eval_window"], row["finetuned"])]
        same = sum(a == b for a, b in zip(row["correct"], old["correct"])) / len(old["correct"])
        assert abs(row["top1"] - old["top1"]) <= 1.0 and same >= 0.98, (row["eval_window"], row["top1"], old["top1"],
                                                                        same)


QUICK_STUDIES = [
    "pos_bias_transfer", "pos_bias_power", "pos_bias_coupled", "norm_attn", "norm_attn_long", "norm_attn_wide",
]


@pytest.mark.parametrize("study", QUICK_STUDIES)
def test_docs_show_the_committed_results_as_the_runner_wrote_them(study):
    """docs/ablations.md carries each committed results.md verbatim (between its markers), and results.md is what
    the runner writes from the committed rows (intervals and verdicts recomputed here)."""
    from swinlab.tools.ablate import load_study, read_rows, summarise
    folder = RESULTS / study
    md = (folder / "results.md").read_text()
    prov = json.loads((folder / "provenance.json").read_text())
    spec = load_study(str(ROOT / "experiments" / "ablations" / f"{study}.yaml"))
    assert summarise(spec, read_rows(folder), prov) + "\n" == md
    doc = (ROOT / "docs" / "ablations.md").read_text()
    start, end = f"<!-- results: {study} -->\n", f"<!-- end results: {study} -->"
    assert start in doc and end in doc, f"docs/ablations.md has no markers for {study}"
    assert doc.split(start, 1)[1].split(end, 1)[0].strip() == md.strip()


@pytest.mark.parametrize("study", ["pos_bias_transfer_imagenet", "norm_attn_imagenet"])
def test_docs_show_the_imagenet_studies_cost_as_plan_computes_it(study):
    """docs/ablations.md's GPU-hour tables are what ``ablate --plan`` prints for the shipped study files (ImageNet-1K:
    1,281,167 training and 50,000 validation images), so they follow any change of the files or the FLOP count."""
    from swinlab.tools.ablate import format_plan, plan
    spec = load_study(str(ROOT / "experiments" / "ablations" / f"{study}.yaml"))
    doc = (ROOT / "docs" / "ablations.md").read_text()
    start, end = f"<!-- plan: {study} -->\n", f"<!-- end plan: {study} -->"
    assert doc.split(start, 1)[1].split(end, 1)[0].strip() == format_plan(plan(spec, 1281167, 50000)).strip()


def test_bootstrap_equals_resampling_the_images_by_index():
    """The runner draws each seed's resample as counts of each score (chained binomials); drawing random image indices
    and averaging, written out here, must give the same distribution: same SE and interval within Monte-Carlo noise,
    for paired differences (-1/0/1) over 6 seeds."""
    from swinlab.tools.study_stats import bootstrap
    g = torch.Generator().manual_seed(3)
    diff = (torch.rand(6, 300, generator=g) < 0.9).double() - (torch.rand(6, 300, generator=g) < 0.85).double()
    seeds = torch.randint(0, 6, (4000, 6), generator=g)
    images = torch.randint(0, 300, (4000, 6, 300), generator=g)
    ref = diff[seeds].gather(2, images).mean(dim=(1, 2)) * 100
    low, high = torch.quantile(ref, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    iv = bootstrap(diff)
    assert iv.mean == pytest.approx(float(diff.mean()) * 100)
    assert iv.se == pytest.approx(float(ref.std()), rel=0.06)
    assert iv.low == pytest.approx(low, abs=0.4) and iv.high == pytest.approx(high, abs=0.4)


@pytest.mark.parametrize("extra, words", [
    (["--jobs", "0"], "--jobs 0 must be >= 1"),
    (["--variants", "cosine"], "--variants cosine: not in study tiny (it has "),
    (["--report", "nowhere"], "--report nowhere: no results.csv and results_images.csv there"),
    (["--launcher", "slurm", "--poll", "0"], "--poll 0.0 must be > 0"),
])
def test_a_bad_ablate_option_is_one_line_and_nothing_is_written(tmp_path, capsys, extra, words):
    from swinlab.__main__ import main as swinlab_main
    path = write_study(tmp_path, TINY)
    capsys.readouterr()
    rc = swinlab_main(["ablate", "--config", str(path), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_the_plot_keeps_coupled_sizes_at_one_window_apart():
    """pos_bias_coupled evaluates window 3 at its train size (48 px) and on the 144-px canvas: the plot gives them
    separate points (a tick per image/window), each the mean over seeds of its own rows; a one-size study keeps the
    window as its x axis."""
    from swinlab.tools.ablate import plot_points, read_rows
    spec = load_study(str(ROOT / "experiments" / "ablations" / "pos_bias_coupled.yaml"))
    rows = read_rows(RESULTS / "pos_bias_coupled")
    labels, points = plot_points(spec, rows)
    assert labels == ["48/W3", "144/W3", "144/W9", "240/W15"]
    xs, ys, _ = points["table"]
    for k, (img, win) in enumerate([(48, 3), (144, 3), (144, 9), (240, 15)]):
        mine = [r["top1"] for r in rows
                if r["variant"] == "table" and (r["eval_img_size"], r["eval_window"]) == (img, win)]
        assert xs[k] == k and ys[k] == pytest.approx(sum(mine) / len(mine))
    assert ys[0] > 90 > 50 > ys[1]  # the trained window on the large canvas is not averaged with the train size
    one = load_study(str(ROOT / "experiments" / "ablations" / "pos_bias_power.yaml"))
    labels, points = plot_points(one, read_rows(RESULTS / "pos_bias_power"))
    assert labels == ["W2", "W4", "W8", "W16"] and points["log_cpb"][0] == [2.0, 4.0, 8.0, 16.0]


# -- a study is restartable: the units' own files, the same command again ----------------------------------------------

@pytest.mark.slow
def test_the_same_command_continues_its_own_study_and_refuses_another(tmp_path, capsys):
    """Run, run again (nothing trains: the weights and rows stay as they were), lose one unit's results (its run
    folder keeps last.ckpt: an interrupted unit) and run again (only that unit runs, from its last.ckpt, to the same
    weights and rows); a study with other settings into the same folder is refused, nothing touched."""
    from safetensors.torch import load_file

    from swinlab.__main__ import main as swinlab_main
    study = dict(TINY, finetune=None, eval=[{"img_size": 32, "window_size": 8}],
                 train={"img_size": 32, "window_size": 4, "trainer": {"max_steps": 2}})
    path = write_study(tmp_path, study)
    out = tmp_path / "o"
    argv = ["ablate", "--config", str(path), "--out", str(out)]
    assert swinlab_main(argv) == 0
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*")
             if p.is_file() and p.parent.name in ("weights", "table_seed0", "log_cpb_seed0")}
    results = (out / "results_images.csv").read_text()
    assert len(results.splitlines()) == 1 + 2 * 2
    assert swinlab_main(argv) == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == files  # read, not trained again
    assert (out / "results_images.csv").read_text() == results
    weights = out / "weights" / "log_cpb_seed0.safetensors"
    before = load_file(weights)
    weights.unlink()
    (out / "units" / "log_cpb_seed0" / "rows.json").unlink()
    capsys.readouterr()
    assert swinlab_main(argv) == 0
    assert "1 unit(s) already finished" in capsys.readouterr().out
    after = load_file(weights)
    assert after.keys() == before.keys() and all(after[k].equal(before[k]) for k in after)
    assert (out / "results_images.csv").read_text() == results
    assert (out / "units" / "table_seed0" / "rows.json").stat().st_mtime_ns == files[
        out / "units" / "table_seed0" / "rows.json"][0]
    (tmp_path / "other").mkdir()
    other = write_study(tmp_path / "other", dict(study, train={**study["train"], "trainer": {"max_steps": 3}}))
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert swinlab_main(["ablate", "--config", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--overwrite" in err and "\n" not in err.strip(), err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot


@pytest.mark.slow
def test_a_unit_is_an_ordinary_fit_run_on_two_ddp_processes(tmp_path):
    """A study whose trainer asks for 2 devices with DDP (what ablate refused before): each unit's training is
    ``python -m swinlab fit`` with the config the unit wrote, Lightning starts the second rank, and the unit's rows
    come out (a real subprocess, as users start it)."""
    from swinlab.training.cli import build_parser
    study = dict(TINY, finetune=None, variants={"table": {"position_bias": "table"}},
                 eval=[{"img_size": 32, "window_size": 8}],
                 train={"img_size": 32, "window_size": 4,
                        "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 2, "strategy": "ddp"}})
    path = write_study(tmp_path, study)
    res = subprocess.run([sys.executable, "-m", "swinlab", "ablate", "--config", str(path), "--out", "o"],
                         cwd=tmp_path, capture_output=True, text=True, env=_checkout_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    unit = tmp_path / "o" / "units" / "table_seed0"
    log = (unit / "seed0.log").read_text()
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log, log[-3000:]  # both ranks trained
    parsed = build_parser("fit").parse_path(str(unit / "seed0.yaml"))  # the unit's config is a fit config
    assert parsed.trainer.devices == 2 and parsed.trainer.strategy == "ddp" and parsed.seed_everything == 0
    rows = json.loads((unit / "rows.json").read_text())
    assert [(r["eval_window"], r["finetuned"]) for r in rows] == [(4, False), (8, False)]


def test_slurm_units_need_one_shape_for_training_and_fine_tunes(tmp_path, capsys):
    """Under --launcher slurm one allocation runs a unit's training and fine-tunes: trainers that ask for different
    devices are named in one line before anything is written or submitted."""
    from swinlab.__main__ import main as swinlab_main
    study = dict(TINY, finetune={"trainer": {"max_steps": 2, "devices": 2, "accelerator": "cpu"}})
    path = write_study(tmp_path, study)
    capsys.readouterr()
    rc = swinlab_main(["ablate", "--config", str(path), "--out", str(tmp_path / "o"), "--launcher", "slurm"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "1 node(s) x 1 device(s)" in err and "1 x 2" in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_the_bare_overwrite_that_the_refusal_suggests_is_accepted():
    """The refusal suggests ``--overwrite``: the parser takes it bare (and ``--finetune false`` / ``--wait``) rather
    than asking for a value."""
    from swinlab.tools.ablate import build_parser
    args = build_parser().parse_args(["--config", "x.yaml", "--overwrite", "--finetune", "false", "--wait"])
    assert args.overwrite is True and args.finetune is False and args.wait is True
