"""Lightning tasks: image classification and SimMIM masked image modelling."""
from .classifier import ImageClassifier
from .optim import NO_DECAY_KEYWORDS, is_no_decay, layer_ids, param_groups, scaled_lr, warmup_cosine_scheduler
from .simmim import MaskedImageModeling

__all__ = ["ImageClassifier", "MaskedImageModeling", "NO_DECAY_KEYWORDS", "is_no_decay", "layer_ids", "param_groups",
           "scaled_lr", "warmup_cosine_scheduler"]
