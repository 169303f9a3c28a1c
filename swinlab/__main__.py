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
  signal                            signal propagation across depths, SwinV2 Figure 2 (swinlab.tools.signal_study)
  data optimize | bench             image folder -> LitData shards; the data path's images/s (swinlab.tools.data)
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional

from .errors import SwinlabError, write_failure

# command -> module whose main(argv) runs it
COMMANDS = {
    "models": "swinlab.tools.catalog",
    "convert": "swinlab.tools.convert",
    "bench": "swinlab.tools.bench",
    "estimate": "swinlab.tools.estimate",
    "ablate": "swinlab.tools.ablate",
    "signal": "swinlab.tools.signal_study",
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
    except Exception as exc:  # a place that cannot be written (full disk, read-only ...) that no command named itself
        line = next(filter(None, map(write_failure, _chain(exc))), None)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


def _chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def run() -> None:
    """Entry point of ``python -m swinlab`` and the ``swinlab`` console script: :func:`main`, then a normal exit with
    its code (argparse's and LightningCLI's own exits for --help, --print_config and usage errors pass through)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
