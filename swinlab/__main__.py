"""``python -m swinlab <command>`` (also the ``swinlab`` console script).

Commands:
  fit | validate | test | predict   training through LightningCLI (swinlab.training.cli)
  models                            list registered variants with parameters and FLOPs
  convert                           load any Swin checkpoint (official, timm, Lightning, swinlab) into a variant,
                                    optionally at another image/window size, and write safetensors, a timm state
                                    dict, a torch.export program or ONNX (--format)
  bench                             throughput/memory side by side with timm (swinlab.tools.bench)
  estimate                          per-GPU memory under DDP / ZeRO / FSDP (swinlab.tools.estimate)
  ablate                            resolution-transfer ablation studies (swinlab.tools.ablate)
  data optimize | bench             image folder -> LitData shards; the data path's images/s (swinlab.tools.data)
"""
from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from typing import List, Optional

from .errors import SwinlabError

# command -> module whose main(argv) runs it
COMMANDS = {
    "models": "swinlab.tools.catalog",
    "convert": "swinlab.tools.convert",
    "bench": "swinlab.tools.bench",
    "estimate": "swinlab.tools.estimate",
    "ablate": "swinlab.tools.ablate",
    "data": "swinlab.tools.data",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _setup_env() -> None:
    """Keep caches inside the working tree's ignored .cache/ and quiet DeepSpeed on machines without CUDA."""
    cache = os.path.join(os.getcwd(), ".cache")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(cache, "torch_extensions"))
    try:
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except Exception:  # pragma: no cover - torch import errors surface later with their own message
        pass


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    _setup_env()
    command = argv[0]
    try:
        if command in LIGHTNING_COMMANDS:
            from . import data, tasks  # noqa: F401 - known subclasses: `--model ImageClassifier` (short names)
            from .training.cli import main as cli_main
            return cli_main(argv) or 0
        if command not in COMMANDS:
            known = ", ".join(list(LIGHTNING_COMMANDS) + list(COMMANDS))
            raise SwinlabError(f"unknown command {command!r}: use one of {known}")
        module = importlib.import_module(COMMANDS[command])
        return module.main(argv[1:]) or 0
    except SwinlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def exit_without_teardown(code: int) -> None:
    """Leave the process the way a normal exit does, minus the interpreter's teardown of every loaded module.

    With torch, Lightning and timm loaded that teardown costs ~1.5 s of CPU per process (every rank of a run pays it)
    and does nothing a finished command needs. Everything a normal exit does before it still happens, in the same
    order: running (non-daemon) threads are joined, then the ``atexit`` handlers run (logging's flush,
    multiprocessing's clean-up of worker processes, TensorBoard and DeepSpeed hooks), then the standard streams are
    flushed, and the process ends with ``code``.
    """
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    run_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's own exit step; absent elsewhere
    if run_handlers is None:
        sys.exit(code)
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
    os._exit(code)


def run() -> None:
    """Entry point of ``python -m swinlab`` and the ``swinlab`` console script: :func:`main`, then a quick exit."""
    try:
        code = main()
    except SystemExit as done:  # argparse/LightningCLI exits (--help, --print_config, usage errors)
        if done.code is not None and not isinstance(done.code, int):
            raise  # a message to print: the normal exit prints it
        code = done.code or 0
    exit_without_teardown(code)


if __name__ == "__main__":
    run()
