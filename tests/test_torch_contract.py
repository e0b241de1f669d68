"""The rest of the torch.optim contract: LR schedulers, hooks, maximize, complex params, zero_grad,
clip_grad_norm_ and models under torch.compile, for every adaptopt optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import adaptopt
from dropin_support import (
    BATCH,
    HESSIAN_EVERY,
    NAMES,
    assert_identical,
    assert_same_params,
    make_model,
    make_optimizer,
    snapshot,
    train,
)

pytestmark = pytest.mark.usefixtures("single_thread")

lr_scheduler = torch.optim.lr_scheduler
STEPS = 8


def has_beta1(optimizer: torch.optim.Optimizer) -> bool:
    """Whether torch's schedulers can cycle a momentum: `betas` or `momentum` in the defaults. Adafactor has
    neither (nor has torch.optim.Adafactor), and MuonWithAdamW's groups have both, Muon's `momentum` and
    AdamW's `betas`, under an Optimizer with no defaults of its own: OneCycleLR and CyclicLR then need
    `cycle_momentum=False`, as they do with torch.optim.Adafactor."""
    return "betas" in optimizer.defaults or "momentum" in optimizer.defaults


def beta1(group: dict[str, Any]) -> float | None:
    return float(group["betas"][0]) if "betas" in group else None


# ReduceLROnPlateau watches a metric: it improves, stalls twice (patience 1), improves, stalls again.
METRICS = [1.0, 0.9, 0.95, 0.97, 0.8, 0.85, 0.86, 0.87]

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda k: 0.9),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda k: 1.0 / (k + 1)),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=6, power=2.0),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    # OneCycleLR and CyclicLR cycle beta1 as well as the learning rate.
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS, cycle_momentum=has_beta1(o)),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(
        o,
        base_lr=1e-3,
        max_lr=1e-2,
        step_size_up=2,
        base_momentum=0.8,
        max_momentum=0.9,
        cycle_momentum=has_beta1(o),
    ),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, 0.7)], [3]
    ),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ExponentialLR(o, gamma=0.9), lr_scheduler.StepLR(o, step_size=3, gamma=0.5)]
    ),
    "SWALR": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.05, anneal_epochs=3),
}
assert set(lr_scheduler.__all__) - {"LRScheduler"} <= set(SCHEDULERS), "a torch scheduler is not tested"


def train_scheduled(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, make_scheduler: Callable[[torch.optim.Optimizer], Any]
) -> list[tuple[float, float | None]]:
    """Train under the scheduler; return the (lr, beta1) of the first group the scheduler set for each step
    (beta1 None where the first group has no betas: Adafactor's, Muon's)."""
    scheduler = make_scheduler(optimizer)
    settings = []
    for step in range(STEPS):
        group = optimizer.param_groups[0]
        settings.append((float(group["lr"]), beta1(group)))
        train(model, optimizer, range(step, step + 1))
        if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
            scheduler.step(METRICS[step])
        else:
            scheduler.step()
    return settings


def torch_adam_twin(params: Any) -> torch.optim.Optimizer:
    return adaptopt.Adam(params, lr=1e-2, optimized_update=False, eps=1e-8)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_a_scheduler_drives_adam_exactly_as_it_drives_torch_adam(scheduler: str) -> None:
    theirs_model, ours_model = make_model(), make_model()
    theirs_settings = train_scheduled(
        theirs_model, torch.optim.Adam(theirs_model.parameters(), lr=1e-2), SCHEDULERS[scheduler]
    )
    ours_settings = train_scheduled(ours_model, torch_adam_twin(ours_model.parameters()), SCHEDULERS[scheduler])
    assert ours_settings == theirs_settings
    assert len(set(ours_settings)) > 1, "the schedule never changed anything"
    assert_same_params(ours_model, theirs_model)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", NAMES)
def test_a_scheduler_drives_every_optimizer(name: str, scheduler: str) -> None:
    # The schedule torch.optim.Adam sees, replayed by hand into a twin, must equal the scheduler's effect. Where
    # the optimizer has no beta1 to cycle (Adafactor, MuonWithAdamW: see `has_beta1`), the lrs alone.
    scheduled_model, replayed_model = make_model(), make_model()
    scheduled = make_optimizer(name, scheduled_model.parameters(), lr=1e-2)
    cycles = has_beta1(scheduled)
    torch_model = make_model()
    torch_adam = torch.optim.Adam(torch_model.parameters(), lr=1e-2)
    settings = train_scheduled(torch_model, torch_adam, SCHEDULERS[scheduler])
    if not cycles:
        settings = [(lr, None) for lr, _ in settings]
    assert train_scheduled(scheduled_model, scheduled, SCHEDULERS[scheduler]) == settings
    replayed = make_optimizer(name, replayed_model.parameters(), lr=1e-2)
    for step, (lr, first_beta) in enumerate(settings):
        for group in replayed.param_groups:  # every group: MuonWithAdamW's are Muon's and AdamW's
            group["lr"] = lr
            if first_beta is not None:
                group["betas"] = (first_beta, *group["betas"][1:])
        train(replayed_model, replayed, range(step, step + 1))
    assert_same_params(scheduled_model, replayed_model)
    # And the schedule took effect: without it the run ends elsewhere.
    unscheduled_model = make_model()
    train(unscheduled_model, make_optimizer(name, unscheduled_model.parameters(), lr=1e-2), range(STEPS))
    assert any(
        not torch.equal(p, q) for p, q in zip(unscheduled_model.parameters(), scheduled_model.parameters(), strict=True)
    )


# --------------------------------------------------------------------------------------------------
# Hooks


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_run_around_the_step(name: str) -> None:
    model = make_model()
    optimizer = make_optimizer(name, model.parameters())
    first = next(model.parameters())
    seen: list[tuple[str, torch.Tensor]] = []
    pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(("pre", first.detach().clone())))
    post = optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append(("post", first.detach().clone())))
    before = first.detach().clone()
    train(model, optimizer, range(1))
    assert [when for when, _ in seen] == ["pre", "post"]
    assert torch.equal(seen[0][1], before) and torch.equal(seen[1][1], first.detach())
    assert not torch.equal(before, first.detach())
    pre.remove()
    post.remove()
    train(model, optimizer, range(1, 2))
    assert len(seen) == 2


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks_can_observe_and_rewrite(name: str) -> None:
    model = make_model()
    optimizer = make_optimizer(name, model.parameters())
    train(model, optimizer, range(2))
    calls: list[str] = []

    def after_saving(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        calls.append("saved")
        return {**state_dict, "note": "written by a hook"}

    def before_loading(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        calls.append("loading")
        groups = [{**group, "lr": 0.125} for group in state_dict["param_groups"]]
        return {"state": state_dict["state"], "param_groups": groups}

    def after_loading(opt: torch.optim.Optimizer) -> None:
        calls.append(f"loaded lr={opt.param_groups[0]['lr']} states={len(opt.state)}")

    # On MuonWithAdamW too: its hooks run around the whole, whatever its Muon and AdamW run on their parts.
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("saving"))
    optimizer.register_state_dict_post_hook(after_saving)
    state_dict = optimizer.state_dict()
    assert state_dict["note"] == "written by a hook"

    fresh = make_optimizer(name, model.parameters())
    fresh.register_load_state_dict_pre_hook(before_loading)
    fresh.register_load_state_dict_post_hook(after_loading)
    fresh.load_state_dict(state_dict)
    assert calls == ["saving", "saved", "loading", "loaded lr=0.125 states=4"]
    assert all(group["lr"] == 0.125 for group in fresh.param_groups)


# --------------------------------------------------------------------------------------------------
# maximize, complex params


def negated(loss: torch.Tensor) -> None:
    (-loss).backward()


@pytest.mark.parametrize("name", NAMES)
def test_maximize_ascends_what_minimize_descends(name: str) -> None:
    ascending, descending = make_model(), make_model()
    train(ascending, make_optimizer(name, ascending.parameters(), maximize=True), range(STEPS), backward=negated)
    train(descending, make_optimizer(name, descending.parameters()), range(STEPS))
    assert_same_params(ascending, descending)


MAXIMIZE_TWINS: dict[str, tuple[Callable[[Any], torch.optim.Optimizer], Callable[[Any], torch.optim.Optimizer]]] = {
    "Adam": (
        lambda p: torch.optim.Adam(p, lr=1e-2, maximize=True),
        lambda p: adaptopt.Adam(p, lr=1e-2, optimized_update=False, eps=1e-8, maximize=True),
    ),
    "AMSGrad": (
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, maximize=True),
        lambda p: adaptopt.AMSGrad(p, lr=1e-2, optimized_update=False, eps=1e-8, maximize=True),
    ),
    "RAdam": (
        lambda p: torch.optim.RAdam(p, lr=1e-2, maximize=True),
        lambda p: adaptopt.RAdam(p, lr=1e-2, maximize=True),
    ),
}


@pytest.mark.parametrize("twin", sorted(MAXIMIZE_TWINS))
def test_maximize_equals_torch_maximize(twin: str) -> None:
    make_theirs, make_ours = MAXIMIZE_TWINS[twin]
    theirs_model, ours_model = make_model(), make_model()
    train(theirs_model, make_theirs(theirs_model.parameters()), range(STEPS))
    train(ours_model, make_ours(ours_model.parameters()), range(STEPS))
    for ours, theirs in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
        # torch.optim.RAdam computes r_t in another order of operations: a few ulp (test_numerics).
        torch.testing.assert_close(ours, theirs, rtol=0 if twin != "RAdam" else 1e-13, atol=0)


def complex_loss(z: torch.Tensor, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    weights = torch.randn(z.shape, dtype=torch.complex128, generator=generator)
    target = torch.randn(z.shape, dtype=torch.complex128, generator=generator)
    return (z * weights - target).abs().pow(2).sum() + z.real.pow(3).sum() * 0.1


REFUSES_COMPLEX = ("adafactor",)
"""Adafactor refuses complex params (its real twin would gain a dim of 2 and be factored over it; torch's
raises at the first step): the test below checks the refusal. `muon` gives them to its AdamW, as Muon
optimizes real matrices only (test_core)."""


@pytest.mark.parametrize("name", NAMES)
def test_a_complex_param_follows_its_view_as_real_twin(name: str) -> None:
    start = torch.randn(4, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(7))
    z = start.clone().requires_grad_()
    twin = torch.view_as_real(start).clone().requires_grad_()
    if name in REFUSES_COMPLEX:
        with pytest.raises(ValueError, match=r"does not support complex params, got a torch.complex128 param"):
            make_optimizer(name, [z])
        return
    if name == "muon":
        assert make_optimizer(name, [z]).adamw.param_groups[0]["params"] == [z]  # type: ignore[attr-defined]
    optimizers = [make_optimizer(name, [z]), make_optimizer(name, [twin])]
    for step in range(STEPS):
        for optimizer, leaf, as_complex in zip(optimizers, (z, twin), (False, True), strict=True):
            optimizer.zero_grad()
            complex_loss(torch.view_as_complex(leaf) if as_complex else leaf, step).backward()
            optimizer.step()
            if name == "sophia" and step % HESSIAN_EVERY == 1:
                optimizer.update_hessian(BATCH)  # type: ignore[attr-defined]
    assert_identical(torch.view_as_real(z.detach()), twin.detach())
    assert not torch.equal(z.detach(), start)


# --------------------------------------------------------------------------------------------------
# zero_grad, clip_grad_norm_, torch.compile


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_set_to_none_skips_params_and_zeros_do_not(name: str) -> None:
    model = make_model()
    optimizer = make_optimizer(name, model.parameters())
    train(model, optimizer, range(2))
    before = snapshot(optimizer)
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    after = snapshot(optimizer)
    # Per-group state counts the optimizer's steps, not the params': Schedule-Free's k and weight sum advance
    # on a step without grads, as in the official schedulefree.AdamWScheduleFree. Nothing else changes.
    group_state = tuple(getattr(type(optimizer), "group_state", {}))
    for groups in (before["groups"], after["groups"]):
        for index, group in enumerate(groups):
            groups[index] = {key: value for key, value in group.items() if key not in group_state}
    assert_identical(after, before)
    # Zeroed grads are grads: the step is taken (the moments decay, the step counts), as in torch.optim.
    train(model, optimizer, range(2, 3))
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    steps = [state["step"] for state in optimizer.state.values()]
    optimizer.step()
    assert [state["step"] for state in optimizer.state.values()] == [step + 1 for step in steps]


def test_zeroed_grads_step_as_in_torch_adam() -> None:
    theirs_model, ours_model = make_model(), make_model()
    theirs, ours = torch.optim.Adam(theirs_model.parameters(), lr=1e-2), torch_adam_twin(ours_model.parameters())
    for model, optimizer in ((theirs_model, theirs), (ours_model, ours)):
        train(model, optimizer, range(3))
        optimizer.zero_grad(set_to_none=False)
        optimizer.step()
    assert_same_params(ours_model, theirs_model)


def clip_then_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, norms: list[float]) -> Callable[[], None]:
    def step() -> None:
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)))
        optimizer.step()

    return step


def test_clip_grad_norm_between_backward_and_step() -> None:
    theirs_model, ours_model = make_model(), make_model()
    theirs, ours = torch.optim.Adam(theirs_model.parameters(), lr=1e-2), torch_adam_twin(ours_model.parameters())
    theirs_norms: list[float] = []
    ours_norms: list[float] = []
    train(theirs_model, theirs, range(STEPS), optimizer_step=clip_then_step(theirs_model, theirs, theirs_norms))
    train(ours_model, ours, range(STEPS), optimizer_step=clip_then_step(ours_model, ours, ours_norms))
    assert ours_norms == theirs_norms and min(ours_norms) > 0.05, "the clipping never acted"
    assert_same_params(ours_model, theirs_model)


@pytest.mark.parametrize("name", ["adam", "sophia"])
def test_a_compiled_model_trains_as_the_eager_one(name: str) -> None:
    eager = make_model()
    compiled_model = make_model()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    train(eager, make_optimizer(name, eager.parameters()), range(STEPS))
    train(compiled, make_optimizer(name, compiled.parameters()), range(STEPS))  # type: ignore[arg-type]
    for ours, expected in zip(compiled_model.parameters(), eager.parameters(), strict=True):
        # AOT autograd may order the backward's reductions differently: float64 rounding only.
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)
