"""Hand-made mutants of the papers' constants, which mutmut does not reach (module-level constants, or lines whose
mutmut mutants are too coarse). Each mutant is applied to a copy of swinlab/ in a temporary folder (the checkout is
never modified) and the fast tests named with it are run against that copy; every mutant must be killed.

    .venv/bin/python tests/mutate_constants.py          # prints one line per mutant, exits 1 if any survives
    .venv/bin/python tests/mutate_constants.py registry # only the mutants of files whose path contains "registry"

Not collected by pytest (no test_ prefix); see docs/testing.md.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from helpers import ROOT

NUMERICS = "tests/test_numerics.py"
OPTIM = "tests/test_train_optim.py"
# (file, original text, mutated text, tests that must fail)
MUTANTS = [
    ("models/swin.py", "LOGIT_SCALE_MAX = math.log(1.0 / 0.01)", "LOGIT_SCALE_MAX = math.log(1.0 / 0.02)", NUMERICS),
    ("models/swin.py", "LOGIT_SCALE_MAX = math.log(1.0 / 0.01)", "LOGIT_SCALE_MAX = math.log(1.0 / 0.005)", NUMERICS),
    ("models/swin.py", "MASK_VALUE = -100.0", "MASK_VALUE = -1000.0", NUMERICS),
    ("models/swin.py", "CPB_HIDDEN = 512", "CPB_HIDDEN = 256", "tests/test_models.py"),
    ("models/swin.py", "torch.full((num_heads, 1, 1), math.log(10.0))", "torch.full((num_heads, 1, 1), math.log(9.0))",
     NUMERICS),
    ("models/swin.py", 'param.fill_(math.log(10.0))', 'param.fill_(math.log(9.0))', NUMERICS),
    ("models/swin.py", "    table = table * 8\n", "    table = table * 4\n", NUMERICS),
    ("models/swin.py", "/ math.log2(8)", "/ math.log2(9)", NUMERICS),
    ("models/swin.py", "table = 16 * torch.sigmoid(table)", "table = 15 * torch.sigmoid(table)", NUMERICS),
    ("models/swin.py", "norm = pretrained_window if pretrained_window[0] > 0 else window", "norm = window", NUMERICS),
    ("models/swin.py", "else w // 2 for r, w", "else w // 3 for r, w", NUMERICS),
    ("models/swin.py", "scale = hd ** -0.5", "scale = hd ** -0.25", NUMERICS),
    ("models/checkpoint.py", 'mode="bicubic"', 'mode="bilinear"', "tests/test_checkpoint.py"),
    ("tasks/optim.py", "reference_batch: int = 512", "reference_batch: int = 256", OPTIM),
    ("tasks/optim.py", '= ("relative_position_bias_table", "cpb_mlp", "logit_scale")',
     '= ("relative_position_bias_table", "logit_scale")', OPTIM),
    ("tasks/optim.py", "* int(trainer.accumulate_grad_batches) * int(trainer.world_size)",
     "* int(trainer.world_size)", OPTIM),
    # where a warning is reported: mutmut's trampoline adds a frame, so the test skips this check under mutmut
    ("models/checkpoint.py", 'head re-initialised, all other weights loaded", stacklevel=3)',
     'head re-initialised, all other weights loaded", stacklevel=4)', "tests/test_checkpoint.py"),
    ("models/checkpoint.py", 'classes, all other weights loaded", stacklevel=3)',
     'classes, all other weights loaded", stacklevel=2)', "tests/test_checkpoint.py"),
    # code that runs while swinlab.models is imported (the registry, timm's entry points): mutmut switches a mutant on
    # only after the import, so its mutants there always "survive"; these are checked here instead
    ("models/registry.py", '"base": 0.5, "large"', '"base": 0.4, "large"', "tests/test_models.py"),
    ("models/registry.py", "window_size=window, version=version, drop_path_rate=drop_path",
     "window_size=window, version=version, drop_path_rate=0.1", "tests/test_models.py"),
    ("models/registry.py", "num_heads=(1, 2, 4, 8), window_size=4", "num_heads=(1, 2, 4, 4), window_size=4",
     "tests/test_models.py"),
    ("models/registry.py", "window_size=4, version=version, drop_path_rate=0.0",
     "window_size=4, version=version, drop_path_rate=0.1", "tests/test_models.py tests/test_numerics.py"),
    ("models/registry.py", '"large": (192, (2, 2, 18, 2)', '"large": (192, (2, 2, 6, 2)', "tests/test_models.py"),
    ("models/timm_models.py", "pretrained=pretrained, **kwargs)", "pretrained=False, **kwargs)",
     "tests/test_timm_api.py"),
    ("models/timm_models.py", "model.pretrained_cfg = dict(model.pretrained_cfg, **pretrained_cfg_overlay)",
     "pass", "tests/test_timm_api.py"),
    ("models/timm_models.py", "if not is_model(timm_name(name)):", "if False:", "tests/test_timm_api.py"),
]


def run_one(path: str, old: str, new: str, tests: str) -> bool:
    """True when the mutant is killed (the tests fail)."""
    with tempfile.TemporaryDirectory() as tmp:
        pkg = pathlib.Path(tmp) / "swinlab"
        shutil.copytree(ROOT / "swinlab", pkg, ignore=shutil.ignore_patterns("__pycache__"))
        target = pkg / path
        text = target.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{path}: expected exactly one {old!r} (the code changed: update MUTANTS)")
        target.write_text(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=tmp, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, "-c", "import swinlab, sys; sys.exit(0 if swinlab.__file__.startswith("
                              f"{tmp!r}) else 3)"], env=env, cwd=tmp)
        if res.returncode != 0:
            raise SystemExit("the mutated copy is not the swinlab that gets imported")
        # run from the temporary folder (python -m puts the working directory first on sys.path)
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-c",
                              str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-m", "not slow and not gpu",
                              *(str(ROOT / t) for t in tests.split())], env=env, cwd=tmp, capture_output=True)
        return res.returncode != 0


def main(only: str = "") -> int:
    """``only``: run just the mutants whose file contains it (e.g. ``registry``)."""
    survivors = 0
    chosen = [m for m in MUTANTS if only in m[0]]
    for path, old, new, tests in chosen:
        killed = run_one(path, old, new, tests)
        survivors += not killed
        print(f"{'killed  ' if killed else 'SURVIVED'} {path}: {old.strip()!r} -> {new.strip()!r}", flush=True)
    print(f"{len(chosen) - survivors}/{len(chosen)} constant mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
