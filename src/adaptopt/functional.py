r"""Shared pieces of the family's math, as plain functions.

Everything here that returns a number works in Python floats (IEEE float64), whatever the parameters'
dtype, so a float32 run and a float64 run see the same per-step scalars. `adam_step` takes those numbers as
floats or, on the compiled path, as 0-d float64 tensors, so it only combines them with `*` and `/`.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "TensorExtents",
    "adam_step",
    "bias_correction",
    "rectification",
    "replicated",
]


def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a replicated DTensor where it is a DTensor (FSDP2); any other tensor as it is.

    Under FSDP2 a reduction over a sharded dim (a norm, a sum) is *partial*, each rank holding its share of
    the total, and a reduction over the other dims stays sharded. Before an op can combine either with a
    replicated tensor, DTensor redistributes it, and torch 2.7 (not 2.13) cached that op together with its
    Python scalars: the next one with another scalar (`clamp(min=...)`, `* rate`, a lerp's weight) silently
    reused the first one's, so Prodigy's d and Adafactor's moments went wrong from their second step.
    Redistributing explicitly, before any scalar meets the reduction, avoids that cache on every version,
    and costs nothing more: the collective is the one the next op would run.
    """
    placements = getattr(tensor, "placements", None)
    if placements is None or all(placement.is_replicate() for placement in placements):
        return tensor
    from torch.distributed.tensor import Replicate

    whole = [Replicate()] * len(placements)
    replicated_tensor: torch.Tensor = tensor.redistribute(tensor.device_mesh, whole)  # type: ignore[attr-defined]
    return replicated_tensor


def bias_correction(beta: float, step: int) -> float:
    r"""$1 - \beta^t$: the factor that un-biases an EMA started at zero (Kingma & Ba, 2015, §3)."""
    return 1.0 - beta**step


def rectification(beta2: float, step: int, *, inclusive: bool = False) -> float | None:
    r"""RAdam's variance rectification term $r_t$, or `None` while the variance is intractable.

    Liu et al., *On the Variance of the Adaptive Learning Rate and Beyond*, ICLR 2020 (arXiv:1908.03265):

    $$\rho_\infty = \frac{2}{1 - \beta_2} - 1, \qquad
      \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t}$$
    $$r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}$$

    The adaptive step is used while $\rho_t > 5$ (torch.optim.RAdam). The official AdaBelief code tests
    $\rho_t \ge 5$: pass `inclusive=True` to follow it.
    """
    beta2_t = beta2**step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    tractable = rho_t >= 5.0 if inclusive else rho_t > 5.0
    if not tractable:
        return None
    return math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))


def adam_step(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    second_moment: torch.Tensor,
    *,
    lr: float,
    eps: float,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    optimized_update: bool,
) -> None:
    r"""The bias-corrected adaptive step shared by Adam, AMSGrad and RAdam.

    With `optimized_update=False` (torch.optim.Adam's form):

    $$\theta_t \leftarrow \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}
        \cdot \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}$$

    With `optimized_update=True` the bias correction of $v_t$ is folded into the step size, and $\epsilon$
    becomes $\hat\epsilon = \epsilon \sqrt{1 - \beta_2^t}$ (Kingma & Ba, §2, last paragraph); one division
    of a param-sized tensor less:

    $$\theta_t \leftarrow \theta_{t-1} - \eta \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
        \cdot \frac{m_t}{\sqrt{v_t} + \hat\epsilon}$$

    `lr` may already include RAdam's rectification $r_t$; `bias_correction2_sqrt` is $\sqrt{1 - \beta_2^t}$.
    """
    if optimized_update:
        denominator = second_moment.sqrt().add_(eps)
        step_size = lr * bias_correction2_sqrt / bias_correction1
    else:
        # The operation order of torch.optim.Adam's single-tensor path, so the two agree bitwise; in place,
        # so that only one param-sized temporary is alive at a time.
        denominator = second_moment.sqrt().div_(bias_correction2_sqrt).add_(eps)
        step_size = lr / bias_correction1
    param.addcdiv_(exp_avg, denominator, value=-step_size)


class TensorExtents:
    """Sums over each whole param of a stretch, for tensorwise updates (`kind = "tensorwise"`).

    `step_param` of such an optimizer finds one in `scalars["extents"]` and takes per-tensor sums and norms
    through it, so its one definition runs on one param (a plain sum), on a segment of a bucket holding
    several params of one size (`row_numel`: the segment read as a matrix with a param per row, each sum a
    row's) or several of different sizes (`starts`: for each element, where its param starts in the
    segment, each sum a segmented one), and hands the sums back broadcast to every element.
    """

    def __init__(self, starts: torch.Tensor | None, row_numel: int | None = None) -> None:
        self.starts = starts
        self.row_numel = row_numel

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of `values` over each param, broadcastable against `values`."""
        if self.row_numel is not None:
            rows = values.view(-1, self.row_numel)
            return rows.sum(dim=1, keepdim=True).expand_as(rows).reshape(values.shape)
        if self.starts is None:
            return replicated(values.sum())
        totals = torch.zeros_like(values).index_add_(0, self.starts, values)
        return totals[self.starts]

    def norm(self, values: torch.Tensor) -> torch.Tensor:
        """The Euclidean norm of `values` over each param, broadcastable against `values`."""
        return self.sum(values * values).sqrt()
