"""One short, literate file per optimizer; each supplies only `init_state` and `step_param`."""

from .adabelief import AdaBelief
from .adam import Adam, AMSGrad
from .radam import RAdam
from .sophia import Sophia
from .warmup import AdamWarmup, AdamWarmupCosineDecay, Noam

__all__ = ["AMSGrad", "AdaBelief", "Adam", "AdamWarmup", "AdamWarmupCosineDecay", "Noam", "RAdam", "Sophia"]
