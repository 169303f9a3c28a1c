"""Lab tools on top of the model and training layers, one command each: ``bench`` (throughput/memory beside timm),
``estimate`` (per-GPU memory of a config), ``ablate`` (resolution-transfer studies), ``catalog`` (``python -m swinlab
models``) and ``convert``. Nothing is imported here."""
