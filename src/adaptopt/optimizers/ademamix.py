r"""AdEMAMix: Adam with a second, much slower momentum mixed in.

Pagliardini, Ablin & Grangier, *The AdEMAMix Optimizer: Better, Faster, Older*, ICLR 2025
(arXiv:2409.03137), Algorithm 1. One EMA of the gradient cannot both react fast and remember long; AdEMAMix
keeps Adam's fast $m_1$ and adds a slow $m_2$ ($\beta_3$ close to 1, remembering thousands of steps), weighted
by $\alpha$:

$$m_1 = \beta_1 m_1 + (1 - \beta_1) g_t, \quad m_2 = \beta_3 m_2 + (1 - \beta_3) g_t, \quad
  \nu = \beta_2 \nu + (1 - \beta_2) g_t^2$$
$$\theta_t = \theta_{t-1} - \eta_t \left( \frac{m_1 / (1 - \beta_1^t) + \alpha\, m_2}
  {\sqrt{\nu / (1 - \beta_2^t)} + \epsilon} + \lambda \theta_{t-1} \right)$$

The slow momentum is not bias-corrected. Early on it is large and stale, so the paper warms both up:
$\alpha$ linearly from 0 over `alpha_warmup` steps, and $\beta_3$ from $\beta_1$ over `beta3_warmup` steps,
linearly in the *half-life* $\log(1/2) / \log \beta - 1$, not in $\beta$ itself.

Verified against the authors' code (github apple/ml-ademamix, `AdEMAMix` of `pytorch/ademamix.py`), whose
argument names and defaults we take, with its two warm-ups. `weight_decay=w` (a float) is its decoupled
decay $\lambda$, as above (a `WeightDecay` policy works too). With `betas[0] == 0` the fast momentum is the
gradient itself and no state is kept for it, as there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..functional import bias_correction
from ..weight_decay import WeightDecay

__all__ = ["AdEMAMix", "alpha_warmup", "beta3_warmup"]


def alpha_warmup(step: int, alpha: float, warmup: int) -> float:
    """$\\alpha$ after `step` steps of a linear warm-up from 0 over `warmup` steps."""
    if step < warmup:
        fraction = step / float(warmup)
        return fraction * alpha
    return alpha


def _half_life(beta: float) -> float:
    return math.log(0.5) / math.log(beta + 1e-8) - 1.0


def beta3_warmup(step: int, beta_start: float, beta3: float, warmup: int) -> float:
    """$\\beta_3$ after `step` steps of a warm-up from $\\beta_1$, linear in the half-life (the paper's eq. 3)."""
    if step < warmup:
        fraction = step / float(warmup)
        half_life = (1.0 - fraction) * _half_life(beta_start) + fraction * _half_life(beta3)
        return math.pow(0.5, 1.0 / (half_life + 1.0))
    return beta3


class AdEMAMix(GenericAdaptiveOptimizer):
    """AdEMAMix; see the module docstring for the update rule.

    * `lr` is $\\eta$; `betas` are $(\\beta_1, \\beta_2, \\beta_3)$: fast momentum, $g^2$, slow momentum.
    * `alpha` weighs the slow momentum; `alpha_warmup` and `beta3_warmup` (steps, or None) warm them up.
    * `eps` is $\\epsilon$; `weight_decay` is a float (the authors' decoupled decay) or a `WeightDecay` policy.
    """

    kind = "elementwise"

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 2.0,
        beta3_warmup: int | None = None,
        alpha_warmup: int | None = None,
        eps: float = 1e-8,
        weight_decay: WeightDecay | float = 0.0,
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr, betas=betas, alpha=alpha, beta3_warmup=beta3_warmup, alpha_warmup=alpha_warmup, eps=eps
        )
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        if group["betas"][0] != 0:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_slow"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def step_scalars(self, state: State, group: Group) -> Scalars:
        beta1, beta2, beta3 = group["betas"]
        step = state["step"]
        alpha, warm_alpha, warm_beta3 = group["alpha"], group["alpha_warmup"], group["beta3_warmup"]
        return {
            "lr": self.learning_rate(state, group),
            "bias_correction1": bias_correction(beta1, step),
            "bias_correction2_sqrt": math.sqrt(bias_correction(beta2, step)),
            "alpha": alpha if warm_alpha is None else alpha_warmup(step, alpha, warm_alpha),
            "beta3": beta3 if warm_beta3 is None else beta3_warmup(step, beta1, beta3, warm_beta3),
        }

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        beta1, beta2, _ = group["betas"]
        exp_avg_slow, exp_avg_sq = state["exp_avg_slow"], state["exp_avg_sq"]
        # With beta1 = 0 the fast momentum is the gradient itself.
        exp_avg = state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1) if beta1 != 0 else grad
        exp_avg_slow.mul_(scalars["beta3"]).add_(grad, alpha=1.0 - scalars["beta3"])
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denominator = (exp_avg_sq.sqrt() / scalars["bias_correction2_sqrt"]).add_(group["eps"])
        mixed = (exp_avg / scalars["bias_correction1"]).add_(exp_avg_slow, alpha=scalars["alpha"])
        param.add_(mixed.div_(denominator), alpha=-scalars["lr"])
