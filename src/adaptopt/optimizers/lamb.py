r"""LAMB: Adam's direction, each tensor's step scaled to its own norm (layer-wise adaptive rates).

You et al., *Large Batch Optimization for Deep Learning: Training BERT in 76 minutes*, ICLR 2020
(arXiv:1904.00962), Algorithm 2 with the identity scaling $\phi(x) = x$, with the conventions of NVIDIA apex's
`FusedLAMB`, the implementation large-batch training uses. With $N$ the norm of all gradients of all groups
together, $\hat g = g / \max(1, N / N_{max})$ (`max_grad_norm`; None for no clipping), per tensor:

$$m = \beta_1 m + (1 - \beta_1) \hat g, \qquad v = \beta_2 v + (1 - \beta_2) \hat g^2$$
$$u = \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} + \lambda \theta, \qquad
  \theta \leftarrow \theta - \eta \frac{\lVert\theta\rVert}{\lVert u\rVert} u$$

so each step moves each tensor by exactly $\eta \lVert\theta\rVert$ whatever the gradient's scale (the trust
ratio is 1 when either norm is 0). As in apex, the trust ratio is applied where $\lambda \ne 0$ or
`use_nvlamb=True` (the paper's Algorithm 2 always applies it: `use_nvlamb=True`); elsewhere, typically the
biases and norms of a group without decay, the step is Adam's. `adam_w_mode=False` puts the decay on the
clipped gradient instead (L2), `grad_averaging=False` drops the $(1 - \beta_1)$ of $m$, and
`bias_correction=False` the bias corrections.

Verified against a float64 loop written from apex's code (`tests/reference_family.py`, apex is CUDA-only),
with its argument names and defaults (`weight_decay=0.01`, `eps=1e-6`, `max_grad_norm=1.0`), and cross-checked
against pytorch_optimizer's `Lamb` where that can agree. `weight_decay=w` (a float) is apex's decay, inside
the update (`own_weight_decay`); a `WeightDecay` policy is applied before the update instead. Both norms are
per-tensor sums of the base (`kind = "tensorwise"`): segmented over the params of a bucket, so the fast paths
step many tensors in one call. Differences: the global norm is a first pass of the base (`reduces`) over every
group, with `max_grad_norm` read from the first group (apex reads its constructor's); the step counter is per
param (apex keeps one per group, the same while every param has a grad); `p.grad` is never overwritten (apex
writes $u$ into it); and any float dtype is stepped, in its own precision (apex computes in float32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..functional import bias_correction
from ..weight_decay import WeightDecay

__all__ = ["LAMB"]


class LAMB(GenericAdaptiveOptimizer):
    """LAMB; see the module docstring for the update rule.

    * `lr` is $\\eta$; `betas` are $(\\beta_1, \\beta_2)$; `eps` is $\\epsilon$.
    * `weight_decay`: a float is apex's $\\lambda$ in the update; or a `WeightDecay` policy.
    * `max_grad_norm` clips the global grad norm (None: no clipping); `use_nvlamb` applies the trust ratio
      without decay too; `adam_w_mode`, `grad_averaging`, `bias_correction` are apex's switches.
    """

    own_weight_decay = True
    kind = "tensorwise"  # the trust ratio takes each tensor's norms, through scalars["extents"]
    reduces = True
    group_state: ClassVar[Mapping[str, Any]] = {"grad_divisor": 1.0}

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: WeightDecay | float = 0.01,
        adam_w_mode: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        use_nvlamb: bool = False,
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=betas,
            eps=eps,
            adam_w_mode=adam_w_mode,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            use_nvlamb=use_nvlamb,
        )
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def reduce_param(
        self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars
    ) -> dict[str, torch.Tensor]:
        # In float64 (squares of float32 and narrower are exact there): a bucket's one sum then equals the
        # reference loop's per-param sums, where a bfloat16 sum would round otherwise.
        return {"grad_norm_squared": grad.to(torch.float64).square().sum()}

    def end_reduction(self, totals: dict[str, float]) -> bool:
        norm = math.sqrt(totals.get("grad_norm_squared", 0.0))
        limit = self.param_groups[0]["max_grad_norm"]
        divisor = 1.0
        if limit is not None and norm > limit:
            divisor = norm / limit if limit > 0 else math.inf  # apex: a limit of 0 zeroes every gradient
        for group in self.param_groups:
            group["grad_divisor"] = divisor
        return True

    def step_scalars(self, state: State, group: Group) -> Scalars:
        beta1, beta2 = group["betas"]
        step, corrected = state["step"], group["bias_correction"]
        return {
            "lr": self.learning_rate(state, group),
            "bias_correction1": bias_correction(beta1, step) if corrected else 1.0,
            "bias_correction2": bias_correction(beta2, step) if corrected else 1.0,
            "grad_divisor": float(group["grad_divisor"]),
        }

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        beta1, beta2 = group["betas"]
        decay = 0.0 if group["weight_decay_policy"] else group["weight_decay"]
        clipped = grad / scalars["grad_divisor"]
        if decay != 0 and not group["adam_w_mode"]:
            clipped.add_(param, alpha=decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(clipped, alpha=1.0 - beta1 if group["grad_averaging"] else 1.0)
        exp_avg_sq.mul_(beta2).addcmul_(clipped, clipped, value=1.0 - beta2)
        update = (exp_avg / scalars["bias_correction1"]).div_(
            (exp_avg_sq / scalars["bias_correction2"]).sqrt_().add_(group["eps"])
        )
        if decay != 0 and group["adam_w_mode"]:
            update.add_(param, alpha=decay)
        rate: Any = scalars["lr"]
        if group["weight_decay"] != 0 or group["use_nvlamb"]:
            # The trust ratio ||theta|| / ||u||, with theta before the step; 1 where either is 0.
            param_norm, update_norm = scalars["extents"].norm(param), scalars["extents"].norm(update)
            ratio = torch.where((param_norm > 0) & (update_norm > 0), param_norm / update_norm, 1.0)
            rate = ratio * scalars["lr"]
        param.add_(update * rate, alpha=-1.0)
