"""adaptopt: the Adam family of adaptive optimizers for PyTorch, verified against the papers' own code."""

from .base import GenericAdaptiveOptimizer
from .optimizers import (
    ADOPT,
    LAMB,
    AdaBelief,
    Adafactor,
    Adam,
    AdamWarmup,
    AdamWarmupCosineDecay,
    AdEMAMix,
    AMSGrad,
    Lion,
    Muon,
    MuonWithAdamW,
    Noam,
    Prodigy,
    RAdam,
    ScheduleFreeAdamW,
    Sophia,
    muon_with_adamw,
)
from .registry import available, create, describe
from .weight_decay import WeightDecay

__version__ = "0.1.0"

__all__ = [
    "ADOPT",
    "LAMB",
    "AMSGrad",
    "AdEMAMix",
    "AdaBelief",
    "Adafactor",
    "Adam",
    "AdamWarmup",
    "AdamWarmupCosineDecay",
    "GenericAdaptiveOptimizer",
    "Lion",
    "Muon",
    "MuonWithAdamW",
    "Noam",
    "Prodigy",
    "RAdam",
    "ScheduleFreeAdamW",
    "Sophia",
    "WeightDecay",
    "available",
    "create",
    "describe",
    "muon_with_adamw",
]
