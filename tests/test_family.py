"""The family beyond the seed, each against its official code, on every execution path.

Every case is float64, `conftest.STEPS` (60) steps, every param after every step, at 1e-10 relative unless a
reason is written beside a looser bound, on the MLP and on Rosenbrock (`conftest.py`), run with each of
`execution="reference"`, `"bucketed"`, `"compiled"` (the MLP only: a compilation costs seconds) and
`"auto"`. The references:

* `lion_pytorch.Lion` 0.2.5 (lucidrains), the official Lion;
* `schedulefree.AdamWScheduleFree` 1.4.1 (Meta), foreach and loop, in train and eval mode;
* `reference_family.ADOPT` and `reference_family.AdEMAMix`, float64 loops written from the authors' code
  (not on PyPI), with the commits they follow named there;
* `prodigyopt.Prodigy` 1.1.2, the official Prodigy;
* `reference_family.LAMB`, a float64 loop written from NVIDIA apex's `FusedLAMB` (CUDA-only).

pytorch_optimizer's ADOPT, AdEMAMix and Lamb differ from the official code; the tests at the end pin down
exactly how, by matching each to the reference loop switched to its conventions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lion_pytorch
import prodigyopt
import pytest
import pytorch_optimizer
import schedulefree
import torch

import reference_family as ref
from adaptopt import ADOPT, AdEMAMix, Lion, ScheduleFreeAdamW, WeightDecay
from adaptopt.optimizers.lamb import LAMB
from adaptopt.optimizers.prodigy import Prodigy
from conftest import STEPS, Problem, ReferenceRun, TorchRun

pytestmark = pytest.mark.usefixtures("single_thread")

EXECUTIONS = ["reference", "bucketed", "compiled", "auto"]

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


PATHS = [("mlp", execution) for execution in EXECUTIONS] + [
    ("rosenbrock", execution) for execution in EXECUTIONS if execution != "compiled"
]
"""(problem, execution): compiled on the MLP only, as one compilation per case is what it costs."""
every_path = pytest.mark.parametrize(("problem", "execution"), PATHS, indirect=["problem"])


# --------------------------------------------------------------------------------------------------
# Lion against lion-pytorch

LION_CASES: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {}),
    ("decay", {"lr": 3e-3, "betas": (0.95, 0.98), "weight_decay": 0.1}),
    ("decoupled", {"lr": 3e-3, "weight_decay": 0.2, "decoupled_weight_decay": True}),
]


@every_path
@pytest.mark.parametrize(("case", "options"), LION_CASES, ids=[case for case, _ in LION_CASES])
def test_lion_equals_lion_pytorch(
    problem: Problem, execution: str, case: str, options: dict[str, Any], compare_runs: Any
) -> None:
    ours = TorchRun(problem, lambda params: Lion(params, execution=execution, **options))
    theirs = TorchRun(problem, lambda params: lion_pytorch.Lion(params, **options))
    compare_runs(ours, theirs, reference="lion_pytorch.Lion")


def test_lion_schedule_scales_decoupled_decay_by_the_initial_rate(problem: Problem, compare_runs: Any) -> None:
    # lion-pytorch divides the decay by the *initial* lr: under a schedule the decay follows lr_t / lr_0.
    options = {"lr": 1e-2, "weight_decay": 0.3, "decoupled_weight_decay": True}

    def halve(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)

    ours = TorchRun(problem, lambda params: Lion(params, **options), make_scheduler=halve)
    theirs = TorchRun(problem, lambda params: lion_pytorch.Lion(params, **options), make_scheduler=halve)
    compare_runs(ours, theirs, reference="lion_pytorch.Lion")


# --------------------------------------------------------------------------------------------------
# Schedule-Free AdamW against schedulefree

SCHEDULE_FREE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {"lr": 0.01}),
    ("warmup-decay", {"lr": 0.02, "warmup_steps": 7, "weight_decay": 0.05, "betas": (0.8, 0.99)}),
    ("polynomial", {"lr": 0.01, "r": 0.5, "weight_lr_power": 1.0, "eps": 1e-6, "warmup_steps": 3}),
]


def schedule_free_reference(foreach: bool, options: dict[str, Any]) -> Factory:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        optimizer = schedulefree.AdamWScheduleFree(params, foreach=foreach, **options)
        optimizer.train()
        return optimizer

    return make


class _CloneGrads(TorchRun):
    """schedulefree normalises `p.grad` in place; the grads it is handed are its own copies."""

    def _set_grads(self, loss: torch.Tensor) -> None:
        super()._set_grads(loss)
        for param in self.params:
            assert param.grad is not None
            param.grad = param.grad.clone()


@every_path
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(("case", "options"), SCHEDULE_FREE_CASES, ids=[case for case, _ in SCHEDULE_FREE_CASES])
def test_schedule_free_equals_schedulefree(
    problem: Problem, execution: str, foreach: bool, case: str, options: dict[str, Any], compare_runs: Any
) -> None:
    ours = TorchRun(problem, lambda params: ScheduleFreeAdamW(params, execution=execution, **options))
    theirs = _CloneGrads(problem, schedule_free_reference(foreach, options))
    compare_runs(ours, theirs, reference=f"schedulefree.AdamWScheduleFree(foreach={foreach})")


@every_path
def test_schedule_free_eval_and_train_modes_equal_schedulefree(problem: Problem, execution: str) -> None:
    options = {"lr": 0.02, "warmup_steps": 4, "weight_decay": 0.01}
    ours = TorchRun(problem, lambda params: ScheduleFreeAdamW(params, execution=execution, **options))
    theirs = _CloneGrads(problem, schedule_free_reference(True, options))
    for step in range(STEPS):
        ours.advance(step)
        theirs.advance(step)
        if step % 10 == 9:
            # Evaluation at x, then back to y for more training, as a training loop does.
            ours.optimizer.eval()  # type: ignore[attr-defined]
            theirs.optimizer.eval()  # type: ignore[attr-defined]
            assert all(not group["train_mode"] for group in ours.optimizer.param_groups)
            for mine, other in zip(ours.params, theirs.params, strict=True):
                torch.testing.assert_close(mine, other, rtol=1e-10, atol=0)
            with pytest.raises(RuntimeError, match=r"eval mode; call optimizer.train\(\)"):
                ours.optimizer.step()
            ours.optimizer.train()  # type: ignore[attr-defined]
            theirs.optimizer.train()  # type: ignore[attr-defined]
        for mine, other in zip(ours.params, theirs.params, strict=True):
            torch.testing.assert_close(mine, other, rtol=1e-10, atol=0)
    # x differs from y: the eval switch moved something.
    before = [p.clone() for p in ours.params]
    ours.optimizer.eval()  # type: ignore[attr-defined]
    assert any(not torch.equal(p, q) for p, q in zip(before, ours.params, strict=True))


def test_schedule_free_group_state_is_not_compiled_in() -> None:
    # The weight sum changes every step: were it a constant of the compiled update, every step would compile.
    from adaptopt.compiled import CompiledUpdate

    param = torch.nn.Parameter(torch.linspace(-1, 1, 64, dtype=torch.float64))
    optimizer = ScheduleFreeAdamW([param], lr=0.01, execution="compiled")
    for step in range(6):
        param.grad = torch.cos(param.detach() * (step + 1))
        optimizer.step()
        if step == 1:
            compiled_after_two = CompiledUpdate.compilations
    assert CompiledUpdate.compilations == compiled_after_two
    assert optimizer.param_groups[0]["k"] == 6


# --------------------------------------------------------------------------------------------------
# ADOPT and AdEMAMix against float64 loops written from the authors' code

ADOPT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {}),
    ("coupled-decay", {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.1}),
    ("decoupled-no-clip", {"lr": 3e-3, "weight_decay": 0.1, "decouple": True, "clip_lambda": None, "eps": 1e-4}),
]


@every_path
@pytest.mark.parametrize(("case", "options"), ADOPT_CASES, ids=[case for case, _ in ADOPT_CASES])
def test_adopt_equals_authors_code(
    problem: Problem, execution: str, case: str, options: dict[str, Any], compare_runs: Any
) -> None:
    ours = TorchRun(problem, lambda params: ADOPT(params, execution=execution, **options))
    theirs = ReferenceRun(problem, ref.ADOPT(**options))
    compare_runs(ours, theirs, reference="reference_family.ADOPT (authors' code)")


ADEMAMIX_CASES: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {}),
    ("warm-ups", {"lr": 3e-3, "alpha": 5.0, "alpha_warmup": 40, "beta3_warmup": 50, "weight_decay": 0.1}),
    ("no-fast-momentum", {"lr": 3e-3, "betas": (0.0, 0.99, 0.999), "beta3_warmup": 20}),
]


@every_path
@pytest.mark.parametrize(("case", "options"), ADEMAMIX_CASES, ids=[case for case, _ in ADEMAMIX_CASES])
def test_ademamix_equals_authors_code(
    problem: Problem, execution: str, case: str, options: dict[str, Any], compare_runs: Any
) -> None:
    ours = TorchRun(problem, lambda params: AdEMAMix(params, execution=execution, **options))
    theirs = ReferenceRun(problem, ref.AdEMAMix(**options))
    compare_runs(ours, theirs, reference="reference_family.AdEMAMix (authors' code)")


# --------------------------------------------------------------------------------------------------
# Weight decay: a float means the reference's decay, a policy the base's


def test_a_weight_decay_policy_still_works_for_each() -> None:
    # Decoupled decay by the policy equals the optimizer without decay on params scaled by (1 - lr w) first.
    for make in (Lion, ADOPT, AdEMAMix):
        decayed = torch.linspace(-1, 1, 10, dtype=torch.float64).requires_grad_()
        plain = decayed.detach().clone().requires_grad_()
        with_policy = make([decayed], lr=0.01, weight_decay=WeightDecay(0.5))
        without = make([plain], lr=0.01)
        for step in range(3):
            grad = torch.sin(torch.arange(10, dtype=torch.float64) + step)
            decayed.grad, plain.grad = grad.clone(), grad.clone()
            with torch.no_grad():
                plain.mul_(1 - 0.01 * 0.5)
            with_policy.step()
            without.step()
        torch.testing.assert_close(decayed, plain, rtol=1e-13, atol=0)


# --------------------------------------------------------------------------------------------------
# Prodigy against prodigyopt, LAMB against a loop written from apex's FusedLAMB

PRODIGY_CASES: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {}),
    ("bias-correction-decay", {"use_bias_correction": True, "weight_decay": 0.05, "d0": 1e-4}),
    ("coupled-safeguard", {"weight_decay": 0.05, "decouple": False, "safeguard_warmup": True, "beta3": 0.99}),
    ("no-momentum-growth", {"betas": (0.0, 0.99), "growth_rate": 1.05, "d_coef": 0.5, "lr": 0.5}),
    ("sliced", {"slice_p": 3, "eps": 1e-6}),
]


@every_path
@pytest.mark.parametrize(("case", "options"), PRODIGY_CASES, ids=[case for case, _ in PRODIGY_CASES])
def test_prodigy_equals_prodigyopt(
    problem: Problem, execution: str, case: str, options: dict[str, Any], compare_runs: Any
) -> None:
    ours = TorchRun(problem, lambda params: Prodigy(params, execution=execution, **options))
    theirs = _CloneGrads(problem, lambda params: prodigyopt.Prodigy(params, **options))
    compare_runs(ours, theirs, reference="prodigyopt.Prodigy")
    for key in ("d", "d_max", "d_numerator", "d_hat", "k"):
        mine, other = ours.optimizer.param_groups[0][key], theirs.optimizer.param_groups[0][key]
        assert mine == pytest.approx(other, rel=1e-10, abs=0), key


def test_prodigy_shares_d_across_groups_and_refuses_mixed_rates() -> None:
    weights = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4).requires_grad_()
    bias = torch.linspace(0.5, 1, 3, dtype=torch.float64).requires_grad_()
    copies = [weights.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
    ours = Prodigy([{"params": [weights]}, {"params": [bias], "weight_decay": 0.1, "d0": 1e-5}])
    theirs = prodigyopt.Prodigy([{"params": [copies[0]]}, {"params": [copies[1]], "weight_decay": 0.1, "d0": 1e-5}])
    for step in range(25):
        for params in ([weights, bias], copies):
            params[0].grad = torch.sin(params[0].detach() * 3 + step)
            params[1].grad = torch.cos(params[1].detach() + step)
        ours.step()
        theirs.step()
    for mine, other in zip([weights, bias], copies, strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-10, atol=0)
    assert ours.param_groups[0]["d"] == ours.param_groups[1]["d"]
    assert ours.param_groups[1]["d"] == pytest.approx(theirs.param_groups[1]["d"], rel=1e-12)
    ours.param_groups[1]["lr"] = 0.5
    with pytest.raises(RuntimeError, match="one lr, or lr 0"):
        ours.step()


LAMB_CASES: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {}),
    ("clipped-hard", {"lr": 1e-2, "max_grad_norm": 0.05, "betas": (0.8, 0.99)}),
    ("l2-no-averaging", {"adam_w_mode": False, "grad_averaging": False, "weight_decay": 0.1, "max_grad_norm": None}),
    ("nvlamb-no-decay-no-correction", {"weight_decay": 0.0, "use_nvlamb": True, "bias_correction": False}),
    ("adam-where-no-decay", {"weight_decay": 0.0, "max_grad_norm": 2.0}),
]


@every_path
@pytest.mark.parametrize(("case", "options"), LAMB_CASES, ids=[case for case, _ in LAMB_CASES])
def test_lamb_equals_apex_algorithm(
    problem: Problem, execution: str, case: str, options: dict[str, Any], compare_runs: Any
) -> None:
    ours = TorchRun(problem, lambda params: LAMB(params, execution=execution, **options))
    theirs = ReferenceRun(problem, ref.LAMB(**options))
    compare_runs(ours, theirs, reference="reference_family.LAMB (apex FusedLAMB)")


def test_lamb_moves_each_tensor_by_lr_times_its_norm() -> None:
    params = [
        torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) for shape in [(5, 4), (9,)]
    ]
    params = [p.requires_grad_() for p in params]
    optimizer = LAMB(params, lr=0.01, max_grad_norm=None)
    for step in range(5):
        before = [p.detach().clone() for p in params]
        for param in params:
            param.grad = torch.cos(param.detach() * (step + 2)) * 10.0 ** (step - 2)
        optimizer.step()
        for old, param in zip(before, params, strict=True):
            moved = torch.linalg.vector_norm(param.detach() - old)
            assert float(moved) == pytest.approx(0.01 * float(torch.linalg.vector_norm(old)), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# pytorch_optimizer against the same loops, switched to its conventions: where it differs, and only there


@pytest.mark.parametrize("decoupled", [False, True])
def test_pytorch_optimizer_adopt_differs_from_the_authors_only_as_documented(
    problem: Problem, decoupled: bool, compare_runs: Any
) -> None:
    # pytorch_optimizer clips with clip_lambda(t), one step ahead of the authors' clip_lambda(t - 1), and
    # decays (decoupled) on the first step too, which the authors skip.
    options = {"lr": 3e-3, "weight_decay": 0.1}
    theirs = TorchRun(problem, lambda params: pytorch_optimizer.ADOPT(params, weight_decouple=decoupled, **options))
    loop = ReferenceRun(problem, ref.ADOPT(decouple=decoupled, variant="pytorch_optimizer", **options))
    compare_runs(theirs, loop, reference="pytorch_optimizer.ADOPT vs its conventions")
    if decoupled:  # the first step's decay alone tells the authors' ADOPT (ours) from pytorch_optimizer's
        authors = TorchRun(problem, lambda params: ADOPT(params, decouple=True, **options))
        other = TorchRun(problem, lambda params: pytorch_optimizer.ADOPT(params, weight_decouple=True, **options))
        authors.advance(0)
        other.advance(0)
        assert all(not torch.equal(a, b) for a, b in zip(authors.params, other.params, strict=True))


def test_pytorch_optimizer_ademamix_differs_from_the_authors_only_as_documented(
    problem: Problem, compare_runs: Any
) -> None:
    # pytorch_optimizer: alpha 5 by default, coupled decay unless weight_decouple, one warm-up length for alpha
    # and beta3, and the half-life without the authors' 1e-8 inside the logarithm.
    options = {"lr": 3e-3, "alpha": 2.0, "weight_decay": 0.1}
    theirs = TorchRun(
        problem,
        lambda params: pytorch_optimizer.AdEMAMix(params, weight_decouple=True, t_alpha_beta3=30, **options),
    )
    loop = ReferenceRun(problem, ref.AdEMAMix(alpha_warmup=30, beta3_warmup=30, half_life_eps=0.0, **options))
    compare_runs(theirs, loop, reference="pytorch_optimizer.AdEMAMix vs its conventions", rtol=1e-9)
    # 1e-9, not 1e-10: its decoupled decay scales p by (1 - lr w) before the update, the loop subtracts lr w p
    # within it, and the two roundings part by a few ulps per step.


def test_pytorch_optimizer_lamb_is_algorithm_2_only_without_decay(
    problem: Problem, compare_runs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without decay, eps 0 and its 10.0 cap on ||p|| lifted, pytorch_optimizer's Lamb is Algorithm 2 (the
    # bias corrections cancel in the trust ratio); with decay it cannot be (it decays outside the ratio).
    monkeypatch.setattr(pytorch_optimizer.Lamb, "clamp", float("inf"), raising=False)
    theirs = TorchRun(
        problem,
        lambda params: pytorch_optimizer.Lamb(params, lr=1e-2, weight_decay=0.0, eps=0.0, adam_debias=True),
    )
    ours = TorchRun(
        problem,
        lambda params: LAMB(params, lr=1e-2, weight_decay=0.0, eps=0.0, use_nvlamb=True, max_grad_norm=None),
    )
    compare_runs(ours, theirs, reference="pytorch_optimizer.Lamb (no decay)", rtol=1e-12)


@pytest.mark.parametrize("execution", ["bucketed", "compiled"])
@pytest.mark.parametrize("large_weights", [False, True], ids=["all-small", "weights-large"])
def test_lamb_reduces_over_each_param_of_a_bucket(
    execution: str, large_weights: bool, monkeypatch: pytest.MonkeyPatch, compare_runs: Any
) -> None:
    # One bucket holds all four params: its small ones are one segment whose norms are segmented by their
    # starts, each large one a segment of its own (a plain sum), and both equal the reference loop.
    from adaptopt import execution as engine
    from adaptopt.compiled import CompiledUpdate
    from conftest import PROBLEMS

    if large_weights:
        monkeypatch.setattr(engine, "IN_PLACE_GRAD_NUMEL", 20)
    problem = PROBLEMS["mlp"]
    compilations = CompiledUpdate.compilations
    ours = TorchRun(problem, lambda params: LAMB(params, lr=1e-2, execution=execution))
    theirs = TorchRun(problem, lambda params: LAMB(params, lr=1e-2, execution="reference"))
    compare_runs(ours, theirs, reference="LAMB, reference loop", rtol=1e-12)
    (bucket,) = engine.buckets(ours.optimizer)
    assert bucket.params == ours.params[1::2] + ours.params[::2] if large_weights else len(bucket.params) == 4
    if execution == "compiled":
        assert CompiledUpdate.compilations > compilations


@pytest.mark.parametrize("execution", ["bucketed", "compiled"])
@pytest.mark.parametrize("sizes", [(6, 6, 6, 6), (6, 4, 6)], ids=["one-size", "two-sizes"])
def test_lamb_norms_over_rows_of_params_of_one_size(execution: str, sizes: tuple[int, ...]) -> None:
    # Small params of one size are one segment read as a matrix (a param per row, `row_numel`), of several
    # sizes one segment with starts; a (2, 3) matrix among vectors of 6 is a row like them. Both equal the loop.
    from adaptopt import execution as engine

    generator = torch.Generator().manual_seed(7)
    shapes = [(2, 3) if index == 1 and size == 6 else (size,) for index, size in enumerate(sizes)]
    starts = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    ours = [start.clone().requires_grad_() for start in starts]
    loop = [start.clone().requires_grad_() for start in starts]
    optimizer = LAMB(ours, lr=1e-2, weight_decay=0.01, execution=execution)
    reference = LAMB(loop, lr=1e-2, weight_decay=0.01, execution="reference")
    for _ in range(20):
        grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
        for params, each in ((ours, optimizer), (loop, reference)):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            each.step()
    for param, expected in zip(ours, loop, strict=True):
        # 1e-12: the norms sum the same elements, a row at a time or segmented, in another order than the loop.
        torch.testing.assert_close(param, expected, rtol=1e-12, atol=0)
    (bucket,) = engine.buckets(optimizer)
    segment = bucket.segment(bucket.offsets[0], bucket.offsets[-1])
    assert (segment.row_numel, segment.starts is None) == ((6, True) if len(set(sizes)) == 1 else (None, False))
