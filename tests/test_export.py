"""``python -m swinlab convert --format timm | torch_export | onnx``: files timm, torch.export and onnxruntime load,
checked against swinlab's eager model; never overwriting, atomic writes (issue #13 part 5)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, randomize_
from test_models import timm_twin

from swinlab.__main__ import main as swinlab_main
from swinlab.models import create_model
from swinlab.tools import convert

V1, V2 = "swin_pico_patch2_window4_32", "swinv2_pico_patch2_window4_32"
ONNX_MISSING = [m for m in convert.ONNX_PACKAGES if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A timm state dict (.pth) of each pico variant with every parameter random: what users bring from timm."""
    folder = tmp_path_factory.mktemp("sources")
    paths = {}
    for i, name in enumerate((V1, V2)):
        paths[name] = folder / f"{name}.pth"
        torch.save(randomize_(timm_twin(name), seed=i + 1).state_dict(), paths[name])
    return paths


def run_convert(capsys, *argv):
    """``python -m swinlab convert <argv>`` in-process: (exit code, the JSON it printed or None, stderr lines)."""
    rc = swinlab_main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and "Warning" not in line]
    info = json.loads(captured.out.strip().splitlines()[-1]) if rc == 0 else None
    return rc, info, lines


def eager(name, source):
    return create_model(name, checkpoint=str(source)).eval()


def batch(n=2, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


# -- timm -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,suffix", [(V1, ".safetensors"), (V2, ".safetensors"), (V2, ".pth")])
def test_timm_format_loads_strictly_into_timm_with_equal_logits(tmp_path, capsys, sources, name, suffix):
    out = tmp_path / f"timm{suffix}"
    rc, info, err = run_convert(capsys, sources[name], "--model", name, "--format", "timm", "--out", out)
    assert rc == 0, err
    if suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        state = load_file(str(out))
        with safe_open(str(out), framework="pt") as f:
            recorded = json.loads(f.metadata()["pretrained_cfg"])
    else:
        saved = torch.load(out, weights_only=True)
        state, recorded = saved["state_dict"], saved["pretrained_cfg"]
        import timm.models
        timm.models.load_checkpoint(timm_twin(name), str(out), strict=True)  # timm's own loader takes it
    assert recorded == info["pretrained_cfg"] and info["pretrained_cfg_from"] == "defaults"
    assert recorded["input_size"] == [3, 32, 32] and len(recorded["mean"]) == 3
    ref = timm_twin(name).eval()
    assert set(state) == set(ref.state_dict())  # exactly timm's keys: no swinlab-only buffers
    ref.load_state_dict(state, strict=True)
    x = batch()
    with torch.no_grad():
        ours, theirs = eager(name, sources[name])(x), ref(x)
    assert theirs.abs().max() > 0.1 and max_diff(ours, theirs) <= 1e-5
    # the printed recipe builds the same twin
    again = convert.build_timm_twin(info["timm_model"], info["timm_kwargs"]).eval()
    again.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert max_diff(again(x), theirs) == 0.0


def test_timm_format_of_a_timm_registered_model_at_another_size_loads_with_pretrained_cfg_overlay(
        tmp_path, capsys, monkeypatch):
    """docs/models.md's line: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...)); here
    SwinV2-T moved to 64 px / window 4 (so timm needs img_size, window_size and pretrained_window_sizes)."""
    import timm
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the weights come from the file, never the Hub
    name = "swinv2_tiny_window8_256"
    src = tmp_path / "src.pth"
    torch.save(randomize_(timm.create_model(name)).state_dict(), src)
    out = tmp_path / "v2t_64.safetensors"
    rc, info, err = run_convert(capsys, src, "--model", name, "--img-size", "64", "--window-size", "4",
                                "--format", "timm", "--out", out)
    assert rc == 0, err
    assert info["timm_model"] == name
    kwargs = dict(info["timm_kwargs"])
    assert kwargs == dict(img_size=[64, 64], window_size=4, pretrained_window_sizes=[8, 8, 8, 8], num_classes=1000)
    ref = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=1000),
                            **kwargs).eval()
    ours = create_model(name, checkpoint=str(src), img_size=64, window_size=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) <= 1e-5


def test_timm_format_refuses_swinlab_only_switches(tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    rc, _, err = run_convert(capsys, "none.pth", "--model", "swinv2_giant_cpu_patch2_window4_32", "--format", "timm",
                             "--out", out)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: checkpoint none.pth does not exist")
    from swinlab.models import save_safetensors
    src = tmp_path / "giant.safetensors"
    save_safetensors(create_model("swinv2_giant_cpu_patch2_window4_32"), src)
    rc, _, err = run_convert(capsys, src, "--model", "swinv2_giant_cpu_patch2_window4_32", "--format", "timm",
                             "--out", out)
    assert rc == 2 and len(err) == 1 and "timm has no SwinV2 with extra_norm_period=6" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["giant.safetensors"]


def test_a_failed_check_leaves_nothing_behind(tmp_path, capsys, sources, monkeypatch):
    monkeypatch.setattr(convert, "TIMM_TOL", -1.0)  # every comparison fails
    out = tmp_path / "t.safetensors"
    rc, _, err = run_convert(capsys, sources[V1], "--model", V1, "--format", "timm", "--out", out)
    assert rc == 2 and len(err) == 1 and "differs from swinlab's model" in err[0] and "nothing written" in err[0]
    assert list(tmp_path.iterdir()) == []  # neither the file nor the temporary folder


# -- torch.export ---------------------------------------------------------------------------------------------------
def test_torch_export_through_the_command_line(tmp_path, sources):
    """As users start it: a .pt2 with a dynamic batch; the reloaded program equals the eager model at batch 5."""
    out = tmp_path / "v2.pt2"
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    res = subprocess.run([sys.executable, "-m", "swinlab", "convert", str(sources[V2]), "--model", V2,
                          "--format", "torch_export", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["dynamic"] == ["batch"] and info["static"] == dict(img_size=[32, 32], in_chans=3)
    assert info["input_shape"] == ["batch", 3, 32, 32] and info["max_abs_diff"] <= 1e-5
    files = {"pretrained_cfg.json": ""}
    program = torch.export.load(str(out), extra_files=files).module()
    assert json.loads(files["pretrained_cfg.json"]) == info["pretrained_cfg"]  # the preprocessing travels along
    x = batch(5, seed=7)
    with torch.no_grad():
        assert max_diff(program(x), eager(V2, sources[V2])(x)) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2.pt2"]


# -- ONNX -------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(bool(ONNX_MISSING), reason=f"the onnx extra is not installed (missing: {', '.join(ONNX_MISSING)}); "
                                               f"pip install -e \".[onnx]\" to run it")
def test_onnx_checked_with_onnxruntime(tmp_path, capsys, sources):
    import onnxruntime as ort
    out = tmp_path / "v1.onnx"
    rc, info, err = run_convert(capsys, sources[V1], "--model", V1, "--format", "onnx", "--out", out)
    assert rc == 0, err
    assert info["dynamic"] == ["batch"] and info["external_data"] is None and info["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.onnx"]  # one file, no temporary left
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert json.loads(session.get_modelmeta().custom_metadata_map["pretrained_cfg"]) == info["pretrained_cfg"]
    x = batch(4, seed=3)
    with torch.no_grad():
        ref = eager(V1, sources[V1])(x)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert max_diff(got, ref) <= 1e-4


def test_onnx_without_the_extra_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    out = tmp_path / "m.onnx"
    rc, _, err = run_convert(capsys, "any.pth", "--model", V1, "--format", "onnx", "--out", out)
    assert rc == 2 and len(err) == 1
    assert "onnxruntime" in err[0] and 'pip install -e ".[onnx]"' in err[0]
    assert not out.exists()


# -- never overwrite --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "timm", "torch_export", "onnx"])
def test_an_existing_out_is_refused_without_overwrite(tmp_path, capsys, sources, fmt):
    out = tmp_path / {"torch_export": "m.pt2", "onnx": "m.onnx"}.get(fmt, "m.safetensors")
    out.write_bytes(b"someone's file")
    rc, _, err = run_convert(capsys, sources[V1], "--model", V1, "--format", fmt, "--out", out)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --out") and "--overwrite" in err[0]
    assert out.read_bytes() == b"someone's file"


def test_overwrite_replaces_an_existing_out(tmp_path, capsys, sources):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    rc, _, err = run_convert(capsys, sources[V1], "--model", V1, "--out", out, "--overwrite")
    assert rc == 0, err
    x = batch()
    with torch.no_grad():
        assert torch.equal(eager(V1, out)(x), eager(V1, sources[V1])(x))


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_the_input_is_never_replaced_even_with_overwrite(tmp_path, capsys, sources, spelling):
    src = tmp_path / "in.pth"
    src.write_bytes(sources[V1].read_bytes())
    before = src.read_bytes()
    out = {"same": src, "dotted": tmp_path / "sub" / ".." / "in.pth", "symlink": tmp_path / "link.pth"}[spelling]
    if spelling == "symlink":
        out.symlink_to(src)
    for fmt in ("safetensors", "timm"):
        rc, _, err = run_convert(capsys, src, "--model", V1, "--format", fmt, "--out", out, "--overwrite")
        assert rc == 2 and len(err) == 1 and "is the input checkpoint" in err[0], err
        assert src.read_bytes() == before
