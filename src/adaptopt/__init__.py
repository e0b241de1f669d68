"""adaptopt: the Adam family of adaptive optimizers for PyTorch, verified against the papers' own code."""

from .base import GenericAdaptiveOptimizer
from .optimizers import AdaBelief, Adam, AdamWarmup, AdamWarmupCosineDecay, AMSGrad, Noam, RAdam, Sophia
from .registry import available, create, describe
from .weight_decay import WeightDecay

__version__ = "0.1.0"

__all__ = [
    "AMSGrad",
    "AdaBelief",
    "Adam",
    "AdamWarmup",
    "AdamWarmupCosineDecay",
    "GenericAdaptiveOptimizer",
    "Noam",
    "RAdam",
    "Sophia",
    "WeightDecay",
    "available",
    "create",
    "describe",
]
