r"""An optimizer's `_update` compiled by `torch.compile` for flat tensors of any length.

`execution.py` steps a bucket in *segments*: stretches of its flat buffers, each with a grad that is either the
bucket's flat grad buffer or a param's own grad, read where it lies. `CompiledUpdate` is the compiled form of
the optimizer's one definition of the math (`_update`: maximize, weight decay, `step_param`) for one set of
*constants*: the param group's hyper-parameters, the non-float scalars of `step_scalars` (RAdam's rectifier
being `None` selects a branch), dtype and device. Two things make one compilation serve a whole training run:

* the length of the segment is dynamic (`torch._dynamo.mark_dynamic`), so every segment of every bucket with
  the same constants shares one compiled kernel;
* the float scalars of `step_scalars` (rate, bias corrections, rectifier) enter as one float64 tensor, so a
  new step or a schedule changes inputs, not code. A float64 tensor, not Python floats: dynamo specialises on
  floats used as `value=`/`alpha=` (a recompile every step), and inductor hands floats from `.item()` to its
  kernels in single precision.

The first call goes through dynamo, which traces `_update`, and inductor, which compiles the graph. Dynamo's
guards then re-check every later call (about 15 µs on a CPU, more than the whole update of a small param).
They have nothing to find here: the caller keys compiled updates by every constant the trace could see, and
only ever passes contiguous, non-overlapping 1-D (2-D for complex) tensors of the traced dtype and device. So
on the CPU, where inductor's kernels accept any alignment, the compiled graph is then called directly, with
its arguments in the order dynamo passed them on the first call (learned by identity, checked entry by entry;
if anything unexpected shows up, every call simply keeps going through dynamo).
"""

from __future__ import annotations

import operator
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .base import GenericAdaptiveOptimizer, Group, Scalars

__all__ = ["CompiledUpdate", "compilation_supported"]


def compilation_supported() -> bool:
    return bool(torch._dynamo.eval_frame.is_dynamo_supported())


class CompiledUpdate:
    """`optimizer._update` compiled for one set of constants; call it on any segment of flat tensors.

    `constants` is the param group as the trace sees it (without `params` and `lr`: the rate only enters
    through the scalars, so a `step_param` that read `group["lr"]` fails to compile instead of baking a stale
    rate in); `state_keys` name the state tensors; `scalars` are the first step's: its floats are inputs
    (`pack` them), the rest (such as `None`) are compiled in.
    """

    compilations = 0
    """Graphs compiled by every `CompiledUpdate` of the process (for tests: a schedule must not add any)."""

    def __init__(
        self,
        optimizer: GenericAdaptiveOptimizer,
        constants: Group,
        state_keys: Sequence[str],
        scalars: Scalars,
        device: torch.device,
        tag: str,
    ) -> None:
        keys = tuple(state_keys)
        self.names = scalar_names = tuple(name for name, value in scalars.items() if isinstance(value, float))
        self.constants = constants
        self.fixed = fixed = {name: value for name, value in scalars.items() if name not in scalar_names}

        def update(param: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, *state: torch.Tensor) -> None:
            scalars = dict(fixed)
            for index, name in enumerate(scalar_names):
                scalars[name] = packed[index]
            optimizer._update(dict(zip(keys, state, strict=True)), constants, grad, param, scalars)

        # A code object of its own: dynamo keeps its cache and recompile limit per code object.
        code = update.__code__.replace(co_name=f"adaptopt_update_{tag}")
        function = types.FunctionType(code, update.__globals__, code.co_name, None, update.__closure__)
        self._dynamo: Callable[..., Any] = torch.compile(function, fullgraph=True, dynamic=False, backend=self._compile)
        self._graph: Callable[..., Any] | None = None
        self._arguments: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None
        """Picks the graph's arguments, in its order, out of `(param, grad, packed, *state, length)`."""
        self._probe: tuple[tuple[torch.Tensor, ...], int] | None = None
        self._packed = torch.zeros(len(scalar_names), dtype=torch.float64)
        self._packed_numpy = self._packed.numpy() if device.type == "cpu" else None

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
        when the whole step of a small model takes 0.3 ms. Elsewhere the update may still be running
        asynchronously when the next step comes, so each step gets a new tensor.
        """
        values = [scalars[name] for name in self.names]
        if self._packed_numpy is None:
            return torch.tensor(values, dtype=torch.float64)
        self._packed_numpy[:] = values
        return self._packed

    def __call__(
        self, param: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, state: list[torch.Tensor]
    ) -> None:
        """Update the segment: `param`, `grad` and each of `state` are flat and of one length, at least 2."""
        if self._arguments is not None:
            self._graph(*self._arguments((param, grad, packed, *state, param.shape[0])))  # type: ignore[misc]
            return
        for tensor in (param, grad, *state):
            torch._dynamo.mark_dynamic(tensor, 0)
        if self._graph is None and param.device.type == "cpu":
            self._probe = ((param, grad, packed, *state), param.shape[0])
        try:
            self._dynamo(param, grad, packed, *state)
        finally:
            self._probe = None

    def _compile(self, graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """Dynamo's backend: inductor, wrapped to learn, on the call that compiles, the order of the graph's
        arguments."""
        graph: Callable[..., Any] = torch._inductor.compile(graph_module, example_inputs)
        CompiledUpdate.compilations += 1

        def run(*args: Any) -> Any:
            if self._probe is not None:
                self._learn_plan(graph, args)
            return graph(*args)

        return run

    def _learn_plan(self, graph: Callable[..., Any], args: Sequence[Any]) -> None:
        assert self._probe is not None
        inputs, length = self._probe
        self._probe = None
        plan = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                matches = [index for index, tensor in enumerate(inputs) if tensor is arg]
                if len(matches) != 1:
                    return
                plan.append(matches[0])
            elif type(arg) is int and arg == length:
                plan.append(len(inputs))  # where __call__ puts the length
            else:
                return
        if plan:
            pick = operator.itemgetter(*plan)
            self._arguments = pick if len(plan) > 1 else lambda inputs: (pick(inputs),)
            self._graph = graph
