r"""Sophia-G: a second-order clipped stochastic optimizer with the Gauss-Newton-Bartlett estimator.

Liu, Li, Hall, Liang & Ma, *Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training*, ICLR 2024 (arXiv:2305.14342).

Sophia divides the momentum by a cheap estimate of the Hessian's diagonal and clips the result elementwise,
so no coordinate moves more than $\eta$ per step:

$$m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t$$
$$\theta_t = \theta_{t-1} - \eta\, \mathrm{sign}(m_t) \min\left(\frac{|m_t|}{\rho\,(h_t + \epsilon)}, 1\right)$$

Every $k$ steps (the training loop chooses $k$; the paper uses 10) the loop estimates the diagonal with the
Gauss-Newton-Bartlett estimator: it samples labels $\hat y$ from the model's own logits, back-propagates the
mean loss on them over a batch of $B$ examples (or tokens), and calls `update_hessian(B)`:

$$h_t = \beta_2 h_{t-k} + (1 - \beta_2)\, B\, \hat g \odot \hat g$$

```python
for step, (x, y) in enumerate(loader):
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % k == k - 1:
        logits = model(x)
        sampled = torch.distributions.Categorical(logits=logits).sample()
        F.cross_entropy(logits, sampled).backward()
        optimizer.update_hessian(x.shape[0])
        optimizer.zero_grad(set_to_none=True)
```

Compared with the official code (`sophia-opt`, `SophiaG`): our `update_hessian(B)` is their
`update_hessian()` followed by `step(bs=B)`; they multiply by $B$ at every step, we once when estimating, which
is the same while $B$ is constant. Their denominator is $\rho B h + 10^{-15}$, ours $\rho (h + \epsilon)$, so
`eps = 1e-15 / rho` reproduces it. The seed wrote $\rho h + \epsilon$; we keep $\epsilon$ in the units of $h$
so that it does not change meaning with $\rho$.
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State, as_real
from ..validation import validate_group
from ..weight_decay import WeightDecay

__all__ = ["Sophia"]


class Sophia(GenericAdaptiveOptimizer):
    """Sophia-G; see the module docstring for the update rule and the training loop it needs.

    * `lr` is $\\eta$, the largest change of any coordinate in one step.
    * `betas` are $(\\beta_1, \\beta_2)$: the EMA rates of the momentum and of the Hessian estimate.
    * `eps` is $\\epsilon$, in the units of $h$; `rho` is $\\rho > 0$, the clipping scale.
    * `weight_decay` is as in `Adam` (the official default is decoupled 0.1; ours is 0).
    """

    kind = "elementwise"

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-12,
        rho: float = 0.03,
        weight_decay: WeightDecay | float = WeightDecay(),
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, rho=rho)
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["hessian"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        beta1, _ = group["betas"]
        exp_avg = state["exp_avg"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        # Two param-sized temporaries, the sign taking the denominator's memory: each costs page faults on the
        # CPU's eager paths, every step.
        denominator = (state["hessian"] + group["eps"]).mul_(group["rho"])
        ratio = exp_avg.abs().div_(denominator).clamp_(max=1.0)
        param.addcmul_(torch.sign(exp_avg, out=denominator), ratio, value=-scalars["lr"])

    @torch.no_grad()
    def update_hessian(self, n_tokens_training_batch: int) -> None:
        r"""Fold the current grads, from a loss on labels sampled from the model, into $h$.

        $h \leftarrow \beta_2 h + (1 - \beta_2) B\, g \odot g$ with $B$ = `n_tokens_training_batch`.
        """
        validate_group({"n_tokens_training_batch": n_tokens_training_batch})
        for group in self.param_groups:
            _, beta2 = group["betas"]
            for param, grad in self.params_with_grad(group):
                hessian = self.state_for(group, param)["hessian"]
                hessian.mul_(beta2).addcmul_(
                    as_real(grad), as_real(grad), value=(1.0 - beta2) * n_tokens_training_batch
                )
        self.store_state()  # low-bit state: the estimate is stored as codes now, not held decoded until the step
