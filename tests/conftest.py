"""Test setup: CPU-only defaults, caches inside the repo's ignored .cache/, fixtures and collection hooks (shared
non-fixture helpers: tests/helpers.py)."""
import os
import subprocess
import sys

import helpers  # noqa: F401 - first: it sets the environment (DS_ACCELERATOR, caches) before torch is imported
import pytest
import torch

torch.set_num_threads(1)  # tiny models: more threads only add OpenMP overhead (2-core CI)


@pytest.fixture
def spy(monkeypatch):
    """``spy(owner, name, record)``: calls of ``owner.name`` still run, and ``record(*args, **kwargs)`` of each call
    is appended to the returned list (a method patched on its class gets ``self`` first)."""
    def install(owner, name, record):
        calls, real = [], getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(record(*args, **kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
        return calls
    return install


@pytest.fixture
def python_exe() -> str:
    return sys.executable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real two-node SLURM cluster of .ci/slurm-cluster (state in $SWINLAB_SLURM_DIR, default .cache/slurm), as
    a ``slurm.Cluster``. A running cluster is reused; one that this fixture started is stopped by the last pytest
    process (xdist worker) using it, never one started by hand or by .ci/run. Where it cannot start (not root, no
    apt-get) the tests skip with the script's reason; SWINLAB_REQUIRE_CLUSTER=1 (.ci/run) makes that a failure."""
    from slurm import SCRIPT, Cluster, state_dir
    folder = state_dir()
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        reason = (proc.stderr.strip().splitlines() or [f"{SCRIPT} start exited {proc.returncode}"])[-1]
        if proc.returncode == 3 and os.environ.get("SWINLAB_REQUIRE_CLUSTER") != "1":
            pytest.skip(f"cluster: {reason} (SWINLAB_REQUIRE_CLUSTER=1 makes this a failure)")
        pytest.fail(f"cluster: {reason}", pytrace=False)
    leases, marker = folder / "leases", folder / "run" / "started-by-pytest"
    leases.mkdir(exist_ok=True)
    if "started," in proc.stdout:
        marker.touch()
    lease = leases / str(os.getpid())
    lease.touch()
    try:
        yield Cluster(folder)
    finally:
        lease.unlink(missing_ok=True)
        others = [f for f in leases.iterdir() if not f.name.isdigit() or _alive(int(f.name))]
        if marker.exists() and not others:
            marker.unlink(missing_ok=True)
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


# the markers of timm's tests/test_models.py (tests/test_timm_suite.py runs its tests; pytest-timeout's ``timeout``
# is recorded, not enforced)
TIMM_MARKERS = ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features", "fxforward",
                "fxbackward", "timeout")


def pytest_addoption(parser):
    parser.addoption("--timm-suite", choices=("ci", "all"), default="ci",
                     help="timm's test_models.py on swinlab's models (tests/test_timm_suite*.py): 'ci' runs the "
                          "test-sized and tiny variants, 'all' every registered size as far as timm's size limits "
                          "allow (about an hour on 2 cores)")


def pytest_configure(config):
    for marker in TIMM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: timm's test_models.py marker")


# Files that hold the long multi-process runs go first: under ``pytest -n 2 --dist loadfile`` (the README's command)
# each file runs whole on one worker, and a long file started last would leave the other worker idle at the end.
FIRST = ("test_cluster.py", "test_launch.py", "test_distributed.py", "test_reliability.py", "test_simmim.py",
         "test_docs_commands.py")


def pytest_collection_modifyitems(config, items):
    """Long files first (see FIRST). Tests marked ``cluster`` use the ``slurm_cluster`` fixture (added here, so a test
    cannot forget it). Tests marked ``gpu`` need a CUDA device: without one they are skipped, with the
    reason (``pytest -m gpu`` on a CUDA machine runs them; docs/benchmarks.md)."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: file order kept otherwise
    for item in items:
        if item.get_closest_marker("cluster") is not None and "slurm_cluster" not in item.fixturenames:
            item.fixturenames.insert(0, "slurm_cluster")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device visible (run `pytest -m gpu` on a GPU machine, "
                                   "docs/benchmarks.md)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
