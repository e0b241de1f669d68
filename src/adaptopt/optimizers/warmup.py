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

from typing import Any

from typing_extensions import Unpack

from .. import schedules
from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT
from ..weight_decay import WeightDecay
from .adam import adam_init_state, adam_step_param, adam_step_scalars

__all__ = ["AdamWarmup", "AdamWarmupCosineDecay", "Noam"]


class AdamWarmup(GenericAdaptiveOptimizer):
    """Adam with a linear warm-up of the learning rate over `warmup` steps."""

    init_state = adam_init_state
    step_scalars = adam_step_scalars
    step_param = adam_step_param

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: WeightDecay | float = WeightDecay(),
        optimized_update: bool = True,
        amsgrad: bool = False,
        warmup: int = 0,
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr, betas=betas, eps=eps, optimized_update=optimized_update, amsgrad=amsgrad, warmup=warmup
        )
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def lr_factor(self, group: Group, k: int) -> float:
        return schedules.linear_warmup(k, warmup=group["warmup"])


class AdamWarmupCosineDecay(GenericAdaptiveOptimizer):
    """Adam with linear warm-up, then cosine decay to 10% of `lr` at `total_steps`."""

    init_state = adam_init_state
    step_scalars = adam_step_scalars
    step_param = adam_step_param

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: WeightDecay | float = WeightDecay(),
        optimized_update: bool = True,
        amsgrad: bool = False,
        warmup: int = 0,
        total_steps: float = 1e10,
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            optimized_update=optimized_update,
            amsgrad=amsgrad,
            warmup=warmup,
            total_steps=total_steps,
        )
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def lr_factor(self, group: Group, k: int) -> float:
        return schedules.warmup_cosine_decay(k, warmup=group["warmup"], total_steps=group["total_steps"])


class Noam(GenericAdaptiveOptimizer):
    """Adam under the Noam schedule; `lr` multiplies the schedule.

    The default `lr=1e-3` is the seed's; the paper's rate is the schedule itself (`lr=1`), whose peak is
    $d_{model}^{-0.5} w^{-0.5}$ (7e-4 for $d_{model} = 512$, $w = 4000$).
    """

    init_state = adam_init_state
    step_scalars = adam_step_scalars
    step_param = adam_step_param

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: WeightDecay | float = WeightDecay(),
        optimized_update: bool = True,
        amsgrad: bool = False,
        warmup: int = 0,
        d_model: int = 512,
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            optimized_update=optimized_update,
            amsgrad=amsgrad,
            warmup=warmup,
            d_model=d_model,
        )
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def lr_factor(self, group: Group, k: int) -> float:
        return schedules.noam(k, warmup=group["warmup"], d_model=group["d_model"])
