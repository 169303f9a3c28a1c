"""``python -m swinlab ablate --launcher slurm`` on the real two-node SLURM cluster (.ci/slurm-cluster): each unit a
job of one job array, a unit killed mid-run, the same command again."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.cluster

# 2 variants x 2 seeds; 12 short epochs (2 steps each, last.ckpt after every one): a kill lands mid-run
STUDY = {
    "study": "tiny_slurm", "seeds": [0, 1], "threads": 1,
    "model": {"model_name": "swin_pico_patch2_window4_32", "num_classes": 4, "base_lr": 1.6e-2, "warmup_steps": 1,
              "mixup": 0.0, "cutmix": 0.0},
    "data": {"class_path": "swinlab.data.SyntheticDataModule",
             "init_args": {"batch_size": 8, "train_samples": 16, "val_samples": 8, "num_classes": 4}},
    "train": {"img_size": 32, "window_size": 4, "trainer": {"max_epochs": 12, "accelerator": "cpu"}},
    "eval": [{"img_size": 32, "window_size": 8}],
    "variants": {"table": {"position_bias": "table"}, "log_cpb": {"position_bias": "cpb_log"}},
    "slurm": {"time": 10},
}
UNITS = ["table_seed0", "table_seed1", "log_cpb_seed0", "log_cpb_seed1"]


def _ablate(*extra):
    return [sys.executable, "-m", "swinlab", "ablate", "--config", "study.yaml", *extra]


def test_a_study_is_a_job_array_and_its_rerun_resumes_only_the_killed_unit(slurm_cluster, tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    out = tmp_path / "out"
    cmd = _ablate("--launcher", "slurm", "--out", "out", "--poll", "0.5")
    env = slurm_cluster.env()
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = "log_cpb_seed1"
    ckpt = out / "tb" / "log_cpb" / "seed1" / "checkpoints" / "last.ckpt"
    end = time.monotonic() + 300
    while not ckpt.exists():  # the unit has trained at least an epoch
        assert first.poll() is None and time.monotonic() < end, first.communicate()
        time.sleep(0.1)
    job = json.loads((out / "units" / victim / "job.json").read_text())
    slurm_cluster.run("scancel", job["job_id"])
    stdout, stderr = first.communicate(timeout=300)
    assert not (out / "units" / victim / "rows.json").exists(), "the unit finished before it was cancelled"
    jobs = {u: json.loads((out / "units" / u / "job.json").read_text())["job_id"] for u in UNITS}
    array = job["job_id"].split("_")[0]
    assert sorted(jobs.values()) == [f"{array}_{i}" for i in range(4)]  # one array, a task per unit
    # the failed unit is listed with its job id and the log to read; the others finished
    assert first.returncode == 1, stderr[-2000:]
    assert f"unit {victim} (job {job['job_id']}) did not finish" in stderr and job["log"] in stderr, stderr[-2000:]
    assert Path(job["log"]).is_file()
    finished = {u: (out / "units" / u / "rows.json").read_text() for u in UNITS if u != victim}
    assert len(finished) == 3 and json.loads(stdout.splitlines()[-1])["failed"] == [victim]

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted 1 unit(s) as job array" in again.stdout and f": {victim}\n" in again.stdout, again.stdout
    for unit, rows in finished.items():  # read, not trained again
        assert (out / "units" / unit / "rows.json").read_text() == rows
    resumed = json.loads((out / "units" / victim / "job.json").read_text())
    assert resumed["job_id"] != job["job_id"]
    assert f"resuming {ckpt.resolve()}" in open(resumed["stdout"]).read()
    results = (out / "results.csv").read_text().splitlines()
    assert len(results) == 1 + 4 * 2  # header, 4 units x (train window, W8)

    # the same unit uninterrupted, trained here: the same weights, bit for bit, and the same rows
    ref = subprocess.run(_ablate("--variants", "log_cpb", "--seeds", "1", "--out", "ref"), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    mine, theirs = load_file(out / "weights" / f"{victim}.safetensors"), load_file(
        tmp_path / "ref" / "weights" / f"{victim}.safetensors")
    assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine)
    assert (out / "units" / victim / "rows.json").read_text() == (tmp_path / "ref" / "units" / victim /
                                                                 "rows.json").read_text()


@pytest.mark.slow
def test_a_unit_is_one_job_on_two_nodes_with_ddp(slurm_cluster, tmp_path):
    """A unit whose trainers ask for 2 nodes x 1 device (DDP): its job holds a task on each node, both tasks train
    and fine-tune together (two ranks in each fit run), rank 0 evaluates and writes the rows."""
    shape = {"accelerator": "cpu", "devices": 1, "num_nodes": 2, "strategy": "ddp"}
    study = dict(STUDY, seeds=[0], variants={"table": {"position_bias": "table"}},
                 train={**STUDY["train"], "trainer": {"max_steps": 2, **shape}},
                 finetune={"trainer": {"max_steps": 1, **shape}})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    res = subprocess.run(_ablate("--launcher", "slurm", "--out", "out", "--poll", "0.5"), cwd=tmp_path,
                         env=slurm_cluster.env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    unit = tmp_path / "out" / "units" / "table_seed0"
    job = json.loads((unit / "job.json").read_text())["job_id"]
    assert slurm_cluster.job(job)["NodeList"] == "n[1-2]"
    for run in ("seed0", "seed0_ft32w8"):  # rank 0's log and rank 1's, for the training and the fine-tune
        assert "MEMBER: 1/2" in (unit / f"{run}.log").read_text()
        assert "MEMBER: 2/2" in (unit / f"{run}.rank1.log").read_text()
    rows = json.loads((unit / "rows.json").read_text())
    assert [(r["eval_window"], r["finetuned"]) for r in rows] == [(4, False), (8, False), (8, True)]
