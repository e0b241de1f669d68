"""Numerics: every optimizer against independent implementations, every parameter after every step.

All runs are float64, `STEPS` (60) steps, on the MLP and on Rosenbrock (`conftest.py`), relative
tolerance 1e-10 unless a reason is written beside a looser one. The references:

* `torch.optim` (Adam, AdamW, Adam(amsgrad=True), RAdam), single-tensor path (`foreach=False`);
* `adabelief_pytorch.AdaBelief` 0.2.x, the official AdaBelief;
* `sophia_opt.SophiaG`, the official Sophia-G;
* `torch.optim.Adam`/`AdamW` under `LambdaLR` with our schedule functions;
* the float64 loops of `reference.py`, written from the papers (eps-hat form, L1 and absolute decay, ...).

The largest deviation against each reference is printed in the terminal summary.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import adabelief_pytorch
import numpy as np
import pytest
import sophia_opt
import torch

import adaptopt
import reference as ref
from adaptopt import (
    AdaBelief,
    Adam,
    AdamWarmup,
    AdamWarmupCosineDecay,
    AMSGrad,
    Noam,
    RAdam,
    Sophia,
    WeightDecay,
    functional,
    schedules,
)
from conftest import (
    BATCH,
    OPTIMIZER_CLASSES,
    PROBLEMS,
    STEPS,
    Problem,
    ReferenceRun,
    TorchRun,
    matrix_shape,
    relative_deviation,
)

pytestmark = pytest.mark.usefixtures("single_thread")

LR = 1e-2
DECAY = 0.05
Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def two_groups(params: list[torch.Tensor], **second: Any) -> list[dict[str, Any]]:
    """The first parameter in one group, the rest in another with the given overrides."""
    return [{"params": params[:1]}, {"params": params[1:], **second}]


# --------------------------------------------------------------------------------------------------
# torch.optim


TORCH_CASES: dict[str, tuple[Factory, Factory]] = {
    "adam": (
        lambda p: Adam(p, lr=LR, optimized_update=False, eps=1e-8),
        lambda p: torch.optim.Adam(p, lr=LR, eps=1e-8, foreach=False),
    ),
    "adam-betas-eps": (
        lambda p: Adam(p, lr=LR, betas=(0.8, 0.99), optimized_update=False, eps=1e-3),
        lambda p: torch.optim.Adam(p, lr=LR, betas=(0.8, 0.99), eps=1e-3, foreach=False),
    ),
    "adamw": (
        lambda p: Adam(p, lr=LR, optimized_update=False, eps=1e-8, weight_decay=WeightDecay(DECAY)),
        lambda p: torch.optim.AdamW(p, lr=LR, eps=1e-8, weight_decay=DECAY, foreach=False),
    ),
    "adam-l2": (
        lambda p: Adam(
            p, lr=LR, optimized_update=False, eps=1e-8, weight_decay=WeightDecay(DECAY, weight_decouple=False)
        ),
        lambda p: torch.optim.Adam(p, lr=LR, eps=1e-8, weight_decay=DECAY, foreach=False),
    ),
    "adam-amsgrad": (
        lambda p: Adam(p, lr=LR, optimized_update=False, eps=1e-8, amsgrad=True),
        lambda p: torch.optim.Adam(p, lr=LR, eps=1e-8, amsgrad=True, foreach=False),
    ),
    "amsgrad": (
        lambda p: AMSGrad(p, lr=LR, optimized_update=False, eps=1e-8),
        lambda p: torch.optim.Adam(p, lr=LR, eps=1e-8, amsgrad=True, foreach=False),
    ),
    "amsgrad-adamw": (
        lambda p: AMSGrad(p, lr=LR, optimized_update=False, eps=1e-8, weight_decay=WeightDecay(DECAY)),
        lambda p: torch.optim.AdamW(p, lr=LR, eps=1e-8, amsgrad=True, weight_decay=DECAY, foreach=False),
    ),
    "adam-maximize": (
        lambda p: Adam(p, lr=LR, optimized_update=False, eps=1e-8, maximize=True),
        lambda p: torch.optim.Adam(p, lr=LR, eps=1e-8, maximize=True, foreach=False),
    ),
    "adam-l2-maximize": (
        lambda p: Adam(
            p,
            lr=LR,
            optimized_update=False,
            eps=1e-8,
            maximize=True,
            weight_decay=WeightDecay(DECAY, weight_decouple=False),
        ),
        lambda p: torch.optim.Adam(p, lr=LR, eps=1e-8, maximize=True, weight_decay=DECAY, foreach=False),
    ),
    "adamw-two-groups": (
        lambda p: Adam(
            two_groups(p, lr=3e-3, weight_decay=0.0), lr=LR, optimized_update=False, eps=1e-8, weight_decay=DECAY
        ),
        lambda p: torch.optim.AdamW(
            two_groups(p, lr=3e-3, weight_decay=0.0), lr=LR, eps=1e-8, weight_decay=DECAY, foreach=False
        ),
    ),
    "radam": (
        lambda p: RAdam(p, lr=LR),
        lambda p: torch.optim.RAdam(p, lr=LR, foreach=False),
    ),
    "radam-betas-eps": (
        lambda p: RAdam(p, lr=LR, betas=(0.8, 0.99), eps=1e-3),
        lambda p: torch.optim.RAdam(p, lr=LR, betas=(0.8, 0.99), eps=1e-3, foreach=False),
    ),
    "radam-decoupled": (
        lambda p: RAdam(p, lr=LR, weight_decay=WeightDecay(DECAY)),
        lambda p: torch.optim.RAdam(p, lr=LR, weight_decay=DECAY, decoupled_weight_decay=True, foreach=False),
    ),
    "radam-float-decay-is-decoupled": (
        lambda p: RAdam(p, lr=LR, weight_decay=DECAY),
        lambda p: torch.optim.RAdam(p, lr=LR, weight_decay=DECAY, decoupled_weight_decay=True, foreach=False),
    ),
    "radam-two-groups-maximize": (
        lambda p: RAdam(two_groups(p, betas=(0.8, 0.99), eps=1e-3), lr=LR, maximize=True),
        lambda p: torch.optim.RAdam(two_groups(p, betas=(0.8, 0.99), eps=1e-3), lr=LR, maximize=True, foreach=False),
    ),
    "radam-coupled": (
        lambda p: RAdam(p, lr=LR, weight_decay=WeightDecay(DECAY, weight_decouple=False)),
        lambda p: torch.optim.RAdam(p, lr=LR, weight_decay=DECAY, foreach=False),
    ),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_matches_torch_optim(problem: Problem, compare_runs: Any, case: str) -> None:
    ours, theirs = TORCH_CASES[case]
    ours_run, theirs_run = TorchRun(problem, ours), TorchRun(problem, theirs)
    compare_runs(ours_run, theirs_run, reference="torch.optim")
    assert_same_state(ours_run, theirs_run, {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})


def assert_same_state(ours: TorchRun, theirs: TorchRun, names: set[str]) -> None:
    """The moments, under their shared names, agree at the end of the run as the params did at every step."""
    for mine, other in zip(ours.params, theirs.params, strict=True):
        my_state, their_state = ours.optimizer.state[mine], theirs.optimizer.state[other]
        shared = names & my_state.keys()
        assert shared and shared == names & their_state.keys()
        for name in shared:
            deviation = relative_deviation(my_state[name], their_state[name])
            assert deviation <= 1e-10, f"state {name!r}: relative deviation {deviation:.3g}"
        assert my_state["step"] == int(their_state["step"]) == STEPS


def test_torch_optim_comparison_can_fail(problem: Problem) -> None:
    """The harness notices a difference as small as moving eps: the eps-hat form is not torch's."""
    ours = TorchRun(problem, lambda p: Adam(p, lr=LR, optimized_update=True, eps=1e-3))
    theirs = TorchRun(problem, lambda p: torch.optim.Adam(p, lr=LR, eps=1e-3, foreach=False))
    for step in range(STEPS):
        ours.advance(step)
        theirs.advance(step)
    worst = max(relative_deviation(a, b) for a, b in zip(ours.params, theirs.params, strict=True))
    assert worst > 1e-6


# --------------------------------------------------------------------------------------------------
# adabelief_pytorch (the official AdaBelief)


def official_adabelief(params: list[torch.Tensor], **kwargs: Any) -> adabelief_pytorch.AdaBelief:
    # It prints a change log and its settings even with print_change_log=False.
    with contextlib.redirect_stdout(io.StringIO()):
        return adabelief_pytorch.AdaBelief(params, weight_decouple=True, print_change_log=False, **kwargs)


ADABELIEF_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (our kwargs, their kwargs); lr, betas and eps are added to both.
    "rectify": ({"rectify": True}, {"rectify": True}),
    "no-rectify": ({"rectify": False}, {"rectify": False}),
    "rectify-no-sgd": ({"rectify": True, "degenerate_to_sgd": False}, {"rectify": True, "degenerated_to_sgd": False}),
    "rectify-decay": ({"weight_decay": WeightDecay(DECAY)}, {"rectify": True, "weight_decay": DECAY}),
    "no-rectify-decay": (
        {"rectify": False, "weight_decay": WeightDecay(DECAY)},
        {"rectify": False, "weight_decay": DECAY},
    ),
    "fixed-decay-is-absolute": (
        {"weight_decay": WeightDecay(DECAY, absolute=True)},
        {"rectify": True, "weight_decay": DECAY, "fixed_decay": True},
    ),
    # Their running maximum is only used for the denominator when rectify=False (see adabelief.py).
    "amsgrad-no-rectify": ({"rectify": False, "amsgrad": True}, {"rectify": False, "amsgrad": True}),
    "amsgrad-no-rectify-decay": (
        {"rectify": False, "amsgrad": True, "weight_decay": WeightDecay(DECAY)},
        {"rectify": False, "amsgrad": True, "weight_decay": DECAY},
    ),
}


@pytest.mark.parametrize("eps", [1e-16, 1e-6])
@pytest.mark.parametrize("case", sorted(ADABELIEF_CASES))
def test_matches_official_adabelief(problem: Problem, compare_runs: Any, case: str, eps: float) -> None:
    ours_kwargs, theirs_kwargs = ADABELIEF_CASES[case]
    common = {"lr": LR, "betas": (0.9, 0.999), "eps": eps}
    ours = TorchRun(problem, lambda p: AdaBelief(p, **common, **ours_kwargs))
    theirs = TorchRun(problem, lambda p: official_adabelief(p, **common, **theirs_kwargs))
    compare_runs(ours, theirs, reference="adabelief_pytorch")
    assert_same_state(ours, theirs, {"exp_avg", "exp_avg_var", "max_exp_avg_var"})


# --------------------------------------------------------------------------------------------------
# sophia_opt (the official Sophia-G)

HESSIAN_EVERY = 5
SOPHIA_BATCH = BATCH  # B: the examples in the batch the Hessian estimate was computed on


def our_sophia_run(problem: Problem, make_optimizer: Factory, **options: Any) -> TorchRun:
    """Our Sophia in Sophia-G's training loop: `update_hessian(B)` after every k-th step."""

    def update_hessian(optimizer: Any) -> None:
        optimizer.update_hessian(SOPHIA_BATCH)

    return TorchRun(problem, make_optimizer, hessian_every=HESSIAN_EVERY, update_hessian=update_hessian, **options)


def official_sophia_run(problem: Problem, make_optimizer: Factory) -> TorchRun:
    """The official loop: `step(bs=B)` every step, `update_hessian()` after every k-th."""

    def update_hessian(optimizer: Any) -> None:
        optimizer.update_hessian()

    return TorchRun(
        problem,
        make_optimizer,
        step_kwargs={"bs": SOPHIA_BATCH},
        hessian_every=HESSIAN_EVERY,
        update_hessian=update_hessian,
    )


@pytest.mark.parametrize(
    ("decay", "rho", "maximize"), [(0.0, 0.04, False), (0.1, 0.04, False), (0.0, 1.0, False), (0.1, 1.0, True)]
)
def test_matches_official_sophia(problem: Problem, compare_runs: Any, decay: float, rho: float, maximize: bool) -> None:
    betas = (0.965, 0.99)
    clipped = {True: 0, False: 0}

    def count_clipped(optimizer: Any) -> None:
        for state in optimizer.state.values():
            ratio = state["exp_avg"].abs() / (rho * (state["hessian"] + 1e-15 / rho))
            clipped[True] += int((ratio >= 1).sum())
            clipped[False] += int((ratio < 1).sum())

    ours = our_sophia_run(
        problem,
        # Their denominator is rho * B * h + 1e-15, ours rho * (B h + eps): eps = 1e-15 / rho makes them one.
        lambda p: Sophia(
            p, lr=LR, betas=betas, rho=rho, eps=1e-15 / rho, weight_decay=WeightDecay(decay), maximize=maximize
        ),
        after_step=count_clipped,
    )
    theirs = official_sophia_run(
        problem, lambda p: sophia_opt.SophiaG(p, lr=LR, betas=betas, rho=rho, weight_decay=decay, maximize=maximize)
    )
    compare_runs(ours, theirs, reference="sophia_opt")
    assert_same_state(ours, theirs, {"exp_avg"})
    # Their hessian is ours divided by B (they multiply by B at every step instead).
    for mine, other in zip(ours.params, theirs.params, strict=True):
        their_hessian = SOPHIA_BATCH * theirs.optimizer.state[other]["hessian"]
        assert relative_deviation(ours.optimizer.state[mine]["hessian"], their_hessian) <= 1e-10
    # Both branches of the clip, min(|m| / (rho (h + eps)), 1), were taken and compared.
    assert clipped[True] > 0 and clipped[False] > 0, clipped


# --------------------------------------------------------------------------------------------------
# torch.optim.Adam / AdamW under LambdaLR with our schedule functions

WARMUP = 10
SCHEDULE_CASES: dict[str, tuple[Factory, Callable[[int], float], dict[str, Any]]] = {
    # name: (ours, schedule function of k for LambdaLR, torch kwargs)
    "warmup": (
        lambda p: AdamWarmup(p, lr=LR, warmup=WARMUP, optimized_update=False, eps=1e-8),
        partial(schedules.linear_warmup, warmup=WARMUP),
        {},
    ),
    "warmup-0": (
        lambda p: AdamWarmup(p, lr=LR, warmup=0, optimized_update=False, eps=1e-8),
        partial(schedules.linear_warmup, warmup=0),
        {},
    ),
    "cosine": (
        lambda p: AdamWarmupCosineDecay(p, lr=LR, warmup=WARMUP, total_steps=40, optimized_update=False, eps=1e-8),
        partial(schedules.warmup_cosine_decay, warmup=WARMUP, total_steps=40),
        {},
    ),
    "noam": (
        lambda p: Noam(p, lr=1.0, warmup=WARMUP, d_model=16, optimized_update=False, eps=1e-8),
        partial(schedules.noam, warmup=WARMUP, d_model=16),
        {},
    ),
    "noam-no-warmup": (
        lambda p: Noam(p, lr=0.5, warmup=0, d_model=16, optimized_update=False, eps=1e-8),
        partial(schedules.noam, warmup=0, d_model=16),
        {},
    ),
    "noam-amsgrad": (
        lambda p: Noam(p, lr=1.0, warmup=WARMUP, d_model=16, optimized_update=False, eps=1e-8, amsgrad=True),
        partial(schedules.noam, warmup=WARMUP, d_model=16),
        {"amsgrad": True},
    ),
    "warmup-adamw": (
        lambda p: AdamWarmup(
            p, lr=LR, warmup=WARMUP, optimized_update=False, eps=1e-8, weight_decay=WeightDecay(DECAY)
        ),
        partial(schedules.linear_warmup, warmup=WARMUP),
        {"weight_decay": DECAY, "decoupled": True},
    ),
    "cosine-adamw": (
        lambda p: AdamWarmupCosineDecay(
            p, lr=LR, warmup=WARMUP, total_steps=40, optimized_update=False, eps=1e-8, weight_decay=DECAY
        ),
        partial(schedules.warmup_cosine_decay, warmup=WARMUP, total_steps=40),
        {"weight_decay": DECAY, "decoupled": True},
    ),
    "noam-adamw": (
        lambda p: Noam(p, lr=1.0, warmup=WARMUP, d_model=16, optimized_update=False, eps=1e-8, weight_decay=DECAY),
        partial(schedules.noam, warmup=WARMUP, d_model=16),
        {"weight_decay": DECAY, "decoupled": True},
    ),
    "cosine-l2": (
        lambda p: AdamWarmupCosineDecay(
            p,
            lr=LR,
            warmup=WARMUP,
            total_steps=40,
            optimized_update=False,
            eps=1e-8,
            weight_decay=WeightDecay(DECAY, weight_decouple=False),
        ),
        partial(schedules.warmup_cosine_decay, warmup=WARMUP, total_steps=40),
        {"weight_decay": DECAY},
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEDULE_CASES))
def test_schedules_match_torch_lambda_lr(problem: Problem, compare_runs: Any, case: str) -> None:
    ours, factor, torch_kwargs = SCHEDULE_CASES[case]
    torch_kwargs = dict(torch_kwargs)
    torch_class = torch.optim.AdamW if torch_kwargs.pop("decoupled", False) else torch.optim.Adam
    base_lr = ours([torch.zeros(1)]).defaults["lr"]
    torch_kwargs.setdefault("weight_decay", 0.0)

    def theirs(p: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch_class(p, lr=base_lr, eps=1e-8, foreach=False, **torch_kwargs)

    compare_runs(
        TorchRun(problem, ours),
        TorchRun(problem, theirs, make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, factor)),
        reference="torch.optim + LambdaLR",
    )


@pytest.mark.parametrize(
    ("ours", "paper"),
    [
        (partial(schedules.linear_warmup, warmup=0), ref.constant),
        (partial(schedules.linear_warmup, warmup=1), partial(ref.linear_warmup, warmup=1)),
        (partial(schedules.linear_warmup, warmup=7), partial(ref.linear_warmup, warmup=7)),
        (
            partial(schedules.warmup_cosine_decay, warmup=7, total_steps=30),
            partial(ref.cosine_with_warmup, warmup=7, total_steps=30),
        ),
        (
            partial(schedules.warmup_cosine_decay, warmup=0, total_steps=50),
            partial(ref.cosine_with_warmup, warmup=0, total_steps=50),
        ),
        (partial(schedules.noam, warmup=7, d_model=64), partial(ref.noam, warmup=7, d_model=64)),
        (partial(schedules.noam, warmup=0, d_model=64), partial(ref.noam, warmup=0, d_model=64)),
        (schedules.constant, ref.constant),
    ],
    ids=["warmup-0", "warmup-1", "warmup-7", "cosine", "cosine-no-warmup", "noam", "noam-no-warmup", "constant"],
)
def test_schedule_functions_match_papers(ours: Callable[[int], float], paper: Callable[[int], float]) -> None:
    # schedules take k = steps already taken (LambdaLR's convention); the papers count the update t = k + 1.
    for k in range(100):
        assert ours(k) == pytest.approx(paper(k + 1), rel=1e-12, abs=0.0), f"k={k}"


@pytest.mark.parametrize("beta2", [0.9, 0.99, 0.999, 0.9999])
def test_rectification_term_matches_the_paper(beta2: float) -> None:
    """r_t from Liu et al. (2020), Algorithm 2, with torch's threshold rho_t > 5 and AdaBelief's rho_t >= 5."""
    tractable_steps = 0
    for t in range(1, 400):
        rho_t, r_t = ref.rectifier(beta2, t)
        for inclusive, tractable in ((False, rho_t > 5.0), (True, rho_t >= 5.0)):
            ours = functional.rectification(beta2, t, inclusive=inclusive)
            if tractable:
                assert ours == pytest.approx(r_t, rel=1e-12, abs=0.0), f"t={t}"
            else:
                assert ours is None, f"t={t}: rho_t = {rho_t} is not past the threshold"
        tractable_steps += rho_t > 5.0
    # Both sides of the threshold were seen.
    assert 0 < tractable_steps < 399


def test_cosine_schedule_reaches_its_floor_and_warmup_its_peak() -> None:
    assert schedules.warmup_cosine_decay(WARMUP - 1, warmup=WARMUP, total_steps=40) == 1.0
    assert schedules.warmup_cosine_decay(39, warmup=WARMUP, total_steps=40) == 0.1
    assert schedules.warmup_cosine_decay(1000, warmup=WARMUP, total_steps=40) == 0.1
    assert schedules.linear_warmup(0, warmup=WARMUP) == 1 / WARMUP
    # Noam peaks at t = w.
    values = [schedules.noam(k, warmup=WARMUP, d_model=16) for k in range(3 * WARMUP)]
    assert max(range(len(values)), key=values.__getitem__) == WARMUP - 1


# --------------------------------------------------------------------------------------------------
# The float64 reference loops of reference.py

EPS = 1e-3  # large enough that where eps sits (torch's form or the eps-hat form) changes the result
REFERENCE_CASES: dict[str, tuple[Factory, Callable[[], ref.Reference]]] = {
    "adam-eps-hat": (lambda p: Adam(p, lr=LR, eps=EPS), lambda: ref.Adam(LR, eps=EPS, eps_hat=True)),
    "adam-torch-form": (
        lambda p: Adam(p, lr=LR, eps=EPS, optimized_update=False),
        lambda: ref.Adam(LR, eps=EPS, eps_hat=False),
    ),
    "adam-defaults": (lambda p: Adam(p, lr=LR), lambda: ref.Adam(LR, eps=1e-16, eps_hat=True)),
    "adam-maximize": (
        lambda p: Adam(p, lr=LR, eps=EPS, maximize=True),
        lambda: ref.Adam(LR, eps=EPS, eps_hat=True, maximize=True),
    ),
    "amsgrad-eps-hat": (
        lambda p: AMSGrad(p, lr=LR, eps=EPS),
        lambda: ref.Adam(LR, eps=EPS, eps_hat=True, amsgrad=True),
    ),
    "amsgrad-torch-form": (
        lambda p: AMSGrad(p, lr=LR, eps=EPS, optimized_update=False),
        lambda: ref.Adam(LR, eps=EPS, eps_hat=False, amsgrad=True),
    ),
    "radam": (lambda p: RAdam(p, lr=LR, eps=EPS), lambda: ref.RAdam(LR, eps=EPS, eps_hat=True)),
    "radam-torch-form": (
        lambda p: RAdam(p, lr=LR, eps=EPS, optimized_update=False),
        lambda: ref.RAdam(LR, eps=EPS, eps_hat=False),
    ),
    "radam-no-sgd": (
        lambda p: RAdam(p, lr=LR, eps=EPS, degenerate_to_sgd=False),
        lambda: ref.RAdam(LR, eps=EPS, eps_hat=True, degenerate_to_sgd=False),
    ),
    "radam-torch-form-no-sgd": (
        lambda p: RAdam(p, lr=LR, eps=EPS, optimized_update=False, degenerate_to_sgd=False),
        lambda: ref.RAdam(LR, eps=EPS, eps_hat=False, degenerate_to_sgd=False),
    ),
    "radam-amsgrad": (
        lambda p: RAdam(p, lr=LR, eps=EPS, amsgrad=True),
        lambda: ref.RAdam(LR, eps=EPS, eps_hat=True, amsgrad=True),
    ),
    "adabelief": (lambda p: AdaBelief(p, lr=LR), lambda: ref.AdaBelief(LR)),
    "adabelief-eps": (lambda p: AdaBelief(p, lr=LR, eps=1e-6), lambda: ref.AdaBelief(LR, eps=1e-6)),
    "adabelief-no-rectify": (
        lambda p: AdaBelief(p, lr=LR, eps=1e-6, rectify=False),
        lambda: ref.AdaBelief(LR, eps=1e-6, rectify=False),
    ),
    "adabelief-no-sgd": (
        lambda p: AdaBelief(p, lr=LR, degenerate_to_sgd=False),
        lambda: ref.AdaBelief(LR, degenerate_to_sgd=False),
    ),
    "adabelief-amsgrad": (
        lambda p: AdaBelief(p, lr=LR, amsgrad=True),
        lambda: ref.AdaBelief(LR, amsgrad=True),
    ),
    "adabelief-amsgrad-no-rectify": (
        lambda p: AdaBelief(p, lr=LR, amsgrad=True, rectify=False),
        lambda: ref.AdaBelief(LR, amsgrad=True, rectify=False),
    ),
    "adam-warmup": (
        lambda p: AdamWarmup(p, lr=LR, eps=EPS, warmup=WARMUP),
        lambda: ref.Adam(LR, eps=EPS, eps_hat=True, schedule=partial(ref.linear_warmup, warmup=WARMUP)),
    ),
    "adam-warmup-cosine": (
        lambda p: AdamWarmupCosineDecay(p, lr=LR, eps=EPS, warmup=WARMUP, total_steps=40),
        lambda: ref.Adam(
            LR, eps=EPS, eps_hat=True, schedule=partial(ref.cosine_with_warmup, warmup=WARMUP, total_steps=40)
        ),
    ),
    "noam": (
        lambda p: Noam(p, lr=1.0, eps=EPS, warmup=WARMUP, d_model=16),
        lambda: ref.Adam(1.0, eps=EPS, eps_hat=True, schedule=partial(ref.noam, warmup=WARMUP, d_model=16)),
    ),
    "noam-amsgrad-torch-form": (
        lambda p: Noam(p, lr=1.0, eps=EPS, warmup=WARMUP, d_model=16, amsgrad=True, optimized_update=False),
        lambda: ref.Adam(
            1.0, eps=EPS, amsgrad=True, eps_hat=False, schedule=partial(ref.noam, warmup=WARMUP, d_model=16)
        ),
    ),
}

# Every weight-decay mode, as (our policy, the reference's mode).
DECAY_MODES: dict[str, tuple[WeightDecay, ref.Decay]] = {
    "coupled-l2": (WeightDecay(DECAY, weight_decouple=False), ref.Decay(DECAY, "coupled")),
    "decoupled": (WeightDecay(DECAY), ref.Decay(DECAY, "decoupled")),
    "absolute": (WeightDecay(DECAY, absolute=True), ref.Decay(DECAY, "absolute")),
    "l1-coupled": (WeightDecay(DECAY, weight_decouple=False, l1=True), ref.Decay(DECAY, "l1_coupled")),
    "l1-decoupled": (WeightDecay(DECAY, l1=True), ref.Decay(DECAY, "l1_decoupled")),
}

# The optimizers every decay mode is tried with: a schedule (so decoupled decay must use the scheduled lr)
# and one optimizer of each other kind.
DECAYED: dict[str, tuple[Callable[..., torch.optim.Optimizer], Callable[..., ref.Reference]]] = {
    "adam": (partial(Adam, lr=LR, eps=EPS), partial(ref.Adam, LR, eps=EPS, eps_hat=True)),
    "adam-warmup-cosine": (
        partial(AdamWarmupCosineDecay, lr=LR, eps=EPS, warmup=WARMUP, total_steps=40),
        partial(
            ref.Adam, LR, eps=EPS, eps_hat=True, schedule=partial(ref.cosine_with_warmup, warmup=WARMUP, total_steps=40)
        ),
    ),
    "radam": (partial(RAdam, lr=LR, eps=EPS), partial(ref.RAdam, LR, eps=EPS, eps_hat=True)),
    "adabelief": (partial(AdaBelief, lr=LR), partial(ref.AdaBelief, LR)),
    "sophia": (partial(Sophia, lr=LR, rho=0.04), partial(ref.Sophia, LR, rho=0.04)),
}


def reference_runs(problem: Problem, ours: Factory, oracle: ref.Reference) -> tuple[TorchRun, ReferenceRun]:
    """Our optimizer and its oracle; Sophia gets its Hessian estimate every few steps in both."""
    if not isinstance(oracle, ref.Sophia):
        return TorchRun(problem, ours), ReferenceRun(problem, oracle)
    return (
        our_sophia_run(problem, ours),
        ReferenceRun(problem, oracle, hessian_every=HESSIAN_EVERY, batch=SOPHIA_BATCH),
    )


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_matches_reference_loop(problem: Problem, compare_runs: Any, case: str) -> None:
    ours, oracle = REFERENCE_CASES[case]
    compare_runs(*reference_runs(problem, ours, oracle()), reference="reference.py")


@pytest.mark.parametrize("mode", sorted(DECAY_MODES))
@pytest.mark.parametrize("optimizer", sorted(DECAYED))
def test_weight_decay_modes_match_reference_loop(
    problem: Problem, compare_runs: Any, optimizer: str, mode: str
) -> None:
    ours_class, oracle_class = DECAYED[optimizer]
    policy, decay = DECAY_MODES[mode]
    ours_run, oracle_run = reference_runs(problem, partial(ours_class, weight_decay=policy), oracle_class(decay=decay))
    compare_runs(ours_run, oracle_run, reference="reference.py")


@pytest.mark.parametrize("rho", [0.04, 1.0])
def test_sophia_matches_reference_loop(problem: Problem, compare_runs: Any, rho: float) -> None:
    ours = partial(Sophia, lr=LR, rho=rho, betas=(0.965, 0.99), eps=1e-9)
    oracle = ref.Sophia(LR, rho=rho, betas=(0.965, 0.99), eps=1e-9)
    compare_runs(*reference_runs(problem, ours, oracle), reference="reference.py")


ORACLE_CHECKS: dict[str, tuple[Callable[[], ref.Reference], Factory]] = {
    # The oracles themselves, against the independent implementations where the conventions coincide.
    "adam": (lambda: ref.Adam(LR, eps=1e-8), lambda p: torch.optim.Adam(p, lr=LR, eps=1e-8, foreach=False)),
    "adamw": (
        lambda: ref.Adam(LR, eps=1e-8, decay=ref.Decay(DECAY, "decoupled")),
        lambda p: torch.optim.AdamW(p, lr=LR, eps=1e-8, weight_decay=DECAY, foreach=False),
    ),
    "adam-l2-amsgrad": (
        lambda: ref.Adam(LR, eps=1e-8, amsgrad=True, decay=ref.Decay(DECAY, "coupled")),
        lambda p: torch.optim.Adam(p, lr=LR, eps=1e-8, amsgrad=True, weight_decay=DECAY, foreach=False),
    ),
    "radam": (lambda: ref.RAdam(LR, eps=1e-8, eps_hat=True), lambda p: torch.optim.RAdam(p, lr=LR, foreach=False)),
    "adabelief": (lambda: ref.AdaBelief(LR), lambda p: official_adabelief(p, lr=LR)),
    "adabelief-no-rectify": (
        lambda: ref.AdaBelief(LR, eps=1e-6, rectify=False),
        lambda p: official_adabelief(p, lr=LR, eps=1e-6, rectify=False),
    ),
    "sophia": (
        lambda: ref.Sophia(LR, betas=(0.965, 0.99), rho=0.04, eps=1e-15 / 0.04),
        lambda p: sophia_opt.SophiaG(p, lr=LR, betas=(0.965, 0.99), rho=0.04, weight_decay=0.0),
    ),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CHECKS))
def test_reference_loops_agree_with_independent_implementations(problem: Problem, compare_runs: Any, case: str) -> None:
    oracle, independent = ORACLE_CHECKS[case]
    if case == "sophia":
        theirs = official_sophia_run(problem, independent)
        oracle_run = ReferenceRun(problem, oracle(), hessian_every=HESSIAN_EVERY, batch=SOPHIA_BATCH)
    else:
        theirs, oracle_run = TorchRun(problem, independent), ReferenceRun(problem, oracle())
    # compare_runs also asserts that its first run moved the params: the oracle goes first.
    compare_runs(oracle_run, theirs, reference="reference.py vs independent")


FAMILY_TESTS = {
    "Lion": ("test_family.py", "test_lion_equals_lion_pytorch"),
    "ScheduleFreeAdamW": ("test_family.py", "test_schedule_free_equals_schedulefree"),
    "ADOPT": ("test_family.py", "test_adopt_equals_authors_code"),
    "AdEMAMix": ("test_family.py", "test_ademamix_equals_authors_code"),
    "Prodigy": ("test_family.py", "test_prodigy_equals_prodigyopt"),
    "LAMB": ("test_family.py", "test_lamb_equals_apex_algorithm"),
    "Adafactor": ("test_family_matrix.py", "test_adafactor_matches_torch"),
    "Muon": ("test_family_matrix.py", "test_muon_float64_matches_the_float64_loop"),
    "MuonWithAdamW": ("test_family_matrix.py", "test_muon_with_adamw_is_adamw_and_muon_side_by_side"),
}
"""The test, in tests/test_family.py or tests/test_family_matrix.py, that compares each of these with its
official code (or, where that is not on PyPI, a float64 loop written from it)."""


def registered_classes() -> set[str]:
    """The class names of every registered optimizer and, for `muon`'s MuonWithAdamW, of the two it holds."""
    names = set()
    for name in adaptopt.available():
        built = adaptopt.create(name, [torch.zeros(1), torch.zeros(2, 2)])
        names.add(type(built).__name__)
        if isinstance(built, adaptopt.MuonWithAdamW):
            names |= {type(built.muon).__name__, type(built.adamw).__name__}
    return names


def test_every_registered_optimizer_has_a_reference_case() -> None:
    """Adding an optimizer to the registry without an oracle here fails this test."""
    covered = {type(factory([torch.zeros(1)])).__name__ for factory, _ in REFERENCE_CASES.values()}
    covered |= {"Sophia"}  # test_sophia_matches_reference_loop
    # The family beyond the seed is checked in tests/test_family*.py, each against its official code.
    for name, (file, test) in FAMILY_TESTS.items():
        if f"def {test}(" in (Path(__file__).parent / file).read_text():
            covered.add(name)
    registered = registered_classes()
    assert {"Muon", "MuonWithAdamW", "Prodigy", "LAMB", "Adafactor"} <= registered
    assert registered - {"SGD"} <= covered


# --------------------------------------------------------------------------------------------------
# AdaBelief defaults: AMSGrad off (the labml seed's positional arguments turned it on)


def test_adabelief_defaults_run_without_amsgrad(compare_runs: Any) -> None:
    mlp = PROBLEMS["mlp"]
    ours = TorchRun(mlp, lambda p: AdaBelief(p, lr=LR))
    compare_runs(ours, ReferenceRun(mlp, ref.AdaBelief(LR, amsgrad=False)), reference="reference.py")
    optimizer = ours.optimizer
    assert optimizer.defaults["amsgrad"] is False
    assert all("max_exp_avg_var" not in state for state in optimizer.state.values())
    assert len(optimizer.state) == len(ours.params)

    with_amsgrad = ReferenceRun(mlp, ref.AdaBelief(LR, amsgrad=True))
    for step in range(STEPS):
        with_amsgrad.advance(step)
    difference = max(relative_deviation(a, b) for a, b in zip(ours.params, with_amsgrad.params, strict=True))
    assert difference > 1e-6, "AMSGrad makes no difference on this problem, so the test above proves nothing"


# --------------------------------------------------------------------------------------------------
# The step counter and bias corrections whatever the dtypes


@pytest.mark.parametrize("optimizer_class", OPTIMIZER_CLASSES, ids=lambda c: c.__name__)
def test_step_counter_stays_an_int_under_float64_default_dtype(optimizer_class: type) -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        # Muon takes matrices only: a 1 x 3 one.
        shape = matrix_shape(optimizer_class, (3,))
        param = torch.ones(shape, dtype=torch.float32, requires_grad=True)
        optimizer = optimizer_class([param])
        for _ in range(3):
            param.grad = torch.full_like(param, 0.5)
            optimizer.step()
    finally:
        torch.set_default_dtype(previous)
    step = optimizer.state[param]["step"]
    assert type(step) is int and step == 3


@pytest.mark.parametrize(
    ("ours", "oracle"),
    [
        (partial(Adam, optimized_update=False, eps=1e-8), partial(ref.Adam, eps=1e-8, eps_hat=False)),
        (partial(Adam, eps=1e-8), partial(ref.Adam, eps=1e-8, eps_hat=True)),
        (partial(AMSGrad, optimized_update=False, eps=1e-8), partial(ref.Adam, eps=1e-8, amsgrad=True)),
        (partial(RAdam, eps=1e-8), partial(ref.RAdam, eps=1e-8, eps_hat=True)),
        (partial(AdaBelief, eps=1e-8, rectify=False), partial(ref.AdaBelief, eps=1e-8, rectify=False)),
    ],
    ids=["adam-torch-form", "adam-eps-hat", "amsgrad", "radam", "adabelief"],
)
def test_float16_params_keep_bias_corrections_in_float64(ours: Any, oracle: Any) -> None:
    """beta2 = 0.9999 rounds to 1 in float16, so a float16 bias correction 1 - beta2^t would be 0 (inf steps)."""
    betas = (0.9, 0.9999)
    lr = 1e-2
    initial = np.array([0.1, -0.2, 0.3, 0.05])
    gradient = np.array([1.0, -0.5, 0.25, 2.0])
    param = torch.tensor(initial, dtype=torch.float16, requires_grad=True)
    optimizer = ours([param], lr=lr, betas=betas)
    oracle_opt = oracle(lr, betas=betas)
    start = param.detach().double().numpy().copy()  # the float16-rounded initial values
    expected = [start.copy()]
    steps = 8  # RAdam's adaptive branch starts at t = 6 with beta2 = 0.9999
    for t in range(steps):
        grad = gradient * (1.0 + 0.1 * t)
        param.grad = torch.tensor(grad, dtype=torch.float16)
        optimizer.step()
        oracle_opt.step(expected, [torch.tensor(grad, dtype=torch.float16).double().numpy()])
    state = optimizer.state[param]
    assert type(state["step"]) is int and state["step"] == steps
    assert param.dtype == torch.float16
    moved = param.detach().double().numpy() - start
    expected_move = expected[0] - start
    assert np.all(np.isfinite(moved))
    # Each float16 step rounds the parameter by up to half a float16 spacing (about 1.2e-4 near 0.3), so
    # after `steps` steps we can ask for no more than steps * spacing / 2 of agreement; the moves are ~0.08.
    half_spacing = float(np.spacing(np.float16(0.3))) / 2
    np.testing.assert_allclose(moved, expected_move, rtol=0, atol=steps * half_spacing)
    assert np.abs(expected_move).min() > 10 * steps * half_spacing
