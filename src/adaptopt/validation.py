"""Hyper-parameter checks shared by the whole family: a name means the same thing in every optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["HYPERPARAMETER_CHECKS", "validate_checks", "validate_group", "with_listed_params"]


def _require_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return float(value)


def _in_range(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    x = _require_real(name, value)
    above = x > low if low_open else x >= low
    below = x < high if high_open else x <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    _in_range(name, value, 0.0, math.inf, low_open=False, high_open=True)


def _positive(name: str, value: Any) -> None:
    _in_range(name, value, 0.0, math.inf, low_open=True, high_open=True)


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    _non_negative(name, value)


def _betas(name: str, value: Any, arity: int = 2) -> None:
    what = "a pair (beta1, beta2)" if arity == 2 else "a triple (beta1, beta2, beta3)"
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if len(value) != arity:
        raise ValueError(f"{name} must be {what}, got {len(value)} values: {value!r}")
    for index, beta in enumerate(value):
        _in_range(f"{name}[{index}]", beta, 0.0, 1.0, low_open=False, high_open=True)


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _optional_steps(name: str, value: Any) -> None:
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
        _positive(name, value)


def _optional_function(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a function of the step or None, got {type(value).__name__} {value!r}")


def _optional_beta(name: str, value: Any) -> None:
    if value is not None:
        _in_range(name, value, 0.0, 1.0, low_open=False, high_open=True)


def _optional_non_negative(name: str, value: Any) -> None:
    if value is not None:
        _non_negative(name, value)


def _growth(name: str, value: Any) -> None:
    _in_range(name, value, 1.0, math.inf, low_open=False, high_open=False)


def _positive_int(name: str, value: Any) -> None:
    _non_negative_int(name, value)
    _positive(name, value)


STATE_STORAGES = ("float32", "bfloat16", "8bit", "4bit")
"""What a group's `state_dtype` may hold besides None: a dtype's name, or a low-bit format (`quantization.py`)."""


def _storage_dtype(name: str, value: Any) -> None:
    # Groups hold the dtype's name (see base.storage_dtype_name), so checkpoints hold only primitives.
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be one of {STATE_STORAGES} or None, got {type(value).__name__} {value!r}")
    if value is not None and value not in STATE_STORAGES:
        raise ValueError(f"{name} must be one of {STATE_STORAGES} or None, got {value!r}")


# One table for the whole family: a hyper-parameter means the same thing in every optimizer that has it.
HYPERPARAMETER_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "lr": _non_negative,
    "eps": _non_negative,
    "betas": _betas,
    "weight_decay": _non_negative,
    "rho": _positive,
    "warmup": _non_negative_int,
    "warmup_steps": _non_negative_int,
    "r": _non_negative,
    "weight_lr_power": _non_negative,
    "weight_decay_policy": _flag,
    "decouple": _flag,
    "decay_rate_divisor": _positive,
    "alpha": _non_negative,
    "alpha_warmup": _optional_steps,
    "beta3_warmup": _optional_steps,
    "clip_lambda": _optional_function,
    "beta3": _optional_beta,
    "d0": _positive,
    "d_coef": _positive,
    "growth_rate": _growth,
    "slice_p": _positive_int,
    "use_bias_correction": _flag,
    "safeguard_warmup": _flag,
    "fsdp_in_use": _flag,
    "max_grad_norm": _optional_non_negative,
    "bias_correction": _flag,
    "adam_w_mode": _flag,
    "grad_averaging": _flag,
    "use_nvlamb": _flag,
    "d_model": _positive,
    "total_steps": _positive,
    "n_tokens_training_batch": _positive,
    "maximize": _flag,
    "optimized_update": _flag,
    "amsgrad": _flag,
    "degenerate_to_sgd": _flag,
    "rectify": _flag,
    "decoupled_weight_decay": _flag,
    "weight_decay_absolute": _flag,
    "weight_decay_l1": _flag,
    "master_weights": _flag,
    "stochastic_rounding": _flag,
    "state_dtype": _storage_dtype,
    # An element count: tensors with fewer elements keep unquantized state under a low-bit state_dtype.
    "low_bit_min_numel": _non_negative_int,
}


def validate_group(group: Mapping[str, Any]) -> None:
    """Raise `ValueError`/`TypeError` naming the first hyper-parameter of `group` that is out of range."""
    for name, check in HYPERPARAMETER_CHECKS.items():
        if name == "betas" and "beta3_warmup" in group:  # AdEMAMix's betas include the slow momentum's
            _betas(name, group[name], arity=3)
        elif name in group:
            check(name, group[name])
    if "total_steps" in group and "warmup" in group and not group["total_steps"] > group["warmup"]:
        raise ValueError(f"total_steps must be greater than warmup ({group['warmup']!r}), got {group['total_steps']!r}")
    if group.get("weight_decay_absolute") and not group.get("decoupled_weight_decay", True):
        raise ValueError("weight_decay_absolute=True requires decoupled weight decay")
    if group.get("stochastic_rounding") and group.get("master_weights"):
        # Refused rather than ignored, as torch.optim refuses `fused=True` with `foreach=True`: a job that asks
        # for both has misread one, and silently dropping either would change the run it expects.
        raise ValueError(
            "stochastic_rounding=True cannot be combined with master_weights=True: the fp32 master keeps every "
            "update, and the param is its rounding to nearest; choose one"
        )


def validate_checks(checks: Mapping[str, Callable[[str, Any], None]], group: Mapping[str, Any]) -> None:
    """Raise on the first key of `group` that an optimizer's own `checks` (keys the family table lacks) refuse."""
    for name, check in checks.items():
        if name in group:
            check(name, group[name])


def with_listed_params(param_group: dict[str, Any]) -> dict[str, Any]:
    """A copy of `param_group` whose params are a list, so they can be looked at before torch reads them."""
    params = param_group.get("params")
    if isinstance(params, torch.Tensor):
        params = [params]
    elif params is not None and not isinstance(params, (set, list)):
        params = list(params)  # a generator, read once here (a set is left to torch, which refuses it)
    return {**param_group, "params": params} if "params" in param_group else dict(param_group)
