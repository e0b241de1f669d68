r"""Learning-rate schedules as plain functions of the step.

Each function returns the multiplier $f$ applied to the base learning rate, so the effective rate is
$\eta_t = \eta f(k)$. The argument `k` counts the optimizer steps *already taken* (0 before the first
update), which is the convention of `torch.optim.lr_scheduler.LambdaLR`, so every schedule plugs into
any optimizer unchanged:

```python
from functools import partial
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(schedules.noam, warmup=4000, d_model=512))
```

`AdamWarmup`, `AdamWarmupCosineDecay` and `Noam` apply the same functions internally, with
$k = t - 1$ for the $t$-th update, so they equal Adam driven by `LambdaLR` with the same function.
"""

from __future__ import annotations

import math

__all__ = ["constant", "linear_warmup", "noam", "warmup_cosine_decay"]

COSINE_FLOOR = 0.1
"""The cosine schedule never falls below this fraction of the base rate (the seed's choice)."""


def constant(k: int) -> float:
    """No schedule: $f(k) = 1$."""
    return 1.0


def linear_warmup(k: int, *, warmup: int) -> float:
    r"""Linear warm-up to the base rate over `warmup` steps.

    $$f(k) = \min\left(1, \frac{k + 1}{w}\right)$$

    The labml seed added $10^{-8}$ to the rate during warm-up to avoid a zero rate; counting the step
    being taken ($k + 1 \ge 1$) makes the rate positive from the first update, so we do not.
    """
    t = k + 1
    return 1.0 if t >= warmup else t / warmup


def warmup_cosine_decay(k: int, *, warmup: int, total_steps: float) -> float:
    r"""Linear warm-up, then a half cosine down to 10% of the base rate at `total_steps`.

    $$f(k) = \begin{cases} \frac{t}{w} & t < w \\
        \max\left(0.1, \tfrac{1}{2}\left(1 + \cos\left(\pi \frac{t - w}{\max(1, T - w)}\right)\right)\right)
        & t \ge w \end{cases}, \qquad t = k + 1$$

    Loshchilov & Hutter, *SGDR: Stochastic Gradient Descent with Warm Restarts*, ICLR 2017
    (arXiv:1608.03983), without restarts.
    """
    t = k + 1
    if t < warmup:
        return t / warmup
    progress = (t - warmup) / max(1.0, total_steps - warmup)
    return max(COSINE_FLOOR, 0.5 * (1.0 + math.cos(math.pi * progress)))


def noam(k: int, *, warmup: int, d_model: int) -> float:
    r"""The schedule of *Attention Is All You Need* (Vaswani et al., NeurIPS 2017, arXiv:1706.03762).

    $$f(k) = d_{model}^{-0.5} \min\left(t^{-0.5}, t\, w^{-1.5}\right), \qquad t = k + 1$$

    With `warmup=0` the warm-up branch is infinite and the schedule is pure $t^{-0.5}$ decay.
    Note that $f$ multiplies the base rate, so `lr` should be of order 1, as in the paper.
    """
    t = k + 1
    decay = t**-0.5
    factor = decay if warmup == 0 else min(decay, t * warmup**-1.5)
    return float(d_model**-0.5 * factor)
