"""``torch.compile`` for swinlab models.

The forward pass is written to trace as one graph at the configured resolution: window partition/reverse are
view/permute/reshape, the cyclic shift is ``torch.roll`` with Python-int shifts, the shift mask is a precomputed
buffer (the per-resolution cache is only consulted for other input sizes) and the position bias is computed from
buffers without Python loops over windows. ``compile_model`` wraps ``torch.compile`` with defaults that suit it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(model: nn.Module, *, mode: str = "default", dynamic: bool = False, fullgraph: bool = False,
                  backend: str = "inductor", **kwargs: Any) -> nn.Module:
    """Return ``torch.compile(model, ...)``; the returned module shares parameters and state dict with ``model``.

    ``dynamic=False`` (the default) specialises on the configured image size, which is what training uses; other
    sizes recompile once each. ``fullgraph=True`` turns a graph break into an error (useful in tests).
    """
    if not hasattr(torch, "compile"):  # pragma: no cover - torch >= 2.4 is required
        raise ConfigError("torch.compile is not available in this PyTorch: upgrade to torch>=2.4 or drop --compile")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile mode {mode!r} is unknown: use one of {list(COMPILE_MODES)}")
    return torch.compile(model, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend, **kwargs)


def graph_breaks(model: nn.Module, *example_inputs: torch.Tensor) -> int:
    """Number of graph breaks ``torch._dynamo.explain`` finds in ``model(*example_inputs)`` (0 = one graph)."""
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*example_inputs)
    return int(explanation.graph_break_count)
