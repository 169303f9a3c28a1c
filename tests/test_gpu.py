"""One command validates a CUDA GPU: ``pytest -m gpu`` (about 8-10 minutes on one H100; docs/benchmarks.md).

Every test here is marked ``gpu``; without CUDA the conftest hook skips them with the reason. What runs:

1. Attention: fused (SDPA) == explicit softmax in bf16 and fp16, V1 and V2, shifted and padded inputs, outputs and
   gradients, each also against an fp32 reference; and the fused path really runs a fused kernel (flash, memory
   efficient or cuDNN), never SDPA's math fallback, in training and inference at Swin-T / SwinV2-T sizes.
2. ``python -m swinlab fit`` as users start it (subprocesses, synthetic data, one GPU, bf16-mixed): SwinV2-T for 3
   steps through DDP, FSDP2, FSDP2 + CPU offload, ZeRO-2 and ZeRO-3, and SwinV2-G (experiments/v2_g.yaml) for 2
   optimizer steps with FSDP2 + CPU offload, all at the same time (the GPU holds them easily; SwinV2-G's host-side
   AdamW is the long pole). Exit 0, finite losses read back from TensorBoard, decreasing for the small runs (a fixed
   batch of 16), peak GPU memory (CUDA max allocated, and nvidia-smi per process where visible) and peak host RSS.
3. ``python -m swinlab bench`` against timm in bf16: Swin-T, SwinV2-T, SwinV2-B eager (train + infer), Swin-T
   against timm with its fused attention forced on (``TIMM_FUSED_ATTN=2``), then compiled training, SwinV2-B first.

Figures are printed and written to ``$SWINLAB_GPU_OUT`` (default: a new temporary directory, printed):
``gpu_report.md`` (everything), ``bench.jsonl`` (one JSON row per bench run) and ``fits.json``.

Time budget: ``SWINLAB_GPU_BUDGET_S`` (default 540 s, counted from collection; 0 = none). A compiled bench that
would not finish inside it is skipped with a reason and its command; run those with ``pytest -m gpu -k compiled``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, randomize_

pytestmark = pytest.mark.gpu

_T0 = time.monotonic()
BUDGET_S = float(os.environ.get("SWINLAB_GPU_BUDGET_S", "540"))
RESERVE_S = 60.0  # gpu tests in files collected after this one (test_reliability) and pytest's own teardown

PICO = {"v1": "swin_pico_patch2_window4_32", "v2": "swinv2_pico_patch2_window4_32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# relative L2 error (fused vs unfused): (outputs and all gradients, one parameter group's gradients). Measured on a
# CPU with the same models (SDPA forced in training): bf16 <= 1.9e-2 / 6.0e-2, fp16 <= 1.1e-3 / 7.5e-3.
TOLERANCE = {"bf16": (5e-2, 0.15), "fp16": (1e-2, 3e-2)}
GROUPS = {"position bias": ("relative_position_bias_table", "cpb_mlp"), "logit scale": ("logit_scale",),
          "qkv": ("qkv.weight",)}
FUSED_SDPA_OPS = ("aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
                  "aten::_scaled_dot_product_cudnn_attention")
MATH_SDPA_OP = "aten::_scaled_dot_product_attention_math"


# -- output: terminal (through pytest's capture) and $SWINLAB_GPU_OUT ---------------------------------------------
_OUT = {}


def out_dir() -> Path:
    if "dir" not in _OUT:
        given = os.environ.get("SWINLAB_GPU_OUT")
        path = Path(given) if given else Path(tempfile.mkdtemp(prefix="swinlab_gpu_"))
        path.mkdir(parents=True, exist_ok=True)
        _OUT["dir"] = path
    return _OUT["dir"]


@pytest.fixture
def say(capsys):
    """Print to the terminal even under pytest's capture, and append the same text to gpu_report.md."""
    def _say(text: str) -> None:
        report = out_dir() / "gpu_report.md"
        first = not report.exists()
        with open(report, "a") as fh:
            if first:
                fh.write(f"# swinlab GPU suite ({time.strftime('%Y-%m-%d %H:%M:%S')})\n\n")
            fh.write(f"[+{_elapsed():.0f} s] {text.rstrip()}\n\n")
        with capsys.disabled():
            head = f"\n[gpu figures -> {out_dir()}]\n" if first else ""
            print(f"{head}[+{_elapsed():.0f} s] {text.rstrip()}", flush=True)
    return _say


def _elapsed() -> float:
    return time.monotonic() - _T0


def _left() -> float:
    return BUDGET_S - _elapsed() - RESERVE_S if BUDGET_S > 0 else float("inf")


def _need(seconds: float, what: str, command: str) -> None:
    if _left() < seconds:
        pytest.skip(f"time budget: {what} needs ~{seconds:.0f} s, {max(0.0, _left()):.0f} s left of "
                    f"SWINLAB_GPU_BUDGET_S={BUDGET_S:.0f} (minus {RESERVE_S:.0f} s reserve); run it alone: {command}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(**extra: str) -> dict:
    """A user's shell: not a launched rank, no SLURM allocation, swinlab importable, DeepSpeed on CUDA."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TIMM_FUSED_ATTN", "CUDA_LAUNCH_BLOCKING"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(DS_ACCELERATOR="cuda", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env.update(extra)
    return env


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- 1. attention: fused == unfused in half precision, and a fused kernel runs -------------------------------------
def _fwd_bwd(model, x, fused: bool, dtype):
    model.set_fused_attn(fused)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext():
        out = model(x)
    out.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), grads


def _varied(model):
    """V2's position bias is 16*sigmoid(CPB MLP): with small random weights it is ~8 everywhere, a constant that
    softmax ignores. Larger CPB weights make it vary over positions, so a wrong bias (or bias gradient) shows."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cpb_mlp" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.dim() == 1 or p.shape[1] == 2 else 0.1))
    return model


@pytest.fixture
def exact_fp32():
    """fp32 reference without TF32 (cuDNN convolutions use TF32 by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fused_equals_unfused_in_half_precision(version, dtype, exact_fp32, say):
    """Training mode (the memory-efficient kernel with the gradient of the folded bias+mask) on inputs that are
    shifted and padded in every stage (36: stages 18/9/5/3) and larger than configured (44 on a 32 model)."""
    import swinlab

    tol_all, tol_group = TOLERANCE[dtype]
    lines = [f"attention {version} {dtype}: relative L2 error (fused vs unfused | fused vs fp32 | unfused vs fp32)"]
    for img, size in ((36, 36), (32, 44)):
        model = _varied(randomize_(swinlab.create_model(PICO[version], img_size=img, num_classes=10,
                                                        drop_path_rate=0.0), seed=1)).cuda().train()
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)).cuda()
        ref = _fwd_bwd(model, x, False, None)
        fused = _fwd_bwd(model, x, True, DTYPES[dtype])
        unfused = _fwd_bwd(model, x, False, DTYPES[dtype])
        assert torch.isfinite(fused[0]).all() and torch.isfinite(unfused[0]).all()
        names = sorted(ref[1])
        for run, grads in (("fused", fused[1]), ("unfused", unfused[1])):
            missing = sorted(set(names) - set(grads))
            assert not missing, f"{version} {dtype} {img}->{size}: no gradient in the {run} path for {missing[:4]}"
        checks = {"logits": lambda r: r[0],
                  "all gradients": lambda r, m=names: torch.cat([r[1][n].flatten() for n in m])}
        for group, keys in GROUPS.items():
            members = [n for n in names if any(k in n for k in keys)]
            if members:
                checks[f"{group} gradients"] = lambda r, m=members: torch.cat([r[1][n].flatten() for n in m])
        for what, get in checks.items():
            fu, fr, ur = _rel(get(fused), get(unfused)), _rel(get(fused), get(ref)), _rel(get(unfused), get(ref))
            lines.append(f"  {img}->{size} {what}: {fu:.2e} | {fr:.2e} | {ur:.2e}")
            tol = tol_all if what in ("logits", "all gradients") else tol_group
            assert fu <= tol, f"{version} {dtype} {img}->{size} {what}: fused vs unfused {fu:.3e} > {tol}"
            assert fr <= 2 * ur + tol / 2, f"{version} {dtype} {img}->{size} {what}: fused is less accurate " \
                                           f"than unfused against fp32 ({fr:.3e} vs {ur:.3e})"
    say("\n".join(lines))
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_sdpa_runs_a_fused_kernel_not_the_math_fallback(name, dtype, say):
    """(a) With only flash / memory-efficient / cuDNN attention allowed, training (mask gradient) and inference
    run: a math-only case would raise. (b) With PyTorch's default dispatch, the profiler shows one fused SDPA op per
    block and pass, and no math op. Window 7 (N=49, V1) has a mask PyTorch must pad for the efficient kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    import swinlab

    model = swinlab.create_model(name, num_classes=10, drop_path_rate=0.0).cuda()
    size = model.config.img_size[0]
    x = torch.randn(2, 3, size, size, device="cuda")
    n_blocks = len(model.blocks())
    dt = DTYPES[dtype]

    def train_and_infer(model):
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dt):
            out = model(x)
        out.float().logsumexp(-1).mean().backward()
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=dt):
            model(x)
        torch.cuda.synchronize()

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        train_and_infer(model)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_and_infer(model)
    counts = {}
    for e in prof.key_averages():
        counts[e.key] = counts.get(e.key, 0) + e.count
    fused = {k: counts[k] for k in FUSED_SDPA_OPS if counts.get(k)}
    kernels = sorted(k for k in counts if not k.startswith("aten::") and any(
        w in k.lower() for w in ("fmha", "flash", "cudnn", "attention", "attn")))
    say(f"SDPA {name} {dtype}: fused ops {fused}, math ops {counts.get(MATH_SDPA_OP, 0)}; "
        f"kernels: {', '.join(kernels[:6]) or 'none named'}")
    assert counts.get(MATH_SDPA_OP, 0) == 0, f"SDPA fell back to the math kernel: {counts.get(MATH_SDPA_OP)} calls"
    assert sum(fused.values()) == 2 * n_blocks, f"expected {2 * n_blocks} fused SDPA calls, got {fused}"
    del model
    torch.cuda.empty_cache()


@pytest.mark.parametrize("strategy", ["zero2", "zero3_offload", "fsdp1"])
def test_gpu_only_strategies_pass_the_pre_flight_check_where_cuda_is(strategy, capsys, monkeypatch):
    """The other half of test_scale's refusal test: with CUDA present and accelerator auto, the same configs pass."""
    import yaml

    from swinlab.__main__ import main
    from swinlab.training.preflight import check_config

    args = ["fit", "--config", "experiments/quickstart.yaml", "--config", f"experiments/strategy/{strategy}.yaml",
            "--trainer.accelerator", "auto", "--print_config"]
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code in (0, None)
    check_config(yaml.safe_load(capsys.readouterr().out))


# -- 2. python -m swinlab fit through every strategy, and SwinV2-G on one GPU -------------------------------------
SMALL_EXPERIMENT = ["--config", "experiments/v2_t.yaml"]
SMALL = ["--data", "swinlab.data.SyntheticDataModule", "--data.init_args.img_size", "256",
         "--data.init_args.num_classes", "10", "--data.init_args.batch_size", "16",
         "--data.init_args.train_samples", "16", "--data.init_args.num_workers", "2",
         "--model.init_args.num_classes", "10", "--model.init_args.mixup", "0", "--model.init_args.cutmix", "0",
         "--model.init_args.model_kwargs", "{drop_path_rate: 0.0}", "--model.init_args.warmup_steps", "0",
         "--model.init_args.scale_lr", "false", "--model.init_args.base_lr", "1e-3", "--model.init_args.min_lr", "1e-5",
         "--trainer.max_steps", "3", "--checkpoint.monitor", "null"]
STRATEGY_ARGS = {
    "ddp": ["--config", "experiments/strategy/ddp.yaml"],
    "fsdp2": ["--config", "experiments/strategy/fsdp2.yaml", "--trainer.strategy.init_args.data_parallel_size", "1"],
    "fsdp2_offload": ["--config", "experiments/strategy/fsdp2_offload.yaml",
                      "--trainer.strategy.init_args.data_parallel_size", "1"],
    "zero2": ["--config", "experiments/strategy/zero2.yaml"],
    "zero3": ["--config", "experiments/strategy/zero3.yaml"],
}
V2_G = ["--config", "experiments/v2_g.yaml", "--config", "experiments/strategy/fsdp2_offload.yaml",
        "--data", "swinlab.data.SyntheticDataModule", "--data.init_args.img_size", "192",
        "--data.init_args.num_classes", "1000", "--data.init_args.batch_size", "8",
        "--data.init_args.train_samples", "16", "--data.init_args.num_workers", "2",
        "--trainer.strategy.init_args.data_parallel_size", "1", "--trainer.max_steps", "2",
        # as docs/scaling.md's GPU commands: no 3B-parameter checkpoint (~48 GB with AdamW state), no export
        "--checkpoint.monitor", "null", "--trainer.enable_checkpointing", "false", "--export.enabled", "false"]
COMMON = ["--trainer.devices", "1", "--trainer.precision", "bf16-mixed", "--trainer.limit_val_batches", "0",
          "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
          "--trainer.enable_progress_bar", "false"]


def fit_command(name: str, save_dir: Path) -> list:
    """The argv after ``python -m swinlab fit`` for one run (relative paths: it runs from the repo root)."""
    # the experiment first, then the strategy file, then the overrides (later wins)
    body = V2_G if name == "v2_g" else SMALL_EXPERIMENT + STRATEGY_ARGS[name] + SMALL
    return [*body, *COMMON, "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.logger.init_args.name", name]


class _GpuMemPoller(threading.Thread):
    """Peak GPU memory per process from ``nvidia-smi`` (CUDA context and allocator cache included), 1 s apart."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mib = {}
        self.stop = threading.Event()
        self.exe = shutil.which("nvidia-smi")

    def run(self):
        while self.exe and not self.stop.is_set():
            try:
                query = [self.exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
                res = subprocess.run(query, capture_output=True, text=True, timeout=10)
                for line in res.stdout.splitlines():
                    pid, mib = (int(v) for v in line.split(","))
                    self.peak_mib[pid] = max(self.peak_mib.get(pid, 0), mib)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self.stop.wait(1.0)


class _Fit:
    """One ``python -m swinlab fit`` child; reaped with os.wait4 for its own peak RSS."""

    def __init__(self, name: str, argv: list, log: Path):
        self.name, self.log, self.t0 = name, log, time.monotonic()
        self.rc = self.wall_s = self.max_rss = None
        with open(log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "swinlab", "fit", *argv], cwd=ROOT, env=_child_env(),
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def poll(self) -> bool:
        if self.rc is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid == 0:
                return False
            self.rc = self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.wall_s, self.max_rss = time.monotonic() - self.t0, usage.ru_maxrss * 1024
        return True

    def kill(self) -> None:
        if self.rc is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while not self.poll():
                time.sleep(0.2)
            self.rc = "killed (time budget)"

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _scalars(run_dir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)] if tag in ea.Tags().get("scalars", []) else []


@pytest.fixture(scope="module")
def fit_runs(request, tmp_path_factory):
    """Start every selected fit at once, wait for all (within the time budget), collect what each logged."""
    wanted = []
    for item in request.session.items:
        if item.module is sys.modules[__name__] and "fit_runs" in getattr(item, "fixturenames", ()):
            params = getattr(item, "callspec", None)
            wanted.append(params.params.get("strategy") if params and "strategy" in params.params else "v2_g")
    wanted = list(dict.fromkeys(wanted))
    base = tmp_path_factory.mktemp("fits")
    poller = _GpuMemPoller()
    poller.start()
    children = {n: _Fit(n, fit_command(n, base / "runs"), base / f"{n}.log") for n in wanted}
    deadline = time.monotonic() + max(60.0, min(480.0, _left()))
    while not all(c.poll() for c in children.values()):
        if time.monotonic() > deadline:
            for c in children.values():
                c.kill()
            break
        time.sleep(0.5)
    poller.stop.set()
    results = {}
    for n, c in children.items():
        run = base / "runs" / n / "version_0"
        r = dict(name=n, rc=c.rc, wall_s=round(c.wall_s or 0.0, 1), max_rss_gib=(c.max_rss or 0) / 2 ** 30,
                 smi_peak_mib=poller.peak_mib.get(c.proc.pid), run_dir=str(run), tail=c.tail(),
                 command="python -m swinlab fit " + " ".join(fit_command(n, Path("$RUNS"))))
        if run.is_dir():
            ckpts = sorted(p.name for p in (run / "checkpoints").glob("*")) if (run / "checkpoints").is_dir() else []
            r.update(losses=_scalars(run, "train/loss"), peak_alloc=_scalars(run, "train/cuda_peak_allocated_bytes"),
                     images_per_sec=_scalars(run, "train/device/samples_per_sec"), checkpoints=ckpts)
        results[n] = r
    (out_dir() / "fits.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def _fit_line(r: dict) -> str:
    peak = max(r.get("peak_alloc") or [0]) / 2 ** 30
    ips = r.get("images_per_sec") or []
    smi = f"{r['smi_peak_mib'] / 1024:.1f} GiB" if r.get("smi_peak_mib") else "n/a"
    return (f"fit {r['name']}: exit {r['rc']}, {r['wall_s']} s wall, losses "
            f"{[round(v, 4) for v in r.get('losses') or []]}, peak GPU (max allocated) {peak:.2f} GiB, nvidia-smi "
            f"{smi}, host max RSS {r['max_rss_gib']:.1f} GiB, images/s (last) {ips[-1] if ips else float('nan'):.1f}")


@pytest.mark.parametrize("strategy", list(STRATEGY_ARGS))
def test_fit_three_steps_through_each_strategy(strategy, fit_runs, say):
    r = fit_runs[strategy]
    say(_fit_line(r))
    assert r["rc"] == 0, f"{r['command']}\nexit {r['rc']}:\n{r['tail']}"
    losses = r.get("losses") or []
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], f"the loss on one fixed batch of 16 did not fall in 3 AdamW steps: {losses}"
    assert max(r.get("peak_alloc") or [0]) > 0
    assert "last.ckpt" in r.get("checkpoints", []), r.get("checkpoints")  # a file (DDP) or a sharded directory


def test_v2_g_two_steps_on_one_gpu(fit_runs, say):
    """SwinV2-G (3.0B parameters, 192/W12, checkpointing) with FSDP2 + CPU offload, batch 8, 2 optimizer steps."""
    r = fit_runs["v2_g"]
    peak = max(r.get("peak_alloc") or [0])
    say(_fit_line(r) + f"\nv2_g: peak GPU memory {peak / 2 ** 30:.2f} GiB (CUDA max allocated; estimator: "
        f"`python -m swinlab estimate`), host peak RSS {r['max_rss_gib']:.1f} GiB")
    assert r["rc"] == 0, f"{r['command']}\nexit {r['rc']}:\n{r['tail']}"
    losses = r.get("losses") or []
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    assert 0 < peak < torch.cuda.get_device_properties(0).total_memory


# -- 3. python -m swinlab bench against timm, bf16 ----------------------------------------------------------------
BENCH = ["--precision", "bf16", "--batch-size", "64", "--steps", "20", "--warmup", "5", "--compare", "timm",
         "--device", "cuda", "--json", "--markdown"]
SPEED_MODELS = ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_base_window8_256"]
COMPILE_S = {"swinv2_base_window8_256": 240, "swinv2_tiny_window8_256": 150, "swin_tiny_patch4_window7_224": 130}


def _bench(args: list, say, env_extra=None, timeout=None) -> list:
    cmd = [sys.executable, "-m", "swinlab", "bench", *args]
    shown = ("TIMM_FUSED_ATTN=2 " if env_extra else "") + "python -m swinlab bench " + " ".join(args)
    res = subprocess.run(cmd, cwd=ROOT, env=_child_env(**(env_extra or {})), capture_output=True, text=True,
                         timeout=timeout or max(60.0, _left()))
    rows = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    if rows:
        with open(out_dir() / "bench.jsonl", "a") as fh:
            for row in rows:
                fh.write(json.dumps(dict(row, command=shown)) + "\n")
    assert res.returncode == 0, f"{shown}\nexit {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    from swinlab.tools.bench import markdown_table

    say(f"`{shown}`\n\n" + markdown_table(rows) + "\n\nfirst step (s, includes compile): " +
        ", ".join(f"{r['model']} {r['mode']} {r['first_step_s']}/{r.get('timm_first_step_s')}" for r in rows))
    for r in rows:
        assert r["precision"] == "bf16" and r["peak_mem_scope"].startswith("cuda")
        assert r["img_s"] > 0 and r["timm_img_s"] > 0 and r["ratio"] > 0
        assert r["peak_mem_bytes"] > 0 and r["timm_peak_mem_bytes"] > 0
    return rows


def _targets(rows: list) -> str:
    """The issue's speed targets, met or not (reported, not asserted: they are goals, not correctness)."""
    out = []
    for r in rows:
        if r["model"].startswith("swinv2"):
            out.append(f"{r['model']} {r['mode']}{' compiled' if r['compile'] else ''}: ratio {r['ratio']:.2f} "
                       f"({'met' if r['ratio'] >= 1.5 else 'missed'} >= 1.5)")
        if r["model"] == "swinv2_base_window8_256" and r["mode"] == "train":
            mfu = r.get("mfu")
            out.append(f"  MFU {100 * mfu:.1f}% ({'met' if mfu >= 0.40 else 'missed'} >= 40%)" if mfu is not None
                       else "  MFU: unknown device peak (--peak-tflops)")
            out.append(f"  memory ratio {r['mem_ratio']:.2f} ({'met' if r['mem_ratio'] <= 0.6 else 'missed'} <= 0.6)")
    return "targets: " + ("\n".join(out) if out else "none in these rows")


def test_bench_eager_against_timm(say):
    _need(60, "eager bench (3 models, train + infer)", "python -m swinlab bench --model " + " ".join(SPEED_MODELS)
          + " --mode train infer " + " ".join(BENCH))
    rows = _bench(["--model", *SPEED_MODELS, "--mode", "train", "infer", *BENCH], say)
    assert [(r["model"], r["mode"]) for r in rows] == [(m, x) for m in SPEED_MODELS for x in ("train", "infer")]
    assert not any(r["compile"] or r["timm_fused_attn"] for r in rows)  # timm's default: no SDPA in Swin
    say(_targets(rows))


def test_bench_eager_against_timm_v1_with_its_fused_attention(say):
    _need(25, "eager bench of Swin-T against timm's fused V1", "TIMM_FUSED_ATTN=2 python -m swinlab bench --model "
          "swin_tiny_patch4_window7_224 --mode train infer " + " ".join(BENCH))
    rows = _bench(["--model", "swin_tiny_patch4_window7_224", "--mode", "train", "infer", *BENCH], say,
                  env_extra={"TIMM_FUSED_ATTN": "2"})
    assert all(r["timm_fused_attn"] is True for r in rows), "TIMM_FUSED_ATTN=2 did not switch timm's V1 to SDPA"


@pytest.mark.parametrize("model", ["swinv2_base_window8_256", "swinv2_tiny_window8_256",
                                   "swin_tiny_patch4_window7_224"])
def test_bench_compiled_against_timm(model, say):
    args = ["--model", model, "--mode", "train", *BENCH, "--compile"]
    _need(COMPILE_S[model], f"compiled bench of {model} (both models compiled)",
          "python -m swinlab bench " + " ".join(args))
    rows = _bench(args, say)
    assert len(rows) == 1 and rows[0]["compile"] is True
    say(_targets(rows))
