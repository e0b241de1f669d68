r"""Adafactor: adaptive rates with sublinear memory, as `torch.optim.Adafactor` computes it.

Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory Cost*, ICML 2018
(arXiv:1804.04235), Algorithms 4 and 5 with the relative step size and update clipping of sections 5-8.
A param of two or more dims keeps its second moment *factored* over its last two dims: a row mean $R_t$
and a column mean $C_t$ of $G_t^2$, $m + n$ numbers per $m \times n$ matrix instead of $mn$ (leading dims,
a conv weight's, are stacked matrices). Vectors and scalars keep the plain average $\hat V_t$. With
gradient $G_t$ (after maximize and weight decay), step $t$ and $\hat\beta_{2,t} = 1 - t^{\tau}$:

$$\rho_t = \min(\gamma, 1/\sqrt t) \qquad \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\, \rho_t$$
$$R_t = \hat\beta_{2,t} R_{t-1} + (1 - \hat\beta_{2,t})\, \mathrm{mean}_{-1}(G_t^2) \qquad
  C_t = \hat\beta_{2,t} C_{t-1} + (1 - \hat\beta_{2,t})\, \mathrm{mean}_{-2}(G_t^2)$$
$$\hat V_t = \frac{R_t C_t}{\max(\mathrm{mean}(R_t), \epsilon_1)} \quad\text{(factored)} \qquad
  \hat V_t = \hat\beta_{2,t} \hat V_{t-1} + (1 - \hat\beta_{2,t}) G_t^2 \quad\text{(otherwise)}$$
$$U_t = \frac{G_t}{\max(\sqrt{\hat V_t}, \epsilon_1)} \qquad
  \theta_t = \theta_{t-1} - \frac{\alpha_t\, U_t}{\max(1, \mathrm{RMS}(U_t) / d)}$$

The step size is relative: $\alpha_t$ scales with the param's own RMS (at least $\epsilon_2$), and the
clipping caps the update's RMS at $d$. $\tau$ is `beta2_decay`, $(\epsilon_1, \epsilon_2)$ is `eps`.

Verified against `torch.optim.Adafactor` of torch 2.13 (loop and foreach), which we equal in argument
names, defaults, order of operations and state names (`row_var`, `col_var`, `variance`, `step`):

* torch's deviations from the paper are kept: `lr` $\gamma$ caps $\rho_t$ (the paper's constant 0.01 is
  the default), $\epsilon_1$ sits in the last two formulas instead of being added to $G_t^2$, means
  replace sums, and $\epsilon_1$ defaults to the machine epsilon of the param's dtype;
* a float `weight_decay=w` is torch's decoupled decay, $\theta \leftarrow \theta (1 - \gamma w)$ with the
  rate $\gamma$, not $\rho_t$ (a `WeightDecay` policy works too). The RMS in $\alpha_t$ is taken *before*
  the decay, as torch does, which is why `update` measures it before the base applies the decay.

We differ where torch can't be followed in our design, and in what we add:

* the group holds $\epsilon_1$ and $\epsilon_2$ as `eps1` and `eps2` (the names of torch's functional
  `adafactor`): the family's `eps` is one number. `eps=(eps1, eps2)` is taken as torch takes it, in the
  constructor, in `add_param_group` and in torch's checkpoints, and `state_dict` writes it too, so a
  checkpoint of ours loads into `torch.optim.Adafactor`;
* $\epsilon_1 = $ `None` means the epsilon of *each* param's dtype (torch's loop takes the first param's);
* complex params are refused when they are added (torch raises at the first step), and we add validation
  with `ValueError`/`TypeError`, master weights and `state_dtype`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..execution import BATCH_DIMS
from ..functional import replicated
from ..validation import _in_range, _non_negative, with_listed_params
from ..weight_decay import WeightDecay

__all__ = [
    "ADAFACTOR_CHECKS",
    "Adafactor",
    "factored_second_moment",
    "per_param_norm",
    "unfactored_second_moment",
]

# Batches. Every function here works on one param or on a batch of same-shape params stacked along
# leading dims: the factored moments use dims -1 and -2 only (with keepdim and a batched matmul), and the
# reductions over a whole param (its RMS, the update's) skip the first `batch_dims` dims. The reference loop
# steps one param at a time (batch_dims 0); a batched path passes `"batch_dims"` in the scalars.


def per_param_norm(tensor: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """The L2 norm of each param in `tensor` (all dims but the first `batch_dims`), reduced dims kept."""
    own_dims = tuple(range(batch_dims, tensor.ndim))
    if not own_dims:
        # Stacked 0-d params: each element is a param. (vector_norm would read dim=() as all dims.)
        return tensor.abs()
    return replicated(torch.linalg.vector_norm(tensor, dim=own_dims, keepdim=True))


def _sqrt_numel_per_param(tensor: torch.Tensor, batch_dims: int) -> float:
    # `** 0.5`, as torch writes it, so that the RMS is rounded as torch rounds it.
    return float(math.prod(tensor.shape[batch_dims:]) ** 0.5)


def factored_second_moment(
    row_var: torch.Tensor, col_var: torch.Tensor, grad: torch.Tensor, weight: float, eps1: float
) -> torch.Tensor:
    """Advance $R_t$, $C_t$ in place by `weight` $= 1 - \\hat\\beta_{2,t}$; return a new $\\hat V_t$."""
    # mean(g^2) along a dim as norm(g)^2 / size: no temporary the size of g.
    # Out of place on reductions, replicated: under FSDP2 they are DTensors (`replicated` says why).
    row_mean = replicated(torch.linalg.vector_norm(grad, dim=-1, keepdim=True)).square().div(grad.size(-1))
    row_var.lerp_(row_mean, weight)
    col_mean = replicated(torch.linalg.vector_norm(grad, dim=-2, keepdim=True)).square().div(grad.size(-2))
    col_var.lerp_(col_mean, weight)
    # R_t C_t, the (m, 1) x (1, n) outer product as a matmul: batched over any leading dims.
    estimate = row_var @ col_var
    return estimate.div_(replicated(row_var.mean(dim=-2, keepdim=True)).clamp(min=eps1))


def unfactored_second_moment(variance: torch.Tensor, grad: torch.Tensor, weight: float) -> torch.Tensor:
    """Advance $\\hat V_t$ in place by `weight` $= 1 - \\hat\\beta_{2,t}$; return a copy of it to divide by."""
    variance.lerp_(grad * grad, weight)
    return variance.clone()  # the update is built in place in the returned tensor


def _beta2_decay(name: str, value: Any) -> None:
    _in_range(name, value, -math.inf, 0.0, low_open=True, high_open=False)


def _clipping_threshold(name: str, value: Any) -> None:
    _in_range(name, value, 1.0, math.inf, low_open=False, high_open=True)


def _optional_non_negative(name: str, value: Any) -> None:
    if value is not None:
        _non_negative(name, value)


ADAFACTOR_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "beta2_decay": _beta2_decay,
    "d": _clipping_threshold,
    "eps1": _optional_non_negative,
    "eps2": _non_negative,
}
"""Adafactor's own group keys and their checks (validation's table does not know them yet)."""


def _split_eps(eps: Any) -> dict[str, Any]:
    """torch's `eps=(eps1, eps2)` as our group keys, checked under the name the user gave."""
    if not isinstance(eps, (tuple, list)):
        raise TypeError(f"eps must be a pair (eps1, eps2), got {type(eps).__name__} {eps!r}")
    if len(eps) != 2:
        raise ValueError(f"eps must be a pair (eps1, eps2), got {len(eps)} values: {eps!r}")
    _optional_non_negative("eps[0]", eps[0])
    _non_negative("eps[1]", eps[1])
    return {"eps1": None if eps[0] is None else float(eps[0]), "eps2": float(eps[1])}


class Adafactor(GenericAdaptiveOptimizer):
    """Adafactor; see the module docstring for the update rule.

    * `lr` is $\\gamma$, the cap of the relative step size $\\rho_t$ and the rate of the decoupled decay.
    * `beta2_decay` is $\\tau \\le 0$ of $\\hat\\beta_{2,t} = 1 - t^{\\tau}$.
    * `eps` is $(\\epsilon_1, \\epsilon_2)$: the floor of the second moment (None: the dtype's epsilon)
      and of the param's RMS; the group keys are `eps1` and `eps2`.
    * `d` $\\ge 1$ is the clipping threshold of the update's RMS.
    * `weight_decay` is a `WeightDecay` policy or a float, meaning torch's decoupled decay.
    """

    kind = "matrixwise"  # RMS(theta) and RMS(U) over whole params, moments over the last two dims
    own_checks = ADAFACTOR_CHECKS

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        *,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: WeightDecay | float = 0.0,
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(lr=lr, beta2_decay=beta2_decay, **_split_eps(eps), d=d)
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The base's, taking torch's `eps` pair, checking our own keys and refusing complex params."""
        if isinstance(param_group, dict):
            param_group = with_listed_params(param_group)
            if "eps" in param_group:
                param_group.update(_split_eps(param_group.pop("eps")))
            for param in param_group.get("params", ()):
                if isinstance(param, torch.Tensor) and param.is_complex():
                    # Stepped as a real view it would gain a dim of 2 and be factored over it; torch
                    # raises at the first step.
                    raise ValueError(
                        f"Adafactor does not support complex params, got a {param.dtype} param of shape "
                        f"{tuple(param.shape)}"
                    )
        super().add_param_group(param_group)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        if param.ndim >= 2:
            # Factored over the last two dims: the row means keep dim -1 as 1, the column means dim -2.
            state["row_var"] = param.new_zeros((*param.shape[:-1], 1))
            state["col_var"] = param.new_zeros((*param.shape[:-2], 1, param.shape[-1]))
        else:
            state["variance"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def step_scalars(self, state: State, group: Group) -> Scalars:
        """$\\gamma$, $1 - \\hat\\beta_{2,t} = t^{\\tau}$ and $\\rho_t = \\min(\\gamma, 1/\\sqrt t)$, in float64."""
        step = float(state["step"])
        lr = self.learning_rate(state, group)
        return {"lr": lr, "one_minus_beta2": step ** group["beta2_decay"], "relative_step": min(lr, 1 / step**0.5)}

    def update(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        """The base's update, with $\\alpha_t$ measured on $\\theta_{t-1}$ before the base decays it."""
        batch_dims = scalars.get(BATCH_DIMS, 0)
        rms = per_param_norm(param, batch_dims).div(_sqrt_numel_per_param(param, batch_dims))
        step_size = rms.clamp(min=group["eps2"]).mul(scalars["relative_step"])
        super().update(state, group, grad, param, {**scalars, "step_size": step_size})

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        eps1 = torch.finfo(param.dtype).eps if group["eps1"] is None else group["eps1"]
        weight = scalars["one_minus_beta2"]
        # Factored or not is the param's own ndim, which its state records: a batch of vectors is 2-D.
        if "row_var" in state:
            second_moment = factored_second_moment(state["row_var"], state["col_var"], grad, weight, eps1)
        else:
            second_moment = unfactored_second_moment(state["variance"], grad, weight)
        # U_t = G_t / max(sqrt(V_t), eps1): the floor is squared as the root is taken after it.
        update = second_moment.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
        # max(1, RMS(U_t) / d), divided in one go as torch does.
        batch_dims = scalars.get(BATCH_DIMS, 0)
        clipping = per_param_norm(update, batch_dims).div(_sqrt_numel_per_param(update, batch_dims) * group["d"])
        step = scalars["step_size"] / clipping.clamp(min=1.0)
        param.addcmul_(update, step, value=-1.0)

    def state_dict(self) -> dict[str, Any]:
        """torch's format, with `eps` as the pair `torch.optim.Adafactor` reads besides our `eps1`, `eps2`."""
        saved = super().state_dict()
        for group in saved["param_groups"]:
            group["eps"] = (group["eps1"], group["eps2"])
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base's `load_state_dict`; a saved group's `eps` pair counts only where `eps1`/`eps2` are
        missing (a torch checkpoint), as ours carry both."""
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get("param_groups"), list):
            groups = []
            for saved in state_dict["param_groups"]:
                if isinstance(saved, Mapping) and "eps" in saved:
                    saved = dict(saved)
                    eps = saved.pop("eps")
                    if "eps1" not in saved or "eps2" not in saved:
                        try:
                            saved.update(_split_eps(eps))
                        except (TypeError, ValueError) as error:
                            raise ValueError(f"a param group of the state_dict: {error}") from error
                groups.append(saved)
            state_dict = {**state_dict, "param_groups": groups}
        super().load_state_dict(state_dict)
