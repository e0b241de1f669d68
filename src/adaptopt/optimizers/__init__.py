"""One short, literate file per optimizer; each supplies only its math (`init_state`, `step_param`, ...)."""

from .adabelief import AdaBelief
from .adafactor import Adafactor
from .adam import Adam, AMSGrad
from .ademamix import AdEMAMix
from .adopt import ADOPT
from .lamb import LAMB
from .lion import Lion
from .muon import Muon, MuonWithAdamW, muon_with_adamw
from .prodigy import Prodigy
from .radam import RAdam
from .schedule_free import ScheduleFreeAdamW
from .sophia import Sophia
from .warmup import AdamWarmup, AdamWarmupCosineDecay, Noam

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
    "Lion",
    "Muon",
    "MuonWithAdamW",
    "Noam",
    "Prodigy",
    "RAdam",
    "ScheduleFreeAdamW",
    "Sophia",
    "muon_with_adamw",
]
