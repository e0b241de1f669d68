r"""An optimizer's `update` compiled by `torch.compile` for flat tensors of any length.

`execution.py` steps a bucket in *segments*: stretches of its flat buffers, each with a grad that is either the
bucket's flat grad buffer or a param's own grad, read where it lies. `CompiledUpdate` is the compiled form of
the optimizer's one definition of the math (`update`: maximize, weight decay, `step_param`) for one set of
*constants*: the param group's hyper-parameters, the non-float scalars of `step_scalars` (RAdam's rectifier
being `None` selects a branch), dtype and device. Two things make one compilation serve a whole training run:

* the length of the segment is dynamic (`torch._dynamo.mark_dynamic`), so every segment of every bucket with
  the same constants shares one compiled kernel;
* the float scalars of `step_scalars` (rate, bias corrections, rectifier) enter as one float64 tensor, so a
  new step or a schedule changes inputs, not code. A float64 tensor, not Python floats: dynamo specialises on
  floats used as `value=`/`alpha=` (a recompile every step), and inductor hands floats from `.item()` to its
  kernels in single precision.

The first call goes through dynamo, which traces `update`, and inductor, which compiles the graph. A later call
through `torch.compile` costs dynamo's guards and AOTAutograd's runtime wrappers, as much as the whole update
of MNIST's small params (docs/performance.md, "Compiled", has the figures). Neither
has anything to do here. The guards would re-check what the caller already keys compiled updates by (every
constant the trace could see) and what it always passes (contiguous, non-overlapping flat tensors of the traced
dtype and device, at least 2 long). The wrappers manage autograd, aliasing and mutations that the graph does
not hand back; an update graph has no outputs and inductor writes its mutations in place. So on the CPU the
kernel inductor compiled is called directly: its argument order is learned from the call that compiled it,
and before it is used it must reproduce the `torch.compile` path bitwise on scratch copies of a prefix of
that call's inputs. Whatever does not fit (another device, a torch whose internals differ, an unexpected
argument) keeps going through `torch.compile`.

One step deeper, a bucket's params need not be one call each from Python. The kernel's Python wrapper calls
one C function with pointers and the length; `_learn_rows` finds that function (by recording the wrapper's
call on scratch inputs) and `call_rows` calls it from a small C loop, once per *row* of a table of
addresses: a row per param, its grad wherever autograd left it. Inductor compiles the kernel single-threaded
for it, and the loop splits the elements of all rows evenly among the threads, in one parallel region: a
call per thread and row it meets, not a parallel region per row (which costs more: docs/performance.md).
So 200 params with new grads cost one call from Python and no copy; a segment is a table of one row. The
rows too are used only after they have updated scratch rows bitwise as the `torch.compile` path updates the
whole (otherwise the update is compiled anew, parallel, and called from Python), and only on 64-bit x86 and
ARM, where pointers and 64-bit integers are passed alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import operator
import platform
import sys
import types
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from . import torch_internals as internals
from .functional import TensorExtents

if TYPE_CHECKING:
    from .base import Group, Scalars
    from .execution import Steppable

__all__ = ["CompiledReduction", "CompiledUpdate", "compilation_supported", "constants_key"]

SELF_TEST_LENGTH = 64
"""Elements of the scratch inputs on which a directly called kernel must match `torch.compile`'s path."""

SELF_TEST_ROWS = ((0, 20), (20, 21), (21, 23), (23, SELF_TEST_LENGTH))
SELF_TEST_THREADS = 3
"""The rows `call_rows` must step as `torch.compile` steps the whole: the first reads the flat grad, the
others grads of their own; one is a single element; split among three threads (at 16 and 32), the first
and the last are split mid-row."""

ROWS_SERIAL_NUMEL = 1 << 13
"""`call_rows` steps rows of fewer elements than this in all on the calling thread: starting the other
threads would cost more than they save."""

ROW_SPLIT_GRAIN = 16
"""Where `call_rows` splits the elements among threads: at multiples of this many (a 64-byte line of fp32)."""

_ROW_CALLS = "\n".join(
    f"        case {arity}: reinterpret_cast<void (*)({', '.join(['word'] * arity)})>(kernel)"
    f"({', '.join(f'a[{index}]' for index in range(arity))}); return;"
    for arity in range(1, 33)
)
_ROWS_SOURCE = """
#include <algorithm>
#include <cstdint>
#include <omp.h>
typedef int64_t word;

// `a` is one call's arguments, pointers and lengths alike passed as 64-bit integers (which is how the x86-64
// and AArch64 calling conventions pass pointers too).
static void call(void* kernel, int64_t arity, const word* a) {
    switch (arity) {
ROW_CALLS
    }
}

// Each row of `table` is one call's arguments; `length_column` says which is the number of elements, and
// `element_bytes` by how much each argument moves per element (0: not an array of elements). The kernel is
// single-threaded; the elements of all rows, one after the other, are split evenly among the threads (at
// multiples of `grain`), and each thread calls the kernel on its part of every row it meets, so one
// parallel region steps the whole table however its rows are sized. Fewer than `serial_below` elements in
// all are stepped on the calling thread. `threads` > 0 asks for that many threads (the self-test does).
static void step_part(void* kernel, int64_t arity, int64_t length_column, const int64_t* element_bytes,
                      const word* table, int64_t rows, int64_t begin, int64_t end) {
    word part[32];
    int64_t at = 0;
    for (int64_t row = 0; row < rows && at < end; ++row) {
        const word* a = table + row * arity;
        const int64_t length = a[length_column];
        const int64_t low = std::max(at, begin), high = std::min(at + length, end);
        if (low < high) {
            for (int64_t column = 0; column < arity; ++column) {
                part[column] = a[column] + (low - at) * element_bytes[column];
            }
            part[length_column] = high - low;
            call(kernel, arity, part);
        }
        at += length;
    }
}

extern "C" void adaptopt_call_rows(void* kernel, int64_t arity, int64_t length_column, const int64_t* element_bytes,
                                   const word* table, int64_t rows, int64_t serial_below, int64_t grain,
                                   int64_t threads) {
    int64_t total = 0;
    for (int64_t row = 0; row < rows; ++row) {
        total += table[row * arity + length_column];
    }
    if (total < serial_below) {
        step_part(kernel, arity, length_column, element_bytes, table, rows, 0, total);
        return;
    }
    #pragma omp parallel num_threads(threads > 0 ? threads : omp_get_max_threads())
    {
        const int64_t count = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t begin = total * me / count / grain * grain;
        const int64_t end = me + 1 == count ? total : total * (me + 1) / count / grain * grain;
        step_part(kernel, arity, length_column, element_bytes, table, rows, begin, end);
    }
}
""".replace("ROW_CALLS", _ROW_CALLS)
_row_caller: Any = None
"""`adaptopt_call_rows`, compiled on first need; False where that failed or the platform does not fit."""


def _rows_function() -> Any:
    """The C loop that calls a kernel once per row of a table, or None where it is not available."""
    global _row_caller
    if _row_caller is None:
        _row_caller = False
        if sys.maxsize > 2**32 and platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
            function = internals.load_c_function(_ROWS_SOURCE, "adaptopt_call_rows")
            if function is not None:
                function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                function.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
                function.restype = None
                _row_caller = function
    return _row_caller or None


class _RowKernel(NamedTuple):
    """Inductor's C kernel of a compiled update, and how `adaptopt_call_rows` calls it."""

    loop: Any
    """`adaptopt_call_rows` (`_rows_function`)."""
    kernel: int
    """The C kernel's address."""
    plan: tuple[int, ...]
    """For each of the kernel's arguments, where it is in `(param, grad, packed, *state, length)`."""
    length_column: int
    element_bytes: np.ndarray
    """For each of the kernel's arguments, the bytes of one element (0 for the scalars and the length)."""
    library: ctypes.CDLL
    """The kernel's library, held open."""

    def table(
        self, rows: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]]], packed: torch.Tensor
    ) -> np.ndarray:
        table = np.empty((len(rows), len(self.plan)), dtype=np.int64)
        for index, (param, grad, state) in enumerate(rows):
            values = [tensor.data_ptr() for tensor in (param, grad, packed, *state)] + [param.shape[0]]
            table[index] = [values[source] for source in self.plan]
        return table

    def run(self, table: np.ndarray, serial_below: int = ROWS_SERIAL_NUMEL, threads: int = 0) -> None:
        self.loop(
            self.kernel,
            len(self.plan),
            self.length_column,
            self.element_bytes.ctypes.data,
            table.ctypes.data,
            table.shape[0],
            serial_below,
            ROW_SPLIT_GRAIN,
            threads,
        )


def constants_key(optimizer: Steppable, group: Group, scalars: Scalars, place: tuple[Any, ...]) -> Hashable | None:
    """What a compiled update depends on besides its tensors and float scalars: `place` (dtype, device, the
    state's layout), the kinds and fixed values of `scalars`, and the group's `compile_constants`; None if
    that is unhashable."""
    key = (
        *place,
        tuple((name, float if isinstance(value, float) else value) for name, value in scalars.items()),
        tuple(
            (name, tuple(value) if isinstance(value, list) else value)
            for name, value in optimizer.compile_constants(group).items()
        ),
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def compilation_supported() -> bool:
    """Whether buckets can be compiled here: torch.compile works, and a segment's length can be made dynamic."""
    return internals.dynamo_supported() and internals.available("torch._dynamo.mark_dynamic")


class CompiledUpdate:
    """`optimizer.update` compiled for one set of constants; call it on any segment of flat tensors.

    `constants` is the param group as the trace sees it (without `params` and `lr`: the rate only enters
    through the scalars, so a `step_param` that read `group["lr"]` fails to compile instead of baking a stale
    rate in); `state_keys` name the state tensors; `scalars` are the first step's: its floats are inputs
    (`pack` them), the rest (such as `None`) are compiled in.
    """

    compilations = 0
    """Graphs compiled by every `CompiledUpdate` of the process (for tests: a schedule must not add any)."""

    def __init__(
        self,
        optimizer: Steppable,
        constants: Group,
        state_keys: Sequence[str],
        scalars: Scalars,
        device: torch.device,
        tag: str,
        *,
        direct: bool = True,
        rows: bool = True,
        dynamic: bool = True,
    ) -> None:
        keys = tuple(state_keys)
        self.names = scalar_names = tuple(name for name, value in scalars.items() if isinstance(value, float))
        self.constants = constants
        self.fixed = fixed = {name: value for name, value in scalars.items() if name not in scalar_names}

        extents = fixed.get("extents")

        def update(param: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, *state: torch.Tensor) -> None:
            scalars = dict(fixed)
            for index, name in enumerate(scalar_names):
                scalars[name] = packed[index]
            if extents:  # Tensorwise: one whole param, rows of one size, or several whose starts come last.
                starts = state[-1] if extents == "segmented" else None
                state = state[:-1] if extents == "segmented" else state
                scalars["extents"] = TensorExtents(starts, fixed.get("row_numel"))
            optimizer.update(dict(zip(keys, state, strict=True)), constants, grad, param, scalars)

        self._update, self._tag = update, tag
        self._direct = direct
        """Whether the kernel may be called directly: where its inputs are flat tensors of one length (the
        argument plans know no others) on which a prefix is a valid input (the self-test steps one), so for
        elementwise updates and tensorwise ones over one whole param."""
        self._rows_allowed = rows
        """Whether `call_rows` may split its elements among threads: an elementwise update's."""
        self._dynamic = dynamic
        """Whether the length (dim 0) is dynamic; a stacked update is compiled for its shape."""
        self._single_threaded = (
            direct
            and rows
            and device.type == "cpu"
            and _rows_function() is not None
            and internals.inductor_setting_available("cpp.threads")
        )
        """Whether inductor compiles a single-threaded kernel, for `call_rows` to spread over the threads.
        On the CPU where the C loop is at hand; should the rows then fail their self-test, the update is
        compiled anew, parallel."""
        self._dynamo = self._compiled_function("")
        self._kernel: Callable[[list[Any]], Any] | None = None
        """Inductor's compiled graph, called directly (boxed: one list of arguments) once verified."""
        self._arguments: Callable[..., tuple[Any, ...]] | None = None
        """Picks the kernel's arguments, in its order, out of `(param, grad, packed, *state, length)`."""
        self._learner = _KernelLearner()
        self._rows: _RowKernel | None = None
        """Inductor's C kernel, once `call_rows` has proved itself with it (`_learn_rows`)."""
        self.row_calls = 0
        """How many times `call_rows` ran (for tests: which way the steps went)."""
        self._device = device
        self._packed = torch.zeros(len(scalar_names), dtype=torch.float64) if device.type == "cpu" else None
        self._packed_numpy = None if self._packed is None else self._packed.numpy()

    def _compiled_function(self, suffix: str) -> Callable[..., Any]:
        # A code object of its own: dynamo keeps its cache and recompile limit per code object.
        update = self._update
        code = update.__code__.replace(co_name=f"adaptopt_update_{self._tag}{suffix}")
        function = types.FunctionType(code, update.__globals__, code.co_name, None, update.__closure__)
        backend: Any = "inductor"
        if internals.kernel_keeping_available():
            backend = self._compile if self._direct else self._compile_plain
        return torch.compile(function, fullgraph=True, dynamic=False, backend=backend)

    @staticmethod
    def _compile_plain(graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """Dynamo's backend for updates whose kernel is not called directly: inductor, as it is."""
        CompiledUpdate.compilations += 1
        return internals.compile_plain(graph_module, example_inputs)

    @property
    def direct(self) -> bool:
        """Whether calls go straight to inductor's kernel (see the module docstring)."""
        return self._arguments is not None

    @property
    def calls_rows(self) -> bool:
        """Whether `call_rows` is available (see `_learn_rows`)."""
        return self._rows is not None

    def row_table(self, rows: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]]]) -> np.ndarray:
        """The table `call_rows` takes: one row per `(param, grad, state)` of flat tensors of one length,
        each row that call's arguments. Its grad columns (`grad_columns`) may be rewritten, with
        `data_ptr`s of grads laid out alike, before each call; the rest must stay alive and in place."""
        assert self._rows is not None and self._packed is not None
        return self._rows.table(rows, self._packed)

    @property
    def grad_columns(self) -> list[int]:
        """The columns of `row_table`'s table that hold the grad's address."""
        assert self._rows is not None
        return [column for column, source in enumerate(self._rows.plan) if source == 1]

    def call_rows(self, table: np.ndarray) -> None:
        """Update each row of `table` (`row_table`'s) with the scalars last `pack`ed: one call into C, which
        calls inductor's kernel on each thread's part of each row."""
        assert self._rows is not None and table.dtype == np.int64 and table.flags.c_contiguous
        self._rows.run(table)
        self.row_calls += 1

    def fits(self, group: Group, scalars: Scalars) -> bool:
        """Whether this compiled update is the one for `group` and this step's `scalars` (a few C-level
        comparisons: the group still holds the traced constants, the scalars are of the traced kinds)."""
        return (
            self.constants.items() <= group.items()
            and len(scalars) == len(self.fixed) + len(self.names)
            and self.fixed.items() <= scalars.items()
            and all(type(scalars.get(name)) is float for name in self.names)
        )

    def pack(self, scalars: Scalars) -> torch.Tensor:
        """This step's float scalars as the one float64 tensor every call of this step takes.

        On the CPU it is the same tensor every step, rewritten in place through numpy: the calls that read
        it have returned before the next step writes it, and one torch op fewer per step is worth having
        when the whole step of a small model takes well under a millisecond. On an accelerator the update may
        still be running asynchronously when the next step comes, so each step gets a new tensor, on that
        device, so that the compiled graph does not mix devices (`benchmarks/gpu_check.sh` checks it there).
        """
        return _pack_scalars(self.names, scalars, self._packed, self._packed_numpy, self._device)

    def __call__(
        self, param: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, state: list[torch.Tensor]
    ) -> None:
        """Update the segment: `param`, `grad` and each of `state` are flat and of one length, at least 2."""
        if self._rows is not None:
            self._rows.run(self._rows.table([(param, grad, state)], packed))
            return
        if self._arguments is not None:
            assert self._kernel is not None
            self._kernel(list(self._arguments((param, grad, packed, *state, param.shape[0]))))
            return
        for tensor in (param, grad, *state) if self._dynamic else ():
            internals.mark_dynamic(tensor, 0)
        inputs = (param, grad, packed, *state)
        with self._learner.probing(
            inputs if self._kernel is None and param.device.type == "cpu" and self._direct else None
        ):
            self._dynamo(*inputs)
        candidate = self._learner.take()
        if candidate is not None and _reproduces_torch_compile(self._dynamo, *candidate, inputs):
            self._kernel, self._arguments = candidate
            self._rows = self._learn_rows(*candidate, inputs) if self._rows_allowed else None
        if self._single_threaded and self._rows is None:
            # This call went well, but a single-threaded kernel without the rows would leave threads idle.
            self._single_threaded = False
            self._kernel = self._arguments = None
            self._dynamo = self._compiled_function("_parallel")

    def _compile(self, graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """Dynamo's backend: inductor (`compile_fx`), keeping hold of the kernel it compiles, and learning on
        the call that compiles in which order that kernel takes our inputs."""
        # Size asserts re-check, on every call, what dynamo's guards or `__call__`'s callers already ensure.
        settings: dict[str, Any] = {"size_asserts": False}
        if self._single_threaded:
            settings["cpp.threads"] = 1
        return self._learner.backend(graph_module, example_inputs, settings)

    def _learn_rows(
        self, kernel: Callable[[list[Any]], Any], arguments: Callable[..., tuple[Any, ...]], inputs: tuple[Any, ...]
    ) -> _RowKernel | None:
        """How to call inductor's C kernel itself, from a C loop over rows (`call_rows`), or None.

        The compiled graph's Python wrapper (`kernel`) calls the C kernel through a Python binding held in
        its module's globals. A call on scratch inputs, with those bindings swapped for recorders, shows
        whether the wrapper does nothing else than call one C kernel, and which of our inputs (by identity)
        or the length each argument of that kernel is. The binding names the C function of its library.
        Then `call_rows` must update scratch rows bitwise as the `torch.compile` path updates the whole,
        with the elements split among `SELF_TEST_THREADS` threads, two of the rows mid-row.
        """
        function = _rows_function()
        if function is None or self._packed is None or inputs[2] is not self._packed:
            return None
        probe = _scratch(inputs)
        call = internals.record_c_call(kernel, list(arguments((*probe, probe[0].shape[0]))))
        if call is None:
            return None
        binding, args = call
        plan = _argument_plan(probe, args)
        if plan is None or len(plan) > 32 or len(probe) not in plan:
            return None
        c_kernel = internals.c_kernel(binding)
        # The loop passes each tensor's address and the length as 64-bit words: the declaration must agree.
        if c_kernel is None or c_kernel.pointers != tuple(source != len(probe) for source in plan):
            return None
        element_bytes = np.array(
            [probe[source].element_size() if source < len(probe) and source != 2 else 0 for source in plan],
            dtype=np.int64,
        )
        rows = _RowKernel(
            function, c_kernel.address, tuple(plan), plan.index(len(probe)), element_bytes, c_kernel.library
        )
        expected, actual = _scratch(inputs), _scratch(inputs)
        param, grad, _, *state = actual
        # Held here: the table only holds the addresses of the rows' grads of their own.
        scratch_rows = [
            (
                param[start:stop],
                grad[start:stop] if start == 0 else grad[start:stop].clone(),
                [s[start:stop] for s in state],
            )
            for start, stop in SELF_TEST_ROWS
        ]
        table = rows.table(scratch_rows, self._packed)
        try:
            self._dynamo(*expected)
            rows.run(table, serial_below=0, threads=SELF_TEST_THREADS)
        except Exception as error:
            internals.lose("inductor's kernel bindings", f"the loop over rows raised {type(error).__name__}: {error}")
            return None
        if not all(map(_same_bits, expected, actual)):
            internals.lose("inductor's kernel bindings", "the C kernel called by rows did not update as torch.compile")
            return None
        return rows


class CompiledReduction:
    """An optimizer's first pass (`reduce_param`, after `maximize`) compiled for one set of constants, over
    flat segments of any length: it updates the segment's state and returns its sums by name.

    The compiled function returns the sums as one float64 vector, in an order learned at the first call from
    an eager `reduce_param` on scratch copies of a prefix of the segment. A single output is what lets the
    kernel be called directly on the CPU, as `CompiledUpdate`'s is (the module docstring), once it has
    reproduced the `torch.compile` path bitwise on scratch inputs, its sums included; a first pass is one
    call per segment (a large param read where its grad lies is one), and dynamo's guards cost as much as a
    small param's sums."""

    def __init__(
        self,
        optimizer: Steppable,
        constants: Group,
        state_keys: Sequence[str],
        scalars: Scalars,
        device: torch.device,
        tag: str,
    ) -> None:
        keys = tuple(state_keys)
        self.names = scalar_names = tuple(name for name, value in scalars.items() if isinstance(value, float))
        fixed = {name: value for name, value in scalars.items() if name not in scalar_names}
        self._device = device
        self._sums: tuple[str, ...] | None = None
        """The names of `reduce_param`'s sums, in the order of the compiled vector; learned at the first call."""

        def sums_by_name(
            param: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, *state: torch.Tensor
        ) -> dict[str, torch.Tensor]:
            scalars = dict(fixed)
            for index, name in enumerate(scalar_names):
                scalars[name] = packed[index]
            if constants["maximize"]:
                grad = -grad
            return optimizer.reduce_param(dict(zip(keys, state, strict=True)), constants, grad, param, scalars)

        def reduction(
            param: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, *state: torch.Tensor
        ) -> torch.Tensor:
            sums = sums_by_name(param, grad, packed, *state)
            return torch.stack([sums[name].to(torch.float64).sum() for name in self._sums or ()])

        self._sums_by_name = sums_by_name
        code = reduction.__code__.replace(co_name=f"adaptopt_reduction_{tag}")
        function = types.FunctionType(code, reduction.__globals__, code.co_name, None, reduction.__closure__)
        self._learner = _KernelLearner()
        backend: Any = "inductor"
        if internals.kernel_keeping_available():
            backend = self._compile if device.type == "cpu" else CompiledUpdate._compile_plain
        self._dynamo = torch.compile(function, fullgraph=True, dynamic=False, backend=backend)
        self._kernel: Callable[[list[Any]], Any] | None = None
        self._arguments: Callable[..., tuple[Any, ...]] | None = None
        self._packed = torch.zeros(len(scalar_names), dtype=torch.float64) if device.type == "cpu" else None
        self._packed_numpy = None if self._packed is None else self._packed.numpy()

    @property
    def direct(self) -> bool:
        """Whether calls go straight to inductor's kernel (see the class docstring)."""
        return self._arguments is not None

    def _compile(self, graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        return self._learner.backend(graph_module, example_inputs, {"size_asserts": False})

    def _pack(self, scalars: Scalars) -> torch.Tensor:
        """This step's float scalars as one float64 tensor (on the CPU, the same one: `CompiledUpdate.pack`)."""
        return _pack_scalars(self.names, scalars, self._packed, self._packed_numpy, self._device)

    def __call__(
        self, param: torch.Tensor, grad: torch.Tensor, scalars: Scalars, state: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        packed = self._pack(scalars)
        inputs = (param, grad, packed, *state)
        if self._sums is None:
            with torch.no_grad():
                self._sums = tuple(self._sums_by_name(*_scratch(inputs)))
        if not self._sums:
            return {}
        if self._arguments is not None:
            assert self._kernel is not None
            (vector,) = self._kernel(list(self._arguments((*inputs, param.shape[0]))))
            return dict(zip(self._sums, vector, strict=True))
        for tensor in (param, grad, *state):
            internals.mark_dynamic(tensor, 0)
        with self._learner.probing(inputs if self._kernel is None and param.device.type == "cpu" else None):
            vector = self._dynamo(*inputs)
        candidate = self._learner.take()
        if candidate is not None and _reproduces_torch_compile(self._dynamo, *candidate, inputs, returns=True):
            self._kernel, self._arguments = candidate
        return dict(zip(self._sums, vector, strict=True))


class _KernelLearner:
    """Dynamo's backend for a kernel that may be called directly: inductor, keeping hold of the kernel it
    compiles, and learning, on the call that compiles it, in which order that kernel takes our inputs (those
    of the call made while `probing` them)."""

    def __init__(self) -> None:
        self._probe: tuple[Any, ...] | None = None
        self._candidate: tuple[Callable[[list[Any]], Any], Callable[..., tuple[Any, ...]]] | None = None

    def backend(
        self, graph_module: torch.fx.GraphModule, example_inputs: list[Any], settings: dict[str, Any]
    ) -> Callable[..., Any]:
        graph, kernel = internals.compile_keeping_kernel(graph_module, example_inputs, settings)
        CompiledUpdate.compilations += 1

        def run(*args: Any) -> Any:
            if self._probe is not None and kernel is not None:
                arguments = _argument_order(self._probe, args)
                if arguments is not None:
                    self._candidate = (kernel, arguments)
            self._probe = None
            return graph(*args)

        return run

    @contextlib.contextmanager
    def probing(self, inputs: tuple[Any, ...] | None) -> Iterator[None]:
        """Learn the argument order from a compilation during this block, if `inputs` are given."""
        self._probe = inputs
        try:
            yield
        finally:
            self._probe = None

    def take(self) -> tuple[Callable[[list[Any]], Any], Callable[..., tuple[Any, ...]]] | None:
        """The kernel and its argument order, learned by the last `probing`, until they pass the self-test."""
        candidate, self._candidate = self._candidate, None
        return candidate


def _reproduces_torch_compile(
    dynamo: Callable[..., Any],
    kernel: Callable[[list[Any]], Any],
    arguments: Callable[..., tuple[Any, ...]],
    inputs: tuple[Any, ...],
    *,
    returns: bool = False,
) -> bool:
    """Whether `kernel`, given `arguments(...)`, updates scratch copies of a prefix of `inputs` exactly as the
    `torch.compile` path (`dynamo`, with its own view of the arguments) updates another set of copies, and,
    if it `returns` a tensor, returns the same one (as the only item of its outputs)."""
    name = "CompiledFxGraph.current_callable"
    expected, actual = _scratch(inputs), _scratch(inputs)
    try:
        wanted = dynamo(*expected)
        outputs = kernel(list(arguments((*actual, actual[0].shape[0]))))
    except Exception as error:
        internals.lose(name, f"calling it directly raised {type(error).__name__}: {error}")
        return False
    if returns and not (
        isinstance(outputs, (list, tuple))
        and len(outputs) == 1
        and isinstance(outputs[0], torch.Tensor)
        and outputs[0].shape == wanted.shape
        and _same_bits(wanted, outputs[0])
    ):
        internals.lose(name, "called directly, it did not return what torch.compile returns")
        return False
    if not all(map(_same_bits, expected, actual)):
        internals.lose(name, "called directly, it did not update as torch.compile")
        return False
    return True


def _pack_scalars(
    names: Sequence[str],
    scalars: Scalars,
    packed: torch.Tensor | None,
    packed_numpy: np.ndarray | None,
    device: torch.device,
) -> torch.Tensor:
    """The float `scalars` named `names` as one float64 tensor: `packed`, rewritten through its numpy view, on the
    CPU; a new tensor on `device` elsewhere (`CompiledUpdate.pack` says why)."""
    values = [scalars[name] for name in names]
    if packed is None or packed_numpy is None:
        return torch.tensor(values, dtype=torch.float64, device=device)
    packed_numpy[:] = values
    return packed


def _same_bits(want: Any, got: Any) -> bool:
    """Equal element for element, a NaN matching a NaN (an update that overflowed did so on both paths)."""
    if not isinstance(want, torch.Tensor) or not want.is_floating_point():
        return bool(torch.equal(want, got)) if isinstance(want, torch.Tensor) else want == got
    return bool(((want == got) | (want.isnan() & got.isnan())).all())


def _scratch(inputs: tuple[Any, ...]) -> list[Any]:
    """Copies of a prefix of `(param, grad, packed, *state)` to test a kernel on: the real scalars, the rest
    `SELF_TEST_LENGTH` elements long (or all there is), the state nudged so that none is all zeros. Each copy
    lies at its original's storage offset (in a buffer of its own): torch 2.7's dynamo passes a view's offset
    to the graph and guards on it being 0 or not, so a copy at offset 0 of a view at 10 would recompile."""
    length = min(inputs[0].shape[0], SELF_TEST_LENGTH)
    generator = torch.Generator(device=inputs[0].device).manual_seed(0)
    made: list[Any] = [_copy_at_its_offset(inputs[0], length), _copy_at_its_offset(inputs[1], length), inputs[2]]
    for tensor in inputs[3:]:
        copy = _copy_at_its_offset(tensor, length)
        made.append(copy.add_(torch.rand(copy.shape, generator=generator, dtype=copy.dtype, device=copy.device)))
    return made


def _copy_at_its_offset(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """A copy of `tensor[:length]` with its shape, strides and storage offset (a complex bucket's real views
    are `(n, 2)`)."""
    prefix = tensor[:length]
    offset = prefix.storage_offset()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(prefix.shape, prefix.stride(), strict=True))
    buffer = torch.empty(offset + extent, dtype=tensor.dtype, device=tensor.device)
    return buffer.as_strided(prefix.shape, prefix.stride(), offset).copy_(prefix)


def _argument_plan(inputs: Sequence[Any], args: Sequence[Any], *, offsets: bool = False) -> list[int] | None:
    """Where each of a kernel's arguments `args` is in `(*inputs, length)`: each tensor is one of `inputs` (by
    identity), each int the length of the first; None if anything else shows up, or nothing does. With
    `offsets`, an int may also be the storage offset of one of `inputs` (the first with that offset), which the
    plan gives as `len(inputs) + 1 + its index`: dynamo passes the offset of a view that does not start its
    storage (a param after others in its bucket) to the graph, which only checks it."""
    length = inputs[0].shape[0]
    starts = [tensor.storage_offset() if isinstance(tensor, torch.Tensor) else None for tensor in inputs]
    plan = []
    for arg in args:
        matches = [index for index, tensor in enumerate(inputs) if tensor is arg]
        if len(matches) == 1:
            plan.append(matches[0])
        elif type(arg) is int and arg == length:
            plan.append(len(inputs))
        elif offsets and type(arg) is int and arg in starts:
            plan.append(len(inputs) + 1 + starts.index(arg))
        else:
            return None
    return plan or None


def _argument_order(inputs: tuple[Any, ...], args: Sequence[Any]) -> Callable[..., tuple[Any, ...]] | None:
    """How to pick dynamo's arguments `args` out of `(*inputs, length)` (see `_argument_plan`): the storage
    offsets it may take are read off the inputs of each call."""
    plan = _argument_plan(inputs, args, offsets=True)
    if plan is None:
        return None
    count = len(inputs)
    if any(source > count for source in plan):
        return lambda values: tuple(
            values[source] if source <= count else values[source - count - 1].storage_offset() for source in plan
        )
    pick = operator.itemgetter(*plan)
    return pick if len(plan) > 1 else lambda values: (pick(values),)
