"""Stochastic rounding of bf16 params (`stochastic_rounding=True`): the rounding itself, then optimizer steps.

What is checked, and against what:

* `functional.stochastic_round_to_bfloat16`: every bf16 value (all 65536 bit patterns) comes back unchanged;
  random float32s of every magnitude land on one of their two bf16 neighbours, computed here from torch's cast
  to nearest and `torch.nextafter`, not from bit patterns; the share of draws rounded up is the probability
  $(x - \\lfloor x \\rfloor) / (\\lceil x \\rceil - \\lfloor x \\rfloor)$ and their mean is $x$, within bounds
  from the binomial standard deviation written beside each assertion; NaN (any payload), ±inf and ±0 are kept,
  and near the largest bf16 no infinity appears that torch's cast would not make;
* a step of every registered optimizer on a bf16 param of many copies of a few values: each element is one of
  the two bf16 neighbours of the same step taken in fp32 (a float32 copy of the param), each row's mean is that
  step's within a binomial bound, and the moments are the fp32 run's rounded to nearest (their storage is not
  the option's business);
* updates far under half a bf16 ulp (Adam, Lion, AdaBelief, 10 steps): lost entirely to nearest, kept in
  expectation with the option, against an fp32 param with bf16 state (the same state, bit for bit);
* where it does not apply (off; fp32 and fp16 params) it changes nothing: bitwise, the buckets kept, and no
  random number drawn;
* validation, checkpoints (bitwise resume once torch's RNG state is restored too) and the execution modes.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch

import adaptopt
from adaptopt import WeightDecay, execution
from adaptopt.functional import stochastic_round_to_bfloat16
from dropin_support import (
    HESSIAN_EVERY,
    NAMES,
    assert_identical,
    make_model,
    make_optimizer,
    reference_execution,
    train,
)

pytestmark = pytest.mark.usefixtures("single_thread")

BF16_MAX = torch.finfo(torch.bfloat16).max
SIGMAS = 6.0
"""Statistical bounds are six standard deviations: a correct rounding fails one with probability about 2e-9
(normal tail), while a biased one (to nearest: off by up to half an ulp) fails it by orders of magnitude. The
draws are seeded, so each run of the suite sees the same numbers."""


def neighbours(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each float32 of `values` (both the value itself where bf16 holds
    it), from torch's cast to nearest and one bf16 step from there toward the value."""
    nearest = values.to(torch.bfloat16)
    exact = nearest.float() == values
    toward = torch.where(values > nearest.float(), math.inf, -math.inf).to(torch.bfloat16)
    other = torch.where(exact, nearest, torch.nextafter(nearest, toward))
    return torch.minimum(nearest, other), torch.maximum(nearest, other)


def round_up_probability(values: torch.Tensor) -> torch.Tensor:
    r"""$(x - \lfloor x \rfloor) / (\lceil x \rceil - \lfloor x \rfloor)$ in float64, 0 where bf16 holds $x$."""
    low, high = (bound.double() for bound in neighbours(values))
    gap = high - low
    return torch.where(gap > 0, (values.double() - low) / torch.where(gap > 0, gap, 1.0), 0.0)


def float32_of_bits(patterns: list[int]) -> torch.Tensor:
    """float32 values from their bit patterns (as unsigned 32-bit integers)."""
    signed = [pattern - (1 << 32) if pattern >= 1 << 31 else pattern for pattern in patterns]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


# ------------------------------------------------------------------------------------------------------------
# The rounding


def test_every_bf16_value_comes_back_unchanged() -> None:
    every_bf16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    torch.manual_seed(0)
    for _ in range(4):
        rounded = stochastic_round_to_bfloat16(every_bf16.float())
        assert rounded.dtype == torch.bfloat16
        same = rounded.view(torch.int16) == every_bf16.view(torch.int16)  # bitwise: ±0 and every NaN payload
        # A NaN may come back as another NaN (the cast's), never as a number.
        assert bool((same | (rounded.isnan() & every_bf16.isnan())).all())


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_the_result_is_one_of_the_two_bf16_neighbours(layout: str) -> None:
    # Random bit patterns: float32s of every magnitude, subnormals and both signs included, those bf16 can hold
    # finitely (the rest is the next test's). A transposed view checks that strides are respected.
    generator = torch.Generator().manual_seed(1)
    patterns = torch.randint(-(1 << 31), 1 << 31, (512, 512), dtype=torch.int64, generator=generator)
    values = patterns.to(torch.int32).view(torch.float32)
    values = torch.where(values.abs() <= BF16_MAX, values, 1.0)
    if layout == "transposed":
        values = values.t()
    low, high = neighbours(values)
    assert int((low != high).sum()) > 0.99 * values.numel()  # almost none is a bf16 already
    for seed in range(3):
        rounded = stochastic_round_to_bfloat16(values, generator=torch.Generator().manual_seed(seed))
        assert rounded.shape == values.shape
        assert bool(((rounded == low) | (rounded == high)).all())
        went_up = rounded == high
        # Both directions occur: the rounding is not to nearest, nor a truncation.
        assert bool((went_up & (low != high)).any()) and bool((~went_up & (low != high)).any())


PROBABILITY_CASES = {
    "a quarter": 1 + 2**-9,  # between 1 and 1 + 2^-7, a quarter of the way
    "three quarters, negative": -(1 + 3 * 2**-9),
    "a half": 1.5 + 2**-8,
    "one float32 ulp above a bf16": 1 + 2**-23,  # p = 2^-16: the smallest there is
    "just below a power of two": 2 - 2**-23,  # rounds up into the next binade
    "subnormal": 2.5 * 2**-133,  # bf16's smallest subnormal is 2^-133
    "a decimal": 0.1,
    "between the two largest bf16": BF16_MAX * (1 - 2**-9),
}


@pytest.mark.parametrize("value", PROBABILITY_CASES.values(), ids=PROBABILITY_CASES.keys())
def test_the_share_rounded_up_is_the_probability_and_the_mean_is_the_value(value: float) -> None:
    draws = 1 << 20
    x = torch.tensor(value, dtype=torch.float32)
    low, high = (float(bound) for bound in neighbours(x))
    probability = float(round_up_probability(x))
    assert low < float(x) < high and 0 < probability < 1
    torch.manual_seed(2)
    rounded = stochastic_round_to_bfloat16(x.expand(draws)).double()
    assert bool(((rounded == low) | (rounded == high)).all())
    # The number rounded up is Binomial(draws, p): its share has standard deviation sqrt(p (1 - p) / draws)
    # (at most 2^-11 here). For p = 2^-16, 16 expected, the normal approximation is rough, but six of its
    # standard deviations (24) are still far in the tail (Poisson(16) exceeds 40 with probability < 1e-6).
    share = float((rounded == high).double().mean())
    deviation = math.sqrt(probability * (1 - probability) / draws)
    assert abs(share - probability) <= SIGMAS * deviation, f"share {share!r}, p {probability!r}"
    # The mean is low + (high - low) * share, so it is x within (high - low) times the same bound; the float64
    # sum of a million bf16 values adds at most 2^20 * 2^-53 of relative error, far below it.
    mean = float(rounded.mean())
    assert abs(mean - float(x)) <= SIGMAS * deviation * (high - low) + 1e-9 * abs(float(x))


def test_nan_inf_zeros_and_the_largest_bf16() -> None:
    nans = float32_of_bits([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0xFF800001, 0x7F80FFFF])
    specials = torch.tensor([math.inf, -math.inf, 0.0, -0.0, BF16_MAX, -BF16_MAX])
    next_below_max = float(torch.nextafter(torch.tensor(BF16_MAX, dtype=torch.bfloat16), torch.tensor(0.0).bfloat16()))
    # Past the largest bf16 the upper neighbour would be infinity: rounded as the cast rounds (under half an ulp
    # of bf16 to the largest, from there on to infinity), so no infinity appears that the cast would not make.
    beyond = torch.tensor([BF16_MAX * (1 + 2**-10), BF16_MAX * (1 + 2**-8), torch.finfo(torch.float32).max])
    beyond = torch.cat([beyond, -beyond])
    between = torch.tensor([BF16_MAX * (1 - 2**-9), BF16_MAX * (1 - 2**-12)])  # inside the last bf16 gap
    torch.manual_seed(3)
    for _ in range(64):
        assert bool(stochastic_round_to_bfloat16(nans).isnan().all())
        rounded = stochastic_round_to_bfloat16(specials)
        assert torch.equal(rounded.float(), specials)
        assert torch.equal(rounded.float().signbit(), specials.signbit())  # -0.0 stays negative
        assert torch.equal(stochastic_round_to_bfloat16(beyond), beyond.to(torch.bfloat16))
        inside = stochastic_round_to_bfloat16(between.expand(1024, -1)).float()
        assert bool(((inside == next_below_max) | (inside == BF16_MAX)).all())
    assert beyond.to(torch.bfloat16).isinf().tolist() == [False, True, True] * 2  # both cases are covered


def test_the_noise_comes_from_torchs_generator() -> None:
    values = torch.linspace(-3, 3, 4099)
    torch.manual_seed(4)
    first = stochastic_round_to_bfloat16(values)
    second = stochastic_round_to_bfloat16(values)
    torch.manual_seed(4)
    assert torch.equal(stochastic_round_to_bfloat16(values), first)  # reproducible from the seed
    assert not torch.equal(first, second)  # and drawn afresh each call
    explicit = stochastic_round_to_bfloat16(values, generator=torch.Generator().manual_seed(4))
    assert torch.equal(explicit, first)  # the default generator seeded alike draws the same


# ------------------------------------------------------------------------------------------------------------
# Optimizer steps

ROWS, COPIES = 16, 4096


def copies_of_a_few_values(*, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 param of ROWS rows, each row COPIES copies of one value, and a grad of one value per row: every
    element of a row takes the same step, so a row's mean estimates the expectation of that step."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(ROWS, 1, generator=generator).to(torch.bfloat16).expand(ROWS, COPIES).contiguous()
    grads = torch.randn(ROWS, 1, generator=generator).to(torch.bfloat16).expand(ROWS, COPIES).contiguous()
    return values, grads


@pytest.mark.parametrize("name", NAMES)
def test_a_step_is_the_fp32_step_rounded_stochastically(name: str) -> None:
    values, grads = copies_of_a_few_values(seed=5)
    param = values.clone().requires_grad_()
    fp32 = values.float().requires_grad_()
    torch.manual_seed(6)
    ours = make_optimizer(name, [param], stochastic_rounding=True)
    # The option steps the group through the reference loop, on an fp32 copy of the param: so does the fp32 run.
    reference = make_optimizer(name, [fp32], **reference_execution())
    param.grad, fp32.grad = grads, grads.float()
    ours.step()
    reference.step()

    expected = fp32.detach()
    low, high = neighbours(expected)
    rounded = param.detach()
    assert bool(((rounded == low) | (rounded == high)).all()), "not one of the fp32 step's two bf16 neighbours"
    assert bool((rounded != expected.to(torch.bfloat16)).any()), "rounded to nearest everywhere"
    # Each element rounds up with probability p_i, independently, so a row's mean has standard deviation
    # sqrt(sum_i p_i (1 - p_i) (high_i - low_i)^2) / COPIES around the mean of the fp32 steps.
    probability = round_up_probability(expected)
    variance = (probability * (1 - probability) * (high.double() - low.double()) ** 2).sum(dim=1) / COPIES**2
    error = (rounded.double().mean(dim=1) - expected.double().mean(dim=1)).abs()
    slack = 1e-12 * expected.double().abs().amax(dim=1)  # float64 sums of 4096 values
    assert bool((error <= SIGMAS * variance.sqrt() + slack).all()), f"{error / variance.sqrt()} standard deviations"

    # The state keeps its storage (bf16, the param's dtype) and is rounded to nearest; copies of the weights in it
    # (Schedule-Free's z, Prodigy's p0) are rounded as the param is.
    weight_like = getattr(type(ours), "weight_like_state", frozenset())
    for key, value in ours.state[param].items():
        theirs = reference.state[fp32][key]
        if not (torch.is_tensor(value) and value.is_floating_point()):
            assert_identical(value, theirs, key)
        elif key in weight_like:
            near, far = neighbours(theirs)
            assert value.dtype == torch.bfloat16 and bool(((value == near) | (value == far)).all()), key
            if bool((near != far).any()):  # z moves with the step; p0, the starting point, does not
                assert bool((value != theirs.to(torch.bfloat16)).any()), f"{key} rounded to nearest everywhere"
        else:
            assert_identical(value, theirs.to(value.dtype), key)
            assert value.dtype == torch.bfloat16, key


TINY_UPDATES = {"adam": dict(lr=1e-4), "lion": dict(lr=1e-4), "adabelief": dict(lr=1e-4)}


@pytest.mark.parametrize("name", sorted(TINY_UPDATES))
def test_a_tiny_update_lost_to_nearest_is_kept_in_expectation(name: str) -> None:
    # 1.5 sits in [1, 2), where a bf16 ulp is 2^-7 = 0.0078: steps of about lr = 1e-4, under 1/70 of that, are
    # rounded away to nearest every time, and moved to the next bf16 down about once in 78 draws stochastically.
    copies, steps, ulp = 1 << 20, 10, 2.0**-7
    start = torch.full((copies,), 1.5, dtype=torch.bfloat16)
    options = {**TINY_UPDATES[name], "weight_decay": WeightDecay()}
    to_nearest, stochastic = start.clone().requires_grad_(), start.clone().requires_grad_()
    # The expectation: the same math in fp32 on an fp32 param, its state stored in bf16 as the bf16 runs store it.
    fp32 = start.float().requires_grad_()
    runs = [
        (to_nearest, make_optimizer(name, [to_nearest], **options)),
        (stochastic, make_optimizer(name, [stochastic], stochastic_rounding=True, **options)),
        (fp32, make_optimizer(name, [fp32], state_dtype=torch.bfloat16, **options)),
    ]
    torch.manual_seed(7)
    rng_before = torch.get_rng_state()
    for step in range(steps):
        grad = 1.0 + 0.5 * math.cos(step)  # one grad for every copy: their steps are all alike
        for param, optimizer in runs:
            param.grad = torch.full_like(param, grad)
            optimizer.step()
    assert not torch.equal(torch.get_rng_state(), rng_before)  # the stochastic run drew its noise from torch's

    assert bool((to_nearest.detach() == 1.5).all()), "to nearest, every update should have been lost"
    # The bf16 state of the stochastic run is the fp32 run's bit for bit: its updates do not depend on the param.
    assert_identical(runs[1][1].state[stochastic], runs[2][1].state[fp32])
    moved = float(fp32.detach()[0]) - 1.5
    # Each step's rounding error e_t has mean 0 given the past, |e_t| < ulp and variance p (1 - p) ulp^2 <= ulp^2/4,
    # so over the steps (a martingale) the variance adds up to at most steps * ulp^2 / 4 per copy, and the copies
    # are independent: the mean's standard deviation is at most ulp * sqrt(steps / (4 copies)), 2.4e-5 here. The
    # float32 additions of the fp32 run and of the working copies add at most 2 * steps * 2^-24 * 1.5.
    bound = SIGMAS * ulp * math.sqrt(steps / (4 * copies)) + 2 * steps * 2**-24 * 1.5
    assert abs(moved) > 5 * bound, "the test needs a move well above its own bound"
    mean_move = float(stochastic.detach().double().mean()) - 1.5
    assert abs(mean_move - moved) <= bound, f"moved {mean_move!r} on average, expected {moved!r} ± {bound:.2g}"


@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        (torch.bfloat16, {"stochastic_rounding": False}),
        (torch.float32, {"stochastic_rounding": True}),
        (torch.float16, {"stochastic_rounding": True}),  # bf16 only: fp16 params step as without the option
    ],
    ids=["bf16-off", "fp32-on", "fp16-on"],
)
@pytest.mark.parametrize("name", NAMES)
def test_where_it_does_not_apply_nothing_changes(name: str, dtype: torch.dtype, options: dict[str, Any]) -> None:
    # Nothing at all: the values bit for bit, the path (the same buckets) and torch's RNG, which stays untouched.
    plain, optioned = make_model(dtype), make_model(dtype)
    plain_optimizer = make_optimizer(name, plain.parameters())
    optimizer = make_optimizer(name, optioned.parameters(), **options)
    train(plain, plain_optimizer, range(2 * HESSIAN_EVERY))
    rng_before = torch.get_rng_state()
    train(optioned, optimizer, range(2 * HESSIAN_EVERY))
    assert torch.equal(torch.get_rng_state(), rng_before), "random numbers drawn"
    assert_identical(list(optioned.parameters()), list(plain.parameters()))
    for param, twin in zip(optioned.parameters(), plain.parameters(), strict=True):
        assert_identical(optimizer.state[param], plain_optimizer.state[twin])
    for part, plain_part in zip(parts(optimizer), parts(plain_optimizer), strict=True):
        assert len(list(execution.buckets(part))) == len(list(execution.buckets(plain_part)))


def parts(optimizer: torch.optim.Optimizer) -> list[Any]:
    """The adaptopt optimizers that `optimizer` steps: itself, or MuonWithAdamW's two."""
    return [optimizer.muon, optimizer.adamw] if isinstance(optimizer, adaptopt.MuonWithAdamW) else [optimizer]


# ------------------------------------------------------------------------------------------------------------
# Validation, checkpoints, execution modes


@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0])
def test_a_non_bool_is_refused(value: Any) -> None:
    params = [torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)]
    with pytest.raises(TypeError, match="stochastic_rounding must be a bool"):
        adaptopt.Adam(params, stochastic_rounding=value)
    optimizer = adaptopt.Lion(params)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        optimizer.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "stochastic_rounding": value})
    assert len(optimizer.param_groups) == 1


def test_master_weights_and_stochastic_rounding_exclude_each_other() -> None:
    # The master keeps every update, and the param is its rounding to nearest: asking for both is refused, as
    # torch.optim refuses fused=True with foreach=True, rather than one being silently ignored.
    params = [torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)]
    both = "stochastic_rounding=True cannot be combined with master_weights=True"
    with pytest.raises(ValueError, match=both):
        adaptopt.Adam(params, master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match=both):
        make_optimizer("muon", [torch.zeros(3, 3, requires_grad=True)], master_weights=True, stochastic_rounding=True)
    # Per group: against the defaults, either way round, and a refused group is not added.
    for defaults, group in (({"stochastic_rounding": True}, {"master_weights": True}), ({"master_weights": True}, {})):
        optimizer = adaptopt.Adam(params, **defaults)
        group = {"params": [torch.zeros(3, requires_grad=True)], **group}
        if not defaults.get("stochastic_rounding"):
            group["stochastic_rounding"] = True
        with pytest.raises(ValueError, match=both):
            optimizer.add_param_group(group)
        assert len(optimizer.param_groups) == 1
    # Side by side in different groups they are fine.
    mixed = adaptopt.Adam(
        [{"params": params, "stochastic_rounding": True}, {"params": [torch.zeros(3)], "master_weights": True}]
    )
    options = [(group["stochastic_rounding"], group["master_weights"]) for group in mixed.param_groups]
    assert options == [(True, False), (False, True)]


def bf16_params(*, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(24, 40), (40,), (7,)]
    return [torch.randn(shape, generator=generator).to(torch.bfloat16).requires_grad_() for shape in shapes]


def step_with_grads(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(100 + step)
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        optimizer.step()


@pytest.mark.parametrize("name", ["adam", "schedule_free_adamw"])
def test_a_checkpoint_resumes_bitwise_with_the_rng_state(name: str) -> None:
    # Schedule-Free also rounds its z (bf16, like the param) stochastically.
    params = bf16_params(seed=8)
    torch.manual_seed(9)
    optimizer = make_optimizer(name, params, stochastic_rounding=True)
    step_with_grads(optimizer, params, range(3))
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "params": [p.detach() for p in params]}, buffer)
    rng = torch.get_rng_state()
    step_with_grads(optimizer, params, range(3, 6))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert [group["stochastic_rounding"] for group in saved["optimizer"]["param_groups"]] == [True]
    resumed_params = [p.clone().requires_grad_() for p in saved["params"]]
    resumed = make_optimizer(name, resumed_params, stochastic_rounding=True)
    resumed.load_state_dict(saved["optimizer"])
    torch.set_rng_state(rng)
    step_with_grads(resumed, resumed_params, range(3, 6))
    assert_identical([p.detach() for p in resumed_params], [p.detach() for p in params])
    for param, twin in zip(resumed_params, params, strict=True):
        assert_identical(resumed.state[param], optimizer.state[twin])


def test_the_option_is_the_running_jobs_choice_on_load() -> None:
    # Like master_weights (KEPT_ON_LOAD): a checkpoint neither switches it on nor off, so it cannot bring it
    # together with master weights either.
    params = bf16_params(seed=10)
    torch.manual_seed(11)
    rounded = adaptopt.Adam(params, lr=1e-2, stochastic_rounding=True)
    step_with_grads(rounded, params, range(2))
    plain = adaptopt.Adam(params, lr=1e-2)
    plain.load_state_dict(rounded.state_dict())
    assert plain.param_groups[0]["stochastic_rounding"] is False
    mastered = adaptopt.Adam(params, lr=1e-2, master_weights=True)
    mastered.load_state_dict(rounded.state_dict())
    assert mastered.param_groups[0]["stochastic_rounding"] is False
    assert all(torch.equal(mastered.state[p]["master_weight"], p.detach().float()) for p in params)
    again = adaptopt.Adam(params, lr=1e-2, stochastic_rounding=True)
    again.load_state_dict(plain.state_dict())
    assert again.param_groups[0]["stochastic_rounding"] is True
    assert_identical(again.state[params[0]], rounded.state[params[0]])  # bf16 state, as saved


def test_every_execution_mode_steps_alike() -> None:
    # A group that rounds stochastically runs through the reference loop in every mode, so for one seed every mode
    # draws the same noise in the same order: bit for bit the same run. A group mixing fp32 params in goes the same
    # way (the fp32 ones are stepped on themselves and need no rounding).
    results = {}
    for mode in execution.EXECUTION_MODES:
        params = bf16_params(seed=12)
        mixed = [torch.linspace(-1, 1, 30).requires_grad_(), torch.ones(5, dtype=torch.bfloat16).requires_grad_()]
        torch.manual_seed(13)
        optimizer = adaptopt.Adam(
            [{"params": params}, {"params": mixed}], lr=1e-3, stochastic_rounding=True, execution=mode
        )
        step_with_grads(optimizer, params + mixed, range(4))
        assert not list(execution.buckets(optimizer)), f"{mode}: a stochastically rounded group was bucketed"
        results[mode] = ([p.detach() for p in params + mixed], [optimizer.state[p] for p in params + mixed])
    for mode, result in results.items():
        assert_identical(result, results["reference"], mode)
    assert all(p.dtype == torch.bfloat16 for p in results["auto"][0][:3])
