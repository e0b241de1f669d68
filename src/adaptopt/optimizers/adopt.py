r"""ADOPT: Adam that converges for any $\beta_2$, by normalising with the *previous* second moment.

Taniguchi et al., *ADOPT: Modified Adam Can Converge with Any $\beta_2$ with the Optimal Rate*, NeurIPS 2024
(arXiv:2411.02853), Algorithm 1 with the clipping of its §4. Adam's update is correlated with its own
denominator, because $v_t$ contains $g_t^2$; ADOPT divides by $v_{t-1}$ instead and takes the momentum of the
normalised gradient, not the normalisation of the momentum:

$$v_0 = g_0^2 \quad \text{(the first step only initialises } v\text{)}$$
$$m_t = \beta_1 m_{t-1} + (1 - \beta_1)\, \mathrm{clip}\!\left(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)}, c_t\right)$$
$$\theta_t = \theta_{t-1} - \eta_t m_t, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2$$

The clipping to $[-c_t, c_t]$, $c_t = t^{1/4}$ by default (`clip_lambda`, a function of the step number $t$,
counted from 1 at the step that initialised $v$; `None` disables it), keeps early steps bounded while $v$
is still a poor estimate.

Verified against the authors' code (github iShohei220/adopt, `adopt.py`), whose argument names and defaults we
take: `weight_decay=w` (a float) is coupled L2, $g_t \leftarrow g_t + w \theta_{t-1}$ (in $v_0$ too), or with
`decouple=True` decoupled decay $\theta \leftarrow \theta (1 - \eta_t w)$ from the second step on, as there
(`own_weight_decay`: the keys are theirs, `weight_decay` and `decouple`; a `WeightDecay` policy decays on
every step). The default `clip_lambda` is a named function, not a lambda, so that param groups (and so
checkpoints) can be pickled. pytorch_optimizer's `ADOPT` differs from the authors' code: tests/test_family.py
has the list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..weight_decay import WeightDecay

__all__ = ["ADOPT", "quarter_power_clip"]


def quarter_power_clip(step: int) -> float:
    """The authors' default clipping bound $c_t = t^{1/4}$."""
    return float(step**0.25)


class ADOPT(GenericAdaptiveOptimizer):
    """ADOPT; see the module docstring for the update rule.

    * `lr` is $\\eta$; `betas` are $(\\beta_1, \\beta_2)$; `eps` is $\\epsilon$, the floor of $\\sqrt{v}$.
    * `clip_lambda(t)` is the clipping bound at step $t$, or None for no clipping.
    * `weight_decay`: a float is the authors' decay, coupled unless `decouple=True`; or a `WeightDecay` policy.
    """

    kind = "elementwise"
    own_weight_decay = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_lambda: Callable[[int], float] | None = quarter_power_clip,
        weight_decay: WeightDecay | float = 0.0,
        decouple: bool = False,
        **options: Unpack[CommonOptions],
    ) -> None:
        if clip_lambda is not None and not callable(clip_lambda):
            raise TypeError(f"clip_lambda must be a function of the step or None, got {type(clip_lambda).__name__}")
        if not isinstance(decouple, bool):
            raise TypeError(f"decouple must be a bool, got {type(decouple).__name__}")
        defaults: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, clip_lambda=clip_lambda, decouple=decouple)
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def step_scalars(self, state: State, group: Group) -> Scalars:
        step, clip_lambda = state["step"], group["clip_lambda"]
        # The first step only initialises v (None switches the update off); the clip bound counts from there.
        first = step == 1
        clip = None if first or clip_lambda is None else float(clip_lambda(step - 1))
        return {"lr": self.learning_rate(state, group), "first": first, "clip": clip}

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        own_decay = 0.0 if group["weight_decay_policy"] else group["weight_decay"]
        if own_decay != 0 and not group["decouple"]:
            grad = grad.add(param, alpha=own_decay)  # the authors' L2, in v_0 too
        if scalars["first"]:
            exp_avg_sq.addcmul_(grad, grad)  # v_0 = g_0^2
            return
        if own_decay != 0 and group["decouple"]:
            param.mul_(1.0 - scalars["lr"] * own_decay)
        normalized = grad / exp_avg_sq.sqrt().clamp_(min=group["eps"])
        if scalars["clip"] is not None:
            normalized.clamp_(-scalars["clip"], scalars["clip"])
        exp_avg.lerp_(normalized, 1.0 - beta1)
        param.add_(exp_avg, alpha=-scalars["lr"])
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
