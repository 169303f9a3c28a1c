"""The trust boundary of loading: a pickle is read opcode by opcode (nothing imported or resolved) and every global it
names must be one of an exact list of (module, name) pairs before torch, DCP or DeepSpeed unpickles it.

Hostile pickles are built by hand for every opcode that names a global or calls one (GLOBAL, STACK_GLOBAL with plain
and memoized operands, INST, OBJ, NEWOBJ, NEWOBJ_EX, EXT1/2/4, REDUCE/BUILD/APPEND on what is not allowed), at every
protocol 0-5, with dotted names that resolve inside allowed modules. Each payload would touch a marker file: the
first test proves that plain ``pickle.loads`` runs it, the others that swinlab refuses it and the marker never
appears: as a bare pickle, as a DCP ``.metadata``, as ``data.pkl`` inside a ``torch.save`` zip, as the first pickle
of the legacy format, and through ``python -m swinlab fit --ckpt_path`` (a folder, and ``last``).
"""
import _compat_pickle
import copyreg
import importlib.util
import io
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from swinlab.errors import CheckpointError
from swinlab.models.checkpoint import safe_torch_load
from swinlab.models.pickle_scan import TENSOR_GLOBALS, UnsafePickle, check_torch_file, pickle_globals
from swinlab.training.checkpoint_io import (
    DCP_METADATA_GLOBALS,
    DEEPSPEED_GLOBALS,
    FOLDER_TORCH_GLOBALS,
    check_checkpoint_folder,
)

PROTOCOLS = range(6)
# a run that reads FSDP2 folders (the strategy that wrote them; one process)
FSDP2 = ["--config", str(ROOT / "experiments" / "strategy" / "fsdp2.yaml"),
         "--trainer.strategy.init_args.data_parallel_size", "1"]
EXT_CODE = 0x7FFF_FF01  # copyreg extension code used by the EXT forms (registered only to prove they would run)


# -- building pickles by hand ---------------------------------------------------------------------------------------
def _str(text: str, proto: int, variant: int = 0) -> bytes:
    """Push ``text`` with a string opcode of ``proto`` (``variant`` picks among them)."""
    raw = text.encode()
    forms = {0: [b"V" + text.encode("raw_unicode_escape") + b"\n", b"S'" + raw + b"'\n"],
             1: [b"X" + struct.pack("<I", len(raw)) + raw, b"U" + bytes([len(raw)]) + raw,
                 b"T" + struct.pack("<I", len(raw)) + raw],
             4: [b"\x8c" + bytes([len(raw)]) + raw, b"\x8d" + struct.pack("<Q", len(raw)) + raw]}
    options = forms[0 if proto == 0 else 1 if proto < 4 else 4]
    return options[variant % len(options)]


def _put(i: int, proto: int) -> bytes:
    return b"p%d\n" % i if proto == 0 else b"q" + bytes([i]) if proto < 3 else b"r" + struct.pack("<I", i) \
        if proto == 3 else b"\x94"


def _get(i: int, proto: int) -> bytes:
    return b"g%d\n" % i if proto == 0 else b"h" + bytes([i]) if proto != 3 else b"j" + struct.pack("<I", i)


def _args(cmd: str, proto: int) -> bytes:
    return b"(" + _str(cmd, proto, 1) + b"t"


def _frame(body: bytes, proto: int) -> bytes:
    head = b"" if proto < 2 else b"\x80" + bytes([proto])
    if proto >= 4:
        return head + b"\x95" + struct.pack("<Q", len(body) + 1) + body + b"."
    return head + body + b"."


def _forms(cmd: str, proto: int) -> dict:
    """{form: (pickle bytes, whether plain pickle.loads runs the payload at this protocol)}."""
    s = lambda text, v=0: _str(text, proto, v)  # noqa: E731
    args = _args(cmd, proto)
    system = b"cos\nsystem\n"
    dotted = proto >= 4  # the unpickler walks dotted names from protocol 4 on
    # memoized operands: module at slot 0, name at slot 1, both popped, then fetched back for STACK_GLOBAL
    memo = s("os") + _put(0, proto) + b"0" + s("system", 1) + _put(1, proto) + b"0" + _get(0, proto) + _get(1, proto)
    instance = b"ccollections\nOrderedDict\n)R"  # an object an allowed global made (not itself a global)
    forms = {
        "GLOBAL": (system + args + b"R", True),
        "GLOBAL dotted in an allowed DCP module": (b"ctorch.distributed.checkpoint.filesystem\nos.system\n" + args
                                                   + b"R", dotted),
        "GLOBAL dotted in an allowed module": (b"ctorch._utils\n_rebuild_tensor_v2.__globals__\n0"
                                               + b"ccollections\nOrderedDict.__init__.__globals__\n0", False),
        "GLOBAL dotted through pathlib": (b"cpathlib\nos.system\n" + args + b"R", dotted),
        "STACK_GLOBAL": (s("os") + s("system", 1) + b"\x93" + args + b"R", True),
        "STACK_GLOBAL with memoized operands": (memo + b"\x93" + args + b"R", True),
        "STACK_GLOBAL dotted in an allowed module": (s("torch.distributed.checkpoint.filesystem") + s("os.system")
                                                     + b"\x93" + args + b"R", dotted),
        "STACK_GLOBAL with an operand built at load time": (s("os") + instance + b"\x93" + args + b"R", False),
        "INST": (b"(" + _str(cmd, proto, 1) + b"ios\nsystem\n", True),
        "OBJ": (b"(" + system + _str(cmd, proto, 1) + b"o", True),
        "OBJ on a memoized global": (system + _put(0, proto) + b"0(" + _get(0, proto) + _str(cmd, proto, 1) + b"o",
                                     True),
        "OBJ on an object that is not a global": (b"(" + instance + _str(cmd, proto, 1) + b"o", False),
        "NEWOBJ": (system + args + b"\x81", False),
        "NEWOBJ_EX": (system + args + b"}\x92", False),
        "EXT1": (b"\x82\x01" + args + b"R", False),
        "EXT2": (b"\x83\x01\x01" + args + b"R", False),
        "EXT4": (b"\x84" + struct.pack("<i", EXT_CODE) + args + b"R", True),
        "REDUCE on an object that is not a global": (instance + args + b"R", False),
        "BUILD on a global": (b"ccollections\nOrderedDict\n(N}t" + b"b", False),
        "APPEND on a global": (b"ctorch\nSize\n" + s("x") + b"a", False),
    }
    return {name: (_frame(body, proto), runs) for name, (body, runs) in forms.items()}


FORMS = list(_forms("true", 2))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "pwned"


def test_the_hostile_pickles_run_when_unpickled_plainly(tmp_path):
    """The payloads are real: plain ``pickle.loads`` runs each form marked as runnable (EXT4 once the extension is
    registered, as a library in the process might have done); the check below must refuse exactly these."""
    copyreg.add_extension("os", "system", EXT_CODE)
    ran = 0
    try:
        for proto in PROTOCOLS:
            for name, (data, runs) in _forms(f"touch {tmp_path}/ran", proto).items():
                if not runs:
                    continue
                (tmp_path / "ran").unlink(missing_ok=True)
                pickle.loads(data)
                assert (tmp_path / "ran").exists(), (name, proto)
                ran += 1
    finally:
        copyreg.remove_extension("os", "system", EXT_CODE)
    assert ran >= 40


@pytest.mark.parametrize("form", FORMS)
def test_every_global_naming_opcode_is_refused_at_every_protocol(form, marker, tmp_path):
    everything = TENSOR_GLOBALS | DCP_METADATA_GLOBALS | DEEPSPEED_GLOBALS
    for proto in PROTOCOLS:
        data = _forms(f"touch {marker}", proto)[form][0]
        with pytest.raises(UnsafePickle):
            pickle_globals(data, everything)
        # inside a torch.save zip archive (data.pkl replaced), and as the legacy format's first pickle
        archive = _zip_with_data_pkl(data)
        with pytest.raises(UnsafePickle):
            check_torch_file(archive, FOLDER_TORCH_GLOBALS)
        path = tmp_path / f"evil{proto}.pt"
        path.write_bytes(archive)
        with pytest.raises(CheckpointError, match="refused to load|cannot read"):
            safe_torch_load(path)
        path.write_bytes(data + b"\x00" * 16)
        with pytest.raises(CheckpointError, match="refused to load|cannot read"):
            safe_torch_load(path)
        # as a distributed checkpoint's .metadata, and as a DeepSpeed state file, in a checkpoint folder
        folder = tmp_path / f"dcp{proto}"
        folder.mkdir()
        (folder / ".metadata").write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            check_checkpoint_folder(folder)
        assert "\n" not in str(err.value) and ".metadata" in str(err.value)
        ds = tmp_path / f"ds{proto}"
        (ds / "checkpoint").mkdir(parents=True)
        (ds / "latest").write_text("checkpoint")
        (ds / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(archive)
        with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt"):
            check_checkpoint_folder(ds)
    assert not marker.exists()


def _zip_with_data_pkl(data: bytes) -> bytes:
    """A genuine ``torch.save`` archive whose data.pkl is replaced by ``data``."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


def test_archives_torch_reads_otherwise_are_refused(tmp_path, marker):
    """A tar archive (PyTorch's oldest format, unpickled without any check), a zip archive naming data.pkl twice
    (two readers could take different copies) and a TorchScript archive are refused; a genuine archive passes."""
    import tarfile
    good = io.BytesIO()
    torch.save({"w": torch.ones(2)}, good)
    check_torch_file(good.getvalue())
    tar = tmp_path / "old.pt"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("pickle")
        payload = _forms(f"touch {marker}", 2)["GLOBAL"][0]
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    with pytest.raises(UnsafePickle, match="tar archive"):
        check_torch_file(str(tar))
    twice = io.BytesIO()
    with zipfile.ZipFile(twice, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
        z.writestr("archive/data.pkl", payload)
    with pytest.raises(UnsafePickle, match="twice"):
        check_torch_file(twice.getvalue())
    scripted = io.BytesIO()  # a TorchScript archive: torch.load(weights_only=False) hands it to torch.jit.load
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    with pytest.raises(UnsafePickle, match="__torch__"):
        check_torch_file(scripted.getvalue(), FOLDER_TORCH_GLOBALS)
    assert not marker.exists()


def test_the_allowlists_are_exact_pairs_that_exist_and_are_not_remapped():
    """Every pair names a real attribute of its module, without a dot in the name; none is a Python 2 name that the
    unpickler would map to another module (``_compat_pickle``), so the pair checked is the pair loaded."""
    for module, name in sorted(TENSOR_GLOBALS | DCP_METADATA_GLOBALS | DEEPSPEED_GLOBALS):
        assert "." not in name and name.isascii() and module.isascii(), (module, name)
        assert module not in _compat_pickle.IMPORT_MAPPING and (module, name) not in _compat_pickle.NAME_MAPPING
        if module.startswith("deepspeed"):
            continue  # optional; checked below when installed
        assert hasattr(importlib.import_module(module), name), (module, name)
    spec = importlib.util.find_spec("deepspeed")  # not imported (slow): its source is read
    if spec is not None:
        for module, name in DEEPSPEED_GLOBALS:
            source = Path(spec.origin).parent.joinpath(*module.split(".")[1:]).with_suffix(".py").read_text()
            assert f"class {name}" in source, (module, name)


def test_genuine_distributed_checkpoint_folders_pass(tmp_path):
    """A real torch.distributed.checkpoint folder of a model and its AdamW state (tensors, byte items for the
    optimizer's plain values) and Lightning's meta.pt beside it pass the check. (Folders written by FSDP2 and
    DeepSpeed ZeRO-1/2/3 runs are checked when tests/test_launch.py resumes them with --ckpt_path last.)"""
    import torch.distributed.checkpoint as dcp
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    folder = tmp_path / "last.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ...: assuming ... a single process"
        dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "note": {"lr": 0.1, "name": "x"}},
                 checkpoint_id=str(folder), no_dist=True)
    torch.save({"epoch": 1, "global_step": 3, "loops": {"fit": {"n": torch.tensor(3)}}, "hparams": {"a": [1, 2]}},
               folder / "meta.pt")
    check_checkpoint_folder(folder)


def _dcp_folder(folder):
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(4.0), "note": {"lr": 0.1}}, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_paths_a_folder_names_stay_inside_it(tmp_path, marker):
    """The files a checkpoint folder makes its library open must be files of the folder: a DCP storage path, a
    DeepSpeed ``latest`` tag and a link inside the folder that lead elsewhere are refused, one line each."""
    outside = tmp_path / "elsewhere"
    (outside / "checkpoint").mkdir(parents=True)
    folder = _dcp_folder(tmp_path / "a.ckpt")
    with open(folder / ".metadata", "rb") as f:
        meta = pickle.load(f)  # our own file, written just above
    for info in meta.storage_data.values():
        info.relative_path = "../elsewhere/x.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=r"storage file '\.\./elsewhere/x\.distcp', which is not a file of"):
        check_checkpoint_folder(folder)
    ds = tmp_path / "ds.ckpt"
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text(f"../{outside.name}/checkpoint")
    with pytest.raises(CheckpointError, match="latest names .*not a subfolder"):
        check_checkpoint_folder(ds)
    (ds / "latest").write_text("checkpoint")
    check_checkpoint_folder(ds)
    (ds / "checkpoint" / "mp_rank_00_model_states.pt").symlink_to(outside / "checkpoint")
    with pytest.raises(CheckpointError, match="is a link"):
        check_checkpoint_folder(ds)
    assert not marker.exists()


# -- through python -m swinlab, as users start it --------------------------------------------------------------------
def _python_m_swinlab(argv, cwd):
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    res = subprocess.run([sys.executable, "-m", "swinlab", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    return lines[0]


def _tiny_config(tmp_path):
    import yaml
    from test_bad_inputs import TINY
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return "tiny.yaml"


@pytest.mark.slow  # an interpreter start-up: ~14 s on 2 shared cores
def test_a_dotted_global_in_a_folder_is_refused_through_python_m_swinlab(tmp_path, marker):
    """The reported payload: a .metadata naming os.system through an allowed DCP module (protocol 4 resolves the
    dotted name); `fit --ckpt_path FOLDER` refuses it in one line, nothing runs and no run folder is made."""
    folder = _dcp_folder(tmp_path / "evil.ckpt")
    (folder / ".metadata").write_bytes(_forms(f"touch {marker}", 4)["GLOBAL dotted in an allowed DCP module"][0])
    line = _python_m_swinlab(["fit", "--config", _tiny_config(tmp_path), *FSDP2, "--ckpt_path", "evil.ckpt"],
                             tmp_path)
    assert ".metadata" in line and "torch.distributed.checkpoint.filesystem.os.system" in line, line
    assert "SWINLAB_TRUST_CHECKPOINTS" in line
    assert not marker.exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_hostile_newest_last_ckpt_folder_is_refused_through_python_m_swinlab(tmp_path, marker):
    """`--ckpt_path last` when the newest run's last.ckpt is a folder (a shared runs/ directory is enough): its
    meta.pt hides the payload behind memoized STACK_GLOBAL operands; refused in one line, nothing changed."""
    from test_bad_inputs import _snapshot
    folder = _dcp_folder(tmp_path / "runs" / "tiny" / "version_3" / "checkpoints" / "last.ckpt")
    payload = _forms(f"touch {marker}", 4)["STACK_GLOBAL with memoized operands"][0]
    (folder / "meta.pt").write_bytes(_zip_with_data_pkl(payload))
    before = _snapshot(tmp_path / "runs")
    line = _python_m_swinlab(["fit", "--config", _tiny_config(tmp_path), *FSDP2, "--ckpt_path", "last"], tmp_path)
    assert "meta.pt" in line and "os.system" in line, line
    assert not marker.exists() and _snapshot(tmp_path / "runs") == before


@pytest.mark.parametrize("how", ["folder", "last"])
def test_hostile_folders_are_refused_by_the_entry_point_in_process(tmp_path, marker, monkeypatch, capsys, how):
    """The two cases above through ``python -m swinlab``'s entry point in this process (the fast suite's guard)."""
    from swinlab.__main__ import main as swinlab_main
    monkeypatch.chdir(tmp_path)
    where = tmp_path / ("evil.ckpt" if how == "folder" else "runs/tiny/version_3/checkpoints/last.ckpt")
    folder = _dcp_folder(where)
    payload = _forms(f"touch {marker}", 5)["STACK_GLOBAL dotted in an allowed module"][0]
    (folder / ".metadata").write_bytes(payload)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = swinlab_main(["fit", "--config", _tiny_config(tmp_path), *FSDP2, "--ckpt_path",
                           "evil.ckpt" if how == "folder" else "last"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "os.system (STACK_GLOBAL)" in lines[0], err[-2000:]
    assert not marker.exists() and not (tmp_path / "runs" / "tiny" / "version_4").exists()


def test_paths_lightning_resolves_itself_get_the_same_check(tmp_path, marker, monkeypatch, capsys):
    """`--ckpt_path hpc`: Lightning finds hpc_ckpt_<n>.ckpt in the root folder after the trainer is built; the
    strategy's load is guarded, so a hostile folder there is refused in one line, before anything is unpickled."""
    from swinlab.__main__ import main as swinlab_main
    monkeypatch.chdir(tmp_path)
    folder = _dcp_folder(tmp_path / "hpc_ckpt_1.ckpt")
    (folder / ".metadata").write_bytes(_forms(f"touch {marker}", 2)["INST"][0])
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = swinlab_main(["fit", "--config", _tiny_config(tmp_path), "--ckpt_path", "hpc"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "hpc_ckpt_1.ckpt" in lines[0] and "os.system (INST)" in lines[0], \
        err[-2000:]
    assert not marker.exists()


def test_a_remote_checkpoint_gets_the_same_check(marker):
    """A checkpoint on a remote filesystem (fsspec; here its in-memory one) is checked from its opcodes before
    Lightning's own load of it."""
    import fsspec

    from swinlab.training.checkpoint_io import SafeCheckpointIO
    fs = fsspec.filesystem("memory")
    good = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    fs.pipe("/trust/good.ckpt", good.getvalue())
    fs.pipe("/trust/evil.ckpt", _zip_with_data_pkl(_forms(f"touch {marker}", 5)["OBJ on a memoized global"][0]))
    assert torch.equal(SafeCheckpointIO().load_checkpoint("memory://trust/good.ckpt")["state_dict"]["w"],
                       torch.ones(2))
    with pytest.raises(CheckpointError, match=r"refused to load memory://trust/evil\.ckpt: .*os\.system"):
        SafeCheckpointIO().load_checkpoint("memory://trust/evil.ckpt")
    assert not marker.exists()
