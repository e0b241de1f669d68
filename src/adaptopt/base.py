r"""`GenericAdaptiveOptimizer`: everything an adaptive optimizer needs except its own math.

An optimizer in adaptopt is a subclass that supplies its math as template methods:

* `init_state(state, group, param)` creates its per-parameter state tensors;
* `step_scalars(state, group)` computes the numbers that change with the step (the scheduled rate, bias
  corrections), as Python floats, from `state["step"]` and the group (the default gives the rate only);
* `step_param(state, group, grad, param, scalars)` updates `param` and `state` in place from `grad`.

The base class owns the rest, the same for every optimizer:

* validation of every hyper-parameter, at construction, per param group and in `add_param_group`;
* the closure (re-evaluated under `torch.enable_grad()`), skipping params without grads, and rejecting
  sparse grads;
* lazy per-parameter state and the step counter `state["step"]`, a Python `int` that the base increments
  before calling `step_param` (bias corrections are computed from it in float64, whatever the dtypes);
* `maximize`, complex parameters (stepped as their `torch.view_as_real` twins) and weight decay, through the
  policy in `weight_decay.py`, applied before `step_param` sees the gradient;
* the effective learning rate, `learning_rate(state, group)`, the one place where schedules plug in;
* `state_dict` in torch's format and a `load_state_dict` that validates everything before it changes
  anything and never rounds state through the parameters' dtype;
* how the update is executed (`_step_group`, option `execution`): the reference is a plain loop over
  parameters; `execution.py` runs the same `step_param` over contiguous buckets of parameters, eagerly or
  under `torch.compile`.

Because the base has applied decay and maximize before `step_param` is called, and hands it the step's
numbers in `scalars`, `step_param` can be run unchanged on any tensor that holds the parameter's elements, a
single parameter or, for optimizers that declare `kind = "elementwise"`, a contiguous bucket of many.

What an optimizer may assume is declared on its class, never guessed:

* `kind` says on what `step_param` may run (`KINDS`). The default, `"per_param"`, runs it on one whole
  parameter at a time, the reference loop, which is right for any math; `"elementwise"` lets the execution
  engine run it on any slice of a bucket. Every optimizer of the family states its kind in its class body
  (a test checks it), so math that needs a whole tensor is never handed a bucket by accident.
* `group_state` names per-group state that carries across steps (Schedule-Free's weight sum, say) with its
  initial value. It lives in the param group, so it travels in `state_dict` and resumes bitwise, and it is
  not a constant of the compiled update: `begin_group_step(group)` advances it once per step, before any
  param of the group is stepped, and `step_scalars` hands what `step_param` needs of it over as numbers.
* `reduces` says that a step first needs sums over every param of every group (Prodigy's distance estimate,
  LAMB's global grad norm): `reduce_param` is run over all of them, `end_reduction` folds the totals into the
  groups, and only then is any param updated.
* Optimizers with a `"train_mode"` entry in `group_state` have modes: `train()` and `eval()` call
  `switch_mode` on every param with state, and `step()` in eval mode raises `RuntimeError`.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from typing import Any, ClassVar, NamedTuple, TypeAlias, TypedDict, cast

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from .execution import BucketedExecution
from .functional import TensorExtents, stochastic_round_to_bfloat16
from .low_bit_execution import Format, LowBitExecution
from .quantization import (
    DEFAULT_BLOCK_SIZES,
    QUANTIZED_STATE_KEYS,
    STATE_SIGNEDNESS,
    Bits,
    MapSign,
    QuantizedTensor,
    quantize,
    select_map,
)
from .validation import validate_checks, validate_group
from .weight_decay import WeightDecay, apply_weight_decay

__all__ = [
    "KINDS",
    "LOW_BIT_MIN_NUMEL",
    "LOW_BIT_STATES",
    "CommonOptions",
    "GenericAdaptiveOptimizer",
    "Group",
    "ParamsT",
    "Scalars",
    "State",
    "StateConversionWarning",
    "as_real",
]

KINDS = ("per_param", "elementwise", "tensorwise", "matrixwise")
"""What `step_param` may be run on: one whole parameter at a time; any slice of a bucket of parameters; or a
stretch of a bucket holding whole params, with per-param sums taken through `scalars["extents"]`
(`functional.TensorExtents`); or a stack of params of one shape, with a leading dim (`scalars["batch_dims"]`
is then 1), for math over matrices."""

LOW_BIT_MIN_NUMEL = 4096
"""The default `low_bit_min_numel`: bitsandbytes' `min_8bit_size` and torchao's `min_quant_size`."""

ParamsT: TypeAlias = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
State: TypeAlias = dict[str, Any]
Group: TypeAlias = dict[str, Any]
Scalars: TypeAlias = dict[str, Any]


class CommonOptions(TypedDict, total=False):
    """Options every optimizer of the family takes, after its own hyper-parameters.

    * `maximize`: ascend the objective instead of descending it (torch.optim's flag).
    * `master_weights`: step fp16/bf16 params through fp32 master copies kept in the state (the params are
      re-derived from them after every step), with fp32 optimizer state; no effect on fp32/fp64 params.
    * `state_dtype`: how the optimizer's state is stored between steps: `torch.float32` or `torch.bfloat16`
      (a dtype), or `"8bit"` / `"4bit"` (block-wise quantized moments, `quantization.py`; the rule for which
      state is quantized is in the section "Low-bit state" of `GenericAdaptiveOptimizer`'s docstring and in
      docs/low-bit.md). The math still runs in fp32 (or the param's dtype, if wider). Copies of the weights
      in the state (`weight_like_state`: Schedule-Free's `z`, Prodigy's `p0`) keep that precision.
    * `stochastic_rounding`: write each step's result into bf16 params with stochastic rounding
      (`functional.stochastic_round_to_bfloat16`: unbiased, so updates under half a bf16 ulp still move a
      param in expectation) instead of to nearest, with the math of such params run in fp32 on a working copy
      (torchao's `bf16_stochastic_round`). Their state keeps its storage (the param's dtype, or `state_dtype`)
      and is rounded to nearest. No effect on fp32/fp64 params, nor on fp16 ones (bf16 only). It cannot be
      combined with `master_weights` (`ValueError`): the fp32 master already keeps every update, and the param
      is its rounding to nearest. Random numbers come from torch's generator of the param's device.
    * `low_bit_min_numel`: with `state_dtype="8bit"` or `"4bit"`, state tensors with fewer elements than
      this stay unquantized (default 4096, bitsandbytes' `min_8bit_size` and torchao's `min_quant_size`:
      biases and norms are a small part of the memory, and rounding them saves little for the error).
    * `execution`: how `step` runs the math (see `execution.py` and docs/performance.md): `"reference"`, a
      plain loop over params; `"bucketed"`, once per contiguous bucket of params; `"compiled"`, the
      bucketed update under `torch.compile`; `"auto"` (the default), the fastest of these that applies.
    """

    maximize: bool
    master_weights: bool
    stochastic_rounding: bool
    state_dtype: torch.dtype | str | None
    low_bit_min_numel: int
    execution: str


class GenericAdaptiveOptimizer(Optimizer):
    r"""Base class of every adaptopt optimizer; see the module docstring for the division of labour.

    Subclasses call `super().__init__(params, defaults, weight_decay=..., maximize=...)` with their
    hyper-parameters in `defaults` (including `lr`), and implement `init_state` and `step_param`.

    **Low-bit state** (`state_dtype="8bit"` or `"4bit"`; Dettmers et al., *8-bit Optimizers via Block-wise
    Quantization*, ICLR 2022; Li et al., *Memory Efficient Optimizers with 4-bit States*, NeurIPS 2023). A state
    entry is stored as a `quantization.QuantizedTensor` (8 bits in blocks of 256, or 4 bits in blocks of 128)
    exactly when all of these hold, a rule of the base that no optimizer restates:

    1. it is a floating tensor of the param's (real) shape: a per-element moment. Factored moments (Adafactor's
       `row_var`/`col_var`), scalars, Prodigy's strided `s` under `slice_p > 1` and the step counter are not;
    2. it is not a copy of the weights (`weight_like_state`: Schedule-Free's `z`, Prodigy's `p0`), nor the
       master weight, whose rounding would round the params themselves;
    3. it has at least `low_bit_min_numel` elements (default 4096), and at least one;
    4. its name has a code book in `quantization.STATE_SIGNEDNESS` (signed for EMAs of the gradient, unsigned
       for EMAs and maxima of squares, chosen by `quantization.select_map`). Muon's `momentum_buffer` is
       there: it is an EMA of the gradient like Adam's $m_t$, and Newton-Schulz runs on its decoded fp32
       values. A param-shaped entry of unknown sign (a subclass's) stays unquantized, with a warning once.

    Everything else stays in the working precision: fp32, or the param's dtype if wider (float64 params keep
    float64 state there, what `state_dtype=None` keeps). The quantized values decode to float32 (upcast exactly
    for a float64 param). `step_param` never sees codes: every step decodes the group's quantized state to
    working tensors, runs the whole step on them (Prodigy's and LAMB's first pass included) and encodes the
    result once; an entry the step did not change keeps its codes (re-encoding decoded values is not the
    identity). An entry that a first pass only reads is decoded again by the update rather than held decoded
    between the passes, so at no point does every param's state exist decoded at once. Outside a step,
    `state_for` hands quantized entries back decoded, and what the caller writes into them (Sophia's
    `update_hessian`) is encoded at the end of the next step, or by `state_dict`.
    """

    kind: ClassVar[str] = "per_param"
    """What `step_param` may run on (`KINDS`): `"elementwise"` only if it combines tensors elementwise, so
    that it may be run on any subset of the elements. The default assumes nothing, and neither does a
    subclass that brings math of its own (`step_param` or `update`) without stating its kind: it is
    `"per_param"` again, whatever the class it extends may run on."""

    group_state: ClassVar[Mapping[str, Any]] = {}
    """Per-group state carried across steps, by key, with its initial value (see the module docstring); a key
    that is also a hyper-parameter in the defaults starts from the default."""

    own_weight_decay: ClassVar[bool] = False
    """Whether a float `weight_decay` means the optimizer's own decay (its reference's), which `step_param`
    applies where `group["weight_decay_policy"]` is False; a `WeightDecay` policy is the base's all the same.
    The coefficient stays under `weight_decay`, so ZeroRedundancyOptimizer, which copies its groups' entries
    into ours, hands over the same number."""

    own_checks: ClassVar[Mapping[str, Callable[[str, Any], None]]] = {}
    """Checks of the optimizer's own group keys, which the family's table (`validation`) does not know: run
    on the defaults, on every added group and on every group a `load_state_dict` brings."""

    weight_like_state: ClassVar[frozenset[str]] = frozenset()
    """State entries that are copies or iterates of the param itself (Schedule-Free's `z`, Prodigy's `p0`),
    not statistics of its grads: `state_dtype` leaves them in the working precision, since rounding them
    would round the weights (half an ulp of |p|), not a step."""

    reduces: ClassVar[bool] = False
    """Whether a step first needs sums over every param of every group (Prodigy's estimate of the distance
    to the solution, LAMB's global grad norm): `reduce_param` is then run over all of them, and
    `end_reduction` gets the totals, before `begin_group_step` and the update of any param."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in vars(cls) and any(name in vars(cls) for name in ("step_param", "update")):
            cls.kind = "per_param"
        if cls.kind not in KINDS:
            raise TypeError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        weight_decay: WeightDecay | float = 0.0,
        maximize: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | str | None = None,
        low_bit_min_numel: int = LOW_BIT_MIN_NUMEL,
        execution: str = "auto",
    ) -> None:
        policy = WeightDecay.coerce(weight_decay)
        decay = policy.group_defaults()
        if type(self).own_weight_decay and not isinstance(weight_decay, WeightDecay):
            decay = {
                **WeightDecay().group_defaults(),
                "weight_decay": policy.weight_decay,
                "weight_decay_policy": False,
            }
        defaults = {**defaults, **decay, "maximize": maximize}
        defaults.update(
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            state_dtype=storage_dtype_name(state_dtype),
            low_bit_min_numel=low_bit_min_numel,
        )
        validate_group(defaults)
        validate_checks(self.own_checks, defaults)
        # Before super().__init__, which calls add_param_group.
        self._buckets = BucketedExecution.for_mode(self, execution)
        self._init_low_bit_bookkeeping()
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        """torch's state (defaults, state, param groups) and the execution mode, for `copy` and `pickle`;
        low-bit state that a caller holds decoded (`state_for` outside a step) is encoded first."""
        self._encode_decoded_state()
        state = super().__getstate__()
        state["execution"] = "reference" if self._buckets is None else self._buckets.mode
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        execution = state.pop("execution", "auto")
        super().__setstate__(state)
        self._buckets = BucketedExecution.for_mode(self, execution)
        self._init_low_bit_bookkeeping()

    # ----------------------------------------------------------------------------------------------
    # Template methods

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        """Create the state tensors of `param` (the base has already set `state["step"] = 0`)."""
        raise NotImplementedError

    def step_scalars(self, state: State, group: Group) -> Scalars:
        """The numbers that change from step to step, as Python floats (float64), from `state["step"]`
        (already the number of this step) and `group` only: by default the effective rate `"lr"`.

        Subclasses add bias corrections and the like; every mapping must hold `"lr"`. A value may be
        `None` to switch a branch of `step_param` off for this step (RAdam's rectifier). Computing them
        here, not in `step_param`, is what lets the compiled path feed them in as tensors: a schedule or
        a new step then changes the inputs of the compiled update, not its code.
        """
        return {"lr": self.learning_rate(state, group)}

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        """Update `param` and `state` in place, with this step's `scalars` from `step_scalars`.

        The scalars are floats on the reference and bucketed paths and 0-d float64 tensors on the compiled
        one, so combine them with `+ - * /` and `**` only, and hand them to tensor ops as a factor, `value=`
        of `addcmul_`/`addcdiv_` or `alpha=` of `add_` (not of `sub_`: torch.compile hands that one to the
        kernel in single precision); take square roots and the like in `step_scalars`. The compiled path is
        tested against the reference for every optimizer, at 1e-12 in float64, which catches such a slip.
        """
        raise NotImplementedError

    def lr_factor(self, group: Group, k: int) -> float:
        """Multiplier of the base rate for the update after `k` completed steps (see `schedules.py`)."""
        return 1.0

    def learning_rate(self, state: State, group: Group) -> float:
        r"""The effective learning rate $\eta_t$ of the current step: base rate times schedule."""
        return float(group["lr"]) * self.lr_factor(group, state["step"] - 1)

    def begin_reduction(self) -> None:
        """Before the first pass (`reduces`): set what `step_scalars` needs for it in the groups."""

    def reduce_param(
        self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars
    ) -> dict[str, torch.Tensor]:
        """The first pass over one param (`reduces`): its contributions to optimizer-wide sums, by name. It may
        update `state`, never `param`. `grad` has `maximize` applied and no weight decay."""
        raise NotImplementedError(f"{type(self).__name__} declares reduces but does not define reduce_param")

    def end_reduction(self, totals: dict[str, float]) -> bool:
        """After the first pass: fold the sums into the groups' `group_state`; False skips the update."""
        return True

    def begin_group_step(self, group: Group) -> None:
        """Advance the group's `group_state` for the step about to be taken (once per step and group)."""

    def switch_mode(self, state: State, group: Group, param: torch.Tensor, train: bool) -> None:
        """Move `param` (real, with `state`) to the point the optimizer evaluates in `train` or eval mode."""
        raise NotImplementedError(f"{type(self).__name__} declares train_mode but does not define switch_mode")

    def train(self, mode: bool = True) -> GenericAdaptiveOptimizer:
        """Put the params where training takes its grads (for optimizers with modes; otherwise nothing)."""
        if not isinstance(mode, bool):
            raise TypeError(f"mode must be a bool, got {type(mode).__name__}")
        for group in self.param_groups:
            if "train_mode" not in group or group["train_mode"] == mode:
                continue
            for param in group["params"]:
                state = self.state.get(param)
                if state:
                    work = state.get(MASTER_WEIGHT)
                    self.switch_mode(state, group, as_real(param.data) if work is None else work, mode)
                    if work is not None:
                        param.data.copy_(work)
            group["train_mode"] = mode
        return self

    def eval(self) -> GenericAdaptiveOptimizer:
        """Put the params where the model is evaluated (for optimizers with modes; otherwise nothing)."""
        return self.train(False)

    # ----------------------------------------------------------------------------------------------
    # Param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the group as it will be, before torch.optim records anything.
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "weight_decay" in param_group and isinstance(param_group["weight_decay"], WeightDecay):
            param_group = {**param_group, **param_group["weight_decay"].group_defaults()}
        if "state_dtype" in param_group:
            param_group = {**param_group, "state_dtype": storage_dtype_name(param_group["state_dtype"])}
        fresh = {key: value for key, value in self.group_state.items() if key not in self.defaults}
        param_group = {**deepcopy(fresh), **param_group}
        params = param_group.get("params")
        if isinstance(params, Iterable) and not isinstance(params, (torch.Tensor, set, list, tuple)):
            param_group = {**param_group, "params": list(params)}  # a generator, read once here and by torch
        validate_group({**self.defaults, **param_group})
        validate_checks(self.own_checks, {**self.defaults, **param_group})
        _refuse_low_bit_dtensors({**self.defaults, **param_group})
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------------------------
    # Stepping

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step; with a `closure`, re-evaluate the loss first and return it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(group.get("train_mode") is False for group in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}.step() was called in eval mode; call optimizer.train() first")
        self._stepping = True
        try:
            if self._amp_found_inf():
                return loss
            if type(self).reduces and not self._reduce():
                return loss
            for group in self.param_groups:
                # A policy put into a group after construction stands for its plain keys: ZeroRedundancyOptimizer
                # copies the entries of its own groups into ours before every step, policies included.
                if isinstance(group.get("weight_decay"), WeightDecay):
                    group.update(group["weight_decay"].group_defaults())
                self.begin_group_step(group)
                self._step_group(group)
        finally:
            self._stepping = False
            # Low-bit state decoded by the first pass (or by a caller of `state_for`) that the update did not
            # store again: params skipped after the first pass, a step the first pass called off, an error.
            self._encode_decoded_state()
        return loss

    def _reduce(self) -> bool:
        """The optimizer-wide first pass (`reduces`): `reduce_param` over every param with a grad, summed per
        name in float64 and handed to `end_reduction` as floats (one synchronisation per name)."""
        self.begin_reduction()
        totals: dict[str, torch.Tensor] = {}

        def add(parts: Mapping[str, torch.Tensor]) -> None:
            for name, value in parts.items():
                value = value.detach().to(torch.float64).sum()
                # A sum over a DTensor shard (FSDP2) is partial: its full value is the sum over the ranks.
                full_tensor = getattr(value, "full_tensor", None)
                value = full_tensor() if callable(full_tensor) else value
                totals[name] = totals[name] + value.to(totals[name].device) if name in totals else value

        def collect(state: State, group: Group, grad: torch.Tensor, param: torch.Tensor) -> None:
            if group["maximize"]:
                grad = -grad
            add(
                self.reduce_param(
                    state, group, grad, param, self.step_scalars({**state, "step": state["step"] + 1}, group)
                )
            )

        for group in self.param_groups:
            params = group["params"]
            if self._buckets is not None and not self._needs_working_copies(group):
                params = self._buckets.reduce_group(group, collect, add)
            through_copies = self._needs_working_copies(group)
            for param, grad in self.params_with_grad(params):
                state = self.state_for(group, param)
                if through_copies:
                    # Moments the first pass writes stay decoded until the update: one rounding a step.
                    self._through_working_copies(
                        collect, state, group, as_real(grad), as_real(param), keep_decoded=True, changes_param=False
                    )
                else:
                    collect(state, group, as_real(grad), as_real(param))
        return self.end_reduction({name: float(value) for name, value in totals.items()})

    def params_with_grad(self, params: Group | Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The `(param, grad)` pairs of a group (or of some params), skipping params without a grad."""
        pairs = []
        for param in params["params"] if isinstance(params, dict) else params:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; "
                    "use torch.optim.SparseAdam for sparse embeddings"
                )
            pairs.append((param, grad))
        return pairs

    def state_for(self, group: Group, param: torch.Tensor) -> State:
        """The state of `param`, created on first use (as views into its bucket, when it has one).

        Called outside a step on a param with low-bit state, its quantized entries come back decoded to
        working tensors; what is written into them is kept, and encoded at the end of the next step (or by
        `state_dict`). Sophia's `update_hessian` relies on this.
        """
        state: State = self.state[param]
        if not state:
            self.initialize_state(state, group, param)
            if self._buckets is not None:
                self._buckets.adopt_state(param, state)
        elif any(isinstance(value, Mapping) for value in state.values()):
            self._restore_saved_codes(state, group, param)
        if not self._stepping and any(isinstance(value, QuantizedTensor) for value in state.values()):
            self._decode_for_caller(state, group, as_real(param))
        return state

    def store_state(self) -> None:
        """Store now every low-bit entry that a caller of `state_for` holds decoded (it is otherwise stored at
        the end of the next step): a method that writes state outside `step()`, such as Sophia's
        `update_hessian`, calls it when it is done, so that the state takes its low-bit memory again before the
        forward and backward passes that come first, and the next step reads it as codes, on the fast path."""
        self._encode_decoded_state()

    def _step_group(self, group: Group) -> None:
        """Step the group the way `execution` says: bucketed paths hand back the params they do not own."""
        if self._buckets is None or self._needs_working_copies(group):
            params = group["params"]
            if (
                self._buckets is not None
                and self._buckets.low_bit is not None
                and group["state_dtype"] in LOW_BIT_STATES
            ):
                params = self._step_low_bit(self._buckets.low_bit, group)
            self._step_params(group, params)
        elif leftovers := self._buckets.step_group(group):
            self._step_params(group, leftovers)

    def _step_low_bit(self, engine: LowBitExecution, group: Group) -> list[torch.Tensor]:
        """Step the params of a low-bit group whose codes the fused path can decode, update and encode in one
        pass (`low_bit_execution.py`); return the others, for the reference loop. Master weights, GradScaler's
        unscaling and stochastic rounding need the working copies of the reference loop. bf16 and fp16 params
        take the fused path on fp32 copies of a chunk at a time, rounded back to nearest as the reference loop
        rounds its copy of the whole param."""
        if group["master_weights"] or getattr(self, "grad_scale", None) is not None:
            return list(group["params"])
        leftovers = []
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            real, real_grad = as_real(param), as_real(grad)
            formats = None
            if (
                type(param) in (torch.Tensor, torch.nn.Parameter)
                and type(grad) is torch.Tensor
                and grad.layout == torch.strided
                and real.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
                and not (group["stochastic_rounding"] and real.dtype == torch.bfloat16)
                and real.is_contiguous()
                and real_grad.shape == real.shape
            ):
                formats = self._fused_low_bit_formats(group, self.state_for(group, param), real)
            if formats is None:
                leftovers.append(param)
            else:
                engine.step(group, self.state[param], real_grad, real, formats)
        return leftovers

    def _fused_low_bit_formats(self, group: Group, state: State, param: torch.Tensor) -> dict[str, Format] | None:
        """The code format of each quantized entry of `state`, if the fused path can step it: every entry the
        low-bit rule picks is stored as codes in its format, every other one is a plain tensor of the param's
        shape in its working dtype (fp32 for a bf16 param),
        and none is held decoded (a caller of `state_for` wrote into it since the last step). Else None."""
        if id(state) in self._low_bit_decoded:
            return None
        plan = self._low_bit_plan(group, param.shape, state)
        formats: dict[str, Format] = {}
        for key, value in state.items():
            if key == "step":
                continue
            if isinstance(value, QuantizedTensor):
                if key not in plan or not _same_format(value, *plan[key]) or value.shape != tuple(param.shape):
                    return None
                formats[key] = (value.bits, value.sign, value.block_size)
            elif not (
                isinstance(value, torch.Tensor)
                and key not in plan
                and value.shape == param.shape
                and value.dtype == _working_dtype(param.dtype)
                and value.is_contiguous()
            ):
                return None
        return formats if formats and len(formats) == len(plan) else None

    def _step_params(self, group: Group, params: Iterable[torch.Tensor]) -> None:
        """The reference execution: one parameter at a time."""
        through_copies = self._needs_working_copies(group)  # once: it looks at every param of the group
        for param, grad in self.params_with_grad(params):
            state = self.state_for(group, param)
            if through_copies:
                self._through_working_copies(self._step_one, state, group, as_real(grad), as_real(param))
            else:
                self._step_one(state, group, as_real(grad), as_real(param))

    def _step_one(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor) -> None:
        """Bookkeeping shared by every execution path, then the optimizer's own math."""
        state["step"] += 1
        scalars = self.step_scalars(state, group)
        if type(self).kind == "tensorwise":
            scalars = {**scalars, "extents": TensorExtents(None)}
        self.update(state, group, grad, param, scalars)

    def update(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        """The tensor part of a step (what the compiled path compiles): maximize, weight decay, the math."""
        if group["maximize"]:
            grad = -grad
        grad = apply_weight_decay(param, grad, group, scalars["lr"])
        self.step_param(state, group, grad, param, scalars)

    def compile_constants(self, group: Group) -> Group:
        """What the compiled update may bake in: the group without its params, rate and `group_state`."""
        skipped = ("params", "lr", *self.group_state)
        return {key: value for key, value in group.items() if key not in skipped}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's `zero_grad`; with `set_to_none=False`, bucketed grads are zeroed in one op per bucket."""
        if self._buckets is None or set_to_none:
            super().zero_grad(set_to_none)
        else:
            self._buckets.zero_grad()

    # ----------------------------------------------------------------------------------------------
    # Low precision: fp32 master weights, state stored in another dtype, GradScaler's unscaling.
    # Every execution path creates state through `initialize_state`, skips the whole step when
    # `_amp_found_inf()`, and steps a group for which `_needs_working_copies(group)` holds through
    # `_through_working_copies`.

    def _stores_in_other_dtype(self, group: Group) -> bool:
        """Whether some of the group's state is stored in a dtype its math does not run in: a `state_dtype`,
        or master weights for a param narrower than fp32 (for wider ones they change nothing, and the group
        keeps its buckets)."""
        if group["state_dtype"] is not None:
            return True
        return bool(group["master_weights"]) and any(
            _working_dtype(as_real(param).dtype) != as_real(param).dtype for param in group["params"]
        )

    def _rounds_stochastically(self, group: Group) -> bool:
        """Whether the group writes some of its params back with stochastic rounding: bf16 ones, under
        `stochastic_rounding` (fp32/fp64 params need no rounding, fp16 ones are not supported, and a group of
        such params keeps its buckets)."""
        return bool(group["stochastic_rounding"]) and any(
            as_real(param).dtype == torch.bfloat16 for param in group["params"]
        )

    def _needs_working_copies(self, group: Group) -> bool:
        """Whether the math must run on working copies: master weights, a storage dtype, bf16 params written back
        with stochastic rounding, or grads to unscale."""
        return (
            self._stores_in_other_dtype(group)
            or self._rounds_stochastically(group)
            or getattr(self, "grad_scale", None) is not None
        )

    def initialize_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        """Create the state of `param`: the step counter, the master weight if any, then `init_state`.

        By default `init_state` sees the param itself, so the state has the param's dtype (torch.optim's
        rule). With `master_weights` or `state_dtype` it sees the working tensor (the fp32 master, or the
        param upcast to fp32) and the state is then cast to the storage dtype; with `"8bit"`/`"4bit"` the
        entries the low-bit rule picks (class docstring) are quantized and the others keep the working dtype.
        `load_state_dict` calls this on a meta-device param to learn the names, shapes and dtypes (or code
        formats) it must find in a checkpoint.
        """
        # Before anything is created: a group whose state_dtype was made low-bit by hand since add_param_group.
        _refuse_low_bit_dtensors({**group, "params": [param]})
        state["step"] = 0
        real = as_real(param)
        work_dtype = _working_dtype(real.dtype)
        if group["state_dtype"] is None and not (group["master_weights"] and work_dtype != real.dtype):
            self.init_state(state, group, real)
            return
        if group["master_weights"] and work_dtype != real.dtype:
            state[MASTER_WEIGHT] = real.detach().to(work_dtype, copy=True)
            working = state[MASTER_WEIGHT]
        else:
            working = real.detach().to(work_dtype)
        self.init_state(state, group, working)
        quantized = self._low_bit_plan(group, real.shape, state)
        storage = _unquantized_storage(group, work_dtype)
        for key, value in state.items():
            if key == MASTER_WEIGHT or key in self.weight_like_state:
                continue
            if key in quantized:
                state[key] = _encode(value, *quantized[key], created=True)
            elif isinstance(value, torch.Tensor) and value.is_floating_point():
                state[key] = value.to(storage)

    def _through_working_copies(
        self,
        action: Callable[[State, Group, torch.Tensor, torch.Tensor], None],
        state: State,
        group: Group,
        grad: torch.Tensor,
        param: torch.Tensor,
        *,
        keep_decoded: bool = False,
        changes_param: bool = True,
    ) -> None:
        """`action` (`_step_one`, or a first pass) on working copies, whose results are then written back.

        The math runs on the master weight (or on the param upcast to fp32) with the grad unscaled and cast
        to its dtype, and on the state upcast from its storage dtype or decoded from its codes; the state is
        then rounded back into its storage (or encoded, by the group's low-bit rule as it is now) and the param
        re-derived from the master, or, without one, rounded back into its dtype: to nearest, or for a bf16
        param under `stochastic_rounding` stochastically (so are the copies of the weights in its state,
        `weight_like_state`, stored in bf16). With `keep_decoded` (a first pass) decoded entries stay decoded
        in the state until the update that follows stores them. A first pass, which never changes the param,
        passes `changes_param=False`: nothing is written back to it (and no random numbers are drawn).
        `grad` and `param` are real (`as_real`). If `action` raises, the state entries are put back as they
        were.
        """
        master = state.get(MASTER_WEIGHT)
        # Without a master: with one, the param is the master's rounding to nearest (the options exclude each
        # other at construction; this also holds for a group whose options were changed by hand since).
        stochastic = bool(group["stochastic_rounding"]) and param.dtype == torch.bfloat16 and master is None
        widened = group["master_weights"] or group["state_dtype"] is not None or stochastic
        work_dtype = _working_dtype(param.dtype) if widened else param.dtype
        work_param = master if master is not None else param.to(work_dtype)
        work_grad = self._unscaled(grad).to(work_dtype)
        decoded = self._decoded_entries(state, work_dtype)
        stored = {
            key: value
            for key, value in state.items()
            if key != MASTER_WEIGHT
            and key not in decoded
            and isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.dtype != work_dtype
        }
        before = {key: state[key] for key in decoded}
        try:
            state.update({key: value.to(work_dtype) for key, value in stored.items()})
            state.update({key: entry.tensor for key, entry in decoded.items()})
            action(state, group, work_grad, work_param)
            plan = self._low_bit_plan(group, param.shape, state)
            storage = _unquantized_storage(group, work_dtype)
            written: State = {}
            still_decoded: dict[str, _Decoded] = {}
            for key, entry in decoded.items():
                # A first pass that only read an entry (Prodigy's, LAMB's) leaves its codes as they were: the
                # update decodes them again, so no decoded copy of every param's state outlives its param.
                if key in plan and keep_decoded and not _codes_still_hold(entry, state[key], plan[key]):
                    written[key], still_decoded[key] = state[key], entry
                elif key in plan:
                    written[key] = _stored_codes(entry, state[key], plan[key])
                else:  # the group no longer quantizes it (its state_dtype was changed)
                    written[key] = state[key].to(storage)
            for key, value in stored.items():
                if key in plan:  # stored in another dtype before its group's state_dtype became low-bit
                    written[key] = _encode(state[key], *plan[key])
                elif stochastic and key in self.weight_like_state and value.dtype == torch.bfloat16:
                    # An iterate of the weights (Schedule-Free's z) loses small steps to nearest as the param does.
                    value.copy_(stochastic_round_to_bfloat16(state[key]))
                    written[key] = value
                else:
                    value.copy_(state[key])
                    written[key] = value
            for key, sign in plan.items():
                if key not in written:  # working-dtype state of a group that became low-bit
                    written[key] = _encode(state[key], *sign)
        except BaseException:
            state.update(stored)
            state.update(before)
            raise
        state.update(written)
        self._low_bit_decoded.pop(id(state), None)
        if still_decoded:
            self._low_bit_decoded[id(state)] = _PendingState(state, group, param.shape, still_decoded)
        if work_param is not param and changes_param:
            param.copy_(stochastic_round_to_bfloat16(work_param) if stochastic else work_param)

    # Low-bit state held decoded between the passes of a step, or by a caller of `state_for` outside one.

    def _init_low_bit_bookkeeping(self) -> None:
        self._stepping = False
        self._low_bit_decoded: dict[int, _PendingState] = {}
        """Per state dict (by id) whose quantized entries are held decoded: what they were decoded from."""

    def _low_bit_plan(self, group: Group, shape: torch.Size, state: State) -> dict[str, tuple[Bits, MapSign]]:
        """The entries of `state` that the group's low-bit rule stores quantized (class docstring), with the
        code width and code book of each; empty unless the group's `state_dtype` is "8bit" or "4bit"."""
        bits = LOW_BIT_STATES.get(group["state_dtype"])
        if bits is None:
            return {}
        minimum = max(int(group.get("low_bit_min_numel", LOW_BIT_MIN_NUMEL)), 1)
        if math.prod(shape) < minimum:
            return {}
        plan: dict[str, tuple[Bits, MapSign]] = {}
        for key, value in state.items():
            if key in ("step", MASTER_WEIGHT) or key in self.weight_like_state:
                continue
            if isinstance(value, QuantizedTensor):
                value_shape = value.shape
            elif isinstance(value, torch.Tensor) and value.is_floating_point():
                value_shape = tuple(value.shape)
            else:
                continue
            if value_shape != tuple(shape):
                continue  # not a per-element moment: factored, strided, or a scalar
            if key not in STATE_SIGNEDNESS:
                _warn_unknown_sign(type(self).__name__, key)
                continue
            plan[key] = (bits, select_map(key))
        return plan

    def _decoded_entries(self, state: State, work_dtype: torch.dtype) -> dict[str, _Decoded]:
        """The entries of `state` held decoded already, and its quantized ones decoded now (not yet put in)."""
        pending = self._low_bit_decoded.get(id(state))
        entries = dict(pending.entries) if pending is not None and pending.state is state else {}
        for key, value in state.items():
            if isinstance(value, QuantizedTensor):
                tensor = value.dequantize(work_dtype)
                entries[key] = _Decoded(value, tensor, tensor._version)
        return entries

    def _decode_for_caller(self, state: State, group: Group, param: torch.Tensor) -> None:
        """Put the quantized entries of `state` in decoded, to be encoded at the end of the next step."""
        entries = self._decoded_entries(state, _working_dtype(param.dtype))
        state.update({key: entry.tensor for key, entry in entries.items()})
        self._low_bit_decoded[id(state)] = _PendingState(state, group, param.shape, entries)

    def _encode_decoded_state(self) -> None:
        """Store every entry held decoded as the group's low-bit rule says (codes unchanged where untouched)."""
        pending_states, self._low_bit_decoded = list(self._low_bit_decoded.values()), {}
        for pending in pending_states:
            state, group = pending.state, pending.group
            plan = self._low_bit_plan(group, pending.shape, state)
            for key, entry in pending.entries.items():
                current = state.get(key)
                if not isinstance(current, torch.Tensor):
                    continue  # taken out or replaced by the caller with something that is not a tensor
                if key in plan:
                    state[key] = _stored_codes(entry, current, plan[key])
                else:
                    state[key] = current.to(_unquantized_storage(group, current.dtype))

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler's opt-in (torch's fused Adam uses it): when True, `scaler.step(optimizer)` does not
        unscale the grads in place but sets `optimizer.grad_scale` and `optimizer.found_inf` and calls
        `step()`, which then skips itself on an inf/nan and unscales each grad into its working dtype.

        We opt in only when a group keeps master weights: GradScaler refuses to unscale fp16 grads in
        place (`allow_fp16=False`, fp16 is too narrow for unscaled grads), but with master weights the
        unscaled grad never has to exist in fp16, only in fp32, so nothing about GradScaler is overridden.
        """
        return any(group["master_weights"] for group in self.param_groups)

    def _amp_found_inf(self) -> bool:
        """True when GradScaler found an inf/nan in the grads: the step must then change nothing."""
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.item())

    def _unscaled(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad` divided by GradScaler's scale, when the scaler left the unscaling to `step()`."""
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            return grad
        # GradScaler.unscale_'s own inverse and a multiplication in at least fp32, so both paths agree bitwise.
        inverse = scale.double().reciprocal().float().to(grad.device)
        wide = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        return wide.mul(inverse)

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def _restore_saved_codes(self, state: State, group: Group, param: torch.Tensor) -> None:
        """Turn the entries of `state` that hold saved codes (`QuantizedTensor.state_dict()`) back into
        `QuantizedTensor`s on the param's device, converted to how the group stores them as `load_state_dict`
        converts them (with a `StateConversionWarning`).

        ZeroRedundancyOptimizer.load_state_dict does not call the local optimizer's `load_state_dict`: it puts
        each saved param state of its rank's share into `optim.state` as it is, so low-bit entries arrive in
        their checkpoint form, possibly of another width than the group's. A dict that is not valid codes
        raises `ValueError` here, at the first step that reads it."""
        template = self._state_template(group, param)
        conversions: list[str] = []
        for key, value in list(state.items()):
            if key in template and isinstance(value, Mapping) and _holds_codes(value):
                where = "loaded by ZeroRedundancyOptimizer"
                state[key] = _load_low_bit(where, key, value, template[key], param.device, conversions)
        if conversions:
            warnings.warn(
                f"{type(self).__name__} converted {len(conversions)} state entries that another optimizer put into "
                f"its state to how it stores them (its state_dtype and low_bit_min_numel): {'; '.join(conversions)}",
                StateConversionWarning,
                stacklevel=3,
            )

    def _state_template(self, group: Group, param: torch.Tensor) -> State:
        """What `init_state` would create for `param`, on the meta device: names, shapes and dtypes."""
        template: State = {}
        self.initialize_state(template, group, param.detach().to("meta"))
        return template

    def state_dict(self) -> dict[str, Any]:
        """torch's `state_dict`, without the functions a param group may hold (ADOPT's `clip_lambda`): a
        checkpoint holds data only, so `torch.load`'s default `weights_only=True` reads it, and the optimizer
        that loads it keeps its own functions (`load_state_dict` keeps what the saved groups lack).

        Low-bit state is saved as `QuantizedTensor.state_dict()`: a dict of its uint8 codes and float32 block
        scales (tensors) and its shape, bit width, code book name and block size (a list, ints, a string),
        also read by `torch.load(weights_only=True)`. Entries held decoded (`state_for` outside a step) are
        encoded first, in the optimizer too, so that a run resumed from the checkpoint continues bitwise."""
        self._encode_decoded_state()
        saved = super().state_dict()
        saved["param_groups"] = [
            {key: value for key, value in group.items() if not callable(value)} for group in saved["param_groups"]
        ]
        saved["state"] = {
            saved_id: {
                key: value.state_dict() if isinstance(value, QuantizedTensor) else value
                for key, value in param_state.items()
            }
            if isinstance(param_state, Mapping)
            else param_state
            for saved_id, param_state in saved["state"].items()
        }
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ours or of the matching `torch.optim` optimizer.

        Everything is checked before anything changes: a state dict that does not fit raises `ValueError`
        and leaves the optimizer exactly as it was. State tensors keep the dtype `init_state` gives them
        (they are not rounded through a low-precision parameter dtype) and move to the parameter's device.
        The step counter becomes an `int` whatever it was stored as (torch stores a float32 tensor).
        Hyper-parameters missing from the saved groups (such as ours in a torch checkpoint) keep their
        current values, and so do the storage options (`KEPT_ON_LOAD`): a run saved with master weights
        or bf16 state can resume without them and vice versa; a missing master is taken from the param,
        a saved one that is not wanted is dropped (the param is its rounding).

        Low-bit codes load as they are where this optimizer stores the entry in the same format, which is
        what resumes bitwise. Elsewhere they are converted, with one `StateConversionWarning` naming every
        entry converted: codes into a dtype (decoded), a tensor into codes (quantized), codes of another
        width into this optimizer's (decoded, then quantized).
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a mapping with the keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        new_groups: list[Group] = []
        param_of_id: dict[Any, tuple[torch.Tensor, Group]] = {}
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {index} has {len(saved['params'])} params in the state_dict "
                    f"and {len(group['params'])} in this optimizer"
                )
            merged = {**group, **{k: deepcopy(v) for k, v in saved.items() if k not in KEPT_ON_LOAD}}
            merged["params"] = group["params"]
            try:
                validate_group(merged)
                validate_checks(self.own_checks, merged)
            except (TypeError, ValueError) as error:
                raise ValueError(f"param group {index} of the state_dict: {error}") from error
            new_groups.append(merged)
            for saved_id, param in zip(saved["params"], group["params"], strict=True):
                param_of_id[saved_id] = (param, merged)

        new_state: defaultdict[torch.Tensor, State] = defaultdict(dict)
        conversions: list[str] = []
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in param_of_id:
                raise ValueError(f"state_dict has state for param id {saved_id!r}, which is in no group")
            param, group = param_of_id[saved_id]
            new_state[param] = self._load_param_state(saved_id, saved_state, group, param, conversions)

        self.state = new_state
        self._low_bit_decoded.clear()  # what was held decoded belonged to the state just replaced
        for group, merged in zip(self.param_groups, new_groups, strict=True):
            group.clear()
            group.update(merged)
        if conversions:
            shown = "; ".join(conversions[:8]) + (f"; and {len(conversions) - 8} more" if len(conversions) > 8 else "")
            warnings.warn(
                f"{type(self).__name__}.load_state_dict converted {len(conversions)} state entries to how this "
                f"optimizer stores them (its state_dtype and low_bit_min_numel): {shown}",
                StateConversionWarning,
                stacklevel=2,
            )
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_param_state(
        self, saved_id: Any, saved: Mapping[str, Any], group: Group, param: torch.Tensor, conversions: list[str]
    ) -> State:
        template = self._state_template(group, param)
        if MASTER_WEIGHT in template and MASTER_WEIGHT not in saved:
            # A checkpoint taken without master weights: the param is the best master there is.
            saved = {**saved, MASTER_WEIGHT: as_real(param).detach()}
        elif MASTER_WEIGHT in saved and MASTER_WEIGHT not in template:
            saved = {key: value for key, value in saved.items() if key != MASTER_WEIGHT}
        if set(saved) != set(template):
            missing = sorted(set(template) - set(saved))
            unexpected = sorted(set(saved) - set(template))
            raise ValueError(
                f"state of param {saved_id!r} does not fit {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        loaded: State = {}
        for key, value in saved.items():
            expected = template[key]
            if key == "step":
                loaded[key] = _step_to_int(saved_id, value)
            elif isinstance(expected, QuantizedTensor) or _holds_codes(value):
                loaded[key] = _load_low_bit(saved_id, key, value, expected, param.device, conversions)
            elif isinstance(expected, torch.Tensor):
                if isinstance(value, torch.Tensor) and value.is_complex():
                    value = torch.view_as_real(value)  # torch.optim keeps a complex param's state complex
                if not isinstance(value, torch.Tensor) or value.shape != expected.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(
                        f"state {key!r} of param {saved_id!r} has shape {shape}, expected {tuple(expected.shape)}"
                    )
                loaded[key] = value.to(device=param.device, dtype=expected.dtype, copy=True)
            else:
                loaded[key] = deepcopy(value)
        return loaded


def _is_dtensor(param: object) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def _refuse_low_bit_dtensors(group: Mapping[str, Any]) -> None:
    """`ValueError` for a group with "8bit"/"4bit" state and a DTensor param (FSDP2's `fully_shard`, tensor
    parallelism), before the optimizer records the group or creates state.

    The codes and block scales of a shard would be plain tensors of the rank's local rows: torch.distributed.
    checkpoint could neither save them as parts of one tensor nor reshard them, and the blocks (256 or 128
    elements of the flattened local shard) would not be the blocks of the whole tensor, so a run would depend
    on the number of ranks. Plain params under DDP and ZeroRedundancyOptimizer (whole params per rank) are
    not affected."""
    name = group.get("state_dtype")
    if name not in LOW_BIT_STATES:
        return
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else params
    sharded = [index for index, param in enumerate(params) if _is_dtensor(param)]
    if sharded:
        raise ValueError(
            f"state_dtype={name!r} does not support DTensor params (FSDP2's fully_shard, tensor parallelism): "
            f"params {sharded} of the group are DTensors, whose low-bit codes would be per-shard blocks that "
            "torch.distributed.checkpoint cannot save or reshard. Put the sharded params in a group with "
            "state_dtype=torch.bfloat16 or without state_dtype, or use low-bit state only for params that are "
            "not sharded (DDP and ZeroRedundancyOptimizer support it)"
        )


def _holds_codes(value: Any) -> bool:
    """Whether a saved state entry is low-bit codes: a `QuantizedTensor` or its `state_dict()`."""
    return isinstance(value, QuantizedTensor) or (isinstance(value, Mapping) and set(value) == QUANTIZED_STATE_KEYS)


def _describe(value: QuantizedTensor | torch.Tensor) -> str:
    return f"{value.bits}-bit codes" if isinstance(value, QuantizedTensor) else str(value.dtype)


def _load_low_bit(
    saved_id: Any, key: str, value: Any, expected: Any, device: torch.device, conversions: list[str]
) -> QuantizedTensor | torch.Tensor:
    """A saved entry where codes are saved or wanted: the codes as they are if their format is the one wanted,
    else converted (noted in `conversions`); `ValueError` for codes that do not decode or do not fit."""
    where = f"state {key!r} of param {saved_id!r}"
    saved: QuantizedTensor | torch.Tensor
    if isinstance(value, QuantizedTensor):
        saved = value
    elif isinstance(value, Mapping):
        try:
            saved = QuantizedTensor.from_state_dict(value)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
    elif isinstance(value, torch.Tensor) and value.is_floating_point():
        saved = value
    elif isinstance(value, torch.Tensor) and value.is_complex():
        saved = torch.view_as_real(value)  # torch.optim keeps a complex param's state complex
    else:
        raise ValueError(f"{where} is a {type(value).__name__}, expected a float tensor or low-bit codes")
    if not isinstance(expected, (QuantizedTensor, torch.Tensor)) or not (
        isinstance(expected, QuantizedTensor) or expected.is_floating_point()
    ):
        raise ValueError(f"{where} holds low-bit codes where this optimizer keeps a {type(expected).__name__}")
    saved_shape, expected_shape = tuple(saved.shape), tuple(expected.shape)
    if saved_shape != expected_shape:
        raise ValueError(f"{where} has shape {saved_shape}, expected {expected_shape}")
    if (
        isinstance(expected, QuantizedTensor)
        and isinstance(saved, QuantizedTensor)
        and _same_format(saved, expected.bits, expected.sign)
    ):
        # The format this optimizer encodes (`_encode`: the papers' block size) is the checkpoint's: as it is.
        codes = saved.codes.to(device=device, copy=True)
        scales = saved.scales.to(device=device, copy=True)
        return QuantizedTensor(codes, scales, saved.shape, saved.bits, saved.sign, saved.block_size)
    converted: QuantizedTensor | torch.Tensor
    if isinstance(expected, QuantizedTensor):
        values = saved.dequantize() if isinstance(saved, QuantizedTensor) else saved
        converted = _encode(values.to(device), expected.bits, expected.sign)
        target = f"{expected.bits}-bit {expected.sign} codes"
    else:
        converted = _decoded_on(saved, device).to(dtype=expected.dtype, copy=True)
        target = str(expected.dtype)
    conversions.append(f"{key} of param {saved_id!r} from {_describe(saved)} to {target}")
    return converted


def _decoded_on(saved: QuantizedTensor | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The float32 values of saved codes (or a saved tensor itself), on `device`."""
    if isinstance(saved, QuantizedTensor):
        codes = saved.codes.to(device)
        moved = QuantizedTensor(codes, saved.scales.to(device), saved.shape, saved.bits, saved.sign, saved.block_size)
        return moved.dequantize()
    return saved.to(device)


def _step_to_int(saved_id: Any, value: Any) -> int:
    number = value.item() if isinstance(value, torch.Tensor) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0 or number != int(number):
        raise ValueError(f"step of param {saved_id!r} must be a whole number >= 0, got {value!r}")
    return int(number)


KEPT_ON_LOAD = ("params", "master_weights", "stochastic_rounding", "state_dtype", "low_bit_min_numel")
"""Group entries that `load_state_dict` keeps from the optimizer: how state is stored, and how the params are
rounded, is the run's choice. `stochastic_rounding` belongs with `master_weights`: both say how a low-precision
param keeps its small updates, which depends on the job's precision setup, not on the trajectory saved (no
state depends on it); and taking one from the checkpoint while keeping the other could bring together the two
that exclude each other."""

MASTER_WEIGHT = "master_weight"
"""State key of the fp32 master copy of a low-precision param (`master_weights=True`)."""

STORAGE_DTYPES = ("float32", "bfloat16")
"""The dtypes `state_dtype` may be. Not float16: the second moments (grad squared) leave its range."""

LOW_BIT_STATES: dict[str, Bits] = {"8bit": 8, "4bit": 4}
"""The low-bit values of `state_dtype` and their code widths (`quantization.py`; blocks of 256 and 128)."""


class StateConversionWarning(UserWarning):
    """`load_state_dict` converted state between low-bit codes and a dtype (the message names what)."""


def storage_dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """`state_dtype` as the group stores it: a name such as "bfloat16" or "8bit", so groups hold only primitives."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        raise TypeError(
            f"state_dtype must be a torch.dtype, '8bit', '4bit' or None, got {type(dtype).__name__} {dtype!r}"
        )
    if name not in STORAGE_DTYPES and name not in LOW_BIT_STATES:
        choices = ", ".join([*(f"torch.{name}" for name in STORAGE_DTYPES), *map(repr, LOW_BIT_STATES)])
        raise ValueError(f"state_dtype must be one of {choices} or None, got {dtype!r}")
    return name


class _Decoded(NamedTuple):
    """A quantized state entry held decoded: its codes, the working tensor they decoded to, and that tensor's
    version counter then (torch bumps it at every in-place write), which tells whether the step changed it."""

    original: QuantizedTensor | None
    tensor: torch.Tensor
    version: int


class _PendingState(NamedTuple):
    """A state dict with entries held decoded between the passes of a step or for a caller of `state_for`."""

    state: State
    group: Group
    shape: torch.Size
    entries: dict[str, _Decoded]


def _encode(value: torch.Tensor, bits: Bits, sign: MapSign, *, created: bool = False) -> QuantizedTensor:
    """`value` block-wise quantized with the papers' block size; on the meta device only the format.

    A state just `created` keeps its all-zero blocks exactly zero: their scale is 0 rather than the floor
    1e-12, so the 4-bit map without zero decodes them to 0, not to 1e-12/16 (torchao's `OptimState4bit.zeros`
    does the same), and a zero-initialized moment starts where fp32 state starts. Later encodings follow the
    module's rule."""
    if value.device.type != "meta":
        quantized = quantize(value, bits=bits, sign=sign)
        if created:
            blocks = F.pad(value.detach().reshape(-1), (0, -value.numel() % quantized.block_size))
            quantized.scales.masked_fill_(blocks.view(-1, quantized.block_size).eq(0).all(dim=1), 0.0)
        return quantized
    numel, block_size = value.numel(), DEFAULT_BLOCK_SIZES[bits]
    codes = torch.empty(numel if bits == 8 else -(-numel // 2), dtype=torch.uint8, device="meta")
    scales = torch.empty(-(-numel // block_size), dtype=torch.float32, device="meta")
    return QuantizedTensor(codes, scales, tuple(value.shape), bits, sign, block_size)


def _same_format(quantized: QuantizedTensor, bits: Bits, sign: MapSign) -> bool:
    return (quantized.bits, quantized.sign, quantized.block_size) == (bits, sign, DEFAULT_BLOCK_SIZES[bits])


def _stored_codes(entry: _Decoded, current: torch.Tensor, format_: tuple[Bits, MapSign]) -> QuantizedTensor:
    """What a decoded entry is stored as: its old codes if it is still the tensor they decoded to, unwritten,
    and in the format wanted (decoding and encoding again is not the identity: a block's scale would shrink
    to its largest decoded magnitude), else the codes of `current`."""
    if _codes_still_hold(entry, current, format_):
        assert entry.original is not None
        return entry.original
    return _encode(current, *format_)


def _codes_still_hold(entry: _Decoded, current: torch.Tensor, format_: tuple[Bits, MapSign]) -> bool:
    """Whether a decoded entry's old codes are what it is stored as: `current` is still the tensor they decoded
    to, unwritten since, and they are in the format wanted."""
    original = entry.original
    return (
        original is not None
        and current is entry.tensor
        and current._version == entry.version
        and _same_format(original, *format_)
    )


def _unquantized_storage(group: Group, work_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the state entries a group does not quantize: its `state_dtype` if that is a dtype, else
    the working dtype (fp32, or the param's if wider)."""
    name = group["state_dtype"]
    return work_dtype if name is None or name in LOW_BIT_STATES else cast(torch.dtype, getattr(torch, name))


_WARNED_UNKNOWN_SIGN: set[tuple[str, str]] = set()


def _warn_unknown_sign(owner: str, key: str) -> None:
    if (owner, key) not in _WARNED_UNKNOWN_SIGN:
        _WARNED_UNKNOWN_SIGN.add((owner, key))
        warnings.warn(
            f"{owner}'s state {key!r} is shaped like its param but has no code book in "
            "adaptopt.quantization.STATE_SIGNEDNESS (signed or unsigned); it is kept unquantized",
            stacklevel=3,
        )


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for a param of `dtype` with master weights: at least fp32."""
    return torch.float32 if dtype.itemsize < 4 else dtype


def as_real(tensor: torch.Tensor) -> torch.Tensor:
    """Complex tensors are optimized as real tensors with a trailing dimension of 2 (torch.optim's rule)."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor
