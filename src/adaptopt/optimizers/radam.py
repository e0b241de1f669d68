r"""RAdam: Adam with the variance of its adaptive step rectified.

Liu, Jiang, He, Chen, Liu, Gao & Han, *On the Variance of the Adaptive Learning Rate and Beyond*,
ICLR 2020 (arXiv:1908.03265).

Early in training $v_t$ is estimated from few samples, so the adaptive step $1/\sqrt{v_t}$ has a large
(for $\rho_t \le 4$ divergent) variance. RAdam multiplies the Adam step by $r_t$
(`functional.rectification`), which makes that variance constant, and while $\rho_t \le 5$ falls back to
bias-corrected momentum SGD (or, with `degenerate_to_sgd=False`, skips the update):

$$\theta_t = \begin{cases}
  \theta_{t-1} - \eta\, r_t \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \frac{m_t}{\sqrt{v_t} + \epsilon}
    & \rho_t > 5 \\
  \theta_{t-1} - \frac{\eta}{1 - \beta_1^t} m_t & \text{otherwise}
\end{cases}$$

That is `optimized_update=True` (the default), which is exactly `torch.optim.RAdam`; `optimized_update=False`
puts $\epsilon$ next to $\sqrt{v_t / (1 - \beta_2^t)}$ as Adam does. `amsgrad=True` uses
$\max(\hat v_{t-1}, v_t)$ in place of $v_t$, as the seed allowed. The threshold is $\rho_t > 5$, as in
torch.optim (the seed tested $\rho_t \ge 5$; the two differ only where $\rho_t$ is exactly 5).

The seed's argument is spelled `degenerated_to_sgd`; we spell it `degenerate_to_sgd`.
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..functional import adam_step, rectification
from ..weight_decay import WeightDecay
from .adam import adam_init_state, adam_step_scalars

__all__ = ["RAdam"]


class RAdam(GenericAdaptiveOptimizer):
    """Rectified Adam; see the module docstring for the update rule.

    * `lr`, `betas`, `eps`, `weight_decay`, `optimized_update`, `amsgrad` are as in `Adam`.
    * `degenerate_to_sgd`: while $\\rho_t \\le 5$, take a momentum-SGD step (True) or no step (False).
    """

    kind = "elementwise"

    init_state = adam_init_state

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: WeightDecay | float = WeightDecay(),
        optimized_update: bool = True,
        amsgrad: bool = False,
        degenerate_to_sgd: bool = True,
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            optimized_update=optimized_update,
            amsgrad=amsgrad,
            degenerate_to_sgd=degenerate_to_sgd,
        )
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def step_scalars(self, state: State, group: Group) -> Scalars:
        # Adam's numbers and $r_t$, which is None while the variance is intractable.
        return {**adam_step_scalars(self, state, group), "rectifier": rectification(group["betas"][1], state["step"])}

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        second_moment = exp_avg_sq
        if group["amsgrad"]:
            second_moment = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
        lr, rectifier = scalars["lr"], scalars["rectifier"]
        if rectifier is not None:
            adam_step(
                param,
                exp_avg,
                second_moment,
                lr=lr * rectifier,
                eps=group["eps"],
                bias_correction1=scalars["bias_correction1"],
                bias_correction2_sqrt=scalars["bias_correction2_sqrt"],
                optimized_update=group["optimized_update"],
            )
        elif group["degenerate_to_sgd"]:
            param.add_(exp_avg, alpha=-lr / scalars["bias_correction1"])
