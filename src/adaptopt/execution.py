r"""Fast execution of an optimizer's one `step_param`: contiguous buckets, eagerly or under `torch.compile`.

The reference path (`execution="reference"`, in `base.py`) loops over parameters. An optimizer whose
`step_param` is elementwise (`kind = "elementwise"`) can instead run it over a *bucket*: all
params of one (param group, device, dtype) moved into one contiguous buffer, so one call updates many.
The technique is Megatron's and DeepSpeed's contiguous buffers; gathering copies into a buffer every step
costs more than it saves, so the buffers are where the data lives:

* `p.data` is re-homed as a view of the bucket's flat param buffer (same shape and strides), params of
  `IN_PLACE_GRAD_NUMEL` elements or more ("large") after the small ones;
* the state is created as views of flat state buffers, one per state tensor (`exp_avg`, ...);
* buffers of a few MiB or more on the CPU lie on transparent huge pages where Linux allows it
  (`memory.bucket_buffer`), which makes a step that streams them a few percent faster;
* each param has a view of a flat grad buffer. Grads that are these views (after
  `zero_grad(set_to_none=False)`, backward accumulates into them in place) cost nothing. Any other grad
  (torch's default `zero_grad()` sets grads to None, so autograd hands over new tensors; clipping that
  assigns new tensors; DDP's `gradient_as_bucket_view`) is left where it is: a large param's is read in place,
  the small ones are copied into the flat buffer at the step, one `_foreach_copy_` per bucket.

At each step a bucket is stepped in *runs*, maximal stretches of consecutive params that have a grad and the
same step count (all params with grads and equal steps, the usual case, is one run), and a run in *segments*
(`_segments`): stretches of the buffers whose grads are in the flat grad buffer, and large params whose grads
are read in place. Each segment is one call of the update (eagerly, in chunks of `EAGER_CHUNK` elements, so
the temporaries of `step_param` stay small). Params the buckets cannot own are handed back to the reference
loop: tensor subclasses (DTensor), sparse, non-dense or frozen params, params whose storage other tensors
share (re-homing would untie them), and whole groups that step through working copies (master weights,
`state_dtype`, GradScaler). Moving the model with `.to()` (or assigning `p.data`) after the optimizer was
built is detected at the next step, which re-gathers the group: params and state move into new buffers on the
params' new device, the state cast to what `init_state` gives for the moved params. State that is no longer
the bucket's views (our `load_state_dict` replacing the whole mapping, ZeRO's assigning `state[p] = {...}` per
param, or `state[p]["exp_avg"] = t` by hand) is copied into the buffers at the next step, and the views take
its place.

`execution="compiled"` runs each segment through a `CompiledUpdate` (`compiled.py`): one `torch.compile`d
update per set of constants (hyper-parameters, branch), of dynamic length, shared by all segments and buckets
of the optimizer, called straight into inductor's kernel on the CPU. There, when every param has a grad
and all are at one step, and the grads are plain dense CPU tensors laid out as the params (checked in a few
C-level passes: `_readable_grads`), the whole bucket is instead one `call_rows`: a row per param, each grad
read where it lies, nothing copied. Where compilation is not available or fails, it warns once and runs
eagerly. `execution="auto"` is bucketed and compiles the buckets once they have done
`AUTO_COMPILE_WORK` element-updates eagerly between them, so short runs (and test suites) never pay the seconds a
compilation costs, and long ones get the fused loop; the switch point depends on sizes and steps only, so a
run is reproducible.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import pairwise, repeat
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, cast

import numpy as np
import torch

from . import torch_internals as internals
from .compiled import CompiledReduction, CompiledUpdate, compilation_supported, constants_key
from .functional import TensorExtents
from .low_bit_execution import LowBitExecution
from .memory import as_bucket_buffer, bucket_buffer

if TYPE_CHECKING:
    from .base import Group, Scalars, State

__all__ = [
    "AUTO_COMPILE_WORK",
    "COMPILED_VARIANTS",
    "EAGER_CHUNK",
    "EXECUTION_MODES",
    "IN_PLACE_GRAD_NUMEL",
    "Bucket",
    "BucketedExecution",
]

EXECUTION_MODES = ("auto", "reference", "bucketed", "compiled")

EAGER_CHUNK = 1 << 19
"""Elements per eager `step_param` call: bounds its temporaries (2 MiB each in fp32) and keeps the
working set of one call in the last-level cache."""

AUTO_COMPILE_WORK = 1 << 30
"""Element-updates an optimizer's buckets do eagerly, all together, before `execution="auto"` compiles them, so
that short runs (and test suites) never pay for a compilation: 64 steps of 16M elements, 2500 of MNIST's CNN.
An update compiled already for the same constants is used at once. docs/performance.md, "The first steps",
has the trade-off."""

IN_PLACE_GRAD_NUMEL = 1 << 16
"""A param of at least this many elements whose grad is not the bucket's view (torch's default `zero_grad()`
sets grads to None, so backward hands over new tensors) is stepped reading that grad where it lies, in a
segment of its own: one more call of the update instead of two more passes over the grad to copy it into
the bucket. Smaller grads are copied, as one call costs more than their copy."""

STACKS_COMPILE = internals.torch_release() >= (2, 9)
"""Whether stacked (matrixwise) buckets are compiled: torch 2.7's dynamo aborts the process (a C-level abort,
not an exception) compiling some of Adafactor's stacked updates; before 2.9 they run eagerly. Verified on 2.13."""

BATCH_DIMS = "batch_dims"
"""Scalars key: how many leading dims of the tensors handed to a matrixwise `step_param` stack params (the
reference loop hands one param: 0, or no key)."""

COMPILED_VARIANTS = 8
"""Compiled updates an optimizer may make (one per set of hyper-parameters and branch); past that, say when
a scheduler changes `betas` every step, the new variants run eagerly."""


class Steppable(Protocol):
    """All the engine knows of an optimizer (`Steppable` provides it): its groups and state,
    and the few methods through which the base's bookkeeping and the optimizer's math are reached."""

    kind: ClassVar[str]
    state: Any
    param_groups: list[Group]

    def initialize_state(self, state: State, group: Group, param: torch.Tensor) -> None: ...

    def state_for(self, group: Group, param: torch.Tensor) -> State: ...

    def params_with_grad(self, params: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def step_scalars(self, state: State, group: Group) -> Scalars: ...

    def update(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None: ...

    def compile_constants(self, group: Group) -> Group: ...

    def reduce_param(
        self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars
    ) -> dict[str, torch.Tensor]: ...


def validate_execution(execution: Any) -> str:
    if not isinstance(execution, str):
        raise TypeError(f"execution must be a str, one of {EXECUTION_MODES}, got {type(execution).__name__}")
    if execution not in EXECUTION_MODES:
        raise ValueError(f"execution must be one of {EXECUTION_MODES}, got {execution!r}")
    return execution


def _real(tensor: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _alias(buffer: torch.Tensor, element_offset: int, like: torch.Tensor) -> torch.Tensor:
    """A view with `like`'s shape and strides on `buffer`'s storage, `element_offset` elements in."""
    return buffer.as_strided(like.shape, like.stride(), buffer.storage_offset() + element_offset)


def _can_join_bucket(param: torch.Tensor) -> bool:
    return (
        type(param) in (torch.Tensor, torch.nn.Parameter)
        and param.layout == torch.strided
        and param.requires_grad
        and param.numel() > 0
        and (param.is_floating_point() or param.is_complex())
        and param.device.type != "meta"
        and _dense(param)
    )


def _dense(tensor: torch.Tensor) -> bool:
    """Whether the elements fill `numel` consecutive places in memory, in any order of the dimensions
    (contiguous, channels-last, transposed), so the tensor can be a view of a slice of a flat buffer."""
    expected = 1
    layout = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size != 1)
    for stride, size in layout:
        if stride != expected:
            return False
        expected *= size
    return True


_NO_STATE: State = {}
"""What `Bucket.states` holds for a param without state (never handed out, never filled)."""

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@dataclass(eq=False, repr=False)
class Bucket:
    """The params of one (group, device, dtype) living in one contiguous buffer, with grads and state."""

    params: list[torch.Tensor]
    offsets: list[int]
    """Element offsets: param `i` holds elements `offsets[i]:offsets[i + 1]` of the buffers."""
    flat_param: torch.Tensor
    flat_grad: torch.Tensor
    grad_views: list[torch.Tensor]
    state_buffers: dict[str, torch.Tensor]
    """Flat state, shaped like `view_as_real(flat_param)`."""
    state_views: list[dict[str, torch.Tensor]]
    data_ptrs: list[int]
    grad_ptrs: list[int]
    """Where each grad view's data starts, to notice a `p.grad.data = t` that moved it elsewhere."""
    shapes: list[torch.Size]
    strides: list[tuple[int, ...]]
    """Each param's layout (its views' too): a grad laid out alike can be read in place."""
    eager_work: int = 0
    compiled: CompiledUpdate | None = None
    """The compiled update the bucket last ran (None while it runs eagerly)."""
    compile_failed: bool = False
    states: list[State] = field(default_factory=list)
    """Each param's state dict as last seen in `optimizer.state` (`_NO_STATE` if it had none)."""
    expected_state: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    """Per state key, per param: the view its state must hold under that key (None where it has no state)."""
    large: list[bool] = field(default_factory=list)
    """Per param: whether it is large enough for its grad to be read in place (`IN_PLACE_GRAD_NUMEL`)."""
    segment_views: dict[tuple[int, int], Segment] = field(default_factory=dict)
    """The `Segment`s made so far, by `(start, stop)`."""
    rows: tuple[CompiledUpdate, np.ndarray, list[int]] | None = None
    """For the compiled update that last called rows here: its table (a row per param) and grad columns."""
    tensor_starts: torch.Tensor | None = None
    """For a tensorwise optimizer: per element of the small params, the offset where its param starts (the
    large params are segments of their own, and need none)."""
    stack_shape: tuple[int, ...] | None = None
    """For a matrixwise optimizer: the shape of each of the bucket's params, stacked along a leading dim (the
    state buffers are stacked alike: `(len(params), *state_shape)`)."""
    prepared: _Prepared | None = None
    """The first pass's (`reduce_group`) preparation of this step, for the step to use."""

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def is_home(self) -> bool:
        """Whether every param still lives in the buffer (not moved by `.to()` or a `p.data =`)."""
        return list(map(torch.Tensor.data_ptr, self.params)) == self.data_ptrs

    def reclaim_grad(self, index: int) -> torch.Tensor:
        """Put grad view `index` back on the grad buffer after a `p.grad.data = t` moved it; return `t`."""
        view = self.grad_views[index]
        moved = view.detach()
        view.data = _alias(self.flat_grad, self.offsets[index], self.params[index])
        return moved

    def segment(self, start: int, stop: int) -> Segment:
        """Elements `start:stop` of the buffers, as real tensors (views made once, then reused)."""
        found = self.segment_views.get((start, stop))
        if found is None:
            if len(self.segment_views) >= 64:  # Holes in ever new places: do not keep views without end.
                self.segment_views.clear()
            found = self.segment_views[(start, stop)] = self.views(start, stop)
        return found

    def views(self, start: int, stop: int) -> Segment:
        """Elements `start:stop` of the buffers, as real tensors (made anew); stacked, with a leading dim of
        params, for a matrixwise optimizer."""
        if self.stack_shape is not None:
            first, last = self.offsets.index(start), self.offsets.index(stop)
            shape = (last - first, *self.stack_shape)
            state = {key: buffer[first:last] for key, buffer in self.state_buffers.items()}
            param, grad = self.flat_param[start:stop].view(shape), self.flat_grad[start:stop].view(shape)
            return Segment(start, stop, param, grad, state, list(state.values()))
        state = {key: buffer[start:stop] for key, buffer in self.state_buffers.items()}
        param, grad = _real(self.flat_param[start:stop]), _real(self.flat_grad[start:stop])
        starts, row_numel = None, None
        if self.tensor_starts is not None and stop <= self.tensor_starts.shape[0] and not self._one_param(start, stop):
            row_numel = self._common_numel(start, stop)
            if row_numel is None:
                starts = self.tensor_starts[start:stop] - start
        return Segment(start, stop, param, grad, state, list(state.values()), starts, row_numel)

    def _common_numel(self, start: int, stop: int) -> int | None:
        """The size of each param in `start:stop` if they are whole params all of one size, else None."""
        if start not in self.offsets or stop not in self.offsets:
            return None
        first, last = self.offsets.index(start), self.offsets.index(stop)
        sizes = {self.offsets[index + 1] - self.offsets[index] for index in range(first, last)}
        return sizes.pop() if len(sizes) == 1 else None

    def _one_param(self, start: int, stop: int) -> bool:
        index = self.offsets.index(start) if start in self.offsets else -1
        return index >= 0 and self.offsets[index + 1] == stop


class _Prepared(NamedTuple):
    grads: list[torch.Tensor | None]
    in_place: dict[int, torch.Tensor]
    pointers: list[int] | None
    runs: list[tuple[int, int, int]]


@dataclass(frozen=True, eq=False)
class Segment:
    """A stretch of a bucket's buffers that one call of the update steps (see `_segments`)."""

    start: int
    stop: int
    param: torch.Tensor
    grad: torch.Tensor
    """The bucket's grad buffer here; a grad read in place takes its place for the call."""
    state: dict[str, torch.Tensor]
    state_list: list[torch.Tensor]
    starts: torch.Tensor | None = None
    """For a tensorwise optimizer, a segment of several params of different sizes: where each element's param
    starts in it."""
    row_numel: int | None = None
    """For a tensorwise optimizer, a segment of several params all of one size: that size (no `starts`)."""


class BucketedExecution:
    """The bucketed and compiled paths of one optimizer (see the module docstring)."""

    def __init__(self, optimizer: Steppable, mode: str) -> None:
        self.optimizer = optimizer
        self.mode = mode
        self.kind = type(optimizer).kind
        self._whole_tensors = self.kind == "tensorwise"
        """Whether each large param must be a segment of its own, and several small ones carry their starts."""
        self._stacked = self.kind == "matrixwise"
        """Whether buckets stack params of one shape, stepped as one batch (a leading dim)."""
        self._records: dict[int, tuple[Group, list[torch.Tensor], int, list[Bucket], list[torch.Tensor]]] = {}
        self._owner: dict[torch.Tensor, tuple[Bucket, int]] = {}
        self._compiled: dict[Hashable, CompiledUpdate | None] = {}
        """Compiled updates by their constants (`_constants_key`); None where compiling failed."""
        self._reductions: dict[Hashable, CompiledReduction | None] = {}
        """Compiled first passes (`reduces`) by their constants; None where compiling failed."""
        self.eager_work = 0
        """Element-updates that all buckets together have done eagerly. `execution="auto"` compiles every bucket
        once this reaches `AUTO_COMPILE_WORK`: the threshold is a number of steps of the whole model, so a model
        of many small buckets (a stacked optimizer's, one per shape) compiles when a model of one bucket would."""
        self._seen_states: list[State] = []
        """`optimizer.state`'s dicts at the last step (see `_refresh_states`)."""
        fusable = self.kind == "elementwise" and not getattr(type(optimizer), "reduces", False)
        self.low_bit = LowBitExecution(optimizer, mode, AUTO_COMPILE_WORK) if fusable else None
        """Low-bit groups' decode, update and encode in one pass (`low_bit_execution.py`), where the math is
        elementwise and needs no first pass."""

    @classmethod
    def for_mode(cls, optimizer: Steppable, execution: Any) -> BucketedExecution | None:
        """The engine for `execution`, or None for the reference loop."""
        mode = validate_execution(execution)
        if mode == "reference" or type(optimizer).kind not in ("elementwise", "tensorwise", "matrixwise"):
            return None
        return cls(optimizer, mode)

    # ------------------------------------------------------------------------------------------------
    # Building buckets

    def _buckets_of(self, group: Group) -> tuple[list[Bucket], list[torch.Tensor]]:
        """The group's buckets and the params left to the reference loop, (re)built when out of date."""
        record = self._records.get(id(group))
        params = group["params"]
        if (
            record is None
            or record[1] is not params
            or record[2] != len(params)
            or not all(bucket.is_home() for bucket in record[3])
        ):
            buckets, leftovers = self._build(group)
            record = (group, params, len(params), buckets, leftovers)
            self._records[id(group)] = record
        return record[3], record[4]

    def _build(self, group: Group) -> tuple[list[Bucket], list[torch.Tensor]]:
        previous = self._records.pop(id(group), None)
        homed = set()
        old_grad_views: dict[torch.Tensor, torch.Tensor] = {}
        if previous is not None:
            for bucket in previous[3]:
                for param, pointer, grad_view in zip(bucket.params, bucket.data_ptrs, bucket.grad_views, strict=True):
                    if param.data_ptr() == pointer:
                        homed.add(param)
                    old_grad_views[param] = grad_view
                    del self._owner[param]
        by_place: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        leftovers = []
        for param in group["params"]:
            stackable = not self._stacked or (param.is_contiguous() and not param.is_complex())
            if stackable and _can_join_bucket(param) and (param in homed or internals.owns_its_storage(param)):
                # Matrices of one shape share a stack; a vector or a scalar is a stack of its own (stacked
                # vectors hit an inductor fault in torch 2.13, KeyError in its outer-loop fusion).
                shape: tuple[Any, ...] = () if not self._stacked else (id(param),) if param.dim() < 2 else param.shape
                shape = tuple(shape)
                by_place.setdefault((param.device, param.dtype, shape), []).append(param)
            else:
                leftovers.append(param)
        buckets = []
        for place_members in by_place.values():
            # Large params last: when their grads are read in place, the small ones still make one segment.
            members = sorted(place_members, key=lambda param: param.numel() >= IN_PLACE_GRAD_NUMEL)
            made = self._make_bucket(group, members, old_grad_views)
            if made is None:
                leftovers.extend(members)
            else:
                buckets.append(made)
        return buckets, leftovers

    def _make_bucket(
        self, group: Group, params: list[torch.Tensor], old_grad_views: dict[torch.Tensor, torch.Tensor]
    ) -> Bucket | None:
        optimizer = self.optimizer
        offsets = [0]
        for param in params:
            offsets.append(offsets[-1] + param.numel())
        flat_param = bucket_buffer(offsets[-1], params[0].dtype, params[0].device)
        real_shape = _real(flat_param).shape
        fresh: State = {}
        # Stacked params of one shape: the state of one of them, stacked as many times, and otherwise the state
        # of the whole flat buffer, which an elementwise or tensorwise optimizer must shape as the buffer.
        optimizer.initialize_state(fresh, group, params[0].detach().to("meta") if self._stacked else flat_param)
        created = {key: value for key, value in fresh.items() if key != "step"}
        if not all(
            isinstance(value, torch.Tensor) and (self._stacked or value.shape == real_shape) and value.is_contiguous()
            for value in created.values()
        ):
            return None  # Not elementwise state after all: the reference loop keeps these params.
        if self._stacked:
            count = len(params)
            state_buffers = {
                key: bucket_buffer(count * value.numel(), value.dtype, flat_param.device)
                .zero_()
                .view(count, *value.shape)
                for key, value in created.items()
            }
        else:
            state_buffers = {key: as_bucket_buffer(value) for key, value in created.items()}
        elements = 2 if flat_param.is_complex() else 1
        flat_grad = bucket_buffer(flat_param.numel(), flat_param.dtype, flat_param.device).zero_()
        param_views = [_alias(flat_param, offset, param) for param, offset in zip(params, offsets, strict=False)]
        internals.foreach_copy_(param_views, [param.detach() for param in params])
        grad_views = [_alias(flat_grad, offset, param) for param, offset in zip(params, offsets, strict=False)]
        state_views = [
            {
                key: buffer[index] if self._stacked else _alias(buffer, offset * elements, _real(param))
                for key, buffer in state_buffers.items()
            }
            for index, (param, offset) in enumerate(zip(params, offsets, strict=False))
        ]
        bucket = Bucket(
            params=params,
            offsets=offsets,
            flat_param=flat_param,
            flat_grad=flat_grad,
            grad_views=grad_views,
            state_buffers=state_buffers,
            state_views=state_views,
            data_ptrs=[view.data_ptr() for view in param_views],
            grad_ptrs=[view.data_ptr() for view in grad_views],
            shapes=[view.shape for view in grad_views],
            strides=[view.stride() for view in grad_views],
            states=[_NO_STATE] * len(params),
            expected_state={key: [None] * len(params) for key in state_buffers},
            large=[param.numel() >= IN_PLACE_GRAD_NUMEL for param in params],
            tensor_starts=self._tensor_starts(params, offsets, flat_param.device),
            stack_shape=tuple(params[0].shape) if self._stacked else None,
        )
        for index, (param, view) in enumerate(zip(params, param_views, strict=True)):
            param.data = view
            grad = param.grad
            if grad is not None and grad is old_grad_views.get(param) and grad.dtype == view.dtype:
                # Our grad view in the previous bucket: the grad moves along, as the param did.
                grad_views[index].copy_(grad)
                param.grad = grad_views[index]
            self._record_state(bucket, index, optimizer.state.get(param, _NO_STATE))
            self._owner[param] = (bucket, index)
        return bucket

    def _tensor_starts(
        self, params: list[torch.Tensor], offsets: list[int], device: torch.device
    ) -> torch.Tensor | None:
        if not self._whole_tensors:
            return None
        small = [index for index, param in enumerate(params) if param.numel() < IN_PLACE_GRAD_NUMEL]
        if not small:
            return None
        lengths = torch.tensor([params[index].numel() for index in small])
        return torch.repeat_interleave(torch.tensor(offsets[: len(small)]), lengths).to(device)

    @staticmethod
    def _record_state(bucket: Bucket, index: int, state: State) -> None:
        """Make `state` param `index`'s state in the bucket: its tensors move into the buffers (each copied
        into its view, the view taking its place), and the bucket remembers the dict and the views."""
        views = bucket.state_views[index]
        if state:
            for key, view in views.items():
                value = state.get(key)
                if value is view:
                    continue
                if not isinstance(value, torch.Tensor) or value.shape != view.shape:
                    # Copying would broadcast a wrong shape, and stepping the old buffer would ignore it.
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(
                        f"the state of a param of shape {tuple(bucket.params[index].shape)} must hold a tensor "
                        f"of shape {tuple(view.shape)} under {key!r}, got {got}"
                    )
                view.copy_(value)
                state[key] = view
        bucket.states[index] = state
        for key, expected in bucket.expected_state.items():
            expected[index] = views[key] if state else None

    def adopt_state(self, param: torch.Tensor, state: State) -> None:
        """Fresh state of a bucketed param (from `state_for`) moves into the bucket's buffers."""
        owner = self._owner.get(param)
        if owner is not None:
            bucket, index = owner
            if bucket.is_home():
                self._record_state(bucket, index, state)

    def _refresh_states(self, bucket: Bucket, same_dicts: bool) -> None:
        """Take in state that is no longer the bucket's own: whole dicts replaced (`load_state_dict`, ZeRO's
        `state[p] = {...}`) or single tensors (`state[p]["exp_avg"] = t`), as a load would.

        `same_dicts` says that `optimizer.state` holds the very dicts it held at the last step, so only the
        tensors in them need checking, through the dicts the bucket keeps (no lookup by param, whose hashing
        is a Python call per param).
        """
        states = bucket.states
        current = states if same_dicts else list(map(self.optimizer.state.get, bucket.params, repeat(_NO_STATE)))
        if current is states or all(map(operator.is_, current, states)):
            try:
                if all(
                    all(map(operator.is_, map(dict.get, current, repeat(key)), expected))
                    for key, expected in bucket.expected_state.items()
                ):
                    return  # The usual case: a few C-level passes over the params, no Python work per param.
            except TypeError:  # A state that is a Mapping but not a dict: check it param by param.
                pass
        for index, state in enumerate(current):
            self._record_state(bucket, index, state)

    # ------------------------------------------------------------------------------------------------
    # Stepping

    def step_group(self, group: Group) -> list[torch.Tensor]:
        """Step the group's buckets; return the params the reference loop must step."""
        buckets, leftovers = self._buckets_of(group)
        # One C-level pass over the state dicts tells whether any was replaced, added or removed since the
        # last step (if a step created state, the next one just checks everything once more).
        seen, self._seen_states = self._seen_states, list(self.optimizer.state.values())
        same_dicts = len(seen) == len(self._seen_states) and all(map(operator.is_, seen, self._seen_states))
        for bucket in buckets:
            self._step_bucket(group, bucket, same_dicts)
        return leftovers

    def reduce_group(
        self,
        group: Group,
        collect: Callable[[State, Group, torch.Tensor, torch.Tensor], None],
        add: Callable[[Mapping[str, torch.Tensor]], None],
    ) -> list[torch.Tensor]:
        """The first pass (`reduces`) over the group's buckets: `collect(state, group, grad, param)` on each
        segment (or, compiled, the sums of `reduce_param` handed to `add`), its grads gathered once for the
        step that follows; return the params the reference loop must do."""
        buckets, leftovers = self._buckets_of(group)
        for bucket in buckets:
            prepared = bucket.prepared = self._prepare(group, bucket, same_dicts=False, rows=False)
            for first, last, step in prepared.runs:
                scalars = self.optimizer.step_scalars({"step": step + 1}, group)
                reduction = self._reduction_for(group, bucket, scalars)
                for segment, grad in _segments(bucket, first, last, prepared.in_place, self._whole_tensors):
                    if reduction is not None and segment.stop - segment.start >= 2 and segment.starts is None:
                        try:
                            add(reduction(segment.param, grad, scalars, segment.state_list))
                            continue
                        except Exception as error:  # Whatever the compiler raises, the eager path still works.
                            self._reduction_failed(group, bucket, scalars, error)
                            reduction = None
                    collect({"step": step, **segment.state}, group, grad, segment.param)
        return leftovers

    def _reduction_for(self, group: Group, bucket: Bucket, scalars: Scalars) -> CompiledReduction | None:
        """The compiled first pass for `bucket`, on the same terms as its compiled update (`_compiled_for`)."""
        if self.mode == "bucketed" or bucket.compile_failed or self._stacked or not compilation_supported():
            return None
        if self.mode == "auto" and self.eager_work < AUTO_COMPILE_WORK:
            return None
        key = self._constants_key(group, bucket, scalars)
        if key is None:
            return None
        if key not in self._reductions:
            constants = self.optimizer.compile_constants(group)
            tag = f"{id(self):x}_reduce_{len(self._reductions)}"
            self._reductions[key] = CompiledReduction(
                self.optimizer, constants, list(bucket.state_buffers), scalars, bucket.flat_param.device, tag
            )
        return self._reductions[key]

    def _reduction_failed(self, group: Group, bucket: Bucket, scalars: Scalars, error: Exception) -> None:
        self._reductions[self._constants_key(group, bucket, scalars)] = None
        self._compile_failed(group, bucket, scalars, error)

    def _prepare(self, group: Group, bucket: Bucket, same_dicts: bool, rows: bool) -> _Prepared:
        """What a pass over the bucket needs: grads where they can be read (in the buffer, in place, or, when
        `rows` may read them all where they lie, their addresses), every param with a grad given state,
        and the runs of consecutive params with a grad and one step count."""
        optimizer = self.optimizer
        params, grad_views, states = bucket.params, bucket.grad_views, bucket.states
        grads = list(map(_GRAD, params))
        in_place: dict[int, torch.Tensor] = {}
        pointers = None  # Where the grads lie, when a compiled update is to read them all there.
        if (
            not all(map(operator.is_, grads, grad_views))
            or list(map(torch.Tensor.data_ptr, grad_views)) != bucket.grad_ptrs
        ):
            if rows and bucket.compiled is not None and bucket.compiled.calls_rows:
                pointers = _readable_grads(bucket, grads)
            if pointers is None:
                in_place = self._take_foreign_grads(bucket, grads)
        self._refresh_states(bucket, same_dicts)
        if not all(states):
            for index, grad in enumerate(grads):
                if grad is not None and not states[index]:
                    self._record_state(bucket, index, optimizer.state_for(group, params[index]))
        if pointers is not None or all(map(operator.is_not, grads, repeat(None))):
            steps = list(map(operator.getitem, states, repeat("step")))  # every param has state now
        else:
            steps = [None if grad is None else state["step"] for grad, state in zip(grads, states, strict=True)]
        if steps.count(steps[0]) == len(steps) and steps[0] is not None:
            runs = [(0, len(params), steps[0])]
        else:
            runs = []  # Maximal runs of consecutive params with a grad and the same step count.
            for index, step in enumerate(steps):
                if step is None:
                    continue
                if runs and runs[-1][1] == index and runs[-1][2] == step:
                    runs[-1] = (runs[-1][0], index + 1, step)
                else:
                    runs.append((index, index + 1, step))
        return _Prepared(grads, in_place, pointers, runs)

    def _step_bucket(self, group: Group, bucket: Bucket, same_dicts: bool) -> None:
        # The usual case (every grad is our view, every param has state at the same step) costs a few
        # C-level passes over the params and no Python work per param but the step counters.
        prepared = bucket.prepared or self._prepare(group, bucket, same_dicts, rows=self.kind == "elementwise")
        bucket.prepared = None
        grads, in_place, pointers, runs = prepared
        params, states = bucket.params, bucket.states
        # Every param has a grad if `pointers` is set; all at one step, or the segments step the runs.
        if pointers is not None and (len(runs) > 1 or not self._step_rows(group, bucket, runs[0][2], pointers)):
            in_place, pointers = self._take_foreign_grads(bucket, grads), None
        for first, last, step in runs:
            if pointers is None:
                self._step_run(group, bucket, first, last, step, in_place)
            for state in states[first:last]:
                state["step"] = step + 1
            # The kernels wrote the buffers, not the params: tell autograd, as torch.optim's in-place ops do.
            internals.increment_versions(params[first:last])

    def _take_foreign_grads(self, bucket: Bucket, grads: list[torch.Tensor | None]) -> dict[int, torch.Tensor]:
        """Grads that are not the bucket's views: large ones are read where they lie (returned, by param
        index, as flat real views); the rest are copied into the bucket's grad buffer, one `_foreach_copy_`.
        So is the data of a view that `p.grad.data = t` moved: the view goes back to the buffer, holding `t`."""
        in_place: dict[int, torch.Tensor] = {}
        targets, sources = [], []
        for index, (grad, view, large) in enumerate(zip(grads, bucket.grad_views, bucket.large, strict=True)):
            if grad is None:
                continue
            if grad is view:
                if grad.data_ptr() != bucket.grad_ptrs[index]:
                    targets.append(view)
                    sources.append(bucket.reclaim_grad(index))
                continue
            if large and not self._stacked and _same_layout(grad, view):
                in_place[index] = _real(
                    grad.view(-1) if grad.is_contiguous() else grad.as_strided((grad.numel(),), (1,))
                )
            else:
                targets.append(view)
                sources.append(grad)
        if targets:
            try:
                internals.foreach_copy_(targets, sources)
            except RuntimeError:
                self.optimizer.params_with_grad(bucket.params)  # says so if it is because a grad is sparse
                raise
        return in_place

    def _step_rows(self, group: Group, bucket: Bucket, step: int, pointers: list[int]) -> bool:
        """Step every param of the bucket (all at `step`) with one `call_rows` of the compiled update, a row
        per param, each grad read where it lies (`pointers`); False, having done nothing, where that update
        cannot (then the segments do the step)."""
        scalars = self.optimizer.step_scalars({"step": step + 1}, group)
        compiled = self._compiled_for(group, bucket, scalars)
        if compiled is None or not compiled.calls_rows:
            return False
        if bucket.rows is None or bucket.rows[0] is not compiled:
            rows = [bucket.views(start, stop) for start, stop in pairwise(bucket.offsets)]
            table = compiled.row_table([(row.param, row.grad, row.state_list) for row in rows])
            bucket.rows = (compiled, table, compiled.grad_columns)
        _, table, columns = bucket.rows
        for column in columns:
            table[:, column] = pointers
        compiled.pack(scalars)
        compiled.call_rows(table)
        return True

    def _step_run(
        self, group: Group, bucket: Bucket, first: int, last: int, step: int, in_place: dict[int, torch.Tensor]
    ) -> None:
        """Step params `first:last`, all at `step`, one call of the update per segment (see `_segments`)."""
        optimizer = self.optimizer
        base_scalars = optimizer.step_scalars({"step": step + 1}, group)
        if self._stacked:
            self._step_stack(group, bucket, first, last, step, base_scalars)
            return
        variants: dict[str, tuple[Scalars, CompiledUpdate | None, torch.Tensor | None]] = {}
        for segment, grad in _segments(bucket, first, last, in_place, self._whole_tensors):
            # A tensorwise update reduces over a whole param, over rows of params of one size, or over several
            # with their `starts`: three kinds of call, told apart by constants in the scalars (the kind, and
            # the row size), so each has its compiled update.
            extents = "" if not self._whole_tensors else _extents_kind(segment)
            variant = f"{extents}{segment.row_numel or ''}"
            if variant not in variants:
                scalars = {**base_scalars, "extents": extents} if extents else base_scalars
                if segment.row_numel is not None:
                    scalars["row_numel"] = segment.row_numel
                compiled = self._compiled_for(group, bucket, scalars)
                variants[variant] = (scalars, compiled, None if compiled is None else compiled.pack(scalars))
            scalars, compiled, packed = variants[variant]
            if compiled is not None and packed is not None and segment.stop - segment.start >= 2:
                try:
                    inputs = segment.state_list if segment.starts is None else [*segment.state_list, segment.starts]
                    compiled(segment.param, grad, packed, inputs)
                    continue
                except Exception as error:  # Whatever the compiler raises, the eager path still works.
                    self._compile_failed(group, bucket, scalars, error)
                    variants[variant] = (scalars, None, None)
            length = segment.stop - segment.start
            if extents:  # A reduction needs the whole segment in one call.
                eager = {**scalars, "extents": TensorExtents(segment.starts, segment.row_numel)}
                optimizer.update({"step": step + 1, **segment.state}, group, grad, segment.param, eager)
                self._did_eagerly(bucket, length)
                continue
            for start in range(0, length, EAGER_CHUNK):
                stop = min(start + EAGER_CHUNK, length)
                whole = start == 0 and stop == length
                state = segment.state if whole else {key: value[start:stop] for key, value in segment.state.items()}
                param = segment.param if whole else segment.param[start:stop]
                optimizer.update({"step": step + 1, **state}, group, grad[start:stop], param, scalars)
            self._did_eagerly(bucket, length)

    def _step_stack(
        self, group: Group, bucket: Bucket, first: int, last: int, step: int, base_scalars: Scalars
    ) -> None:
        """Step params `first:last` of a stacked bucket as one batch: tensors of `(last - first, *shape)`, the
        compiled update specialised to that shape (matrix products are fastest at a known size)."""
        segment = bucket.segment(bucket.offsets[first], bucket.offsets[last])
        param, grad, state = segment.param, segment.grad, segment.state
        if last - first == 1 and param.dim() > 1:
            # A stack of one is stepped as the param itself, so that it rounds as the reference loop does (not
            # a 0-d param: inductor drops the writes to a 0-d input).
            param, grad, state = param[0], grad[0], {key: value[0] for key, value in state.items()}
            scalars = {**base_scalars, "stack": tuple(param.shape)}
        else:
            scalars = {**base_scalars, BATCH_DIMS: 1, "stack": tuple(param.shape)}
        compiled = self._compiled_for(group, bucket, scalars) if STACKS_COMPILE else None
        if compiled is not None:
            try:
                compiled(param, grad, compiled.pack(scalars), list(state.values()))
                return
            except Exception as error:  # Whatever the compiler raises, the eager path still works.
                self._compile_failed(group, bucket, scalars, error)
        self.optimizer.update({"step": step + 1, **state}, group, grad, param, scalars)
        self._did_eagerly(bucket, segment.stop - segment.start)

    def _did_eagerly(self, bucket: Bucket, work: int) -> None:
        bucket.eager_work += work
        self.eager_work += work

    def _compiled_for(self, group: Group, bucket: Bucket, scalars: Scalars) -> CompiledUpdate | None:
        """The compiled update for this step of `bucket`, made on first use, or None to run eagerly."""
        if self.mode == "bucketed" or bucket.compile_failed:
            return None
        # Early in auto, a compilation would not repay itself yet, unless there is none to pay: the update for
        # these constants is compiled already (another group, or this one before `.to()` rebuilt its buckets).
        if (
            self.mode == "auto"
            and self.eager_work < AUTO_COMPILE_WORK
            and (not self._compiled or self._compiled.get(self._constants_key(group, bucket, scalars)) is None)
        ):
            return None
        if bucket.compiled is not None and bucket.compiled.fits(group, scalars):
            return bucket.compiled
        key = self._constants_key(group, bucket, scalars)
        if key is None:
            _warn_once(
                "unhashable",
                "adaptopt: a param group holds a value that cannot key a compiled update; "
                "running those buckets eagerly",
            )
            return None
        if key in self._compiled:
            bucket.compiled = self._compiled[key]
            return bucket.compiled
        if not compilation_supported():
            bucket.compile_failed = True
            if not internals.dynamo_supported():  # Otherwise an internal is missing, and it has said so.
                _warn_once("unsupported", "adaptopt: torch.compile is not supported here; running buckets eagerly")
            return None
        limit = COMPILED_VARIANTS * (8 if self._stacked else 1)  # stacked: one per shape, too
        if sum(compiled is not None for compiled in self._compiled.values()) >= limit:
            _warn_once(
                "variants",
                f"adaptopt: hyper-parameters took more than {COMPILED_VARIANTS} compiled sets of values (a scheduler "
                "changing betas?); running the new ones eagerly",
            )
            self._compiled[key] = None
            return None
        constants = self.optimizer.compile_constants(group)
        tag = f"{id(self):x}_{len(self._compiled)}"
        state_keys = list(bucket.state_buffers)
        compiled = CompiledUpdate(
            self.optimizer,
            constants,
            state_keys,
            scalars,
            bucket.flat_param.device,
            tag,
            # Rows split a param's elements among threads: for elementwise updates only. A tensorwise update
            # over one whole param may still be called directly, one call a param.
            direct=self.kind == "elementwise" or scalars.get("extents") == "whole",
            rows=self.kind == "elementwise",
            dynamic=not self._stacked,
        )
        self._compiled[key] = bucket.compiled = compiled
        return compiled

    def _compile_failed(self, group: Group, bucket: Bucket, scalars: Scalars, error: Exception) -> None:
        """Record that compiling failed (the bucket runs eagerly from now on) and warn, once per process."""
        self._compiled[self._constants_key(group, bucket, scalars)] = None
        bucket.compiled = None
        bucket.compile_failed = True
        # Dynamo wraps what the compiler raised (BackendCompilerFailed): say what that was.
        while isinstance(inner := getattr(error, "inner_exception", None) or error.__cause__, Exception):
            error = inner
        reason = (str(error).splitlines() or [""])[0][:200]
        _warn_once(
            "failed", f"adaptopt: torch.compile failed ({type(error).__name__}: {reason}); running buckets eagerly"
        )

    def _constants_key(self, group: Group, bucket: Bucket, scalars: Scalars) -> Hashable | None:
        """What a compiled update depends on besides its tensors and float scalars; None if it is unhashable."""
        place = (bucket.flat_param.dtype, bucket.flat_param.device, tuple(bucket.state_buffers))
        return constants_key(self.optimizer, group, scalars, place)

    # ------------------------------------------------------------------------------------------------
    # zero_grad(set_to_none=False)

    def zero_grad(self) -> None:
        """Zero the grads, keeping them (torch's `set_to_none=False`), one `zero_()` per bucket.

        A bucketed param's grad that is a plain tensor becomes the bucket's (zeroed) view of it, so the next
        backward accumulates straight into the bucket; grads that are views of someone else's buffer (DDP)
        are zeroed in place, as torch does. Grads that are None stay None.
        """
        done: set[torch.Tensor] = set()
        for _group, _params, _length, buckets, _leftovers in self._records.values():
            for bucket in buckets:
                if not bucket.is_home():
                    continue
                for index, (param, view) in enumerate(zip(bucket.params, bucket.grad_views, strict=True)):
                    grad = param.grad
                    if grad is None:
                        pass
                    elif grad is view:
                        if grad.data_ptr() != bucket.grad_ptrs[index]:
                            bucket.reclaim_grad(index)
                    elif grad.grad_fn is None and grad.layout == torch.strided and not internals.is_view(grad):
                        param.grad = view
                    else:
                        _zero_in_place(grad)
                    done.add(param)
                bucket.flat_grad.zero_()
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param not in done and param.grad is not None:
                    _zero_in_place(param.grad)


def _extents_kind(segment: Segment) -> str:
    """How a tensorwise update's sums run over `segment` (`TensorExtents`): the compiled update's constant."""
    return "rows" if segment.row_numel is not None else "segmented" if segment.starts is not None else "whole"


def _segments(
    bucket: Bucket, first: int, last: int, in_place: dict[int, torch.Tensor], whole_tensors: bool = False
) -> Iterator[tuple[Segment, torch.Tensor]]:
    """Split params `first:last` into what one call of the update can do: segments of the bucket's buffers,
    each with its grad, the bucket's grad buffer or a grad read in place. Large params come last in a
    bucket, so when their grads are read in place their smaller neighbours still make one segment. With
    `whole_tensors` every large param is a segment of its own (a tensorwise update reduces over it)."""
    offsets = bucket.offsets
    start = offsets[first]
    for index in range(first, last) if in_place or whole_tensors else ():
        grad = in_place.get(index)
        if grad is None and whole_tensors and bucket.large[index]:
            grad = bucket.segment(offsets[index], offsets[index + 1]).grad
        if grad is not None:
            if start < offsets[index]:
                segment = bucket.segment(start, offsets[index])
                yield segment, segment.grad
            yield bucket.segment(offsets[index], offsets[index + 1]), grad
            start = offsets[index + 1]
    if start < offsets[last]:
        segment = bucket.segment(start, offsets[last])
        yield segment, segment.grad


_GRAD, _IS_CPU, _DTYPE = operator.attrgetter("grad"), operator.attrgetter("is_cpu"), operator.attrgetter("dtype")


def _readable_grads(bucket: Bucket, grads: list[torch.Tensor | None]) -> list[int] | None:
    """Where each grad's data starts, if all can be read there as the bucket's grad views would be: plain
    dense tensors on the CPU (where rows run), of the bucket's dtype, shaped and strided as the params. None
    otherwise. C-level passes over the grads only: a Python check per grad costs as much as copying it."""
    if not all(map(operator.is_, map(type, grads), repeat(torch.Tensor))):  # None or a subclass
        return None
    present = cast(list[torch.Tensor], grads)
    try:
        if not (
            all(map(_IS_CPU, present))
            and all(map(operator.is_, map(_DTYPE, present), repeat(bucket.flat_grad.dtype)))
            and list(map(torch.Tensor.size, present)) == bucket.shapes
            and list(map(torch.Tensor.stride, present)) == bucket.strides
        ):
            return None
    except RuntimeError:  # A layout without strides: sparse, mkldnn.
        return None
    return list(map(torch.Tensor.data_ptr, present))


def _same_layout(grad: torch.Tensor, view: torch.Tensor) -> bool:
    """Whether `grad` holds its elements in one dense stretch, in the order of the bucket's `view`."""
    return (
        type(grad) is torch.Tensor
        and grad.layout == torch.strided
        and grad.dtype == view.dtype
        and grad.device == view.device
        and not grad.requires_grad
        and grad.shape == view.shape
        and grad.stride() == view.stride()
        and (grad.is_contiguous() or _dense(grad))
    )


def _zero_in_place(grad: torch.Tensor) -> None:
    # torch.optim.Optimizer.zero_grad(set_to_none=False)'s treatment of one grad.
    if grad.grad_fn is not None:
        grad.detach_()
    else:
        grad.requires_grad_(False)
    grad.zero_()


def bucket_of(optimizer: Steppable, param: torch.Tensor) -> Bucket | None:
    """The bucket `param` lives in, if any (for tests and benchmarks)."""
    engine = getattr(optimizer, "_buckets", None)
    if engine is None:
        return None
    owner = engine._owner.get(param)
    return None if owner is None else owner[0]


def buckets(optimizer: Steppable) -> Iterable[Bucket]:
    """Every bucket of `optimizer` (for tests and benchmarks)."""
    engine = getattr(optimizer, "_buckets", None)
    if engine is None:
        return []
    return [bucket for record in engine._records.values() for bucket in record[3]]
