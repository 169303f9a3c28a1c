"""What tests share besides fixtures: the repository root, a weight randomiser and the CUDA skip mark. Tests import
these (`from helpers import ROOT`); fixtures and hooks live in conftest.py."""
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# before torch/deepspeed are imported anywhere: CPU DeepSpeed, caches inside the repo's ignored .cache/
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


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


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def free_ports(n: int) -> list:
    """n distinct free TCP ports (the sockets stay bound until all are picked, so none repeats)."""
    import socket
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def kill_when_paused(killed, whole, flag, ranks: int = 2, timeout: float = 300) -> None:
    """SIGKILL the process group of ``killed`` once each of its ``ranks`` has written ``<flag>.<rank>`` (a PauseAt
    callback), then wait for ``whole`` (the uninterrupted twin) to finish with 0; on any failure both are killed."""
    import signal
    import time
    try:
        deadline = time.time() + timeout
        while not all(pathlib.Path(f"{flag}.{r}").exists() for r in range(ranks)):
            assert killed.poll() is None, killed.stderr.read()[-3000:]
            assert time.time() < deadline, "the killed run never reached its pause step on every rank"
            time.sleep(0.2)
        os.killpg(killed.pid, signal.SIGKILL)  # rank 0 and the ranks it launched
        killed.wait(30)
        assert whole.wait(timeout) == 0, whole.stderr.read()[-3000:]
    finally:
        for p in (whole, killed):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
