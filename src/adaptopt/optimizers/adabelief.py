r"""AdaBelief: adapting step sizes by the belief in observed gradients.

Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris & Duncan, *AdaBelief Optimizer: Adapting Stepsizes by
the Belief in Observed Gradients*, NeurIPS 2020 (arXiv:2010.07468).

Adam divides by the EMA of $g_t^2$; AdaBelief divides by the EMA of $(g_t - m_t)^2$, the squared distance
of the gradient from its prediction, so it takes large steps where the gradient is predictable and small
ones where it is not:

$$m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t$$
$$s_t = \beta_2 s_{t-1} + (1 - \beta_2)(g_t - m_t)^2 + \epsilon$$

Without rectification (`rectify=False`):

$$\theta_t = \theta_{t-1} - \frac{\eta}{1 - \beta_1^t} \frac{m_t}{\sqrt{s_t / (1 - \beta_2^t)} + \epsilon}$$

With rectification (`rectify=True`, the default), as RAdam, with $r_t$ from `functional.rectification`:

$$\theta_t = \begin{cases}
  \theta_{t-1} - \eta\, r_t \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \frac{m_t}{\sqrt{s_t} + \epsilon}
    & \rho_t \ge 5 \\
  \theta_{t-1} - \frac{\eta}{1 - \beta_1^t} m_t & \text{otherwise, if } \texttt{degenerate\_to\_sgd}
\end{cases}$$

This follows the official implementation, `adabelief-pytorch` 0.2.x, to its operation order: $\epsilon$ is
added to the stored $s_t$ at every step (not only inside the square root), the threshold is
$\rho_t \ge 5$, and with `amsgrad=True` the running maximum is taken of $s_t$ after $\epsilon$ is added.
It equals `adabelief_pytorch.AdaBelief(weight_decouple=True, rectify=...)`.

Where we differ, and why:

* With `amsgrad=True` and `rectify=True` the official code computes the running maximum but divides by
  $s_t$; we divide by the maximum, which is what `amsgrad=True` asks for.
* The labml seed passed its constructor arguments to its parent by position, so its AdaBelief silently ran
  with AMSGrad on and `optimized_update=False`. Here every argument after `lr` is keyword-only, and
  `amsgrad` defaults to False as in the paper and the official code.
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..functional import rectification
from ..weight_decay import WeightDecay
from .adam import adam_step_scalars

__all__ = ["AdaBelief"]


class AdaBelief(GenericAdaptiveOptimizer):
    """AdaBelief; see the module docstring for the update rule.

    * `lr`, `betas`, `weight_decay` are as in `Adam`; `eps` is added to $s_t$ and to its square root.
    * `amsgrad` divides by the running maximum of $s_t$.
    * `rectify` applies RAdam's rectification; `degenerate_to_sgd` is as in `RAdam`.
    """

    kind = "elementwise"

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: WeightDecay | float = WeightDecay(),
        amsgrad: bool = False,
        degenerate_to_sgd: bool = True,
        rectify: bool = True,
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr, betas=betas, eps=eps, amsgrad=amsgrad, degenerate_to_sgd=degenerate_to_sgd, rectify=rectify
        )
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        # The official implementation's state names.
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_var"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_var"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def step_scalars(self, state: State, group: Group) -> Scalars:
        # Adam's numbers and $r_t$ (None while rho_t < 5, the official threshold).
        rectifier = rectification(group["betas"][1], state["step"], inclusive=True)
        return {**adam_step_scalars(self, state, group), "rectifier": rectifier}

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        exp_avg, exp_avg_var = state["exp_avg"], state["exp_avg_var"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        residual = grad - exp_avg
        exp_avg_var.mul_(beta2).addcmul_(residual, residual, value=1.0 - beta2).add_(eps)
        belief = exp_avg_var
        if group["amsgrad"]:
            belief = torch.maximum(state["max_exp_avg_var"], exp_avg_var, out=state["max_exp_avg_var"])
        lr, rectifier = scalars["lr"], scalars["rectifier"]
        bias_correction1, bias_correction2_sqrt = scalars["bias_correction1"], scalars["bias_correction2_sqrt"]
        # The residual's memory is free from here on: the denominator takes it, so that a step allocates one
        # param-sized temporary, not two (each costs page faults on the CPU's eager paths).
        if not group["rectify"]:
            denominator = torch.sqrt(belief, out=residual).div_(bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denominator, value=-lr / bias_correction1)
            return
        if rectifier is not None:
            denominator = torch.sqrt(belief, out=residual).add_(eps)
            step_size = bias_correction2_sqrt * rectifier / bias_correction1
            param.addcdiv_(exp_avg, denominator, value=-step_size * lr)
        elif group["degenerate_to_sgd"]:
            param.add_(exp_avg, alpha=-lr / bias_correction1)
