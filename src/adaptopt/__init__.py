"""adaptopt: the Adam family of adaptive optimizers for PyTorch, verified against the papers' own code."""

from .base import GenericAdaptiveOptimizer
from .optimizers import (
    ADOPT,
    AdaBelief,
    Adam,
    AdamWarmup,
    AdamWarmupCosineDecay,
    AdEMAMix,
    AMSGrad,
    Lion,
    Noam,
    RAdam,
    ScheduleFreeAdamW,
    Sophia,
)
from .registry import available, create, describe
from .weight_decay import WeightDecay

__version__ = "0.1.0"

__all__ = [
    "ADOPT",
    "AMSGrad",
    "AdEMAMix",
    "AdaBelief",
    "Adam",
    "AdamWarmup",
    "AdamWarmupCosineDecay",
    "GenericAdaptiveOptimizer",
    "Lion",
    "Noam",
    "RAdam",
    "ScheduleFreeAdamW",
    "Sophia",
    "WeightDecay",
    "available",
    "create",
    "describe",
]
