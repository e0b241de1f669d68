"""Low-bit state on the fast paths (`low_bit_execution.py`): decode, update and encode fused, a param at a time.

Every registered optimizer with `state_dtype="8bit"` and `"4bit"` on `execution="bucketed"` and `"auto"` equals
the same optimizer on `execution="reference"` bit for bit in float64, params, codes, scales and every other
state entry, over 20 steps of a model with whole and partial blocks, tensors under the threshold, and chunks
cut small so that a param spans several of them; compiled, within 1e-12 of each tensor's scale (the family's
tolerance for compiled float64 math, whose operations inductor may reorder). The reference loop itself is
checked against a float64 loop that rounds the state through the quantization module in test_low_bit.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import adaptopt
from adaptopt import execution
from adaptopt import low_bit_execution as fused
from adaptopt.quantization import QuantizedTensor
from dropin_support import NAMES, make_optimizer
from test_low_bit import (
    BITS,
    STEPS,
    THRESHOLD,
    decoded,
    make_model,
    params_of,
    relative_gap,
    settings_for,
    train_step,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CHUNK = 256
"""Eager chunks of a whole block at 8 bits and two at 4, so the 2400-element weight is ten chunks, the last
partial (2400 = 9 x 256 + 96)."""

FUSED = {
    "adam",
    "amsgrad",
    "adam_warmup",
    "adam_warmup_cosine_decay",
    "noam",
    "radam",
    "adabelief",
    "sophia",
    "lion",
    "adopt",
    "ademamix",
    "schedule_free_adamw",
}
"""The optimizers whose low-bit params take the fused path: elementwise math, no first pass. Prodigy (a first
pass), LAMB (per-tensor norms), Adafactor and Muon (matrices) step their low-bit params in the reference loop
(`muon_with_adamw`'s AdamW part is fused)."""

COMPILED = [
    ("adam", "8bit"),
    ("adam", "4bit"),
    ("adopt", "8bit"),  # its first step writes only v: the entries written differ between two compilations
    ("adabelief", "4bit"),  # three quantized entries, the running maximum among them
    ("schedule_free_adamw", "8bit"),  # z, a full-precision entry, beside the codes
    ("lion", "4bit"),
]
"""Each compilation takes seconds: a few optimizers that between them have every kind of entry and branch."""


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "CHUNK", CHUNK)


def trained(name: str, state_dtype: str, mode: str, steps: int = STEPS) -> torch.optim.Optimizer:
    model = make_model()
    optimizer = make_optimizer(
        name,
        model.parameters(),
        state_dtype=state_dtype,
        low_bit_min_numel=THRESHOLD,
        execution=mode,
        **settings_for(name),
    )
    for step in range(steps):
        train_step(model, optimizer, step)
    return optimizer


def low_bit_engines(optimizer: torch.optim.Optimizer) -> list[fused.LowBitExecution]:
    parts = [optimizer.muon, optimizer.adamw] if isinstance(optimizer, adaptopt.MuonWithAdamW) else [optimizer]
    engines = [getattr(part._buckets, "low_bit", None) for part in parts if part._buckets is not None]
    return [engine for engine in engines if engine is not None]


def entries(optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """Every param and state tensor, codes and scales as they are stored, named for the messages."""
    found = []
    for index, param in enumerate(params_of(optimizer)):
        found.append((f"param {index}", param.detach()))
        for key, value in sorted(optimizer.state[param].items()):
            if isinstance(value, QuantizedTensor):
                found += [(f"param {index} {key} codes", value.codes), (f"param {index} {key} scales", value.scales)]
            elif isinstance(value, torch.Tensor):
                found.append((f"param {index} {key}", value))
    return found


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("mode", ["bucketed", "auto"])
@pytest.mark.parametrize("state_dtype", BITS)
@pytest.mark.parametrize("name", NAMES)
def test_eager_fused_steps_equal_the_reference_loop_bitwise(name: str, state_dtype: str, mode: str) -> None:
    optimizer = trained(name, state_dtype, mode)
    expected = trained(name, state_dtype, "reference")
    actual_entries, expected_entries = entries(optimizer), entries(expected)
    assert [where for where, _ in actual_entries] == [where for where, _ in expected_entries]
    for (where, actual), (_, wanted) in zip(actual_entries, expected_entries, strict=True):
        assert actual.dtype == wanted.dtype and torch.equal(actual, wanted), where
    engines = low_bit_engines(optimizer)
    if name in FUSED:
        # Every quantized param of every step went through the fused path.
        assert [engine.eager_work for engine in engines] == [STEPS * QUANTIZED_NUMEL]
    elif name == "muon":  # Muon's matrices step in the reference loop; the hidden bias is AdamW's, and fused.
        assert [engine.eager_work for engine in engines] == [STEPS * 200]
    else:
        assert sum(engine.eager_work for engine in engines) == 0


QUANTIZED_NUMEL = 12 * 200 + 200 + 200 * 5
"""The elements of test_low_bit's 12-200-5 MLP at or over THRESHOLD: its two weights and the hidden bias."""


@pytest.mark.parametrize(("name", "state_dtype"), COMPILED)
def test_compiled_fused_steps_equal_the_reference_loop(name: str, state_dtype: str) -> None:
    assert_compiled_equals_reference(name, state_dtype)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("state_dtype", BITS)
def test_compiled_partial_blocks_after_a_whole_chunk_and_alone(state_dtype: str) -> None:
    """With chunks of 256 elements, a param whose whole blocks fill their last chunk (2400 and 1000 at 8 bits,
    2400 at 4) steps its partial block in a call of its own, two padded rows; the others (1000 at 4 bits) join
    it to their last chunk, and the 200-element bias is a lone partial block at 8 bits."""
    assert_compiled_equals_reference("adam", state_dtype)


def assert_compiled_equals_reference(name: str, state_dtype: str) -> None:
    optimizer = trained(name, state_dtype, "compiled")
    expected = trained(name, state_dtype, "reference")
    (engine,) = low_bit_engines(optimizer)
    # The first step with each set of constants runs eagerly (it tells which entries the update writes); every
    # later one is compiled for the three quantized params, their partial last blocks included (padded).
    assert engine.compiled_calls >= 3 * (STEPS - 2)
    for index, (param, wanted_param) in enumerate(zip(params_of(optimizer), params_of(expected), strict=True)):
        # 1e-12 of the scale: inductor may order float64 operations otherwise than eager (measured: 2e-16 to
        # 5e-16); a code that rounded otherwise would be off by a whole code step, 1e-4 and more.
        assert relative_gap(param.detach(), wanted_param.detach()) <= 1e-12, f"param {index}"
        state, wanted_state = optimizer.state[param], expected.state[wanted_param]
        assert set(state) == set(wanted_state)
        for key, value in state.items():
            wanted = wanted_state[key]
            assert type(value) is type(wanted), f"param {index} {key}"
            if isinstance(wanted, QuantizedTensor):
                assert value.codes.shape == wanted.codes.shape and value.scales.shape == wanted.scales.shape
            if isinstance(wanted, (QuantizedTensor, torch.Tensor)):
                assert relative_gap(decoded(value), decoded(wanted)) <= 1e-12, f"param {index} {key}"
            else:
                assert value == wanted, f"param {index} {key}"


def test_auto_compiles_after_its_work_and_continues_the_same_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # Three steps' work eagerly, then compiled: the switch keeps the run where the reference loop takes it.
    monkeypatch.setattr(execution, "AUTO_COMPILE_WORK", 3 * QUANTIZED_NUMEL)
    optimizer = trained("adam", "8bit", "auto", steps=8)
    expected = trained("adam", "8bit", "reference", steps=8)
    (engine,) = low_bit_engines(optimizer)
    # Three steps eagerly, then every element compiled: the partial last blocks (2400 - 9 * 256, 1000 - 3 * 256
    # and the whole 200-element bias) join their params' calls, padded.
    assert engine.eager_work == 3 * QUANTIZED_NUMEL
    assert engine.compiled_calls == 3 * 5
    for (where, actual), (_, wanted) in zip(entries(optimizer), entries(expected), strict=True):
        if actual.dtype == torch.uint8:
            assert torch.equal(actual, wanted), where
        else:
            assert relative_gap(actual.double(), wanted.double()) <= 1e-12, where


def test_a_written_entry_is_a_new_quantized_tensor_and_an_unwritten_one_keeps_its_codes() -> None:
    # A checkpoint taken between steps must not change under the next step; an entry the update does not write
    # (Sophia's Hessian, between its estimates) keeps its very codes, as in the reference loop.
    model = make_model()
    optimizer = adaptopt.Sophia(model.parameters(), state_dtype="8bit", low_bit_min_numel=THRESHOLD)
    train_step(model, optimizer, 1)  # step 1 estimates the Hessian first (test_low_bit's train_step)
    weight = model[0].weight
    saved = optimizer.state_dict()["state"][0]
    codes_before = {key: optimizer.state[weight][key] for key in ("exp_avg", "hessian")}
    saved_codes = saved["exp_avg"]["codes"].clone()
    train_step(model, optimizer, 2)  # no estimate at an even step
    assert optimizer.state[weight]["exp_avg"] is not codes_before["exp_avg"]
    assert optimizer.state[weight]["hessian"] is codes_before["hessian"]
    assert torch.equal(saved["exp_avg"]["codes"], saved_codes)
    (engine,) = low_bit_engines(optimizer)
    assert engine.eager_work > 0


def test_params_the_fused_path_cannot_take_go_to_the_reference_loop() -> None:
    # A non-contiguous param, and bf16 params with master weights or stochastic rounding (the working copies,
    # and the random bits drawn per whole param, are the reference loop's): all step, and equal the reference
    # loop, through it.
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(300, 20, dtype=torch.float64).t())  # transposed: not contiguous
    half = torch.nn.Parameter(torch.randn(3000).bfloat16())
    for option in ("master_weights", "stochastic_rounding"):
        copies = [(weight.detach().clone().requires_grad_(), half.detach().clone().requires_grad_()) for _ in "ab"]
        runs = []
        for params, mode in zip(copies, ("auto", "reference"), strict=True):
            optimizer = adaptopt.Adam(
                [{"params": [params[0]]}, {"params": [params[1]], option: True}],
                state_dtype="8bit",
                low_bit_min_numel=THRESHOLD,
                execution=mode,
            )
            for step in range(3):
                torch.manual_seed(step)  # stochastic rounding draws from torch's generator
                generator = torch.Generator().manual_seed(step)
                params[0].grad = torch.randn(params[0].shape, generator=generator, dtype=torch.float64)
                params[1].grad = torch.randn(params[1].shape, generator=generator).bfloat16()
                optimizer.step()
            runs.append(optimizer)
        for (where, actual), (_, wanted) in zip(entries(runs[0]), entries(runs[1]), strict=True):
            assert torch.equal(actual, wanted), where
        assert low_bit_engines(runs[0])[0].eager_work == 0


def bf16_run(
    name: str, state_dtype: str, mode: str, steps: int = 5, dtype: torch.dtype = torch.bfloat16
) -> torch.optim.Optimizer:
    """A bf16 param of 3000 elements (whole blocks and a partial one at both widths), bf16 grads."""
    param = torch.nn.Parameter(torch.randn(3000, generator=torch.Generator().manual_seed(0)).to(dtype))
    optimizer = make_optimizer(
        name, [param], state_dtype=state_dtype, low_bit_min_numel=THRESHOLD, execution=mode, **settings_for(name)
    )
    for step in range(steps):
        param.grad = torch.randn(3000, generator=torch.Generator().manual_seed(step + 1)).to(dtype)
        optimizer.step()
    return optimizer


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("state_dtype", BITS)
@pytest.mark.parametrize("name", ["adam", "lion", "schedule_free_adamw"])
def test_bf16_params_take_the_fused_path_bitwise(name: str, state_dtype: str) -> None:
    """bf16 params without master weights or stochastic rounding step on fp32 copies of a chunk at a time,
    rounded back to nearest: the reference loop's working copies, a chunk at a time, bit for bit (Schedule-Free
    keeps its z in fp32 beside the bf16 param)."""
    optimizer = bf16_run(name, state_dtype, "bucketed")
    expected = bf16_run(name, state_dtype, "reference")
    for (where, actual), (_, wanted) in zip(entries(optimizer), entries(expected), strict=True):
        assert actual.dtype == wanted.dtype and torch.equal(actual, wanted), where
    assert [engine.eager_work for engine in low_bit_engines(optimizer)] == [5 * 3000]


def test_fp16_params_take_the_fused_path_bitwise() -> None:
    optimizer = bf16_run("adam", "8bit", "bucketed", dtype=torch.float16)
    expected = bf16_run("adam", "8bit", "reference", dtype=torch.float16)
    for (where, actual), (_, wanted) in zip(entries(optimizer), entries(expected), strict=True):
        assert actual.dtype == wanted.dtype and torch.equal(actual, wanted), where
    assert [engine.eager_work for engine in low_bit_engines(optimizer)] == [5 * 3000]


@pytest.mark.parametrize("state_dtype", BITS)
def test_bf16_params_compiled(state_dtype: str) -> None:
    """Compiled, the fp32 math may round otherwise than eagerly in the last bit (fused multiply-adds): the fp32
    block scales within 1e-6 relative; a bf16 param or a code that lies on a rounding tie may take its neighbour,
    so at most 1% of them one bf16 step (2^-8 relative) or one code apart, none further."""
    optimizer = bf16_run("adam", state_dtype, "compiled")
    expected = bf16_run("adam", state_dtype, "reference")
    (engine,) = low_bit_engines(optimizer)
    assert engine.compiled_calls == 5 - 1  # the first step runs eagerly, and tells which entries it writes
    for (where, actual), (_, wanted) in zip(entries(optimizer), entries(expected), strict=True):
        assert actual.dtype == wanted.dtype and actual.shape == wanted.shape, where
        if actual.dtype == torch.float32:
            assert relative_gap(actual.double(), wanted.double()) <= 1e-6, where
            continue
        assert float((actual != wanted).float().mean()) <= 0.01, where
        if actual.dtype == torch.bfloat16:
            gap = (actual.float() - wanted.float()).abs()
            assert bool((gap <= 2.0**-7 * wanted.float().abs()).all()), where
        else:  # codes; a 4-bit byte holds two
            nibbles = [lambda codes: codes.int() >> 4, lambda codes: codes.int() & 15]
            for code_of in [lambda codes: codes.int()] if state_dtype == "8bit" else nibbles:
                assert int((code_of(actual) - code_of(wanted)).abs().max()) <= 1, where


def test_a_compiled_update_that_does_not_step_as_eager_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # A compiler that gets the codes wrong (torch 2.13's inductor read garbage for a partial block, compiled for a
    # static length): the self-test on scratch inputs catches it, says so once, and the run goes on eagerly, exact.
    compile_ = torch.compile

    def off_by_one_code(function: Any, **options: Any) -> Any:
        compiled = compile_(function, **options)
        return lambda *args: tuple(out + 1 if out.dtype == torch.uint8 else out for out in compiled(*args))

    monkeypatch.setattr(torch, "compile", off_by_one_code)
    with pytest.warns(RuntimeWarning, match="torch.compile failed for a low-bit update") as caught:
        optimizer = trained("adam", "8bit", "compiled", steps=4)
    assert sum("low-bit update" in str(warning.message) for warning in caught) == 1
    (engine,) = low_bit_engines(optimizer)
    assert engine.compiled_calls == 0
    expected = trained("adam", "8bit", "reference", steps=4)
    for (where, actual), (_, wanted) in zip(entries(optimizer), entries(expected), strict=True):
        assert torch.equal(actual, wanted), where
