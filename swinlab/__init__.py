"""swinlab: Swin Transformer V1 and V2 as one switchable model, with Lightning training at scale."""
from .errors import CheckpointError, ConfigError, SwinlabError
from .models import SwinTransformer, create_model, list_models

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "SwinTransformer", "SwinlabError", "create_model", "list_models",
           "__version__"]
