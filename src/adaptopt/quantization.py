r"""Block-wise quantization of optimizer state to 8 and 4 bits: the code books and the tensor functions.

An adaptive optimizer keeps one or two moments per parameter in float32, 8 bytes a parameter for Adam.
Storing each moment as one code a byte (8 bits) or half a byte (4 bits), with one float32 scale for every
block of $B$ codes, shrinks that to about 2 or 1 bytes a parameter, and the update barely notices:

* Dettmers, Lewis, Shleifer & Zettlemoyer, *8-bit Optimizers via Block-wise Quantization*, ICLR 2022
  (arXiv:2110.02861): 8-bit codes, blocks of $B = 256$, the dynamic (tree) code book below;
* Li, Chen & Zhu, *Memory Efficient Optimizers with 4-bit States*, NeurIPS 2023 (arXiv:2309.01507):
  4-bit codes, blocks of $B = 128$, and for the second moment a code book without zero.

**Block-wise quantization** (Dettmers et al. 2022, §2.1). Flatten the tensor to $x_0 \dots x_{n-1}$ and cut it
into blocks $b = 0 \dots \lceil n/B \rceil - 1$ of $B$ consecutive elements. Each block gets one scale, its
absolute maximum, and each element the index of the nearest entry of a sorted code book
$q_0 < q_1 < \dots < q_{K-1}$ in $[-1, 1]$ ($K = 256$ or $16$):

$$s_b = \max\Big(\max_{i \in b} |x_i|,\ 10^{-12}\Big), \qquad
  c_i = \operatorname*{arg\,min}_j \big| x_i / s_b - q_j \big|, \qquad \hat x_i = q_{c_i}\, s_b .$$

A block containing one large outlier therefore only loses precision in its own $B$ elements. Since
$|x_i / s_b| \le 1$, the error of one element is at most the code book's covering radius times $s_b$
(`covering_radius`): half the widest gap between neighbouring codes, or the distance from an end of the
domain ($\pm 1$ or $0$) to the nearest code where that is larger.

The rules below are those of torchao (`torchao.optim.quant_utils`, the implementation of both papers that
this module matches bit for bit, float32 arithmetic included):

* $y_i = x_i / s_b$ is a float32 *division* (not a multiplication by $1/s_b$, which rounds differently).
* Nearest code: with $j$ the largest index where $q_j \le y_i$ (0 if there is none) the code is $j + 1$ if
  $\mathrm{fl}(y_i - q_j) \ge \mathrm{fl}(q_{j+1} - q_j) \cdot \tfrac12$, else $j$. A tie goes up, to the larger
  code (for a negative $y_i$ that is the one of smaller magnitude). $y_i$ below $q_0$ gets $q_0$: with an
  unsigned code book a negative value becomes its smallest code.
* $\hat x_i = \mathrm{fl}(q_{c_i} \cdot s_b)$, one float32 product.
* The floor $10^{-12}$ on $s_b$ makes an all-zero block safe: it is divided by $10^{-12}$, not by 0. Such a
  block decodes to $q_{c}\cdot 10^{-12}$ with $c$ the code nearest 0: exactly 0 with the signed code
  books, $5.5 \cdot 10^{-20}$ and $10^{-12}/16$ with the unsigned ones, which have no zero. A block whose
  largest magnitude is below $10^{-12}$ is quantized relative to $10^{-12}$, so its absolute error is at most
  $10^{-12}$ times the covering radius.

What torchao leaves to its caller, this module decides:

* **No zero for non-negative moments.** The unsigned 8-bit code book is torchao's with its code 0 decoding to
  $5.5 \cdot 10^{-8}$ instead of 0 (`dynamic_map_without_zero`; Li et al. 2023, §4.1). torchao's
  `AdamW8bit` stores a small $v$ as 0 and then steps by $m/\epsilon$; this one cannot.

* **A last partial block.** When $n$ is not a multiple of $B$, the last block holds the $n \bmod B$ remaining
  elements. It is padded with zeros up to $B$ for the arithmetic, which changes neither its absolute
  maximum nor any real element's code; the padding's codes are not stored. So there are
  $\lceil n/B \rceil$ scales, and on the first $n$ elements the result is the one torchao gives for the
  zero-padded tensor.
* **NaN and infinities propagate, per block.** A block containing a NaN or $\pm\infty$ gets the scale NaN, so
  all of its $B$ elements decode to NaN; the other blocks are untouched. Raising instead would need a
  data-dependent branch, which `torch.compile` cannot fuse into an update; and a non-finite moment is
  already lost in float32 too (AMP's `GradScaler` skips such a step before it reaches the state). torchao
  would store $\infty$ and decode $-\infty$, 0 or NaN depending on the code book.
* **Inputs** of any floating dtype are converted to float32 first (bfloat16 and float16 exactly).

**4-bit packing.** Two 4-bit codes share one byte, high nibble first: element $2k$ is bits 7–4 of byte $k$,
element $2k + 1$ bits 3–0. (torchao's `OptimState4bit` and bitsandbytes' 4-bit formats use the same order.)
An odd $n$ leaves the low nibble of the last byte 0. So $n$ elements take $\lceil n/2 \rceil$ bytes.

**Memory.** Codes plus scales are $n + 4\lceil n/256 \rceil$ bytes for 8 bits, $\lceil n/2 \rceil +
4 \lceil n/128 \rceil$ for 4 bits (`quantized_nbytes`): for Adam's two moments 2.03 and 1.06 bytes a
parameter once $n$ is a few thousand; small tensors pay for a whole scale and are better left in float32
(bitsandbytes and torchao keep tensors under 4096 elements unquantized). The code book is not stored: it is
rebuilt from its name (`quantization_map`).

**Under `torch.compile`.** `quantize_blockwise` and `dequantize_blockwise` are plain tensor operations with
no loop over elements or blocks and no branch on values, so they compile with `fullgraph=True` and fuse
with the update that produces or consumes the state, also on a contiguous slice of a flat buffer. Build the
code book once (`quantization_map`) and pass it in; the convenience `quantize` builds it per call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal, cast, get_args

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_BLOCK_SIZES",
    "QUANTIZED_STATE_KEYS",
    "SCALE_FLOOR",
    "STATE_SIGNEDNESS",
    "Bits",
    "MapSign",
    "QuantizedTensor",
    "SearchTable",
    "code_book_and_table",
    "covering_radius",
    "dequantize",
    "dequantize_blocks",
    "dequantize_blockwise",
    "dynamic_map",
    "dynamic_map_without_zero",
    "linear_map_without_zero",
    "pack_nibbles",
    "quantization_map",
    "quantize",
    "quantize_blocks",
    "quantize_blockwise",
    "quantized_nbytes",
    "rounding_boundaries",
    "search_table",
    "select_map",
    "unpack_nibbles",
]

Bits = Literal[4, 8]
"""Code width: 8 (Dettmers et al. 2022) or 4 (Li et al. 2023)."""

MapSign = Literal["signed", "unsigned"]
"""Which code book: "signed" covers $[-1, 1]$ (moments that change sign), "unsigned" $[0, 1]$ (non-negative ones)."""

DEFAULT_BLOCK_SIZES: Final[Mapping[int, int]] = MappingProxyType({8: 256, 4: 128})
"""The papers' block sizes: 256 for 8 bits (Dettmers et al. 2022, torchao), 128 for 4 bits (Li et al. 2023)."""

SCALE_FLOOR: Final[float] = 1e-12
"""The smallest scale a block gets (torchao's), so that an all-zero block is not divided by 0."""

_STATE_DICT_KEYS: Final = frozenset({"codes", "scales", "shape", "bits", "map", "block_size"})
QUANTIZED_STATE_KEYS: Final[frozenset[str]] = _STATE_DICT_KEYS
"""The keys of `QuantizedTensor.state_dict()`: how a checkpoint's loader recognises a quantized entry."""


# ----------------------------------------------------------------------------------------------------------
# Code books
# ----------------------------------------------------------------------------------------------------------


def _interval_midpoints(count: int) -> torch.Tensor:
    """The midpoints of `count` equal cells of $[0.1, 1]$, in float32 as the reference implementations compute them.

    The grid comes from `torch.linspace` (not from $0.1 + 0.9k/\\text{count}$ in float64) and the mean is a
    float32 sum halved: that is how bitsandbytes and torchao build the dynamic map, and the codes of a
    checkpoint only decode right with the same float32 values.
    """
    edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
    return (edges[:-1] + edges[1:]) / 2.0


def dynamic_map(*, signed: bool, exponent_bits: int, total_bits: int) -> torch.Tensor:
    r"""The dynamic (tree) quantization code book: $2^{T}$ sorted float32 values in $[-1, 1]$ or $[0, 1]$.

    Dettmers, *8-Bit Approximations for Parallelism in Deep Learning*, ICLR 2016 (arXiv:1511.04561), and its
    use for optimizer state in Dettmers et al. 2022, §2.2. A code is a sign bit (signed maps only), then
    $e$ zero bits that give the decade $10^{-e}$, an indicator bit 1, and the remaining bits a linear
    fraction: small magnitudes get few fraction bits but many decades, large ones many fraction bits.
    As values: for each level $i = 0 \dots E - 1$ ($E$ = `exponent_bits`, $T$ = `total_bits`), the decade
    $10^{\,i - (E - 1)}$ times the midpoints of $n_i$ equal cells of $[0.1, 1]$, with

    $$n_i = 2^{\,i + T - 1 - E} \text{ (signed, and its negatives)}, \qquad n_i = 2^{\,i + T - E} \text{ (unsigned)},$$

    plus $2^{T - 1 - E} - 1$ extra midpoints in the top decade when $E < T - 1$, and the values 0 and 1.
    `dynamic_map(signed=s, exponent_bits=7, total_bits=8)` is the 8-bit map of bitsandbytes'
    `create_dynamic_map(signed=s)`; `exponent_bits=3, total_bits=4` the 4-bit first-moment map of Li et al.
    (torchao's `create_dynamic_map(True, 3, 4)`; bitsandbytes pads that one with zeros to 256 entries).
    """
    if not 1 <= exponent_bits <= total_bits - 1:
        raise ValueError(f"need 1 <= exponent_bits <= total_bits - 1, got {exponent_bits=} and {total_bits=}")
    magnitude_bits = total_bits - 1  # Unsigned maps spend the sign bit on the fraction: see n_i above.
    values: list[torch.Tensor] = []
    for level in range(exponent_bits):
        decade = 10.0 ** (level - (exponent_bits - 1))
        cells = 2 ** (level + magnitude_bits - exponent_bits + (0 if signed else 1))
        values.append(decade * _interval_midpoints(cells))
    extra = 2 ** (magnitude_bits - exponent_bits) - 1
    if extra > 0:  # Codes with no exponent bit set and no indicator bit: more fraction in the top decade.
        values.append(_interval_midpoints(extra))
    positive = torch.cat(values)
    negative = -positive if signed else positive[:0]
    ends = torch.tensor([0.0, 1.0], dtype=torch.float32)
    code_book = torch.sort(torch.cat([negative, positive, ends])).values
    if code_book.numel() != 2**total_bits:
        raise ValueError(
            f"{exponent_bits} exponent bits make {code_book.numel()} {'signed' if signed else 'unsigned'} codes, "
            f"not the {2**total_bits} of {total_bits} bits"
        )
    return code_book


def linear_map_without_zero(total_bits: int) -> torch.Tensor:
    r"""The linear code book without zero, $q_j = (j + 1) / 2^{T}$ for $j = 0 \dots 2^{T} - 1$.

    Li et al. 2023, §4.1–4.2: a second moment $v$ that is quantized to 0 turns the update
    $m / (\sqrt v + \epsilon)$ into $m/\epsilon$, a huge step; a code book whose smallest value is $2^{-T}$
    (here $1/16$) cannot do that. The paper pairs it with rank-1 normalization; torchao, which this module
    follows, with block-wise scales of 128. Exactly torchao's `torch.linspace(0, 1, 17)[1:]` for 4 bits.
    """
    levels = 2**total_bits
    return torch.arange(1, levels + 1, dtype=torch.float32).div(levels)


def dynamic_map_without_zero(*, exponent_bits: int, total_bits: int) -> torch.Tensor:
    r"""The unsigned dynamic code book without zero ("DE-0", Li et al. 2023, §4.1): $2^{T}$ sorted float32
    values in $(0, 1]$.

    A second moment $v$ quantized to 0 beside a first moment $m \ne 0$ turns Adam's update
    $m / (\sqrt v + \epsilon)$ into $m / \epsilon$. With the 8-bit dynamic map that is no corner case: its
    smallest nonzero code is $3.25 \cdot 10^{-7}$ of the block's largest $v$, and any $v$ below half of it
    becomes 0. On the MNIST CNN 1.9k of fc1's 400k weights were there after two steps, and Adam with 8-bit state
    diverged in its first epoch. Li et al. take the zero out; to keep $2^{T}$ distinct codes, the code it
    frees extends the tree by one decade downwards: `dynamic_map(signed=False, ...)` with 0 replaced by
    $10^{-E}$ times the midpoint of $[0.1, 1]$ ($5.5 \cdot 10^{-8}$ for $E = 7$). A value below that now rounds
    up to it: $v$ a little too large and the step a little too small, never $m/\epsilon$.
    """
    code_book = dynamic_map(signed=False, exponent_bits=exponent_bits, total_bits=total_bits)
    next_decade_down = 10.0 ** (-exponent_bits) * _interval_midpoints(1)
    return torch.cat([next_decade_down, code_book[1:]])


@functools.cache
def _cached_map(bits: int, sign: str) -> torch.Tensor:
    if bits == 8:
        if sign == "signed":
            return dynamic_map(signed=True, exponent_bits=7, total_bits=8)
        return dynamic_map_without_zero(exponent_bits=7, total_bits=8)
    if sign == "signed":
        return dynamic_map(signed=True, exponent_bits=3, total_bits=4)
    return linear_map_without_zero(4)


def quantization_map(bits: Bits, sign: MapSign, device: torch.device | str | None = None) -> torch.Tensor:
    r"""The code book for `bits` and `sign`, a new sorted float32 tensor on `device` ($2^{\text{bits}}$ entries).

    | bits | signed (first moment: $m_t$, momentum)        | unsigned (second moment: $v_t$, $\max v_t$, ...) |
    |------|-----------------------------------------------|--------------------------------------------------|
    | 8    | dynamic, 7 exponent bits, $[-1, 1]$           | dynamic without zero, 7 exponent bits, $(0, 1]$  |
    | 4    | dynamic, 3 exponent bits, $[-1, 1]$           | linear without zero, $\{1/16, \dots, 1\}$        |

    The 8-bit maps are those of Dettmers et al. 2022 (bitsandbytes' and torchao's `create_dynamic_map`), the
    4-bit ones torchao's implementation of Li et al. 2023 (`get_qmap_signed`, `get_qmap_unsigned`). Every
    unsigned map is without zero, as Li et al. §4.1 ask for the second moment: the 8-bit one therefore parts
    from bitsandbytes' and torchao's in its code 0, which decodes to $5.5 \cdot 10^{-8}$, not to 0
    (`dynamic_map_without_zero`, where the reason is).
    Each call returns a fresh tensor, so a caller that writes into it cannot corrupt another's.
    """
    _check_bits_and_sign(bits, sign)
    return _cached_map(bits, sign).to(device=device, copy=True)


@functools.cache
def code_book_and_table(bits: Bits, sign: MapSign, device: torch.device) -> tuple[torch.Tensor, SearchTable | None]:
    """The code book for `bits` and `sign` on `device` and its `search_table`, built once per process and
    shared: read them, never write into them (`quantization_map` gives a tensor of one's own)."""
    code_map = quantization_map(bits, sign, device)
    return code_map, search_table(code_map)


def covering_radius(code_map: torch.Tensor, sign: MapSign) -> float:
    r"""The largest distance from a point of the domain to its nearest code: $\max_{y} \min_j |y - q_j|$.

    The domain is $[-1, 1]$ for a signed code book and $[0, 1]$ for an unsigned one (where block-wise
    normalization puts every value). It is half the widest gap between neighbours, or the distance from
    an end of the domain to the first or last code if that is larger (1/16 at 0 for the map without zero).
    Computed in float64 from the float32 codes.
    """
    codes = code_map.detach().to(device="cpu", dtype=torch.float64)
    low_end = -1.0 if sign == "signed" else 0.0
    half_gaps = (codes[1:] - codes[:-1]) / 2
    widest = half_gaps.max().item() if half_gaps.numel() else 0.0
    return max(widest, codes[0].item() - low_end, 1.0 - codes[-1].item())


# ----------------------------------------------------------------------------------------------------------
# Choosing the code book
# ----------------------------------------------------------------------------------------------------------

STATE_SIGNEDNESS: Final[Mapping[str, MapSign]] = MappingProxyType(
    {
        # EMAs of the gradient: change sign.
        "exp_avg": "signed",  # Adam's m_t and every relative's
        "exp_avg_slow": "signed",  # AdEMAMix's slow EMA m_2
        "momentum_buffer": "signed",  # Lion's and Muon's momentum
        "s": "signed",  # Prodigy's s_t, an EMA of d_t * g_t
        # EMAs and running maxima of squares: never negative.
        "exp_avg_sq": "unsigned",  # v_t = EMA of g_t^2
        "max_exp_avg_sq": "unsigned",  # AMSGrad's max of v_t
        "exp_avg_var": "unsigned",  # AdaBelief's s_t = EMA of (g_t - m_t)^2 + eps
        "max_exp_avg_var": "unsigned",
        "variance": "unsigned",  # Adafactor's unfactored EMA of g_t^2 + eps_1
        "row_var": "unsigned",  # Adafactor's factored row and column EMAs
        "col_var": "unsigned",
        "hessian": "unsigned",  # Sophia-G's EMA of B * g_hat^2 (Gauss-Newton-Bartlett)
    }
)
"""Which code book each moment of this library's optimizers takes, by its name in the optimizer's state.

Not listed on purpose: parameter copies (schedule-free's `z`, Prodigy's `p0`), whose rounding error would
go straight into the parameters, and scalars such as `step`."""


def select_map(state_name: str, *, nonnegative: bool | None = None) -> MapSign:
    """The code book for the state tensor `state_name`: "unsigned" if it can never be negative, else "signed".

    `nonnegative` wins where given (an optimizer that knows better, or a state this table lacks); otherwise
    the name is looked up in `STATE_SIGNEDNESS`. An unknown name raises `ValueError` rather than guessing:
    "unsigned" for a tensor that goes negative would silently turn every negative value into the smallest
    code, "signed" for a non-negative one wastes half the codes (and, at 4 bits, brings back the zero that
    Li et al. remove), and some state should not be quantized at all.
    """
    if nonnegative is not None:
        return "unsigned" if nonnegative else "signed"
    if state_name not in STATE_SIGNEDNESS:
        raise ValueError(
            f"no code book is known for the state {state_name!r}; pass nonnegative=True or False "
            f"(known: {', '.join(sorted(STATE_SIGNEDNESS))})"
        )
    return STATE_SIGNEDNESS[state_name]


# ----------------------------------------------------------------------------------------------------------
# Block-wise quantization
# ----------------------------------------------------------------------------------------------------------


def _check_bits_and_sign(bits: object, sign: object) -> None:
    if type(bits) is not int or bits not in get_args(Bits):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if sign not in get_args(MapSign):
        raise ValueError(f"the map must be 'signed' or 'unsigned', got {sign!r}")


def _check_block_size(block_size: int) -> None:
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, got {block_size}")  # Even: nibble pairs.


def _num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def _as_blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """`flat` as a `(blocks, block_size)` matrix; the last block is padded with zeros, which leave its absmax alone."""
    return F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)


SearchTable = tuple[torch.Tensor, torch.Tensor]
"""`search_table`'s pair: per float32 prefix, the code of the prefix's smallest number (int32) and the
rounding boundary within the prefix's numbers (float32; NaN where there is none)."""

_PREFIX_SHIFT: Final = 16
"""A float32's top 16 bits (sign, exponent, 7 bits of mantissa) index the search table: 65536 prefixes."""


def _largest_code_at_most(normalized: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """The largest j with q_j <= y, or 0 where there is none (y below q_0), as int64; the last index for NaN
    (its block decodes to NaN through its scale anyway), as `searchsorted` has it.

    Under `torch.compile`, for a code book of 2^k entries (all four of ours), a branchless binary search of k
    steps, each an elementwise compare with a gathered code (the technique of torchao's
    `quantize_8bit_with_qmap`): inductor compiles it into the loop around it, 1.7x faster than its
    `searchsorted` (1M elements, one thread: 29 against 54 ms). Eagerly, `searchsorted`, a single op, is
    faster than the search's 3k ops (88 against 176 ms for a whole quantization). `search_table` is faster
    than both."""
    count = code_map.numel()
    if count & (count - 1) or not torch.compiler.is_compiling():
        return (torch.searchsorted(code_map, normalized, right=True) - 1).clamp(0, count - 1)
    below = torch.zeros(normalized.shape, dtype=torch.int64, device=normalized.device)
    step = count // 2
    while step:
        below += torch.where(normalized >= code_map[below + step], step, 0)
        step //= 2
    return torch.where(normalized.isnan(), count - 1, below)  # where searchsorted puts NaN: after the last


def _nearest_codes(normalized: torch.Tensor, code_map: torch.Tensor, table: SearchTable | None = None) -> torch.Tensor:
    """The index of the nearest code for each value, the rule of the module docstring, as int64 (int32 with
    `table`, which gives the same codes in two lookups: `search_table`)."""
    last = code_map.numel() - 1
    if table is not None:
        codes_below, boundary_within = table
        prefix = (normalized.view(torch.int32) >> _PREFIX_SHIFT) + (1 << (31 - _PREFIX_SHIFT))
        codes = codes_below[prefix] + (normalized >= boundary_within[prefix]).to(torch.int32)
        return torch.where(normalized.isnan(), last, codes)  # the search's code for NaN
    below = _largest_code_at_most(normalized, code_map)
    above = (below + 1).clamp(max=last)
    value_below, value_above = code_map[below], code_map[above]
    # Written as torchao compares, fl(y - q_j) >= fl(q_{j+1} - q_j) / 2, not as y >= midpoint: the two
    # differ in the last bit near a midpoint, and the codes are to be torchao's.
    rounds_up = (normalized - value_below) >= (value_above - value_below) * 0.5
    return torch.where(rounds_up, above, below)


def rounding_boundaries(code_map: torch.Tensor) -> torch.Tensor:
    r"""The float32 numbers $t_0 < \dots < t_{K-2}$ where the nearest code steps up: the code of $y$ is the
    number of $t_j \le y$, exactly as the module's rule (torchao's float32 comparison) rounds.

    $t_j$ is the smallest float32 $y$ with $\mathrm{fl}(y - q_j) \ge \mathrm{fl}(q_{j+1} - q_j) \cdot \tfrac12$;
    as $\mathrm{fl}(y - q_j)$ grows with $y$, that rule rounds up exactly from $t_j$ on, and
    $q_j < t_j \le q_{j+1}$, so counting the $t_j$ at or below $y$ counts the codes below and the step up
    (below $q_0$ nothing counts: code 0; above the last code everything: code $K - 1$). Found among the 129
    float32 numbers within 64 ulps of the midpoint, with the rule's own float32 arithmetic.
    """
    low, high = code_map[:-1], code_map[1:]
    midpoints = ((low.double() + high.double()) / 2).to(torch.float32)
    steps = torch.arange(-64, 65, dtype=torch.int32, device=code_map.device)
    upwards = torch.where(midpoints < 0, -1, 1).to(torch.int32).unsqueeze(1)  # a negative float's bits grow downwards
    candidates = (midpoints.view(torch.int32).unsqueeze(1) + steps * upwards).view(torch.float32)
    rounds_up = (candidates - low.unsqueeze(1)) >= ((high - low) * 0.5).unsqueeze(1)
    if bool(rounds_up[:, 0].any()) or not bool(rounds_up[:, -1].all()):
        raise ValueError("a rounding boundary lies more than 64 ulps from its midpoint")
    return candidates.gather(1, rounds_up.to(torch.uint8).argmax(dim=1, keepdim=True)).squeeze(1)


def search_table(code_map: torch.Tensor) -> SearchTable | None:
    r"""A table that finds the nearest code of a float32 $y$ with two lookups, or None for a code book too
    dense for it.

    The float32 numbers that share their top 16 bits form an interval $[a, b]$ of relative width $2^{-7}$.
    Where no interval holds two of the code book's `rounding_boundaries` (in all four of this library's code
    books neighbouring boundaries are 1.4% apart at least, relative, against 0.8%), the code of every $y$ of
    the interval is the code of $a$, plus 1 if $y$ is at or past the boundary within it. So the table holds
    the code of $a$ and that boundary (NaN where the interval holds none, which no comparison reaches): two
    lookups in 64K-entry tables, where the binary search takes $\log_2 K$ dependent ones and then compares with
    two codes. The codes are the rule's, bit for bit; NaN inputs are left to the caller (their code is the
    last, as the search has it). Built in float64 from the float32 boundaries, on the code book's device.
    """
    if code_map.numel() > 256:
        return None
    boundaries = rounding_boundaries(code_map).double()
    prefixes = torch.arange(1 << (32 - _PREFIX_SHIFT), dtype=torch.int64, device=code_map.device)
    lowest_bits = ((prefixes - (1 << (31 - _PREFIX_SHIFT))) << _PREFIX_SHIFT).to(torch.int32)
    ends = [bits.view(torch.float32).double() for bits in (lowest_bits, lowest_bits | ((1 << _PREFIX_SHIFT) - 1))]
    # Exponent all ones: an infinity and NaNs. The infinity is the interval's only number that compares.
    not_finite = ((lowest_bits >> 23) & 0xFF) == 0xFF
    infinity = torch.where(lowest_bits < 0, -torch.inf, torch.inf).double()
    ends = [torch.where(not_finite, infinity, end) for end in ends]
    low, high = torch.minimum(*ends), torch.maximum(*ends)  # negative floats grow downwards with their bits
    code_low = torch.searchsorted(boundaries, low, right=True)
    code_high = torch.searchsorted(boundaries, high, right=True)
    if int((code_high - code_low).max()) > 1:
        return None
    within = torch.where(code_high > code_low, boundaries[code_low.clamp(max=boundaries.numel() - 1)], torch.nan)
    # int32, not uint8: inductor's CPU loops add uint8 four times slower (1M elements: 17 against 4.2 ms).
    return code_low.to(torch.int32), within.to(torch.float32)


def quantize_blockwise(
    values: torch.Tensor, code_map: torch.Tensor, block_size: int, table: SearchTable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Codes and block scales of `values`: $c_i$ nearest $x_i / s_b$, $s_b = \max(\max_{i \in b}|x_i|, 10^{-12})$.

    Returns `(codes, scales)`: `codes` uint8 of shape `(n,)`, one per element in the order of
    `values.reshape(-1)`, unpacked even for a 16-entry map (see `pack_nibbles`); `scales` float32 of shape
    `(ceil(n / block_size),)`. `code_map` is a sorted float32 code book of at most 256 entries on the
    device of `values` (`quantization_map`). The last partial block, zero blocks and NaN/inf are handled
    as the module docstring says. The codes equal torchao's `quantize_8bit_with_qmap` /
    `quantize_4bit_with_qmap` after `scale_tensor`, and the scales its scales, bit for bit. `table`, the code
    book's `search_table`, makes it faster and changes no code (`quantize_blocks`).
    """
    _check_block_size(block_size)
    if code_map.dim() != 1 or code_map.dtype != torch.float32 or not 2 <= code_map.numel() <= 256:
        raise ValueError("code_map must be a 1-d float32 tensor of 2 to 256 sorted codes")
    flat = values.reshape(-1).to(torch.float32)
    codes, scales = quantize_blocks(_as_blocks(flat, block_size), code_map, table)
    return codes.reshape(-1)[: flat.numel()], scales


def quantize_blocks(
    blocks: torch.Tensor, code_map: torch.Tensor, table: SearchTable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blockwise` of whole blocks, the rows of `blocks` (`(blocks, block_size)`, float32): codes
    uint8 of the same shape and a scale per row. No padding and no cut, so a compiled update over a stretch of
    whole blocks reads and writes without masks (the fused low-bit step, `low_bit_execution.py`).

    With `table` (`search_table(code_map)`) the nearest code is found by prefix lookups instead of a search:
    the same codes, bit for bit, and faster: for the 8-bit maps on the CPU (1M elements, one thread) 4.6
    against 26 ms under `torch.compile`, 29 against 102 ms eagerly (against `searchsorted`)."""
    absmax = blocks.abs().amax(dim=1)  # NaN if the block holds one, inf if it holds an infinity.
    scales = torch.where(torch.isfinite(absmax), absmax.clamp(min=SCALE_FLOOR), torch.nan)
    return _nearest_codes(blocks / scales.unsqueeze(1), code_map, table).to(torch.uint8), scales


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """`dequantize_blockwise` of whole blocks: `codes` uint8 `(blocks, block_size)`, a scale per row; float32
    values of the codes' shape: the products of `dequantize_blockwise`."""
    return code_map[codes.to(torch.int32)] * scales.unsqueeze(1)


def dequantize_blockwise(
    codes: torch.Tensor, scales: torch.Tensor, code_map: torch.Tensor, block_size: int
) -> torch.Tensor:
    r"""The float32 values $\hat x_i = q_{c_i} \cdot s_{\lfloor i / B \rfloor}$ of unpacked `codes`, flat, shape `(n,)`.

    The inverse of `quantize_blockwise` up to the rounding: `codes` uint8 (one per element), `scales` its
    `ceil(n / block_size)` scales. Equal to torchao's `dequant_with_qmap` bit for bit.
    """
    _check_block_size(block_size)
    numel = codes.numel()
    if scales.shape != (_num_blocks(numel, block_size),):
        raise ValueError(
            f"{numel} codes in blocks of {block_size} need {_num_blocks(numel, block_size)} scales, "
            f"got shape {tuple(scales.shape)}"
        )
    # Pad to whole blocks, scale, cut: torch 2.13's inductor (CPU) miscompiles the equivalent
    # `decoded * scales.repeat_interleave(block_size)[:numel]` (and the expand/reshape form), reading garbage
    # for the elements of a last partial block.
    # int32, not uint8: eager indexing would read a uint8 tensor as a boolean mask, and inductor cannot
    # index with uint8 at all.
    decoded = code_map[codes.reshape(-1).to(torch.int32)]
    return (_as_blocks(decoded, block_size) * scales.unsqueeze(1)).reshape(-1)[:numel]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte, high nibble first: byte k is `codes[2k] << 4 | codes[2k + 1]`, shape `(ceil(n/2),)`.

    `codes` is uint8 with every value below 16; for an odd count the last low nibble is 0.
    """
    flat = codes.reshape(-1)
    pairs = F.pad(flat, (0, flat.numel() % 2)).view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first `numel` 4-bit codes of `packed` (`pack_nibbles`' layout), uint8, shape `(numel,)`."""
    if not max(0, 2 * packed.numel() - 1) <= numel <= 2 * packed.numel():
        raise ValueError(f"{packed.numel()} bytes hold 2 * {packed.numel()} or one fewer codes, not {numel}")
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1)[:numel]


def quantized_nbytes(numel: int, bits: Bits, block_size: int | None = None) -> int:
    """Bytes of codes and float32 scales for `numel` elements: what a checkpoint holds for one state tensor."""
    _check_bits_and_sign(bits, "signed")
    block_size = DEFAULT_BLOCK_SIZES[bits] if block_size is None else block_size
    code_bytes = numel if bits == 8 else -(-numel // 2)
    return code_bytes + 4 * _num_blocks(numel, block_size)


# ----------------------------------------------------------------------------------------------------------
# A quantized tensor, and its state_dict form
# ----------------------------------------------------------------------------------------------------------

StateValue = torch.Tensor | int | str | list[int]


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor stored as block-wise codes and scales; the code book is named, not stored.

    `codes`: uint8, 1-d; one code a byte for 8 bits, two a byte (`pack_nibbles`) for 4 bits.
    `scales`: float32, 1-d, one per block of `block_size` elements of the flattened tensor.
    `shape`: the original shape; `bits` and `sign` name the code book (`quantization_map`).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    bits: Bits
    sign: MapSign
    block_size: int

    def __post_init__(self) -> None:
        _check_bits_and_sign(self.bits, self.sign)
        _check_block_size(self.block_size)
        numel = self.numel
        code_bytes = numel if self.bits == 8 else -(-numel // 2)
        if self.codes.dtype != torch.uint8 or self.codes.shape != (code_bytes,):
            raise ValueError(
                f"{self.bits}-bit codes of {numel} elements are uint8 of shape ({code_bytes},), got "
                f"{self.codes.dtype} of shape {tuple(self.codes.shape)}"
            )
        blocks = _num_blocks(numel, self.block_size)
        if self.scales.dtype != torch.float32 or self.scales.shape != (blocks,):
            raise ValueError(
                f"{numel} elements in blocks of {self.block_size} need float32 scales of shape ({blocks},), "
                f"got {self.scales.dtype} of shape {tuple(self.scales.shape)}"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales (the code book is rebuilt, not stored)."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor back, in `shape`, computed in float32 and then converted to `dtype`."""
        return dequantize(self, dtype=dtype)

    def state_dict(self) -> dict[str, StateValue]:
        """Plain tensors, ints, a string and a list: what `torch.save` and `torch.load(weights_only=True)` keep."""
        return {
            "codes": self.codes,
            "scales": self.scales,
            "shape": list(self.shape),
            "bits": self.bits,
            "map": self.sign,
            "block_size": self.block_size,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, object]) -> QuantizedTensor:
        """The inverse of `state_dict`, checking every field (a checkpoint may come from anywhere)."""
        if set(state) != _STATE_DICT_KEYS:
            raise ValueError(f"a quantized tensor's state has the keys {sorted(_STATE_DICT_KEYS)}, got {sorted(state)}")
        codes, scales, shape = state["codes"], state["scales"], state["shape"]
        bits, sign, block_size = state["bits"], state["map"], state["block_size"]
        if not isinstance(codes, torch.Tensor) or not isinstance(scales, torch.Tensor):
            raise ValueError("codes and scales must be tensors")
        if not isinstance(shape, (list, tuple)) or not all(type(size) is int and size >= 0 for size in shape):
            raise ValueError(f"shape must be a list of non-negative ints, got {shape!r}")
        if type(block_size) is not int:
            raise ValueError(f"block_size must be an int, got {block_size!r}")
        _check_bits_and_sign(bits, sign)
        return cls(codes, scales, tuple(shape), cast(Bits, bits), cast(MapSign, sign), block_size)


def quantize(values: torch.Tensor, *, bits: Bits, sign: MapSign, block_size: int | None = None) -> QuantizedTensor:
    """`values` as a `QuantizedTensor` with the code book `quantization_map(bits, sign)`.

    `block_size` defaults to the paper's (`DEFAULT_BLOCK_SIZES`: 256 for 8 bits, 128 for 4).
    """
    _check_bits_and_sign(bits, sign)
    block_size = DEFAULT_BLOCK_SIZES[bits] if block_size is None else block_size
    code_map, table = code_book_and_table(bits, sign, values.device)
    codes, scales = quantize_blockwise(values, code_map, block_size, table)
    stored = pack_nibbles(codes) if bits == 4 else codes
    return QuantizedTensor(stored, scales, tuple(values.shape), bits, sign, block_size)


def dequantize(quantized: QuantizedTensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of `quantized` in its original shape: float32 $q_{c_i} s_b$, then converted to `dtype`."""
    codes = quantized.codes
    if quantized.bits == 4:
        codes = unpack_nibbles(codes, quantized.numel)
    code_map = quantization_map(quantized.bits, quantized.sign, codes.device)
    flat = dequantize_blockwise(codes, quantized.scales, code_map, quantized.block_size)
    return flat.view(quantized.shape).to(dtype)
