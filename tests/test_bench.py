"""``python -m swinlab bench``: one step on a tiny model, valid JSON, clear errors."""
import json

import pytest
import torch
from helpers import requires_cuda

from swinlab.__main__ import main as cli_main
from swinlab.tools import bench

REQUIRED = ("model", "mode", "precision", "device", "batch_size", "img_s", "timm_img_s", "ratio", "peak_mem_bytes",
            "gflops_per_img", "mfu")


def _run_json(capsys, *args):
    assert cli_main(["bench", *args, "--json"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]


@pytest.mark.parametrize("model,mode", [("swin_pico_patch2_window4_32", "infer"),
                                        ("swinv2_pico_patch2_window4_32", "train")])
def test_bench_one_step_json_with_timm(capsys, model, mode):
    (row,) = _run_json(capsys, "--model", model, "--mode", mode, "--batch-size", "2", "--steps", "1",
                       "--warmup", "0", "--compare", "timm", "--num-classes", "10")
    assert set(REQUIRED) <= set(row)
    assert (row["model"], row["mode"], row["precision"], row["batch_size"]) == (model, mode, "32", 2)
    assert row["device"].startswith("cpu") or torch.cuda.is_available()
    assert row["img_s"] > 0 and row["timm_img_s"] > 0
    assert row["ratio"] == pytest.approx(row["img_s"] / row["timm_img_s"], rel=1e-2)
    assert row["ratio_paired"] == pytest.approx(row["timm_step_ms_all"][0] / row["step_ms_all"][0], rel=1e-2)
    assert row["peak_mem_bytes"] > 10 * 2 ** 20
    assert row["timm_fused_attn"] is False  # timm's default config: no SDPA in V1 (experimental) or V2 (none)
    # FLOPs: torch's own counter on the explicit-softmax forward (every matmul and the conv), not swinlab's formula;
    # a training step counts as 3 forwards (forward + backward's two matmuls per forward matmul)
    assert row["gflops_per_img"] == pytest.approx(_counted_gflops(model) * (3 if mode == "train" else 1), rel=1e-3)


def _counted_gflops(model):
    from torch.utils.flop_counter import FlopCounterMode

    from swinlab.models import create_model
    net = create_model(model, num_classes=10, fused_attn=False).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(1, 3, *net.img_size))
    return counter.get_total_flops() / 1e9


def test_bench_mfu_is_achieved_flops_over_the_given_peak(capsys):
    (row,) = _run_json(capsys, "--model", "v1_pico", "--mode", "infer", "--batch-size", "2", "--steps", "2",
                       "--warmup", "0", "--num-classes", "10", "--peak-tflops", "0.5")
    gflops = _counted_gflops("swin_pico_patch2_window4_32")
    img_s = 2 / (sum(row["step_ms_all"]) / len(row["step_ms_all"]) / 1e3)  # the mean step time of the run
    assert row["img_s"] == pytest.approx(img_s, rel=0.02)
    assert row["tflops_s"] == pytest.approx(gflops * img_s / 1e3, rel=0.02, abs=1e-4)
    assert row["mfu"] == pytest.approx(gflops * 1e9 * img_s / 0.5e12, rel=0.02, abs=1e-4)
    assert 0 < row["mfu"] < 1


def test_bench_several_runs_and_markdown(capsys):
    assert cli_main(["bench", "--model", "v1_pico", "--mode", "infer", "train", "--batch-size", "1", "--steps", "1",
                     "--warmup", "0", "--num-classes", "10", "--json", "--markdown"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert [r["mode"] for r in rows] == ["infer", "train"]
    assert all(r["timm_img_s"] is None and r["ratio"] is None for r in rows)  # no --compare
    table = [ln for ln in out.splitlines() if ln.startswith("| swin_pico")]
    assert len(table) == 2 and "| infer | 32 | 1 |" in table[0]


@pytest.mark.parametrize("args,match", [
    (["--model", "swin_tiny_nope"], "unknown model"),
    (["--model", "v1_pico", "--steps", "0"], "steps >= 1"),
    (["--model", "v1_pico", "--precision", "fp16", "--device", "cpu"], "fp16 autocast on the CPU"),
    (["--model", "swinv2_giant_cpu_patch2_window4_32", "--compare", "timm", "--steps", "1"], "no counterpart"),
])
def test_bench_bad_input_is_one_clear_line(capsys, args, match):
    assert cli_main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


def test_peak_tflops_by_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert bench.device_peak_tflops(torch.device("cuda"), "bf16") == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert bench.device_peak_tflops(torch.device("cuda"), "bf16") == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert bench.device_peak_tflops(torch.device("cuda"), "bf16") == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    assert bench.device_peak_tflops(torch.device("cuda"), "bf16") is None
    assert bench.device_peak_tflops(torch.device("cpu"), "bf16") is None


@requires_cuda
@pytest.mark.gpu
def test_bench_cuda_bf16_memory_and_mfu(capsys):
    (row,) = _run_json(capsys, "--model", "swinv2_pico_patch2_window4_32", "--mode", "train", "--precision", "bf16",
                       "--batch-size", "4", "--steps", "2", "--warmup", "1", "--compare", "timm")
    assert row["peak_mem_bytes"] > 0 and row["timm_peak_mem_bytes"] > 0
    assert row["mem_ratio"] == pytest.approx(row["peak_mem_bytes"] / row["timm_peak_mem_bytes"], rel=1e-3)
    assert row["peak_mem_scope"].startswith("cuda")
