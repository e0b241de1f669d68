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
* **compiled**: decoding, the update and encoding are one `torch.compile`d function of the param's length
  (dynamic), the codes and scales in, new ones out; inductor fuses the decoding into the update's loop and the
  block maxima and encoding after it. It is made per set of constants (the group's hyper-parameters, the
  non-float scalars, dtype, the code formats) and serves every param and every step with those constants.

An entry that `update` does not write keeps its codes, as in the reference (decoding and encoding again is
not the identity). Which entries an update writes is learned from its first, eager, step with those
constants, by torch's version counters of the decoded tensors; the compiled function then encodes exactly
those. The state dict holds a new `QuantizedTensor` for each written entry after every step, as the
reference's does, so a checkpoint taken at any point never aliases codes that a later step overwrites.

Only optimizers whose `step_param` is elementwise and that need no first pass (`reduces`) take this path,
for float32 and float64 params (bf16/fp16 params run their math on fp32 copies, which the reference loop
makes); the rest of a low-bit group runs through the reference loop.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import torch_internals as internals
from .compiled import compilation_supported
from .quantization import (
    QuantizedTensor,
    dequantize_blockwise,
    pack_nibbles,
    quantization_map,
    quantize_blockwise,
    unpack_nibbles,
)

if TYPE_CHECKING:
    from .base import Group, Scalars, State
    from .execution import Steppable

__all__ = ["CHUNK", "LowBitExecution"]

CHUNK = 1 << 18
"""Elements per eager chunk: a multiple of both block sizes (256 and 128), so chunks hold whole blocks; its
float32 temporaries (1 MiB each) stay in the last-level cache."""

LOW_BIT_COMPILED_VARIANTS = 16
"""Compiled low-bit updates an optimizer may make (per constants and code formats); past that, eager."""

Format = tuple[int, str, int]
"""A quantized entry's (bits, map name, block size)."""


def _decode(quantized: QuantizedTensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Elements `start:stop` of `quantized` (flattened), decoded; `start` is at a block boundary."""
    block = quantized.block_size
    if quantized.bits == 4:
        codes = unpack_nibbles(quantized.codes[start // 2 : (stop + 1) // 2], stop - start)
    else:
        codes = quantized.codes[start:stop]
    scales = quantized.scales[start // block : -(-stop // block)]
    code_map = quantization_map(quantized.bits, quantized.sign, codes.device)
    return dequantize_blockwise(codes, scales, code_map, block).to(dtype)


class _NotCompiled(Exception):
    """The compiled update cannot be used here, for a reason that has been given already."""


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
        maps = {key: quantization_map(bits, sign, device) for key, (bits, sign, _) in quantized}  # type: ignore[arg-type]
        plain = tuple(plain_keys)
        self.written = tuple(written)

        def fused(param: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, *inputs: torch.Tensor) -> Any:
            step_scalars = dict(fixed)
            for index, name in enumerate(names):
                step_scalars[name] = packed[index]
            state: dict[str, Any] = {}
            numel = param.shape[0]
            for index, (key, (bits, _, block)) in enumerate(quantized):
                codes, scales = inputs[2 * index], inputs[2 * index + 1]
                if bits == 4:
                    codes = unpack_nibbles(codes, numel)
                state[key] = dequantize_blockwise(codes, scales, maps[key], block).to(param.dtype)
            for index, key in enumerate(plain):
                state[key] = inputs[2 * len(quantized) + index]
            optimizer.update(state, constants, grad, param, step_scalars)
            stored = []
            for key in self.written:
                bits, _, block = formats[key]
                codes, scales = quantize_blockwise(state[key], maps[key], block)
                stored += [pack_nibbles(codes) if bits == 4 else codes, scales]
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
            # One compilation for every length (the codes' and scales' lengths follow the param's); and without
            # it, never a compilation specialised to a length, which inductor has compiled wrongly: see `_verify`.
            if not internals.maybe_mark_dynamic(tensor, 0):
                raise _NotCompiled  # `internals` has said why, once
        return self._function(param, grad, packed, *inputs)  # type: ignore[no-any-return]

    def _verify(self, like: torch.Tensor, packed: torch.Tensor) -> None:
        """Raise unless the compiled update steps scratch inputs as the eager one does: a param of three blocks
        and a partial one, random codes and scales, this step's scalars. torch 2.13's inductor (CPU) compiled
        the decoding of a last partial block to reads of garbage when the length was static, and the
        quantization module met the like (its docstring); this catches such a fault before any state sees it.
        Within 1e-6 of each tensor's scale: compiled and eager float32 arithmetic may differ in the last bits
        (fused multiply-adds), a garbage read or a code off by one step by 1e-3 and more; of the codes, at most
        1% may differ."""
        generator = torch.Generator(device=like.device).manual_seed(0)
        block = max((block for _, _, block in self._formats.values()), default=128)
        numel = 3 * block + 37

        def scratch() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
            options: dict[str, Any] = {"dtype": like.dtype, "device": like.device, "generator": generator}
            generator.manual_seed(0)
            param, grad = torch.randn(numel, **options), torch.randn(numel, **options)
            inputs = []
            for bits, _, size in self._formats.values():
                code_bytes = numel if bits == 8 else -(-numel // 2)
                inputs.append(
                    torch.randint(0, 256, (code_bytes,), generator=generator, device=like.device).to(torch.uint8)
                )
                inputs.append(torch.rand(-(-numel // size), generator=generator, device=like.device) + 0.5)
            inputs += [torch.rand(numel, **options) for _ in self._plain]
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
                # A value within an ulp of a midpoint may take the neighbouring code: rare, never 1% of them.
                if float(wanted.ne(got).float().mean()) <= 0.01:
                    continue
            elif float((wanted - got).abs().max()) <= 1e-6 * (float(wanted.abs().max()) or 1.0):
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
        flat_param, flat_grad = param.view(-1), grad.reshape(-1).to(param.dtype)
        compiled = self._compiled_for(group, key, formats, plain_keys, scalars, param.device)
        if compiled is not None:
            inputs: list[torch.Tensor] = []
            for entry in formats:
                quantized = state[entry]
                inputs += [quantized.codes, quantized.scales]
            inputs += [state[entry].view(-1) for entry in plain_keys]
            try:
                stored = compiled(flat_param, flat_grad, compiled.pack(scalars), inputs)
            except _NotCompiled:
                self._compiled[key] = None
            except Exception as error:  # Whatever the compiler raises, the eager path still works.
                self._compile_failed(key, error)
            else:
                for index, entry in enumerate(compiled.written):
                    old = state[entry]
                    state[entry] = QuantizedTensor(
                        stored[2 * index], stored[2 * index + 1], old.shape, old.bits, old.sign, old.block_size
                    )
                self.compiled_calls += 1
                return
        self._written[key] = self._step_eagerly(group, state, flat_grad, flat_param, formats, plain_keys, scalars)

    def _step_eagerly(
        self,
        group: Group,
        state: State,
        grad: torch.Tensor,
        param: torch.Tensor,
        formats: dict[str, Format],
        plain_keys: list[str],
        scalars: Scalars,
    ) -> tuple[str, ...]:
        numel = param.shape[0]
        old = {entry: state[entry] for entry in formats}
        new_codes = {entry: torch.empty_like(quantized.codes) for entry, quantized in old.items()}
        new_scales = {entry: torch.empty_like(quantized.scales) for entry, quantized in old.items()}
        plain = {entry: state[entry].view(-1) for entry in plain_keys}
        written: set[str] = set()
        for start in range(0, numel, CHUNK):
            stop = min(start + CHUNK, numel)
            decoded = {entry: _decode(quantized, start, stop, param.dtype) for entry, quantized in old.items()}
            versions = {entry: tensor._version for entry, tensor in decoded.items()}
            chunk: State = {"step": state["step"], **decoded}
            chunk.update({entry: tensor[start:stop] for entry, tensor in plain.items()})
            self.optimizer.update(chunk, group, grad[start:stop], param[start:stop], scalars)
            for entry, quantized in old.items():
                block, value = quantized.block_size, chunk[entry]
                code_slice = slice(start // 2, (stop + 1) // 2) if quantized.bits == 4 else slice(start, stop)
                scale_slice = slice(start // block, -(-stop // block))
                if value is decoded[entry] and value._version == versions[entry]:
                    new_codes[entry][code_slice] = quantized.codes[code_slice]
                    new_scales[entry][scale_slice] = quantized.scales[scale_slice]
                    continue
                written.add(entry)
                code_map = quantization_map(quantized.bits, quantized.sign, param.device)
                codes, scales = quantize_blockwise(value, code_map, block)
                new_codes[entry][code_slice] = pack_nibbles(codes) if quantized.bits == 4 else codes
                new_scales[entry][scale_slice] = scales
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
        self.eager_work += numel
        return tuple(entry for entry in formats if entry in written)

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
        key = (
            param.dtype,
            param.device,
            tuple(formats.items()),
            tuple(plain_keys),
            tuple((name, float if isinstance(value, float) else value) for name, value in scalars.items()),
            tuple(
                (name, tuple(value) if isinstance(value, list) else value)
                for name, value in self.optimizer.compile_constants(group).items()
            ),
        )
        try:
            hash(key)
        except TypeError:
            return None
        return key
