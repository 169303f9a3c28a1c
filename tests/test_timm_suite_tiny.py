"""timm's tests/test_models.py on swinlab's Swin-T and SwinV2-T (W8), marked slow (a file of its own so that
pytest-xdist's loadfile runs it beside tests/test_timm_suite.py): see tests/timm_suite.py."""
import timm_suite

CASES = timm_suite.install(globals(), ("ci",))
