"""Before the ranks meet: what the launch environment says, checked against the trainer's settings, and a bounded
rendezvous.

- :func:`check_launch` (every rank, from the CLI before anything is built) stops with one ``ConfigError`` line where
  the processes could only wait for each other: SLURM task counts that disagree with ``devices x num_nodes``
  (``--ntasks`` without ``--ntasks-per-node``, a multi-task batch script that runs python without ``srun``,
  ``salloc``'s job name ``interactive`` under ``srun``), torchrun-style variables left in the shell that contradict
  ``--trainer.devices``, a master address that does not resolve, a master port already taken on the first rank.
- :class:`RendezvousWatchdog` ends a rank that has not met the others within ``SWINLAB_RENDEZVOUS_TIMEOUT`` seconds
  (default 600) with one line naming the address, the port and the likely causes, instead of c10d's silent retries
  until the job's time limit.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any, Callable, Optional, Tuple

from lightning.pytorch.callbacks import Callback

from ..errors import ConfigError

TIMEOUT_ENV = "SWINLAB_RENDEZVOUS_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
INTERACTIVE = ("bash", "interactive")  # SLURM job names Lightning takes for "not a SLURM job"


def _as_dict(config: Any) -> dict:
    return config.as_dict() if hasattr(config, "as_dict") else dict(config or {})


def _devices(trainer: dict) -> Optional[int]:
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return None


def _int(value: Optional[str]) -> Optional[int]:
    """SLURM counts: "2", or "2(x3)" for a repeated value."""
    if value is None:
        return None
    head = str(value).split("(")[0].split(",")[0].strip()
    return int(head) if head.isdigit() else None


def _slurm(env) -> bool:
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in INTERACTIVE


def _torchrun(env) -> bool:
    return bool(env.get("TORCHELASTIC_RUN_ID"))


def world_size(config: Any) -> Optional[int]:
    """``devices x num_nodes`` of a config, where the devices are a number (None for "auto")."""
    trainer = _as_dict(config).get("trainer") or {}
    devices = _devices(trainer)
    return devices * int(trainer.get("num_nodes") or 1) if devices else None


def master_address(env=os.environ) -> Tuple[Optional[str], str]:
    """The address the ranks will meet at, as Lightning chooses it, and where it came from."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"], "MASTER_ADDR"
    if _slurm(env) and env.get("SLURM_NODELIST"):
        from lightning.fabric.plugins.environments import SLURMEnvironment
        return SLURMEnvironment.resolve_root_node_address(env["SLURM_NODELIST"]), \
            f"the first node of SLURM_NODELIST={env['SLURM_NODELIST']}"
    return None, ""


def master_port(env=os.environ) -> Optional[int]:
    """The port rank 0 will listen on, where it is fixed before the run starts (MASTER_PORT, or Lightning's port for
    a SLURM job: 15000 + the job id's last four digits); None where Lightning picks a free one itself."""
    if env.get("MASTER_PORT", "").isdigit():
        return int(env["MASTER_PORT"])
    if _slurm(env) and env.get("SLURM_JOB_ID", "").isdigit():
        return 15000 + int(env["SLURM_JOB_ID"][-4:])
    return None


def _first_rank(env) -> bool:
    return all(env.get(v) in (None, "", "0") for v in ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK",
                                                      "LOCAL_RANK"))


def check_launch(config: Any, env=None) -> None:
    """Refuse, in one line, a launch whose processes could only wait for each other (see the module docstring)."""
    env = os.environ if env is None else env
    trainer = _as_dict(config).get("trainer") or {}
    devices, nodes = _devices(trainer), int(trainer.get("num_nodes") or 1)
    world = devices * nodes if devices else None
    ntasks = _int(env.get("SLURM_NTASKS"))
    if (env.get("SLURM_JOB_NAME") in INTERACTIVE and "SLURM_STEP_ID" in env and (ntasks or 1) > 1
            and not _torchrun(env)):
        raise ConfigError(
            f"this is one of {ntasks} srun tasks in a SLURM job named {env['SLURM_JOB_NAME']!r} (salloc's default), "
            f"which Lightning takes for 'not a SLURM job': every task would start ranks of its own. Name the "
            f"allocation (salloc -J swinlab ...), or start one process without srun and let --trainer.devices "
            f"start the ranks")
    if _slurm(env) and not _torchrun(env):
        per_node, nnodes = _int(env.get("SLURM_NTASKS_PER_NODE")), _int(env.get("SLURM_NNODES") or
                                                                         env.get("SLURM_JOB_NUM_NODES"))
        if (ntasks or 1) > 1 and "SLURM_STEP_ID" not in env:
            raise ConfigError(
                f"python runs in the batch script of a SLURM job of {ntasks} tasks, not under srun: it would wait "
                f"for {ntasks - 1} rank(s) that nothing starts. Start it with srun (srun python -m swinlab fit ...), "
                f"as docs/slurm/cpu.sbatch does")
        if (ntasks or 1) > 1 and per_node is None:
            raise ConfigError(
                f"SLURM starts {ntasks} tasks (--ntasks={ntasks}) without --ntasks-per-node, which Lightning needs "
                f"(one task per device on every node): use --nodes=<N> --ntasks-per-node=<devices per node>")
        if nnodes is not None and nodes != nnodes:
            raise ConfigError(f"--trainer.num_nodes {nodes} but the SLURM allocation has {nnodes} node(s): set "
                              f"--trainer.num_nodes {nnodes} (docs/slurm/cpu.sbatch takes it from "
                              f"SLURM_JOB_NUM_NODES)")
        if devices is not None and per_node is not None and devices != per_node:
            raise ConfigError(f"--trainer.devices {devices} but SLURM starts {per_node} task(s) per node "
                              f"(--ntasks-per-node): one task per device: set --trainer.devices {per_node}, or "
                              f"submit with --ntasks-per-node={devices}")
        if world is not None and ntasks is not None and ntasks != world:
            raise ConfigError(f"SLURM started {ntasks} task(s) but --trainer.devices {devices} x --trainer.num_nodes "
                              f"{nodes} = {world}: srun one task per device (--nodes={nodes} "
                              f"--ntasks-per-node={devices})")
    elif not _slurm(env):
        for var, expected, what in (("WORLD_SIZE", world, f"--trainer.devices {devices} x --trainer.num_nodes "
                                                          f"{nodes} = {world}"),
                                    ("LOCAL_WORLD_SIZE", devices, f"--trainer.devices {devices}")):
            value = env.get(var)
            if value is not None and expected is not None and value.isdigit() and int(value) != expected:
                raise ConfigError(f"{var}={value} in the environment (set by torchrun, or left exported in this "
                                  f"shell) but {what}: make them agree, or unset {var} when not launching with "
                                  f"torchrun")
        local = env.get("LOCAL_RANK")
        if local is not None and local.isdigit() and devices is not None and int(local) >= devices:
            raise ConfigError(f"LOCAL_RANK={local} in the environment (set by torchrun, or left exported in this "
                              f"shell) but --trainer.devices {devices} has local ranks 0..{devices - 1}: unset "
                              f"LOCAL_RANK when not launching with torchrun")
    several = (world or 1) > 1 or (ntasks or 1) > 1 or (_int(env.get("WORLD_SIZE")) or 1) > 1
    if not several:
        return
    addr, source = master_address(env)
    if addr:
        try:
            socket.getaddrinfo(addr, None)
        except socket.gaierror as exc:
            where = f" ({source})" if source != "MASTER_ADDR" else ""
            raise ConfigError(f"MASTER_ADDR {addr}{where} does not resolve on {socket.gethostname()} "
                              f"({exc.strerror}): every rank would wait for it until the time limit. Make the node "
                              f"names resolve (DNS, /etc/hosts) or export MASTER_ADDR=<the first node's address>") \
                from None
    port = master_port(env)
    if port is not None and _first_rank(env) and not _torchrun(env) and ("SLURM_STEP_ID" in env or
                                                                         env.get("MASTER_PORT")):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("", port))
            except OSError as exc:
                how = "MASTER_PORT" if env.get("MASTER_PORT") else \
                    "Lightning's port for this SLURM job (15000 + the job id's last four digits)"
                raise ConfigError(f"port {port} ({how}) is taken on {socket.gethostname()} ({exc.strerror}): the "
                                  f"first rank listens there for the others. Export MASTER_PORT=<a free port>") \
                    from None


def rendezvous_timeout(env=os.environ) -> float:
    raw = env.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return value


class RendezvousWatchdog(Callback):
    """Started before the trainer runs (:meth:`start`) and stopped in ``setup``, which Lightning calls on every rank
    after the ranks have met (its ``pre_setup`` barrier). If that takes longer than the timeout, the process prints
    one line and exits with status 1 (``on_timeout`` runs first: the CLI undoes the run folder it reserved)."""

    def __init__(self, timeout: Optional[float] = None, on_timeout: Optional[Callable[[], None]] = None):
        super().__init__()
        self.timeout = rendezvous_timeout() if timeout is None else float(timeout)
        self.on_timeout = on_timeout
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="swinlab-rendezvous", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.stop()

    def _watch(self) -> None:
        if self._done.wait(self.timeout):
            return
        env = os.environ
        addr, port = env.get("MASTER_ADDR", "?"), env.get("MASTER_PORT", "?")
        rank = env.get("RANK") or env.get("SLURM_PROCID") or env.get("LOCAL_RANK") or "0"
        total = env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or "?"
        if self.on_timeout is not None:
            try:
                self.on_timeout()
            except Exception:  # pragma: no cover - the line below matters more
                pass
        print(f"error: rank {rank} of {total}: the ranks did not all meet within {self.timeout:g} s at "
              f"{addr}:{port}. Likely: a rank that did not start or failed (see the other tasks' logs), fewer "
              f"processes than devices x num_nodes, or {addr}:{port} not reachable from this node (firewall, "
              f"another network interface). {TIMEOUT_ENV} sets the limit", file=sys.stderr, flush=True)
        os._exit(1)
