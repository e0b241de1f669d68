r"""Adam and AMSGrad.

Adam: Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015 (arXiv:1412.6980).
AMSGrad: Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018 (openreview ryQu7f-RZ).

With gradient $g_t$ (after weight decay, see `WeightDecay`):

$$m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t$$
$$v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2$$

AMSGrad normalises by the running maximum $\hat v_t = \max(\hat v_{t-1}, v_t)$ instead of $v_t$, which
keeps the effective step size from growing and restores the convergence proof that Adam lacks.

The step itself is in `functional.adam_step`: `optimized_update=True` (the default, the seed's) uses
$\sqrt{v_t} + \epsilon$ with the bias correction of $v_t$ folded into the step size;
`optimized_update=False` is `torch.optim.Adam`'s $\sqrt{v_t / (1 - \beta_2^t)} + \epsilon$. The two differ
only in where $\epsilon$ sits; with `optimized_update=False`, `Adam` equals `torch.optim.Adam` and, with
`weight_decay=WeightDecay(w)`, `torch.optim.AdamW(weight_decay=w)`.

The default `eps=1e-16` is the seed's; torch's is `1e-8`. It only matters when $v_t$ is tiny.

The functions here are the whole of the math; the schedule optimizers in `warmup.py` reuse them.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..functional import adam_step, bias_correction
from ..weight_decay import WeightDecay

__all__ = [
    "ADAM_DEFAULTS",
    "AMSGrad",
    "Adam",
    "AdamOptions",
    "adam_arguments",
    "adam_init_state",
    "adam_signature",
    "adam_step_param",
    "adam_step_scalars",
]


def adam_init_state(optimizer: GenericAdaptiveOptimizer, state: State, group: Group, param: torch.Tensor) -> None:
    """$m_0 = 0$, $v_0 = 0$ and, for AMSGrad, $\\hat v_0 = 0$ (torch.optim's state names)."""
    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    if group["amsgrad"]:
        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def adam_step_scalars(optimizer: GenericAdaptiveOptimizer, state: State, group: Group) -> Scalars:
    """The rate $\\eta_t$, $1 - \\beta_1^t$ and $\\sqrt{1 - \\beta_2^t}$ of step $t$, in float64."""
    beta1, beta2 = group["betas"]
    step = state["step"]
    return {
        "lr": optimizer.learning_rate(state, group),
        "bias_correction1": bias_correction(beta1, step),
        "bias_correction2_sqrt": math.sqrt(bias_correction(beta2, step)),
    }


def adam_step_param(
    optimizer: GenericAdaptiveOptimizer,
    state: State,
    group: Group,
    grad: torch.Tensor,
    param: torch.Tensor,
    scalars: Scalars,
) -> None:
    """One Adam (or AMSGrad) update of `param`."""
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    # m_t = beta1 m_{t-1} + (1 - beta1) g_t, written as torch.optim.Adam writes it.
    exp_avg.lerp_(grad, 1.0 - beta1)
    # v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    second_moment = exp_avg_sq
    if group["amsgrad"]:
        # \hat v_t = max(\hat v_{t-1}, v_t)
        second_moment = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
    adam_step(
        param,
        exp_avg,
        second_moment,
        lr=scalars["lr"],
        eps=group["eps"],
        bias_correction1=scalars["bias_correction1"],
        bias_correction2_sqrt=scalars["bias_correction2_sqrt"],
        optimized_update=group["optimized_update"],
    )


class AdamOptions(CommonOptions, total=False):
    """Adam's hyper-parameters after `lr`, shared by every optimizer that runs Adam's math."""

    betas: tuple[float, float]
    eps: float
    weight_decay: WeightDecay | float
    optimized_update: bool
    amsgrad: bool


ADAM_DEFAULTS: dict[str, Any] = {
    "betas": (0.9, 0.999),
    "eps": 1e-16,
    "weight_decay": WeightDecay(),
    "optimized_update": True,
    "amsgrad": False,
}
"""The defaults of `AdamOptions` (the seed's: `eps=1e-16`, decoupled decay off)."""


def adam_arguments(
    lr: float, options: AdamOptions, *, amsgrad: bool = False, **schedule: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The param-group defaults and the base's options of an Adam-family constructor, from `lr`, its
    `**options` and its schedule's own arguments; `amsgrad` is the class's default for that flag."""
    given = dict(options)
    hyper = {name: given.pop(name, default) for name, default in {**ADAM_DEFAULTS, "amsgrad": amsgrad}.items()}
    weight_decay = hyper.pop("weight_decay")
    return {"lr": lr, **hyper, **schedule}, {"weight_decay": weight_decay, **given}


def adam_signature(*schedule: inspect.Parameter, amsgrad: bool = False) -> inspect.Signature:
    """The constructor's signature as `inspect` (and `adaptopt list`, `--set`) should show it: `params`,
    `lr`, Adam's keyword arguments with their defaults, the schedule's, then the common options."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    return inspect.Signature(
        [
            inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("lr", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=1e-3, annotation=float),
            *(
                inspect.Parameter(name, keyword, default=default)
                for name, default in {**ADAM_DEFAULTS, "amsgrad": amsgrad}.items()
            ),
            *schedule,
            inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD),
        ]
    )


class Adam(GenericAdaptiveOptimizer):
    """Adam; see the module docstring for the update rule.

    * `lr` is the learning rate $\\eta$; `betas` are $(\\beta_1, \\beta_2)$; `eps` is $\\epsilon$.
    * `weight_decay` is a `WeightDecay` policy; a float means *decoupled* decay (AdamW), unlike torch.
    * `optimized_update` chooses where $\\epsilon$ sits (see `functional.adam_step`).
    * `amsgrad` normalises by the running maximum of $v_t$ (see `AMSGrad`).

    Defaults: `ADAM_DEFAULTS`.
    """

    kind = "elementwise"
    init_state = adam_init_state
    step_scalars = adam_step_scalars
    step_param = adam_step_param
    __signature__ = adam_signature()

    def __init__(self, params: ParamsT, lr: float = 1e-3, **options: Unpack[AdamOptions]) -> None:
        defaults, base_options = adam_arguments(lr, options)
        super().__init__(params, defaults, **base_options)


class AMSGrad(GenericAdaptiveOptimizer):
    """AMSGrad: Adam normalised by $\\hat v_t = \\max(\\hat v_{t-1}, v_t)$.

    With `optimized_update=False` it equals `torch.optim.Adam(amsgrad=True)`. `amsgrad=False` turns it
    back into Adam, which is handy for comparing the two with one class.
    """

    kind = "elementwise"
    init_state = adam_init_state
    step_scalars = adam_step_scalars
    step_param = adam_step_param
    __signature__ = adam_signature(amsgrad=True)

    def __init__(self, params: ParamsT, lr: float = 1e-3, **options: Unpack[AdamOptions]) -> None:
        defaults, base_options = adam_arguments(lr, options, amsgrad=True)
        super().__init__(params, defaults, **base_options)
