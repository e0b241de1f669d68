"""Low-bit optimizer state (`state_dtype="8bit"` / `"4bit"`): the storage policy of the base, for every optimizer.

What is checked, and against what:

* every registered optimizer, 8 and 4 bits, float64 params, 20 steps: against a float64 *reference loop*
  written here, the same optimizer with full-precision state (`state_dtype=None`) whose quantized entries are
  sent through `adaptopt.quantization`'s own block-wise functions after every step (codes, packing, scales,
  decoding to float32 and back up to float64). The entries it rounds are named here by optimizer
  (`QUANTIZED`), not taken from the base's rule, so a base that quantizes the wrong entry, misses one, or
  quantizes twice a step fails. Agreement within 1e-12 of each tensor's scale (the family's tolerance for the
  same math); a check beside it shows that the rounding moves the run by far more than that;
* tensors under `low_bit_min_numel`: exactly the run with full-precision state, bit for bit;
* Adam 8-bit against torchao 0.13's `AdamW8bit` on this CPU, with the tolerance argued at the test;
* checkpoints: codes and scales that `torch.load(weights_only=True)` reads, at most 2.1 / 1.1 bytes a
  parameter for Adam (a saved file, 1M params), bitwise resume in this process and in a fresh one, the
  conversions to and from other storage (warned, and exact), and refusals that change nothing;
* `state_dtype` and `low_bit_min_numel` validation, per-group mixing.
"""

from __future__ import annotations

import copy
import io
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaptopt
from adaptopt.base import StateConversionWarning
from adaptopt.quantization import (
    DEFAULT_BLOCK_SIZES,
    QuantizedTensor,
    dequantize_blockwise,
    pack_nibbles,
    quantization_map,
    quantize_blockwise,
    select_map,
    unpack_nibbles,
)
from dropin_support import NAMES, make_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")

BITS = {"8bit": 8, "4bit": 4}
STEPS = 20
THRESHOLD = 128
"""`low_bit_min_numel` of these tests: the model below then has quantized tensors with whole and partial
blocks at both widths (2400 = 9 x 256 + 96 = 18 x 128 + 96, 200, 1000) and unquantized ones (a bias of 5)."""

IN, HIDDEN, OUT, BATCH = 12, 200, 5, 16

# The entries each optimizer keeps quantized for a param of at least THRESHOLD elements, when it has them: the
# per-element moments. Not listed, so kept in full precision: Schedule-Free's z and Prodigy's p0 (weight
# copies), Adafactor's factored row_var/col_var (not param-shaped), the step.
ADAM_MOMENTS = frozenset({"exp_avg", "exp_avg_sq"})
QUANTIZED: dict[str, frozenset[str]] = {
    "adam": ADAM_MOMENTS,
    "amsgrad": ADAM_MOMENTS | {"max_exp_avg_sq"},
    "adam_warmup": ADAM_MOMENTS,
    "adam_warmup_cosine_decay": ADAM_MOMENTS,
    "noam": ADAM_MOMENTS,
    "radam": ADAM_MOMENTS,
    "adabelief": frozenset({"exp_avg", "exp_avg_var", "max_exp_avg_var"}),
    "sophia": frozenset({"exp_avg", "hessian"}),
    "lion": frozenset({"exp_avg"}),
    "adopt": ADAM_MOMENTS,
    "ademamix": ADAM_MOMENTS | {"exp_avg_slow"},
    "schedule_free_adamw": frozenset({"exp_avg_sq"}),
    "prodigy": ADAM_MOMENTS | {"s"},
    "lamb": ADAM_MOMENTS,
    "adafactor": frozenset({"variance"}),
    "muon": ADAM_MOMENTS | {"momentum_buffer"},  # Muon's momentum for the matrices, AdamW's for the rest
}
assert set(QUANTIZED) == set(NAMES)


# --------------------------------------------------------------------------------------------------
# The problem: a 12-200-5 tanh MLP, cross-entropy on fixed batches; Sophia's Hessian estimate every other step.


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))
    return model.to(dtype)


def loss_on(model: torch.nn.Module, step: int, *, sampled: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    dtype = next(model.parameters()).dtype
    inputs = torch.randn(BATCH, IN, generator=generator, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, OUT, (BATCH,), generator=generator)
    logits = model(inputs).to(torch.promote_types(dtype, torch.float32))
    if sampled:  # Sophia's Gauss-Newton-Bartlett estimate: labels drawn from the model itself
        sampler = torch.Generator().manual_seed(900 + step)
        labels = torch.multinomial(logits.detach().softmax(-1), 1, generator=sampler).squeeze(-1)
    return F.cross_entropy(logits, labels)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    after_step: Callable[[], None] = lambda: None,
) -> None:
    if isinstance(optimizer, adaptopt.Sophia) and step % 2 == 1:
        optimizer.zero_grad(set_to_none=True)
        loss_on(model, step, sampled=True).backward()
        optimizer.update_hessian(BATCH)
        after_step()  # the estimate is stored as soon as it is written, before the step reads it
    optimizer.zero_grad(set_to_none=True)
    loss_on(model, step).backward()
    optimizer.step()
    after_step()


def settings_for(name: str) -> dict[str, Any]:
    # AdaBelief's AMSGrad form, so that its running maximum is quantized too.
    return {"amsgrad": True} if name == "adabelief" else {}


def low_bit_optimizer(name: str, model: torch.nn.Module, state_dtype: str, **overrides: Any) -> torch.optim.Optimizer:
    return make_optimizer(
        name,
        model.parameters(),
        state_dtype=state_dtype,
        low_bit_min_numel=THRESHOLD,
        **settings_for(name),
        **overrides,
    )


# --------------------------------------------------------------------------------------------------
# The reference rounding, from the quantization module's block-wise functions


def round_trip(values: torch.Tensor, bits: int, sign: str) -> torch.Tensor:
    """`values` stored in `bits`-bit codes and read back: quantize, (pack, unpack), decode to float32, and
    back to the dtype of `values` (float64 here, an exact upcast)."""
    code_map = quantization_map(bits, sign)  # type: ignore[arg-type]
    block_size = DEFAULT_BLOCK_SIZES[bits]
    codes, scales = quantize_blockwise(values, code_map, block_size)
    if bits == 4:
        codes = unpack_nibbles(pack_nibbles(codes), values.numel())
    return dequantize_blockwise(codes, scales, code_map, block_size).view(values.shape).to(values.dtype)


def params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]


class StateRounder:
    """The reference's storage step, after every `step()`: each entry of QUANTIZED[name] of a large enough param
    that changed since it was last stored is rounded through its codes. An unchanged entry keeps its codes in
    the policy (decoding and encoding again is not the identity), and so it is left alone here; every such
    entry starts at zero, which fresh codes hold exactly (scale 0)."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, bits: int) -> None:
        self.optimizer, self.keys, self.bits = optimizer, QUANTIZED[name], bits
        self.last_stored: dict[tuple[int, str], torch.Tensor] = {}

    def __call__(self) -> None:
        for index, param in enumerate(params_of(self.optimizer)):
            if param.numel() < THRESHOLD:
                continue
            state = self.optimizer.state[param]
            for key in self.keys & state.keys():
                before = self.last_stored.get((index, key), torch.zeros_like(state[key]))
                if not torch.equal(state[key], before):
                    state[key].copy_(round_trip(state[key], self.bits, select_map(key)))
                self.last_stored[index, key] = state[key].clone()


def decoded(value: Any, dtype: torch.dtype = torch.float64) -> Any:
    return value.dequantize(dtype) if isinstance(value, QuantizedTensor) else value


def relative_gap(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| over the scale max |expected| (1 for an all-zero tensor)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return float((actual - expected).abs().max()) / (scale or 1.0) if expected.numel() else 0.0


def plain(value: Any) -> Any:
    """Nested state with quantized entries as their state dicts, for `assert_identical`."""
    if isinstance(value, QuantizedTensor):
        return value.state_dict()
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    return value


def assert_identical(actual: Any, expected: Any, where: str = "") -> None:
    """Bitwise equality of nested values (tensors in dtype, shape and every byte)."""
    actual, expected = plain(actual), plain(expected)
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        assert torch.equal(actual.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)), where
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and set(actual) == set(expected), f"{where}: keys differ"
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{where}[{index}]")
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"


def snapshot(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    params = params_of(optimizer)
    return {
        "state": [copy.deepcopy(optimizer.state.get(param, {})) for param in params],
        "groups": [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups],
        "values": [param.detach().clone() for param in params],
    }


def through_disk(checkpoint: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------------------------------
# Every optimizer against the float64 reference loop


@pytest.mark.parametrize("state_dtype", BITS)
@pytest.mark.parametrize("name", NAMES)
def test_low_bit_state_follows_a_float64_reference_that_rounds_the_same_entries(name: str, state_dtype: str) -> None:
    bits = BITS[state_dtype]
    model, reference_model, unrounded_model = make_model(), make_model(), make_model()
    optimizer = low_bit_optimizer(name, model, state_dtype)
    reference = make_optimizer(name, reference_model.parameters(), execution="reference", **settings_for(name))
    unrounded = make_optimizer(name, unrounded_model.parameters(), execution="reference", **settings_for(name))
    round_state = StateRounder(reference, name, bits)
    for step in range(STEPS):
        train_step(model, optimizer, step)
        train_step(reference_model, reference, step, round_state)
        train_step(unrounded_model, unrounded, step)

    quantized_somewhere = False
    for index, (param, expected_param) in enumerate(zip(params_of(optimizer), params_of(reference), strict=True)):
        state, expected_state = optimizer.state[param], reference.state[expected_param]
        codes = {key for key, value in state.items() if isinstance(value, QuantizedTensor)}
        wanted = QUANTIZED[name] & state.keys() if param.numel() >= THRESHOLD else set()
        assert codes == wanted, f"param {index}: quantized {sorted(codes)}, expected {sorted(wanted)}"
        quantized_somewhere |= bool(codes)
        assert set(state) == set(expected_state)
        # 1e-12 of the scale: the family's tolerance for the same float64 math; this run does the reference's
        # operations in its order, so what is met here is 0 (bitwise), and a rounding that is missed, added,
        # or done with another code book or block is off by 1e-4 to 1e-1 of the scale.
        assert relative_gap(param.detach(), expected_param.detach()) <= 1e-12, f"param {index}"
        for key, value in state.items():
            expected = expected_state[key]
            if isinstance(expected, torch.Tensor):
                assert relative_gap(decoded(value), expected) <= 1e-12, f"param {index}: {key}"
                if key not in codes:
                    assert isinstance(value, torch.Tensor) and value.dtype == torch.float64, (
                        f"param {index}: {key} is kept in the float64 working precision"
                    )
            else:
                assert value == expected, f"param {index}: {key}"
    assert quantized_somewhere
    # The agreement above means something: the rounded run is far from the one with full-precision state.
    moved = max(
        relative_gap(param.detach(), other.detach())
        for param, other in zip(params_of(optimizer), params_of(unrounded), strict=True)
    )
    assert moved > 1e-7, f"{name}: quantization moved the params by only {moved:.2e}"


@pytest.mark.parametrize("state_dtype", BITS)
@pytest.mark.parametrize("name", NAMES)
def test_tensors_under_the_threshold_keep_exactly_the_full_precision_state(name: str, state_dtype: str) -> None:
    # float32 params (the usual case) of at most 200 elements, under the default threshold of 4096.
    model, twin = make_model(torch.float32), make_model(torch.float32)
    optimizer = make_optimizer(name, model.parameters(), state_dtype=state_dtype, **settings_for(name))
    full = make_optimizer(name, twin.parameters(), execution="reference", **settings_for(name))
    assert optimizer.param_groups[0]["low_bit_min_numel"] == 4096
    for step in range(10):
        train_step(model, optimizer, step)
        train_step(twin, full, step)
    for index, (param, other) in enumerate(zip(params_of(optimizer), params_of(full), strict=True)):
        assert_identical(param.detach(), other.detach(), f"param {index}")
        assert_identical(optimizer.state[param], full.state[other], f"state of param {index}")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numel=st.integers(min_value=1, max_value=700),
    threshold=st.integers(min_value=0, max_value=700),
    bits=st.sampled_from([8, 4]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_adam_quantizes_exactly_the_tensors_at_or_over_the_threshold(
    numel: int, threshold: int, bits: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(numel, generator=generator, dtype=torch.float64)
    grads = [torch.randn(numel, generator=generator, dtype=torch.float64) * 10.0**k for k in (-3, 0, 2)]
    param, twin = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    state_dtype = f"{bits}bit"
    optimizer = adaptopt.Adam([param], lr=1e-2, state_dtype=state_dtype, low_bit_min_numel=threshold)
    reference = adaptopt.Adam([twin], lr=1e-2, execution="reference")
    for grad in grads:
        param.grad, twin.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
        if numel >= threshold:
            for key in ADAM_MOMENTS:
                reference.state[twin][key].copy_(round_trip(reference.state[twin][key], bits, select_map(key)))
    quantized = {key for key, value in optimizer.state[param].items() if isinstance(value, QuantizedTensor)}
    assert quantized == (set(ADAM_MOMENTS) if numel >= threshold else set())
    assert relative_gap(param.detach(), twin.detach()) <= 1e-12  # the same float64 math, in the same order
    for key in ADAM_MOMENTS:
        assert relative_gap(decoded(optimizer.state[param][key]), reference.state[twin][key]) <= 1e-12


# --------------------------------------------------------------------------------------------------
# Against torchao's AdamW8bit


def test_adam_8bit_follows_torchao_adamw8bit(monkeypatch: pytest.MonkeyPatch) -> None:
    torchao_optim = pytest.importorskip("torchao.optim")
    from torchao.optim import subclass_8bit

    # Our unsigned 8-bit map has no zero, theirs does (test_a_second_moment_that_torchao_stores_as_zero_...):
    # give torchao ours, so that what is compared is the optimizer built on it.
    ours_unsigned = quantization_map(8, "unsigned").tolist()
    monkeypatch.setattr(subclass_8bit, "get_qmap_unsigned", lambda: ours_unsigned)
    # torchao quantizes only tensors of >= 4096 elements that are whole blocks of 256: both are here, and
    # the 64-element bias stays fp32 in both.
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    bias = torch.randn(64)
    ours_params = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
    theirs_params = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
    fp32_params = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
    lr, betas, eps = 1e-3, (0.9, 0.999), 1e-8
    # Their update is torch.optim.Adam's form (eps after the bias-corrected root): ours with optimized_update
    # off. No weight decay: the two decays are the same math, but test one thing.
    common = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, optimized_update=False)
    ours = adaptopt.Adam(ours_params, state_dtype="8bit", **common)  # type: ignore[arg-type]
    fp32 = adaptopt.Adam(fp32_params, execution="reference", **common)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's notes about torchao's tensor subclass
        theirs = torchao_optim.AdamW8bit(theirs_params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        generator = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            grads = [torch.randn(p.shape, generator=generator) * 0.1 for p in ours_params]
            for params in (ours_params, theirs_params, fp32_params):
                for param, grad in zip(params, grads, strict=True):
                    param.grad = grad.clone()
            ours.step()
            theirs.step()
            fp32.step()

    # Where the two can differ: the moments' float32 updates differ in the last bits (v as mul-add here, as a
    # lerp there; their bias corrections in float32 from a float32 step, ours in float64; their update
    # compiled), so the block scales (absmax) differ by a few float32 ulps, and a last-bit difference could
    # move a code that lands on a rounding boundary by one place. Measured over these 20 steps: every code
    # equal, scales within 4.1e-7 relative (3.5 ulps), params within 4.8e-7 (one ulp at |p| ~ 4).
    for key in ("exp_avg", "exp_avg_sq"):
        mine_q, their_q = ours.state[ours_params[0]][key], theirs.state[theirs_params[0]][key]
        differing = int((mine_q.codes != their_q.codes.reshape(-1)).sum())
        # At most 0.1% of the codes a place off: each would be one float32 tie among 8192 elements.
        assert differing <= mine_q.codes.numel() // 1000, f"{key}: {differing} codes differ"
        their_scales = their_q.scale.reshape(-1)
        # 8 float32 ulps (2^-23 each) relative: the moments go through ~4 roundings a step in another order.
        assert float(((mine_q.scales - their_scales).abs() / their_scales).max()) <= 8 * 2.0**-23, key
    # Params: each run rounds each param to float32 once a step, in another order of operations; 8 ulps of
    # the largest |p| bounds where they end (measured: 1 ulp). The fp32-state run is the yardstick showing that
    # the agreement is torchao's quantized trajectory, not Adam's: it is ~1000 times farther off.
    for index, (mine, their, full) in enumerate(zip(ours_params, theirs_params, fp32_params, strict=True)):
        gap = float((mine - their).detach().abs().max())
        bound = 8 * 2.0**-23 * float(their.detach().abs().max())
        assert gap <= bound, f"param {index}: {gap:.3e} from torchao, over {bound:.3e}"
        if index == 0:
            assert float((mine - full).detach().abs().max()) > 100 * bound, "fp32 state is far off"


def test_a_second_moment_that_torchao_stores_as_zero_does_not_blow_up_the_step() -> None:
    """The zero-point problem (Li et al. 2023, §4.1), which made Adam with torchao's 8-bit code books diverge
    on the MNIST CNN. One block of 256 where one gradient is 1 and the others 1e-4: their v is 1e-8 of the
    block's largest, below half the smallest nonzero code of the dynamic map (3.25e-7), while their m, 1e-4
    of the largest, has codes near it. torchao stores v = 0 and, at the next step (gradient 0), moves those
    weights by lr * m / eps; our map without zero moves them by less than fp32 Adam does."""
    torchao_optim = pytest.importorskip("torchao.optim")
    lr = 1e-3
    first_grad = torch.full((4096,), 1e-4)
    first_grad[::256] = 1.0
    moved = {}
    for name in ("ours", "torchao", "fp32"):
        param = torch.nn.Parameter(torch.zeros(4096))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.compile's notes about torchao's tensor subclass
            if name == "torchao":
                optimizer: torch.optim.Optimizer = torchao_optim.AdamW8bit([param], lr=lr, weight_decay=0.0)
            else:
                state_dtype = "8bit" if name == "ours" else None
                optimizer = adaptopt.Adam([param], lr=lr, weight_decay=0.0, state_dtype=state_dtype)
            for grad in (first_grad, torch.zeros(4096)):
                before = param.detach().clone()
                param.grad = grad.clone()
                optimizer.step()
        moved[name] = float((param.detach() - before).abs().max())
    # fp32 Adam's second step, for every element alike (each is its gradient g times the same ratio):
    # m_hat / sqrt(v_hat) = (0.9 * 0.1 g / 0.19) / sqrt(0.999 * 0.001 g^2 / 0.001999) = 0.670 (eps aside).
    second_step = (0.9 * 0.1 / (1 - 0.9**2)) / (0.999 * 0.001 / (1 - 0.999**2)) ** 0.5
    assert moved["fp32"] == pytest.approx(lr * second_step, rel=1e-4)  # eps = 1e-8 against sqrt(v_hat) >= 7e-5
    # Ours: the blocks' largest elements code exactly (normalized to 1), the small ones' v rounds up to
    # 5.5e-8 of the largest, so they move less. 1e-6 relative for the float32 arithmetic of the largest.
    assert moved["ours"] <= moved["fp32"] * (1 + 1e-6), moved
    assert moved["torchao"] > 1e3 * lr, f"torchao's zero no longer blows up this step: {moved}"


# --------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize(("state_dtype", "bound"), [("8bit", 2.1), ("4bit", 1.1)])
def test_an_adam_checkpoint_takes_at_most_its_bytes_per_parameter(
    state_dtype: str, bound: float, tmp_path: Path
) -> None:
    model = torch.nn.Linear(1024, 1024)  # 1,049,600 params; the 1024-element bias stays fp32
    optimizer = adaptopt.Adam(model.parameters(), lr=1e-3, state_dtype=state_dtype)
    model(torch.randn(4, 1024)).square().mean().backward()
    optimizer.step()
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    per_param = path.stat().st_size / sum(param.numel() for param in model.parameters())
    # Codes and scales are 2.03 (8 bits) and 1.06 (4 bits) bytes a param for two moments; the file adds
    # the fp32 bias state and the zip's headers.
    assert per_param <= bound, f"{per_param:.3f} bytes a parameter"
    loaded = torch.load(path, weights_only=True)
    assert loaded["state"][0]["exp_avg"]["bits"] == {"8bit": 8, "4bit": 4}[state_dtype]


@pytest.mark.parametrize("state_dtype", BITS)
@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_low_bit_checkpoint_is_bitwise(name: str, state_dtype: str) -> None:
    model, resumed_model = make_model(torch.float32), make_model(torch.float32)
    optimizer = low_bit_optimizer(name, model, state_dtype)
    for step in range(5):
        train_step(model, optimizer, step)
    checkpoint = through_disk({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = low_bit_optimizer(name, resumed_model, state_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StateConversionWarning)  # same format: codes as they are
        resumed.load_state_dict(checkpoint["optimizer"])
    for step in range(5, 10):
        train_step(model, optimizer, step)
        train_step(resumed_model, resumed, step)
    for index, (param, other) in enumerate(zip(params_of(optimizer), params_of(resumed), strict=True)):
        assert_identical(other.detach(), param.detach(), f"param {index}")
        assert_identical(resumed.state[other], optimizer.state[param], f"state of param {index}")


FRESH_PROCESS = """
import sys, torch, adaptopt
torch.set_num_threads(1)  # as the single_thread fixture: the same grads, summed in the same order
sys.path.insert(0, sys.argv[1])
import test_low_bit as t
model = t.make_model(torch.float32)
checkpoint = torch.load(sys.argv[2], weights_only=True)
model.load_state_dict(checkpoint["model"])
optimizer = t.low_bit_optimizer(sys.argv[4], model, sys.argv[5])
optimizer.load_state_dict(checkpoint["optimizer"])
for step in range(5, 10):
    t.train_step(model, optimizer, step)
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, sys.argv[3])
"""


@pytest.mark.parametrize(("name", "state_dtype"), [("adam", "8bit"), ("adam", "4bit"), ("prodigy", "8bit")])
def test_resume_in_a_fresh_process_is_bitwise(name: str, state_dtype: str, tmp_path: Path) -> None:
    model = make_model(torch.float32)
    optimizer = low_bit_optimizer(name, model, state_dtype)
    for step in range(5):
        train_step(model, optimizer, step)
    saved, result = tmp_path / "at5.pt", tmp_path / "at10.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    for step in range(5, 10):
        train_step(model, optimizer, step)
    command = [sys.executable, "-c", FRESH_PROCESS, str(Path(__file__).parent), str(saved), str(result), name]
    subprocess.run([*command, state_dtype], check=True, timeout=300)
    continued = torch.load(result, weights_only=True)
    assert_identical(continued["model"], model.state_dict(), "params")
    assert_identical(continued["optimizer"], through_disk(optimizer.state_dict()), "optimizer")


def trained_adam(
    state_dtype: str | torch.dtype | None, steps: int = 3
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    optimizer = adaptopt.Adam(model.parameters(), lr=1e-2, state_dtype=state_dtype, low_bit_min_numel=THRESHOLD)
    for step in range(steps):
        train_step(model, optimizer, step)
    return model, optimizer


def test_a_low_bit_checkpoint_loads_into_full_precision_state_decoded_and_warned() -> None:
    _, low_bit = trained_adam("8bit")
    _, full = trained_adam(None, steps=0)
    with pytest.warns(StateConversionWarning, match=r"exp_avg of param 0 from 8-bit codes to torch.float64"):
        full.load_state_dict(through_disk(low_bit.state_dict()))
    for param, other in zip(params_of(full), params_of(low_bit), strict=True):
        for key in ADAM_MOMENTS:
            value = full.state[param][key]
            assert isinstance(value, torch.Tensor) and value.dtype == torch.float64
            # Exactly the decoded values: float32 q * s, upcast exactly.
            assert torch.equal(value, decoded(low_bit.state[other][key]))


def test_a_full_precision_checkpoint_loads_into_low_bit_state_quantized_and_warned() -> None:
    _, full = trained_adam(None)
    _, low_bit = trained_adam("4bit", steps=0)
    with pytest.warns(StateConversionWarning, match=r"exp_avg_sq of param 0 from torch.float64 to 4-bit unsigned"):
        low_bit.load_state_dict(through_disk(full.state_dict()))
    for param, other in zip(params_of(low_bit), params_of(full), strict=True):
        for key in ADAM_MOMENTS:
            value = low_bit.state[param][key]
            if param.numel() >= THRESHOLD:
                assert isinstance(value, QuantizedTensor) and value.bits == 4
                assert torch.equal(
                    value.dequantize(torch.float64), round_trip(full.state[other][key], 4, select_map(key))
                )
            else:
                assert torch.equal(value, full.state[other][key])


def test_codes_of_another_width_are_converted_and_warned() -> None:
    _, eight = trained_adam("8bit")
    _, four = trained_adam("4bit", steps=0)
    with pytest.warns(StateConversionWarning, match=r"from 8-bit codes to 4-bit"):
        four.load_state_dict(eight.state_dict())
    for param, other in zip(params_of(four), params_of(eight), strict=True):
        if param.numel() >= THRESHOLD:
            value = four.state[param]["exp_avg"]
            assert isinstance(value, QuantizedTensor) and value.bits == 4
            expected = round_trip(decoded(eight.state[other]["exp_avg"]), 4, "signed")
            assert torch.equal(value.dequantize(torch.float64), expected)


def test_saved_codes_put_into_the_state_as_zero_loads_them_are_converted_like_load_state_dict() -> None:
    """ZeroRedundancyOptimizer.load_state_dict puts each saved param state into the local optimizer's `state`
    as it is: low-bit entries arrive as checkpoint dicts, here 8-bit ones in a 4-bit group. The first step
    converts them, warned, exactly as `load_state_dict` would have (then both step alike)."""
    eight_model, eight = trained_adam("8bit")
    saved = through_disk(eight.state_dict())
    runs = []
    for how in ("put in", "load_state_dict"):
        model, four = trained_adam("4bit", steps=0)
        model.load_state_dict(eight_model.state_dict())
        if how == "put in":
            for index, param in enumerate(params_of(four)):
                four.state[param] = copy.deepcopy(saved["state"][index])  # ZeRO's load, without ours
            with pytest.warns(StateConversionWarning, match=r"exp_avg of param 'loaded by ZeroRedundancyOptimizer' "):
                train_step(model, four, 3)
        else:
            with pytest.warns(StateConversionWarning, match=r"from 8-bit codes to 4-bit"):
                four.load_state_dict(saved)
            train_step(model, four, 3)
        runs.append(four)
    for param, other in zip(params_of(runs[0]), params_of(runs[1]), strict=True):
        assert torch.equal(param, other)
        for key in ADAM_MOMENTS:
            value, wanted = runs[0].state[param][key], runs[1].state[other][key]
            assert type(value) is type(wanted)
            if isinstance(value, QuantizedTensor):
                assert value.bits == 4 and torch.equal(value.codes, wanted.codes)
            assert torch.equal(decoded(value), decoded(wanted))


def test_a_low_bit_checkpoint_into_bf16_state_is_converted() -> None:
    _, low_bit = trained_adam("8bit")
    _, bf16 = trained_adam(torch.bfloat16, steps=0)
    with pytest.warns(StateConversionWarning, match="to torch.bfloat16"):
        bf16.load_state_dict(low_bit.state_dict())
    assert {bf16.state[p]["exp_avg"].dtype for p in params_of(bf16)} == {torch.bfloat16}


def broken_codes(checkpoint: dict[str, Any], case: str) -> dict[str, Any]:
    entry = checkpoint["state"][0]["exp_avg"]
    if case == "missing scales":
        del entry["scales"]
    elif case == "codes of another dtype":
        entry["codes"] = entry["codes"].to(torch.int32)
    elif case == "too few scales":
        entry["scales"] = entry["scales"][:-1]
    elif case == "another shape":
        entry["shape"] = [entry["shape"][1], entry["shape"][0]]
    elif case == "unknown map":
        entry["map"] = "nonnegative"
    elif case == "codes where a step is":
        checkpoint["state"][0]["step"] = entry
    return checkpoint


@pytest.mark.parametrize(
    "case",
    [
        "missing scales",
        "codes of another dtype",
        "too few scales",
        "another shape",
        "unknown map",
        "codes where a step is",
    ],
)
@pytest.mark.parametrize("state_dtype", ["8bit", None])
def test_a_broken_low_bit_checkpoint_is_rejected_and_changes_nothing(case: str, state_dtype: str | None) -> None:
    _, source = trained_adam("8bit")
    _, target = trained_adam(state_dtype, steps=2)
    before = snapshot(target)
    checkpoint = broken_codes(through_disk(source.state_dict()), case)
    with pytest.raises(ValueError):
        target.load_state_dict(checkpoint)
    assert_identical(snapshot(target), before)


def test_sophia_stores_its_hessian_as_codes_as_soon_as_it_is_written() -> None:
    model = make_model()
    optimizer = low_bit_optimizer("sophia", model, "8bit")
    for step in range(2):
        train_step(model, optimizer, step)  # step 1 estimates the Hessian first
    weight = model[0].weight
    assert isinstance(optimizer.state[weight]["hessian"], QuantizedTensor)
    loss_on(model, 7, sampled=True).backward()
    held = decoded(optimizer.state[weight]["hessian"]).clone()
    expected = held * 0.95 + 0.05 * BATCH * weight.grad.square()  # Sophia's beta2 = 0.95, in float64
    optimizer.update_hessian(BATCH)  # writes through state_for, then stores the estimate as codes at once
    assert isinstance(optimizer.state[weight]["hessian"], QuantizedTensor)
    assert torch.equal(
        optimizer.state[weight]["hessian"].dequantize(torch.float64), round_trip(expected, 8, "unsigned")
    )
    saved = optimizer.state_dict()
    assert set(saved["state"][0]["hessian"]) == {"codes", "scales", "shape", "bits", "map", "block_size"}
    # A caller of state_for that writes outside a step keeps its decoded tensor until the next step stores it.
    optimizer.state_for(optimizer.param_groups[0], weight)["hessian"].mul_(2.0)
    assert isinstance(optimizer.state[weight]["hessian"], torch.Tensor)
    assert isinstance(optimizer.state_dict()["state"][0]["hessian"], dict)  # saved as codes all the same


@pytest.mark.parametrize("name", ["prodigy", "lamb"])
@pytest.mark.parametrize("state_dtype", ["8bit", "4bit"])
def test_a_first_pass_that_only_reads_the_state_leaves_the_other_params_codes_in_place(
    name: str, state_dtype: str
) -> None:
    # Prodigy's and LAMB's first pass reads every param's state before the update writes any: were the decoded
    # state held between the passes, every param's would exist in fp32 at once, the memory low-bit state saves.
    model = make_model()
    optimizer = low_bit_optimizer(name, model, state_dtype, execution="reference")
    train_step(model, optimizer, 0)
    quantized = {
        (param, key)
        for param, state in optimizer.state.items()
        for key, value in state.items()
        if isinstance(value, QuantizedTensor)
    }
    assert len({param for param, _ in quantized}) >= 2
    held_elsewhere: list[int] = []
    step_param = optimizer.step_param

    def watched(
        state: dict[str, Any], group: dict[str, Any], grad: torch.Tensor, param: torch.Tensor, scalars: Any
    ) -> None:
        stepping = next(p for p, s in optimizer.state.items() if s is state)
        held_elsewhere.append(
            sum(
                not isinstance(optimizer.state[other][key], QuantizedTensor)
                for other, key in quantized
                if other is not stepping
            )
        )
        step_param(state, group, grad, param, scalars)

    optimizer.step_param = watched  # type: ignore[method-assign]
    train_step(model, optimizer, 1)
    assert len(held_elsewhere) == len(list(model.parameters())) and held_elsewhere == [0] * len(held_elsewhere)


# --------------------------------------------------------------------------------------------------
# The option: validation, per group


@pytest.mark.parametrize(
    ("value", "error"),
    [("3bit", ValueError), ("8-bit", ValueError), (torch.float16, ValueError), (8, TypeError), (b"8bit", TypeError)],
)
def test_state_dtype_is_checked(value: Any, error: type[Exception]) -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(error, match="8bit") as raised:
        adaptopt.Adam(params, state_dtype=value)
    if error is ValueError:
        assert "'4bit'" in str(raised.value) and "torch.bfloat16" in str(raised.value)
    optimizer = adaptopt.Adam(params)
    with pytest.raises(error):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "state_dtype": value})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("4096", TypeError)]
)
def test_low_bit_min_numel_is_checked(value: Any, error: type[Exception]) -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(error, match="low_bit_min_numel"):
        adaptopt.Adam(params, state_dtype="8bit", low_bit_min_numel=value)
    if error is ValueError:
        with pytest.raises(ValueError, match=re.escape("[0, inf)")):
            adaptopt.Adam(params, low_bit_min_numel=value)


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_takes_both_options(name: str) -> None:
    for state_dtype in BITS:
        optimizer = low_bit_optimizer(name, make_model(), state_dtype)
        assert {group["state_dtype"] for group in optimizer.param_groups} == {state_dtype}
        assert {group["low_bit_min_numel"] for group in optimizer.param_groups} == {THRESHOLD}


def test_one_group_8bit_one_fp32() -> None:
    model, twin = make_model(), make_model()
    first, second = model[0], model[2]
    optimizer = adaptopt.Adam(
        [{"params": first.parameters(), "state_dtype": "8bit"}, {"params": second.parameters()}],
        lr=1e-2,
        low_bit_min_numel=THRESHOLD,
    )
    # The fp32 group is not touched by the other's quantization: it equals Adam on that group alone (Adam's
    # update of a param reads nothing of another's).
    alone = adaptopt.Adam(twin[2].parameters(), lr=1e-2, execution="reference")
    for step in range(5):
        train_step(model, optimizer, step)
        train_step(twin, alone, step)
        twin[0].load_state_dict(first.state_dict())  # the same inputs to the second layer
    assert [group["state_dtype"] for group in optimizer.param_groups] == ["8bit", None]
    assert isinstance(optimizer.state[first.weight]["exp_avg"], QuantizedTensor)
    assert isinstance(optimizer.state[first.bias]["exp_avg"], QuantizedTensor)  # 200 >= THRESHOLD
    for param, other in zip(second.parameters(), twin[2].parameters(), strict=True):
        assert_identical(param.detach(), other.detach())
        assert_identical(optimizer.state[param], alone.state[other])
    saved = through_disk(optimizer.state_dict())
    assert [group["state_dtype"] for group in saved["param_groups"]] == ["8bit", None]
    assert isinstance(saved["state"][0]["exp_avg"], dict) and isinstance(saved["state"][2]["exp_avg"], torch.Tensor)
