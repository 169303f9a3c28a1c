"""Distributed numerics on CPU: 2 processes over gloo (DDP, then FSDP2 with a sharded checkpoint and resume) follow
the single-process loss trajectory; Lightning's DeepSpeedStrategy at ZeRO-2/3 follows the single-device one. (Every
strategy file started through ``python -m swinlab fit`` itself: tests/test_launch.py.)

The two ranks are launched as plain processes with torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, ...), so
Lightning uses them as they are; this file is also the worker script (``python tests/test_distributed.py worker``).
The same processes then run test_meta_init.py's empty-init checks (FSDP2 on the two ranks, ZeRO-3 in the DeepSpeed
process): every interpreter start-up costs ~6 s of CPU, so the suite starts as few as it can.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

PICO = "swinv2_pico_patch2_window4_32"
BATCH = 8  # per rank; the single-process reference uses 2 * BATCH
STEPS = 3  # before the checkpoint; the resumed run adds one more


def _module():
    from swinlab.tasks import ImageClassifier
    return ImageClassifier(PICO, num_classes=10, model_kwargs={"img_size": 16}, warmup_steps=2, base_lr=0.05,
                           mixup=0.0, cutmix=0.0, label_smoothing=0.0)


def _data(batch):
    from swinlab.data import SyntheticDataModule
    return SyntheticDataModule(img_size=16, num_classes=10, batch_size=batch, train_samples=128, val_samples=8)


def _fit(strategy, devices, batch, max_steps, out: pathlib.Path, tag: str, ckpt_path=None, save=None,
         stop_after=None):
    import lightning.pytorch as pl

    class Losses(pl.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            if stop_after is not None and trainer.global_step == stop_after:
                # an interrupted run: checkpoint mid-epoch (as ModelCheckpoint's last.ckpt is written), then stop;
                # max_steps stays that of the uninterrupted run so the LR schedule is the same
                trainer.save_checkpoint(save)
                trainer.should_stop = True

    pl.seed_everything(0, verbose=False)
    rec = Losses()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
                         callbacks=[rec], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         gradient_clip_val=1.0)
    trainer.fit(_module(), datamodule=_data(batch), ckpt_path=ckpt_path)
    if save is not None and stop_after is None:
        trainer.save_checkpoint(save)
    (out / f"{tag}_rank{trainer.global_rank}.json").write_text(json.dumps(rec.losses))
    return rec.losses


def _worker(out: pathlib.Path) -> None:
    """One rank: DDP fit, FSDP2 fit + sharded checkpoint, FSDP2 resume for one more step."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    torch.set_num_threads(1)
    _fit("ddp", 2, BATCH, STEPS, out, "ddp")
    ckpt = out / "fsdp2.ckpt"

    def fsdp2():  # pure data parallel: Lightning's "auto" sizes would make a tensor-parallel group of the 2 ranks
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)

    # same max_steps as the reference (the cosine schedule depends on it), stopped after STEPS like a killed run
    _fit(fsdp2(), 2, BATCH, STEPS + 1, out, "fsdp2", save=ckpt, stop_after=STEPS)
    _fit(fsdp2(), 2, BATCH, STEPS + 1, out, "fsdp2_resumed", ckpt_path=ckpt)
    # the same two processes (each interpreter start-up costs ~6 s of CPU): test_meta_init's FSDP2 empty-init checks
    from test_meta_init import fsdp2_empty_init_checks
    fsdp2_empty_init_checks(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                   DS_ACCELERATOR="cpu", PL_DISABLE_FORK="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "worker", str(out)], env=env, cwd=out,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single process, batch 2 * BATCH: the trajectory both distributed runs must follow."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref")
    return _fit("auto", 1, 2 * BATCH, STEPS + 1, out, "ref")


def _mean_over_ranks(out, tag):
    per_rank = [json.loads((out / f"{tag}_rank{r}.json").read_text()) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    assert per_rank[0] != per_rank[1]  # each rank saw different images
    return [(a + b) / 2 for a, b in zip(*per_rank)]


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["ddp", "fsdp2"])
def test_two_ranks_follow_the_single_process_losses(two_rank_run, reference, tag):
    losses = _mean_over_ranks(two_rank_run, tag)
    assert len(losses) == STEPS
    assert losses == pytest.approx(reference[:STEPS], rel=1e-4, abs=1e-6)
    assert losses[-1] != pytest.approx(losses[0], rel=1e-3)  # it trained


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_is_saved_and_resumed(two_rank_run):
    ckpt = two_rank_run / "fsdp2.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    resumed = [json.loads((two_rank_run / f"fsdp2_resumed_rank{r}.json").read_text()) for r in range(2)]
    assert [len(r) for r in resumed] == [1, 1]  # the resumed run continued at step STEPS + 1 and ran only that step


@pytest.mark.slow
def test_fsdp2_resume_continues_the_trajectory(two_rank_run, reference):
    resumed = _mean_over_ranks(two_rank_run, "fsdp2_resumed")
    assert len(resumed) == 1  # only the step after the checkpoint ran
    assert resumed[0] == pytest.approx(reference[STEPS], rel=1e-4, abs=1e-6)


# -- Lightning's DeepSpeedStrategy with ImageClassifier on CPU (test-only subclass; product code stays standard) ----
def _deepspeed_lightning_worker(out: pathlib.Path) -> None:
    """Single device, then ZeRO-2 and ZeRO-3 through Lightning's DeepSpeedStrategy, same module, data and seed."""
    sys.path.insert(0, str(ROOT / "tests"))
    from launch_helpers import CPUDeepSpeedStrategy as CPUDeepSpeed  # also skips DeepSpeed's 40 s shm-op build

    torch.set_num_threads(1)
    runs = {"single": "auto", "zero2": CPUDeepSpeed(stage=2), "zero3": CPUDeepSpeed(stage=3)}
    result = {}
    for tag, strategy in runs.items():
        result[tag] = _fit(strategy, 1, BATCH, STEPS + 1, out, tag)
    (out / "deepspeed_lightning.json").write_text(json.dumps(result))
    from test_meta_init import zero3_empty_init_checks  # the same process: test_meta_init's ZeRO-3 checks
    zero3_empty_init_checks(out)


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, __file__, "deepspeed-lightning", str(out)], env=env, cwd=out,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_lightning_deepspeed_strategy_zero2_zero3_follow_single_device_on_cpu(deepspeed_run):
    losses = json.loads((deepspeed_run / "deepspeed_lightning.json").read_text())
    assert len(losses["single"]) == STEPS + 1 and losses["single"][-1] != pytest.approx(losses["single"][0], rel=1e-3)
    for stage in ("zero2", "zero3"):
        assert losses[stage] == pytest.approx(losses["single"], rel=1e-4, abs=1e-6), stage


# -- empty (meta-device) init under FSDP2 and ZeRO-3, checked in the processes above (checks: test_meta_init.py) ----
@pytest.mark.slow
def test_fsdp2_two_ranks_empty_init_shards_draws_and_loads(two_rank_run):
    for rank in range(2):
        result = json.loads((two_rank_run / f"empty_init_fsdp2_rank{rank}.json").read_text())
        assert result == {"shards_differ": True, "buffers_equal": True, "checkpoint_loaded": True,
                          "forward_equal": True, "hsdp_mesh": [[2, 1], ["replicate", "shard"]],
                          "hsdp_placements": True}, result


@pytest.mark.slow
def test_zero3_empty_init_partitions_initialises_and_loads_per_module(deepspeed_run):
    result = json.loads((deepspeed_run / "zero3.json").read_text())
    for tag in ("init", "ckpt"):
        assert result[f"{tag}_partitioned"] and result[f"{tag}_no_meta"] and result[f"{tag}_buffers"], result
        assert result[f"{tag}_forward_finite"], result
        assert result[f"{tag}_decay_groups"]["decay"] > 0, result  # ds_shape decides, not the empty partition
    assert result["ckpt_loaded"] and result["init_res_post_zero"] and result["init_logit_scale"], result
    assert result["init_linear_std"] == pytest.approx(0.02, abs=0.002), result


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    sys.path.insert(0, str(ROOT))
    _worker(pathlib.Path(sys.argv[2]))
elif __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "deepspeed-lightning":
    sys.path.insert(0, str(ROOT))
    _deepspeed_lightning_worker(pathlib.Path(sys.argv[2]))

