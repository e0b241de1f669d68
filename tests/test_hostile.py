"""Hostile input: odd shapes, layouts and dtypes, non-finite grads, and arguments of the wrong type.

Every case ends either in a clear error or in a step that equals the reference execution on plain
contiguous copies of the same numbers, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptopt import WeightDecay, describe
from adaptopt.base import CommonOptions
from dropin_support import NAMES, assert_identical, make_optimizer, reference_execution, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Layout:
    """How a tensor of `shape` is laid out in memory."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # contiguous, transposed, strided, channels_last

    def make(self, values: torch.Tensor) -> torch.Tensor:
        """A new tensor of this layout holding `values` (a contiguous tensor of `shape`), never `values` itself."""
        values = values.to(self.dtype)
        if self.kind == "transposed":
            # clone, not contiguous(): a 1-d "transpose" is the tensor itself, which must not be handed back.
            return values.transpose(0, -1).clone(memory_format=torch.contiguous_format).transpose(0, -1)
        if self.kind == "strided":  # every other element of a larger buffer
            buffer = torch.zeros((2 * values.shape[0], *values.shape[1:]), dtype=self.dtype)
            buffer[::2] = values
            return buffer[::2]
        if self.kind == "channels_last":
            return values.contiguous(memory_format=torch.channels_last)
        return values.clone()


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    kind = draw(st.sampled_from(["contiguous", "transposed", "strided", "channels_last"]))
    dims = st.integers(min_value=0, max_value=4)  # 0: zero-element tensors
    if kind == "channels_last":
        shape = tuple(draw(st.lists(dims, min_size=4, max_size=4)))
    elif kind == "contiguous":
        shape = tuple(draw(st.lists(dims, min_size=0, max_size=3)))  # () is a 0-d tensor
    else:
        shape = tuple(draw(st.lists(dims, min_size=1, max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return Layout(shape, dtype, kind)


@st.composite
def hyper_parameters(draw: st.DrawFn) -> dict[str, Any]:
    decay = draw(st.sampled_from(["none", "decoupled", "coupled", "absolute", "l1"]))
    strength = draw(st.floats(min_value=0.0, max_value=0.1))
    policies = {
        "none": WeightDecay(),
        "decoupled": WeightDecay(strength),
        "coupled": WeightDecay(strength, weight_decouple=False),
        "absolute": WeightDecay(strength, absolute=True),
        "l1": WeightDecay(strength, l1=True),
    }
    return {
        "lr": draw(st.floats(min_value=0.0, max_value=0.5)),
        "betas": (draw(st.floats(min_value=0.0, max_value=0.99)), draw(st.floats(min_value=0.5, max_value=0.9999))),
        "beta3": draw(st.floats(min_value=0.5, max_value=0.9999)),  # AdEMAMix's third beta (dropped for the rest)
        "eps": draw(st.sampled_from([1e-16, 1e-8, 1e-3])),
        "weight_decay": policies[decay],
        "maximize": draw(st.booleans()),
        "master_weights": draw(st.booleans()),
    }


@SETTINGS
@given(
    name=st.sampled_from(NAMES),
    hyper=hyper_parameters(),
    param_layouts=st.lists(layouts(), min_size=1, max_size=3),  # mixed dtypes in one group included
    grad_kinds=st.lists(st.sampled_from(["contiguous", "transposed", "strided"]), min_size=3, max_size=3),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_any_shape_layout_and_dtype_steps_like_the_reference(
    name: str, hyper: dict[str, Any], param_layouts: list[Layout], grad_kinds: list[str], seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(layout.shape, generator=generator, dtype=torch.float64) for layout in param_layouts]
    hostile = [layout.make(v).requires_grad_() for layout, v in zip(param_layouts, values, strict=True)]
    plain = [v.to(layout.dtype, copy=True).requires_grad_() for layout, v in zip(param_layouts, values, strict=True)]
    beta3 = hyper.pop("beta3")
    if "eps" not in describe(name).defaults:  # Lion's sign needs no eps
        del hyper["eps"]
    if name == "sophia":
        hyper = {**hyper, "rho": 0.05}
    if betas_arity(name) == 3:
        hyper = {**hyper, "betas": (*hyper["betas"], beta3)}
    ours = make_optimizer(name, hostile, **hyper)
    reference = make_optimizer(name, plain, **hyper, **reference_execution())
    for step in range(3):
        for index, layout in enumerate(param_layouts):
            grad = torch.randn(layout.shape, generator=generator, dtype=torch.float64)
            kind = grad_kinds[step] if layout.kind != "channels_last" and grad.dim() > 0 else "contiguous"
            hostile[index].grad = Layout(layout.shape, layout.dtype, kind).make(grad)
            plain[index].grad = grad.to(layout.dtype)
        ours.step()
        reference.step()
        if name == "sophia":
            ours.update_hessian(8)  # type: ignore[attr-defined]
            reference.update_hessian(8)  # type: ignore[attr-defined]
    for index, (mine, expected) in enumerate(zip(hostile, plain, strict=True)):
        assert_identical(mine.detach().contiguous(), expected.detach(), f"param {index}")
        state = {key: v.contiguous() if torch.is_tensor(v) else v for key, v in ours.state[mine].items()}
        assert_identical(state, reference.state[expected], f"state of param {index}")


def test_an_overlapping_param_is_a_clear_error() -> None:
    # An expanded tensor has many elements in one memory location: no in-place update can be right.
    param = torch.zeros(3, 1).expand(3, 4).requires_grad_()
    optimizer = make_optimizer("adam", [param])
    param.grad = torch.ones(3, 4)
    with pytest.raises(RuntimeError, match="single memory location"):
        optimizer.step()


def test_a_sparse_grad_is_a_clear_error() -> None:
    param = torch.zeros(4, requires_grad=True)
    optimizer = make_optimizer("adam", [param])
    param.grad = torch.sparse_coo_tensor([[1]], [1.0], (4,), check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


# --------------------------------------------------------------------------------------------------
# Non-finite grads without a GradScaler: they propagate, as in torch.optim. Checking every grad would
# cost a device synchronisation per step; GradScaler (test_amp) is the tool that skips such steps.


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_grad_propagates_as_in_torch_adam(bad: float) -> None:
    theirs_param, ours_param = torch.ones(5, requires_grad=True), torch.ones(5, requires_grad=True)
    theirs = torch.optim.Adam([theirs_param], lr=0.1)
    ours = make_optimizer("adam", [ours_param], lr=0.1, optimized_update=False, eps=1e-8, weight_decay=0.0)
    for param, optimizer in ((theirs_param, theirs), (ours_param, ours)):
        param.grad = torch.tensor([0.5, bad, -0.5, 1.0, 2.0])
        optimizer.step()
    assert_identical(ours_param.detach(), theirs_param.detach())
    assert_identical(ours.state[ours_param]["exp_avg_sq"], theirs.state[theirs_param]["exp_avg_sq"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_grad_stays_in_its_element(name: str, bad: float) -> None:
    clean, poisoned = torch.ones(5, requires_grad=True), torch.ones(5, requires_grad=True)
    optimizers = [make_optimizer(name, [clean]), make_optimizer(name, [poisoned])]
    for step in range(3):
        clean.grad = torch.tensor([0.5, 0.0, -0.5, 1.0, 2.0]) * (step + 1)
        poisoned.grad = clean.grad.clone()
        poisoned.grad[1] = bad
        for optimizer in optimizers:
            optimizer.step()
    # Schedule-Free keeps no first moment: its bad grad lands in the second.
    moment = "exp_avg" if "exp_avg" in optimizers[1].state[poisoned] else "exp_avg_sq"
    assert not bool(optimizers[1].state[poisoned][moment][1].isfinite()), "the bad grad vanished"
    keep = torch.tensor([True, False, True, True, True])
    assert_identical(poisoned.detach()[keep], clean.detach()[keep])
    for key, value in optimizers[0].state[clean].items():
        if torch.is_tensor(value):
            assert_identical(optimizers[1].state[poisoned][key][keep], value[keep], key)


# --------------------------------------------------------------------------------------------------
# Arguments of the wrong type or out of range: TypeError or ValueError naming the argument


def betas_arity(name: str) -> int:
    """How many betas optimizer `name` takes: 2, or 3 for AdEMAMix; 0 if it takes none."""
    return len(describe(name).defaults.get("betas", ()))


BAD_ARGUMENTS: list[tuple[str, Any, type[Exception]]] = [
    ("lr", "0.1", TypeError),
    ("lr", -1e-3, ValueError),
    ("lr", float("nan"), ValueError),
    ("betas", 0.9, TypeError),
    ("betas", (0.9,), ValueError),
    ("eps", "1e-8", TypeError),
    ("eps", -1.0, ValueError),
    ("weight_decay", "0.01", TypeError),
    ("weight_decay", {"weight_decay": 0.01}, TypeError),
    ("weight_decay", -0.01, ValueError),
    ("maximize", "yes", TypeError),
    ("master_weights", 1, TypeError),
    ("state_dtype", torch.float16, ValueError),
    ("state_dtype", "fp32", ValueError),
    ("state_dtype", 32, TypeError),
]
BAD_BETAS: dict[int, list[tuple[str, Any, type[Exception]]]] = {
    2: [
        ("betas", (0.9, 0.99, 0.999), ValueError),
        ("betas", (0.9, 1.0), ValueError),
        ("betas", ("0.9", 0.99), TypeError),
    ],
    3: [
        ("betas", (0.9, 0.999), ValueError),
        ("betas", (0.9, 0.999, 0.9999, 0.99999), ValueError),
        ("betas", (0.9, 0.999, 1.0), ValueError),
        ("betas", (0.9, 0.999, "0.9999"), TypeError),
    ],
}
"""Betas of the wrong length, range or type: a pair for most, a triple for AdEMAMix."""
SPECIFIC_BAD_ARGUMENTS: dict[str, list[tuple[str, Any, type[Exception]]]] = {
    "sophia": [("rho", 0.0, ValueError), ("rho", "0.05", TypeError)],
    "adam_warmup": [("warmup", 2.5, TypeError), ("warmup", -1, ValueError)],
    "noam": [("warmup", "10", TypeError), ("d_model", 0, ValueError)],
    "adam_warmup_cosine_decay": [("total_steps", 1, ValueError), ("total_steps", None, TypeError)],
    "radam": [("degenerate_to_sgd", "no", TypeError)],
    "adabelief": [("rectify", None, TypeError)],
    "amsgrad": [("amsgrad", 0, TypeError)],
    "adam": [("optimized_update", "false", TypeError)],
    "lion": [("decoupled_weight_decay", "yes", TypeError)],
    "adopt": [("clip_lambda", 0.25, TypeError), ("clip_lambda", "t ** 0.25", TypeError), ("decouple", 1, TypeError)],
    "ademamix": [
        ("alpha", -1.0, ValueError),
        ("alpha", "2", TypeError),
        ("alpha_warmup", 0, ValueError),
        ("alpha_warmup", 10.0, TypeError),
        ("beta3_warmup", -100, ValueError),
        ("beta3_warmup", True, TypeError),
    ],
    "schedule_free_adamw": [
        ("warmup_steps", -1, ValueError),
        ("warmup_steps", 2.5, TypeError),
        ("r", -0.5, ValueError),
        ("r", "1", TypeError),
        ("weight_lr_power", -2.0, ValueError),
    ],
}
CASES = [
    (name, *case)
    for name in NAMES
    for case in BAD_ARGUMENTS + BAD_BETAS[betas_arity(name)] + SPECIFIC_BAD_ARGUMENTS[name]
    if case[0] in describe(name).defaults or case[0] in CommonOptions.__annotations__  # Lion takes no eps
]
CONSTRUCTOR_ONLY = ("decouple",)
"""ADOPT's `decouple` picks its weight decay's mode at construction; it is no group key."""
GROUP_CASES = [case for case in CASES if case[1] not in CONSTRUCTOR_ONLY]


@pytest.mark.parametrize(("name", "argument", "value", "error"), CASES)
def test_a_bad_argument_names_itself(name: str, argument: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=argument):
        make_optimizer(name, [torch.zeros(2, requires_grad=True)], **{argument: value})


@pytest.mark.parametrize(("name", "argument", "value", "error"), GROUP_CASES)
def test_a_bad_param_group_names_itself_and_is_not_added(
    name: str, argument: str, value: Any, error: type[Exception]
) -> None:
    optimizer = make_optimizer(name, [torch.zeros(2, requires_grad=True)])
    before = snapshot(optimizer)
    with pytest.raises(error, match=argument):
        optimizer.add_param_group({"params": [torch.zeros(3, requires_grad=True)], argument: value})
    assert_identical(snapshot(optimizer), before)


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_argument_is_refused(name: str) -> None:
    with pytest.raises(TypeError, match="momentum"):
        make_optimizer(name, [torch.zeros(2, requires_grad=True)], momentum=0.9)


@pytest.mark.parametrize("lr", [0.0, 0, -1e-3, "1e-4"])
def test_lion_divides_decay_by_lr_only_for_a_positive_lr(lr: Any) -> None:
    # decoupled_weight_decay=True divides weight_decay by lr: lr = 0 would make it infinite.
    with pytest.raises((ValueError, TypeError), match="lr"):
        make_optimizer("lion", [torch.zeros(2)], lr=lr, weight_decay=0.1, decoupled_weight_decay=True)


def test_schedule_free_refuses_to_step_in_eval_mode_and_changes_nothing() -> None:
    param = torch.ones(3, requires_grad=True)
    optimizer = make_optimizer("schedule_free_adamw", [param])
    param.grad = torch.full_like(param, 0.5)
    optimizer.step()
    optimizer.eval()  # type: ignore[attr-defined]
    before = snapshot(optimizer)
    with pytest.raises(RuntimeError, match=r"ScheduleFreeAdamW.step\(\) was called in eval mode"):
        optimizer.step()
    assert_identical(snapshot(optimizer), before)
    with pytest.raises(TypeError, match="mode must be a bool"):
        optimizer.train(1)  # type: ignore[attr-defined]
    optimizer.train()  # type: ignore[attr-defined]
    optimizer.step()
