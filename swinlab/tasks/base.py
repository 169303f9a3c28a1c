"""What every swinlab LightningModule shares: model set-up under the strategy and the checkpoint metadata."""
from __future__ import annotations

from typing import Any, Dict

from .sharding import defer_checkpointing_to_strategy, shard_swin


class SwinTask:
    """Mixin for LightningModules that hold a registry Swin as ``self.model`` (named ``self.model_name``) and have
    ``sharding`` / ``compile`` hyperparameters."""

    _configured = False

    def configure_model(self) -> None:
        """FSDP2 per block then the whole model under ModelParallelStrategy; FSDP1's own activation checkpointing
        replaces the model's; ``torch.compile`` in place (checkpoint keys unchanged) if asked."""
        if self._configured:
            return
        self._configured = True
        defer_checkpointing_to_strategy(self.model, self._trainer)
        shard_swin(self.model, self.device_mesh, self.hparams.get("sharding"))
        if self.hparams.get("compile"):
            self.model.compile()

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Lets ``create_model(name, checkpoint=...)`` rebuild the saved geometry from a Lightning checkpoint."""
        checkpoint["swinlab"] = {"model": self.model_name, "config": dict(self.model.config)}
