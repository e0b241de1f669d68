"""Optimizers by name: `create("adabelief", model.parameters(), lr=1e-3)` and `available()`.

Names are case-insensitive and ignore `_` and `-`, so `adam_warmup`, `AdamWarmup` and `adam-warmup` are
one name. `sgd` is `torch.optim.SGD` with momentum 0.9, the usual baseline.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .base import ParamsT
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
    Noam,
    Prodigy,
    RAdam,
    ScheduleFreeAdamW,
    Sophia,
    muon_with_adamw,
)

__all__ = ["OptimizerInfo", "available", "create", "describe"]


def _sgd(params: ParamsT, lr: float = 0.01, *, momentum: float = 0.9, **kwargs: Any) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, **kwargs)


@dataclass(frozen=True)
class OptimizerInfo:
    """What `adaptopt list` shows of an optimizer."""

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    summary: str
    paper: str

    @property
    def defaults(self) -> dict[str, Any]:
        """The keyword defaults of the factory's signature."""
        return {
            name: parameter.default
            for name, parameter in inspect.signature(self.factory).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }


_REGISTRY: dict[str, OptimizerInfo] = {
    info.name: info
    for info in (
        OptimizerInfo("adam", Adam, "Adam with the seed's optimized update", "Kingma & Ba, ICLR 2015, arXiv:1412.6980"),
        OptimizerInfo("amsgrad", AMSGrad, "Adam normalised by the running max of v_t", "Reddi et al., ICLR 2018"),
        OptimizerInfo("adam_warmup", AdamWarmup, "Adam with linear learning-rate warm-up", "Liu et al., ICLR 2020, §3"),
        OptimizerInfo(
            "adam_warmup_cosine_decay",
            AdamWarmupCosineDecay,
            "Adam with warm-up, then cosine decay to 10% of lr",
            "Loshchilov & Hutter, ICLR 2017, arXiv:1608.03983",
        ),
        OptimizerInfo("noam", Noam, "Adam under the Transformer's Noam schedule", "Vaswani et al., NeurIPS 2017, §5.3"),
        OptimizerInfo(
            "radam",
            RAdam,
            "Adam with the adaptive step's variance rectified",
            "Liu et al., ICLR 2020, arXiv:1908.03265",
        ),
        OptimizerInfo(
            "adabelief",
            AdaBelief,
            "divides by the EMA of (g - m)^2, the belief in the gradient",
            "Zhuang et al., NeurIPS 2020, arXiv:2010.07468",
        ),
        OptimizerInfo(
            "sophia",
            Sophia,
            "clipped Newton-like steps with a Gauss-Newton-Bartlett Hessian estimate",
            "Liu et al., ICLR 2024, arXiv:2305.14342",
        ),
        OptimizerInfo("lion", Lion, "steps by the sign of an interpolated momentum", "Chen et al., NeurIPS 2023"),
        OptimizerInfo(
            "adopt",
            ADOPT,
            "normalises by the previous second moment, then takes momentum",
            "Taniguchi et al., NeurIPS 2024, arXiv:2411.02853",
        ),
        OptimizerInfo(
            "ademamix",
            AdEMAMix,
            "Adam plus a slow EMA of the gradient",
            "Pagliardini et al., ICLR 2025, arXiv:2409.03137",
        ),
        OptimizerInfo(
            "schedule_free_adamw",
            ScheduleFreeAdamW,
            "AdamW without a schedule, evaluated at an average of the iterates",
            "Defazio et al., NeurIPS 2024, arXiv:2405.15682",
        ),
        OptimizerInfo(
            "prodigy",
            Prodigy,
            "Adam whose step size is estimated from the distance to the solution",
            "Mishchenko & Defazio, ICML 2024, arXiv:2306.06101",
        ),
        OptimizerInfo(
            "lamb",
            LAMB,
            "Adam's direction, each tensor's step scaled to its norm (trust ratio)",
            "You et al., ICLR 2020, arXiv:1904.00962",
        ),
        OptimizerInfo(
            "adafactor",
            Adafactor,
            "factored second moments over rows and columns, relative step sizes",
            "Shazeer & Stern, ICML 2018, arXiv:1804.04235",
        ),
        OptimizerInfo(
            "muon",
            muon_with_adamw,
            "orthogonalised momentum (Newton-Schulz) for matrices, AdamW for the rest",
            "Jordan et al. 2024; Liu et al. 2025, arXiv:2502.16982",
        ),
        OptimizerInfo("sgd", _sgd, "torch.optim.SGD with momentum 0.9 (the baseline)", "Polyak, 1964"),
    )
}


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


_BY_KEY = {_key(name): info for name, info in _REGISTRY.items()}


def available() -> list[str]:
    """The registered names, in the family's order."""
    return list(_REGISTRY)


def describe(name: str) -> OptimizerInfo:
    """The registry entry of `name`; raises `ValueError` listing the valid names if there is none."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a str, got {type(name).__name__}")
    try:
        return _BY_KEY[_key(name)]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(available())}") from None


def create(name: str, params: ParamsT, **hyperparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as `name` over `params`."""
    return describe(name).factory(params, **hyperparams)
