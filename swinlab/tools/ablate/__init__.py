"""``python -m swinlab ablate --config experiments/ablations/<study>.yaml [--out DIR] [--launcher local|slurm]``:
resolution-transfer studies. Results already in ``--out`` are never replaced without ``--overwrite``; the same
command run again continues its own study.

For each variant and seed (a *unit*): train once at the train size/window (or take the given checkpoint), then
evaluate at every larger (img_size, window) (a) directly, through the model's transfer path (V1: bicubic bias tables;
V2: the CPB MLP re-evaluated with ``pretrained_window_size``), and (b) after a short fine-tune at that size starting
from the trained weights. Each training and fine-tune is an ordinary ``python -m swinlab fit`` run. Writes
results.csv, results.md (paper-shaped table with intervals and the paper claims' verdicts), results.png and one
TensorBoard run per variant (a version per seed).

The package: :mod:`.schema` (the study file, typed), :mod:`.unit` (one unit: its fit runs, evaluations and files),
:mod:`.launchers` (here or ``--jobs N`` workers; a SLURM job array through submitit), :mod:`.plan` (``--plan``:
GPU-hours), :mod:`.report` (bootstrap tables, plots, CSV).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ...errors import ConfigError
from .launchers import Failure, check_out, planned_outputs, prepare_out, run_local, run_slurm, unit_resources
from .plan import MFU, PEAK_TFLOPS, format_plan, plan
from .report import CSV_FIELDS, IMAGE_FIELDS, plot_points, plot_results, provenance, read_rows, summarise, write_outputs
from .schema import Claim, SlurmSpec, Study, check_study, select
from .unit import Unit, evaluate, fit_config, load_study, make_data, read_unit_rows, run_unit, transfer, units_of

__all__ = ["CSV_FIELDS", "IMAGE_FIELDS", "Claim", "Failure", "SlurmSpec", "Study", "Unit", "check_out", "check_study",
           "evaluate", "fit_config", "format_plan", "load_study", "main", "make_data", "plan", "planned_outputs",
           "plot_points", "plot_results", "read_rows", "run_study", "run_unit", "summarise", "transfer",
           "write_outputs"]


def _order(study: Study):
    units = units_of(study)
    cells = [c.key for c in study.cells()]
    return lambda r: (units.index(Unit(r["variant"], r["seed"])),
                      cells.index((r["eval_img_size"], r["eval_window"], r["finetuned"])))


def run_study(study: Study, out: Path, log=print, jobs: int = 1, threads: Optional[int] = None,
              provenance: Optional[Dict[str, Any]] = None, launcher: str = "local",
              slurm: Optional[SlurmSpec] = None, wait: bool = True, poll: float = 5.0):
    """Every (variant, seed) unit: the finished ones read from their files, the others run by ``launcher``. The
    results files are rewritten as each unit finishes (partial results survive an interrupted study), rows in study
    order. Returns the rows and the units that did not finish."""
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    key = _order(study)
    started = time.perf_counter()

    def done(unit: Unit, unit_rows: List[Dict[str, Any]]) -> None:
        rows.extend(unit_rows)
        rows.sort(key=key)
        write_outputs(study, rows, out, provenance=provenance)

    todo = []
    for unit in units_of(study):
        finished = read_unit_rows(out, unit)
        if finished is None:
            todo.append(unit)
        else:
            rows.extend(finished)
    if rows and todo:
        log(f"{len(units_of(study)) - len(todo)} unit(s) already finished in {out}: read, not trained again")
    rows.sort(key=key)
    if launcher == "slurm":
        failures = run_slurm(study, todo, out, done, slurm or SlurmSpec(), threads, wait=wait, poll=poll, log=log)
    else:
        failures = run_local(study, todo, out, done, jobs=jobs, threads=threads, log=log)
    if provenance is not None:
        provenance["minutes"] = round((time.perf_counter() - started) / 60, 2)
    write_outputs(study, rows, out, plot=True, provenance=provenance)
    return rows, failures


def _slurm_spec(study: Study, given: Dict[str, Any]) -> SlurmSpec:
    """The study's ``slurm:`` section with what the command line changed (a value other than the default)."""
    spec = study.slurm or SlurmSpec()
    default = SlurmSpec()
    changes = {k: v for k, v in given.items() if v is not None and v != getattr(default, k)}
    return dataclasses.replace(spec, **changes)


def build_parser():
    """The ``python -m swinlab ablate`` parser (jsonargparse; bad input raises, :func:`main` makes it one line)."""
    from jsonargparse import ArgumentParser

    from ...training.cli import add_flag

    parser = ArgumentParser(prog="python -m swinlab ablate", description=__doc__.split("\n\n")[0],
                            exit_on_error=False)
    parser.add_argument("--config", type=str, required=True, help="study yaml (experiments/ablations/*.yaml)")
    parser.add_argument("--out", type=Optional[str], default=None,
                        help="output folder (default: runs/ablations/<study>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the study's seeds")
    parser.add_argument("--variants", type=str, nargs="+", default=None,
                        help="run only these of the study's variants (e.g. to rerun one and compare)")
    add_flag(parser, "--finetune", default=True,
             help="false: skip the fine-tunes (the direct rows are the same as with them)")
    parser.add_argument("--threads", type=Optional[int], default=None,
                        help="torch.set_num_threads per process (default: the study's 'threads:', else torch's "
                             "choice)")
    parser.add_argument("--launcher", type=str, default="local", choices=["local", "slurm"],
                        help="local: train here (--jobs at a time); slurm: submit each unit as its own job of a job "
                             "array (submitit), each an ordinary fit run on the nodes/devices its trainer asks for")
    parser.add_argument("--jobs", type=int, default=1,
                        help="local: units (variant x seed) trained at a time, each in its own process with its share "
                             "of the GPUs; the results do not depend on it")
    parser.add_class_arguments(SlurmSpec, "slurm", help="--launcher slurm: the jobs' settings (default: the study's "
                                                        "slurm: section)")
    add_flag(parser, "--wait", default=True,
             help="--launcher slurm: wait for the jobs and write the results (false: submit and return; "
                  "run the same command again to collect)")
    parser.add_argument("--poll", type=float, default=5.0, help="--launcher slurm: seconds between looks at the jobs")
    add_flag(parser, "--overwrite", default=False,
             help="replace the results, weights and TensorBoard runs an earlier study left in --out, "
                  "training every unit again (refused otherwise; without it the same command continues "
                  "its own study)")
    parser.add_argument("--report", type=Optional[str], default=None,
                        help="rewrite results.md (and results.png) in this finished study's folder from its rows and "
                             "the study file's current claims and baseline, and train nothing")
    parser.add_argument("--plan", action="store_true",
                        help="print what the study costs (images, FLOPs, GPU-hours) as JSON and markdown, and run "
                             "nothing")
    parser.add_argument("--train-images", type=Optional[int], default=None,
                        help="--plan: training images an epoch (default: the data module's, when it can be read)")
    parser.add_argument("--val-images", type=Optional[int], default=None,
                        help="--plan: validation images (default: the data module's, when it can be read)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="--plan: the GPU's peak TFLOP/s")
    parser.add_argument("--mfu", type=float, default=MFU, help="--plan: the fraction of the peak a run reaches")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ...models.swin import to_2tuple
    from ...training.cli import parse_config

    argv = list(argv or [])
    if argv and argv[0] == "ablate":
        argv = argv[1:]
    args = parse_config(build_parser(), argv, "ablate")
    study = load_study(args.config)
    threads = args.threads or study.threads
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} must be >= 1 (units trained at a time)")
    if args.poll <= 0:
        raise ConfigError(f"--poll {args.poll} must be > 0 (seconds between looks at the jobs)")
    if threads:
        torch.set_num_threads(int(threads))
    study = select(study, seeds=args.seeds, variants=args.variants, finetune=args.finetune)
    if args.report:
        folder = Path(args.report)
        if not (folder / "results.csv").is_file() or not (folder / "results_images.csv").is_file():
            raise ConfigError(f"--report {folder}: no results.csv and results_images.csv there: give the --out folder "
                              f"of a finished study")
        rows = read_rows(folder)
        prov_path = folder / "provenance.json"
        prov = json.loads(prov_path.read_text()) if prov_path.is_file() else None
        write_outputs(study, rows, folder, plot=True, provenance=prov)
        print(summarise(study, rows, prov))
        return 0
    if args.plan:
        train_images, val_images = args.train_images, args.val_images
        if train_images is None or val_images is None:
            try:
                dm = make_data(study, to_2tuple(study.train.img_size), 0)
            except ConfigError as exc:
                raise ConfigError(f"--plan cannot count the study's images ({exc}): give --train-images and "
                                  f"--val-images") from None
            train_images = train_images if train_images is not None else len(dm.train_set)
            val_images = val_images if val_images is not None else len(dm.val_set)
        cost = plan(study, int(train_images), int(val_images), args.peak_tflops, args.mfu)
        print(json.dumps(cost))
        print(format_plan(cost))
        return 0
    slurm = None
    if args.launcher == "slurm":
        slurm = _slurm_spec(study, dict(vars(args.slurm)))
        unit_resources(study)  # train and fine-tune fit one allocation: checked before anything is written
    out = Path(args.out or Path("runs") / "ablations" / study.name)
    check_out(study, out, args.overwrite)
    prepare_out(study, out, args.overwrite)
    started = time.perf_counter()
    prov = provenance(argv, args.jobs, threads)
    rows, failures = run_study(study, out, jobs=args.jobs, threads=threads, provenance=prov, launcher=args.launcher,
                               slurm=slurm, wait=args.wait, poll=args.poll)
    print(summarise(study, rows))
    print(json.dumps(dict(out=str(out), rows=len(rows), minutes=round((time.perf_counter() - started) / 60, 2),
                          failed=[f.unit.name for f in failures])))
    for failure in failures:
        print(f"error: {failure.line()}", file=sys.stderr, flush=True)
    if failures:
        print("Run the same command again: finished units are read, interrupted ones resume from their last.ckpt.",
              file=sys.stderr)
        return 1
    if any(not math.isfinite(r["top1"]) for r in rows):
        return 1
    return 0

