"""What the ranks of the distributed tests run, and the single-process runs they are compared with.

`tests/test_distributed.py` runs `run_scenario` in WORLD_SIZE processes with `adaptopt.distributed.launch`
(gloo on CPU, 127.0.0.1 only); the functions live here, in a module of their own, because the spawned
processes import them by name. Each scenario trains every case of `CASES` (every adaptopt optimizer, with
its weight-decay policy; `ZERO_CASES` and `FSDP_CASES` where the sharding changes what can be compared)
under one kind of data parallelism, each rank taking its half of every global batch, and returns what
every rank ended with; the test compares that with `single_process_run`, which trains the same model on
the whole batch with no process group. Everything is float64 so that the only
differences left are the summation orders of the gradient reductions.

Batching every optimizer into one launch keeps the cost of starting processes (importing torch, forming
the group) to once per scenario.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import adaptopt
from adaptopt import WeightDecay
from adaptopt.distributed import average_gradients, data_parallel, rank_share, world_size

IN_FEATURES, HIDDEN, CLASSES = 6, 8, 3
GLOBAL_BATCH = 8
WORLD_SIZE = 2
STEPS_BEFORE_CHECKPOINT, STEPS_AFTER_CHECKPOINT = 6, 4
STEPS = STEPS_BEFORE_CHECKPOINT + STEPS_AFTER_CHECKPOINT
HESSIAN_EVERY = 2
"""Sophia estimates its Hessian every second step, so both halves of a resumed run contain estimates."""

EXECUTIONS = ("default", "reference", "compiled")
""""default" leaves the choice to the optimizer ("auto": contiguous buckets, where params allow them, eager
in runs this short); "reference" forces the plain loop over params; "compiled" the buckets under
torch.compile, which must then compile: its warning that it fell back to eager is an error here."""

warnings.filterwarnings("error", message=r"adaptopt: torch\.compile")


def every_param(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


def matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D params, Muon's (the biases are left alone: ZeRO's Muon case trains the weights only)."""
    return [param for param in model.parameters() if param.dim() == 2]


@dataclass(frozen=True)
class Case:
    """One optimizer with hyper-parameters chosen so that its schedule and weight decay matter in STEPS.

    `optimizer_class` is an optimizer class or a factory of the registry (`muon_with_adamw`); `params` picks
    the params it is given from the model (all of them, but for ZeRO's Muon)."""

    label: str
    optimizer_class: Callable[..., torch.optim.Optimizer]
    hyperparams: dict[str, Any] = field(default_factory=dict)
    params: Callable[[nn.Module], list[nn.Parameter]] = every_param

    def kwargs(self, execution: str) -> dict[str, Any]:
        return self.hyperparams if execution == "default" else {**self.hyperparams, "execution": execution}

    def make(self, params: Any, execution: str) -> torch.optim.Optimizer:
        return self.optimizer_class(params, **self.kwargs(execution))

    def build(self, model: nn.Module, execution: str) -> torch.optim.Optimizer:
        """The optimizer over `model`'s params that this case trains."""
        return self.make(self.params(model), execution)

    @property
    def estimates_hessian(self) -> bool:
        return isinstance(self.optimizer_class, type) and issubclass(self.optimizer_class, adaptopt.Sophia)


CASES: tuple[Case, ...] = (
    Case("adam", adaptopt.Adam, dict(lr=1e-2, weight_decay=WeightDecay(0.1))),
    Case(
        "adam_torch_form_l2",
        adaptopt.Adam,
        dict(lr=1e-2, eps=1e-8, optimized_update=False, weight_decay=WeightDecay(0.05, weight_decouple=False)),
    ),
    Case("amsgrad", adaptopt.AMSGrad, dict(lr=1e-2, weight_decay=WeightDecay(0.01, absolute=True))),
    Case("adam_warmup", adaptopt.AdamWarmup, dict(lr=1e-2, warmup=4)),
    Case(
        "adam_warmup_cosine_decay",
        adaptopt.AdamWarmupCosineDecay,
        dict(lr=1e-2, warmup=2, total_steps=STEPS, weight_decay=WeightDecay(0.02, l1=True)),
    ),
    Case("noam", adaptopt.Noam, dict(lr=1.0, warmup=3, d_model=16)),
    # RAdam's rectification switches on at step 6 with beta2 = 0.999: both regimes are in the run.
    Case("radam", adaptopt.RAdam, dict(lr=1e-2, weight_decay=0.1)),
    Case("adabelief", adaptopt.AdaBelief, dict(lr=1e-2, weight_decay=WeightDecay(0.05, weight_decouple=False))),
    Case("sophia", adaptopt.Sophia, dict(lr=1e-2, rho=0.05, weight_decay=WeightDecay(0.1))),
    # Floats with each reference's own meaning (`own_weight_decay`), which ZeRO copies into the groups again.
    Case("lion", adaptopt.Lion, dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, decoupled_weight_decay=True)),
    # ADOPT's first step only initialises v: the other nine update.
    Case("adopt", adaptopt.ADOPT, dict(lr=1e-2, weight_decay=0.05, decouple=True)),
    Case("ademamix", adaptopt.AdEMAMix, dict(lr=1e-2, alpha_warmup=4, beta3_warmup=6, weight_decay=0.1)),
    # Its per-group state (k, the weight sum) must travel with ZeRO's groups and FSDP's checkpoints.
    Case(
        "schedule_free_adamw",
        adaptopt.ScheduleFreeAdamW,
        dict(lr=1e-2, warmup_steps=3, weight_decay=0.01),
    ),
    # d grows from d0 within the run; its sums are over every param.
    Case("prodigy", adaptopt.Prodigy, dict(lr=1.0, d0=1e-4, weight_decay=WeightDecay(0.01))),
    # apex's decay inside the trust ratio, and a global-norm clipping that acts at every step here.
    Case("lamb", adaptopt.LAMB, dict(lr=1e-2, weight_decay=0.01, max_grad_norm=0.5)),
    Case("adafactor", adaptopt.Adafactor, dict(lr=1e-2, weight_decay=WeightDecay(0.01))),
    # The registry's muon: Muon for the two weights, AdamW for the biases.
    Case("muon", adaptopt.muon_with_adamw, dict(lr=1e-2, weight_decay=0.01)),
)
"""The cases of DDP (and of the single process they are compared with)."""

ZERO_REPLACED: dict[str, Case] = {
    # Each rank's optimizer holds its share of the params: Prodigy's sums must be all-reduced over the ranks,
    # which `fsdp_in_use=True` does (without it each rank estimates d from its share: measured 1.3e-2 off).
    "prodigy": Case(
        "prodigy_fsdp_in_use", adaptopt.Prodigy, dict(lr=1.0, d0=1e-4, weight_decay=WeightDecay(0.01), fsdp_in_use=True)
    ),
    # LAMB's clipping takes the norm of the rank's share of the grads, not of all of them, and LAMB has nothing
    # to all-reduce it with (measured: 6.6e-3 off with max_grad_norm=0.5): under ZeRO, without the clipping.
    "lamb": Case("lamb_unclipped", adaptopt.LAMB, dict(lr=1e-2, weight_decay=0.01, max_grad_norm=None)),
    # ZeroRedundancyOptimizer builds `optimizer_class(param_groups, **defaults)` on each rank: muon_with_adamw,
    # which splits params and returns a MuonWithAdamW, cannot be it. Muon itself can, over the matrices.
    "muon": Case("muon_matrices", adaptopt.Muon, dict(lr=1e-2, weight_decay=0.01), params=matrices),
}
ZERO_CASES: tuple[Case, ...] = tuple(ZERO_REPLACED.get(case.label, case) for case in CASES)
"""The cases of ZeroRedundancyOptimizer: CASES, but where the rank's share of the params changes the math."""

FSDP_UNSUPPORTED: dict[str, str] = {}
"""Optimizers that fail under FSDP2's DTensor params, with the reason (the test checks that these and FSDP_CASES
cover them all). None: the base sums a first pass's partial DTensor totals over the ranks (LAMB's global norm,
Prodigy's estimate), and the optimizers replicate their reductions (`functional.replicated`) before any scalar meets
them, which torch 2.7's DTensor would otherwise have cached from the first step (Prodigy, Adafactor)."""
FSDP_REPLACED: dict[str, Case] = {
    # The registry's muon, its state dict read and written by torch.distributed.checkpoint, with its Newton-Schulz
    # in float64: on shards DTensor sums the products in another order, which in bfloat16 ends 4e-2 away from
    # one process (an equally valid rounding), in float64 at rounding.
    "muon": Case(
        "muon_float64_newton_schulz",
        adaptopt.muon_with_adamw,
        dict(lr=1e-2, weight_decay=0.01, ns_dtype=torch.float64),
    ),
}
FSDP_CASES: tuple[Case, ...] = tuple(
    FSDP_REPLACED.get(case.label, case) for case in CASES if case.label not in FSDP_UNSUPPORTED
)
"""The cases of FSDP2."""
LOW_BIT_CASES: tuple[Case, ...] = tuple(
    Case(
        f"{case.label}_{width}",
        case.optimizer_class,
        {**case.hyperparams, "state_dtype": width, "low_bit_min_numel": 0},
    )
    for case in CASES
    if case.label in ("adam", "lion")
    for width in ("8bit", "4bit")
)
"""Adam and Lion with block-wise 8- and 4-bit moments, under DDP and ZeroRedundancyOptimizer (FSDP2 refuses them).
`low_bit_min_numel=0` quantizes every moment: the model's tensors are far below the default 4096 elements."""
LOW_BIT_EXECUTIONS = ("default", "reference")
"""The low-bit groups: the fused low-bit path ("default") and the decode-step-encode loop ("reference")."""
ALL_CASES: tuple[Case, ...] = tuple(
    {case.label: case for case in (*CASES, *ZERO_CASES, *FSDP_CASES, *LOW_BIT_CASES)}.values()
)


ADDED_GROUPS_CASE = Case("adam_added_groups", adaptopt.Adam, dict(lr=1e-2, weight_decay=WeightDecay(0.1)))


def with_added_groups(model: nn.Module, make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Any:
    """An optimizer built over the first weight only, given the other params by `add_param_group`.

    The first bias comes without a weight decay, so the optimizer fills in its default, a policy; the last
    layer comes with a policy of its own. ZeroRedundancyOptimizer copies both, as policy objects, into
    the local optimizer's groups.
    """
    first_weight, first_bias, *last_layer = model.parameters()
    optimizer = make([first_weight])
    optimizer.add_param_group({"params": [first_bias]})
    optimizer.add_param_group({"params": last_layer, "weight_decay": WeightDecay(0.05, weight_decouple=False)})
    return optimizer


def covered_optimizers(cases: tuple[Case, ...] = CASES) -> set[str]:
    """The registry names the cases cover (the test checks that this is every adaptopt optimizer); Muon alone
    stands for `muon`, whose factory splits the params between it and AdamW."""
    classes = {case.optimizer_class for case in cases}
    if adaptopt.Muon in classes:
        classes.add(adaptopt.muon_with_adamw)
    return {name for name in adaptopt.available() if adaptopt.describe(name).factory in classes}


def build_model() -> nn.Module:
    """The same float64 MLP in every process. The last layer has 3 rows: FSDP shards it unevenly (2 + 1)."""
    generator = torch.Generator().manual_seed(1234)
    model = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).double()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.5)
    return model


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    uniforms: torch.Tensor
    """Draws in [0, 1) that pick the labels of Sophia's Hessian estimate from the model's own softmax."""

    def head(self, rows: int) -> Batch:
        return Batch(self.inputs[:rows], self.targets[:rows], self.uniforms[:rows])

    def share(self) -> Batch:
        """This rank's contiguous share of the global batch (all of it without a process group)."""
        return Batch(rank_share(self.inputs), rank_share(self.targets), rank_share(self.uniforms))


def global_batch(step: int) -> Batch:
    generator = torch.Generator().manual_seed(10_000 + step)
    return Batch(
        torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=generator, dtype=torch.float64),
        torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=generator),
        torch.rand(GLOBAL_BATCH, generator=generator, dtype=torch.float64),
    )


def sampled_labels(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Labels drawn from softmax(logits) by inverting its CDF at `uniforms`.

    Sophia's Gauss-Newton-Bartlett estimate needs labels sampled from the model. Drawing them from
    per-example uniforms fixed in advance (instead of a generator's state) gives every example the same
    label whether it is on rank 0, rank 1 or in the single-process run.
    """
    cdf = logits.detach().softmax(dim=-1).cumsum(dim=-1)
    return torch.searchsorted(cdf, uniforms.unsqueeze(-1)).squeeze(-1).clamp_(max=CLASSES - 1)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    case: Case,
    steps: range,
    *,
    hessian_optimizer: adaptopt.GenericAdaptiveOptimizer | None = None,
    set_to_none: bool = True,
    rows: int = GLOBAL_BATCH,
    average: bool = False,
) -> None:
    """Train over `steps` of the global schedule; each rank sees its share of every global batch.

    Under data parallelism the gradient is the mean over the *global* batch (DDP and FSDP average the
    ranks' means), so Sophia's `update_hessian` is given the global batch size. `set_to_none=False`
    keeps the grad tensors from step to step: the bucketed execution then owns them (or, under DDP's
    gradient_as_bucket_view, must leave DDP's views alone).

    `rows` uses only the first rows of each global batch (so that it splits unevenly); `average` averages
    the grads with `average_gradients` instead of relying on a DDP/FSDP model. A rank with an empty
    share skips the backward (the mean over no examples is NaN).
    """
    for step in steps:
        batch = global_batch(step).head(rows).share()
        if len(batch.targets):
            F.cross_entropy(model(batch.inputs), batch.targets).backward()
        if average:
            average_gradients(model.parameters(), len(batch.targets))
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)
        if case.estimates_hessian and step % HESSIAN_EVERY == HESSIAN_EVERY - 1:
            if len(batch.targets):
                logits = model(batch.inputs)
                F.cross_entropy(logits, sampled_labels(logits, batch.uniforms)).backward()
            if average:
                average_gradients(model.parameters(), len(batch.targets))
            target = hessian_optimizer if hessian_optimizer is not None else optimizer
            assert isinstance(target, adaptopt.Sophia)
            target.update_hessian(rows)
            optimizer.zero_grad(set_to_none=set_to_none)


def added_groups_single_process_run() -> dict[str, torch.Tensor]:
    model = build_model()
    optimizer = with_added_groups(model, lambda params: ADDED_GROUPS_CASE.make(params, "default"))
    train(model, optimizer, ADDED_GROUPS_CASE, range(STEPS))
    return _detached(model.state_dict())


def single_process_run(case: Case, rows: int = GLOBAL_BATCH) -> tuple[dict[str, torch.Tensor], dict[Any, Any]]:
    """The oracle: the whole batch in one process; final parameters and optimizer state."""
    model = build_model()
    optimizer = case.build(model, "default")
    train(model, optimizer, case, range(STEPS), rows=rows)
    return _detached(model.state_dict()), per_param_state(optimizer.state_dict())


def per_param_state(state_dict: dict[str, Any]) -> dict[Any, Any]:
    """The per-param state of a state dict, by param index."""
    state: dict[Any, Any] = state_dict["state"]
    return state


def _detached(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def _full(value: Any) -> Any:
    """A DTensor gathered into a plain tensor (a collective: every rank must call it in the same order)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


def _full_state(state: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {index: {key: _full(value) for key, value in entry.items()} for index, entry in sorted(state.items())}


def _runs(cases: tuple[Case, ...] = CASES, executions: tuple[str, ...] = EXECUTIONS) -> Iterator[tuple[str, Case, str]]:
    for execution in executions:
        for case in cases:
            yield f"{case.label}/{execution}", case, execution


# --------------------------------------------------------------------------------------------------
# Scenarios: each returns {key: result}; the test reads the keys documented here.


DDP_GRAD_MODES = tuple((bucket_view, set_to_none) for bucket_view in (False, True) for set_to_none in (True, False))
"""(gradient_as_bucket_view, zero_grad's set_to_none): whose tensors the grads are, DDP's or autograd's."""


AVERAGED_ROWS = (GLOBAL_BATCH - 1, 1)
"""Batches of 7 split 4 + 3; a batch of 1 leaves rank 1 with nothing."""


def scenario_ddp(out: Path) -> dict[str, Any]:
    """DDP in each of DDP_GRAD_MODES: final params and optimizer state of every case.

    Also, without DDP, `average_gradients` over batches that split unevenly (AVERAGED_ROWS), and what the
    helpers saw: the world size, the wrapper `data_parallel` chose, the shares `rank_share` gave.
    """
    results: dict[str, Any] = {
        "world_size": world_size(),
        "shares": {rows: rank_share(torch.arange(rows)).tolist() for rows in AVERAGED_ROWS},
    }
    for rows, case in itertools.product(AVERAGED_ROWS, CASES):
        model = build_model()
        optimizer = case.build(model, "default")
        train(model, optimizer, case, range(STEPS), rows=rows, average=True)
        results[f"{case.label}/average_gradients/rows={rows}"] = {
            "params": _detached(model.state_dict()),
            "state": _full_state(per_param_state(optimizer.state_dict())),
        }
    return {**results, **_ddp_results(_runs())}


def _ddp_results(runs: Iterator[tuple[str, Case, str]]) -> dict[str, Any]:
    """The runs under DDP in each of DDP_GRAD_MODES: the wrapper, final params and optimizer state."""
    results: dict[str, Any] = {}
    for key, case, execution in runs:
        for bucket_view, set_to_none in DDP_GRAD_MODES:
            model = data_parallel(build_model(), gradient_as_bucket_view=bucket_view)
            optimizer = case.build(model, execution)
            train(model, optimizer, case, range(STEPS), set_to_none=set_to_none)
            results[f"{key}/bucket_view={bucket_view}/set_to_none={set_to_none}"] = {
                "wrapper": type(model).__name__,
                "params": _detached(model.module.state_dict()),
                "state": _full_state(per_param_state(optimizer.state_dict())),
            }
    return results


def scenario_zero(out: Path) -> dict[str, Any]:
    """DDP + ZeroRedundancyOptimizer(optimizer_class=adaptopt.X, **hyperparams) (`_zero_results`), and the
    case whose groups are added after construction."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    results = _zero_results(_runs(ZERO_CASES))
    for execution in EXECUTIONS:
        model = data_parallel(build_model())
        make_zero = functools.partial(
            ZeroRedundancyOptimizer,
            optimizer_class=ADDED_GROUPS_CASE.optimizer_class,
            **ADDED_GROUPS_CASE.kwargs(execution),
        )
        optimizer = with_added_groups(model, make_zero)
        train(model, optimizer, ADDED_GROUPS_CASE, range(STEPS))
        results[f"{ADDED_GROUPS_CASE.label}/{execution}"] = {"params": _detached(model.module.state_dict())}
    return results


def _zero_results(runs: Iterator[tuple[str, Case, str]]) -> dict[str, Any]:
    """The runs under DDP + ZeroRedundancyOptimizer, with and without parameters_as_bucket_view (ZeRO's own
    contiguous buffers, which the params are views of).

    Per run: the params after STEPS uninterrupted steps; the consolidated state dict then (rank 0 only);
    and the params of a second run that was rebuilt from the consolidated state dict and the model's
    state dict at the checkpoint, loaded on every rank, and continued to STEPS.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    rank = dist.get_rank()

    def make(case: Case, execution: str, bucket_view: bool, model_state: dict[str, Any] | None = None) -> Any:
        module = build_model()
        if model_state is not None:
            module.load_state_dict(model_state)
        model = data_parallel(module)
        optimizer = ZeroRedundancyOptimizer(
            case.params(model),
            optimizer_class=case.optimizer_class,
            parameters_as_bucket_view=bucket_view,
            **case.kwargs(execution),
        )
        return model, optimizer

    results: dict[str, Any] = {}
    for run_key, case, execution in runs:
        for bucket_view in (False, True):
            key = f"{run_key}/bucket_view={bucket_view}"
            model, optimizer = make(case, execution, bucket_view)
            sharded = [len(group["params"]) for group in optimizer.optim.param_groups]
            run = dict(hessian_optimizer=optimizer.optim)
            train(model, optimizer, case, range(STEPS_BEFORE_CHECKPOINT), **run)
            optimizer.consolidate_state_dict(to=0)
            # state_dict() holds references to the live state (on CPU ZeRO does not even copy rank 0's own
            # share), so the checkpoint is copied, as torch.save would, before training goes on.
            checkpoint = [
                copy.deepcopy(optimizer.state_dict()) if rank == 0 else None,
                _detached(model.module.state_dict()),
            ]
            dist.broadcast_object_list(checkpoint, src=0)
            optimizer_state, model_state = checkpoint
            train(model, optimizer, case, range(STEPS_BEFORE_CHECKPOINT, STEPS), **run)
            optimizer.consolidate_state_dict(to=0)
            final_state = copy.deepcopy(optimizer.state_dict()) if rank == 0 else None

            resumed_model, resumed_optimizer = make(case, execution, bucket_view, model_state)
            # ZeroRedundancyOptimizer.load_state_dict blanks the entries of other ranks in its argument.
            resumed_optimizer.load_state_dict(copy.deepcopy(optimizer_state))
            resumed_run = dict(hessian_optimizer=resumed_optimizer.optim)
            train(resumed_model, resumed_optimizer, case, range(STEPS_BEFORE_CHECKPOINT, STEPS), **resumed_run)
            # The checkpoint loaded again into the optimizer that went on stepping after it.
            final_params = _detached(model.module.state_dict())
            model.module.load_state_dict(model_state)
            optimizer.load_state_dict(copy.deepcopy(optimizer_state))
            train(model, optimizer, case, range(STEPS_BEFORE_CHECKPOINT, STEPS), **run)
            results[key] = {
                "params": final_params,
                "reloaded_params": _detached(model.module.state_dict()),
                "local_params": sharded,
                "state_dict": final_state,
                "checkpoint_state_dict": optimizer_state if rank == 0 else None,
                "checkpoint_params": model_state,
                "resumed_params": _detached(resumed_model.module.state_dict()),
            }
    return results


def scenario_fsdp(out: Path) -> dict[str, Any]:
    """FSDP2 (fully_shard, DTensor params) with torch.distributed.checkpoint save and resume.

    Per case: the full params and optimizer state after STEPS uninterrupted steps, the local shapes of
    the params (to show they really were sharded), and the full params of a run that was rebuilt, loaded
    from the checkpoint saved after STEPS_BEFORE_CHECKPOINT steps and continued to STEPS.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def make(case: Case, execution: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = build_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, case.build(model, execution)

    results: dict[str, Any] = {}
    for key, case, execution in _runs(FSDP_CASES):
        checkpoint_dir = out / "dcp" / key.replace("/", "-")
        model, optimizer = make(case, execution)
        local_shapes = {
            name: tuple(p.to_local().shape) if isinstance(p, DTensor) else None for name, p in model.named_parameters()
        }
        train(model, optimizer, case, range(STEPS_BEFORE_CHECKPOINT))
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint_dir)
        train(model, optimizer, case, range(STEPS_BEFORE_CHECKPOINT, STEPS))
        params = {name: _full(p) for name, p in model.named_parameters()}
        state = _full_state(per_param_state(optimizer.state_dict()))

        resumed_model, resumed_optimizer = make(case, execution)
        model_state, optimizer_state = get_state_dict(resumed_model, resumed_optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=checkpoint_dir)
        set_state_dict(
            resumed_model, resumed_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"]
        )
        train(resumed_model, resumed_optimizer, case, range(STEPS_BEFORE_CHECKPOINT, STEPS))
        results[key] = {
            "params": params,
            "state": state,
            "local_shapes": local_shapes,
            "resumed_params": {name: _full(p) for name, p in resumed_model.named_parameters()},
            "resumed_state": _full_state(per_param_state(resumed_optimizer.state_dict())),
        }
    return results


def scenario_low_bit(out: Path) -> dict[str, Any]:
    """LOW_BIT_CASES under DDP (`_ddp_results`, keys under "ddp/") and ZeroRedundancyOptimizer (`_zero_results`,
    under "zero/"); and under FSDP2 (keys under "fsdp/") the error of an optimizer with low-bit state over the
    sharded model, with what the optimizer holds after it: a group over the DTensor params given at
    construction, and one added to an optimizer whose first group keeps plain fp32 state and has stepped."""
    from torch.distributed.fsdp import fully_shard

    runs = list(_runs(LOW_BIT_CASES, LOW_BIT_EXECUTIONS))
    results = {f"ddp/{key}": value for key, value in _ddp_results(iter(runs)).items()}
    results.update({f"zero/{key}": value for key, value in _zero_results(iter(runs)).items()})

    model = build_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    first_weight, *others = model.parameters()
    for width in ("8bit", "4bit"):
        try:
            adaptopt.Adam(model.parameters(), lr=1e-2, state_dtype=width)
        except ValueError as error:
            results[f"fsdp/construction/{width}"] = {"error": str(error)}
        optimizer = adaptopt.Adam([first_weight], lr=1e-2)
        train(model, optimizer, LOW_BIT_CASES[0], range(1))
        before = _full_state(per_param_state(optimizer.state_dict()))
        try:
            optimizer.add_param_group({"params": iter(others), "state_dtype": width, "low_bit_min_numel": 0})
        except ValueError as error:
            results[f"fsdp/add_param_group/{width}"] = {
                "error": str(error),
                "groups": len(optimizer.param_groups),
                "state_before": before,
                "state_after": _full_state(per_param_state(optimizer.state_dict())),
            }
    return results


# --------------------------------------------------------------------------------------------------
# Workers for adaptopt.distributed.launch: module-level, so that the spawned processes can import them.


def fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank 1 fails on purpose")
    time.sleep(600)  # rank 0 hangs: launch must stop it instead of waiting


def low_bit_on_single_rank_dtensors() -> dict[str, Any]:
    """On a 1-rank mesh: a model whose params are DTensors sharded on dim 0, given low-bit state at construction,
    and by hand to the group of an optimizer built without it (the check where state is created). The errors,
    and the optimizer's state after the refused step."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    model = build_model()
    params = [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in model.parameters()]
    results: dict[str, Any] = {}
    try:
        adaptopt.Adam(params, lr=1e-2, state_dtype="4bit")
    except ValueError as error:
        results["construction"] = str(error)
    optimizer = adaptopt.Adam(params, lr=1e-2, low_bit_min_numel=0)
    optimizer.param_groups[0]["state_dtype"] = "8bit"
    for param in params:
        param.grad = torch.ones_like(param)
    before = [param.full_tensor().clone() for param in params]
    try:
        optimizer.step()
    except ValueError as error:
        results["step"] = str(error)
    results["state_entries"] = [len(optimizer.state.get(param, {})) for param in params]
    results["params_unchanged"] = all(torch.equal(p.full_tensor(), b) for p, b in zip(params, before, strict=True))
    return results


def sleep_past_timeout() -> None:
    time.sleep(600)


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "ddp": scenario_ddp,
    "zero": scenario_zero,
    "fsdp": scenario_fsdp,
    "low_bit": scenario_low_bit,
}


def run_scenario(name: str, out: Path) -> list[dict[str, Any]]:
    """Run scenario `name` on this rank; every rank's results, gathered (the launcher returns rank 0's)."""
    results = SCENARIOS[name](out)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return gathered
