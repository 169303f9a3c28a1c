"""Where a study's units run: here (one after another, or ``--jobs N`` worker processes), or as a SLURM job array
through submitit (``--launcher slurm``: one job per unit, each an ordinary fit run on the nodes, tasks and GPUs its
trainer asks for).

Either way the results come from the units' own files (``swinlab.tools.ablate.unit``), never from the scheduler:
a finished unit is read, an interrupted one resumes from its last.ckpt, and a unit that failed is listed with its job
id and log. Running the same command again continues the study.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ...errors import ConfigError
from .plan import world_size
from .report import RESULT_FILES
from .schema import SlurmSpec, Study
from .unit import Phase, Unit, phases, read_unit_rows, run_unit, unit_dir, unit_spec, units_of

RECORD = "study.json"  # in --out: the study name and each unit's spec, what a rerun must match to continue


@dataclass
class Failure:
    """A unit that did not finish: its job id (SLURM) and the log to read."""
    unit: Unit
    log: str
    job_id: Optional[str] = None
    reason: str = ""

    def line(self) -> str:
        job = f" (job {self.job_id})" if self.job_id else ""
        reason = f": {self.reason}" if self.reason else ""
        return f"unit {self.unit.name}{job} did not finish{reason}; log: {self.log}"


# ----------------------------------------------------------------------------------------------------------------
# The --out folder: what a study writes there, and when a rerun continues it
# ----------------------------------------------------------------------------------------------------------------

def unit_outputs(study: Study, out: Path, unit: Unit) -> List[Path]:
    """What one unit writes under ``out``: its weights, its fit runs' folders and its own folder."""
    return [Phase(unit, out).weights] + [p.run_dir for p in phases(study, unit, out)] + [unit_dir(out, unit)]


def planned_outputs(study: Study, out: Path) -> List[Path]:
    """What a study writes under ``out``: the results files and every unit's outputs."""
    paths = [out / name for name in RESULT_FILES + (RECORD,)]
    for unit in units_of(study):
        paths += unit_outputs(study, out, unit)
    return paths


def record(study: Study, out: Path) -> Dict[str, Any]:
    return {"study": study.name, "units": {u.name: unit_spec(study, u, out) for u in units_of(study)}}


def continues(study: Study, out: Path) -> bool:
    """Whether ``out`` holds this very study (the same units with the same settings), started by an earlier run of
    the same command: then its finished units are read and the rest resumed."""
    path = out / RECORD
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(record(study, out), default=str))
    except ValueError:
        return False


def check_out(study: Study, out: Path, overwrite: bool) -> None:
    """``--out`` must be a folder (or not exist yet). Without ``--overwrite`` it holds none of the files the study
    writes, unless an earlier run of the same study left them (then the study continues): one ConfigError line naming
    the first one found, before any training."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"--out {out}: {folder} is a file, not a folder: give a folder for the results")
            break
    if overwrite or continues(study, out):
        return
    existing = [p for p in planned_outputs(study, out) if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ConfigError(f"--out {out} already holds {existing[0]}{more} from an earlier study: pass --overwrite to "
                          f"replace those results, or give another --out (the same command continues its own study)")


def prepare_out(study: Study, out: Path, overwrite: bool) -> None:
    """After :func:`check_out`: with ``--overwrite`` the units' earlier outputs go, so that nothing of theirs is read
    or resumed; then the study's record is written."""
    if overwrite:
        for unit in units_of(study):
            for path in unit_outputs(study, out, unit):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record(study, out), indent=1, default=str) + "\n")
    tmp.replace(out / RECORD)


# ----------------------------------------------------------------------------------------------------------------
# Local: here, one unit after another, or --jobs worker processes
# ----------------------------------------------------------------------------------------------------------------

def _claim_gpus(queue) -> None:
    """``--jobs`` worker start-up: take this worker's share of the machine's GPUs (CUDA_VISIBLE_DEVICES), so units
    side by side never share one; without GPUs the queue is empty and nothing changes."""
    import queue as queues
    try:
        devices = queue.get_nowait()
    except queues.Empty:  # no GPU left to claim
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)


def _unit_in_worker(study: Study, unit: Unit, out: str, threads: Optional[int], started: float):
    """:func:`run_unit` in a worker process of ``--jobs`` (spawned: a fresh interpreter)."""
    import warnings
    warnings.filterwarnings("ignore")
    return run_unit(study, unit, Path(out), threads, log=lambda line: print(line, flush=True), started=started)


def _log_of(out: Path, unit: Unit) -> str:
    logs = sorted(unit_dir(out, unit).glob("*.log"), key=lambda p: p.stat().st_mtime)
    return str(logs[-1]) if logs else str(unit_dir(out, unit))


def run_local(study: Study, units: List[Unit], out: Path, done: Callable[[Unit, List[Dict[str, Any]]], None],
              jobs: int = 1, threads: Optional[int] = None, log=print) -> List[Failure]:
    """Each unit here, one after another (``jobs`` 1) or ``jobs`` at a time in worker processes (each with its share
    of the GPUs); ``done`` gets each finished unit's rows as it finishes."""
    started = time.perf_counter()
    failures: List[Failure] = []
    if jobs <= 1:
        for unit in units:
            try:
                done(unit, run_unit(study, unit, out, threads, log=log, started=started))
            except Exception as exc:  # the unit's own error; the other units still run
                failures.append(Failure(unit, _log_of(out, unit), reason=str(exc).splitlines()[0][:300]))
        return failures
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    ctx = multiprocessing.get_context("spawn")
    gpus = ctx.Queue()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in visible.split(",") if d.strip()] if visible else list(range(torch.cuda.device_count()))
    share = max(len(ids) // jobs, 1)
    for k in range(min(jobs, len(ids))):
        gpus.put(ids[k * share:(k + 1) * share])
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_claim_gpus, initargs=(gpus,)) as pool:
        futures = {pool.submit(_unit_in_worker, study, unit, str(out), threads, started): unit for unit in units}
        for future in as_completed(futures):
            unit = futures[future]
            try:
                done(unit, future.result())
            except Exception as exc:
                failures.append(Failure(unit, _log_of(out, unit), reason=str(exc).splitlines()[0][:300]))
    return failures


# ----------------------------------------------------------------------------------------------------------------
# SLURM: one job per unit, submitted as an array through submitit
# ----------------------------------------------------------------------------------------------------------------

def unit_resources(study: Study) -> Dict[str, Any]:
    """What each unit's job asks the scheduler for, from its trainer: ``num_nodes`` nodes, ``devices`` tasks per node
    (one process per device, as Lightning expects under SLURM), as many GPUs when the accelerator is a GPU. The train
    and fine-tune trainers must agree (one allocation runs both)."""
    sections = [("train", study.train.trainer or {})]
    if study.finetune:
        sections.append(("finetune", study.finetune.trainer or {}))
    shapes = []
    for _, trainer in sections:
        nodes = int(trainer.get("num_nodes") or 1)
        per_node = world_size(trainer) // nodes
        gpu = str(trainer.get("accelerator") or "").lower() in ("gpu", "cuda")
        shapes.append((nodes, per_node, gpu))
    if len(set(shapes)) > 1:
        (n1, d1, _), (n2, d2, _) = shapes
        raise ConfigError(f"--launcher slurm runs a unit's training and fine-tunes in one allocation, but train: asks "
                          f"for {n1} node(s) x {d1} device(s) and finetune: for {n2} x {d2}: give both trainers the "
                          f"same devices and num_nodes")
    nodes, per_node, gpu = shapes[0]
    resources: Dict[str, Any] = {"nodes": nodes, "ntasks_per_node": per_node}
    if gpu:
        resources["gpus_per_node"] = per_node
    return resources


def slurm_job(study: Study, unit: Unit, out: str, threads: Optional[int]) -> int:
    """What each array task runs (on every task of the unit's allocation): the unit, resumable."""
    rows = run_unit(study, unit, Path(out), threads, log=lambda line: print(line, flush=True))
    return len(rows)


def _job_file(out: Path, unit: Unit) -> Path:
    return unit_dir(out, unit) / "job.json"


def _queued() -> Optional[set]:
    """Job ids the scheduler still holds (pending or running; array tasks as ``<array>_<task>``), from ``squeue``:
    no accounting database is needed. None when squeue cannot answer."""
    try:
        res = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return {line.strip() for line in res.stdout.splitlines() if line.strip()}


def _slurm_parameters(study: Study, slurm: SlurmSpec) -> Dict[str, Any]:
    params: Dict[str, Any] = dict(unit_resources(study), job_name=f"ablate-{study.name}", time=int(slurm.time),
                                  array_parallelism=int(slurm.array_parallelism))
    if slurm.partition:
        params["partition"] = slurm.partition
    if slurm.cpus_per_task:
        params["cpus_per_task"] = int(slurm.cpus_per_task)
    if slurm.mem_gb:
        params["mem"] = f"{int(slurm.mem_gb * 1024)}M"
    if slurm.setup:
        params["setup"] = list(slurm.setup)
    if slurm.additional:
        params["additional_parameters"] = dict(slurm.additional)
    return params


def run_slurm(study: Study, units: List[Unit], out: Path, done: Callable[[Unit, List[Dict[str, Any]]], None],
              slurm: SlurmSpec, threads: Optional[int] = None, wait: bool = True, poll: float = 5.0,
              log=print) -> List[Failure]:
    """Submit the units that are neither finished nor still queued from an earlier run as one job array (submitit),
    then (``wait``) follow them through their own files and ``squeue`` until each has finished or left the queue.
    Returns the units that left the queue unfinished (cancelled, failed, out of time), each with its job id and
    log."""
    import submitit

    if shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm needs SLURM's sbatch and squeue on the PATH: run on a login node, "
                          "or leave --launcher out to train here")
    queued = _queued() or set()
    jobs: Dict[Unit, Dict[str, str]] = {}
    submit: List[Unit] = []
    for unit in units:
        path = _job_file(out, unit)
        earlier = json.loads(path.read_text()) if path.is_file() else None
        if earlier and earlier["job_id"] in queued:
            jobs[unit] = earlier  # still pending or running from an earlier run: followed, not submitted again
            log(f"{unit.name}: job {earlier['job_id']} from an earlier run is still queued")
        else:
            submit.append(unit)
    if submit:
        executor = submitit.SlurmExecutor(folder=str(out / "slurm" / "%j"), max_num_timeout=3)
        executor.update_parameters(**_slurm_parameters(study, slurm))
        submitted = []
        with executor.batch():
            for unit in submit:
                submitted.append((unit, executor.submit(slurm_job, study, unit, str(out.resolve()), threads)))
        for unit, job in submitted:
            info = {"job_id": str(job.job_id), "log": str(job.paths.stderr), "stdout": str(job.paths.stdout)}
            jobs[unit] = info
            path = _job_file(out, unit)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(info) + "\n")
        log(f"submitted {len(submit)} unit(s) as job array {submitted[0][1].job_id.split('_')[0]}: "
            f"{', '.join(u.name for u in submit)}")
    if not wait:
        log("not waiting: run the same command again to collect the finished units (and resubmit failed ones)")
        return []
    failures: List[Failure] = []
    pending = dict(jobs)
    while pending:
        queued = _queued()  # first the queue, then the files: a unit that left the queue has written them
        for unit in list(pending):
            rows = read_unit_rows(out, unit)
            if rows is not None:
                done(unit, rows)
                del pending[unit]
            elif queued is not None and pending[unit]["job_id"] not in queued:
                failures.append(Failure(unit, pending[unit]["log"], pending[unit]["job_id"],
                                        "it left the queue without its results"))
                del pending[unit]
        if pending:
            time.sleep(poll)
    return failures
