"""Block-wise 8- and 4-bit quantization (`adaptopt.quantization`) against torchao, bitsandbytes and the papers.

* torchao (`torchao.optim`, the implementation of Dettmers et al. 2022 and Li et al. 2023 that the module
  follows): code books, codes, scales, packed 4-bit bytes and dequantized values, all bit for bit, through
  its functions and through its `OptimState8bit` / `OptimState4bit` tensors.
* bitsandbytes: the 8-bit dynamic maps bit for bit, `dequantize_blockwise` on CPU bit for bit, and its CPU
  `quantize_blockwise`, which is *not* nearest-code rounding in bitsandbytes 0.50 (see
  `test_bitsandbytes_cpu_quantize_is_nearest_code_up_to_its_lookup_grid`): there the codes equal ours
  wherever the nearest code is unambiguous at its grid's resolution, and the difference is pinned.
* A float64 reference written from the papers (`reference_quantize`): nearest code of $x/s_b$ per block.
* Error bounds from the code books alone (`covering_radius`), NaN/inf policy, ties, zeros, partial blocks,
  extreme magnitudes, the `state_dict` form and its size, and `torch.compile(fullgraph=True)` against eager.

torchao and bitsandbytes are declared test dependencies: if they do not import, this file fails.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import adaptopt
from adaptopt.quantization import (
    DEFAULT_BLOCK_SIZES,
    SCALE_FLOOR,
    STATE_SIGNEDNESS,
    Bits,
    MapSign,
    QuantizedTensor,
    covering_radius,
    dequantize_blockwise,
    dynamic_map,
    pack_nibbles,
    quantization_map,
    quantize,
    quantize_blockwise,
    quantized_nbytes,
    rounding_boundaries,
    search_table,
    select_map,
    unpack_nibbles,
)

with warnings.catch_warnings():  # Both print notes about optional CUDA/kernel extensions on a CPU machine.
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnb
    from torchao.optim import quant_utils as torchao_quant
    from torchao.optim.subclass_4bit import OptimState4bit, get_qmap_signed, get_qmap_unsigned
    from torchao.optim.subclass_8bit import OptimState8bit

MAPS: list[tuple[Bits, MapSign]] = [(8, "signed"), (8, "unsigned"), (4, "signed"), (4, "unsigned")]
MAP_IDS = [f"{bits}bit-{sign}" for bits, sign in MAPS]

F32_EPS = 2.0**-23
"""float32's machine epsilon: one rounding of a float32 operation is at most half of it, relatively."""

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def torchao_quantize(values: torch.Tensor, code_map: torch.Tensor, block_size: int) -> tuple[torch.Tensor, ...]:
    """torchao's codes, scales and dequantized values of `values` zero-padded to whole blocks, cut back to n."""
    numel = values.numel()
    padded = F.pad(values.reshape(-1).float(), (0, -numel % block_size))
    normalized, scales = torchao_quant.scale_tensor(padded, block_size)
    quantizer = (
        torchao_quant.quantize_8bit_with_qmap if code_map.numel() == 256 else torchao_quant.quantize_4bit_with_qmap
    )
    codes = quantizer(normalized, code_map)
    dequantized = torchao_quant.dequant_with_qmap(codes, code_map, scales)
    return codes[:numel], scales, dequantized[:numel]


def reference_quantize(values: np.ndarray, code_map: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
    r"""The papers' rule in float64: $s_b = \max(\max_b |x|, 10^{-12})$, $c_i = \arg\min_j |x_i / s_b - q_j|$.

    Ties go to the larger code (torchao's choice; the papers do not say). Dense argmin over the whole code
    book, no search: written to be obviously right, not fast (n x 256 distances).
    """
    numel = values.size
    blocks = -(-numel // block_size)
    padded = np.zeros(blocks * block_size)
    padded[:numel] = values.astype(np.float64)
    absmax = np.abs(padded).reshape(blocks, block_size).max(axis=1)
    scales = np.maximum(absmax, np.float64(np.float32(SCALE_FLOOR)))  # torchao clips with the float32 of 1e-12
    normalized = (padded.reshape(blocks, block_size) / scales[:, None]).reshape(-1)[:numel]
    distances = np.abs(normalized[:, None] - code_map[None, :])
    last_minimum = code_map.size - 1 - np.argmin(distances[:, ::-1], axis=1)  # the larger code on a tie
    midpoints = (code_map[:-1] + code_map[1:]) / 2
    distance_to_midpoint = np.abs(normalized[:, None] - midpoints[None, :]).min(axis=1)
    return {"codes": last_minimum, "scales": scales, "normalized": normalized, "to_midpoint": distance_to_midpoint}


def check_against_reference(
    values: np.ndarray, codes: np.ndarray, scales: np.ndarray, dequantized: np.ndarray, code_map: torch.Tensor
) -> int:
    """Assert that our codes, scales and values are the reference's; returns how many codes were ambiguous.

    Ambiguous: the reference's $y = x/s_b$ lies within 4 float32 roundings of a midpoint between two codes,
    where our float32 $\\mathrm{fl}(x/s_b)$ and float32 comparison may land on either side; there the code
    must be one of the two neighbours. Everywhere else the code must be the reference's exactly, and the
    value exactly the float32 rounding of $q_c s_b$ (the float64 product of two float32 numbers is exact).
    """
    block_size = DEFAULT_BLOCK_SIZES[8] if code_map.numel() == 256 else DEFAULT_BLOCK_SIZES[4]
    table = code_map.double().numpy()
    reference = reference_quantize(values, table, block_size)
    np.testing.assert_array_equal(scales, reference["scales"].astype(np.float32))
    tolerance = 4 * (F32_EPS / 2) * np.maximum(np.abs(reference["normalized"]), 1e-30)
    ambiguous = reference["to_midpoint"] <= tolerance
    clear = ~ambiguous
    np.testing.assert_array_equal(codes[clear], reference["codes"][clear])
    assert np.all(np.abs(codes[ambiguous].astype(np.int64) - reference["codes"][ambiguous]) <= 1)
    per_element_scale = np.repeat(reference["scales"], block_size)[: values.size]
    expected_values = (table[codes.astype(np.int64)] * per_element_scale).astype(np.float32)
    np.testing.assert_array_equal(dequantized, expected_values)
    return int(ambiguous.sum())


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit for bit where not NaN, and NaN in the same places (NaN's payload is left free)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.is_floating_point():
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(actual), nan)
        actual, expected = actual[~nan], expected[~nan]
        integer = {torch.float32: torch.int32, torch.float64: torch.int64}[actual.dtype]
        actual, expected = actual.view(integer), expected.view(integer)
    assert torch.equal(actual, expected), f"{(actual != expected).sum().item()} elements differ"


def wide_magnitudes(numel: int, seed: int, *, decades: float = 20.0) -> torch.Tensor:
    """Normal values, each block-sized run of them scaled by its own power of ten in +-`decades`."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator)
    exponents = (torch.rand(-(-numel // 64), generator=generator) * 2 - 1) * decades
    return values * torch.pow(10.0, exponents).repeat_interleave(64)[:numel]


# ------------------------------------------------------------------------------------------------------
# Code books
# ------------------------------------------------------------------------------------------------------


def test_maps_are_torchaos_bit_for_bit() -> None:
    expected = {
        (8, "signed"): torchao_quant.create_dynamic_map(True),
        (8, "unsigned"): torchao_quant.create_dynamic_map(False),
        (4, "signed"): get_qmap_signed(),
        (4, "unsigned"): get_qmap_unsigned(),
    }
    for (bits, sign), values in expected.items():
        ours = quantization_map(bits, sign)
        theirs = torch.tensor(values, dtype=torch.float32)
        assert ours.dtype == torch.float32 and ours.shape == (2**bits,)
        if (bits, sign) == (8, "unsigned"):
            # Ours has no zero (Li et al. 2023, §4.1): torchao's 0 becomes one decade below the tree's lowest.
            assert theirs[0].item() == 0.0 and ours[0].item() == pytest.approx(1e-7 * 0.55, rel=4 * F32_EPS)
            theirs[0] = ours[0]
        assert bool((ours[1:] > ours[:-1]).all()), "a code book must be strictly increasing"
        assert_same_bits(ours, theirs)


def test_unsigned_maps_have_no_zero() -> None:
    """Li et al. 2023, §4.1: a second moment must never decode to 0 (Adam would step by m / eps). Not even
    where the whole block is 0, or the value far below the block's largest."""
    for bits in (8, 4):
        code_map = quantization_map(bits, "unsigned")
        assert float(code_map.min()) > 0
        values = torch.tensor([0.0] * 256 + [1.0] + [1e-9] * 255)
        codes, scales = quantize_blockwise(values, code_map, 256)
        decoded = dequantize_blockwise(codes, scales, code_map, 256)
        assert bool((decoded > 0).all()), bits
        assert float(decoded[257]) == float(code_map.min()), "rounds up to the smallest code, not down to 0"


def test_maps_are_bitsandbytes_bit_for_bit() -> None:
    assert_same_bits(quantization_map(8, "signed"), bnb.create_dynamic_map(signed=True))
    unsigned = bnb.create_dynamic_map(signed=False)
    assert unsigned[0].item() == 0.0  # ours has no zero: see test_maps_are_torchaos_bit_for_bit
    assert_same_bits(quantization_map(8, "unsigned")[1:], unsigned[1:])
    # bitsandbytes pads the 16 codes of a 4-bit map with 240 zeros to 256: the 7 negative codes sort first,
    # then the 241 zeros, then the 8 positive ones.
    padded = bnb.create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)
    ours = quantization_map(4, "signed")
    assert_same_bits(torch.cat([padded[:8], padded[-8:]]), ours)
    assert bool((padded[7:-8] == 0).all())


def test_maps_are_pinned_for_checkpoints() -> None:
    """Checkpoints store codes, not code books: a torch whose `linspace` rounds differently would decode old
    codes to other values. These digests are of the float32 bytes that torchao and bitsandbytes produce."""
    digests = {
        (8, "signed"): "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c",
        (8, "unsigned"): "284627ec834de2ed9ae7938ba0c678234eb451b01f5cb053274000998db5b821",
        (4, "signed"): "721d11e3711326d4ab3439ccf09b717be5c5fac8a780691f145d2fb797c16400",
        (4, "unsigned"): "0aeb670b8c9b6b0f9ea49ba61cdd207098035a60f95d742a4cf48bbde867f889",
    }
    for (bits, sign), digest in digests.items():
        assert hashlib.sha256(quantization_map(bits, sign).numpy().tobytes()).hexdigest() == digest


@pytest.mark.parametrize(("signed", "exponent_bits", "total_bits"), [(True, 7, 8), (False, 7, 8), (True, 3, 4)])
def test_dynamic_map_is_the_papers_formula(signed: bool, exponent_bits: int, total_bits: int) -> None:
    r"""Each code within 4 float32 roundings of $10^{i-(E-1)} (0.1 + 0.9 (k + \frac12) / n_i)$ in float64
    (the float32 linspace, mean and product each round once), and nothing else in the map."""
    expected = [0.0, 1.0]
    for level in range(exponent_bits):
        cells = 2 ** (level + total_bits - 1 - exponent_bits + (0 if signed else 1))
        for k in range(cells):
            value = 10.0 ** (level - exponent_bits + 1) * (0.1 + 0.9 * (k + 0.5) / cells)
            expected += [value, -value] if signed else [value]
    expected_sorted = np.sort(np.array(expected))
    ours = dynamic_map(signed=signed, exponent_bits=exponent_bits, total_bits=total_bits).double().numpy()
    np.testing.assert_allclose(ours, expected_sorted, rtol=4 * F32_EPS, atol=0)


def test_linear_map_without_zero_has_no_zero() -> None:
    code_map = quantization_map(4, "unsigned")
    np.testing.assert_array_equal(code_map.numpy(), np.arange(1, 17, dtype=np.float32) / 16)


def test_covering_radius() -> None:
    """Half the widest gap or the distance from an end of the domain, whichever is larger."""
    # 8-bit signed: the top decade's gap 0.9/64 halves to 0.00703125, and -1 lies 0.0070312619 (float32
    # codes) below the first code -0.99296874: the end wins by 1e-8.
    assert covering_radius(quantization_map(8, "signed"), "signed") == pytest.approx(1 - 0.992968738079071, rel=1e-12)
    # 8-bit unsigned: the top decade's gap 0.9/128, halved; rel 2e-5 as the float32 codes (absolute rounding
    # ~6e-8) make the gaps of width 7e-3 differ from 0.9/128 by up to 1.5e-5 relative.
    assert covering_radius(quantization_map(8, "unsigned"), "unsigned") == pytest.approx(0.9 / 128 / 2, rel=2e-5)
    assert covering_radius(quantization_map(4, "signed"), "signed") == pytest.approx(1 - 0.8875, rel=1e-6)
    assert covering_radius(quantization_map(4, "unsigned"), "unsigned") == 1 / 16  # the gap at 0: no zero code


def test_quantization_map_returns_a_fresh_tensor() -> None:
    first = quantization_map(8, "signed")
    first[0] = -1.0  # Old bitsandbytes CPU code wrote -1 into the caller's code book exactly like this.
    assert quantization_map(8, "signed")[0].item() == pytest.approx(-0.992968738079071)


@pytest.mark.parametrize(("bits", "sign"), [(2, "signed"), (8, "positive"), (8.0, "signed"), (True, "signed")])
def test_quantization_map_rejects_unknown_maps(bits: Any, sign: Any) -> None:
    with pytest.raises(ValueError):
        quantization_map(bits, sign)


def test_dynamic_map_rejects_combinations_that_do_not_fill_the_codes() -> None:
    with pytest.raises(ValueError):
        dynamic_map(signed=False, exponent_bits=2, total_bits=4)  # 15 codes, not 16
    with pytest.raises(ValueError):
        dynamic_map(signed=True, exponent_bits=8, total_bits=8)


# ------------------------------------------------------------------------------------------------------
# Against torchao
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("numel", [256 * 40, 256 * 40 + 77, 1, 130])
def test_codes_scales_and_values_are_torchaos(bits: Bits, sign: MapSign, numel: int) -> None:
    """Whole blocks and a last partial block (torchao on the zero-padded tensor, cut back to n)."""
    values = wide_magnitudes(numel, seed=numel + bits)
    if sign == "unsigned":
        values = values.abs()
    code_map, block_size = quantization_map(bits, sign), DEFAULT_BLOCK_SIZES[bits]
    codes, scales = quantize_blockwise(values, code_map, block_size)
    their_codes, their_scales, their_values = torchao_quantize(values, code_map, block_size)
    assert codes.dtype == torch.uint8 and codes.shape == (numel,)
    assert_same_bits(codes, their_codes)
    assert_same_bits(scales, their_scales)
    assert_same_bits(dequantize_blockwise(codes, scales, code_map, block_size), their_values)


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
def test_state_tensors_are_torchaos_optim_states(bits: Bits, sign: MapSign) -> None:
    """Through torchao's own optimizer-state tensors: their (packed) codes, scales and `dequantize()`."""
    values = wide_magnitudes(4096, seed=7)
    if sign == "unsigned":
        values = values.abs()
    state_class = OptimState8bit if bits == 8 else OptimState4bit
    theirs = state_class.zeros(values.shape, signed=sign == "signed", block_size=DEFAULT_BLOCK_SIZES[bits])
    # torchao's tensors carry their code book: give them ours, whose only difference is the 8-bit unsigned
    # map's zero (test_maps_are_torchaos_bit_for_bit), so that what is compared is the quantization itself.
    theirs.qmap = quantization_map(bits, sign)
    theirs.copy_(values)
    ours = quantize(values, bits=bits, sign=sign)
    assert_same_bits(ours.codes, theirs.codes)
    assert_same_bits(ours.scales, theirs.scale)
    assert_same_bits(ours.dequantize(), theirs.dequantize())


# ------------------------------------------------------------------------------------------------------
# Against the float64 reference: random inputs, ties, zeros, extremes, non-finite values
# ------------------------------------------------------------------------------------------------------

finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
special = st.sampled_from([float(np.float32(v)) for v in (0.0, -0.0, 1.0, -1.0, 1e-45, 3.4e38, -3.4e38, 1e-12, 5e-13)])


@SETTINGS
@given(
    values=hnp.arrays(np.float32, st.integers(1, 700), elements=finite_float32 | special),
    scale_exponent=st.integers(-40, 38),
)
def test_random_inputs_match_the_reference_and_torchao(values: np.ndarray, scale_exponent: int) -> None:
    """Any finite float32 values (subnormal to huge, zeros, exact ±1), rescaled so that whole blocks sit at
    one magnitude, any length (partial blocks). All four maps."""
    with np.errstate(over="ignore", under="ignore"):
        rescaled = (values.astype(np.float64) * 10.0**scale_exponent).astype(np.float32)
    rescaled = np.where(np.isfinite(rescaled), rescaled, values)  # overflow: keep the unscaled value
    tensor = torch.from_numpy(rescaled)
    for bits, sign in MAPS:
        code_map, block_size = quantization_map(bits, sign), DEFAULT_BLOCK_SIZES[bits]
        codes, scales = quantize_blockwise(tensor, code_map, block_size)
        dequantized = dequantize_blockwise(codes, scales, code_map, block_size)
        check_against_reference(rescaled, codes.numpy(), scales.numpy(), dequantized.numpy(), code_map)
        their_codes, their_scales, their_values = torchao_quantize(tensor, code_map, block_size)
        assert_same_bits(codes, their_codes)
        assert_same_bits(scales, their_scales)
        assert_same_bits(dequantized, their_values)


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
def test_wide_random_inputs_are_rarely_ambiguous(bits: Bits, sign: MapSign) -> None:
    """On 20k normal values the reference check leaves almost nothing to its tie tolerance (else it would
    check nothing): fewer than 1 in 1000 codes may fall either way."""
    values = wide_magnitudes(20_000, seed=bits, decades=30)
    code_map, block_size = quantization_map(bits, sign), DEFAULT_BLOCK_SIZES[bits]
    codes, scales = quantize_blockwise(values, code_map, block_size)
    dequantized = dequantize_blockwise(codes, scales, code_map, block_size)
    ambiguous = check_against_reference(values.numpy(), codes.numpy(), scales.numpy(), dequantized.numpy(), code_map)
    assert ambiguous < 20


def test_reference_check_catches_a_wrong_code() -> None:
    """The reference check can fail: one code moved by one step anywhere is caught."""
    values = wide_magnitudes(1000, seed=3)
    code_map = quantization_map(8, "signed")
    codes, scales = quantize_blockwise(values, code_map, 256)
    wrong = codes.clone()
    wrong[123] = wrong[123] + 1 if wrong[123] < 255 else wrong[123] - 1
    dequantized = dequantize_blockwise(wrong, scales, code_map, 256)
    with pytest.raises(AssertionError):
        check_against_reference(values.numpy(), wrong.numpy(), scales.numpy(), dequantized.numpy(), code_map)


def exact_ties(code_map: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints between neighbouring codes where float32 arithmetic is exact, and the lower code's index.

    Exact: the midpoint, it and its float32 neighbours minus the lower code, and the gap are float32
    numbers, so torchao's comparison $\\mathrm{fl}(y - q_j) \\ge \\mathrm{fl}(q_{j+1} - q_j)/2$ is the exact
    one and a tie is a tie.
    """
    table = code_map.double().numpy()
    midpoints, lower = [], []
    for j in range(table.size - 1):
        midpoint = (table[j] + table[j + 1]) / 2
        below = np.nextafter(np.float32(midpoint), np.float32(-np.inf))
        above = np.nextafter(np.float32(midpoint), np.float32(np.inf))
        exact = [
            midpoint,
            midpoint - table[j],
            table[j + 1] - table[j],
            float(below) - table[j],
            float(above) - table[j],
        ]
        if all(float(np.float32(value)) == value for value in exact):
            midpoints.append(midpoint)
            lower.append(j)
    return np.array(midpoints, dtype=np.float32), np.array(lower)


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
def test_ties_round_up_and_their_neighbours_do_not(bits: Bits, sign: MapSign) -> None:
    """At an exact midpoint the larger code; one float32 step below, the smaller; one step above, the larger.

    Each block starts with 1.0, so $s_b = 1$ and $y = x$ exactly.
    """
    code_map, block_size = quantization_map(bits, sign), DEFAULT_BLOCK_SIZES[bits]
    midpoints, lower = exact_ties(code_map)
    assert midpoints.size >= code_map.numel() // 2, "too few exact ties to test the rule"
    below = np.nextafter(midpoints, np.float32(-np.inf))
    above = np.nextafter(midpoints, np.float32(np.inf))
    for probe, expected in ((midpoints, lower + 1), (below, lower), (above, lower + 1)):
        per_block = block_size - 1
        blocks = -(-probe.size // per_block)
        padded = np.full(blocks * per_block, probe[-1], dtype=np.float32)
        padded[: probe.size] = probe
        values = np.concatenate([np.ones((blocks, 1), np.float32), padded.reshape(blocks, per_block)], axis=1)
        codes, scales = quantize_blockwise(torch.from_numpy(values), code_map, block_size)
        assert bool((scales == 1).all())
        probe_codes = codes.view(blocks, block_size)[:, 1:].reshape(-1)[: probe.size].numpy()
        np.testing.assert_array_equal(probe_codes, expected)
        their_codes = torchao_quantize(torch.from_numpy(values), code_map, block_size)[0]
        assert_same_bits(codes, their_codes)
        reference = reference_quantize(values.reshape(-1), code_map.double().numpy(), block_size)["codes"]
        np.testing.assert_array_equal(codes.numpy(), reference)


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("absmax", [1.0, 3.7])
def test_every_float32_near_every_midpoint_rounds_as_torchao(bits: Bits, sign: MapSign, absmax: float) -> None:
    r"""Exhaustive where rounding is decided: the 65 float32 numbers within 32 ulps of each midpoint, times a
    block absmax. Bit for bit with torchao. This is what tells torchao's rule apart from its look-alikes:
    comparing $y$ with the float32 midpoint $\mathrm{fl}((q_j + q_{j+1})/2)$ instead of
    $\mathrm{fl}(y - q_j) \ge \mathrm{fl}(q_{j+1} - q_j)/2$, or multiplying by $1/s_b$ instead of dividing,
    each changes dozens of these codes (measured: ~50 of 16640 for 8 bits, 2 to 6 of 1024 for 4)."""
    code_map, block_size = quantization_map(bits, sign), DEFAULT_BLOCK_SIZES[bits]
    midpoints = ((code_map[1:].double() + code_map[:-1].double()) / 2).float()
    ulp_steps = torch.arange(-32, 33, dtype=torch.int32)
    probes = (midpoints.view(torch.int32).unsqueeze(1) + ulp_steps).view(torch.float32).reshape(-1) * absmax
    per_block = block_size - 1  # each block leads with `absmax` itself, so that its scale is `absmax`
    padded = F.pad(probes, (0, -probes.numel() % per_block)).view(-1, per_block)
    values = torch.cat([torch.full((padded.shape[0], 1), absmax), padded], dim=1).reshape(-1)
    codes, scales = quantize_blockwise(values, code_map, block_size)
    their_codes, _, their_values = torchao_quantize(values, code_map, block_size)
    assert bool((scales == absmax).all())
    assert_same_bits(codes, their_codes)
    assert_same_bits(dequantize_blockwise(codes, scales, code_map, block_size), their_values)


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
def test_search_table_finds_the_codes_the_search_finds(bits: Bits, sign: MapSign) -> None:
    """The prefix table (`search_table`) against `searchsorted`, on every one of its 65536 prefixes: the
    prefix's smallest and largest float32 numbers and 8 random ones between, every code and its float32
    neighbours, the numbers near every midpoint and every rounding boundary (where the table's one comparison
    decides), and the special values. Codes equal, also for NaN; then the same through `quantize_blockwise`."""
    from adaptopt.quantization import _nearest_codes

    code_map, block_size = quantization_map(bits, sign), DEFAULT_BLOCK_SIZES[bits]
    table = search_table(code_map)
    assert table is not None, "all four code books are sparse enough for the table"
    generator = torch.Generator().manual_seed(3)
    prefixes = (torch.arange(65536, dtype=torch.int64) - 32768) << 16
    offsets = torch.cat([torch.tensor([0, 0xFFFF]), torch.randint(1, 0xFFFF, (8,), generator=generator)])
    everywhere = (prefixes.unsqueeze(1) + offsets).to(torch.int32).view(torch.float32).reshape(-1)
    code_bits = code_map.view(torch.int32).unsqueeze(1)
    at_codes = (code_bits + torch.arange(-2, 3, dtype=torch.int32)).view(torch.float32).reshape(-1)
    midpoints = ((code_map[1:].double() + code_map[:-1].double()) / 2).float().view(torch.int32).unsqueeze(1)
    near_midpoints = (midpoints + torch.arange(-4, 5, dtype=torch.int32)).view(torch.float32).reshape(-1)
    boundary_bits = rounding_boundaries(code_map).view(torch.int32).unsqueeze(1)
    near_boundaries = (
        (boundary_bits + torch.arange(-2, 3, dtype=torch.int32)).view(torch.float32).reshape(-1)
    )  # either sign
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0, float("inf"), float("-inf"), float("nan")])
    probes = torch.cat([everywhere, at_codes, -at_codes, near_midpoints, -near_midpoints, near_boundaries, special])
    assert_same_bits(_nearest_codes(probes, code_map, table), _nearest_codes(probes, code_map).to(torch.int32))
    in_blocks = probes[probes.isfinite() & (probes.abs() <= 1)]
    assert_same_bits(
        quantize_blockwise(in_blocks, code_map, block_size, table)[0],
        quantize_blockwise(in_blocks, code_map, block_size)[0],
    )


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
def test_rounding_boundaries_are_where_the_rule_steps_up(bits: Bits, sign: MapSign) -> None:
    """t_j takes code j + 1 and the float32 just below it code j, by the rule itself (searchsorted and the
    float32 comparison with the two codes around), and t_j lies between q_j and q_{j+1}."""
    from adaptopt.quantization import _nearest_codes

    code_map = quantization_map(bits, sign)
    boundaries = rounding_boundaries(code_map)
    just_below = torch.nextafter(boundaries, torch.tensor(-torch.inf))
    indices = torch.arange(1, code_map.numel())
    np.testing.assert_array_equal(_nearest_codes(boundaries, code_map).numpy(), indices.numpy())
    np.testing.assert_array_equal(_nearest_codes(just_below, code_map).numpy(), (indices - 1).numpy())
    assert bool((code_map[:-1] < boundaries).all() and (boundaries <= code_map[1:]).all())


def test_search_table_refuses_a_dense_code_book() -> None:
    """Two codes within one prefix (relative width 2^-7) cannot be told apart by one comparison: no table."""
    assert search_table(torch.linspace(0.5, 0.51, 256)) is None
    assert search_table(torch.linspace(-1.0, 1.0, 256)) is not None


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
def test_zero_blocks_decode_without_nan(bits: Bits, sign: MapSign) -> None:
    """An all-zero block (here the middle one, and a partial last one) gets the scale 1e-12 and decodes to
    the code nearest 0 times 1e-12: exactly 0 for the signed maps, 5.5e-20 and 1e-12/16 for the unsigned ones
    (no zero)."""
    values = torch.randn(3 * DEFAULT_BLOCK_SIZES[bits] + 5)
    block_size = DEFAULT_BLOCK_SIZES[bits]
    values[block_size : 2 * block_size] = 0
    values[3 * block_size :] = 0
    quantized = quantize(values, bits=bits, sign=sign)
    decoded = quantized.dequantize()
    floor = torch.tensor(SCALE_FLOOR, dtype=torch.float32)
    assert quantized.scales[1] == floor and quantized.scales[3] == floor
    expected_zero = 0.0 if sign == "signed" else (floor * quantization_map(bits, sign)[0]).item()
    for zero_block in (decoded[block_size : 2 * block_size], decoded[3 * block_size :]):
        assert torch.isfinite(zero_block).all()
        assert bool((zero_block == expected_zero).all())


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_poison_their_block_only(bits: Bits, sign: MapSign, poison: float) -> None:
    """The documented policy: a block holding NaN or ±inf decodes to NaN throughout; no other block changes."""
    block_size = DEFAULT_BLOCK_SIZES[bits]
    clean = wide_magnitudes(4 * block_size + 9, seed=11).abs()
    poisoned = clean.clone()
    poisoned[2 * block_size + 17] = poison
    poisoned[4 * block_size + 3] = poison  # the partial last block too
    decoded = quantize(poisoned, bits=bits, sign=sign).dequantize()
    expected = quantize(clean, bits=bits, sign=sign).dequantize()
    poisoned_blocks = torch.zeros_like(clean, dtype=torch.bool)
    poisoned_blocks[2 * block_size : 3 * block_size] = True
    poisoned_blocks[4 * block_size :] = True
    assert bool(torch.isnan(decoded[poisoned_blocks]).all())
    assert_same_bits(decoded[~poisoned_blocks], expected[~poisoned_blocks])


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
def test_extreme_magnitudes_stay_finite_and_close(bits: Bits, sign: MapSign) -> None:
    """Blocks at float32's largest magnitudes and at subnormal ones. Huge: relative error within the
    covering radius. Below the 1e-12 floor: absolute error within the radius times 1e-12."""
    block_size = DEFAULT_BLOCK_SIZES[bits]
    generator = torch.Generator().manual_seed(5)
    unit = torch.rand(2 * block_size, generator=generator) * 2 - 1
    if sign == "unsigned":
        unit = unit.abs()
    radius = covering_radius(quantization_map(bits, sign), sign)
    huge = unit * 3.4e38
    huge_decoded = quantize(huge, bits=bits, sign=sign).dequantize()
    assert torch.isfinite(huge_decoded).all()
    absmax = huge.abs().double().view(2, block_size).amax(dim=1).repeat_interleave(block_size)
    # Slack: fl(x / s) and fl(q s) each round once (relative F32_EPS/2 of a value at most s).
    assert ((huge.double() - huge_decoded.double()).abs() / absmax).max().item() <= radius + 2 * F32_EPS
    tiny = unit * 1e-40  # subnormal
    tiny_decoded = quantize(tiny, bits=bits, sign=sign).dequantize()
    assert torch.isfinite(tiny_decoded).all()
    assert (tiny.double() - tiny_decoded.double()).abs().max().item() <= (radius + 2 * F32_EPS) * SCALE_FLOOR


def test_unsigned_maps_turn_negative_values_into_their_smallest_code() -> None:
    values = torch.tensor([-0.5, -1e-3, 1.0, 0.25])
    for bits in (8, 4):
        codes, _ = quantize_blockwise(values, quantization_map(bits, "unsigned"), DEFAULT_BLOCK_SIZES[bits])
        assert codes[:2].tolist() == [0, 0]


def test_half_precision_inputs_are_quantized_as_their_float32_values() -> None:
    values = wide_magnitudes(1000, seed=2, decades=3)
    for dtype in (torch.bfloat16, torch.float16):
        low = values.to(dtype)
        for bits, sign in MAPS:
            ours, upcast = quantize(low, bits=bits, sign=sign), quantize(low.float(), bits=bits, sign=sign)
            assert_same_bits(ours.codes, upcast.codes)
            assert_same_bits(ours.scales, upcast.scales)


# ------------------------------------------------------------------------------------------------------
# Error bounds
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
def test_error_within_the_covering_radius_of_each_block(bits: Bits, sign: MapSign) -> None:
    r"""$\max_i |x_i - \hat x_i| / s_b \le$ the code book's covering radius, on 64 blocks of varied magnitude,
    and the bound is reached to within 1% (so it is the right bound, not a loose one)."""
    block_size = DEFAULT_BLOCK_SIZES[bits]
    values = wide_magnitudes(64 * block_size, seed=bits, decades=15)
    if sign == "unsigned":
        values = values.abs()
    quantized = quantize(values, bits=bits, sign=sign)
    decoded = quantized.dequantize().double()
    per_element_scale = quantized.scales.double().repeat_interleave(block_size)
    relative_error = (values.double() - decoded).abs() / per_element_scale
    radius = covering_radius(quantization_map(bits, sign), sign)
    # Slack: fl(x / s) and fl(q s) each round once, by at most F32_EPS/2 of a value at most 1 (in units of s).
    assert relative_error.max().item() <= radius + 2 * F32_EPS
    assert relative_error.max().item() >= 0.99 * radius


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
def test_error_within_half_the_local_gap(bits: Bits, sign: MapSign) -> None:
    r"""The sharper bound per element: $|y - q_c| \le \frac12 (q_{j+1} - q_j)$ for $y \in [q_j, q_{j+1}]$,
    and $\le q_0 - y$ below the first code (computed in float64 from the map, not from the quantizer)."""
    block_size = DEFAULT_BLOCK_SIZES[bits]
    values = wide_magnitudes(32 * block_size, seed=17, decades=10)
    code_map = quantization_map(bits, sign)
    codes, scales = quantize_blockwise(values, code_map, block_size)
    table = code_map.double()
    normalized = (values.double().view(-1, block_size) / scales.double().unsqueeze(1)).reshape(-1)
    lower = (torch.searchsorted(table, normalized, right=True) - 1).clamp(0, table.numel() - 2)
    gap = table[lower + 1] - table[lower]
    below_first = normalized < table[0]
    bound = torch.where(below_first, table[0] - normalized, gap / 2)
    error = (normalized - table[codes.long()]).abs()
    assert bool((error <= bound + F32_EPS * normalized.abs()).all())  # one rounding of fl(x / s)


# ------------------------------------------------------------------------------------------------------
# Against bitsandbytes' CPU functions
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sign", ["signed", "unsigned"])
@pytest.mark.parametrize("numel", [256 * 12, 256 * 12 + 100])
def test_bitsandbytes_cpu_dequantize_is_ours(sign: MapSign, numel: int) -> None:
    """bitsandbytes' `dequantize_blockwise` on CPU ($q_c \\cdot$ absmax per block) on our codes and scales."""
    values = wide_magnitudes(numel, seed=numel)
    if sign == "unsigned":
        values = values.abs()
    code_map = quantization_map(8, sign)
    codes, scales = quantize_blockwise(values, code_map, 256)
    theirs = bnb.dequantize_blockwise(codes, absmax=scales, code=code_map, blocksize=256)
    assert_same_bits(theirs, dequantize_blockwise(codes, scales, code_map, 256))


@pytest.mark.parametrize("sign", ["signed", "unsigned"])
def test_bitsandbytes_cpu_quantize_is_nearest_code_up_to_its_lookup_grid(sign: MapSign) -> None:
    r"""The one difference found, pinned so that a change in bitsandbytes is noticed.

    bitsandbytes 0.50's CPU `quantize_blockwise` does not search the code book: it multiplies by
    $1/\text{absmax}$, snaps $y$ to a grid of 65536 points on $[-1, 1]$ (step $h = 2/65535$) and reads
    the code nearest that grid point from a table. So its code is the nearest one only where $y$ is
    farther than $h/2$ from every midpoint between codes; elsewhere (near a midpoint, and among the dense
    small codes of the dynamic map, spaced down to $10^{-7} \ll h$) it may be a neighbour or, near 0,
    several codes away. The papers' rule (Dettmers et al. 2022, §2: "the closest value") is the nearest
    code, which is what torchao and this module compute. Also, bitsandbytes stores absmax 0 for an
    all-zero block, where torchao and we store 1e-12.
    Checked: absmax equal bit for bit; codes equal wherever $y$ is at least $h/2$ (+ rounding slack) from
    every midpoint; everywhere $|y - q_{\text{bnb}}| \le |y - q_{\text{ours}}| + h$; and the two do differ
    on some normal inputs (if this last assertion fails, bitsandbytes now rounds to the nearest code and
    the test should become a bit-for-bit comparison).
    """
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(256 * 200, generator=generator)
    if sign == "unsigned":
        values = values.abs()
    code_map = quantization_map(8, sign)
    codes, scales = quantize_blockwise(values, code_map, 256)
    their_codes, their_state = bnb.quantize_blockwise(values, code=code_map, blocksize=256)
    assert_same_bits(their_state.absmax, scales)
    table = code_map.double()
    normalized = (values.double().view(-1, 256) / scales.double().unsqueeze(1)).reshape(-1)
    midpoints = (table[1:] + table[:-1]) / 2
    above = torch.searchsorted(midpoints, normalized).clamp(1, midpoints.numel() - 1)  # nearest: above or above-1
    to_midpoint = torch.minimum((normalized - midpoints[above]).abs(), (normalized - midpoints[above - 1]).abs())
    step = 2 / 65535
    unambiguous = to_midpoint > step / 2 + 1e-6  # slack: float32 reciprocal, product and grid index rounding
    assert_same_bits(their_codes[unambiguous], codes[unambiguous])
    their_error = (normalized - table[their_codes.long()]).abs()
    our_error = (normalized - table[codes.long()]).abs()
    assert bool((their_error <= our_error + step + 1e-6).all())
    assert bool((their_codes != codes).any()), "bitsandbytes now agrees everywhere: compare bit for bit instead"
    _, zero_state = bnb.quantize_blockwise(torch.zeros(256), code=code_map, blocksize=256)
    assert zero_state.absmax.item() == 0.0


# ------------------------------------------------------------------------------------------------------
# 4-bit packing, the state_dict form, memory
# ------------------------------------------------------------------------------------------------------


def test_nibbles_pack_high_first() -> None:
    codes = torch.tensor([1, 2, 3, 15, 0, 9, 7], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x12, 0x3F, 0x09, 0x70]  # the odd last code in a high nibble, low nibble 0
    assert_same_bits(unpack_nibbles(packed, 7), codes)
    with pytest.raises(ValueError):
        unpack_nibbles(packed, 9)


@pytest.mark.parametrize(("bits", "sign"), MAPS, ids=MAP_IDS)
def test_state_dict_round_trip_through_torch_load_weights_only(bits: Bits, sign: MapSign) -> None:
    values = wide_magnitudes(3 * 257, seed=1).view(3, 257)
    quantized = quantize(values, bits=bits, sign=sign)
    buffer = io.BytesIO()
    torch.save({"exp_avg": quantized.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["exp_avg"]
    assert {type(value) for key, value in loaded.items() if key not in ("codes", "scales")} <= {int, str, list}
    restored = QuantizedTensor.from_state_dict(loaded)
    assert restored.shape == (3, 257) and restored.bits == bits and restored.sign == sign
    assert_same_bits(restored.dequantize(), quantized.dequantize())
    assert quantized.dequantize().shape == values.shape


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda state: state.pop("map"),
        lambda state: state.update(bits="8"),
        lambda state: state.update(bits=8.0),
        lambda state: state.update(map="positive"),
        lambda state: state.update(shape=[3, -1]),
        lambda state: state.update(codes=state["codes"][:-1]),
        lambda state: state.update(codes=state["codes"].to(torch.int16)),
        lambda state: state.update(scales=state["scales"].double()),
        lambda state: state.update(scales=state["scales"][:-1]),
        lambda state: state.update(block_size=100),  # a different number of blocks
        lambda state: state.update(extra=1),
    ],
)
def test_from_state_dict_rejects_inconsistent_state(corrupt: Callable[[dict[str, Any]], object]) -> None:
    state: dict[str, Any] = dict(quantize(torch.randn(1000), bits=8, sign="signed").state_dict())
    corrupt(state)
    with pytest.raises(ValueError):
        QuantizedTensor.from_state_dict(state)


@pytest.mark.parametrize(("bits", "limit"), [(8, 2.1), (4, 1.1)])
def test_adam_state_checkpoint_bytes_per_parameter(bits: Bits, limit: float) -> None:
    """Both moments of 1M parameters (an odd count: partial blocks) in a saved checkpoint: at most 2.1
    bytes a parameter at 8 bits, 1.1 at 4 (codes and scales; the code books are not stored)."""
    numel = 1_000_003
    generator = torch.Generator().manual_seed(0)
    exp_avg = torch.randn(numel, generator=generator) * 1e-3
    exp_avg_sq = torch.rand(numel, generator=generator) * 1e-6
    states = {
        "exp_avg": quantize(exp_avg, bits=bits, sign=select_map("exp_avg")).state_dict(),
        "exp_avg_sq": quantize(exp_avg_sq, bits=bits, sign=select_map("exp_avg_sq")).state_dict(),
    }
    tensor_bytes = sum(value.nbytes for state in states.values() for value in state.values() if torch.is_tensor(value))
    assert tensor_bytes == 2 * quantized_nbytes(numel, bits)
    buffer = io.BytesIO()
    torch.save(states, buffer)
    assert tensor_bytes / numel <= limit
    assert len(buffer.getvalue()) / numel <= limit  # the file itself, pickle and zip overhead included


# ------------------------------------------------------------------------------------------------------
# Choosing the map
# ------------------------------------------------------------------------------------------------------


def test_select_map() -> None:
    assert select_map("exp_avg") == "signed"
    assert select_map("exp_avg_sq") == "unsigned"
    assert select_map("exp_avg_sq", nonnegative=False) == "signed"  # an explicit answer wins
    assert select_map("anything", nonnegative=True) == "unsigned"
    for name in ("z", "p0", "step", "exp_avg_typo"):
        with pytest.raises(ValueError, match="nonnegative"):
            select_map(name)


def test_select_map_agrees_with_the_optimizers_state() -> None:
    """After a few steps of each optimizer, every moment that the table calls unsigned is non-negative,
    every signed one has negative entries, and every tensor state is either in the table or a parameter
    copy that must not be quantized (schedule-free's `z`, Prodigy's `p0`)."""
    optimizers = [
        adaptopt.Adam,
        adaptopt.AMSGrad,
        adaptopt.AdaBelief,
        adaptopt.Lion,
        adaptopt.AdEMAMix,
        adaptopt.Adafactor,
        adaptopt.Prodigy,
        adaptopt.ADOPT,
        adaptopt.LAMB,
        adaptopt.RAdam,
        adaptopt.ScheduleFreeAdamW,
        adaptopt.Sophia,
        adaptopt.Muon,
    ]
    generator = torch.Generator().manual_seed(0)
    for optimizer_class in optimizers:
        param = torch.nn.Parameter(torch.randn(8, 8, generator=generator))
        optimizer = optimizer_class([param], lr=1e-3)
        for _ in range(3):
            param.grad = torch.randn(8, 8, generator=generator)
            optimizer.step()
        for name, value in optimizer.state[param].items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            if name in ("z", "p0"):
                continue
            sign = select_map(name)
            has_negative = bool((value < 0).any())
            assert has_negative == (sign == "signed"), f"{optimizer_class.__name__}.{name}"
    assert {"exp_avg", "exp_avg_sq"} <= set(STATE_SIGNEDNESS)


# ------------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------------


def all_maps_round_trip(values: torch.Tensor, *maps: torch.Tensor) -> list[torch.Tensor]:
    """Quantize and dequantize `values` with each of the four maps, 4-bit codes packed and unpacked."""
    outputs = []
    for (bits, _sign), code_map in zip(MAPS, maps, strict=True):
        block_size = DEFAULT_BLOCK_SIZES[bits]
        codes, scales = quantize_blockwise(values, code_map, block_size)
        if bits == 4:
            packed = pack_nibbles(codes)
            outputs.append(packed)
            codes = unpack_nibbles(packed, values.numel())
        outputs += [codes, scales, dequantize_blockwise(codes, scales, code_map, block_size)]
    return outputs


@pytest.mark.parametrize("layout", ["slice-of-flat-buffer", "partial-block-with-nan-and-inf"])
def test_compiled_round_trip_is_eager_bit_for_bit(layout: str) -> None:
    """`fullgraph=True` (no graph break, no data-dependent branch), same bits as eager. Two compiles only:
    each costs seconds here. One input is a contiguous slice of a flat buffer at a block boundary, the
    other a tensor with a partial last block and a NaN and an infinity (the per-block NaN policy)."""
    if layout == "slice-of-flat-buffer":
        buffer = wide_magnitudes(8192, seed=21)
        values = buffer[512 : 512 + 4096]
    else:
        values = wide_magnitudes(1000, seed=22)
        values[300], values[900] = float("nan"), float("inf")
    maps = [quantization_map(bits, sign) for bits, sign in MAPS]
    compiled = torch.compile(all_maps_round_trip, fullgraph=True, dynamic=False)
    for eager_output, compiled_output in zip(all_maps_round_trip(values, *maps), compiled(values, *maps), strict=True):
        assert_same_bits(compiled_output, eager_output)
