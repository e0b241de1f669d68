r"""Fast execution of an optimizer's one `step_param`: contiguous buckets, eagerly or under `torch.compile`.

The reference path (`execution="reference"`, in `base.py`) loops over parameters. An optimizer whose
`step_param` is elementwise (`elementwise = True`, all of ours) can instead run it once over a *bucket*: all
params of one (param group, device, dtype) moved into one contiguous buffer, so one call updates them all.
The technique is Megatron's and DeepSpeed's contiguous buffers; gathering copies into a buffer every step
costs more than it saves, so the buffers are where the data lives:

* `p.data` is re-homed as a view of the bucket's flat param buffer (same shape and strides);
* the state is created as views of flat state buffers, one per state tensor (`exp_avg`, ...);
* each param has a view of a flat grad buffer. Grads that are these views (after
  `zero_grad(set_to_none=False)`, backward accumulates into them in place) cost nothing; any other grad
  (torch's default `zero_grad()` sets grads to None, so autograd hands over new tensors; clipping that
  assigns new tensors; DDP's `gradient_as_bucket_view`) is copied into the flat buffer at the step, one
  `_foreach_copy_` per bucket, and left where it is.

At each step a bucket is stepped in *runs*: maximal stretches of consecutive params that have a grad and the
same step count, each run one `_step_one` over the run's slice of the buffers (in chunks of `EAGER_CHUNK`
elements, so the temporaries of `step_param` stay small). All params with grads and equal steps, the usual
case, is one run. Params the buckets cannot own are handed back to the reference loop: tensor subclasses
(DTensor), sparse, non-dense or frozen params, params whose storage other tensors share (re-homing would
untie them), and whole groups that step through working copies (master weights, `state_dtype`,
GradScaler). Moving the model with `.to()` (or assigning `p.data`) after the optimizer was built is detected
at the next step, which re-gathers the group: params and state move into new buffers on the params' new
device, the state cast to what `init_state` gives for the moved params. State that is no longer the bucket's
views (our `load_state_dict` replacing the whole mapping, ZeRO's assigning `state[p] = {...}` per param, or
`state[p]["exp_avg"] = t` by hand) is copied into the buffers at the next step, and the views take its place.

`execution="compiled"` runs a whole-bucket run through `torch.compile` (one fused loop per bucket). The
per-step numbers of `step_scalars` (rate, bias corrections, rectifier) enter as one float64 tensor, so a new
step or a schedule changes inputs, not code, and triggers no recompile; a `None` among them (RAdam's
rectifier before $\rho_t > 5$) selects a branch, which compiles once per branch. Where compilation is not
available or fails, it warns once and runs eagerly. `execution="auto"` is bucketed and compiles a bucket
once it has done `AUTO_COMPILE_WORK` element-updates eagerly, so short runs (and test suites) never pay the
seconds a compilation costs, and long ones get the fused loop; the switch point depends on sizes and steps
only, so a run is reproducible.
"""

from __future__ import annotations

import operator
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .base import GenericAdaptiveOptimizer, Group, Scalars, State

__all__ = ["AUTO_COMPILE_WORK", "EAGER_CHUNK", "EXECUTION_MODES", "Bucket", "BucketedExecution"]

EXECUTION_MODES = ("auto", "reference", "bucketed", "compiled")

EAGER_CHUNK = 1 << 19
"""Elements per eager `step_param` call: bounds its temporaries (2 MiB each in fp32) and keeps the
working set of one call in the last-level cache."""

AUTO_COMPILE_WORK = 1 << 30
"""Element-updates a bucket does eagerly before `execution="auto"` compiles it (about a second of eager
work on a desktop CPU; a compilation costs a few): 64 steps of 16M elements, 2500 of MNIST's CNN."""


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


def _storage_users(tensor: torch.Tensor) -> int:
    return int(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata))


# Tensors whose storage nothing else shares count this many users (the tensor and the probe).
_EXCLUSIVE_USERS = _storage_users(torch.empty(1))


def _owns_its_storage(param: torch.Tensor) -> bool:
    """Whether `param` alone uses its memory, so moving it into a bucket unties nothing."""
    return (
        param.storage_offset() == 0
        and param.untyped_storage().nbytes() == param.numel() * param.element_size()
        and _storage_users(param) <= _EXCLUSIVE_USERS
    )


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


def _compiled_update(
    optimizer: GenericAdaptiveOptimizer,
    state: State,
    group: Group,
    grad: torch.Tensor,
    param: torch.Tensor,
    names: tuple[str, ...],
    fixed: Scalars,
    packed: torch.Tensor,
) -> None:
    """What `torch.compile` traces: `_update` with the float scalars unpacked from one float64 tensor."""
    scalars = dict(fixed)
    for index, name in enumerate(names):
        scalars[name] = packed[index]
    optimizer._update(state, group, grad, param, scalars)


def _compile_update(tag: str) -> Callable[..., None]:
    """A compiled `_compiled_update` with its own code object, hence its own cache and recompile limit."""
    code = _compiled_update.__code__.replace(co_name=f"_compiled_update_{tag}")
    function = types.FunctionType(code, _compiled_update.__globals__, code.co_name)
    compiled: Callable[..., None] = torch.compile(function, fullgraph=True, dynamic=False)
    return compiled


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
    eager_work: int = 0
    compiled: Callable[..., None] | None = None
    compile_failed: bool = False
    states: list[State] = field(default_factory=list)
    """Each param's state dict as last seen in `optimizer.state` (`_NO_STATE` if it had none)."""
    expected_state: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    """Per state key, per param: the view its state must hold under that key (None where it has no state)."""

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def is_home(self) -> bool:
        """Whether every param still lives in the buffer (not moved by `.to()` or a `p.data =`)."""
        return list(map(torch.Tensor.data_ptr, self.params)) == self.data_ptrs

    def real_slice(self, tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return _real(tensor[start:stop])

    def state_slice(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {key: buffer[start:stop] for key, buffer in self.state_buffers.items()}


class BucketedExecution:
    """The bucketed and compiled paths of one optimizer (see the module docstring)."""

    def __init__(self, optimizer: GenericAdaptiveOptimizer, mode: str) -> None:
        self.optimizer = optimizer
        self.mode = mode
        self._records: dict[int, tuple[Group, list[torch.Tensor], int, list[Bucket], list[torch.Tensor]]] = {}
        self._owner: dict[torch.Tensor, tuple[Bucket, int]] = {}

    @classmethod
    def for_mode(cls, optimizer: GenericAdaptiveOptimizer, execution: Any) -> BucketedExecution | None:
        """The engine for `execution`, or None for the reference loop."""
        mode = validate_execution(execution)
        if mode == "reference" or not type(optimizer).elementwise:
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
        by_place: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        leftovers = []
        for param in group["params"]:
            if _can_join_bucket(param) and (param in homed or _owns_its_storage(param)):
                by_place.setdefault((param.device, param.dtype), []).append(param)
            else:
                leftovers.append(param)
        buckets = []
        for members in by_place.values():
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
        flat_param = torch.empty(offsets[-1], dtype=params[0].dtype, device=params[0].device)
        real_shape = _real(flat_param).shape
        fresh: State = {}
        optimizer._initialize_state(fresh, group, flat_param)
        state_buffers = {key: value for key, value in fresh.items() if key != "step"}
        if not all(
            isinstance(value, torch.Tensor) and value.shape == real_shape and value.is_contiguous()
            for value in state_buffers.values()
        ):
            return None  # Not elementwise state after all: the reference loop keeps these params.
        elements = 2 if flat_param.is_complex() else 1
        flat_grad = torch.zeros_like(flat_param)
        param_views = [_alias(flat_param, offset, param) for param, offset in zip(params, offsets, strict=False)]
        torch._foreach_copy_(param_views, [param.detach() for param in params])
        grad_views = [_alias(flat_grad, offset, param) for param, offset in zip(params, offsets, strict=False)]
        state_views = [
            {key: _alias(buffer, offset * elements, _real(param)) for key, buffer in state_buffers.items()}
            for param, offset in zip(params, offsets, strict=False)
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
            states=[_NO_STATE] * len(params),
            expected_state={key: [None] * len(params) for key in state_buffers},
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
        """Fresh state of a bucketed param (from `_state_for`) moves into the bucket's buffers."""
        owner = self._owner.get(param)
        if owner is not None:
            bucket, index = owner
            if bucket.is_home():
                self._record_state(bucket, index, state)

    def _refresh_states(self, bucket: Bucket) -> None:
        """Take in state that is no longer the bucket's own: whole dicts replaced (`load_state_dict`, ZeRO's
        `state[p] = {...}`) or single tensors (`state[p]["exp_avg"] = t`), as a load would."""
        current = list(map(self.optimizer.state.get, bucket.params, repeat(_NO_STATE)))
        if all(map(operator.is_, current, bucket.states)):
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
        for bucket in buckets:
            self._step_bucket(group, bucket)
        return leftovers

    def _step_bucket(self, group: Group, bucket: Bucket) -> None:
        # The usual case (every grad is our view, every param has state at the same step) costs a few
        # C-level passes over the params and no Python work per param but the step counters.
        optimizer = self.optimizer
        params, grad_views, states = bucket.params, bucket.grad_views, bucket.states
        grads = [param.grad for param in params]
        if not all(map(operator.is_, grads, grad_views)):
            foreign = [
                (param, grad, view)
                for param, grad, view in zip(params, grads, grad_views, strict=True)
                if grad is not None and grad is not view
            ]
            if foreign:
                optimizer._params_with_grad([param for param, _, _ in foreign])  # rejects sparse grads
                torch._foreach_copy_([view for _, _, view in foreign], [grad for _, grad, _ in foreign])
        self._refresh_states(bucket)
        if not all(states):
            for index, grad in enumerate(grads):
                if grad is not None and not states[index]:
                    self._record_state(bucket, index, optimizer._state_for(group, params[index]))
        steps = [
            None if grad is None or not state else state["step"] for grad, state in zip(grads, states, strict=True)
        ]
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
        for first, last, step in runs:
            self._step_run(group, bucket, first, last, step)
            for state in states[first:last]:
                if state is not None:  # always, in a run
                    state["step"] = step + 1

    def _step_run(self, group: Group, bucket: Bucket, first: int, last: int, step: int) -> None:
        start, stop = bucket.offsets[first], bucket.offsets[last]
        whole = start == 0 and stop == bucket.numel
        if whole and self._compiled_for(bucket) is not None and self._step_compiled(group, bucket, step):
            return
        optimizer = self.optimizer
        for chunk_start in range(start, stop, EAGER_CHUNK):
            chunk_stop = min(chunk_start + EAGER_CHUNK, stop)
            state = {"step": step, **bucket.state_slice(chunk_start, chunk_stop)}
            optimizer._step_one(
                state,
                group,
                bucket.real_slice(bucket.flat_grad, chunk_start, chunk_stop),
                bucket.real_slice(bucket.flat_param, chunk_start, chunk_stop),
            )
        bucket.eager_work += stop - start

    def _compiled_for(self, bucket: Bucket) -> Callable[..., None] | None:
        """The bucket's compiled update, compiling it if the mode says it is time to."""
        if bucket.compiled is not None or bucket.compile_failed or self.mode == "bucketed":
            return bucket.compiled
        if self.mode == "auto" and bucket.eager_work < AUTO_COMPILE_WORK:
            return None
        if not torch._dynamo.eval_frame.is_dynamo_supported():
            bucket.compile_failed = True
            _warn_once("unsupported", "adaptopt: torch.compile is not supported here; running buckets eagerly")
            return None
        bucket.compiled = _compile_update(f"{id(bucket):x}")
        return bucket.compiled

    def _step_compiled(self, group: Group, bucket: Bucket, step: int) -> bool:
        """One compiled update of the whole bucket; False (after one warning) if compilation failed."""
        optimizer = self.optimizer
        state = {"step": step + 1, **bucket.state_buffers}
        scalars = optimizer.step_scalars(state, group)
        names = tuple(name for name, value in scalars.items() if isinstance(value, float))
        fixed = {name: value for name, value in scalars.items() if name not in names}
        packed = torch.tensor([scalars[name] for name in names], dtype=torch.float64)
        del state["step"]  # The compiled math must not depend on it: it would recompile every step.
        constants = {key: value for key, value in group.items() if key != "params"}
        assert bucket.compiled is not None
        try:
            bucket.compiled(
                optimizer, state, constants, _real(bucket.flat_grad), _real(bucket.flat_param), names, fixed, packed
            )
        except Exception as error:  # Whatever the compiler raises, the eager path still works.
            bucket.compiled = None
            bucket.compile_failed = True
            _warn_once(
                "failed",
                f"adaptopt: torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "running buckets eagerly",
            )
            return False
        return True

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
                for param, view in zip(bucket.params, bucket.grad_views, strict=True):
                    grad = param.grad
                    if grad is None or grad is view:
                        pass
                    elif grad._base is None and grad.grad_fn is None and grad.layout == torch.strided:
                        param.grad = view
                    else:
                        _zero_in_place(grad)
                    done.add(param)
                bucket.flat_grad.zero_()
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param not in done and param.grad is not None:
                    _zero_in_place(param.grad)


def _zero_in_place(grad: torch.Tensor) -> None:
    # torch.optim.Optimizer.zero_grad(set_to_none=False)'s treatment of one grad.
    if grad.grad_fn is not None:
        grad.detach_()
    else:
        grad.requires_grad_(False)
    grad.zero_()


def bucket_of(optimizer: GenericAdaptiveOptimizer, param: torch.Tensor) -> Bucket | None:
    """The bucket `param` lives in, if any (for tests and benchmarks)."""
    engine = getattr(optimizer, "_buckets", None)
    if engine is None:
        return None
    owner = engine._owner.get(param)
    return None if owner is None else owner[0]


def buckets(optimizer: GenericAdaptiveOptimizer) -> Iterable[Bucket]:
    """Every bucket of `optimizer` (for tests and benchmarks)."""
    engine = getattr(optimizer, "_buckets", None)
    if engine is None:
        return []
    return [bucket for record in engine._records.values() for bucket in record[3]]
