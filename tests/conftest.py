"""Shared test setup: CPU-only defaults, caches inside the repo's ignored .cache/, small helpers."""
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: more threads only add OpenMP overhead (2-core CI)


def randomize_(model: torch.nn.Module, seed: int = 1, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter a non-trivial random value (fresh V2 blocks are identities: their post-norms are 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "logit_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 3)
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def python_exe() -> str:
    return sys.executable


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# Files that hold the long multi-process runs go first: under ``pytest -n 2 --dist loadfile`` (the README's command)
# each file runs whole on one worker, and a long file started last would leave the other worker idle at the end.
FIRST = ("test_launch.py", "test_distributed.py", "test_meta_init.py", "test_simmim.py", "test_docs_commands.py")


def pytest_collection_modifyitems(config, items):
    """Long files first (see FIRST). Tests marked ``gpu`` need a CUDA device: without one they are skipped, with the
    reason (``pytest -m gpu`` on a CUDA machine runs them; docs/benchmarks.md)."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: file order kept otherwise
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device visible (run `pytest -m gpu` on a GPU machine, "
                                   "docs/benchmarks.md)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
