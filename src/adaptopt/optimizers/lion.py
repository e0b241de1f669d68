r"""Lion: EvoLved Sign Momentum.

Chen et al., *Symbolic Discovery of Optimization Algorithms*, NeurIPS 2023 (arXiv:2302.06675), Program 1.
Found by program search, Lion keeps one moment and steps by its sign, so every coordinate moves by exactly
$\eta$ (times the decay) each step:

$$c_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t$$
$$\theta_t = \theta_{t-1} - \eta_t \left(\mathrm{sign}(c_t) + \lambda \theta_{t-1}\right)$$
$$m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t$$

The interpolation $c_t$ that is stepped on uses $\beta_1$, the moment that is kept uses $\beta_2 > \beta_1$.
As the update has unit size per coordinate, the paper advises a rate 3-10x smaller than AdamW's and a decay
3-10x larger, which keeps $\eta\lambda$ about the same.

Verified against the official code of lucidrains' `lion-pytorch` (0.2.5, `Lion`), which we equal in
argument names and defaults (its moment updates written as lerps, which round alike in torch's vectorised loop
and its scalar tail in bfloat16; in float64 we measured no deviation from it):

* `weight_decay=w` (a float) is its decoupled decay, $\theta \leftarrow \theta (1 - \eta_t w)$, applied
  before the update (a `WeightDecay` policy works too);
* `decoupled_weight_decay=True` divides `w` by the initial `lr` (its option of the same name), so that the
  decay per step is $w \eta_t / \eta_0$, independent of the rate's scale (group key `decay_rate_divisor`).

We differ in what we add: validation with `ValueError`s (the official code asserts), `maximize`, buckets and
compilation instead of its optional Triton kernel (`use_triton` is not taken).
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..weight_decay import WeightDecay

__all__ = ["Lion"]


class Lion(GenericAdaptiveOptimizer):
    """Lion; see the module docstring for the update rule.

    * `lr` is $\\eta$; `betas` are $(\\beta_1, \\beta_2)$, of the stepped interpolation and of the moment.
    * `weight_decay` is a `WeightDecay` policy or a float, meaning lion-pytorch's decoupled decay.
    * `decoupled_weight_decay` divides a float `weight_decay` by `lr` (lion-pytorch's option).
    """

    kind = "elementwise"
    own_weight_decay = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        *,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: WeightDecay | float = 0.0,
        decoupled_weight_decay: bool = False,
        **options: Unpack[CommonOptions],
    ) -> None:
        if not isinstance(decoupled_weight_decay, bool):
            raise TypeError(f"decoupled_weight_decay must be a bool, got {type(decoupled_weight_decay).__name__}")
        divisor = 1.0
        if decoupled_weight_decay:
            if isinstance(weight_decay, WeightDecay):
                raise ValueError(
                    "decoupled_weight_decay=True takes a float weight_decay; a WeightDecay policy has its own mode"
                )
            if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
                raise ValueError(f"lr must be in (0, inf) with decoupled_weight_decay=True, got {lr!r}")
            divisor = float(lr)
        defaults: dict[str, Any] = dict(lr=lr, betas=betas, decay_rate_divisor=divisor)
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"]
        if not group["weight_decay_policy"] and group["weight_decay"] != 0:
            # lion-pytorch's decay, first: theta <- theta (1 - eta_t w), w divided by the initial rate if asked.
            param.mul_(1.0 - scalars["lr"] * (group["weight_decay"] / group["decay_rate_divisor"]))
        # sign(c_t), with c_t = beta1 m_{t-1} + (1 - beta1) g_t
        update = exp_avg.lerp(grad, 1.0 - beta1).sign_()
        param.add_(update, alpha=-scalars["lr"])
        # m_t = beta2 m_{t-1} + (1 - beta2) g_t, as a lerp (torch.optim.Adam's way): one rounding, the same in
        # torch's vectorised loop and its scalar tail, where mul_ then add_(alpha=) may round twice or fuse.
        exp_avg.lerp_(grad, 1.0 - beta2)
