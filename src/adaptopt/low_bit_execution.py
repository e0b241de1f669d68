r"""Low-bit state on the fast paths: each param's codes decoded, updated and encoded in one pass.

A group with `state_dtype="8bit"` or `"4bit"` keeps its per-element moments as block-wise codes
(`quantization.py`; which entries, and why, in the base class's docstring). The reference loop decodes a
param's whole state to working tensors, runs `update` on them and encodes what the update wrote. Here the
same three steps run over the param in pieces, so that no full-size copy of the state in float32 exists:

* **bucketed** (and `auto` before it compiles): the param is cut into chunks of `CHUNK` elements, a whole
  number of blocks at both widths, and each chunk's codes are decoded, updated with the optimizer's own
  `update` and encoded into new code and scale tensors. Blocks start at the param's first element, as the
  reference's do, and every chunk but the last holds whole blocks, so the codes and scales are the reference's
  bit for bit (the update is elementwise, so it computes the same numbers on a chunk as on the whole).
  The temporaries are a few chunk-sized tensors, and the new codes a quarter (8 bits) or an eighth (4 bits)
  of a float32 param per moment.
* **compiled**: a chunk of the param's blocks is one call of a `torch.compile`d function that decodes, runs
  `update` and encodes, on matrices with a block a row (no masks in the compiled loops); a last partial block
  joins the last chunk's call as a row padded with repeats of its last element, on copies of that chunk
  (`_step_compiled` says why that leaves the codes as the reference's). It is compiled per set of constants (the group's
  hyper-parameters, the non-float scalars, dtype, the code formats), for any number of blocks, and before its
  first use it must step scratch inputs as the eager code does (`_FusedUpdate._verify`). Finding the nearest
  code takes two lookups in a 64K-entry table per element (`quantization.search_table`) and decoding one in the
  code book, scalar loads in inductor's CPU loops, so on the CPU the step is compute-bound, not memory-bound as
  fp32 Adam's is: 1M params of 8-bit Adam take about 26 ms compiled on one thread and 60 ms eagerly, against
  2 ms in torch's fused Adam with fp32 state (docs/low-bit.md).
  So `auto` keeps the low-bit update eager until it has done `AUTO_COMPILE_WORK` element-updates, as for
  buckets, and then compiles it.

An entry that `update` does not write keeps its codes, as in the reference (decoding and encoding again is
not the identity). Which entries an update writes is learned from its first, eager, step with those
constants, by torch's version counters of the decoded tensors; the compiled function then encodes exactly
those. The state dict holds a new `QuantizedTensor` for each written entry after every step, as the
reference's does, so a checkpoint taken at any point never aliases codes that a later step overwrites.

Only optimizers whose `step_param` is elementwise and that need no first pass (`reduces`) take this path.
float32 and float64 params step in place; bf16 and fp16 params on fp32 copies (a chunk's, or inside the
compiled function), rounded back to nearest, as the reference loop's working copies are. The rest of a
low-bit group runs through the reference loop (`GenericAdaptiveOptimizer._step_low_bit` says which).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import torch_internals as internals
from .compiled import compilation_supported, constants_key
from .quantization import (
    QuantizedTensor,
    code_book_and_table,
    dequantize_blocks,
    dequantize_blockwise,
    pack_nibbles,
    quantize_blocks,
    quantize_blockwise,
    unpack_nibbles,
)


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a param's math runs in: fp32 for bf16 and fp16 params (as in the reference loop), else its own."""
    return torch.float32 if dtype.itemsize < 4 else dtype


if TYPE_CHECKING:
    from .base import Group, Scalars, State
    from .execution import Steppable

__all__ = ["CHUNK", "LowBitExecution"]

CHUNK = 1 << 16
"""Elements per chunk, eager or compiled: a multiple of both block sizes (256 and 128), so chunks hold whole
blocks. It bounds the step's temporaries (the eager encoding makes int32 and float ones a chunk long, and the
compiled loops keep the updated moments between the block maxima and the codes): measured at 4 params of 4M,
8-bit Adam, the peak extra memory of a step was 0.64 params' worth eagerly and 0.51 compiled, the new codes
(0.5) and little more (with chunks of 2^18: 1.3 and 2.5). A chunk's call costs tens of microseconds beside its
few milliseconds of decoding, updating and encoding on the CPU."""

LOW_BIT_COMPILED_VARIANTS = 16
"""Compiled low-bit updates an optimizer may make (per constants and code formats); past that, eager."""

Format = tuple[int, str, int]
"""A quantized entry's (bits, map name, block size)."""


def _codes(quantized: QuantizedTensor, start: int, stop: int) -> torch.Tensor:
    """The codes of elements `start:stop` of `quantized` (flattened), one a byte; `start` is even."""
    if quantized.bits == 4:
        return unpack_nibbles(quantized.codes[start // 2 : (stop + 1) // 2], stop - start)
    return quantized.codes[start:stop]


def _decode(quantized: QuantizedTensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Elements `start:stop` of `quantized` (flattened), decoded; `start` is at a block boundary."""
    block = quantized.block_size
    codes = _codes(quantized, start, stop)
    scales = quantized.scales[start // block : -(-stop // block)]
    code_map, _ = code_book_and_table(quantized.bits, quantized.sign, codes.device)
    return dequantize_blockwise(codes, scales, code_map, block).to(dtype)


class _FusedUpdate:
    """Decode, `optimizer.update`, encode: compiled for one set of constants and code formats."""

    def __init__(
        self,
        optimizer: Steppable,
        constants: Group,
        formats: dict[str, Format],
        plain_keys: Sequence[str],
        written: Sequence[str],
        scalars: Scalars,
        device: torch.device,
        tag: str,
    ) -> None:
        self.names = names = tuple(name for name, value in scalars.items() if isinstance(value, float))
        fixed = {name: value for name, value in scalars.items() if name not in names}
        quantized = tuple(formats.items())
        books = {key: code_book_and_table(bits, sign, device) for key, (bits, sign, _) in quantized}
        maps = {key: code_map for key, (code_map, _) in books.items()}
        tables = {key: table for key, (_, table) in books.items()}
        plain = tuple(plain_keys)
        self.written = tuple(written)

        def fused(param: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, *inputs: torch.Tensor) -> Any:
            # Everything is a matrix of whole blocks, a block a row: no padding, no masks in the compiled loops.
            # The grad comes in the working dtype: the param's, or fp32 for a bf16/fp16 param, which is stepped on
            # an fp32 copy and rounded back to nearest, as in the reference loop.
            work = param if param.dtype == grad.dtype else param.to(grad.dtype)
            step_scalars = dict(fixed)
            for index, name in enumerate(names):
                step_scalars[name] = packed[index]
            state: dict[str, Any] = {}
            for index, (key, (bits, _, _)) in enumerate(quantized):
                codes, scales = inputs[2 * index], inputs[2 * index + 1]
                if bits == 4:  # two codes a byte, high nibble first (`pack_nibbles`)
                    codes = torch.stack((codes >> 4, codes & 0x0F), dim=-1).view(codes.shape[0], -1)
                state[key] = dequantize_blocks(codes, scales, maps[key]).to(grad.dtype)
            for index, key in enumerate(plain):
                state[key] = inputs[2 * len(quantized) + index]
            optimizer.update(state, constants, grad, work, step_scalars)
            if work is not param:
                param.copy_(work)
            stored = []
            for key in self.written:
                codes, scales = quantize_blocks(state[key].to(torch.float32), maps[key], tables[key])
                if formats[key][0] == 4:
                    codes = (codes[:, 0::2] << 4) | codes[:, 1::2]
                stored += [codes, scales]
            return tuple(stored)

        self._eager = fused
        self._formats, self._plain = formats, plain
        self._verified = False
        code = fused.__code__.replace(co_name=f"adaptopt_low_bit_update_{tag}")
        # A code object of its own: dynamo keeps its cache and recompile limit per code object.
        self._function = torch.compile(
            types.FunctionType(code, fused.__globals__, code.co_name, None, fused.__closure__),
            fullgraph=True,
            dynamic=False,
        )
        self._device = device

    def pack(self, scalars: Scalars) -> torch.Tensor:
        return torch.tensor([scalars[name] for name in self.names], dtype=torch.float64, device=self._device)

    def __call__(
        self, param: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, inputs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        if not self._verified:
            self._verify(param, packed)
        return self._compiled(param, grad, packed, inputs)

    def _compiled(
        self, param: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, inputs: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        for tensor in (param, grad, *inputs):
            # One compilation for every number of blocks (without it, dynamo compiles again for the second it
            # meets, and then makes it dynamic itself).
            internals.maybe_mark_dynamic(tensor, 0)
        return self._function(param, grad, packed, *inputs)  # type: ignore[no-any-return]

    def _verify(self, like: torch.Tensor, packed: torch.Tensor) -> None:
        """Raise unless the compiled update steps scratch inputs as the eager one does: three blocks of random
        params, grads, codes and scales, with this step's scalars. torch 2.13's inductor (CPU) has compiled
        block-wise decoding to reads of garbage (with static lengths, for a last partial block: the
        quantization module met the like); this catches such a fault before any state sees it. Within 1e-6
        of each tensor's scale: compiled and eager float32 arithmetic may differ in the last bits (fused
        multiply-adds), a garbage read or a code off by one step by 1e-3 and more; of the codes, at most 1%
        may differ (a value within an ulp of a midpoint may take the neighbouring code)."""
        generator = torch.Generator(device=like.device)
        block = like.shape[1]

        def scratch() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
            generator.manual_seed(0)
            options: dict[str, Any] = {
                "dtype": _working_dtype(like.dtype),
                "device": like.device,
                "generator": generator,
            }
            param, grad = torch.randn(3, block, **options).to(like.dtype), torch.randn(3, block, **options)
            inputs = []
            for bits, _, _ in self._formats.values():
                width = block if bits == 8 else block // 2
                codes = torch.randint(0, 256, (3, width), generator=generator, device=like.device)
                inputs += [codes.to(torch.uint8), torch.rand(3, generator=generator, device=like.device) + 0.5]
            inputs += [torch.rand(3, block, **options) for _ in self._plain]
            return param, grad, inputs

        eager_param, eager_grad, eager_inputs = scratch()
        expected = self._eager(eager_param, eager_grad, packed, *eager_inputs)
        param, grad, inputs = scratch()
        actual = self._compiled(param, grad, packed, inputs)
        pairs = [(eager_param, param), *zip(eager_inputs, inputs, strict=True), *zip(expected, actual, strict=True)]
        for wanted, got in pairs:
            if wanted.shape != got.shape or wanted.dtype != got.dtype:
                raise RuntimeError("the compiled low-bit update returns other tensors than the eager one")
            if wanted.dtype == torch.uint8:
                if float(wanted.ne(got).float().mean()) <= 0.01:
                    continue
            elif float((wanted - got).abs().max()) <= max(1e-6, 2 * torch.finfo(wanted.dtype).eps) * (
                float(wanted.abs().max()) or 1.0
            ):
                continue
            raise RuntimeError("the compiled low-bit update does not step as the eager one on scratch inputs")
        self._verified = True


class LowBitExecution:
    """The fused low-bit step of one optimizer's params (see the module docstring)."""

    def __init__(self, optimizer: Steppable, mode: str, auto_compile_work: int) -> None:
        self.optimizer = optimizer
        self.mode = mode
        self.auto_compile_work = auto_compile_work
        self.eager_work = 0
        """Element-updates done eagerly, for `auto`'s switch to the compiled update."""
        self._written: dict[Hashable, tuple[str, ...]] = {}
        """Per constants key, the quantized entries the update writes (learned from its first eager step)."""
        self._compiled: dict[Hashable, _FusedUpdate | None] = {}
        self.compiled_calls = 0
        """How many params the compiled update stepped (for tests: which way the steps went)."""

    def step(
        self,
        group: Group,
        state: State,
        grad: torch.Tensor,
        param: torch.Tensor,
        formats: dict[str, Format],
    ) -> None:
        """One step of `param` (real, contiguous, float32 or float64) whose `formats` entries of `state` are
        `QuantizedTensor`s of the param's shape and its other tensor entries plain tensors of its shape."""
        optimizer = self.optimizer
        state["step"] += 1
        scalars = optimizer.step_scalars(state, group)
        plain_keys = [key for key, value in state.items() if key not in formats and isinstance(value, torch.Tensor)]
        key = self._constants_key(group, param, formats, plain_keys, scalars)
        flat_param, flat_grad = param.view(-1), grad.reshape(-1).to(_working_dtype(param.dtype))
        old = {entry: state[entry] for entry in formats}
        new_codes = {entry: torch.empty_like(quantized.codes) for entry, quantized in old.items()}
        new_scales = {entry: torch.empty_like(quantized.scales) for entry, quantized in old.items()}
        compiled = self._compiled_for(group, key, formats, plain_keys, scalars, param.device)
        done = 0
        if compiled is not None:
            block = next(iter(formats.values()))[2]  # one group, one width: one block size
            done = self._step_compiled(
                compiled, key, state, flat_grad, flat_param, old, new_codes, new_scales, plain_keys, scalars, block
            )
        written = set(compiled.written if compiled is not None and done else ())
        if done < flat_param.shape[0]:
            written |= self._step_eagerly(
                group, state, flat_grad, flat_param, old, new_codes, new_scales, done, scalars
            )
        if compiled is None:
            self._written[key] = tuple(entry for entry in formats if entry in written)
        for entry in written:
            quantized = old[entry]
            state[entry] = QuantizedTensor(
                new_codes[entry],
                new_scales[entry],
                quantized.shape,
                quantized.bits,
                quantized.sign,
                quantized.block_size,
            )

    def _step_compiled(
        self,
        compiled: _FusedUpdate,
        key: Hashable | None,
        state: State,
        grad: torch.Tensor,
        param: torch.Tensor,
        old: dict[str, QuantizedTensor],
        new_codes: dict[str, torch.Tensor],
        new_scales: dict[str, torch.Tensor],
        plain_keys: list[str],
        scalars: Scalars,
        block: int,
    ) -> int:
        """Step the param with the compiled update, a call per chunk, writing the codes and scales of the entries
        it writes into `new_codes` and `new_scales`; return how many elements it stepped (fewer than all if the
        compiled update failed: the eager path does the rest).

        A last partial block joins the last chunk's call as one more row, padded by repeating its last element
        (params, grads, codes and plain state alike): the update is elementwise, so the repeats come out equal
        to that element and leave the block's absolute maximum, its scale, and the real elements' codes as the
        reference's zero padding does; the repeats' results are dropped. The last chunk is then stepped on
        copies (a chunk at most), which are written back. So a param of 10k elements is one call, not a
        compiled call and an eager tail (200 x 10k, 8-bit Adam: half the step's time)."""
        numel = param.shape[0]
        whole = numel // block * block
        packed = compiled.pack(scalars)
        plain = [state[entry].view(-1) for entry in plain_keys]
        starts = list(range(0, whole, CHUNK))
        if whole < numel and (not starts or whole - starts[-1] == CHUNK):
            starts.append(whole)  # the partial block needs a call of its own
        for start in starts:
            stop = min(start + CHUNK, whole)
            last = start == starts[-1] and whole < numel
            try:
                if last:
                    self._step_padded(compiled, grad, param, old, new_codes, new_scales, plain, packed, start, block)
                    continue
                blocks = (stop - start) // block
                inputs: list[torch.Tensor] = []
                for quantized in old.values():
                    per_byte = 1 if quantized.bits == 8 else 2
                    codes = quantized.codes[start // per_byte : stop // per_byte]
                    inputs += [codes.view(blocks, -1), quantized.scales[start // block : stop // block]]
                inputs += [tensor[start:stop].view(blocks, block) for tensor in plain]
                stored = compiled(
                    param[start:stop].view(blocks, block), grad[start:stop].view(blocks, block), packed, inputs
                )
            except Exception as error:  # Whatever the compiler raises, the eager path does the rest.
                self._compile_failed(key, error)
                return start
            for index, entry in enumerate(compiled.written):
                per_byte = 1 if old[entry].bits == 8 else 2
                new_codes[entry][start // per_byte : stop // per_byte] = stored[2 * index].view(-1)
                new_scales[entry][start // block : stop // block] = stored[2 * index + 1]
        self.compiled_calls += bool(starts)
        return numel if starts else 0

    @staticmethod
    def _step_padded(
        compiled: _FusedUpdate,
        grad: torch.Tensor,
        param: torch.Tensor,
        old: dict[str, QuantizedTensor],
        new_codes: dict[str, torch.Tensor],
        new_scales: dict[str, torch.Tensor],
        plain: list[torch.Tensor],
        packed: torch.Tensor,
        start: int,
        block: int,
    ) -> None:
        """Elements `start:` (a block boundary; whole blocks and the partial one) in one call on padded copies
        (see `_step_compiled`). At least two rows: dynamo would specialise a single one into a compilation of its
        own."""
        count = param.shape[0] - start
        needed = -(-count // block)
        rows = max(2, needed)  # a lone partial block gets a second row of repeats
        repeat_last = torch.arange(rows * block, device=param.device).clamp(max=count - 1)
        padded_param = param[start:].index_select(0, repeat_last).view(rows, block)
        padded_plain = [tensor[start:].index_select(0, repeat_last).view(rows, block) for tensor in plain]
        first_scale = start // block
        scale_rows = torch.arange(rows, device=param.device).clamp(max=needed - 1)
        inputs: list[torch.Tensor] = []
        for quantized in old.values():
            codes = _codes(quantized, start, param.shape[0]).index_select(0, repeat_last)
            if quantized.bits == 4:
                codes = pack_nibbles(codes)
            scales = quantized.scales[first_scale:].index_select(0, scale_rows)
            inputs += [codes.view(rows, -1), scales]
        inputs += padded_plain
        padded_grad = grad[start:].index_select(0, repeat_last).view(rows, block)
        stored = compiled(padded_param, padded_grad, packed, inputs)
        param[start:].copy_(padded_param.view(-1)[:count])
        for tensor, padded in zip(plain, padded_plain, strict=True):
            tensor[start:].copy_(padded.view(-1)[:count])
        for index, entry in enumerate(compiled.written):
            codes, scales = stored[2 * index], stored[2 * index + 1]
            if old[entry].bits == 4:
                new_codes[entry][start // 2 :] = pack_nibbles(unpack_nibbles(codes.view(-1)[: (count + 1) // 2], count))
            else:
                new_codes[entry][start:] = codes.view(-1)[:count]
            new_scales[entry][first_scale:] = scales[:needed]

    def _step_eagerly(
        self,
        group: Group,
        state: State,
        grad: torch.Tensor,
        param: torch.Tensor,
        old: dict[str, QuantizedTensor],
        new_codes: dict[str, torch.Tensor],
        new_scales: dict[str, torch.Tensor],
        begin: int,
        scalars: Scalars,
    ) -> set[str]:
        """Step elements `begin:` (a block boundary) in chunks, writing the codes and scales of the entries the
        update writes into `new_codes` and `new_scales` (and the old ones of the others); return the former."""
        numel, work_dtype = param.shape[0], grad.dtype
        plain = {
            entry: value.view(-1)
            for entry, value in state.items()
            if entry not in old and isinstance(value, torch.Tensor)
        }
        written: set[str] = set()
        for start in range(begin, numel, CHUNK):
            stop = min(start + CHUNK, numel)
            decoded = {entry: _decode(quantized, start, stop, work_dtype) for entry, quantized in old.items()}
            versions = {entry: tensor._version for entry, tensor in decoded.items()}
            chunk: State = {"step": state["step"], **decoded}
            chunk.update({entry: tensor[start:stop] for entry, tensor in plain.items()})
            param_chunk = param[start:stop]
            work_param = param_chunk.to(work_dtype)  # for a bf16 param an fp32 copy, rounded back to nearest
            self.optimizer.update(chunk, group, grad[start:stop], work_param, scalars)
            if work_param is not param_chunk:
                param_chunk.copy_(work_param)
            for entry, quantized in old.items():
                block, value = quantized.block_size, chunk[entry]
                code_slice = slice(start // 2, (stop + 1) // 2) if quantized.bits == 4 else slice(start, stop)
                scale_slice = slice(start // block, -(-stop // block))
                if value is decoded[entry] and value._version == versions[entry]:
                    new_codes[entry][code_slice] = quantized.codes[code_slice]
                    new_scales[entry][scale_slice] = quantized.scales[scale_slice]
                    continue
                written.add(entry)
                code_map, table = code_book_and_table(quantized.bits, quantized.sign, param.device)
                codes, scales = quantize_blockwise(value, code_map, block, table)
                new_codes[entry][code_slice] = pack_nibbles(codes) if quantized.bits == 4 else codes
                new_scales[entry][scale_slice] = scales
        self.eager_work += numel - begin
        return written

    def _compiled_for(
        self,
        group: Group,
        key: Hashable | None,
        formats: dict[str, Format],
        plain_keys: list[str],
        scalars: Scalars,
        device: torch.device,
    ) -> _FusedUpdate | None:
        if self.mode == "bucketed" or key is None or key not in self._written:
            return None  # The first step with these constants runs eagerly, and tells which entries it writes.
        if key in self._compiled:
            return self._compiled[key]
        if self.mode == "auto" and self.eager_work < self.auto_compile_work:
            return None
        if not compilation_supported() or len(self._compiled) >= LOW_BIT_COMPILED_VARIANTS:
            return None
        constants = self.optimizer.compile_constants(group)
        tag = f"{id(self):x}_{len(self._compiled)}"
        compiled = _FusedUpdate(
            self.optimizer, constants, formats, plain_keys, self._written[key], scalars, device, tag
        )
        self._compiled[key] = compiled
        return compiled

    def _compile_failed(self, key: Hashable, error: Exception) -> None:
        self._compiled[key] = None
        while isinstance(inner := getattr(error, "inner_exception", None) or error.__cause__, Exception):
            error = inner
        reason = (str(error).splitlines() or [""])[0][:200]
        warnings.warn(
            f"adaptopt: torch.compile failed for a low-bit update ({type(error).__name__}: {reason}); "
            "running it eagerly",
            RuntimeWarning,
            stacklevel=4,
        )

    def _constants_key(
        self,
        group: Group,
        param: torch.Tensor,
        formats: dict[str, Format],
        plain_keys: list[str],
        scalars: Scalars,
    ) -> Hashable | None:
        place = (param.dtype, param.device, tuple(formats.items()), tuple(plain_keys))
        return constants_key(self.optimizer, group, scalars, place)
