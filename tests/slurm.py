"""The real SLURM cluster the ``cluster`` tests submit to (.ci/slurm-cluster; fixture ``slurm_cluster`` in conftest.py).

``Cluster`` wraps the client commands a user types (sbatch, scontrol, scancel) with the cluster's SLURM_CONF and an
environment in which jobs run this checkout's code with this interpreter (sbatch passes the submitting environment
on, as it does for a user with an activated venv). No accounting daemon: a job's state comes from ``scontrol show
job`` (kept for MinJobAge = 600 s after it ends).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

from helpers import ROOT

SCRIPT = ROOT / ".ci" / "slurm-cluster"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE"}
# a launcher's rank variables in the pytest process must not reach the jobs
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
             "MASTER_PORT")


def state_dir() -> Path:
    return Path(os.environ.get("SWINLAB_SLURM_DIR") or ROOT / ".cache" / "slurm")


class Cluster:
    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.conf = self.dir / "slurm.conf"

    def env(self, **extra: str) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith(("SLURM_", "SBATCH_",
                                                                                              "SRUN_", "PL_"))}
        env.update(SLURM_CONF=str(self.conf), PATH=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]),
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]),
                   OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        env.update(extra)
        return env

    def run(self, *cmd: str, cwd: Optional[Path] = None, check: bool = True, **env: str) -> str:
        proc = subprocess.run(list(cmd), cwd=cwd, env=self.env(**env), capture_output=True, text=True, timeout=60)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def sbatch(self, *args: str, cwd: Path, **env: str) -> str:
        """``sbatch --parsable ARGS`` run in ``cwd``; the job id."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd, **env).split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job -o``'s fields (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        fields = {}
        for part in out.split():
            key, sep, value = part.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float = 120, until=None) -> Dict[str, str]:
        """Poll until the job has ended (or ``until(fields)`` holds); cancel it and fail after ``timeout`` s."""
        end = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if (until(fields) if until else fields.get("JobState") in DONE):
                return fields
            if time.monotonic() > end:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout} s: {fields}")
            time.sleep(0.2)
