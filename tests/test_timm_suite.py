"""timm's tests/test_models.py (installed timm's sdist) on swinlab's test-sized models, and on every other size with
``--timm-suite all``: see tests/timm_suite.py."""
import timm_suite

CASES = timm_suite.install(globals(), ("fast", "all"))
