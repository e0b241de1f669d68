"""Shared test problems and the lock-step harness that compares two optimizers after every step.

Two problems, both in float64 and fully deterministic:

* `mlp`: a 5-7-3 tanh MLP with cross-entropy on fixed random batches (one per step);
* `rosenbrock`: $(1 - x)^2 + 100 (y - x^2)^2$ from $(-1.5, 2)$, two scalar parameters.

A `Run` advances one optimizer by one step on a problem; `compare_runs` advances two runs side by side and
checks every parameter after every step. The largest deviation against each reference is collected and
printed at the end of the session (`pytest -s` not needed: it goes to the terminal summary).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adaptopt
from adaptopt import compiled, torch_internals
from reference import Reference, Sophia

OPTIMIZER_CLASSES = [
    adaptopt.Adam,
    adaptopt.AMSGrad,
    adaptopt.AdamWarmup,
    adaptopt.AdamWarmupCosineDecay,
    adaptopt.Noam,
    adaptopt.RAdam,
    adaptopt.AdaBelief,
    adaptopt.Sophia,
    adaptopt.Lion,
    adaptopt.ADOPT,
    adaptopt.AdEMAMix,
    adaptopt.ScheduleFreeAdamW,
    adaptopt.Prodigy,
    adaptopt.LAMB,
    adaptopt.Adafactor,
    adaptopt.Muon,
]
"""Every optimizer class of ours (the registry's names without torch's `sgd`). The registry's `muon` is the
factory `muon_with_adamw`, whose `MuonWithAdamW` is no `GenericAdaptiveOptimizer` but a pair of them, Muon
for the matrices and `Adam` for the rest: the class of ours it adds is `Muon`, which takes 2-D params only
(`matrix_shape` gives a test's vector its 2-D twin)."""


def matrix_shape(optimizer_class: type, shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` itself, or for Muon, which optimizes matrices only, a matrix of as many elements: `(1, n)`."""
    if optimizer_class is adaptopt.Muon and len(shape) != 2:
        return (1, max(1, torch.Size(shape).numel()))
    return shape


STEPS = 60
BATCH = 12
FEATURES, HIDDEN, CLASSES = 5, 7, 3


@dataclass(frozen=True)
class Problem:
    """A deterministic objective: initial parameters, the loss at each step and Sophia's sampled loss."""

    name: str
    initial: Callable[[], list[torch.Tensor]]
    loss: Callable[[Sequence[torch.Tensor], int], torch.Tensor]
    sampled_loss: Callable[[Sequence[torch.Tensor], int], torch.Tensor]


def _mlp_problem() -> Problem:
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(STEPS, BATCH, FEATURES, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (STEPS, BATCH), generator=generator)
    shapes = [(HIDDEN, FEATURES), (HIDDEN,), (CLASSES, HIDDEN), (CLASSES,)]
    initial_values = [0.5 * torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]

    def logits(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
        w1, b1, w2, b2 = params
        return torch.tanh(inputs[step] @ w1.T + b1) @ w2.T + b2

    def loss(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
        return F.cross_entropy(logits(params, step), labels[step])

    def sampled_loss(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
        # Sophia-G's Gauss-Newton-Bartlett estimate: labels drawn from the model's own predictions.
        out = logits(params, step)
        sampler = torch.Generator().manual_seed(10_000 + step)
        sampled = torch.multinomial(out.detach().softmax(dim=-1), 1, generator=sampler).squeeze(-1)
        return F.cross_entropy(out, sampled)

    return Problem("mlp", lambda: [v.clone() for v in initial_values], loss, sampled_loss)


def _rosenbrock_problem() -> Problem:
    def loss(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
        x, y = params
        return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2

    def initial() -> list[torch.Tensor]:
        return [torch.tensor(-1.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)]

    # No labels to sample: the curvature proxy is the squared gradient of the objective itself.
    return Problem("rosenbrock", initial, loss, loss)


@pytest.fixture(autouse=True)
def torch_internals_restored() -> Any:
    """A test that makes adaptopt give up a torch internal (`torch_internals.lose`) gives it back afterwards:
    losing one is for the rest of the process, and the tests after it must see the fast paths whole. What was
    found is looked up again, as a test may have patched it."""
    lost = dict(torch_internals._lost)
    yield
    torch_internals._found.clear()
    if torch_internals._lost != lost:
        torch_internals.reset()
        compiled._row_caller = None


@pytest.fixture
def single_thread() -> Any:
    """One intra-op thread while a test runs: these tensors are tiny, and on a loaded 2-core machine the
    thread pool's synchronisation made each step 40 times slower than the arithmetic."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


PROBLEMS = {problem.name: problem for problem in (_mlp_problem(), _rosenbrock_problem())}


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request: pytest.FixtureRequest) -> Problem:
    return PROBLEMS[request.param]


def gradients(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(params)))


# --------------------------------------------------------------------------------------------------
# Runs: one optimizer, advanced one step at a time


class Run:
    """An optimizer on a problem; `advance(step)` takes the step-th update; `params` are float64 tensors."""

    problem: Problem
    params: list[torch.Tensor]

    def advance(self, step: int) -> None:
        raise NotImplementedError


class TorchRun(Run):
    """A `torch.optim.Optimizer` (ours or anyone's), optionally with an LR scheduler or Sophia's Hessian loop.

    `hessian_every=k` estimates the Hessian after every k-th step, as Sophia's training loop does;
    `update_hessian(optimizer)` is called with the sampled grads already in `p.grad`; `after_step(optimizer)`
    after every step, to look at the state.
    """

    def __init__(
        self,
        problem: Problem,
        make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
        *,
        make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        step_kwargs: dict[str, Any] | None = None,
        hessian_every: int = 0,
        update_hessian: Callable[[torch.optim.Optimizer], None] | None = None,
        after_step: Callable[[torch.optim.Optimizer], None] | None = None,
    ) -> None:
        self.problem = problem
        self.params = [p.requires_grad_() for p in problem.initial()]
        self.optimizer = make_optimizer(self.params)
        self.scheduler = make_scheduler(self.optimizer) if make_scheduler else None
        self.step_kwargs = step_kwargs or {}
        self.hessian_every = hessian_every
        self.update_hessian = update_hessian
        self.after_step = after_step

    def _set_grads(self, loss: torch.Tensor) -> None:
        for param, grad in zip(self.params, gradients(loss, self.params), strict=True):
            param.grad = grad

    def advance(self, step: int) -> None:
        self._set_grads(self.problem.loss(self.params, step))
        self.optimizer.step(**self.step_kwargs)
        if self.after_step is not None:
            self.after_step(self.optimizer)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.hessian_every and step % self.hessian_every == self.hessian_every - 1:
            assert self.update_hessian is not None
            self._set_grads(self.problem.sampled_loss(self.params, step))
            self.update_hessian(self.optimizer)


class ReferenceRun(Run):
    """A float64 reference loop from `reference.py`; the grads come from autograd on copies of its params."""

    def __init__(self, problem: Problem, optimizer: Reference, *, hessian_every: int = 0, batch: int = 0) -> None:
        self.problem = problem
        self.arrays = [p.numpy().copy() for p in problem.initial()]
        self.optimizer = optimizer
        self.hessian_every = hessian_every
        self.batch = batch

    @property  # type: ignore[override]
    def params(self) -> list[torch.Tensor]:
        return [torch.from_numpy(a) for a in self.arrays]

    def _grads(self, loss_fn: Callable[[Sequence[torch.Tensor], int], torch.Tensor], step: int) -> list[np.ndarray]:
        leaves = [torch.tensor(a, requires_grad=True) for a in self.arrays]
        return [g.numpy() for g in gradients(loss_fn(leaves, step), leaves)]

    def advance(self, step: int) -> None:
        self.optimizer.step(self.arrays, self._grads(self.problem.loss, step))
        if self.hessian_every and step % self.hessian_every == self.hessian_every - 1:
            assert isinstance(self.optimizer, Sophia)
            self.optimizer.update_hessian(self.arrays, self._grads(self.problem.sampled_loss, step), self.batch)


# --------------------------------------------------------------------------------------------------
# Comparison and the deviation table


def relative_deviation(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / |e| elementwise; an exactly-zero expected element must be matched exactly."""
    difference = (actual.detach() - expected.detach()).abs()
    scale = expected.detach().abs()
    exact_zero = scale == 0
    if bool((difference[exact_zero] != 0).any()):
        return float("inf")
    return float((difference[~exact_zero] / scale[~exact_zero]).max()) if bool((~exact_zero).any()) else 0.0


@dataclass
class DeviationTable:
    """The largest relative deviation seen against each reference, and where."""

    worst: dict[str, tuple[float, str]] = field(default_factory=dict)
    cases: dict[str, int] = field(default_factory=dict)

    def record(self, reference: str, deviation: float, case: str) -> None:
        self.cases[reference] = self.cases.get(reference, 0) + 1
        if reference not in self.worst or deviation > self.worst[reference][0]:
            self.worst[reference] = (deviation, case)


DEVIATIONS = DeviationTable()


@pytest.fixture
def compare_runs(request: pytest.FixtureRequest) -> Callable[..., float]:
    """`compare_runs(ours, theirs, reference=..., rtol=1e-10, steps=STEPS)`: lock-step, every param, every step."""

    def compare(ours: Run, theirs: Run, *, reference: str, rtol: float = 1e-10, steps: int = STEPS) -> float:
        worst = 0.0
        for step in range(steps):
            ours.advance(step)
            theirs.advance(step)
            for index, (mine, other) in enumerate(zip(ours.params, theirs.params, strict=True)):
                assert mine.dtype == other.dtype == torch.float64
                deviation = relative_deviation(mine, other)
                assert deviation <= rtol, (
                    f"param {index} after step {step + 1}: relative deviation {deviation:.3g} > {rtol:g} "
                    f"from {reference}"
                )
                worst = max(worst, deviation)
        # A comparison in which nothing moved would prove nothing.
        moved = [not torch.equal(p.detach(), q) for p, q in zip(ours.params, ours.problem.initial(), strict=True)]
        assert any(moved), "the optimizer never changed the parameters"
        DEVIATIONS.record(reference, worst, request.node.name)
        return worst

    return compare


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not DEVIATIONS.worst:
        return
    terminalreporter.section("largest relative deviation against each reference (float64, every param, every step)")
    terminalreporter.write_line(f"{'reference':<32} {'cases':>5} {'largest deviation':>18}  case")
    for reference, (deviation, case) in sorted(DEVIATIONS.worst.items()):
        terminalreporter.write_line(f"{reference:<32} {DEVIATIONS.cases[reference]:>5} {deviation:>18.3g}  {case}")
