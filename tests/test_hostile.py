"""Hostile input: odd shapes, layouts and dtypes, non-finite grads, and arguments of the wrong type.

Every case ends either in a clear error or in a step that equals the reference execution on plain
contiguous copies of the same numbers, bit for bit.
"""

from __future__ import annotations

import math
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
            # clone, not contiguous(): a tensor already channels-last (one of no elements, say) is returned as is.
            return values.clone(memory_format=torch.channels_last)
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
    defaults = describe(name).defaults
    if "eps" not in defaults:  # Lion's sign needs no eps; muon_with_adamw's AdamW takes adamw_eps
        del hyper["eps"]
    elif isinstance(defaults["eps"], tuple):  # Adafactor's (eps1, eps2): the floors of V and of RMS(param)
        hyper["eps"] = (hyper["eps"], 1e-3)
    if "betas" not in defaults:  # Adafactor's and Muon's momentum are not betas
        del hyper["betas"]
    if name == "sophia":
        hyper = {**hyper, "rho": 0.05}
    if name == "muon":  # muon_with_adamw takes one float weight_decay, decoupled, for both its optimizers
        hyper["weight_decay"] = hyper["weight_decay"].weight_decay
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


READS_ACROSS_ELEMENTS = ("prodigy", "lamb", "adafactor")
"""Where one element's grad reaches the others' steps, so a non-finite one does too (see the test after the
next): Prodigy's estimate d sums over every element, LAMB's clipping and trust ratio take norms, Adafactor's
step the update's RMS. `muon`'s vectors are its AdamW's, elementwise; its matrices are Muon's, whose
orthogonalization reads the whole matrix."""


def poisoned_run(
    name: str, bad: float, shape: tuple[int, ...], steps: int = 3
) -> tuple[list[torch.optim.Optimizer], torch.Tensor, torch.Tensor]:
    """`steps` steps of two runs of `name`, fed the same grads but for element 1 of the second's, `bad`."""
    clean, poisoned = torch.ones(shape, requires_grad=True), torch.ones(shape, requires_grad=True)
    optimizers = [make_optimizer(name, [clean]), make_optimizer(name, [poisoned])]
    for step in range(steps):
        clean.grad = (torch.tensor([0.5, 0.0, -0.5, 1.0, 2.0]) * (step + 1)).reshape(shape)
        poisoned.grad = clean.grad.clone()
        poisoned.grad.view(-1)[1] = bad
        for optimizer in optimizers:
            optimizer.step()
    return optimizers, clean, poisoned


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", [name for name in NAMES if name not in READS_ACROSS_ELEMENTS])
def test_a_non_finite_grad_stays_in_its_element(name: str, bad: float) -> None:
    optimizers, clean, poisoned = poisoned_run(name, bad, (5,))
    # Schedule-Free keeps no first moment: its bad grad lands in the second.
    moment = "exp_avg" if "exp_avg" in optimizers[1].state[poisoned] else "exp_avg_sq"
    assert not bool(optimizers[1].state[poisoned][moment][1].isfinite()), "the bad grad vanished"
    keep = torch.tensor([True, False, True, True, True])
    assert_identical(poisoned.detach()[keep], clean.detach()[keep])
    for key, value in optimizers[0].state[clean].items():
        if torch.is_tensor(value):
            assert_identical(optimizers[1].state[poisoned][key][keep], value[keep], key)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(("name", "shape"), [*((name, (5,)) for name in READS_ACROSS_ELEMENTS), ("muon", (1, 5))])
def test_a_non_finite_grad_reaches_every_element_where_the_math_reads_them_all(
    name: str, shape: tuple[int, ...], bad: float
) -> None:
    # Without a GradScaler (which skips such steps: test_amp) the bad grad propagates, as in each reference;
    # here it cannot stay in its element. What each does with it:
    optimizers, clean, poisoned = poisoned_run(name, bad, shape, steps=6)  # Prodigy's d grows from step 3
    keep = torch.tensor([True, False, True, True, True])
    others, clean_others = poisoned.detach().view(-1)[keep], clean.detach().view(-1)[keep]
    assert not bool(poisoned.detach().view(-1)[1].isfinite())
    if name in ("adafactor", "muon"):
        # The update's RMS (Adafactor's clipping) and the orthogonalization (Muon's) are NaN: the whole param is.
        assert bool(poisoned.detach().isnan().all())
        return
    assert bool(others.isfinite().all()) and not torch.equal(others, clean_others)
    group = optimizers[1].param_groups[0]
    if name == "prodigy":
        # The estimate's numerator is NaN from then on, and d, as in prodigyopt, never grows past d0 again.
        assert math.isnan(group["d_numerator"]) and group["d"] == group["d0"] < optimizers[0].param_groups[0]["d"]
    elif math.isnan(bad):  # LAMB: the global norm is NaN, so no clipping (the clean run's grads are clipped),
        # and the trust ratio, of NaN norms, is 1 (apex's: where both norms are > 0, else 1).
        assert group["grad_divisor"] == 1.0 < optimizers[0].param_groups[0]["grad_divisor"]
    else:  # LAMB, an inf: the global norm is inf, every grad is divided by it, and only the decay moves the rest.
        assert group["grad_divisor"] == math.inf
        assert bool((optimizers[1].state[poisoned]["exp_avg"].view(-1)[keep] == 0).all())


# --------------------------------------------------------------------------------------------------
# Arguments of the wrong type or out of range: TypeError or ValueError naming the argument


def betas_arity(name: str) -> int:
    """How many betas optimizer `name` takes: 2, or 3 for AdEMAMix; 0 if it takes none."""
    return len(describe(name).defaults.get("betas", ()))


def eps_is_a_pair(name: str) -> bool:
    """Whether `eps` is Adafactor's pair (eps1, eps2) rather than one number."""
    return isinstance(describe(name).defaults.get("eps"), tuple)


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
    ("stochastic_rounding", "yes", TypeError),
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
    0: [],
}
"""Betas of the wrong length, range or type: a pair for most, a triple for AdEMAMix, none for Adafactor
and Muon (`muon`'s AdamW takes `adamw_betas`)."""
BAD_EPS_PAIR: list[tuple[str, Any, type[Exception]]] = [
    ("eps", 1e-8, TypeError),
    ("eps", (None, -1.0), ValueError),
    ("eps", (-1e-30, 1e-3), ValueError),
    ("eps", (1e-30,), ValueError),
    ("eps", (None, "1e-3"), TypeError),
]
"""Adafactor's eps, torch's pair (eps1, eps2), in place of BAD_ARGUMENTS' single numbers."""
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
    "prodigy": [
        ("d0", 0.0, ValueError),
        ("d0", "1e-6", TypeError),
        ("d_coef", -1.0, ValueError),
        ("growth_rate", 0.5, ValueError),
        ("slice_p", 0, ValueError),
        ("slice_p", 1.5, TypeError),
        ("beta3", 1.0, ValueError),
        ("beta3", "0.99", TypeError),
        ("use_bias_correction", 1, TypeError),
        ("safeguard_warmup", "no", TypeError),
        ("fsdp_in_use", None, TypeError),
        ("decouple", 1, TypeError),
    ],
    "lamb": [
        ("max_grad_norm", -1.0, ValueError),
        ("max_grad_norm", "1", TypeError),
        ("use_nvlamb", 1, TypeError),
        ("adam_w_mode", "yes", TypeError),
        ("grad_averaging", None, TypeError),
        ("bias_correction", 0, TypeError),
    ],
    "adafactor": [
        ("d", 0.5, ValueError),
        ("d", "1", TypeError),
        ("beta2_decay", 0.5, ValueError),
        ("beta2_decay", None, TypeError),
    ],
    "muon": [
        ("momentum", 1.0, ValueError),
        ("momentum", "0.9", TypeError),
        ("nesterov", 1, TypeError),
        ("ns_steps", 100, ValueError),
        ("ns_steps", 2.5, TypeError),
        ("adjust_lr_fn", "x", ValueError),
        ("adjust_lr_fn", 1, TypeError),
        ("ns_dtype", torch.float16, ValueError),
        ("exclude", ["no_such_param"], ValueError),
        ("muon_lr", -1.0, ValueError),
        ("muon_lr", "0.02", TypeError),
        ("adamw_betas", (0.9, 1.0), ValueError),
        ("adamw_betas", (0.9,), ValueError),
        ("adamw_eps", -1.0, ValueError),
    ],
}
CASES = [
    (name, *case)
    for name in NAMES
    for case in (
        [c for c in BAD_ARGUMENTS if not (eps_is_a_pair(name) and c[0] == "eps")]
        + BAD_BETAS[betas_arity(name)]
        + (BAD_EPS_PAIR if eps_is_a_pair(name) else [])
        + SPECIFIC_BAD_ARGUMENTS[name]
    )
    if case[0] in describe(name).defaults or case[0] in CommonOptions.__annotations__  # Lion takes no eps
]
NAMED_AS = {("muon", "muon_lr"): "lr", ("muon", "adamw_betas"): "betas", ("muon", "adamw_eps"): "eps"}
"""Where the error does not name the argument given: muon_with_adamw hands these on as Muon's `lr` and AdamW's
`betas` and `eps`, whose checks name those."""
CONSTRUCTOR_ONLY = ("decouple", "exclude", "muon_lr", "adamw_betas", "adamw_eps")
"""ADOPT's and Prodigy's `decouple` pick the weight decay's mode at construction, and muon_with_adamw's split
and its arguments for one side are no group keys (its AdamW groups' are `betas` and `eps`: MUON_ADAMW_GROUPS)."""
MUON_ADAMW_GROUPS: list[tuple[str, Any, type[Exception]]] = [
    ("betas", (0.9, 1.0), ValueError),
    ("betas", 0.9, TypeError),
    ("eps", -1.0, ValueError),
]
GROUP_CASES = [case for case in CASES if case[1] not in CONSTRUCTOR_ONLY] + [
    ("muon", *case) for case in MUON_ADAMW_GROUPS
]


def new_group(name: str, argument: str, value: Any) -> dict[str, Any]:
    """A param group with `argument: value`; for `muon`, a matrix for Muon or, with AdamW's keys, a vector."""
    if name != "muon":
        return {"params": [torch.zeros(3, requires_grad=True)], argument: value}
    to_muon = argument not in ("betas", "eps")
    shape = (3, 3) if to_muon else (3,)
    return {"params": [torch.zeros(shape, requires_grad=True)], "use_muon": to_muon, argument: value}


@pytest.mark.parametrize(("name", "argument", "value", "error"), CASES)
def test_a_bad_argument_names_itself(name: str, argument: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=NAMED_AS.get((name, argument), argument)):
        make_optimizer(name, [torch.zeros(2, requires_grad=True)], **{argument: value})


@pytest.mark.parametrize(("name", "argument", "value", "error"), GROUP_CASES)
def test_a_bad_param_group_names_itself_and_is_not_added(
    name: str, argument: str, value: Any, error: type[Exception]
) -> None:
    optimizer = make_optimizer(name, [torch.zeros(2, requires_grad=True)])
    before = snapshot(optimizer)
    with pytest.raises(error, match=argument):
        optimizer.add_param_group(new_group(name, argument, value))
    assert_identical(snapshot(optimizer), before)


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_argument_is_refused(name: str) -> None:
    unknown = "betas" if "momentum" in describe(name).defaults else "momentum"  # Muon's momentum is its own
    with pytest.raises(TypeError, match=unknown):
        make_optimizer(name, [torch.zeros(2, requires_grad=True)], **{unknown: 0.9})


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
