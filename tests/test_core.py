"""Core behaviour of every adaptopt optimizer: validation, closures, params without grads, sparse grads,
param groups and per-group weight decay."""

from __future__ import annotations

import inspect
import re
from copy import deepcopy
from typing import Any

import prodigyopt
import pytest
import torch

import adaptopt
from adaptopt import (
    ADOPT,
    LAMB,
    Adam,
    AdamWarmupCosineDecay,
    Muon,
    Noam,
    Prodigy,
    ScheduleFreeAdamW,
    Sophia,
    WeightDecay,
    execution,
)
from adaptopt.base import KINDS, GenericAdaptiveOptimizer, Group, Scalars, State
from conftest import OPTIMIZER_CLASSES, matrix_shape

pytestmark = pytest.mark.usefixtures("single_thread")

by_name = pytest.mark.parametrize("optimizer_class", OPTIMIZER_CLASSES, ids=lambda c: c.__name__)


def takes(optimizer_class: type, name: str) -> bool:
    return name in inspect.signature(optimizer_class).parameters


def betas_arity(optimizer_class: type) -> int:
    """2 for a pair (beta1, beta2), 3 for AdEMAMix's triple (beta1, beta2, beta3); 0 without betas."""
    parameter = inspect.signature(optimizer_class).parameters.get("betas")
    return 0 if parameter is None else len(parameter.default)


def eps_is_a_pair(optimizer_class: type) -> bool:
    """Whether `eps` is a pair: Adafactor's `(eps1, eps2)`, torch's; one number for the rest."""
    parameter = inspect.signature(optimizer_class).parameters.get("eps")
    return parameter is not None and isinstance(parameter.default, tuple)


def applies(optimizer_class: type, name: str, value: Any) -> bool:
    """Whether the case (argument `name`, bad `value`) is one for `optimizer_class`: it takes the argument
    and, for betas, the case has as many values as its betas (the cases of the wrong length say which);
    for eps, a pair's cases are pairs (Adafactor's) and one number's are not."""
    if not takes(optimizer_class, name):
        return False
    if name == "betas" and isinstance(value, tuple):
        arity = betas_arity(optimizer_class)
        wrong_length = any(value in cases for cases in WRONG_LENGTH_BETAS.values())
        return value in WRONG_LENGTH_BETAS[arity] if wrong_length else len(value) == arity
    if name == "eps":
        return isinstance(value, tuple) == eps_is_a_pair(optimizer_class)
    return True


WRONG_LENGTH_BETAS = {2: [(0.9,), (0.9, 0.99, 0.999)], 3: [(0.9,), (0.9, 0.99)]}
"""The betas of the wrong length tried for a pair and for a triple."""


def new_param(*shape: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, max(1, torch.Size(shape).numel()), dtype=torch.float64).reshape(shape).clone()


def param_for(optimizer_class: type, *shape: int) -> torch.Tensor:
    """`new_param(*shape)`, as a matrix of as many elements for Muon, which optimizes matrices only."""
    return new_param(*matrix_shape(optimizer_class, shape))


# --------------------------------------------------------------------------------------------------
# Out-of-range hyper-parameters: ValueError naming the argument and its range

INVALID: list[tuple[str, Any, str]] = [
    # (argument, bad value, what the message must say)
    ("lr", -1e-3, r"lr must be in \[0, inf\), got -0.001"),
    ("lr", float("nan"), r"lr must not be NaN"),
    ("eps", -1e-8, r"eps must be in \[0, inf\)"),
    ("betas", (1.0, 0.999), r"betas\[0\] must be in \[0, 1\), got 1.0"),
    ("betas", (-0.1, 0.999), r"betas\[0\] must be in \[0, 1\)"),
    ("betas", (0.9, 1.0), r"betas\[1\] must be in \[0, 1\)"),
    ("betas", (0.9, 1.5), r"betas\[1\] must be in \[0, 1\)"),
    ("betas", (0.9,), r"betas must be a (pair|triple) .*1 values"),
    ("betas", (0.9, 0.99, 0.999), r"betas must be a pair .*3 values"),
    ("betas", (0.9, 0.99), r"betas must be a triple .*2 values"),
    ("betas", (1.0, 0.999, 0.9999), r"betas\[0\] must be in \[0, 1\), got 1.0"),
    ("betas", (0.9, 1.0, 0.9999), r"betas\[1\] must be in \[0, 1\)"),
    ("betas", (0.9, 0.999, 1.0), r"betas\[2\] must be in \[0, 1\), got 1.0"),
    ("rho", 0.0, r"rho must be in \(0, inf\), got 0.0"),
    ("rho", -0.04, r"rho must be in \(0, inf\)"),
    ("warmup", -1, r"warmup must be in \[0, inf\), got -1"),
    ("d_model", 0, r"d_model must be in \(0, inf\)"),
    ("d_model", -512, r"d_model must be in \(0, inf\)"),
    ("weight_decay", -0.1, r"weight_decay(_at_y)? must be in \[0, inf\), got -0.1"),
    ("alpha", -1.0, r"alpha must be in \[0, inf\), got -1.0"),
    ("alpha_warmup", 0, r"alpha_warmup must be in \(0, inf\), got 0"),
    ("beta3_warmup", -5, r"beta3_warmup must be in \(0, inf\)"),
    ("warmup_steps", -1, r"warmup_steps must be in \[0, inf\), got -1"),
    ("r", -0.5, r"r must be in \[0, inf\), got -0.5"),
    ("weight_lr_power", -2.0, r"weight_lr_power must be in \[0, inf\)"),
    # Prodigy
    ("d0", 0.0, r"d0 must be in \(0, inf\), got 0.0"),
    ("d0", -1e-6, r"d0 must be in \(0, inf\), got -1e-06"),
    ("d_coef", 0.0, r"d_coef must be in \(0, inf\), got 0.0"),
    ("growth_rate", 0.5, r"growth_rate must be in \[1, inf\], got 0.5"),
    ("slice_p", 0, r"slice_p must be in \(0, inf\), got 0"),
    ("beta3", 1.0, r"beta3 must be in \[0, 1\), got 1.0"),
    ("beta3", -0.5, r"beta3 must be in \[0, 1\), got -0.5"),
    # LAMB
    ("max_grad_norm", -1.0, r"max_grad_norm must be in \[0, inf\), got -1.0"),
    # Adafactor: the clipping threshold, the decay of beta2, and eps as the pair (eps1, eps2)
    ("d", 0.5, r"d must be in \[1, inf\), got 0.5"),
    ("beta2_decay", 0.5, r"beta2_decay must be in \(-inf, 0\], got 0.5"),
    ("eps", (None, -1.0), r"eps\[1\] must be in \[0, inf\), got -1.0"),
    ("eps", (-1e-30, 1e-3), r"eps\[0\] must be in \[0, inf\), got -1e-30"),
    ("eps", (1e-30,), r"eps must be a pair \(eps1, eps2\), got 1 values"),
    # Muon
    ("momentum", 1.0, r"momentum must be in \[0, 1\), got 1.0"),
    ("momentum", -0.1, r"momentum must be in \[0, 1\), got -0.1"),
    ("ns_steps", 100, r"ns_steps must be in \[0, 100\), got 100"),
    ("ns_steps", -1, r"ns_steps must be in \[0, 100\), got -1"),
    ("adjust_lr_fn", "x", r"adjust_lr_fn must be one of \(None, 'original', 'match_rms_adamw'\), got 'x'"),
    ("ns_coefficients", (3.4, -4.7), r"ns_coefficients must be a triple \(a, b, c\), got 2 values"),
    ("ns_dtype", torch.float16, r"ns_dtype must be one of torch.bfloat16, torch.float32, torch.float64"),
]
INVALID_CASES = [
    pytest.param(c, name, value, message, id=f"{c.__name__}-{name}={value}")
    for name, value, message in INVALID
    for c in OPTIMIZER_CLASSES
    if applies(c, name, value)
]


@pytest.mark.parametrize(("optimizer_class", "name", "value", "message"), INVALID_CASES)
def test_invalid_hyperparameter_in_constructor(optimizer_class: type, name: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        optimizer_class([param_for(optimizer_class, 3)], **{name: value})


@pytest.mark.parametrize(("optimizer_class", "name", "value", "message"), INVALID_CASES)
def test_invalid_hyperparameter_in_group_dict(optimizer_class: type, name: str, value: Any, message: str) -> None:
    good = param_for(optimizer_class, 3)
    with pytest.raises(ValueError, match=message):
        optimizer_class([{"params": [good]}, {"params": [param_for(optimizer_class, 2)], name: value}])


@pytest.mark.parametrize(("optimizer_class", "name", "value", "message"), INVALID_CASES)
def test_rejected_add_param_group_changes_nothing(optimizer_class: type, name: str, value: Any, message: str) -> None:
    first, second = param_for(optimizer_class, 3), param_for(optimizer_class, 2)
    optimizer = optimizer_class([first])
    before = deepcopy(optimizer.param_groups)
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": [second], name: value})
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["params"][0] is first
    assert {k: v for k, v in optimizer.param_groups[0].items() if k != "params"} == {
        k: v for k, v in before[0].items() if k != "params"
    }
    # The rejected param is free to join a later, valid group.
    optimizer.add_param_group({"params": [second]})
    assert len(optimizer.param_groups) == 2


def test_total_steps_must_exceed_warmup() -> None:
    message = r"total_steps must be greater than warmup \(10\), got 10"
    with pytest.raises(ValueError, match=message):
        AdamWarmupCosineDecay([new_param(3)], warmup=10, total_steps=10)
    with pytest.raises(ValueError, match=r"total_steps must be greater than warmup \(20\)"):
        AdamWarmupCosineDecay([new_param(3)], warmup=20, total_steps=10)
    with pytest.raises(ValueError, match=r"total_steps must be greater than warmup \(50\), got 40"):
        AdamWarmupCosineDecay([{"params": [new_param(3)], "warmup": 50}], warmup=5, total_steps=40)
    optimizer = AdamWarmupCosineDecay([new_param(3)], warmup=5, total_steps=40)
    with pytest.raises(ValueError, match=r"total_steps must be greater than warmup \(5\), got 4"):
        optimizer.add_param_group({"params": [new_param(2)], "total_steps": 4})
    assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError, match=r"total_steps must be in \(0, inf\)"):
        AdamWarmupCosineDecay([new_param(3)], warmup=0, total_steps=0)


def test_invalid_weight_decay_policies() -> None:
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0, inf\), got -0.5"):
        WeightDecay(-0.5)
    with pytest.raises(ValueError, match=r"WeightDecay\(absolute=True\) requires weight_decouple=True"):
        WeightDecay(0.1, weight_decouple=False, absolute=True)
    # The same combination spelt as group keys.
    with pytest.raises(ValueError, match=r"weight_decay_absolute=True requires decoupled weight decay"):
        Adam([{"params": [new_param(3)], "weight_decay_absolute": True, "decoupled_weight_decay": False}])


def test_sophia_update_hessian_rejects_a_non_positive_batch() -> None:
    param = new_param(3)
    optimizer = Sophia([param])
    param.grad = torch.ones_like(param)
    for bad in (0, -16):
        with pytest.raises(ValueError, match=r"n_tokens_training_batch must be in \(0, inf\)"):
            optimizer.update_hessian(bad)
    assert param not in optimizer.state


@pytest.mark.parametrize("shape", [(3,), (), (2, 3, 4)], ids=str)
def test_muon_refuses_a_param_that_is_not_a_matrix_naming_its_shape(shape: tuple[int, ...]) -> None:
    message = rf"Muon optimizes real 2-D params \(matrices\) only, got a param of shape {re.escape(str(shape))}"
    with pytest.raises(ValueError, match=message):
        Muon([new_param(*shape)])
    optimizer = Muon([new_param(2, 2)])
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": [new_param(*shape)]})
    assert len(optimizer.param_groups) == 1


# --------------------------------------------------------------------------------------------------
# Wrong types: TypeError

WRONG_TYPES: list[tuple[str, Any, str]] = [
    ("lr", "0.001", r"lr must be a real number, got str"),
    ("lr", None, r"lr must be a real number"),
    ("lr", True, r"lr must be a real number, got bool"),
    ("eps", "1e-8", r"eps must be a real number"),
    ("betas", "ab", r"betas must be a (pair|triple)"),
    ("betas", (0.9, "0.999"), r"betas\[1\] must be a real number"),
    ("betas", (0.9, 0.999, "0.9999"), r"betas\[2\] must be a real number"),
    ("weight_decay", "0.1", r"weight_decay must be a WeightDecay policy or a float, got str"),
    ("weight_decay", None, r"weight_decay must be a WeightDecay policy or a float"),
    ("weight_decay", True, r"weight_decay must be a WeightDecay policy or a float, got bool"),
    ("weight_decay", {"weight_decay": 0.1}, r"weight_decay must be a WeightDecay policy or a float, got dict"),
    ("alpha", "2", r"alpha must be a real number"),
    ("alpha_warmup", 2.5, r"alpha_warmup must be an int or None, got float"),
    ("beta3_warmup", True, r"beta3_warmup must be an int or None, got bool"),
    ("clip_lambda", 0.25, r"clip_lambda must be a function of the step or None, got float"),
    ("decouple", 1, r"decouple must be a bool, got int"),
    ("decoupled_weight_decay", "yes", r"decoupled_weight_decay must be a bool"),
    ("warmup_steps", 2.5, r"warmup_steps must be an int, got float"),
    ("r", "0", r"r must be a real number"),
    ("weight_lr_power", None, r"weight_lr_power must be a real number"),
    ("warmup", 2.5, r"warmup must be an int, got float"),
    ("rho", "0.04", r"rho must be a real number"),
    ("optimized_update", 1, r"optimized_update must be a bool, got int"),
    ("amsgrad", "yes", r"amsgrad must be a bool"),
    ("rectify", 0, r"rectify must be a bool"),
    ("degenerate_to_sgd", None, r"degenerate_to_sgd must be a bool"),
    ("maximize", 1, r"maximize must be a bool"),
    # Prodigy
    ("beta3", "0.9", r"beta3 must be a real number, got str"),
    ("d0", "1e-6", r"d0 must be a real number, got str"),
    ("d_coef", None, r"d_coef must be a real number"),
    ("growth_rate", "2", r"growth_rate must be a real number, got str"),
    ("slice_p", 1.5, r"slice_p must be an int, got float"),
    ("use_bias_correction", 1, r"use_bias_correction must be a bool, got int"),
    ("safeguard_warmup", "no", r"safeguard_warmup must be a bool, got str"),
    ("fsdp_in_use", None, r"fsdp_in_use must be a bool"),
    # LAMB
    ("max_grad_norm", "1.0", r"max_grad_norm must be a real number, got str"),
    ("use_nvlamb", 1, r"use_nvlamb must be a bool, got int"),
    ("adam_w_mode", 0, r"adam_w_mode must be a bool, got int"),
    ("grad_averaging", "yes", r"grad_averaging must be a bool, got str"),
    ("bias_correction", None, r"bias_correction must be a bool"),
    # Adafactor
    ("d", "1", r"d must be a real number, got str"),
    ("beta2_decay", "-0.8", r"beta2_decay must be a real number, got str"),
    ("eps", (None, "1e-3"), r"eps\[1\] must be a real number, got str"),
    # Muon
    ("momentum", "0.95", r"momentum must be a real number, got str"),
    ("nesterov", 1, r"nesterov must be a bool, got int"),
    ("ns_steps", 2.5, r"ns_steps must be an int, got float"),
    ("ns_steps", True, r"ns_steps must be an int, got bool"),
    ("adjust_lr_fn", 1, r"adjust_lr_fn must be a str or None, got int"),
    ("ns_coefficients", "abc", r"ns_coefficients must be a triple \(a, b, c\), got str"),
    ("ns_coefficients", (3.4, "-4.7", 2.0), r"ns_coefficients\[1\] must be a real number, got str"),
]


WRONG_TYPE_CASES = [
    pytest.param(c, name, value, message, id=f"{c.__name__}-{name}={value!r}")
    for name, value, message in WRONG_TYPES
    for c in OPTIMIZER_CLASSES
    if applies(c, name, value) or name == "maximize"
]


@pytest.mark.parametrize(("optimizer_class", "name", "value", "message"), WRONG_TYPE_CASES)
def test_wrong_type_in_constructor(optimizer_class: type, name: str, value: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        optimizer_class([param_for(optimizer_class, 3)], **{name: value})


CONSTRUCTOR_ONLY = ("weight_decay", "decouple")
"""Arguments that are not group keys as such: a float `weight_decay` becomes a policy's keys (or the
optimizer's own, `own_weight_decay`); ADOPT's `decouple` is checked as a bool in both. Lion's
`decoupled_weight_decay` is both: in the constructor it divides the decay by lr, in a group it is the policy's
flag, a bool either way."""
GROUP_WRONG_TYPES = [case for case in WRONG_TYPE_CASES if case.values[1] not in CONSTRUCTOR_ONLY]


@pytest.mark.parametrize(("optimizer_class", "name", "value", "message"), GROUP_WRONG_TYPES)
def test_wrong_type_in_group_and_add_param_group(optimizer_class: type, name: str, value: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        optimizer_class([{"params": [param_for(optimizer_class, 3)], name: value}])
    optimizer = optimizer_class([param_for(optimizer_class, 3)])
    with pytest.raises(TypeError, match=message):
        optimizer.add_param_group({"params": [param_for(optimizer_class, 2)], name: value})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("value", ["0.1", None, [0.1]])
def test_group_weight_decay_of_wrong_type(value: Any) -> None:
    with pytest.raises(TypeError, match=r"weight_decay must be a real number"):
        Adam([{"params": [new_param(3)], "weight_decay": value}])


@pytest.mark.parametrize("flag", ["weight_decouple", "absolute", "l1"])
def test_weight_decay_flags_must_be_bools(flag: str) -> None:
    with pytest.raises(TypeError, match=rf"WeightDecay.{flag} must be a bool"):
        WeightDecay(0.1, **{flag: 1})


def test_add_param_group_needs_a_dict() -> None:
    optimizer = Adam([new_param(3)])
    with pytest.raises(TypeError, match=r"param_group must be a dict, got list"):
        optimizer.add_param_group([new_param(2)])  # type: ignore[arg-type]
    assert len(optimizer.param_groups) == 1


# --------------------------------------------------------------------------------------------------
# Closure, params without grads, sparse grads


@by_name
def test_closure_is_evaluated_with_grad_enabled_and_its_loss_returned(optimizer_class: type) -> None:
    param = param_for(optimizer_class, 4).requires_grad_()
    optimizer = optimizer_class([param], lr=0.01)
    calls: list[bool] = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    if optimizer_class is ADOPT:  # its first step only initialises the second moment: nothing moves
        param.grad = 2 * param.detach()
        optimizer.step()
    before = param.detach().clone()
    with torch.no_grad():  # step must turn grad back on for the closure even here
        returned = optimizer.step(closure)
    assert calls == [True]
    assert isinstance(returned, torch.Tensor)
    assert returned.item() == pytest.approx(float((before**2).sum()), rel=1e-15)
    # The step used the closure's grads: every coordinate moved towards 0.
    assert torch.all(param.detach().abs() < before.abs())
    assert optimizer.step() is None


@by_name
def test_params_without_grads_are_untouched_and_get_no_state(optimizer_class: type) -> None:
    with_grad, without_grad, other_group = param_for(optimizer_class, 3), new_param(2, 2), param_for(optimizer_class, 5)
    # With weight decay on: decay must not touch a param that has no grad either (torch.optim's rule).
    optimizer = optimizer_class(
        [{"params": [with_grad, without_grad]}, {"params": [other_group]}], lr=0.01, weight_decay=WeightDecay(0.1)
    )
    originals = [without_grad.clone(), other_group.clone()]
    for _ in range(3):
        with_grad.grad = torch.ones_like(with_grad)
        optimizer.step()
    if isinstance(optimizer, Sophia):
        optimizer.update_hessian(8)
    assert torch.equal(without_grad, originals[0]) and torch.equal(other_group, originals[1])
    assert without_grad not in optimizer.state and other_group not in optimizer.state
    assert optimizer.state[with_grad]["step"] == 3
    assert not torch.equal(with_grad, param_for(optimizer_class, 3))


@by_name
def test_sparse_grads_are_rejected(optimizer_class: type) -> None:
    param = param_for(optimizer_class, 4)
    optimizer = optimizer_class([param])
    dense = torch.zeros(param.shape, dtype=torch.float64)
    dense.view(-1)[0], dense.view(-1)[2] = 1.0, 2.0
    param.grad = dense.to_sparse()
    with pytest.raises(RuntimeError, match=rf"{optimizer_class.__name__} does not support sparse gradients"):
        optimizer.step()
    assert torch.equal(param, param_for(optimizer_class, 4))
    if isinstance(optimizer, Sophia):
        with pytest.raises(RuntimeError, match="sparse"):
            optimizer.update_hessian(8)


# --------------------------------------------------------------------------------------------------
# Param groups


def group_overrides(optimizer_class: type) -> dict[str, Any]:
    """Hyper-parameters that differ from the defaults, for every argument `optimizer_class` takes."""
    candidates: dict[str, Any] = {
        "lr": 0.003,
        "betas": (0.5, 0.75),
        "eps": 1e-3,
        "rho": 0.5,
        "warmup": 3,
        "d_model": 8,
        "total_steps": 7,
        "optimized_update": False,
        "amsgrad": True,
        "rectify": False,
        "degenerate_to_sgd": False,
        "alpha": 5.0,
        "alpha_warmup": 4,
        "beta3_warmup": 6,
        "clip_lambda": None,
        "warmup_steps": 3,
        "r": 1.0,
        "weight_lr_power": 1.0,
        "d0": 1e-4,
        "d_coef": 0.5,
        "growth_rate": 1.5,
        "beta3": 0.9,
        "use_bias_correction": True,
        "safeguard_warmup": True,
        "slice_p": 2,
        "bias_correction": False,
        "adam_w_mode": False,
        "grad_averaging": False,
        "use_nvlamb": True,
        "beta2_decay": -0.5,
        "d": 2.0,
        "momentum": 0.8,
        "nesterov": False,
        "ns_steps": 3,
        "ns_coefficients": (3.0, -3.2, 1.2),
        "adjust_lr_fn": "match_rms_adamw",
        "ns_dtype": torch.float32,
    }
    if betas_arity(optimizer_class) == 3:
        candidates["betas"] = (0.5, 0.75, 0.95)
    if eps_is_a_pair(optimizer_class):
        candidates["eps"] = (1e-20, 1e-2)
    return {name: value for name, value in candidates.items() if takes(optimizer_class, name)}


def as_in_group(optimizer_class: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """The group entries `overrides` become: Adafactor's eps pair is `eps1` and `eps2`, Muon's `ns_dtype` its
    name; the rest as given."""
    entries = dict(overrides)
    if "eps" in entries and eps_is_a_pair(optimizer_class):
        entries["eps1"], entries["eps2"] = entries.pop("eps")
    if isinstance(entries.get("ns_dtype"), torch.dtype):
        entries["ns_dtype"] = str(entries["ns_dtype"]).removeprefix("torch.")
    return entries


COUPLING_OFF: dict[type, dict[str, Any]] = {LAMB: {"max_grad_norm": None}}
"""What makes the groups independent where an optimizer reads across them: LAMB clips by the norm of every
group's grads together (apex's), with the first group's `max_grad_norm`; see the LAMB test below."""

GROUPS_SHARE_STATE = (Prodigy,)
"""Prodigy's groups are not independent: one estimate d (and the first group's betas, beta3, d_coef,
growth_rate and bias correction) is shared by all, and the groups' rates must be equal or 0, as in prodigyopt.
`test_prodigy_groups_share_one_estimate_as_in_prodigyopt` checks that instead."""


def _group_runs(
    make_together: Any, make_separate: Any, shapes: tuple[tuple[int, ...], ...] = ((3,), (2, 2)), steps: int = 12
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Params of one optimizer over two groups and of the optimizers that stand for them, fed the same grads."""
    shared = [new_param(*shape) for shape in shapes]
    alone = [p.clone() for p in shared]
    together, separate = make_together(shared), make_separate(alone)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in shared]
        for param, twin, grad in zip(shared, alone, grads, strict=True):
            param.grad, twin.grad = grad, grad.clone()
        together.step()
        for optimizer in separate:
            optimizer.step()
    return shared, alone


@pytest.mark.parametrize(
    "optimizer_class", [c for c in OPTIMIZER_CLASSES if c not in GROUPS_SHARE_STATE], ids=lambda c: c.__name__
)
def test_group_hyperparameters_act_as_if_each_group_had_its_own_optimizer(optimizer_class: type) -> None:
    overrides = group_overrides(optimizer_class)
    common = COUPLING_OFF.get(optimizer_class, {})
    shapes = (matrix_shape(optimizer_class, (3,)), (2, 2))
    stored: dict[str, Any] = {}

    def make_together(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        optimizer = optimizer_class([{"params": [params[0]]}, {"params": [params[1]], **overrides}], lr=0.01, **common)
        stored.update(group=optimizer.param_groups[1], lr=optimizer.param_groups[0]["lr"])
        return optimizer

    def make_separate(params: list[torch.Tensor]) -> list[torch.optim.Optimizer]:
        return [optimizer_class([params[0]], lr=0.01, **common), optimizer_class([params[1]], **overrides, **common)]

    shared, alone = _group_runs(make_together, make_separate, shapes)
    expected_entries = as_in_group(optimizer_class, overrides)
    assert {k: stored["group"][k] for k in expected_entries} == expected_entries
    assert stored["lr"] == 0.01
    for param, twin in zip(shared, alone, strict=True):
        assert torch.equal(param, twin)
    # And the overrides made a difference, or the comparison above proves nothing.
    default_run = new_param(2, 2)
    reference = optimizer_class([default_run], lr=0.01, **common)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        torch.randn(shapes[0], generator=generator, dtype=torch.float64)
        default_run.grad = torch.randn((2, 2), generator=generator, dtype=torch.float64)
        reference.step()
    assert not torch.equal(default_run, shared[1])


def test_prodigy_groups_share_one_estimate_as_in_prodigyopt() -> None:
    # Group 1 overrides every hyper-parameter but lr (the rates must be equal or 0): those Prodigy reads per
    # group (eps, d0, safeguard_warmup, slice_p) act there; those of the estimate come from the first group,
    # in ours as in prodigyopt, which the two groups together follow. lr 1 (Prodigy's): d grows from d0.
    overrides = {name: value for name, value in group_overrides(Prodigy).items() if name != "lr"}
    assert {"eps", "d0", "safeguard_warmup", "slice_p", "betas", "beta3", "growth_rate"} <= set(overrides)
    built: list[torch.optim.Optimizer] = []

    def together(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        built.append(Prodigy([{"params": [params[0]]}, {"params": [params[1]], **overrides}]))
        return built[-1]

    ours, theirs = _group_runs(
        together, lambda params: [prodigyopt.Prodigy([{"params": [params[0]]}, {"params": [params[1]], **overrides}])]
    )
    for mine, other in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-10, atol=0)
    assert built[0].param_groups[0]["d"] == built[0].param_groups[1]["d"] > 10 * built[0].param_groups[0]["d0"]
    # One estimate for both: each group alone in an optimizer of its own ends elsewhere.
    shared, alone = _group_runs(together, lambda params: [Prodigy([params[0]]), Prodigy([params[1]], **overrides)])
    assert not any(torch.equal(a, b) for a, b in zip(shared, alone, strict=True))


def test_lamb_groups_are_coupled_by_the_global_grad_norm_only() -> None:
    # apex's clipping divides every grad by max(1, N / max_grad_norm), N the norm of all groups' grads together:
    # the groups are each their own LAMB fed the grads so clipped, and not without the clipping.
    overrides = {name: value for name, value in group_overrides(LAMB).items()}
    shared = [new_param(3), new_param(2, 2)]
    alone, unclipped = [p.clone() for p in shared], [p.clone() for p in shared]
    together = LAMB([{"params": [shared[0]]}, {"params": [shared[1]], **overrides}], lr=0.01, max_grad_norm=0.5)
    separate = [LAMB([alone[0]], lr=0.01, max_grad_norm=None), LAMB([alone[1]], max_grad_norm=None, **overrides)]
    each_clipped = [LAMB([unclipped[0]], lr=0.01, max_grad_norm=0.5), LAMB([unclipped[1]], **overrides)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in shared]
        norm = float(torch.linalg.vector_norm(torch.cat([grad.flatten() for grad in grads])))
        assert norm > 0.5  # the clipping acts at every step
        for param, twin, other, grad in zip(shared, alone, unclipped, grads, strict=True):
            param.grad, twin.grad, other.grad = grad, grad / (norm / 0.5), grad.clone()
        for optimizer in [together, *separate, *each_clipped]:
            optimizer.step()
    for param, twin, other in zip(shared, alone, unclipped, strict=True):
        torch.testing.assert_close(param, twin, rtol=1e-12, atol=0)
        assert not torch.equal(param, other)


@by_name
def test_weight_decay_off_for_one_group(optimizer_class: type) -> None:
    decayed, not_decayed = param_for(optimizer_class, 4), param_for(optimizer_class, 3)
    start = [decayed.clone(), not_decayed.clone()]
    groups: list[dict[str, Any]] = [{"params": [decayed]}, {"params": [not_decayed], "weight_decay": 0.0}]
    driver: list[torch.Tensor] = []
    if optimizer_class is Prodigy:
        # With every grad zero, Prodigy (as prodigyopt) skips the whole step, decay included: no grad moved the
        # denominator of its estimate. A third group, without decay and with grads, drives the estimate; the two
        # groups under test keep zero moments, so their update is 0 and only the decay moves them, at d * lr.
        driver = [new_param(2)]
        groups.append({"params": driver, "weight_decay": 0.0})
    optimizer = optimizer_class(groups, lr=0.01, weight_decay=WeightDecay(0.5))
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert optimizer.param_groups[1]["decoupled_weight_decay"] is True
    rates = []
    for t in range(1, 6):
        # Schedules scale the decay through the effective lr; these optimizers' defaults leave lr unscaled,
        # except Noam, whose rate is lr * d_model^-0.5 * t^-0.5 even without warm-up, and Prodigy, whose rate
        # is its estimate d times lr.
        for param in (decayed, not_decayed):
            param.grad = torch.zeros_like(param)
        for param in driver:
            param.grad = torch.ones_like(param)
        optimizer.step()
        if optimizer_class is Prodigy:
            rates.append(optimizer.param_groups[0]["dlr"])
        else:
            rates.append(0.01 * (512**-0.5 * t**-0.5 if optimizer_class is Noam else 1.0))
    expected = start[0].clone()
    for t, lr_t in enumerate(rates, start=1):
        expected *= 1.0 - lr_t * 0.5
        if optimizer_class is ScheduleFreeAdamW:
            # The decayed y is then averaged with z (here the start: a zero grad leaves z alone), with
            # weight c_t = 1/t (equal weights w_t, as r = 0 and the rate is constant).
            expected += (start[0] - expected) / t
    assert not torch.equal(decayed, start[0])
    torch.testing.assert_close(decayed, expected, rtol=1e-14, atol=0)
    assert torch.equal(not_decayed, start[1])


def zero_grad_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int) -> None:
    """With a zero gradient the adaptive step is exactly 0, so only weight decay moves the params."""
    for _ in range(steps):
        for param in params:
            param.grad = torch.zeros_like(param)
        optimizer.step()


def test_weight_decay_policy_given_per_group() -> None:
    params = [new_param(4) for _ in range(5)]
    start = [p.clone() for p in params]
    lr, steps = 0.01, 5
    optimizer = Adam(
        [
            {"params": [params[0]]},  # the constructor's policy: decoupled 0.1
            {"params": [params[1]], "weight_decay": WeightDecay(0.2, absolute=True)},
            {"params": [params[2]], "weight_decay": WeightDecay(0.3, l1=True)},
            {"params": [params[3]], "weight_decay": WeightDecay()},
        ],
        lr=lr,
        weight_decay=WeightDecay(0.1),
    )
    # A policy added later, coupled: with a zero gradient, the decay is the whole gradient.
    optimizer.add_param_group({"params": [params[4]], "weight_decay": WeightDecay(0.4, weight_decouple=False)})
    keys = ("weight_decay", "decoupled_weight_decay", "weight_decay_absolute", "weight_decay_l1")
    assert [tuple(group[k] for k in keys) for group in optimizer.param_groups] == [
        (0.1, True, False, False),
        (0.2, True, True, False),
        (0.3, True, False, True),
        (0.0, True, False, False),
        (0.4, False, False, False),
    ]
    zero_grad_steps(optimizer, params, steps)
    torch.testing.assert_close(params[0], start[0] * (1 - lr * 0.1) ** steps, rtol=1e-14, atol=0)
    torch.testing.assert_close(params[1], start[1] * (1 - 0.2) ** steps, rtol=1e-14, atol=0)
    # L1: a constant pull of lr * 0.3 per step towards 0 (no element crosses 0 in 5 steps).
    l1_expected = start[2] - steps * lr * 0.3 * start[2].sign()
    torch.testing.assert_close(params[2], l1_expected, rtol=1e-13, atol=1e-16)
    assert torch.equal(params[3], start[3])
    # Coupled L2 feeds 0.4 * p to Adam as the gradient: the params move against sign(p), by about lr a step.
    moved = params[4] - start[4]
    nonzero = start[4] != 0
    assert torch.all(moved[nonzero] * start[4][nonzero] < 0)
    assert torch.all(moved[~nonzero] == 0)
    torch.testing.assert_close(moved[nonzero].abs(), torch.full_like(moved[nonzero], steps * lr), rtol=0.05, atol=0)


def test_float_weight_decay_means_decoupled() -> None:
    param = new_param(3)
    start = param.clone()
    optimizer = Adam([param], lr=0.01, weight_decay=0.1)
    group = optimizer.param_groups[0]
    assert (group["weight_decay"], group["decoupled_weight_decay"]) == (0.1, True)
    zero_grad_steps(optimizer, [param], 2)
    torch.testing.assert_close(param, start * (1 - 0.01 * 0.1) ** 2, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------------
# Kinds: what step_param may run on is declared by each class, never inherited by accident


def family_classes() -> list[type]:
    """The class of every registered adaptopt optimizer (the registry's names without torch's `sgd`). The
    registry's `muon` is a function, `muon_with_adamw`, returning a `MuonWithAdamW`, which is no
    `GenericAdaptiveOptimizer` but holds two: `Muon`, the one it adds to the family, and our `Adam`."""
    classes = []
    for name in adaptopt.available():
        factory = adaptopt.describe(name).factory
        if factory is adaptopt.muon_with_adamw:
            built = factory([new_param(2, 2), new_param(2)])
            assert isinstance(built, adaptopt.MuonWithAdamW) and not isinstance(built, GenericAdaptiveOptimizer)
            assert type(built.adamw) is Adam
            factory = type(built.muon)
        if isinstance(factory, type) and issubclass(factory, GenericAdaptiveOptimizer):
            classes.append(factory)
    return classes


def test_the_family_is_every_registered_name_but_sgd() -> None:
    assert family_classes() == OPTIMIZER_CLASSES
    assert len(family_classes()) == len(adaptopt.available()) - 1


@pytest.mark.parametrize("optimizer_class", family_classes(), ids=lambda c: c.__name__)
def test_every_optimizer_declares_its_kind_in_its_own_class_body(optimizer_class: type) -> None:
    # In the source, as the base fills in "per_param" for a class with math of its own that states no kind.
    body = inspect.getsource(optimizer_class)
    stated = re.search(r"^    kind(: ClassVar\[str\])? = ", body, re.MULTILINE)
    assert stated, f"{optimizer_class.__name__} states no kind"
    assert vars(optimizer_class)["kind"] in KINDS


def test_an_unknown_kind_is_refused_when_the_class_is_created() -> None:
    with pytest.raises(TypeError, match=rf"Bogus.kind must be one of {re.escape(str(KINDS))}, got 'bogus'"):

        class Bogus(GenericAdaptiveOptimizer):
            kind = "bogus"

    with pytest.raises(TypeError, match=r"AdamOfNoKind.kind must be one of"):

        class AdamOfNoKind(Adam):
            kind = "vectorized"


def step_side_by_side(
    optimizer: torch.optim.Optimizer, reference: torch.optim.Optimizer, params: list[Any], twins: list[Any]
) -> None:
    """Three steps of each, fed the same grads (which depend on `params`, so a wrong step shows in the next)."""
    for step in range(3):
        for param, twin in zip(params, twins, strict=True):
            param.grad = torch.full_like(param, float(step + 1)) + param.detach()
            twin.grad = param.grad.clone()
        optimizer.step()
        reference.step()


class _SignSGD(GenericAdaptiveOptimizer):
    """An optimizer that does not say what its step_param may run on: the default, one whole param."""

    def __init__(self, params: Any, lr: float = 0.1, **options: Any) -> None:
        super().__init__(params, {"lr": lr}, **options)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        state["steps_seen"] = torch.zeros_like(param)

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        # Whole-tensor math, so that a bucket would give another answer: the step is normalised by the norm.
        state["steps_seen"].add_(1.0)
        param.add_(grad / grad.norm().clamp(min=1e-12), alpha=-scalars["lr"])


@pytest.mark.parametrize("execution_mode", ["bucketed", "compiled", "auto"])
def test_an_optimizer_that_does_not_declare_its_kind_runs_on_the_reference_loop(execution_mode: str) -> None:
    assert _SignSGD.kind == "per_param" and "kind" not in inspect.getsource(_SignSGD)
    # Params that require grad, as the buckets leave frozen params to the reference loop anyway.
    params = [new_param(3).requires_grad_(), new_param(2, 2).requires_grad_(), new_param(5).requires_grad_()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    optimizer = _SignSGD(params, execution=execution_mode)
    reference = _SignSGD(twins, execution="reference")
    step_side_by_side(optimizer, reference, params, twins)
    assert list(execution.buckets(optimizer)) == []
    assert all(execution.bucket_of(optimizer, p) is None for p in params)
    for param, twin in zip(params, twins, strict=True):
        assert torch.equal(param, twin)
        assert torch.equal(optimizer.state[param]["steps_seen"], torch.full_like(param, 3.0))


class _NormalizedAdam(Adam):
    """A user's subclass of an elementwise optimizer whose own math needs the whole param, kind not stated."""

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        super().step_param(state, group, grad / grad.norm().clamp(min=1e-12), param, scalars)


class _ScheduledAdam(Adam):
    """A subclass that changes only the schedule: its math is still Adam's, and so is its kind."""

    def learning_rate(self, state: State, group: Group) -> float:
        return 0.5 * float(group["lr"])


def test_a_subclass_with_math_of_its_own_does_not_inherit_its_kind() -> None:
    assert Adam.kind == "elementwise" and _NormalizedAdam.kind == "per_param" and _ScheduledAdam.kind == "elementwise"
    params = [new_param(3).requires_grad_(), new_param(2, 2).requires_grad_()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    optimizer = _NormalizedAdam(params, lr=0.1, execution="bucketed")
    reference = _NormalizedAdam(twins, lr=0.1, execution="reference")
    step_side_by_side(optimizer, reference, params, twins)
    assert list(execution.buckets(optimizer)) == []
    for param, twin in zip(params, twins, strict=True):
        assert torch.equal(param, twin)


@pytest.mark.parametrize(
    "optimizer_class", [c for c in family_classes() if c.kind == "elementwise"], ids=lambda c: c.__name__
)
def test_an_elementwise_optimizer_does_run_in_buckets(optimizer_class: type) -> None:
    """The other side of the test above: with execution="bucketed" the family's elementwise math gets buckets."""
    params = [new_param(3).requires_grad_(), new_param(2, 2).requires_grad_()]
    optimizer = optimizer_class(params, execution="bucketed")
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    assert len(list(execution.buckets(optimizer))) == 1
