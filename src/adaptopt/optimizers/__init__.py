"""One short, literate file per optimizer; each supplies only its math (`init_state`, `step_param`, ...)."""

from .adabelief import AdaBelief
from .adam import Adam, AMSGrad
from .ademamix import AdEMAMix
from .adopt import ADOPT
from .lion import Lion
from .radam import RAdam
from .schedule_free import ScheduleFreeAdamW
from .sophia import Sophia
from .warmup import AdamWarmup, AdamWarmupCosineDecay, Noam

__all__ = [
    "ADOPT",
    "AMSGrad",
    "AdEMAMix",
    "AdaBelief",
    "Adam",
    "AdamWarmup",
    "AdamWarmupCosineDecay",
    "Lion",
    "Noam",
    "RAdam",
    "ScheduleFreeAdamW",
    "Sophia",
]
