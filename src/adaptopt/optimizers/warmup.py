r"""Adam under a learning-rate schedule: linear warm-up, warm-up with cosine decay, and Noam.

The math of each step is Adam's (or AMSGrad's, with `amsgrad=True`), from `adam.py`; only the effective
learning rate $\eta_t = \eta f(t - 1)$ changes, with $f$ from `schedules.py`. Decoupled weight decay uses
$\eta_t$ too. Each class equals `Adam` driven by `torch.optim.lr_scheduler.LambdaLR` with the same $f$.

* `AdamWarmup`: $f = \min(1, t / w)$. Warm-up counters the large variance of the adaptive step size early
  in training (Liu et al., ICLR 2020, arXiv:1908.03265, §3).
* `AdamWarmupCosineDecay`: warm-up, then a half cosine to 10% of `lr` at `total_steps`
  (Loshchilov & Hutter, SGDR, ICLR 2017, arXiv:1608.03983).
* `Noam`: $f = d_{model}^{-0.5} \min(t^{-0.5}, t\,w^{-1.5})$, the Transformer's schedule
  (Vaswani et al., *Attention Is All You Need*, NeurIPS 2017, arXiv:1706.03762, §5.3).
"""

from __future__ import annotations

import inspect

from typing_extensions import Unpack

from .. import schedules
from ..base import GenericAdaptiveOptimizer, Group, ParamsT
from .adam import AdamOptions, adam_arguments, adam_init_state, adam_signature, adam_step_param, adam_step_scalars

__all__ = ["AdamWarmup", "AdamWarmupCosineDecay", "Noam"]


def _keyword(name: str, default: float) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=type(default))


class AdamWarmup(GenericAdaptiveOptimizer):
    """Adam with a linear warm-up of the learning rate over `warmup` steps."""

    kind = "elementwise"
    init_state = adam_init_state
    step_scalars = adam_step_scalars
    step_param = adam_step_param
    __signature__ = adam_signature(_keyword("warmup", 0))

    def __init__(self, params: ParamsT, lr: float = 1e-3, *, warmup: int = 0, **options: Unpack[AdamOptions]) -> None:
        defaults, base_options = adam_arguments(lr, options, warmup=warmup)
        super().__init__(params, defaults, **base_options)

    def lr_factor(self, group: Group, k: int) -> float:
        return schedules.linear_warmup(k, warmup=group["warmup"])


class AdamWarmupCosineDecay(GenericAdaptiveOptimizer):
    """Adam with linear warm-up, then cosine decay to 10% of `lr` at `total_steps`."""

    kind = "elementwise"
    init_state = adam_init_state
    step_scalars = adam_step_scalars
    step_param = adam_step_param
    __signature__ = adam_signature(_keyword("warmup", 0), _keyword("total_steps", 1e10))

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        warmup: int = 0,
        total_steps: float = 1e10,
        **options: Unpack[AdamOptions],
    ) -> None:
        defaults, base_options = adam_arguments(lr, options, warmup=warmup, total_steps=total_steps)
        super().__init__(params, defaults, **base_options)

    def lr_factor(self, group: Group, k: int) -> float:
        return schedules.warmup_cosine_decay(k, warmup=group["warmup"], total_steps=group["total_steps"])


class Noam(GenericAdaptiveOptimizer):
    """Adam under the Noam schedule; `lr` multiplies the schedule.

    The default `lr=1e-3` is the seed's; the paper's rate is the schedule itself (`lr=1`), whose peak is
    $d_{model}^{-0.5} w^{-0.5}$ (7e-4 for $d_{model} = 512$, $w = 4000$).
    """

    kind = "elementwise"
    init_state = adam_init_state
    step_scalars = adam_step_scalars
    step_param = adam_step_param
    __signature__ = adam_signature(_keyword("warmup", 0), _keyword("d_model", 512))

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, *, warmup: int = 0, d_model: int = 512, **options: Unpack[AdamOptions]
    ) -> None:
        defaults, base_options = adam_arguments(lr, options, warmup=warmup, d_model=d_model)
        super().__init__(params, defaults, **base_options)

    def lr_factor(self, group: Group, k: int) -> float:
        return schedules.noam(k, warmup=group["warmup"], d_model=group["d_model"])
