"""Adafactor and Muon, the optimizers whose math reads whole matrices, against torch.optim's.

Every comparison is float64, `STEPS` steps, every param after every step (`conftest.compare_runs`):

* `Adafactor` against `torch.optim.Adafactor` (loop and foreach) at 1e-10 relative, on a model with a conv
  weight (4-D), a 3-D weight, wide and tall matrices, biases and a scalar;
* `Muon` against `torch.optim.Muon` on a model of 2-D weights (tall, square, wide). torch runs the
  Newton-Schulz iteration in bfloat16 even for float64 params (checked below), so our default
  `ns_dtype=torch.bfloat16` is compared with it, at 1e-6 (the issue's bound; what we measure is 0, the same
  ops in the same order), and our `ns_dtype=torch.float64` with torch's own code run with its bfloat16
  cast lifted to float64, at 1e-10.

Then what torch does not have: Muon's refusal of params that are not matrices, the validation of the new
hyper-parameters, checkpoints (ours and torch's, both ways), the batched form of `step_param`, and
`muon_with_adamw`'s split.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference_family as ref
from adaptopt.optimizers.adafactor import Adafactor
from adaptopt.optimizers.muon import Muon, MuonWithAdamW, muon_with_adamw
from conftest import Problem, ReferenceRun, TorchRun
from dropin_support import assert_identical

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 25
BATCH = 8

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


# --------------------------------------------------------------------------------------------------
# Problems: fixed random batches, one per step, float64


def _conv_problem() -> Problem:
    """conv (4-D weight, bias) -> wide matrix -> 3-D weight -> tall matrix -> head, with a learnt scale."""
    generator = torch.Generator().manual_seed(2024)
    images = torch.randn(STEPS, BATCH, 2, 6, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (STEPS, BATCH), generator=generator)
    shapes = [(4, 2, 3, 3), (4,), (10, 64), (10,), (2, 7, 10), (7, 5), (3, 5), (3,), ()]
    initial_values = [0.3 * torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]

    def loss(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
        conv, conv_bias, wide, wide_bias, stacked, tall, head, head_bias, scale = params
        hidden = torch.tanh(F.conv2d(images[step], conv, conv_bias)).flatten(1)
        hidden = torch.tanh(hidden @ wide.T + wide_bias)
        hidden = torch.tanh(torch.einsum("bi,kji->bj", hidden, stacked))
        logits = (hidden @ tall) @ head.T * (1.0 + scale) + head_bias
        return F.cross_entropy(logits, labels[step])

    return Problem("conv", lambda: [v.clone() for v in initial_values], loss, loss)


def _matrix_problem() -> Problem:
    """A bias-free tanh MLP: a tall, a square and a wide matrix, Muon's whole diet."""
    generator = torch.Generator().manual_seed(4202)
    inputs = torch.randn(STEPS, BATCH, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (STEPS, BATCH), generator=generator)
    shapes = [(12, 6), (12, 12), (4, 12)]
    initial_values = [0.4 * torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]

    def loss(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
        first, second, head = params
        hidden = torch.tanh(torch.tanh(inputs[step] @ first.T) @ second.T)
        return F.cross_entropy(hidden @ head.T, labels[step])

    return Problem("matrices", lambda: [v.clone() for v in initial_values], loss, loss)


CONV = _conv_problem()
MATRICES = _matrix_problem()


# --------------------------------------------------------------------------------------------------
# Adafactor against torch.optim.Adafactor

ADAFACTOR_CASES: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {}),
    ("decay", {"lr": 0.05, "weight_decay": 0.1}),
    # lr above 1/sqrt(t) for t > 11: rho_t switches from 1/sqrt(t) to lr within the run.
    ("relative_step", {"lr": 0.3}),
    ("eps_clip_beta2", {"eps": (1e-30, 1e-2), "d": 2.0, "beta2_decay": -0.5, "weight_decay": 0.05}),
    ("maximize", {"lr": 0.02, "maximize": True}),
]


FOREACH_RTOL = {"relative_step": 1e-8}
"""Where torch's foreach Adafactor is compared at more than 1e-10, and why: its foreach and loop paths differ
from the first step by an ulp or two (2e-16), which steps of 30% of a param's RMS amplify to 1.7e-9
elementwise (6e-13 of the param's largest element) in 25 steps. We are bitwise torch's loop there too."""


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize(("name", "hyper"), ADAFACTOR_CASES, ids=[case[0] for case in ADAFACTOR_CASES])
def test_adafactor_matches_torch(compare_runs: Any, name: str, hyper: dict[str, Any], foreach: bool) -> None:
    # The reference loop: it reads each grad as autograd laid it out, as torch does, so reductions over
    # a transposed grad round alike (the fast paths copy grads into their buckets: test_..._on_every_path).
    ours = TorchRun(CONV, lambda params: Adafactor(params, execution="reference", **hyper))
    theirs = TorchRun(CONV, lambda params: torch.optim.Adafactor(params, foreach=foreach, **hyper))
    rtol = FOREACH_RTOL.get(name, 1e-10) if foreach else 1e-10
    compare_runs(
        ours, theirs, reference=f"torch Adafactor ({'foreach' if foreach else 'loop'})", rtol=rtol, steps=STEPS
    )


def test_adafactor_state_is_torchs() -> None:
    """torch's state names and shapes: factored over the last two dims from 2-D up, plain below."""
    run = TorchRun(CONV, lambda params: Adafactor(params))
    run.advance(0)
    state = run.optimizer.state
    conv, bias, _, _, stacked, *_, scale = run.params
    assert set(state[conv]) == {"step", "row_var", "col_var"}
    assert state[conv]["row_var"].shape == (4, 2, 3, 1) and state[conv]["col_var"].shape == (4, 2, 1, 3)
    assert state[stacked]["row_var"].shape == (2, 7, 1) and state[stacked]["col_var"].shape == (2, 1, 10)
    assert set(state[bias]) == {"step", "variance"} and state[bias]["variance"].shape == (4,)
    assert state[scale]["variance"].shape == () and state[scale]["step"] == 1


def test_adafactor_takes_torchs_eps_pair_everywhere() -> None:
    params = CONV.initial()
    optimizer = Adafactor(params[:2], eps=(1e-20, 1e-2))
    optimizer.add_param_group({"params": params[2:], "eps": (None, 1e-4)})
    assert [(g["eps1"], g["eps2"]) for g in optimizer.param_groups] == [(1e-20, 1e-2), (None, 1e-4)]
    assert "eps" not in optimizer.param_groups[1]
    assert [g["eps"] for g in optimizer.state_dict()["param_groups"]] == [(1e-20, 1e-2), (None, 1e-4)]


def test_adafactor_refuses_complex_params() -> None:
    with pytest.raises(ValueError, match=r"complex.*\(3, 2\)"):
        Adafactor([torch.zeros(3, 2, dtype=torch.complex128)])


# --------------------------------------------------------------------------------------------------
# Muon against torch.optim.Muon

MUON_CASES = [
    pytest.param(
        {"lr": 0.02, "weight_decay": decay, "nesterov": nesterov, "adjust_lr_fn": adjust},
        id=f"decay{decay}-{'nesterov' if nesterov else 'plain'}-{adjust}",
    )
    for decay in (0.0, 0.1)
    for nesterov in (True, False)
    for adjust in (None, "original", "match_rms_adamw")
] + [pytest.param({}, id="defaults"), pytest.param({"lr": 0.05, "momentum": 0.8, "ns_steps": 3}, id="short")]


TORCH_MUON = getattr(torch.optim, "Muon", None)
"""torch.optim.Muon, from torch 2.9; on older torches the float64 loop of `reference_family` is the oracle, and
the tests of torch's own bfloat16 rounding and checkpoints, which have nothing to compare with there, are not
collected."""


@pytest.mark.parametrize("hyper", MUON_CASES)
def test_muon_float64_matches_the_float64_loop(compare_runs: Any, hyper: dict[str, Any]) -> None:
    ours = TorchRun(MATRICES, lambda params: Muon(params, ns_dtype=torch.float64, **hyper))
    theirs = ReferenceRun(MATRICES, ref.Muon(**hyper))
    compare_runs(ours, theirs, reference="reference_family.Muon (float64)", steps=STEPS)


if TORCH_MUON is not None:

    @pytest.mark.parametrize("hyper", MUON_CASES)
    def test_muon_bfloat16_matches_torch(compare_runs: Any, hyper: dict[str, Any]) -> None:
        ours = TorchRun(MATRICES, lambda params: Muon(params, **hyper))
        theirs = TorchRun(MATRICES, lambda params: TORCH_MUON(params, **hyper))
        compare_runs(ours, theirs, reference="torch Muon (bf16 NS)", rtol=1e-6, steps=STEPS)

    def _lift_torchs_bfloat16_cast(monkeypatch: pytest.MonkeyPatch) -> None:
        # torch's Newton-Schulz starts with `grad.bfloat16()` and stays in that dtype: made a float64 copy,
        # torch's own code runs in float64 (nothing else in its Muon step calls .bfloat16()).
        monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *args, **kwargs: self.to(torch.float64, copy=True))

    @pytest.mark.parametrize("hyper", MUON_CASES)
    def test_muon_float64_matches_torch_in_float64(
        compare_runs: Any, monkeypatch: pytest.MonkeyPatch, hyper: dict[str, Any]
    ) -> None:
        _lift_torchs_bfloat16_cast(monkeypatch)
        ours = TorchRun(MATRICES, lambda params: Muon(params, ns_dtype=torch.float64, **hyper))
        theirs = TorchRun(MATRICES, lambda params: TORCH_MUON(params, **hyper))
        compare_runs(ours, theirs, reference="torch Muon, NS in float64", steps=STEPS)

    def test_torch_runs_newton_schulz_in_bfloat16() -> None:
        """Why the float64 comparison lifts torch's cast: as it stands, torch is bfloat16-far from float64."""
        ours = TorchRun(MATRICES, lambda params: Muon(params, lr=0.02, ns_dtype=torch.float64))
        theirs = TorchRun(MATRICES, lambda params: TORCH_MUON(params, lr=0.02))
        ours.advance(0)
        theirs.advance(0)
        difference = max(float((p - q).detach().abs().max()) for p, q in zip(ours.params, theirs.params, strict=True))
        assert difference > 1e-5  # a bfloat16 rounding (2^-8 relative) of a 0.02-sized step


def test_muon_starts_from_a_copy_of_a_bfloat16_momentum() -> None:
    """torch normalises a bfloat16 input in place, which with nesterov=False is the momentum buffer."""
    param = torch.zeros(4, 3, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(5)).bfloat16()
    optimizer = Muon([param], nesterov=False, momentum=0.95)
    param.grad = grad.clone()
    optimizer.step()
    assert torch.equal(optimizer.state[param]["momentum_buffer"], torch.zeros_like(grad).lerp_(grad, 0.05))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (), (1, 2, 2, 1)])
def test_muon_refuses_params_that_are_not_matrices(shape: tuple[int, ...]) -> None:
    shown = str(tuple(shape))
    with pytest.raises(ValueError, match=f"2-D.*shape {shown}".replace("(", r"\(").replace(")", r"\)")):
        Muon([torch.zeros(3, 3), torch.zeros(shape)])
    optimizer = Muon([torch.zeros(3, 3)])
    with pytest.raises(ValueError, match=r"shape " + shown.replace("(", r"\(").replace(")", r"\)")):
        optimizer.add_param_group({"params": torch.zeros(shape)})
    assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError, match=r"complex"):
        Muon([torch.zeros(3, 3, dtype=torch.complex64)])


# --------------------------------------------------------------------------------------------------
# Validation

BAD_HYPERPARAMETERS = [
    (Adafactor, {"lr": -1.0}, ValueError, r"lr must be in \[0, inf\)"),
    (Adafactor, {"beta2_decay": 0.5}, ValueError, r"beta2_decay must be in \(-inf, 0\]"),
    (Adafactor, {"beta2_decay": "fast"}, TypeError, r"beta2_decay must be a real number"),
    (Adafactor, {"d": 0.5}, ValueError, r"d must be in \[1, inf\)"),
    (Adafactor, {"eps": (-1.0, 1e-3)}, ValueError, r"eps\[0\] must be in \[0, inf\)"),
    (Adafactor, {"eps": (None, -1e-3)}, ValueError, r"eps\[1\] must be in \[0, inf\)"),
    (Adafactor, {"eps": 1e-3}, TypeError, r"eps must be a pair"),
    (Adafactor, {"eps": (1e-30, 1e-3, 1.0)}, ValueError, r"eps must be a pair"),
    (Adafactor, {"weight_decay": -0.1}, ValueError, r"weight_decay must be in \[0, inf\)"),
    (Muon, {"lr": -1.0}, ValueError, r"lr must be in \[0, inf\)"),
    (Muon, {"momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\)"),
    (Muon, {"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\)"),
    (Muon, {"nesterov": 1}, TypeError, r"nesterov must be a bool"),
    (Muon, {"ns_steps": 100}, ValueError, r"ns_steps must be in \[0, 100\)"),
    (Muon, {"ns_steps": 5.0}, TypeError, r"ns_steps must be an int"),
    (Muon, {"ns_coefficients": (3.4, -4.7)}, ValueError, r"ns_coefficients must be a triple"),
    (Muon, {"ns_coefficients": "abc"}, TypeError, r"ns_coefficients must be a triple"),
    (Muon, {"ns_coefficients": (3.4, float("nan"), 2.0)}, ValueError, r"ns_coefficients\[1\] must not be NaN"),
    (Muon, {"adjust_lr_fn": "spectral"}, ValueError, r"adjust_lr_fn must be one of"),
    (Muon, {"adjust_lr_fn": 1}, TypeError, r"adjust_lr_fn must be a str or None"),
    (Muon, {"ns_dtype": torch.float16}, ValueError, r"ns_dtype must be one of torch.bfloat16"),
    (Muon, {"ns_dtype": 16}, TypeError, r"ns_dtype must be a torch.dtype"),
    (Muon, {"eps": -1e-7}, ValueError, r"eps must be in \[0, inf\)"),
    (Muon, {"weight_decay": -0.1}, ValueError, r"weight_decay must be in \[0, inf\)"),
]


@pytest.mark.parametrize(
    ("cls", "hyper", "error", "message"),
    BAD_HYPERPARAMETERS,
    ids=[f"{case[0].__name__}-{next(iter(case[1]))}={next(iter(case[1].values()))!r}" for case in BAD_HYPERPARAMETERS],
)
def test_bad_hyperparameters_raise(cls: type, hyper: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        cls([torch.zeros(3, 3)], **hyper)
    # The same values in a group added later: this optimizer's own keys are checked there too.
    optimizer = cls([torch.zeros(3, 3)])
    with pytest.raises(error, match=message):
        optimizer.add_param_group({"params": [torch.zeros(2, 2)], **hyper})
    assert len(optimizer.param_groups) == 1


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _resume_matches(problem: Problem, make_optimizer: Factory, load_into: Factory | None = None) -> None:
    """A run saved after 7 steps and resumed (into `load_into`, by default the same class) goes on bitwise."""
    through = TorchRun(problem, make_optimizer)
    for step in range(7):
        through.advance(step)
    saved = copy.deepcopy(through.optimizer.state_dict())
    saved_params = [p.detach().clone() for p in through.params]
    resumed = TorchRun(problem, load_into or make_optimizer)
    with torch.no_grad():
        for param, value in zip(resumed.params, saved_params, strict=True):
            param.copy_(value)
    resumed.optimizer.load_state_dict(saved)
    for step in range(7, 15):
        through.advance(step)
        resumed.advance(step)
        for mine, other in zip(resumed.params, through.params, strict=True):
            assert torch.equal(mine, other), f"step {step + 1}"


def test_adafactor_resumes_identically() -> None:
    _resume_matches(CONV, lambda params: Adafactor(params, lr=0.05, weight_decay=0.1))


def test_muon_resumes_identically() -> None:
    _resume_matches(MATRICES, lambda params: Muon(params, lr=0.02, adjust_lr_fn="match_rms_adamw"))


def test_torchs_adafactor_checkpoint_resumes_in_ours_and_back() -> None:
    hyper = {"lr": 0.05, "weight_decay": 0.1, "eps": (1e-28, 1e-3)}
    torchs: Factory = lambda params: torch.optim.Adafactor(params, **hyper)  # noqa: E731
    ours: Factory = lambda params: Adafactor(params, execution="reference", **hyper)  # noqa: E731
    # The torch run goes on in torch; ours loaded from it must follow it step for step, and vice versa.
    _resume_matches(CONV, torchs, load_into=ours)
    _resume_matches(CONV, ours, load_into=torchs)


if TORCH_MUON is not None:

    def test_torchs_muon_checkpoint_resumes_in_ours() -> None:
        _resume_matches(MATRICES, lambda params: TORCH_MUON(params, lr=0.02), load_into=lambda p: Muon(p, lr=0.02))
        _resume_matches(MATRICES, lambda params: Muon(params, lr=0.02), load_into=lambda p: TORCH_MUON(p, lr=0.02))


# --------------------------------------------------------------------------------------------------
# Batches: step_param (through update) on params stacked along a leading dim


@pytest.mark.parametrize("ns_dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5, 3), (3, 5)], ids=str)
def test_muon_steps_a_batch_of_matrices_as_each_alone(shape: tuple[int, int], ns_dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(7)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    grads = [[torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)] for _ in range(4)]
    optimizer = Muon([torch.zeros(shape)], lr=0.1, ns_dtype=ns_dtype, adjust_lr_fn="match_rms_adamw")
    group = optimizer.param_groups[0]

    states: list[dict[str, Any]] = [{} for _ in params]
    alone = [p.clone() for p in params]
    for state, param in zip(states, alone, strict=True):
        optimizer.initialize_state(state, group, param)
    batch = torch.stack([p.clone() for p in params])
    batch_state = {"step": 0, "momentum_buffer": torch.zeros_like(batch)}
    for step_grads in grads:
        for state, param, grad in zip(states, alone, step_grads, strict=True):
            state["step"] += 1
            optimizer.update(state, group, grad, param, optimizer.step_scalars(state, group))
        batch_state["step"] += 1
        optimizer.update(batch_state, group, torch.stack(step_grads), batch, optimizer.step_scalars(batch_state, group))
    # The same ops batched, but addmm becomes baddbmm, whose BLAS kernel may round small products
    # differently (measured: 3e-15 in float64 after one iteration); in bfloat16 that can flip a rounding,
    # 2^-8 of an entry of the orthogonalized update (entries are at most 1) times the rate, per step.
    bound = 1e-12 if ns_dtype == torch.float64 else len(grads) * 2**-8 * 0.1 * 0.2 * max(shape) ** 0.5
    torch.testing.assert_close(batch, torch.stack(alone), rtol=0, atol=bound)
    assert torch.equal(batch_state["momentum_buffer"], torch.stack([s["momentum_buffer"] for s in states]))


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 4), (5,), ()], ids=str)
def test_adafactor_steps_a_batch_of_params_as_each_alone(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(11)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    grads = [[torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)] for _ in range(4)]
    optimizer = Adafactor([torch.zeros(shape)], lr=0.3, weight_decay=0.1, d=1.5)
    group = optimizer.param_groups[0]

    states: list[dict[str, Any]] = [{} for _ in params]
    alone = [p.clone() for p in params]
    for state, param in zip(states, alone, strict=True):
        optimizer.initialize_state(state, group, param)
    batch = torch.stack([p.clone() for p in params])
    batch_state = {key: torch.stack([s[key] for s in states]) for key in states[0] if key != "step"}
    for step_grads in grads:
        for state, param, grad in zip(states, alone, step_grads, strict=True):
            state["step"] += 1
            optimizer.update(state, group, grad, param, optimizer.step_scalars(state, group))
        batch_state["step"] = states[0]["step"]
        scalars = {**optimizer.step_scalars(batch_state, group), "batch_dims": 1}
        optimizer.update(batch_state, group, torch.stack(step_grads), batch, scalars)
    # Reductions over a param may be summed in another order when batched: a few ulps.
    torch.testing.assert_close(batch, torch.stack(alone), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------------
# The classes declare their kind


@pytest.mark.parametrize("cls", [Adafactor, Muon])
def test_kind_is_declared_matrixwise(cls: type) -> None:
    assert cls.__dict__["kind"] == "matrixwise"


# --------------------------------------------------------------------------------------------------
# Every execution path: buckets stack the params of one shape, stepped as one batch


def _deep_problem() -> Problem:
    """Three hidden matrices of one shape (a stack of three), a head, and biases of one shape (another)."""
    generator = torch.Generator().manual_seed(77)
    inputs = torch.randn(STEPS, BATCH, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (STEPS, BATCH), generator=generator)
    shapes = [(8, 8), (8, 8), (8, 8), (3, 8), (8,), (8,)]
    initial_values = [0.4 * torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]

    def loss(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
        first, second, third, head, bias1, bias2 = params
        hidden = torch.tanh(inputs[step] @ first.T + bias1)
        hidden = torch.tanh(hidden @ second.T + bias2)
        return F.cross_entropy(torch.tanh(hidden @ third.T) @ head.T, labels[step])

    return Problem("deep", lambda: [v.clone() for v in initial_values], loss, loss)


DEEP = _deep_problem()
DEEP_MATRICES = Problem(
    "deep matrices",
    lambda: DEEP.initial()[:4],
    lambda params, step: DEEP.loss(
        [*params, torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)], step
    ),
    DEEP.sampled_loss,
)
FAST_PATHS = ["bucketed", "compiled", "auto"]


def _stacks(optimizer: torch.optim.Optimizer) -> list[int]:
    from adaptopt.execution import buckets

    return sorted(len(bucket.params) for bucket in buckets(optimizer))


@pytest.mark.parametrize("execution", FAST_PATHS)
@pytest.mark.parametrize("problem", [CONV, DEEP], ids=["conv", "deep"])
def test_adafactor_equals_torch_on_every_path(problem: Problem, execution: str, compare_runs: Any) -> None:
    hyper = {"lr": 0.05, "weight_decay": 0.1}
    ours = TorchRun(problem, lambda params: Adafactor(params, execution=execution, **hyper))
    theirs = TorchRun(problem, lambda params: torch.optim.Adafactor(params, foreach=False, **hyper))
    compare_runs(ours, theirs, reference="torch Adafactor (loop), fast paths", steps=STEPS)
    # The deep model's three matrices were stepped as one stack; vectors are stacks of their own.
    assert _stacks(ours.optimizer) == ([1, 1, 1, 3] if problem is DEEP else [1] * 9)


@pytest.mark.parametrize("execution", FAST_PATHS)
def test_muon_float64_equals_the_loop_on_every_path(execution: str, compare_runs: Any) -> None:
    ours = TorchRun(DEEP_MATRICES, lambda params: Muon(params, lr=0.02, ns_dtype=torch.float64, execution=execution))
    theirs = ReferenceRun(DEEP_MATRICES, ref.Muon(lr=0.02))
    compare_runs(ours, theirs, reference="reference_family.Muon (float64), fast paths", steps=STEPS)
    assert _stacks(ours.optimizer) == [1, 3]


@pytest.mark.parametrize("execution", FAST_PATHS)
def test_muon_bfloat16_fast_paths_equal_the_reference_bitwise(execution: str) -> None:
    # The stacks' batched products round in bfloat16 as torch's one product per matrix does, and the compiled
    # update rounds where eager rounds (inductor's `emulate_precision_casts`): bitwise, against torch's Muon
    # where it exists and our reference loop (equal to it bitwise, above) where it does not.
    make_reference: Factory = (
        (lambda params: TORCH_MUON(params, lr=0.02))  # type: ignore[misc]
        if TORCH_MUON is not None
        else (lambda params: Muon(params, lr=0.02, execution="reference"))
    )
    ours = TorchRun(DEEP_MATRICES, lambda params: Muon(params, lr=0.02, execution=execution))
    theirs = TorchRun(DEEP_MATRICES, make_reference)
    for step in range(STEPS):
        ours.advance(step)
        theirs.advance(step)
        assert all(torch.equal(mine, other) for mine, other in zip(ours.params, theirs.params, strict=True)), step
    assert _stacks(ours.optimizer) == [1, 3]


# --------------------------------------------------------------------------------------------------
# muon_with_adamw


class TinyLanguageModel(nn.Module):
    """An embedding, two hidden layers (one with a bias), a norm and a head: the usual split's cases."""

    def __init__(self, vocabulary: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        hidden = hidden + self.down(torch.tanh(self.up(hidden)))
        return self.head(self.norm(hidden))


def _model() -> TinyLanguageModel:
    torch.manual_seed(0)
    return TinyLanguageModel().double()


def _params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _same(left: list[torch.Tensor], right: list[torch.Tensor]) -> bool:
    return [id(p) for p in left] == [id(p) for p in right]


def test_muon_with_adamw_splits_hidden_matrices_from_the_rest() -> None:
    model = _model()
    optimizer = muon_with_adamw(model, lr=1e-2, weight_decay=0.01)
    assert isinstance(optimizer, torch.optim.Optimizer) and isinstance(optimizer, MuonWithAdamW)
    assert _same(_params_of(optimizer.muon), [model.up.weight, model.down.weight])
    rest = [model.embed.weight, model.up.bias, model.norm.weight, model.norm.bias, model.head.weight, model.head.bias]
    assert _same(_params_of(optimizer.adamw), rest)
    assert _same(_params_of(optimizer), [model.up.weight, model.down.weight, *rest])
    muon_group, adamw_group = optimizer.param_groups
    assert muon_group["adjust_lr_fn"] == "match_rms_adamw" and muon_group["lr"] == adamw_group["lr"] == 1e-2
    assert adamw_group["betas"] == (0.9, 0.95) and adamw_group["eps"] == 1e-8
    assert adamw_group["optimized_update"] is False and adamw_group["decoupled_weight_decay"] is True


def test_muon_with_adamw_takes_what_to_leave_out() -> None:
    model = _model()
    everything = muon_with_adamw(model, exclude=())
    assert _same(
        _params_of(everything.muon), [model.embed.weight, model.up.weight, model.down.weight, model.head.weight]
    )
    by_name = muon_with_adamw(model, exclude=["embed", "down.weight"])
    assert _same(_params_of(by_name.muon), [model.up.weight, model.head.weight])
    named = muon_with_adamw(list(model.named_parameters()), exclude=[model.head, "embed.weight"])
    assert _same(_params_of(named.muon), [model.up.weight, model.down.weight])
    plain = muon_with_adamw(model.parameters(), exclude=[model.embed.weight, model.head.weight])
    assert _same(_params_of(plain.muon), [model.up.weight, model.down.weight])
    with pytest.raises(ValueError, match="'tail'"):
        muon_with_adamw(model, exclude=["tail"])


def test_muon_with_adamw_is_adamw_and_muon_side_by_side() -> None:
    """Its step is exactly Muon's on the hidden matrices and torch's AdamW's on the rest."""
    model, twin = _model(), _model()
    tokens = torch.randint(0, 11, (20, 6), generator=torch.Generator().manual_seed(3))
    optimizer = muon_with_adamw(model, lr=1e-2, weight_decay=0.1)
    hidden = [twin.up.weight, twin.down.weight]
    rest = [p for p in twin.parameters() if all(p is not q for q in hidden)]
    # torch's Muon where it exists; before torch 2.9 ours, which equals it bitwise where both exist (above).
    make_muon: Any = TORCH_MUON if TORCH_MUON is not None else Muon
    muon = make_muon(hidden, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(10):
        for net in (model, twin):
            F.cross_entropy(net(tokens[step % 4, :-1]), tokens[step % 4, 1:]).backward()
        optimizer.step()
        muon.step()
        adamw.step()
        optimizer.zero_grad()
        muon.zero_grad()
        adamw.zero_grad()
        for mine, other in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(mine, other, rtol=1e-12, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_muon_with_adamw_trains_schedules_and_resumes() -> None:
    model = _model()
    tokens = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())

    optimizer = muon_with_adamw(model, lr=5e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.97**epoch)
    first = float(loss().detach())

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    for _ in range(40):
        optimizer.step(closure)
        scheduler.step()
    assert float(loss().detach()) < 0.5 * first  # as far as torch's AdamW alone gets (1.13 from 2.65)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-2 * 0.97**40] * 2)

    saved = copy.deepcopy(optimizer.state_dict())
    saved_params = copy.deepcopy(model.state_dict())
    optimizer.step(closure)
    after = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(saved_params)
    resumed = muon_with_adamw(model, lr=5e-2, weight_decay=0.01)
    resumed.load_state_dict(saved)
    resumed.step(closure)
    for mine, other in zip(model.parameters(), after, strict=True):
        assert torch.equal(mine, other)
    # A state_dict that does not fit changes neither part.
    broken = copy.deepcopy(saved)
    adamw_group = broken["param_groups"][1]
    assert adamw_group["use_muon"] is False
    adamw_group["params"] = adamw_group["params"][:-1]
    before = copy.deepcopy(resumed.muon.state_dict())
    with pytest.raises(ValueError, match="params"):
        resumed.load_state_dict(broken)
    assert resumed.muon.state_dict()["param_groups"] == before["param_groups"]
    assert all(
        torch.equal(resumed.muon.state[p]["momentum_buffer"], before["state"][i]["momentum_buffer"])
        for i, p in enumerate(resumed.muon.param_groups[0]["params"])
    )


def test_muon_with_adamw_adds_groups_by_use_muon() -> None:
    model = _model()
    optimizer = muon_with_adamw(model, exclude=[model.head])
    extra_matrix, extra_vector = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    optimizer.add_param_group({"params": [extra_matrix], "use_muon": True, "lr": 0.02})
    optimizer.add_param_group({"params": [extra_vector], "use_muon": False})
    assert optimizer.muon.param_groups[-1]["params"][0] is extra_matrix
    assert optimizer.adamw.param_groups[-1]["params"][0] is extra_vector
    with pytest.raises(TypeError, match="use_muon"):
        optimizer.add_param_group({"params": [torch.zeros(2, 2)]})


def test_muon_with_adamw_with_one_side_empty() -> None:
    layer = nn.Linear(4, 4, bias=False).double()
    optimizer = muon_with_adamw(layer, exclude=())  # the one matrix to Muon, nothing to AdamW
    layer(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    before = layer.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(layer.weight, before)
    assert _params_of(optimizer.adamw) == []
    assert copy.deepcopy(optimizer).state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


def _trained_muon_with_adamw(model: nn.Module) -> MuonWithAdamW:
    optimizer = muon_with_adamw(model, lr=5e-2, weight_decay=0.01)
    tokens = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
    return optimizer


def test_muon_with_adamw_state_dict_is_torchs_format_over_its_param_groups() -> None:
    model = _model()
    optimizer = _trained_muon_with_adamw(model)
    saved = optimizer.state_dict()
    muon, adamw = optimizer.muon.state_dict(), optimizer.adamw.state_dict()
    assert set(saved) == {"state", "param_groups"}
    # Numbered as one optimizer over param_groups numbers them: Muon's two matrices, then AdamW's six.
    assert [group["params"] for group in saved["param_groups"]] == [[0, 1], [2, 3, 4, 5, 6, 7]]
    assert [group["use_muon"] for group in saved["param_groups"]] == [True, False]
    assert_identical(saved["state"], {**muon["state"], **{i + 2: entry for i, entry in adamw["state"].items()}})
    assert_identical(
        [{k: v for k, v in group.items() if k not in ("use_muon", "params")} for group in saved["param_groups"]],
        [
            {k: v for k, v in group.items() if k != "params"}
            for group in (*muon["param_groups"], *adamw["param_groups"])
        ],
    )
    order = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(optimizer.state[param] is not None for param in order)
    assert torch.equal(saved["state"][0]["momentum_buffer"], optimizer.state[order[0]]["momentum_buffer"])
    assert torch.equal(saved["state"][2]["exp_avg"], optimizer.state[order[2]]["exp_avg"])


def test_muon_with_adamw_loads_the_pair_of_adaptopt_0_1() -> None:
    model = _model()
    trained = _trained_muon_with_adamw(model)
    pair = {"muon": trained.muon.state_dict(), "adamw": trained.adamw.state_dict()}
    fresh = muon_with_adamw(model, lr=5e-2, weight_decay=0.01)
    fresh.load_state_dict(copy.deepcopy(pair))
    assert_identical(fresh.state_dict(), trained.state_dict())


def test_muon_with_adamw_refuses_a_group_on_the_wrong_side_and_changes_nothing() -> None:
    model = _model()
    optimizer = _trained_muon_with_adamw(model)
    saved = copy.deepcopy(optimizer.state_dict())
    saved["param_groups"][0]["use_muon"] = False
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match="param group 0 of the state_dict has use_muon=False"):
        optimizer.load_state_dict(saved)
    assert_identical(optimizer.state_dict(), before)
    stray = copy.deepcopy(before)
    stray["state"][99] = stray["state"][0]
    with pytest.raises(ValueError, match="param id 99, which is in no group"):
        optimizer.load_state_dict(stray)
    assert_identical(optimizer.state_dict(), before)


def test_muon_with_adamw_rejects_overlap() -> None:
    weight = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="both"):
        MuonWithAdamW(Muon([weight]), torch.optim.AdamW([weight]))


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (dict(adamw_betas=(1.5, 0.9)), ValueError, r"^adamw_betas\[0\] must be in \[0, 1\), got 1.5$"),
        (dict(adamw_betas=0.9), TypeError, r"^adamw_betas must be a pair"),
        (dict(adamw_eps=-1.0), ValueError, r"^adamw_eps must be in \[0, inf\), got -1.0$"),
        (dict(muon_lr=-1.0), ValueError, r"^muon_lr must be in \[0, inf\), got -1.0$"),
        (dict(muon_lr="fast"), TypeError, r"^muon_lr must be a real number"),
        (dict(lr=-1.0), ValueError, r"^lr must be in \[0, inf\), got -1.0$"),
        (dict(momentum=1.0), ValueError, r"^momentum must be in \[0, 1\), got 1.0$"),
    ],
    ids=lambda value: "" if isinstance(value, (type, str)) else ",".join(value),
)
def test_muon_with_adamw_names_its_own_arguments_in_errors(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        muon_with_adamw(_model(), **arguments)


def test_muon_with_adamw_weight_decay_policy_is_decoupled() -> None:
    optimizer = muon_with_adamw(_model(), weight_decay=0.2)
    for group in optimizer.param_groups:
        assert group["weight_decay"] == 0.2 and group["decoupled_weight_decay"] is True


@pytest.mark.parametrize(
    ("optimizer_class", "key", "bad", "message"),
    [
        (Muon, "ns_steps", -3, r"ns_steps must be in \[0, 100\), got -3"),
        (Muon, "nesterov", "yes", r"nesterov must be a bool"),
        (Adafactor, "beta2_decay", 3.0, r"beta2_decay must be in \(-inf, 0\], got 3.0"),
        (Adafactor, "eps2", -1.0, r"eps2 must be in \[0, inf\), got -1.0"),
    ],
    ids=lambda value: value if isinstance(value, str) else getattr(value, "__name__", ""),
)
def test_a_state_dict_with_a_bad_own_key_is_refused_and_changes_nothing(
    optimizer_class: type, key: str, bad: Any, message: str
) -> None:
    weight = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    optimizer = optimizer_class([weight], lr=1e-2)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["param_groups"][0][key] = bad
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=rf"param group 0 of the state_dict: {message}"):
        optimizer.load_state_dict(saved)
    assert_identical(optimizer.state_dict(), before)
