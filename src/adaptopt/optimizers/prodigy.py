r"""Prodigy: Adam that estimates its own learning rate, from the distance to the solution.

Mishchenko & Defazio, *Prodigy: An Expeditiously Adaptive Parameter-Free Learner*, ICML 2024
(arXiv:2306.06101), Algorithm 4 (Adam version). The step size of Adam is $d \cdot \eta$, where $d$
estimates $D = \lVert\theta_0 - \theta_*\rVert$ and grows from a tiny $d_0$: with $\rho = d / d_0$ and the
rate $\delta_t = d_t \eta_t c_t$ ($c_t = \sqrt{1 - \beta_2^{t}} / (1 - \beta_1^{t})$ with
`use_bias_correction`, else 1), every step first updates, over every param of every group,

$$m = \beta_1 m + d_t (1 - \beta_1) g, \quad v = \beta_2 v + d_t^2 (1 - \beta_2) g^2,
  \quad s = \beta_3 s + \rho\, \delta_t\, g$$
$$r_t = \beta_3 r_{t-1} + \rho\, \delta_t \langle g, \theta_0 - \theta \rangle, \qquad
  \hat d = c_d\, r_t / \textstyle\sum \lVert s \rVert_1$$

and then $d_{t+1} = \min(\max(d_t, \hat d), d_t \cdot \text{growth})$ (the max only when $d_t = d_0$, then
the largest $\hat d$ seen), before any param moves:

$$\theta \leftarrow \theta - \delta_t \frac{m}{\sqrt{v} + d_{t+1} \epsilon}$$

($\beta_3 = \sqrt{\beta_2}$ by default; `safeguard_warmup` uses $\rho d_t$ instead of $\rho\delta_t$ in $s$).
The sums are the base's optimizer-wide first pass (`reduces`): $d$ is shared by all groups, and like the
official code every group takes the first group's $\beta$s, $d$ and bias correction, and all rates must be
equal or 0. The first pass only sums (it reads $g$, $\theta$, $\theta_0$ and $s$ and writes nothing); the
update stores $s$ and the moments, computed by the same formulas with the same $d_t$, as it moves the params.
If no gradient moved $s$ (the sum of the new $s$ is 0) the step changes nothing. prodigyopt has decayed the
moments by then, which differs only if $s$ is 0 while $m$ or $v$ is not: $s$ underflowing to 0 first, which
takes a $\beta_3$ below $\beta_1$ and thousands of steps of zero gradients.

Verified against the official `prodigyopt` package (1.1.2, `Prodigy`), whose argument names, defaults and
group keys (`d`, `d0`, `d_max`, `d_numerator`, `d_denom`, `d_hat`, `k`) we take. `weight_decay=w` (a float)
is its decay: decoupled at the rate $\delta_t$ (`decouple=True`, the default), or coupled L2 on both passes;
a `WeightDecay` policy works too. Differences: `p0` is always a copy of the param (the official code keeps a
0-d zero for an all-zero param, which has the same values); `fsdp_in_use` sums across ranks with
`torch.distributed.all_reduce` on the params' device, where the official code uses CUDA; with `slice_p > 1`
the state is not shaped as the param and the param is stepped by the reference loop. `p.grad` is never
changed (the official code adds a coupled decay to it in place).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..functional import replicated
from ..weight_decay import WeightDecay, apply_weight_decay

__all__ = ["Prodigy"]


def _sliced(tensor: torch.Tensor, slice_p: int) -> torch.Tensor:
    """Every `slice_p`-th element, flattened (the estimate's sample); the tensor itself for 1."""
    return tensor.flatten()[::slice_p] if slice_p > 1 else tensor


def _advance_s(s: torch.Tensor, sliced_grad: torch.Tensor, scalars: Scalars) -> torch.Tensor:
    r"""$s \leftarrow \beta_3 s + \rho\,\delta_t\, g$ in place: the one formula of both passes, so that the
    first pass sums the values the update stores."""
    return s.mul_(scalars["beta3"]).add_(sliced_grad, alpha=scalars["s_rate"])


class Prodigy(GenericAdaptiveOptimizer):
    """Prodigy; see the module docstring for the update rule.

    * `lr` multiplies the estimated step size (1.0: as estimated); `d0` is the initial estimate.
    * `betas` are Adam's; `beta3` (default $\\sqrt{\\beta_2}$) the EMA rate of $s$ and of the numerator.
    * `d_coef` scales $\\hat d$; `growth_rate` bounds the growth of $d$ per step.
    * `weight_decay`: a float is prodigyopt's decay, decoupled unless `decouple=False`; or a `WeightDecay`.
    * `slice_p`: estimate $d$ from every `slice_p`-th element only (less memory; reference loop).
    """

    kind = "elementwise"
    weight_like_state = frozenset({"p0"})  # kept in the working precision under a state_dtype
    reduces = True
    group_state: ClassVar[Mapping[str, Any]] = {
        "d": None,
        "d_max": None,
        "d_numerator": 0.0,
        "d_denom": 0.0,
        "d_hat": 0.0,
        "k": 0,
        "dlr": 0.0,
        "d_step": None,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: WeightDecay | float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        fsdp_in_use: bool = False,
        slice_p: int = 1,
        **options: Unpack[CommonOptions],
    ) -> None:
        if not isinstance(decouple, bool):
            raise TypeError(f"decouple must be a bool, got {type(decouple).__name__}")
        if not isinstance(weight_decay, WeightDecay):
            weight_decay = WeightDecay(WeightDecay.coerce(weight_decay).weight_decay, weight_decouple=decouple)
        defaults: dict[str, Any] = dict(
            lr=lr,
            betas=betas,
            beta3=beta3,
            eps=eps,
            d=d0,
            d0=d0,
            d_max=d0,
            d_coef=d_coef,
            growth_rate=growth_rate,
            use_bias_correction=use_bias_correction,
            safeguard_warmup=safeguard_warmup,
            fsdp_in_use=fsdp_in_use,
            slice_p=slice_p,
        )
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        if group["slice_p"] > 1:
            sliced = param.detach().flatten()[:: group["slice_p"]]
            state["s"], state["p0"] = torch.zeros_like(sliced), sliced.clone()
        else:  # not flattened: an unevenly sharded DTensor (FSDP2) cannot be
            state["s"], state["p0"] = torch.zeros_like(param), param.detach().clone()
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def begin_reduction(self) -> None:
        first = self.param_groups[0]
        lr = max(group["lr"] for group in self.param_groups)
        if any(group["lr"] not in (lr, 0.0) for group in self.param_groups):
            raise RuntimeError("Prodigy's param groups must have one lr, or lr 0 (as in prodigyopt)")
        beta1, beta2 = first["betas"]
        k = first["k"]
        correction = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1.0
        for group in self.param_groups:
            # d_step: the d this step's moments and s are updated with, before end_reduction grows d.
            group["dlr"], group["d_step"] = first["d"] * lr * correction, first["d"]

    def learning_rate(self, state: State, group: Group) -> float:
        return float(self.param_groups[0]["dlr"])

    def step_scalars(self, state: State, group: Group) -> Scalars:
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        d, dlr = first["d"], first["dlr"]
        # The moments, s and the numerator take the d of the step before (d_step); the update's eps the new d.
        d_step = d if first["d_step"] is None else first["d_step"]
        ratio = d_step / group["d0"]
        return {
            "lr": dlr,
            "exp_avg_rate": d_step * (1 - beta1),
            "exp_avg_sq_rate": d_step * d_step * (1 - beta2),
            "s_rate": ratio * d_step if group["safeguard_warmup"] else ratio * dlr,
            "numerator_rate": ratio * dlr,
            "d_eps": d * group["eps"],
            "d_lr": dlr * d,
            "estimates": group["lr"] != 0.0,  # a group with lr 0 adds nothing to the estimate of d
            # The first group's betas are every group's (as in prodigyopt); numbers here, so that a compiled
            # first pass reads no group but its own.
            "beta1": float(beta1),
            "beta2": float(beta2),
            "beta3": math.sqrt(beta2) if first["beta3"] is None else float(first["beta3"]),
            "keeps_exp_avg": beta1 > 0,
        }

    def reduce_param(
        self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars
    ) -> dict[str, torch.Tensor]:
        if not scalars["estimates"]:
            return {}
        if not group["decoupled_weight_decay"]:
            grad = apply_weight_decay(param, grad, group, scalars["lr"])
        slice_p = group["slice_p"]
        sliced_grad = _sliced(grad, slice_p)
        sliced_param = _sliced(param, slice_p)
        # <g, theta_0 - theta>, with theta before this step.
        distance = state["p0"] - sliced_param
        # torch.dot, as prodigyopt, but in float64 (prodigyopt's is in the param's dtype; the same in float64),
        # so that a bucket's one sum equals the reference loop's per-param sums in low precision too. A DTensor
        # shard (FSDP2) cannot be flattened when unevenly sharded: a sum there.
        wide_grad, wide_distance = sliced_grad.to(torch.float64), distance.to(torch.float64)
        inner = (
            torch.dot(wide_grad.reshape(-1), wide_distance.reshape(-1))
            if type(grad) is torch.Tensor
            else (wide_grad * wide_distance).sum()
        )
        numerator = replicated(inner) * scalars["numerator_rate"]
        # The sum of the new s, which the update stores (it reads the grad anyway): so this pass writes nothing
        # and reads four tensors, and the moments are updated in the update's pass too (12 passes in all, not 15).
        # In place on a clone, as the update stores it: torch.compile hands the alpha of an out-of-place add to
        # the kernel in single precision (as it does sub_'s), and the sum must be of the values stored.
        new_s = _advance_s(state["s"].clone(), sliced_grad, scalars)
        return {"numerator": numerator, "denominator": new_s.to(torch.float64).abs().sum()}

    def end_reduction(self, totals: dict[str, float]) -> bool:
        first = self.param_groups[0]
        numerator, denominator = totals.get("numerator", 0.0), totals.get("denominator", 0.0)
        if first["fsdp_in_use"] and dist.is_available() and dist.is_initialized():
            device = first["params"][0].device
            both = torch.tensor([numerator, denominator], dtype=torch.float64, device=device)
            dist.all_reduce(both)
            numerator, denominator = float(both[0]), float(both[1])
        if denominator == 0:
            return False  # No gradient moved s: nothing to estimate from, and nothing more to do (as there).
        _, beta2 = first["betas"]
        beta3 = math.sqrt(beta2) if first["beta3"] is None else first["beta3"]
        d, d_max = first["d"], first["d_max"]
        d_numerator = first["d_numerator"] * beta3 + numerator
        d_hat = d
        if max(group["lr"] for group in self.param_groups) > 0:
            d_hat = first["d_coef"] * d_numerator / denominator
            if d == self.param_groups[-1]["d0"]:  # the last group's d0, as in prodigyopt
                d = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d = min(d_max, d * first["growth_rate"])
        for group in self.param_groups:
            group.update(d_numerator=d_numerator, d_denom=denominator, d=d, d_max=d_max, d_hat=d_hat)
        return True

    def begin_group_step(self, group: Group) -> None:
        group["k"] += 1

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        # With the d of the step before (the first pass summed s's new value from the same formula); the rate
        # is that d's too, the eps the new d's. A group with lr 0 adds nothing to the estimate and keeps its
        # state, as in prodigyopt.
        if scalars["estimates"]:
            if scalars["keeps_exp_avg"]:
                state["exp_avg"].mul_(scalars["beta1"]).add_(grad, alpha=scalars["exp_avg_rate"])
            state["exp_avg_sq"].mul_(scalars["beta2"]).addcmul_(grad, grad, value=scalars["exp_avg_sq_rate"])
            _advance_s(state["s"], _sliced(grad, group["slice_p"]), scalars)
        denominator = state["exp_avg_sq"].sqrt().add_(scalars["d_eps"])
        if group["betas"][0] > 0:
            param.addcdiv_(state["exp_avg"], denominator, value=-scalars["lr"])
        else:
            param.addcdiv_(grad, denominator, value=-scalars["d_lr"])
