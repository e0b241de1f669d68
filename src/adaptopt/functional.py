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
    "stochastic_round_to_bfloat16",
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


BFLOAT16_MAX = torch.finfo(torch.bfloat16).max
r"""The largest finite bf16, $(2 - 2^{-7}) \cdot 2^{127} \approx 3.39 \cdot 10^{38}$."""

_LOW_HALF = 1 << 16
"""float32 keeps 16 more mantissa bits than bfloat16: the bits a cast to bf16 drops."""


def stochastic_round_to_bfloat16(value: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""`value` rounded to bfloat16 stochastically: up or down to one of its two bf16 neighbours, at random, with
    the probability that makes the result equal to `value` in expectation.

    Gupta, Agrawal, Gopalakrishnan & Narayanan, *Deep Learning with Limited Numerical Precision*, ICML 2015
    (arXiv:1502.02551), §3; the rounding of torchao's bf16 optimizers (`bf16_stochastic_round=True`). For
    $x$ between the neighbours $\lfloor x \rfloor$ and $\lceil x \rceil$:

    $$\operatorname{SR}(x) = \begin{cases} \lceil x \rceil & \text{with probability }
        \dfrac{x - \lfloor x \rfloor}{\lceil x \rceil - \lfloor x \rfloor} \\
        \lfloor x \rfloor & \text{otherwise} \end{cases}
      \qquad \text{so} \qquad \mathbb{E}[\operatorname{SR}(x)] = x$$

    A bf16 is the high half of a float32, so this is the float32's bit pattern plus a uniform random integer in
    $[0, 2^{16})$, with the low 16 bits then dropped: the sum carries into the high half (rounds away from zero)
    exactly when the noise is at least $2^{16}$ minus the dropped bits, whose share of $2^{16}$ is the
    probability above (the bit pattern grows with $|x|$ in steps of one float32 ulp, across binades and
    subnormals too). The result is computed in float32 (`value` is first cast to float32, exactly for bf16 and
    fp16 inputs; a float64 input is rounded to float32 first, to nearest).

    Values bf16 holds exactly come back unchanged, ±0 included, and so do NaN and ±inf. Finite values beyond the
    largest bf16 (`BFLOAT16_MAX`), whose upper neighbour would be infinity, are rounded as torch's cast rounds
    them, to nearest: stochastic rounding never makes an infinity out of a value that the cast keeps finite.

    The noise comes from `generator`, by default torch's generator of `value`'s device, one draw per element
    whatever the values: `torch.manual_seed` makes a run reproducible, and a run resumed from a checkpoint
    continues bitwise only if that generator's state (`torch.get_rng_state`, `torch.cuda.get_rng_state`) is
    saved and restored with it.
    """
    wide = value.to(torch.float32)
    # NaN compares False: NaN, ±inf and finite values past the largest bf16 take the cast's rounding below. Their
    # bits are zeroed for the integer arithmetic, which could otherwise carry a NaN's payload into the sign bit.
    rounds_stochastically = wide.abs() <= BFLOAT16_MAX
    bits = torch.where(rounds_stochastically, wide, 0.0).view(torch.int32)
    noise = torch.randint(0, _LOW_HALF, wide.shape, dtype=torch.int32, device=wide.device, generator=generator)
    # |bits| <= BFLOAT16_MAX's pattern 0x7F7F0000, so adding less than 2^16 cannot overflow an int32, and the
    # sign bit, on top, is left alone: a negative value's magnitude is rounded as a positive one's.
    rounded = bits.add_(noise).bitwise_and_(-_LOW_HALF).view(torch.float32)
    # The cast is exact where the low half is zero: only the others (NaN, inf, out of range) are rounded by it.
    return torch.where(rounds_stochastically, rounded, wide).to(torch.bfloat16)


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
