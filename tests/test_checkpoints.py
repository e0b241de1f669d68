"""Checkpoints in torch's format: bitwise resume, interop with torch.optim both ways, validated loading.

Every checkpoint goes through `torch.save` and `torch.load(weights_only=True)`, which refuses anything but
tensors and primitives, so these tests also prove that saved param groups hold only primitives (ADOPT's
`clip_lambda`, a function, stays out of its state dict).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

import adaptopt
from adaptopt import WeightDecay
from adaptopt.optimizers.adopt import quarter_power_clip
from dropin_support import (
    NAMES,
    SUMS_IN_ANOTHER_ORDER,
    assert_identical,
    assert_same_params,
    make_model,
    make_optimizer,
    reference_execution,
    snapshot,
    train,
)

pytestmark = pytest.mark.usefixtures("single_thread")

BEFORE, AFTER = 5, 5  # RAdam's rectified branch starts at step 6: the resumed part crosses it.


def through_disk(checkpoint: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


# Plain float64 (the default execution); bf16 params with fp32 master weights (the masters travel in the
# checkpoint); fp32 params with moments stored in bf16; and a checkpoint of the default execution resumed by
# the reference execution.
VARIANTS: dict[str, tuple[torch.dtype, dict[str, Any], dict[str, Any]]] = {
    "float64": (torch.float64, {}, {}),
    "bf16-master-weights": (torch.bfloat16, {"master_weights": True}, {}),
    "bf16-state": (torch.float32, {"state_dtype": torch.bfloat16}, {}),
    "resumed-by-reference": (torch.float64, {}, reference_execution()),
}


# SUMS_IN_ANOTHER_ORDER (Prodigy, LAMB): resumed by the reference loop, their sums go param by param where the
# default execution's went over a bucket (measured after 10 steps: Prodigy's d_numerator one ulp apart, LAMB's
# params 1.3e-16 relative), so there they are compared within 1e-12 of each tensor's scale, the tolerance
# test_execution takes for orders of summation; everywhere else, bitwise.


def assert_close_nested(actual: Any, expected: Any, where: str = "") -> None:
    """`assert_identical`, but floats and float tensors within 1e-12 of their scale."""
    if isinstance(expected, torch.Tensor) and expected.is_floating_point():
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        scale = max(float(expected.abs().max()), 1e-300) if expected.numel() else 1.0
        assert float((actual - expected).abs().max()) <= 1e-12 * scale if expected.numel() else True, where
    elif isinstance(expected, float):
        assert isinstance(actual, float) and actual == pytest.approx(expected, rel=1e-12, abs=0), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: keys differ"
        for key in expected:
            assert_close_nested(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{where}: lengths differ"
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close_nested(a, e, f"{where}[{index}]")
    else:
        assert_identical(actual, expected, where)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bitwise_identical_to_never_stopping(name: str, variant: str) -> None:
    dtype, options, resumed_options = VARIANTS[variant]
    uninterrupted = make_model(dtype)
    optimizer = make_optimizer(name, uninterrupted.parameters(), **options)
    train(uninterrupted, optimizer, range(BEFORE))
    checkpoint = through_disk({"model": uninterrupted.state_dict(), "optimizer": optimizer.state_dict()})
    train(uninterrupted, optimizer, range(BEFORE, BEFORE + AFTER))

    resumed = make_model(dtype, seed=1)  # different initial values: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    fresh = make_optimizer(name, resumed.parameters(), **options, **resumed_options)
    fresh.load_state_dict(checkpoint["optimizer"])
    train(resumed, fresh, range(BEFORE, BEFORE + AFTER))

    if variant == "resumed-by-reference" and name in SUMS_IN_ANOTHER_ORDER:
        assert_close_nested(dict(resumed.state_dict()), dict(uninterrupted.state_dict()), "params")
        assert_close_nested(fresh.state_dict(), optimizer.state_dict(), "state_dict")
    else:
        assert_same_params(resumed, uninterrupted)
        assert_identical(fresh.state_dict(), optimizer.state_dict())
    if name == "sophia":
        assert all(bool(s["hessian"].abs().sum() > 0) for s in fresh.state.values()), "the Hessian was never set"
    if "master_weights" in options:
        assert all(s["master_weight"].dtype == torch.float32 for s in fresh.state.values())


# torch.optim optimizer and the adaptopt optimizer that computes the same thing (docs/drop-in.md, section
# "Checkpoints", "Interop, both ways").
Factory = Callable[[Any], torch.optim.Optimizer]
TORCH_TWINS: dict[str, tuple[Factory, Factory]] = {
    "Adam": (
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: adaptopt.Adam(p, lr=1e-2, optimized_update=False, eps=1e-8),
    ),
    "Adam-L2": (
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
        lambda p: adaptopt.Adam(
            p, lr=1e-2, optimized_update=False, eps=1e-8, weight_decay=WeightDecay(0.1, weight_decouple=False)
        ),
    ),
    "AdamW": (
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: adaptopt.Adam(p, lr=1e-2, optimized_update=False, eps=1e-8, weight_decay=WeightDecay(0.1)),
    ),
    "Adam-amsgrad": (
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
        lambda p: adaptopt.AMSGrad(p, lr=1e-2, optimized_update=False, eps=1e-8),
    ),
    "RAdam": (
        lambda p: torch.optim.RAdam(p, lr=1e-2),
        lambda p: adaptopt.RAdam(p, lr=1e-2),
    ),
}


def assert_continues_alike(actual: torch.nn.Module, expected: torch.nn.Module, twin: str) -> None:
    if twin != "RAdam":
        assert_same_params(actual, expected)
        return
    # torch.optim.RAdam computes r_t in another order of operations: a few ulp per step (test_numerics).
    for a, e in zip(actual.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=0)


def hand_over(
    make_first: Factory, make_second: Factory
) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Train with `make_first`, checkpoint, train on; resume the checkpoint with `make_second`, train on.

    Returns both models, the second optimizer and the checkpoint.
    """
    first_model = make_model()
    first = make_first(first_model.parameters())
    train(first_model, first, range(BEFORE))
    checkpoint = through_disk({"model": first_model.state_dict(), "optimizer": first.state_dict()})
    train(first_model, first, range(BEFORE, BEFORE + AFTER))

    second_model = make_model(seed=1)
    second_model.load_state_dict(checkpoint["model"])
    second = make_second(second_model.parameters())
    second.load_state_dict(checkpoint["optimizer"])
    steps_at_load = [state["step"] for state in second.state.values()]
    train(second_model, second, range(BEFORE, BEFORE + AFTER))
    return first_model, second_model, second, {**checkpoint, "steps_at_load": steps_at_load}


@pytest.mark.parametrize("twin", sorted(TORCH_TWINS))
def test_torch_checkpoint_loads_into_ours_and_training_continues_identically(twin: str) -> None:
    make_theirs, make_ours = TORCH_TWINS[twin]
    theirs_model, ours_model, _, checkpoint = hand_over(make_theirs, make_ours)
    assert isinstance(checkpoint["optimizer"]["state"][0]["step"], torch.Tensor)  # torch's float32 step
    # The step becomes an int again, so the bias corrections stay in float64 arithmetic.
    assert all(type(step) is int and step == BEFORE for step in checkpoint["steps_at_load"])
    assert_continues_alike(ours_model, theirs_model, twin)


@pytest.mark.parametrize("twin", sorted(TORCH_TWINS))
def test_our_checkpoint_loads_into_torch_and_training_continues_identically(twin: str) -> None:
    make_theirs, make_ours = TORCH_TWINS[twin]
    ours_model, theirs_model, theirs, _ = hand_over(make_ours, make_theirs)
    assert all(isinstance(state["step"], torch.Tensor) for state in theirs.state.values())
    assert_continues_alike(theirs_model, ours_model, twin)


# --------------------------------------------------------------------------------------------------
# Rejection: a clear ValueError, and the optimizer exactly as it was


def another_optimizer(name: str) -> str:
    """An optimizer whose state has other keys than `name`'s."""
    return "adam" if name == "sophia" else "sophia"


def first_state_tensor(state: dict[str, Any]) -> str:
    """The name of the first state tensor (`exp_avg` for most, `z` for Schedule-Free)."""
    return next(key for key, value in state.items() if torch.is_tensor(value))


def parts(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers whose state dicts make up `optimizer`'s: MuonWithAdamW's Muon and AdamW, or itself."""
    if isinstance(optimizer, adaptopt.MuonWithAdamW):
        return [optimizer.muon, optimizer.adamw]
    return [optimizer]


def split_in_two_groups(name: str, params: list[torch.Tensor], part: str) -> torch.optim.Optimizer:
    """An optimizer over `params` in two groups (for `muon`, two in its `part`, one in the other)."""
    if name != "muon":
        return make_optimizer(name, [{"params": params[:2]}, {"params": params[2:]}])
    # The model's params: weight, bias, weight, bias; Muon takes the weights, AdamW the biases.
    last = params[2] if part == "muon" else params[3]
    split = make_optimizer(name, [param for param in params if param is not last])
    split.add_param_group({"params": [last], "use_muon": part == "muon"})
    return split


def corrupt(name: str, case: str, part: str = "") -> tuple[Callable[[], torch.optim.Optimizer], dict[str, Any], str]:
    """A trained optimizer, a checkpoint that must not load into it, and what the error must say. For `muon`,
    `part` says which of the two state dicts in its checkpoint (Muon's or AdamW's) does not fit."""
    model = make_model()
    optimizer = make_optimizer(name, model.parameters())
    train(model, optimizer, range(3))
    checkpoint = copy.deepcopy(optimizer.state_dict())
    # What is corrupted: the first group, or for MuonWithAdamW the first of its part (Muon's groups come first).
    group = len(optimizer.muon.param_groups) if part == "adamw" else 0  # type: ignore[attr-defined]
    first_state = checkpoint["state"][checkpoint["param_groups"][group]["params"][0]]
    params = list(model.parameters())
    target: Callable[[], torch.optim.Optimizer] = lambda: optimizer  # noqa: E731
    if case == "other-optimizer":
        other_model = make_model()
        other = make_optimizer(another_optimizer(name), other_model.parameters())
        train(other_model, other, range(2))
        # AdEMAMix's groups have three betas, Adafactor's eps is a pair: the other's groups are refused before
        # its state is looked at; MuonWithAdamW's state dict holds two.
        message = {
            "ademamix": "betas must be a triple",
            "adafactor": r"eps must be a pair \(eps1, eps2\)",
            "muon": "state_dict has 1 param groups, this optimizer has 2",
        }.get(name, "does not fit")
        return target, copy.deepcopy(other.state_dict()), message
    if case == "group-count":
        # The same trained state, in an optimizer over two groups (copies of the states of the same params: a
        # deepcopy of the whole mapping would copy its keys, the params, too).
        split = split_in_two_groups(name, params, part)
        for split_part, trained in zip(parts(split), parts(optimizer), strict=True):
            split_part.state.update({param: copy.deepcopy(state) for param, state in trained.state.items()})
        groups = len(checkpoint["param_groups"])
        return lambda: split, checkpoint, f"{groups} param groups, this optimizer has {groups + 1}"
    if case == "param-count":
        checkpoint["param_groups"][group]["params"] = checkpoint["param_groups"][group]["params"][:-1]
        return target, checkpoint, "params"
    if case == "shape":
        first_state[first_state_tensor(first_state)] = torch.zeros(3, dtype=torch.float64)
        return target, checkpoint, "shape"
    if case == "missing-key":
        key = first_state_tensor(first_state)
        del first_state[key]
        return target, checkpoint, f"missing keys \\['{key}'\\]"
    if case == "bad-step":
        first_state["step"] = 2.5
        return target, checkpoint, "step"
    if case == "bad-hyper-parameter":
        # A pair out of range; Adafactor and Muon have no betas, and do not check their own keys when loading
        # (a checkpoint with d=0.5 or momentum=1.5 loads), so theirs is a negative lr.
        key, value = {"adafactor": ("lr", -1.0), "muon": ("lr", -1.0)}.get(part or name, ("betas", (1.5, 0.999)))
        checkpoint["param_groups"][group][key] = value
        return target, checkpoint, key
    if case == "not-a-state-dict":
        del checkpoint["state"]
        return target, checkpoint, "'state' and 'param_groups'"
    raise AssertionError(case)


REJECTIONS = [
    "other-optimizer",
    "group-count",
    "param-count",
    "shape",
    "missing-key",
    "bad-step",
    "bad-hyper-parameter",
    "not-a-state-dict",
]


REJECTION_CASES = [
    pytest.param(name, case, part, id=f"{name}{'-' + part if part else ''}-{case}")
    for name in NAMES
    for part in (("muon", "adamw") if name == "muon" else ("",))
    for case in REJECTIONS
    if not (part == "adamw" and case in ("other-optimizer", "not-a-state-dict"))
]
"""Every optimizer and way not to fit; in `muon`'s checkpoint (MuonWithAdamW's) Muon's groups or AdamW's do not fit,
and either leaves both as they were (AdamW's part is loaded after Muon's, which is rolled back)."""


@pytest.mark.parametrize(("name", "case", "part"), REJECTION_CASES)
def test_a_checkpoint_that_does_not_fit_is_rejected_and_changes_nothing(name: str, case: str, part: str) -> None:
    target, checkpoint, message = corrupt(name, case, part)
    optimizer = target()
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(checkpoint)
    assert_identical(snapshot(optimizer), before)


# --------------------------------------------------------------------------------------------------
# Dtypes and devices


@pytest.mark.parametrize("name", NAMES)
def test_loading_keeps_fp32_state_of_low_precision_params(name: str) -> None:
    # torch.optim.Optimizer.load_state_dict casts state to the param's dtype; with master weights the
    # state and the masters of bf16 params are fp32 and must arrive bit for bit.
    model = make_model(torch.bfloat16)
    optimizer = make_optimizer(name, model.parameters(), master_weights=True)
    train(model, optimizer, range(3))
    checkpoint = through_disk(optimizer.state_dict())
    assert all(v.dtype == torch.float32 for s in checkpoint["state"].values() for v in s.values() if torch.is_tensor(v))

    fresh = make_optimizer(name, make_model(torch.bfloat16).parameters(), master_weights=True)
    fresh.load_state_dict(checkpoint)
    assert_identical(fresh.state_dict()["state"], checkpoint["state"])


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_without_masters_gets_masters_from_the_params(name: str) -> None:
    model = make_model(torch.bfloat16)
    optimizer = make_optimizer(name, model.parameters())
    train(model, optimizer, range(3))
    fresh = make_optimizer(name, model.parameters(), master_weights=True)
    fresh.load_state_dict(through_disk(optimizer.state_dict()))
    for param in model.parameters():
        state, saved = fresh.state[param], optimizer.state[param]
        assert_identical(state["master_weight"], param.detach().float())
        for key in saved:
            if key != "step":  # bf16 state widened to fp32: exact
                assert_identical(state[key], saved[key].float(), key)


DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_loads_onto_another_device(name: str, device: str) -> None:
    model = make_model()
    optimizer = make_optimizer(name, model.parameters())
    train(model, optimizer, range(3))
    checkpoint = through_disk(optimizer.state_dict())

    elsewhere = make_model().to(device)
    moved = make_optimizer(name, elsewhere.parameters())
    moved.load_state_dict(checkpoint)
    pairs = list(
        zip(
            [param for group in moved.param_groups for param in group["params"]],
            checkpoint["state"].values(),
            strict=True,
        )
    )
    assert len(pairs) == len(list(elsewhere.parameters()))
    for param, saved in pairs:
        state = moved.state[param]
        assert state.keys() == saved.keys()
        for key, value in saved.items():
            if torch.is_tensor(value):
                assert state[key].device == param.device and state[key].shape == value.shape, key
                if device != "meta":
                    assert_identical(state[key].cpu(), value, key)


def test_a_complex_param_loads_torch_complex_state() -> None:
    # torch.optim keeps a complex param's state complex; ours is its view_as_real twin.
    param = torch.randn(4, dtype=torch.complex128, requires_grad=True)
    theirs = torch.optim.Adam([param], lr=1e-2)
    param.grad = torch.randn_like(param)
    theirs.step()
    ours = adaptopt.Adam([param], lr=1e-2, optimized_update=False, eps=1e-8)
    ours.load_state_dict(through_disk(theirs.state_dict()))
    assert_identical(ours.state[param]["exp_avg"], torch.view_as_real(theirs.state[param]["exp_avg"]))


# --------------------------------------------------------------------------------------------------
# Per-group state (Schedule-Free's with its modes, Prodigy's, LAMB's), and ADOPT's function in the groups

GROUP_STATE = ("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr")


def two_group_schedule_free(model: torch.nn.Module) -> torch.optim.Optimizer:
    first, *rest = model.parameters()
    return make_optimizer("schedule_free_adamw", [{"params": [first], "lr": 3e-3, "warmup_steps": 2}, {"params": rest}])


def test_schedule_free_group_state_travels_in_the_checkpoint_and_resumes_bitwise() -> None:
    model = make_model()
    optimizer = two_group_schedule_free(model)
    train(model, optimizer, range(BEFORE))
    checkpoint = through_disk({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    saved_groups = checkpoint["optimizer"]["param_groups"]
    assert [group["k"] for group in saved_groups] == [BEFORE, BEFORE]
    assert [group["lr_max"] for group in saved_groups] == [3e-3, 1e-2]  # each group its own warm-up and peak
    assert all(group["train_mode"] is True and group["weight_sum"] > 0 for group in saved_groups)
    train(model, optimizer, range(BEFORE, BEFORE + AFTER))

    resumed = make_model(seed=1)
    resumed.load_state_dict(checkpoint["model"])
    fresh = two_group_schedule_free(resumed)
    assert all(group["k"] == 0 for group in fresh.param_groups)
    fresh.load_state_dict(checkpoint["optimizer"])
    for group, saved in zip(fresh.param_groups, saved_groups, strict=True):
        assert_identical({key: group[key] for key in GROUP_STATE}, {key: saved[key] for key in GROUP_STATE})
    train(resumed, fresh, range(BEFORE, BEFORE + AFTER))
    assert_same_params(resumed, model)
    assert_identical(fresh.state_dict(), optimizer.state_dict())
    assert [group["k"] for group in fresh.param_groups] == [BEFORE + AFTER] * 2


def test_schedule_free_checkpoint_taken_in_eval_mode_resumes_bitwise_after_train() -> None:
    # The usual place of a checkpoint: after evaluating, with the model at the averaged point x.
    model = make_model()
    optimizer = make_optimizer("schedule_free_adamw", model.parameters())
    train(model, optimizer, range(BEFORE))
    training_point = [p.detach().clone() for p in model.parameters()]
    optimizer.eval()  # type: ignore[attr-defined]
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), training_point, strict=True))
    checkpoint = through_disk({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    assert all(group["train_mode"] is False for group in checkpoint["optimizer"]["param_groups"])
    optimizer.train()  # type: ignore[attr-defined]
    train(model, optimizer, range(BEFORE, BEFORE + AFTER))

    resumed = make_model(seed=1)
    resumed.load_state_dict(checkpoint["model"])
    fresh = make_optimizer("schedule_free_adamw", resumed.parameters())
    fresh.load_state_dict(checkpoint["optimizer"])
    with pytest.raises(RuntimeError, match="eval mode"):
        fresh.step()
    fresh.train()  # type: ignore[attr-defined]
    train(resumed, fresh, range(BEFORE, BEFORE + AFTER))
    assert_same_params(resumed, model)
    assert_identical(fresh.state_dict(), optimizer.state_dict())


PRODIGY_GROUP_STATE = ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k", "dlr")


def two_group_prodigy(model: torch.nn.Module) -> torch.optim.Optimizer:
    # One lr for both (Prodigy's rule); the first group without decay and with its own eps.
    first, *rest = model.parameters()
    return make_optimizer("prodigy", [{"params": [first], "weight_decay": 0.0, "eps": 1e-6}, {"params": rest}])


def test_prodigy_group_state_travels_in_the_checkpoint_and_resumes_bitwise() -> None:
    # d and its sums are the optimizer's, kept in (and shared by) every group: a checkpoint must carry them.
    model = make_model()
    optimizer = two_group_prodigy(model)
    train(model, optimizer, range(BEFORE))
    checkpoint = through_disk({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    saved_groups = checkpoint["optimizer"]["param_groups"]
    first, second = ({key: group[key] for key in PRODIGY_GROUP_STATE} for group in saved_groups)
    assert first == second and first["k"] == BEFORE
    assert first["d"] > 2 * saved_groups[0]["d0"] and first["d_max"] >= first["d"]  # d has grown from d0
    assert first["d_numerator"] > 0 and first["d_denom"] > 0 and first["dlr"] > 0
    train(model, optimizer, range(BEFORE, BEFORE + AFTER))

    resumed = make_model(seed=1)
    resumed.load_state_dict(checkpoint["model"])
    fresh = two_group_prodigy(resumed)
    assert all(group["k"] == 0 and group["d"] == group["d0"] for group in fresh.param_groups)
    fresh.load_state_dict(checkpoint["optimizer"])
    for group, saved in zip(fresh.param_groups, saved_groups, strict=True):
        assert_identical(
            {key: group[key] for key in PRODIGY_GROUP_STATE}, {key: saved[key] for key in PRODIGY_GROUP_STATE}
        )
    train(resumed, fresh, range(BEFORE, BEFORE + AFTER))
    assert_same_params(resumed, model)
    assert_identical(fresh.state_dict(), optimizer.state_dict())
    assert [group["k"] for group in fresh.param_groups] == [BEFORE + AFTER] * 2


def test_lamb_clipping_divisor_travels_in_the_checkpoint() -> None:
    # LAMB's per-group state is the step's global-norm divisor, set by the first pass of every step.
    model = make_model()
    optimizer = make_optimizer("lamb", model.parameters())
    train(model, optimizer, range(BEFORE))
    saved = through_disk(optimizer.state_dict())
    assert saved["param_groups"][0]["grad_divisor"] > 1.0  # the clipping acted (max_grad_norm 0.5)
    fresh = make_optimizer("lamb", make_model(seed=1).parameters())
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["grad_divisor"] == saved["param_groups"][0]["grad_divisor"]


def clip_at_one(step: int) -> float:
    return 1.0


def test_an_adopt_checkpoint_loads_with_torch_defaults_and_keeps_the_loaders_clip() -> None:
    # clip_lambda is a function: not data. The checkpoint leaves it out; the optimizer that loads it keeps its own.
    model = make_model()
    optimizer = make_optimizer("adopt", model.parameters())
    train(model, optimizer, range(3))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # torch's default: weights_only=True
    assert all("clip_lambda" not in group for group in loaded["param_groups"])
    assert optimizer.param_groups[0]["clip_lambda"] is quarter_power_clip
    fresh = make_optimizer("adopt", make_model().parameters(), clip_lambda=clip_at_one)
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["clip_lambda"] is clip_at_one
