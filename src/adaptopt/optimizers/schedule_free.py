r"""Schedule-Free AdamW: no learning-rate schedule, and the average of the iterates for free.

Defazio et al., *The Road Less Scheduled*, NeurIPS 2024 (arXiv:2405.15682), Algorithm 1 with Adam's
normalisation. Three sequences: $z$, the plain (normalised) gradient steps; $x$, a weighted average of the
$z$; and $y$, the interpolation between them where the gradient is taken:

$$y_t = (1 - \beta_1) z_t + \beta_1 x_t, \qquad g_t = \nabla f(y_t)$$
$$v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
  \hat g_t = \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda y_t$$
$$z_{t+1} = z_t - \gamma_t \hat g_t, \qquad x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}$$

with $\gamma_t$ the rate after a linear warm-up over `warmup_steps`, and the averaging weight
$c_{t+1} = w_t / \sum_{i \le t} w_i$, $w_t = t^r \max_{i \le t}(\gamma_i)^{p}$ ($p$ = `weight_lr_power`).
The params hold $y$ (train mode), so the update is written on $y$ and $z$ only, as the official code does:
$y \leftarrow (1 - c) y + c z$, then $y \leftarrow y + \gamma (\beta_1 (1 - c) - 1) \hat g$.

`optimizer.eval()` moves the params to $x = y + (1 - 1/\beta_1)(z - y)$, where the model should be
evaluated and checkpointed; `optimizer.train()` moves them back. `step()` in eval mode raises
`RuntimeError`.

Verified against the official `schedulefree` package (1.4.1, `AdamWScheduleFree`, foreach and loop), in train
and eval mode, with its argument names and defaults. A float `weight_decay=w` is its decay, taken at $y$ on
the normalised gradient, as in the formula above (so it is scaled by the rates of both $y$ and $z$); a
`WeightDecay` policy is applied before the update instead, like in every other optimizer (`own_weight_decay`).
The per-group numbers it keeps are the official ones, under the same names in the param groups (`k`, `lr_max`,
`weight_sum`, `scheduled_lr`, `train_mode`). Differences: we start in train mode (the official optimizer
starts in eval mode and refuses to step before `train()`; before the first step the two modes are the same
point), and we never overwrite `p.grad` (the official code normalises it in place). Its `foreach` option is
our `execution`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..weight_decay import WeightDecay

__all__ = ["ScheduleFreeAdamW"]


class ScheduleFreeAdamW(GenericAdaptiveOptimizer):
    """Schedule-Free AdamW; see the module docstring for the update rule and the modes.

    * `lr` is the peak rate $\\gamma$, reached after `warmup_steps` of linear warm-up.
    * `betas` are $(\\beta_1, \\beta_2)$: the interpolation between $x$ and $z$, and the EMA of $g^2$.
    * `weight_decay`: a float is decay at $y$ (the official meaning); a `WeightDecay` policy is the base's.
    * `r` and `weight_lr_power` shape the averaging weights $w_t = t^r \\gamma_{max}^{p}$.
    """

    kind = "elementwise"
    weight_like_state = frozenset({"z"})  # kept in the working precision under a state_dtype
    own_weight_decay = True
    group_state: ClassVar[Mapping[str, Any]] = {
        "k": 0,
        "train_mode": True,
        "weight_sum": 0.0,
        "lr_max": -1.0,
        "scheduled_lr": 0.0,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.0025,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: WeightDecay | float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
        )
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        state["z"] = param.detach().clone(memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def begin_group_step(self, group: Group) -> None:
        # The official order: the rate warms up linearly over the first `warmup` steps, the weight of this
        # step in the average of the iterates grows with the largest rate so far.
        k = group["k"]
        warmup = group["warmup_steps"]
        lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
        group["scheduled_lr"] = lr
        group["lr_max"] = max(lr, group["lr_max"])
        group["weight_sum"] = group["weight_sum"] + self._weight(group, k + 1)
        group["k"] = k + 1

    @staticmethod
    def _weight(group: Group, t: int) -> float:
        return float((t ** group["r"]) * (group["lr_max"] ** group["weight_lr_power"]))

    def learning_rate(self, state: State, group: Group) -> float:
        return float(group["scheduled_lr"])

    def step_scalars(self, state: State, group: Group) -> Scalars:
        beta1, beta2 = group["betas"]
        t = group["k"]
        lr = self.learning_rate(state, group)
        weight_sum = group["weight_sum"]
        average_weight = self._weight(group, t) / weight_sum if weight_sum != 0 else 0.0
        return {
            "lr": lr,
            "average_weight": average_weight,
            "y_rate": lr * (beta1 * (1.0 - average_weight) - 1.0),
            "bias_correction2": 1.0 - beta2**t,
        }

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        _, beta2 = group["betas"]
        z, exp_avg_sq = state["z"], state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        # \hat g_t = g_t / (sqrt(v_t / (1 - beta2^t)) + eps) + lambda y_t
        normalized = grad / (exp_avg_sq / scalars["bias_correction2"]).sqrt_().add_(group["eps"])
        if not group["weight_decay_policy"] and group["weight_decay"] != 0:
            normalized.add_(param, alpha=group["weight_decay"])
        # y <- (1 - c) y + c z, as an add: lerp_ takes no float64 weight for float32 tensors when compiled.
        param.add_(z - param, alpha=scalars["average_weight"])
        param.add_(normalized, alpha=scalars["y_rate"])
        z.add_(normalized, alpha=-scalars["lr"])

    def switch_mode(self, state: State, group: Group, param: torch.Tensor, train: bool) -> None:
        beta1, _ = group["betas"]
        # x = y + (1 - 1/beta1)(z - y), and back: y = x + (1 - beta1)(z - x).
        param.lerp_(state["z"].to(param.dtype), 1.0 - beta1 if train else 1.0 - 1.0 / beta1)
