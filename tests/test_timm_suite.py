"""timm's tests/test_models.py (installed timm's sdist) on every swinlab_* model: see tests/timm_suite.py."""
import timm_suite

_timm = timm_suite.load_timm_test_models()
cfg_device = _timm.cfg_device  # the fixture timm's config tests take

CASES = timm_suite.cases(_timm)
for _name, (_fn, _values, _why) in CASES.items():
    globals()[_name] = timm_suite.wrap(_fn, _values)
