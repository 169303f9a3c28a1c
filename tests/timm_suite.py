"""timm's own model tests (tests/test_models.py of the installed timm's sdist) on swinlab's ``swinlab_*`` models.

The sdist comes from the package index (``pip download --no-deps --no-binary :all: timm==<installed>``) into the
repository's ignored ``.cache/timm-sdist/`` once; its test_models.py is loaded as a module (after ``import swinlab``,
so the names are registered when its parametrizations call ``timm.list_models``) and its tests are re-parametrized
over swinlab's names by :func:`swinlab_cases`:

- a test whose own selection (``list_models`` filters) takes swinlab names runs for exactly those;
- a test whose selection takes timm's Swin but leaves swinlab out (a filter on the model's module or on a registered
  pretrained cfg, which a model registered from outside timm has neither of) runs for every swinlab name;
- a test naming timm's Swin among its fixed cases (e.g. ``('swin_tiny_patch4_window7_224', dict(embed_dim=16, ...))``)
  runs the same case on the swinlab variant of the same name.

Each test runs as timm wrote it (the function is called unchanged); only the model names differ.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from typing import Any, Callable, Dict, List, Sequence, Tuple

import pytest
import timm
from helpers import ROOT

import swinlab  # noqa: F401 - registers the swinlab_* names with timm before timm's tests list the models
from swinlab.models.timm_models import PREFIX

CACHE = ROOT / ".cache" / "timm-sdist"
TIMM_SWIN_MODULES = ("swin_transformer", "swin_transformer_v2")


def sdist_tests(version: str = timm.__version__):
    """The tests/ folder of timm ``version``'s sdist, downloaded and unpacked into .cache/timm-sdist/ on first use
    (safe under several pytest-xdist workers: each unpacks into its own temporary folder, the first rename wins)."""
    target = CACHE / f"timm-{version}"
    if (target / "tests" / "test_models.py").is_file():
        return target / "tests"
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"timm=={version}", "-d", tmp, "-q"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        archives = [f for f in os.listdir(tmp) if f.endswith((".tar.gz", ".zip"))]
        if run.returncode or not archives:
            tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no archive"]
            pytest.fail(f"could not download timm {version}'s sdist ({tail[0]}): run `{' '.join(cmd[2:-3])} -d "
                        f"{CACHE}` with network access, or unpack it there by hand", pytrace=False)
        with tarfile.open(os.path.join(tmp, archives[0])) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"timm-{version}/tests/")]
            tar.extractall(tmp, members=members, filter="data")
        try:
            os.replace(os.path.join(tmp, f"timm-{version}"), target)
        except OSError:  # another worker got there first
            if not (target / "tests" / "test_models.py").is_file():
                raise
    return target / "tests"


def load_timm_test_models():
    """timm's tests/test_models.py as a module (``timm_test_models``), loaded once per process."""
    if "timm_test_models" in sys.modules:
        return sys.modules["timm_test_models"]
    path = sdist_tests() / "test_models.py"
    spec = importlib.util.spec_from_file_location("timm_test_models", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["timm_test_models"] = module
    spec.loader.exec_module(module)
    return module


# tests of timm's Swin classes' own extras that swinlab's model does not offer: ``set_input_size`` (with
# window_ratio / always_partition / patch_size), ``strict_img_size``, a ``checkpoint_filter_fn`` in the model's module,
# the blocks' ``window_size`` / ``shift_size`` / ``feat_size`` attributes. swinlab's own equivalents: create_model's
# img_size / window_size (moved checkpoints), runtime inputs of any size (tests/test_models.py)
TIMM_SWIN_EXTRAS = {
    "test_swin_family_compile_resize_guards", "test_swin_family_dynamic_mask_trace",
    "test_swin_family_reinit_after_to_empty", "test_swin_family_resize_metadata",
    "test_swin_family_resize_odd_stage_sizes", "test_swin_family_script_after_resize",
    "test_swin_family_set_input_size", "test_swin_family_set_input_size_after_pruning",
    "test_swin_family_set_input_size_invalid_and_min_windows", "test_swin_family_set_input_size_stage_windows",
    "test_swin_family_set_input_size_window_ratios", "test_swin_family_window_padding",
    "test_headless_checkpoint_reload", "test_relpos_non_square_checkpoint_reload",
    "test_relpos_non_square_set_input_size",
}


def is_swinlab(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def timm_swin_names() -> set:
    return {n for m in TIMM_SWIN_MODULES for n in timm.list_models(module=m)}


def swinlab_twin(timm_name: str) -> str:
    """swinlab's variant of the same architecture as timm's ``timm_name`` (the registry uses timm's names)."""
    return PREFIX + timm_name


def _model_name_mark(fn: Callable) -> Tuple[Any, int]:
    """The parametrize mark of ``fn`` that holds ``model_name`` and the position of model_name in its argnames."""
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        argnames = mark.args[0]
        names = [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
        if "model_name" in names:
            return mark, names.index("model_name")
    return None, -1


def swinlab_cases(fn: Callable, all_swinlab: Sequence[str], swin: set) -> Tuple[List[Any], str]:
    """The parameter values of ``fn``'s model_name parametrization to run for swinlab, and why (see the module
    docstring): ([], reason) where the test covers neither swinlab nor timm's Swin."""
    mark, pos = _model_name_mark(fn)
    if mark is None:
        return [], "no model_name parametrization"
    values = list(mark.args[1])
    single = isinstance(mark.args[0], str) and "," not in mark.args[0]
    name_of = (lambda v: v) if single else (lambda v: v[pos])
    selected = [v for v in values if is_swinlab(name_of(v))]
    if selected:
        return selected, "timm's selection"
    swin_cases = [v for v in values if name_of(v) in swin]
    if not swin_cases:
        return [], "timm's Swin is not selected either"
    if single:
        return list(all_swinlab), "timm's filter selects its Swin, not swinlab"
    return [type(v)(swinlab_twin(x) if i == pos else x for i, x in enumerate(v)) for v in swin_cases], \
        "timm's fixed Swin cases, on swinlab's same-named variants"


def wrap(fn: Callable, values: List[Any]) -> Callable:
    """``fn`` (a timm test) re-parametrized: its model_name parametrization replaced by ``values`` (each with the
    marks of its tier)."""
    mark, pos = _model_name_mark(fn)

    @functools.wraps(fn)
    def test(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    single = isinstance(mark.args[0], str) and "," not in mark.args[0]
    params = [pytest.param(v, marks=marks_for(fn.__name__, v)) if single
              else pytest.param(*v, marks=marks_for(fn.__name__, v[pos])) for v in values]
    test.pytestmark = [m for m in fn.pytestmark if m is not mark] + [
        pytest.mark.parametrize(mark.args[0], params).mark]
    return test


# Which cases run where (times: one thread, the suite's setting, on the 2-core machine):
# - "fast": the test-sized variants (32 px), every test: in every run, `-m "not slow"` included;
# - "ci": Swin-T and SwinV2-T (W8), every test but the two that prune at every stage (timm keeps its pruning
#   contract out of its own CI): marked slow, in the README's full run;
# - "all": the other sizes, and those two pruning tests at the tiny sizes: marked slow and skipped unless pytest
#   runs with ``--timm-suite all`` (minutes per case at 224-384 px).
CI_TINY = (PREFIX + "swin_tiny_patch4_window7_224", PREFIX + "swinv2_tiny_window8_256")
PRUNE_EVERY_STAGE = ("test_prune_intermediate_layers_contract", "test_prune_intermediate_layers_params_used")
# timm's pruning contract tells the NHWC map of ``forward_features`` from the NCHW tap by shape alone; on the pico
# variants stage 0 is 16 x 16 x 16, so the shapes agree and it compares the two layouts as they are
LAYOUT_AMBIGUOUS = {("test_prune_intermediate_layers_contract", PREFIX + "swin_pico_patch2_window4_32"),
                    ("test_prune_intermediate_layers_contract", PREFIX + "swinv2_pico_patch2_window4_32")}


def tier(test: str, name: str) -> str:
    if name.endswith("_32"):
        return "fast"
    return "ci" if name in CI_TINY and test not in PRUNE_EVERY_STAGE else "all"


def marks_for(test: str, name: str) -> List[Any]:
    level = tier(test, name)
    marks = [] if level == "fast" else [pytest.mark.slow]
    if level == "all":
        marks.append(pytest.mark.skipif("config.getoption('--timm-suite') != 'all'",
                                        reason="a larger size: run with --timm-suite all"))
    if (test, name) in LAYOUT_AMBIGUOUS:
        marks.append(pytest.mark.xfail(strict=True, reason="stage 0 is C == H == W: timm's test cannot tell NHWC "
                                                           "from NCHW by shape (the other stages and variants run)"))
    return marks


def cases(module, tiers: Sequence[str]) -> Dict[str, Tuple[Callable, List[Any], str]]:
    """timm's tests of ``module`` to run for swinlab: name -> (test, model_name values of ``tiers``, why)."""
    all_swinlab = [n for n in timm.list_models() if is_swinlab(n)]
    swin = timm_swin_names()
    out = {}
    for name in dir(module):
        fn = getattr(module, name)
        if name.startswith("test_") and callable(fn) and name not in TIMM_SWIN_EXTRAS:
            values, why = swinlab_cases(fn, all_swinlab, swin)
            _, pos = _model_name_mark(fn)
            values = [v for v in values if tier(name, v if isinstance(v, str) else v[pos]) in tiers]
            if values:
                out[name] = (fn, values, why)
    return out


def install(namespace: Dict[str, Any], tiers: Sequence[str]) -> Dict[str, Tuple[Callable, List[Any], str]]:
    """Put timm's tests of ``tiers`` (re-parametrized) and the fixture they take into a test module's namespace."""
    module = load_timm_test_models()
    namespace["cfg_device"] = module.cfg_device  # the fixture timm's config tests take
    selected = cases(module, tiers)
    for name, (fn, values, _) in selected.items():
        namespace[name] = wrap(fn, values)
    return selected
