"""Launch environments whose processes could only wait for each other are refused in one line before anything is
built (swinlab.training.launch.check_launch); the rendezvous is bounded (RendezvousWatchdog). The SLURM variables
are the ones srun, sbatch and salloc set (checked on the real cluster in tests/test_cluster.py)."""
import socket
import subprocess
import sys

import pytest
from helpers import ROOT

from swinlab.errors import ConfigError
from swinlab.training.launch import check_launch, rendezvous_timeout


def cfg(devices=2, nodes=1):
    return {"trainer": {"devices": devices, "num_nodes": nodes}}


def srun_env(ntasks=2, per_node=2, nodes=1, **extra):
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "swinlab", "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": "1",
           "SLURM_STEP_ID": "0", "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1"}
    if per_node is not None:
        env["SLURM_NTASKS_PER_NODE"] = str(per_node)
    env.update(extra)
    return env


@pytest.mark.parametrize("config, env, words", [
    (cfg(2), srun_env(per_node=None), "without --ntasks-per-node"),
    (cfg(2), {k: v for k, v in srun_env().items() if k != "SLURM_STEP_ID"}, "not under srun"),
    (cfg(4), srun_env(), "--trainer.devices 4 but SLURM starts 2 task(s) per node"),
    (cfg(2, 2), srun_env(), "--trainer.num_nodes 2 but the SLURM allocation has 1 node"),
    (cfg(2), srun_env(ntasks=1), "SLURM started 1 task(s) but --trainer.devices 2"),  # srun -n1 in a 2-task job
    (cfg(2), srun_env(SLURM_JOB_NAME="interactive"), "salloc's default"),
    (cfg(2), {"WORLD_SIZE": "4"}, "WORLD_SIZE=4 in the environment"),
    (cfg(2), {"LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "0"}, "LOCAL_WORLD_SIZE=8"),
    (cfg(2), {"LOCAL_RANK": "3"}, "LOCAL_RANK=3"),
    (cfg(2), srun_env(MASTER_ADDR="no-such-node.invalid"), "MASTER_ADDR no-such-node.invalid does not resolve"),
    (cfg(2), {k: v for k, v in srun_env(SLURM_NODELIST="gpu-node[7-8].invalid").items() if k != "MASTER_ADDR"},
     "first node of SLURM_NODELIST"),
])
def test_a_launch_that_could_only_wait_is_refused_in_one_line(config, env, words):
    with pytest.raises(ConfigError) as err:
        check_launch(config, env)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("config, env", [
    (cfg(2), srun_env()),  # srun --nodes=1 --ntasks-per-node=2
    (cfg(1, 2), srun_env(ntasks=2, per_node=1, nodes=2)),  # 2 nodes x 1 task
    (cfg(2), {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "NODE_RANK": "0"}),  # a rank Lightning's launcher started
    (cfg(1), {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "interactive", "SLURM_JOB_ID": "7"}),  # salloc, one process
    (cfg(2), {}),
])
def test_consistent_launches_pass(config, env):
    check_launch(config, env)


def test_a_taken_master_port_is_named_on_the_first_rank_only():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = srun_env(SLURM_PROCID="0", MASTER_PORT=str(port))
        with pytest.raises(ConfigError, match=f"port {port} \\(MASTER_PORT\\) is taken"):
            check_launch(cfg(2), env)
        check_launch(cfg(2), dict(env, SLURM_PROCID="1"))  # other ranks connect to it: not theirs to check


def test_the_rendezvous_timeout_is_read_from_the_environment():
    assert rendezvous_timeout({}) == 600 and rendezvous_timeout({"SWINLAB_RENDEZVOUS_TIMEOUT": "2.5"}) == 2.5
    for bad in ("soon", "0"):
        with pytest.raises(ConfigError, match="SWINLAB_RENDEZVOUS_TIMEOUT"):
            rendezvous_timeout({"SWINLAB_RENDEZVOUS_TIMEOUT": bad})


@pytest.mark.slow
def test_a_rank_whose_peers_never_come_stops_with_one_line(tmp_path):
    """Rank 0 of 2 with no rank 1: without the watchdog it waits for c10d's 30 minutes."""
    import os

    from helpers import free_ports
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), SWINLAB_RENDEZVOUS_TIMEOUT="8", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_ports(1)[0]), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "swinlab", "fit", "--config", str(ROOT / "experiments" /
                          "quickstart.yaml"), "--config", str(ROOT / "experiments" / "strategy" / "ddp.yaml"),
                          "--trainer.devices", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 1
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("error: rank 0 of 2")]
    assert line and "did not all meet within 8 s" in line[0] and "SWINLAB_RENDEZVOUS_TIMEOUT" in line[0], \
        res.stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))
