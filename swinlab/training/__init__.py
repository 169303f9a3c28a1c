"""Training machinery that does not depend on which task runs: the CLI (``cli``), callbacks (``callbacks``, the
non-finite guard in ``nonfinite``), checkpoint IO and its trust boundary (``checkpoint_io``), pre-flight checks of
strategy/precision/devices (``preflight``) and sharding (``sharding``: meta init, FSDP2 helpers, gradient norms over
shards). The tasks build on ``preflight`` and ``sharding``; nothing here imports a task (the CLI reaches them by class
path from the config). Nothing is imported here, so ``import swinlab.training.preflight`` stays light."""
