"""``python -m swinlab convert``: any Swin checkpoint (official, timm, Lightning, swinlab) into a variant, optionally at
another image/window size, written as what people deploy:

- ``safetensors`` (default): swinlab's file, weights plus the model's config as metadata;
- ``timm``: a state dict with exactly the keys timm's own model has (safetensors, or ``.pth`` as
  ``{"state_dict": ..., "pretrained_cfg": ...}``), checked by loading it strictly into timm's twin and comparing
  logits;
- ``torch_export``: a ``torch.export`` program (``.pt2``) with a dynamic batch dimension, reloaded and checked against
  the eager model;
- ``onnx``: an ONNX model (dynamo exporter) with a dynamic batch dimension, checked with onnxruntime (the ``onnx``
  extra).

Every file records the preprocessing the weights expect (``pretrained_cfg``: mean, std, input_size, interpolation,
crop_pct; the checkpoint's record, else timm's config of the architecture or swinlab's defaults, as the printed JSON's
``pretrained_cfg_from`` says): safetensors metadata ``pretrained_cfg`` (JSON), the ``.pth``'s ``pretrained_cfg``
entry beside its ``state_dict`` (the entry timm's loaders take), the ``torch.export`` archive's extra file
``pretrained_cfg.json``, the ONNX model's metadata property ``pretrained_cfg``; the printed ``timm_load`` line sets it.

Every file is written into a temporary folder next to ``--out``, checked there and only then renamed into place: a
failed check leaves nothing behind, an existing file is replaced only with ``--overwrite``, and the input
checkpoint never.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import CheckpointError, ConfigError, SwinlabError, first_line, unwritable_reason
from ..models import PRESETS, SwinTransformer, create_model, get_variant, save_safetensors
from ..models.hub import preprocessing_of

FORMATS = ("safetensors", "timm", "torch_export", "onnx")
EXPORT_TOL = 1e-5  # torch.export program vs eager (fp32), times max(1, largest |logit|)
ONNX_TOL = 1e-4  # onnxruntime vs eager (fp32), likewise
TIMM_TOL = 1e-4  # timm's twin vs swinlab on the same weights, relative to the largest logit (tests hold 1e-5)
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_SINGLE_FILE_BYTES = 1_800_000_000  # ONNX protobufs stop at 2 GiB: larger weights go to <out>.data
TIMM_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
EXPORT_CFG_FILE = "pretrained_cfg.json"  # the torch.export archive's extra file holding the preprocessing


def main(argv: List[str]) -> int:
    """``argv`` without the command name."""
    parser = argparse.ArgumentParser(
        prog="python -m swinlab convert",
        description="Load a Swin checkpoint (official, timm, Lightning or swinlab) into a variant, optionally moving "
                    "it to another image/window size, and write it as swinlab safetensors, a timm state dict, a "
                    "torch.export program or ONNX.")
    parser.add_argument("checkpoint")
    parser.add_argument("--model", required=True, help="registry name of the checkpoint's architecture")
    parser.add_argument("--img-size", type=int, nargs="+", default=None, help="target image size (N or H W)")
    parser.add_argument("--window-size", type=int, default=None, help="target window size")
    parser.add_argument("--pretrained-window-size", type=int, nargs="+", default=None,
                        help="V2: window(s) the CPB was trained at (default: the checkpoint's)")
    parser.add_argument("--num-classes", type=int, default=None, help="re-initialise the head for N classes")
    parser.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="safetensors: swinlab's file (default); timm: a state dict timm loads (.safetensors or "
                             ".pth); torch_export: a torch.export program (.pt2); onnx: ONNX (needs the onnx extra)")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never the input)")
    args = parser.parse_args(argv)
    variant = get_variant(args.model)
    out = Path(args.out)
    _check_out(out, args.checkpoint, args.overwrite)
    if args.format == "onnx":
        _require_onnx()
    if args.format == "timm" and out.suffix not in TIMM_SUFFIXES:
        raise ConfigError(f"--out {out} has suffix {out.suffix or '(none)'!r}: --format timm writes "
                          f"{' or '.join(TIMM_SUFFIXES[:2])} (also {', '.join(TIMM_SUFFIXES[2:])})")
    img = None if args.img_size is None else (args.img_size[0] if len(args.img_size) == 1 else args.img_size)
    pws = args.pretrained_window_size
    pws = None if pws is None else (pws[0] if len(pws) == 1 else pws)
    model = create_model(args.model, checkpoint=args.checkpoint, img_size=img, window_size=args.window_size,
                         pretrained_window_size=pws, num_classes=args.num_classes).eval()
    _check_space(model, out)
    cfg = model.config
    preprocessing = preprocessing_of(model.pretrained_cfg)
    info: Dict[str, Any] = dict(out=str(out), format=args.format, model=args.model, img_size=cfg.img_size,
                                window_size=[w[0] for w in cfg.window_size],
                                pretrained_window_size=[w[0] for w in cfg.pretrained_window_size],
                                num_classes=cfg.num_classes, pretrained_cfg=preprocessing,
                                pretrained_cfg_from=str(args.checkpoint) if model.preprocessing else "defaults")
    if args.format == "safetensors":
        _write_atomically(out, lambda path: save_safetensors(model, path, args.model), lambda path: None,
                          args.overwrite)
    elif args.format == "timm":
        info.update(_write_timm(model, variant.name, out, preprocessing, args.overwrite))
    elif args.format == "torch_export":
        info.update(_write_torch_export(model, out, preprocessing, args.overwrite))
    else:
        info.update(_write_onnx(model, out, preprocessing, args.overwrite))
    print(json.dumps(info))
    return 0


# -- where the file goes -----------------------------------------------------------------------------------------------
def _check_out(out: Path, checkpoint: str, overwrite: bool) -> None:
    """Refuse to replace the input checkpoint (even with --overwrite) or an existing file (without it)."""
    src = Path(checkpoint)
    same = out.resolve() == src.resolve()
    if not same and out.exists() and src.exists():
        same = os.path.samefile(out, src)
    if same:
        raise ConfigError(f"--out {out} is the input checkpoint: convert never replaces its input, even with "
                          f"--overwrite; choose another path")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: give a file path")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists: pass --overwrite to replace it, or choose another path")
    try:  # before anything is loaded: a folder that cannot be made or written to is named now, not after the work
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=str(out.parent)):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {out} cannot be written: {unwritable_reason(out.parent, exc)}: choose another "
                          f"path") from None


def _check_space(model: torch.nn.Module, out: Path) -> None:
    """Refuse before writing when ``out``'s filesystem has less free space than the weights need (plus 10% and 1 MiB
    for the format's own data): torch's zip writer, which torch.export uses, aborts the whole process when the disk
    fills under it."""
    need = int(sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 1.1) + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise CheckpointError(f"could not write {out}: {out.parent} has {free / 2**20:.1f} MiB free and the file needs "
                              f"about {need / 2**20:.1f} MiB: free disk space or choose another path")


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out``: with ``overwrite`` by ``os.replace``; without, by ``os.link`` (fails if
    ``out`` exists: a file another convert wrote meanwhile is never replaced), falling back to a checked rename
    where the filesystem has no hard links."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise ConfigError(f"--out {out} appeared while converting (another process wrote it): it was kept; pass "
                          f"--overwrite to replace it, or choose another path") from None
    except OSError:  # no hard links here
        if out.exists():
            raise ConfigError(f"--out {out} appeared while converting: it was kept; pass --overwrite to replace it, "
                              f"or choose another path") from None
        os.replace(tmp, out)
        return
    os.unlink(tmp)


def _write_atomically(out: Path, write: Callable[[Path], None], check: Callable[[Path], Any],
                      overwrite: bool = True) -> Any:
    """``write(path)`` into a fresh temporary folder beside ``out``, ``check(path)`` there, then rename every file
    it holds into ``out``'s folder (the main file last, so it appears only complete). Returns ``check``'s result;
    on any failure nothing is left behind and an existing ``out`` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent)))
    try:
        tmp = tmpdir / out.name
        try:
            write(tmp)
        except (OSError, RuntimeError, CheckpointError) as exc:  # torch's zip writer: RuntimeError on a full disk
            if isinstance(exc, OSError):
                reason = unwritable_reason(out, exc)
            elif shutil.disk_usage(out.parent).free < (1 << 20):
                reason = os.strerror(errno.ENOSPC)
            elif isinstance(exc, CheckpointError):
                reason = first_line(exc, 160).replace(str(tmp), str(out))
            else:
                raise
            raise CheckpointError(f"could not write {out} ({reason}): any previous file is intact; free disk space or "
                                  f"choose another path") from None
        result = check(tmp)
        mask = os.umask(0)
        os.umask(mask)
        for done in tmpdir.iterdir():  # as a plain open() would have made them (mkdtemp's folder is private)
            os.chmod(done, 0o666 & ~mask)
        for extra in sorted(p for p in tmpdir.iterdir() if p.name != out.name):  # e.g. ONNX external data
            os.replace(extra, out.parent / extra.name)
        publish(tmp, out, overwrite)
        return result
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _fresh_inputs(model: SwinTransformer, batches: Tuple[int, ...], seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = model.config.img_size
    return [torch.randn(b, model.config.in_chans, h, w, generator=g) for b in batches]


# -- timm -------------------------------------------------------------------------------------------------------------
def _per_stage(values: List[List[int]]) -> Any:
    """swinlab's per-stage [h, w] list in timm's argument form: an int (or pair) when every stage is the same."""
    compact = [v[0] if v[0] == v[1] else tuple(v) for v in values]
    return compact[0] if all(c == compact[0] for c in compact) else tuple(compact)


def timm_twin_spec(model: SwinTransformer, variant_name: str) -> Tuple[str, Dict[str, Any]]:
    """How to build timm's model for ``model``: (timm model name, ``timm.create_model`` kwargs) when timm registers
    the variant, else (timm class path, constructor kwargs). ConfigError when timm has no such architecture."""
    import timm
    cfg = model.config
    preset = PRESETS[cfg.version]
    differs = [f"{k}={getattr(cfg, k)!r}" for k in preset if getattr(cfg, k) != preset[k]]
    if cfg.extra_norm_period:
        differs.append(f"extra_norm_period={cfg.extra_norm_period}")
    if differs:
        raise ConfigError(f"timm has no Swin{cfg.version.upper()} with {', '.join(differs)} (swinlab-only "
                          f"switches): use --format safetensors, torch_export or onnx")
    v2 = cfg.version == "v2"
    geometry: Dict[str, Any] = dict(img_size=tuple(cfg.img_size), window_size=_per_stage(cfg.window_size))
    if v2:
        geometry["pretrained_window_sizes"] = tuple(p[0] if p[0] == p[1] else tuple(p)
                                                    for p in cfg.pretrained_window_size)
    if timm.is_model(variant_name):
        default = get_variant(variant_name).config.resolved()
        kwargs: Dict[str, Any] = {}
        if list(cfg.img_size) != list(default.img_size):
            kwargs["img_size"] = geometry["img_size"]
        if cfg.window_size != default.window_size:
            kwargs["window_size"] = geometry["window_size"]
        if v2 and cfg.pretrained_window_size != default.pretrained_window_size:
            kwargs["pretrained_window_sizes"] = geometry["pretrained_window_sizes"]
        kwargs["num_classes"] = cfg.num_classes
        return variant_name, kwargs
    cls = ("timm.models.swin_transformer_v2.SwinTransformerV2" if v2 else
           "timm.models.swin_transformer.SwinTransformer")
    return cls, dict(geometry, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                     embed_dim=cfg.embed_dim, depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
                     mlp_ratio=cfg.mlp_ratio)


def build_timm_twin(name: str, kwargs: Dict[str, Any]) -> torch.nn.Module:
    """timm's model from :func:`timm_twin_spec`'s answer (random weights)."""
    import timm
    if name.startswith("timm.models."):
        module, cls = name.rsplit(".", 1)
        import importlib
        return getattr(importlib.import_module(module), cls)(**kwargs)
    return timm.create_model(name, **kwargs)


def _write_timm(model: SwinTransformer, variant_name: str, out: Path, preprocessing: Dict[str, Any],
                overwrite: bool = True) -> Dict[str, Any]:
    name, kwargs = timm_twin_spec(model, variant_name)
    twin = build_timm_twin(name, kwargs).eval()
    expected = twin.state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k in expected}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConfigError(f"timm's {name} expects {len(missing)} tensors swinlab's model lacks (first: "
                          f"{missing[0]}): use --format safetensors")
    meta = {"format": "pt", "timm_model": name, "timm_kwargs": json.dumps(kwargs),
            "pretrained_cfg": json.dumps(preprocessing)}

    def write(path: Path) -> None:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(state, str(path), metadata=meta)
        else:  # timm's loaders (pretrained_cfg_overlay=dict(file=...), load_checkpoint) take the "state_dict" entry
            torch.save({"state_dict": state, "pretrained_cfg": preprocessing}, str(path))

    def check(path: Path) -> float:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file
            loaded = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                recorded = json.loads((f.metadata() or {}).get("pretrained_cfg", "null"))
        else:
            saved = torch.load(str(path), map_location="cpu", weights_only=True)
            loaded, recorded = saved["state_dict"], saved.get("pretrained_cfg")
        if recorded != preprocessing:
            raise CheckpointError(f"{out.name} reads back pretrained_cfg {recorded}, not {preprocessing}: nothing "
                                  f"written; report this as a bug")
        twin.load_state_dict(loaded, strict=True)
        (x,) = _fresh_inputs(model, (1,), seed=0)
        with torch.no_grad():
            ours, theirs = model(x), twin(x)
        err = _max_diff(ours, theirs)
        if not err <= TIMM_TOL * max(1.0, ours.abs().max().item()):
            raise CheckpointError(f"timm's {name} with the exported weights differs from swinlab's model by "
                                  f"{err:.3g} (max |logit difference|): nothing written; report this as a bug")
        return err

    err = _write_atomically(out, write, check, overwrite)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocessing.items()}
    if name.startswith("timm.models."):
        load = (f"model = {name}(**timm_kwargs); model.load_state_dict(<\"state_dict\" of {out.name}>); "
                f"model.pretrained_cfg = {cfg!r}")
    else:
        overlay = dict(file=str(out), num_classes=model.config.num_classes, **cfg)
        args = ", ".join([repr(name), "pretrained=True"] + [f"{k}={v!r}" for k, v in kwargs.items()]
                         + [f"pretrained_cfg_overlay={overlay!r}"])
        load = f"timm.create_model({args})"
    return dict(timm_model=name, timm_kwargs=kwargs, timm_load=load, max_abs_diff=err)


# -- torch.export -----------------------------------------------------------------------------------------------------
def _export_program(model: SwinTransformer) -> Tuple[Any, bool]:
    """``torch.export`` at batch 2 with a dynamic batch dimension; static batch if the dynamic export fails."""
    (example,) = _fresh_inputs(model, (2,), seed=0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), True
    except Exception:  # a model the tracer cannot keep batch-generic: export at the example's batch
        try:
            return torch.export.export(model, (example,)), False
        except Exception as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"torch.export could not trace this model ({type(exc).__name__}: {text}): use "
                              f"--format safetensors") from None


def _static_note(model: SwinTransformer, dynamic: bool) -> Dict[str, Any]:
    h, w = model.config.img_size
    return dict(input_shape=["batch" if dynamic else 2, model.config.in_chans, h, w],
                dynamic=["batch"] if dynamic else [],
                static=dict(img_size=[h, w], in_chans=model.config.in_chans, **({} if dynamic else dict(batch=2))))


def _check_outputs(model: SwinTransformer, run: Callable[[torch.Tensor], torch.Tensor], dynamic: bool, tol: float,
                   what: str) -> float:
    """Largest |run(x) - model(x)| over fresh random inputs (batch 1 and 3 when the batch is dynamic); more than
    ``tol`` times the largest output (at least 1) is an error."""
    err = 0.0
    for x in _fresh_inputs(model, (1, 3) if dynamic else (2,), seed=1234):
        with torch.no_grad():
            ref = model(x)
        got = run(x)
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{what} gives shape {tuple(got.shape)} where the model gives {tuple(ref.shape)}: "
                                  f"nothing written; report this as a bug")
        err = max(err, _max_diff(got, ref))
        if not err <= tol * max(1.0, ref.abs().max().item()):
            raise CheckpointError(f"{what} differs from the eager model by {err:.3g} (max |output difference|, "
                                  f"tolerance {tol:g} x max(1, |output|)): nothing written; report this as a bug")
    return err


def _write_torch_export(model: SwinTransformer, out: Path, preprocessing: Dict[str, Any],
                        overwrite: bool = True) -> Dict[str, Any]:
    program, dynamic = _export_program(model)
    extra = {EXPORT_CFG_FILE: json.dumps(preprocessing)}

    def check(path: Path) -> float:
        files = {EXPORT_CFG_FILE: ""}
        loaded = torch.export.load(str(path), extra_files=files).module()
        if json.loads(files[EXPORT_CFG_FILE] or "null") != preprocessing:
            raise CheckpointError(f"{out.name} reads back {EXPORT_CFG_FILE} {files[EXPORT_CFG_FILE]!r}: nothing "
                                  f"written; report this as a bug")
        return _check_outputs(model, lambda x: loaded(x), dynamic, EXPORT_TOL, f"the reloaded program {out.name}")

    err = _write_atomically(out, lambda path: torch.export.save(program, str(path), extra_files=extra), check,
                            overwrite)
    return dict(_static_note(model, dynamic), max_abs_diff=err,
                load=f"torch.export.load({str(out)!r}).module()(images); preprocessing: "
                     f"torch.export.load(..., extra_files={{{EXPORT_CFG_FILE!r}: ''}})")


# -- ONNX -------------------------------------------------------------------------------------------------------------
def _require_onnx() -> None:
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)} (not installed): pip install -e \".[onnx]\"")


def _write_onnx(model: SwinTransformer, out: Path, preprocessing: Dict[str, Any],
                overwrite: bool = True) -> Dict[str, Any]:
    import warnings

    import onnxruntime as ort
    program, dynamic = _export_program(model)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = weight_bytes > ONNX_SINGLE_FILE_BYTES
    opset: List[Optional[int]] = [None]

    def write(path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, input_names=["images"], output_names=["logits"],
                                             dynamo=True, external_data=external, verbose=False)
            onnx_program.model.metadata_props["pretrained_cfg"] = json.dumps(preprocessing)
            onnx_program.save(str(path), external_data=external)
        import onnx
        proto = onnx.load(str(path), load_external_data=False)
        opset[0] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        recorded = {p.key: p.value for p in proto.metadata_props}.get("pretrained_cfg")
        if json.loads(recorded or "null") != preprocessing:
            raise CheckpointError(f"{out.name} reads back pretrained_cfg {recorded!r}: nothing written; report this "
                                  f"as a bug")

    def check(path: Path) -> float:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's concern
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return _check_outputs(model, lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]), dynamic,
                              ONNX_TOL, f"onnxruntime on {out.name}")

    try:
        err = _write_atomically(out, write, check, overwrite)
    except SwinlabError:
        raise
    except Exception as exc:  # the exporter's own errors are long; one line says which step failed
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"ONNX export of this model failed ({type(exc).__name__}: {text}): nothing written; use "
                          f"--format torch_export or safetensors") from None
    return dict(_static_note(model, dynamic), opset=opset[0], external_data=f"{out.name}.data" if external else None,
                max_abs_diff=err, load=f"onnxruntime.InferenceSession({str(out)!r}).run(None, {{'images': array}})")
