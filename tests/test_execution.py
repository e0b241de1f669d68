"""Every execution path equals the reference loop: params and state, float64, over 20+ steps.

The bucketed path runs the same elementwise math on the same numbers, so it must agree bitwise; the compiled
path (inductor may fuse into FMAs) within 1e-12 of each tensor's scale. The situations the buckets must
survive without user action are each run against the reference path too, with grads copied into the bucket
and with large grads read where they lie (`IN_PLACE_GRAD_NUMEL` lowered so that the MLP's two weights count
as large: segments of one param and of the small ones between them).
"""

from __future__ import annotations

import copy
import operator
import os
import pickle
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import adaptopt
from adaptopt import WeightDecay, compiled, execution
from adaptopt.compiled import CompiledUpdate
from adaptopt.execution import bucket_of, buckets

F64 = torch.float64
DEVICE = torch.device(os.environ.get("ADAPTOPT_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("ADAPTOPT_TEST_DTYPE", "float64"))
"""Where `mlp()` and `train()` run: the CPU in float64 in CI. `benchmarks/gpu_check.sh` runs the equivalence
tests (`-k equals_reference`) with `ADAPTOPT_TEST_DEVICE=cuda`, in float32 and float64; the other tests are
the CPU's."""

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("adam", {}),
    ("adam", {"optimized_update": False, "amsgrad": True}),
    ("adam", {"weight_decay": WeightDecay(0.1, weight_decouple=False)}),
    ("adam", {"weight_decay": WeightDecay(0.1)}),
    ("adam", {"weight_decay": WeightDecay(0.01, absolute=True)}),
    ("adam", {"weight_decay": WeightDecay(0.01, l1=True)}),
    ("adam", {"weight_decay": WeightDecay(0.01, weight_decouple=False, l1=True)}),
    ("adam", {"maximize": True}),
    ("amsgrad", {"weight_decay": 0.05}),
    ("adam_warmup", {"warmup": 5}),
    ("adam_warmup_cosine_decay", {"warmup": 3, "total_steps": 15}),
    ("noam", {"lr": 1.0, "warmup": 4, "d_model": 16}),
    ("radam", {}),
    ("radam", {"degenerate_to_sgd": False, "amsgrad": True, "optimized_update": False}),
    ("adabelief", {"weight_decay": WeightDecay(0.1, weight_decouple=False)}),
    ("adabelief", {"rectify": False, "amsgrad": True}),
    ("adabelief", {"degenerate_to_sgd": False, "maximize": True}),
    ("sophia", {"rho": 0.05, "weight_decay": 0.1}),
    ("lion", {}),
    ("lion", {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
    ("adopt", {}),
    ("adopt", {"weight_decay": 0.05, "clip_lambda": None, "maximize": True}),
    ("ademamix", {"betas": (0.0, 0.999, 0.999)}),  # beta1 = 0: no fast momentum in the state
    ("ademamix", {"alpha_warmup": 10, "beta3_warmup": 10, "weight_decay": 0.01}),
    ("schedule_free_adamw", {"r": 1.0, "weight_lr_power": 1.0, "betas": (0.95, 0.99), "maximize": True}),
    ("schedule_free_adamw", {"warmup_steps": 5, "weight_decay": 0.01}),
    ("prodigy", {"lr": 1.0, "d0": 1e-4}),
    (
        "prodigy",  # beta1 = 0: no first moment in the state; coupled decay, on both passes
        {
            "lr": 1.0,
            "betas": (0.0, 0.99),
            "use_bias_correction": True,
            "safeguard_warmup": True,
            "weight_decay": 0.05,
            "decouple": False,
            "maximize": True,
        },
    ),
    ("lamb", {}),  # apex's defaults: its decay inside the trust ratio, clipping at a global norm of 1
    ("lamb", {"max_grad_norm": None, "adam_w_mode": False, "grad_averaging": False, "weight_decay": 0.1}),
    ("lamb", {"use_nvlamb": True, "weight_decay": 0.0, "bias_correction": False, "maximize": True}),
    ("adafactor", {}),
    ("adafactor", {"weight_decay": 0.1, "beta2_decay": -0.5, "d": 2.0, "eps": (1e-30, 1e-2), "maximize": True}),
    ("muon", {}),  # Muon for the two weights, AdamW for the biases
    ("muon", {"adjust_lr_fn": "original", "nesterov": False, "muon_lr": 0.02, "weight_decay": 0.0, "maximize": True}),
]
NAMES = [name for name in adaptopt.available() if name != "sgd"]
SUMS_IN_ANOTHER_ORDER = ("prodigy", "lamb")
"""Where the bucketed path is not bitwise the reference: Prodigy's first pass sums over every element and LAMB's
takes norms (its global one, and each param's in the trust ratio), over a bucket's elements at once where the
reference sums param by param, so the sums part in their last bits (measured after 20 steps: 3.5e-15 of the
params for Prodigy, whose d amplifies them, 1.3e-16 for LAMB). They are held to the compiled path's 1e-12
instead. Adafactor and Muon are matrixwise, yet bitwise here: on this MLP every matrix is a stack of one, so a
bucket runs the reference's ops (test_family_matrix stacks several of one shape)."""
BUCKETS = {"adafactor": 4, "muon": 3}
"""How many buckets the MLP's params make, where not one: Adafactor's matrixwise buckets stack params of one
shape, and the MLP's four have four shapes; muon's MuonWithAdamW has Muon's two (one per weight) and its
AdamW's one (the biases)."""


def parts(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers with buckets: MuonWithAdamW's Muon and AdamW, or the optimizer itself."""
    if isinstance(optimizer, adaptopt.MuonWithAdamW):
        return [optimizer.muon, optimizer.adamw]
    return [optimizer]


def all_buckets(optimizer: torch.optim.Optimizer) -> list[execution.Bucket]:
    return [bucket for part in parts(optimizer) for bucket in buckets(part)]


def owner(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> execution.Bucket | None:
    """The bucket `param` lives in, in whichever of `parts(optimizer)` holds it."""
    found = [bucket for part in parts(optimizer) if (bucket := bucket_of(part, param)) is not None]
    return found[0] if found else None


def holder(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.optim.Optimizer:
    """The optimizer of `parts(optimizer)` whose groups hold `param` (whose `state` is the live one)."""
    return next(
        part for part in parts(optimizer) for group in part.param_groups if any(p is param for p in group["params"])
    )


STEPS = 20
MLP_WEIGHTS_ARE_LARGE = 20
"""An `IN_PLACE_GRAD_NUMEL` under which the MLP's weights (35 and 21 elements) are large, its biases not."""


@pytest.fixture(params=["copied", "in place"])
def grads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Foreign grads of large params copied into the bucket (the MLP has none at the real threshold) or read
    where they lie, by segments of their own. (Compiled rows read every grad where it lies.)"""
    if request.param == "in place":
        monkeypatch.setattr(execution, "IN_PLACE_GRAD_NUMEL", MLP_WEIGHTS_ARE_LARGE)
    return str(request.param)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DEVICE, DTYPE)


Mutate = Callable[[int, nn.Module, torch.optim.Optimizer], None]


def train(
    name: str,
    options: dict[str, Any],
    execution: str,
    *,
    model: nn.Module | None = None,
    steps: int = STEPS,
    mutate: Mutate | None = None,
    set_to_none: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    start: int = 0,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`steps` steps of a small regression, the same data whatever the path; Sophia refreshes h every 3."""
    if model is None:
        torch.manual_seed(0)
        model = mlp()
    if optimizer is None:
        options = {"lr": 1e-2, **options}
        optimizer = adaptopt.create(name, model.parameters(), execution=execution, **options)
    for step in range(start, start + steps):
        data = torch.randn(8, 5, dtype=F64, generator=torch.Generator().manual_seed(step))
        first = next(model.parameters())
        data = data.to(first.device, first.dtype)
        optimizer.zero_grad(set_to_none=set_to_none)
        model(data).pow(2).mean().backward()
        if mutate is not None:
            mutate(step, model, optimizer)
        optimizer.step()
        if name == "sophia" and step % 3 == 2:
            optimizer.zero_grad(set_to_none=set_to_none)
            model(data).pow(2).sum().backward()
            optimizer.update_hessian(8)
    return model, optimizer


def assert_same(
    expected: tuple[nn.Module, torch.optim.Optimizer],
    actual: tuple[nn.Module, torch.optim.Optimizer],
    *,
    exact: bool,
    float64_tolerance: float = 1e-12,
) -> None:
    """Params and per-param state of two runs agree: bitwise, or within 1e-12 of each tensor's scale."""
    (expected_model, expected_opt), (actual_model, actual_opt) = expected, actual
    expected_params, actual_params = list(expected_model.parameters()), list(actual_model.parameters())
    pairs = list(zip(expected_params, actual_params, strict=True))
    for index, (want, got) in enumerate(pairs):
        tensors = [(f"param {index}", want, got)]
        want_state, got_state = expected_opt.state.get(want, {}), actual_opt.state.get(got, {})
        assert want_state.keys() == got_state.keys(), index
        for key in want_state:
            if key == "step":
                assert want_state[key] == got_state[key], (index, key)
            else:
                tensors.append((f"{key} of param {index}", want_state[key], got_state[key]))
        for label, a, b in tensors:
            assert a.shape == b.shape and a.dtype == b.dtype, label
            if exact:
                assert torch.equal(a, b), f"{label}: max diff {(a - b).abs().max().item()}"
            else:
                # Inductor may contract a*b+c into an FMA: last-bit differences, nothing more. In float64
                # that is 1e-16 relative; float32's last bit is 6e-8, so a float32 param gets 1e-6.
                tolerance = float64_tolerance if a.dtype in (torch.float64, torch.complex128) else 1e-6
                scale = max(a.abs().max().item(), 1e-300)
                assert (a - b).abs().max().item() <= tolerance * scale, label


def reference(name: str, options: dict[str, Any], **kwargs: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    return train(name, options, "reference", **kwargs)


def a_state_tensor(state: dict[str, Any]) -> str:
    """The key of one state tensor: `exp_avg` where there is one (not Schedule-Free's, nor AdEMAMix's with
    beta1 = 0), else the first."""
    return "exp_avg" if "exp_avg" in state else next(key for key, value in state.items() if torch.is_tensor(value))


def test_configs_cover_every_registered_optimizer() -> None:
    assert {name for name, _ in CONFIGS} == set(NAMES)


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_bucketed_equals_reference_bitwise(name: str, options: dict[str, Any], set_to_none: bool, grads: str) -> None:
    expected = reference(name, options, set_to_none=set_to_none)
    actual = train(name, options, "bucketed", set_to_none=set_to_none)
    assert_same(expected, actual, exact=name not in SUMS_IN_ANOTHER_ORDER)
    model, optimizer = actual
    # It did run bucketed: one bucket owns every param (BUCKETS: or one per shape, per part), and its state
    # tensors are views of the buffers.
    assert len(all_buckets(optimizer)) == BUCKETS.get(name, 1)
    assert all(owner(optimizer, param) is not None for param in model.parameters())
    weight = model[0].weight
    bucket = owner(optimizer, weight)
    assert bucket is not None
    assert weight.untyped_storage().data_ptr() == bucket.flat_param.untyped_storage().data_ptr()
    key = a_state_tensor(optimizer.state[weight])
    assert optimizer.state[weight][key].untyped_storage().data_ptr() == (
        bucket.state_buffers[key].untyped_storage().data_ptr()
    )
    if not set_to_none:
        # zero_grad(set_to_none=False) hands backward the bucket's grad views: no copy at the step.
        for each in all_buckets(optimizer):
            assert all(param.grad is view for param, view in zip(each.params, each.grad_views, strict=True))
    if grads == "in place" and name in BUCKETS:
        # The weights are large, each a stack of its own; a stack steps its grads as one tensor, so they are
        # copied into its grad buffer, large or not (the MLP's biases share AdamW's bucket in `muon`).
        for weight in (model[0].weight, model[2].weight):
            own = owner(optimizer, weight)
            assert own is not None and own.params == [weight] and own.large == [True]
    elif grads == "in place":
        # The weights are large: laid out last, and (with torch's zero_grad) their grads were read where
        # autograd left them, never copied into the bucket's grad buffer.
        weights = [model[0].weight, model[2].weight]
        assert all(a is b for a, b in zip(bucket.params[2:], weights, strict=True)) and bucket.large == [
            False,
            False,
            True,
            True,
        ]
        if set_to_none:
            assert not bucket.grad_views[2].any() and not bucket.grad_views[3].any()


def test_zero_grad_keeps_torch_semantics() -> None:
    model, optimizer = train("adam", {}, "bucketed", steps=2)
    optimizer.zero_grad()
    assert all(param.grad is None for param in model.parameters())
    model(torch.ones(2, 5, dtype=F64)).sum().backward()
    optimizer.zero_grad(set_to_none=False)
    assert all(param.grad is not None and not param.grad.any() for param in model.parameters())
    assert all(param.grad is not None and not param.grad.requires_grad for param in model.parameters())


def test_execution_is_validated_and_reference_leaves_params_alone() -> None:
    with pytest.raises(ValueError, match="execution"):
        adaptopt.Adam(mlp().parameters(), execution="fast")
    with pytest.raises(TypeError, match="execution"):
        adaptopt.Adam(mlp().parameters(), execution=None)  # type: ignore[arg-type]
    model, optimizer = train("adam", {}, "reference", steps=2)
    assert list(buckets(optimizer)) == []
    assert all(param.untyped_storage().nbytes() == param.numel() * 8 for param in model.parameters())


# ------------------------------------------------------------------------------------------------------
# Situations the buckets must survive: each against the reference path, bitwise.


def clip_by_new_tensors(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for param in model.parameters():
        assert param.grad is not None
        param.grad = param.grad.clamp(-0.05, 0.05)


def drop_some_grads(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # The first layer's bias gets no grad on odd steps, the last layer's weight every third step: the bucket
    # has holes and, from then on, params at different step counts.
    if step % 2:
        model[0].bias.grad = None
    if step % 3 == 0:
        model[2].weight.grad = None


def foreign_grad_views(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # What DDP's gradient_as_bucket_view does: grads are views of a buffer the optimizer does not own.
    params = list(model.parameters())
    flat = torch.cat([param.grad.flatten() for param in params if param.grad is not None])
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()


def scale_grad_data(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # Old manual-averaging code: `p.grad.data = ...` moves the data of the same grad object elsewhere (after
    # zero_grad(set_to_none=False) that object is the bucket's view). A zero_grad then must zero the grad too.
    for param in model.parameters():
        assert param.grad is not None
        param.grad.data = param.grad.data / 3
    if step % 4 == 1:
        optimizer.zero_grad(set_to_none=False)
        model[0].bias.grad.data = torch.ones_like(model[0].bias)


def transposed_grads(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # Right shape, other strides: cannot be read in place as the bucket's view would be, so it is copied.
    for layer in (model[0], model[2]):
        layer.weight.grad = layer.weight.grad.t().contiguous().t()


FAST_PATHS = ["bucketed", "compiled"]
"""The paths that must equal the reference through every situation below (bitwise, or, compiled, to the
last bit of an FMA; see `assert_same`)."""


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize(
    "mutate", [clip_by_new_tensors, drop_some_grads, foreign_grad_views, scale_grad_data, transposed_grads]
)
@pytest.mark.parametrize("name", ["adam", "radam", "sophia"])
def test_grads_replaced_missing_or_foreign(name: str, mutate: Mutate, set_to_none: bool, grads: str, path: str) -> None:
    options = dict(CONFIGS)[name]
    expected = reference(name, options, mutate=mutate, set_to_none=set_to_none)
    actual = train(name, options, path, mutate=mutate, set_to_none=set_to_none)
    assert_same(expected, actual, exact=path == "bucketed")


@pytest.mark.parametrize("path", ["reference", *FAST_PATHS])
def test_autograd_sees_the_step_modify_params(path: str) -> None:
    # torch.optim's in-place updates bump each param's version, so a backward through a graph that saved a
    # param before the step fails instead of using the new values. The buckets' kernels write the buffers,
    # so the bucketed paths bump the versions themselves.
    model, optimizer = train("adam", {}, path, steps=2)
    data = torch.randn(4, 5, dtype=F64, requires_grad=True)
    loss = model(data).pow(2).sum()  # saves the weights, to compute the grad of `data`
    versions = [param._version for param in model.parameters()]
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    model[2].bias.grad = None  # not stepped, so not modified
    optimizer.step()
    stepped = [param._version > version for param, version in zip(model.parameters(), versions, strict=True)]
    assert stepped == [True, True, True, False]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_foreign_grad_views_are_zeroed_in_place_not_replaced() -> None:
    model, optimizer = train("adam", {}, "bucketed", steps=3, mutate=foreign_grad_views)
    grads = [param.grad for param in model.parameters()]
    optimizer.zero_grad(set_to_none=False)
    assert all(param.grad is grad and not grad.any() for param, grad in zip(model.parameters(), grads, strict=True))


def test_sparse_grads_are_rejected() -> None:
    embedding = nn.Embedding(10, 3, sparse=True).to(F64)
    optimizer = adaptopt.Adam(embedding.parameters(), execution="bucketed")
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


@pytest.mark.parametrize("path", FAST_PATHS)
def test_add_param_group_several_dtypes_and_layouts(path: str) -> None:
    def model_fn() -> nn.Module:
        torch.manual_seed(0)
        model = mlp()
        # A transposed (dense, non-contiguous) weight, a channels-last conv weight, a complex param.
        model.register_parameter("transposed", nn.Parameter(torch.randn(7, 5, dtype=F64).t()))
        model.register_parameter("conv", nn.Parameter(torch.randn(2, 3, 2, 2, dtype=F64)))
        model.conv.data = model.conv.data.contiguous(memory_format=torch.channels_last)
        model.register_parameter("complex", nn.Parameter(torch.randn(3, 2, dtype=torch.complex128)))
        model.register_parameter("single", nn.Parameter(torch.randn(4)))
        return model

    class Extra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model_fn()

        def forward(self, data: torch.Tensor) -> torch.Tensor:
            body = self.body
            out = body(data) + (data @ body.transposed).sum() * 1e-2
            out = out + body.conv.pow(2).sum() * 1e-3 + body.complex.abs().pow(2).sum() * 1e-3
            return out + body.single.double().pow(2).sum() * 1e-3

    def run(execution: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = Extra()
        body = model.body
        late = [body.complex, body.single]
        early = [param for param in model.parameters() if all(param is not other for other in late)]
        optimizer = adaptopt.Adam(early, lr=1e-2, execution=execution)

        def add_group(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            if step == 5:
                optimizer.add_param_group({"params": late, "lr": 3e-2})
            if step < 5:
                for param in late:
                    param.grad = None

        return train("adam", {}, execution, model=model, optimizer=optimizer, mutate=add_group)

    expected, actual = run("reference"), run(path)
    # float32 params do not make the bucketed comparison weaker: both paths run the same float32 ops. Compiled,
    # the float32 param's last-bit FMA differences (6e-8) reach the float64 params' grads through the loss
    # (with weight 1e-3), and from there their moments: measured 2e-11 with torch 2.13's inductor and 1.4e-9
    # with torch 2.7's (the floor), which contracts other operations; the float64 update itself stays within
    # 1e-12 everywhere else.
    assert_same(expected, actual, exact=path == "bucketed", float64_tolerance=3e-9)
    model, optimizer = actual
    body = model.body
    assert len(list(buckets(optimizer))) == 3  # float64 in group 0; complex128 and float32 in group 1
    assert body.conv.is_contiguous(memory_format=torch.channels_last) and not body.transposed.is_contiguous()
    assert bucket_of(optimizer, body.complex) is not None


@pytest.mark.parametrize("path", FAST_PATHS)
def test_params_that_cannot_be_rehomed_stay_where_they_are(path: str) -> None:
    class Tagged(torch.Tensor):
        """A tensor subclass (as DTensor is): its data cannot be swapped for a view of a buffer."""

    shared = torch.randn(3, 5, dtype=F64)

    def run(execution: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = mlp()
        model.register_parameter("shared", nn.Parameter(shared.clone() if execution == "reference" else shared))
        model.register_parameter("tagged", nn.Parameter(torch.randn(3, 3, dtype=F64).as_subclass(Tagged)))
        model.register_parameter("frozen", nn.Parameter(torch.randn(3, dtype=F64), requires_grad=False))

        def touch(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            model.shared.grad = torch.full_like(model.shared, 0.1 * step)
            model.tagged.grad = torch.full((3, 3), 0.2, dtype=F64).as_subclass(Tagged)

        return train("adam", {}, execution, model=model, mutate=touch)

    expected, actual = run("reference"), run(path)
    assert_same(expected, actual, exact=path == "bucketed")
    model, optimizer = actual
    assert type(model.tagged) is Tagged
    for name in ("shared", "tagged", "frozen"):
        assert bucket_of(optimizer, getattr(model, name)) is None, name
    assert bucket_of(optimizer, model[0].weight) is not None
    # The tie with the outside tensor holds: it saw every update.
    assert model.shared.data_ptr() == shared.data_ptr() and torch.equal(model.shared.detach(), shared)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_tied_weights_stay_tied(path: str) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(5, 4, bias=False)
            self.head = nn.Linear(5, 4, bias=False)
            self.head.weight = self.embed.weight  # tied by identity, as language models tie embeddings

        def forward(self, data: torch.Tensor) -> torch.Tensor:
            return (data @ self.embed.weight.t()) @ self.head.weight

    def run(execution: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        return train("adam", {}, execution, model=Tied().to(F64))

    expected, actual = run("reference"), run(path)
    assert_same(expected, actual, exact=path == "bucketed")
    model, optimizer = actual
    assert model.head.weight is model.embed.weight and bucket_of(optimizer, model.embed.weight) is not None


@pytest.mark.parametrize("path", FAST_PATHS)
def test_model_moved_with_to_after_construction(path: str) -> None:
    # Five float32 steps, then model.to(float64): the buckets re-gather, the state moves with the params.
    torch.manual_seed(0)
    model = mlp().float()
    model, optimizer = train("radam", {}, path, model=model, steps=5)
    (old_bucket,) = buckets(optimizer)
    twin = copy.deepcopy(model).to(F64)
    twin_optimizer = adaptopt.RAdam(twin.parameters(), lr=1e-2, execution="reference")
    twin_optimizer.load_state_dict(optimizer.state_dict())  # load casts the state to the params' dtype
    model.to(F64)
    model.to(F64)  # A no-op move changes nothing.
    train("radam", {}, path, model=model, optimizer=optimizer, start=5)
    train("radam", {}, "reference", model=twin, optimizer=twin_optimizer, start=5)
    assert_same((twin, twin_optimizer), (model, optimizer), exact=path == "bucketed")
    (bucket,) = buckets(optimizer)
    assert bucket is not old_bucket and bucket.flat_param.dtype == F64
    assert all(bucket_of(optimizer, param) is bucket for param in model.parameters())


@pytest.mark.parametrize("path", ["reference", "auto", *FAST_PATHS])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_or_pickled_optimizer_keeps_its_path_and_goes_on(path: str, how: str) -> None:
    # torch.optim.Optimizer pickles only defaults, state and groups; the execution path must come along.
    model, optimizer = train("adabelief", {}, path, steps=10)
    if how == "deepcopy":
        copied, copied_optimizer = copy.deepcopy((model, optimizer))
    else:
        copied, copied_optimizer = pickle.loads(pickle.dumps((model, optimizer)))
    assert (copied_optimizer._buckets is None) == (path == "reference")
    assert path == "reference" or copied_optimizer._buckets.mode == path
    for run in [(copied, copied_optimizer), (model, optimizer)]:
        train("adabelief", {}, path, model=run[0], optimizer=run[1], steps=10, start=10)
        assert_same(reference("adabelief", {}, steps=20), run, exact=path != "compiled")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_writes_into_the_buckets(name: str) -> None:
    options = dict(CONFIGS)[name]
    model, optimizer = train(name, options, "bucketed", steps=12)
    saved = copy.deepcopy(optimizer.state_dict())
    # Into a fresh bucketed optimizer over a copy of the model, and back into the running one.
    twin = copy.deepcopy(model)
    twin_optimizer = adaptopt.create(name, twin.parameters(), execution="bucketed", **{"lr": 1e-2, **options})
    twin_optimizer.load_state_dict(saved)
    train(name, options, "bucketed", model=twin, optimizer=twin_optimizer, steps=12, start=12)
    optimizer.load_state_dict(saved)
    train(name, options, "bucketed", model=model, optimizer=optimizer, steps=12, start=12)
    expected = reference(name, options, steps=24)
    assert_same(expected, (twin, twin_optimizer), exact=name not in SUMS_IN_ANOTHER_ORDER)
    assert_same(expected, (model, optimizer), exact=name not in SUMS_IN_ANOTHER_ORDER)
    bucket = owner(optimizer, model[0].weight)
    assert bucket is not None and len(all_buckets(optimizer)) == BUCKETS.get(name, 1)
    state = optimizer.state[model[0].weight]
    key = a_state_tensor(state)
    assert state[key].untyped_storage().data_ptr() == bucket.state_buffers[key].untyped_storage().data_ptr()


@pytest.mark.parametrize("name", NAMES)
def test_state_replaced_by_hand_is_taken_into_the_buckets(name: str) -> None:
    # ZeRO's load_state_dict assigns `state[p] = {...}` per param, never calling ours; anyone may assign
    # `state[p]["exp_avg"] = t`. A run from another init takes a reference run's params and state dicts
    # after 12 steps, and must go on exactly as the reference run does. One step later it also takes one
    # exp_avg tensor alone (equal to the bucket's: a bucket that kept stepping its view would leave it behind).
    # Per-group state is taken too, as ZeRO's load takes the groups: Schedule-Free's is the same in both runs
    # (it counts steps, which both took), Prodigy's d is the trajectory's (LAMB's divisor is the step's own).
    options = dict(CONFIGS)[name]
    expected = reference(name, options, steps=12)
    params_then = [param.detach().clone() for param in expected[0].parameters()]
    states_then = [copy.deepcopy(expected[1].state[param]) for param in expected[0].parameters()]
    group_keys = [list(getattr(type(part), "group_state", {})) for part in parts(expected[1])]
    groups_then = [
        [{key: group[key] for key in keys} for group in part.param_groups]
        for part, keys in zip(parts(expected[1]), group_keys, strict=True)
    ]
    train(name, options, "reference", model=expected[0], optimizer=expected[1], steps=1, start=12)
    key = a_state_tensor(expected[1].state[expected[0][0].weight])
    exp_avg_then = expected[1].state[expected[0][0].weight][key].clone()
    train(name, options, "reference", model=expected[0], optimizer=expected[1], steps=11, start=13)

    torch.manual_seed(1)
    model, optimizer = train(name, options, "bucketed", model=mlp(), steps=12)
    params = list(model.parameters())
    with torch.no_grad():
        torch._foreach_copy_(params, params_then)
    for param, state in zip(params, states_then, strict=True):
        holder(optimizer, param).state[param] = state  # MuonWithAdamW's `state` is a merged copy
    for part, groups in zip(parts(optimizer), groups_then, strict=True):
        for group, then in zip(part.param_groups, groups, strict=True):
            group.update(then)
    train(name, options, "bucketed", model=model, optimizer=optimizer, steps=1, start=12)
    optimizer.state[model[0].weight][key] = exp_avg_then
    train(name, options, "bucketed", model=model, optimizer=optimizer, steps=11, start=13)
    assert_same(expected, (model, optimizer), exact=name not in SUMS_IN_ANOTHER_ORDER)
    assert len(all_buckets(optimizer)) == BUCKETS.get(name, 1)
    for param in params:
        bucket = owner(optimizer, param)
        assert bucket is not None
        for key, buffer in bucket.state_buffers.items():
            stored = optimizer.state[param][key].untyped_storage().data_ptr()
            assert stored == buffer.untyped_storage().data_ptr(), key


@pytest.mark.parametrize("path", FAST_PATHS)
def test_schedule_free_modes_switch_bucketed_params_as_the_reference(path: str) -> None:
    # eval() and train() move every param (in a bucket, a view of its buffer) between y and x with z from the
    # state (a view of a state buffer): every few steps, to x and back, as a training loop evaluating does.
    name, options = "schedule_free_adamw", dict(CONFIGS)["schedule_free_adamw"]
    seen: dict[str, list[torch.Tensor]] = {"reference": [], path: []}

    def evaluate_now_and_then(run: str) -> Mutate:
        def mutate(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            if step % 4 == 3:
                optimizer.eval()  # type: ignore[attr-defined]
                seen[run].extend(param.detach().clone() for param in model.parameters())
                optimizer.train()  # type: ignore[attr-defined]

        return mutate

    expected = reference(name, options, mutate=evaluate_now_and_then("reference"))
    actual = train(name, options, path, mutate=evaluate_now_and_then(path))
    assert_same(expected, actual, exact=path == "bucketed")
    assert len(seen[path]) == len(seen["reference"]) == 5 * 4
    for want, got in zip(seen["reference"], seen[path], strict=True):
        if path == "bucketed":
            assert torch.equal(want, got)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * max(want.abs().max().item(), 1e-300))
    model, optimizer = actual
    (bucket,) = buckets(optimizer)
    assert all(bucket_of(optimizer, param) is bucket for param in model.parameters())
    assert all(group["k"] == STEPS and group["train_mode"] for group in optimizer.param_groups)


def test_state_tensor_of_the_wrong_shape_is_rejected() -> None:
    model, optimizer = train("adam", {}, "bucketed", steps=2)
    optimizer.state[model[0].weight]["exp_avg"] = torch.zeros(7, dtype=F64)
    with pytest.raises(ValueError, match=r"shape \(7, 5\) under 'exp_avg', got \(7,\)"):
        train("adam", {}, "bucketed", model=model, optimizer=optimizer, steps=1, start=2)


def test_master_weight_groups_take_the_reference_path() -> None:
    torch.manual_seed(0)
    model = mlp().to(torch.bfloat16)
    optimizer = adaptopt.Adam(model.parameters(), master_weights=True, execution="bucketed")
    model(torch.ones(2, 5, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    assert list(buckets(optimizer)) == []
    assert optimizer.state[model[0].weight]["master_weight"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------------
# Compiled: few and small, compilation is slow.


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_compiled_equals_reference(
    name: str, options: dict[str, Any], set_to_none: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Calls of several lengths: one compilation serves them all. With torch's zero_grad, a row per param
    # called from C, each grad read where autograd left it; with set_to_none=False, one segment, the bucket's
    # grad buffer. (The segments of the first, compiling, step: the small params', then 35 and 21.)
    monkeypatch.setattr(execution, "IN_PLACE_GRAD_NUMEL", MLP_WEIGHTS_ARE_LARGE)
    expected = reference(name, options, set_to_none=set_to_none)
    compilations = CompiledUpdate.compilations
    actual = train(name, options, "compiled", set_to_none=set_to_none)
    assert_same(expected, actual, exact=False)
    assert len(all_buckets(actual[1])) == BUCKETS.get(name, 1)
    # Before torch 2.9 matrix stacks run eagerly (execution.STACKS_COMPILE): those parts compile nothing.
    eager = [part for part in parts(actual[1]) if type(part).kind == "matrixwise" and not execution.STACKS_COMPILE]
    compiled_parts = [part for part in parts(actual[1]) if all(part is not other for other in eager)]
    assert all(bucket.compiled is None for part in eager for bucket in all_buckets(part))
    assert all(
        bucket.compiled is not None and not bucket.compile_failed
        for part in compiled_parts
        for bucket in all_buckets(part)
    )
    # Each compiled once: the updates and the first passes (`reduces`: Prodigy's sums, LAMB's norm).
    variants = [variant for part in compiled_parts for variant in compiled_updates(part)]
    reductions = [reduction for part in compiled_parts for reduction in compiled_reductions(part)]
    assert CompiledUpdate.compilations - compilations == len(variants) + len(reductions)
    for part in compiled_parts:
        check_compiled_part(name, options, part, actual, set_to_none)


def check_compiled_part(
    name: str,
    options: dict[str, Any],
    part: torch.optim.Optimizer,
    actual: tuple[nn.Module, torch.optim.Optimizer],
    set_to_none: bool,
) -> None:
    """What the compiled path of `part` (the optimizer, or one of MuonWithAdamW's) is made of, by its kind."""
    variants = compiled_updates(part)
    kind, reduces = type(part).kind, type(part).reduces  # type: ignore[attr-defined]
    if kind == "matrixwise":
        # Compiled per stack shape (dims are constants there): one each, and no first pass.
        assert len(variants) == len(list(buckets(part))) and not compiled_reductions(part)
        return
    if kind == "tensorwise":
        # LAMB: segments of several params (their norms by their starts) and of a large param alone are two
        # updates; its global norm is one compiled first pass.
        assert 1 <= len(variants) <= 2 and len(compiled_reductions(part)) == 1
        # Its first pass is one output, the sums, and on the CPU its kernel is called directly; so is the update
        # of a whole param, one call a param (never by rows, which would split its norms among threads).
        assert all(reduction.direct == (DEVICE.type == "cpu") for reduction in compiled_reductions(part))
        # A whole param's update is called directly too, one call a param, though the params lie after the
        # biases in their buckets (dynamo then passes their storage offsets); never by rows, which would split
        # its norms among threads. Segments of several params (their starts a tensor of its own) are not.
        whole = [variant for variant in variants if variant and variant.fixed.get("extents") == "whole"]
        assert whole and all(variant.direct == (DEVICE.type == "cpu") for variant in whole)
        assert all(variant and not variant.calls_rows for variant in variants)
        assert all(variant and not variant.direct for variant in variants if variant not in whole)
        return
    # One per branch (RAdam's and AdaBelief's rectifier off, then on); on the CPU, called directly, from C,
    # single-threaded kernels split among the threads by the loop over rows.
    assert 1 <= len(variants) <= 2
    assert len(compiled_reductions(part)) == (1 if reduces else 0)
    if DEVICE.type != "cpu":  # Elsewhere every call goes through torch.compile.
        return
    assert all(variant and variant.direct and variant.calls_rows and variant._single_threaded for variant in variants)
    assert all(reduction and reduction.direct for reduction in compiled_reductions(part))
    rows_called = sum(variant.row_calls for variant in variants if variant is not None)
    if reduces:
        # Prodigy's first pass gathers the grads into the bucket, once for both passes: the update then reads
        # them there, as one segment, and never by rows.
        assert rows_called == 0
        return
    assert rows_called == (STEPS - len(variants) if set_to_none else 0)  # all but the compiling steps
    if set_to_none:  # A step by rows copies no grad into the bucket.
        (bucket,) = buckets(part)
        bucket.flat_grad.zero_()
        train(name, options, "compiled", model=actual[0], optimizer=actual[1], steps=1, start=STEPS)
        assert not bucket.flat_grad.any()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_tensorwise_update_of_whole_params_is_called_directly(
    set_to_none: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LAMB on two weight matrices, each a segment of its own: its norms are over the whole param, so its kernel
    # may be called directly, a call a param, once it has stepped a scratch prefix as torch.compile does; the
    # first starts its buffer, the second does not (dynamo passes its storage offset to the graph).
    monkeypatch.setattr(execution, "IN_PLACE_GRAD_NUMEL", MLP_WEIGHTS_ARE_LARGE)

    def weights_only() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3, bias=False)).to(DEVICE, DTYPE)

    expected = reference("lamb", {}, model=weights_only(), set_to_none=set_to_none)
    actual = train("lamb", {}, "compiled", model=weights_only(), set_to_none=set_to_none)
    assert_same(expected, actual, exact=False)
    (variant,) = compiled_updates(actual[1])
    assert variant is not None and variant.fixed.get("extents") == "whole"
    assert variant.direct == (DEVICE.type == "cpu") and not variant.calls_rows


def test_storage_offsets_that_dynamo_passes_are_read_off_each_call() -> None:
    # The plan of a graph that takes a storage offset reads it off the input it was learned from, at each call;
    # only dynamo's arguments may hold one (a C kernel's take the length alone).
    buffer = torch.zeros(10)
    param, grad, state = buffer[5:9], torch.zeros(4), buffer[5:9].clone()
    arguments = compiled._argument_order((param, grad, state), [param, 4, 5, grad])
    assert arguments is not None
    assert arguments((param, grad, state, 4)) == (param, 4, 5, grad)
    moved, fewer = buffer[6:9], grad[:3]
    assert arguments((moved, fewer, state[:3], 3)) == (moved, 3, 6, fewer)  # identical tensors compare equal
    assert compiled._argument_plan((param, grad, state), [param, 5], offsets=True) == [0, 4]
    assert compiled._argument_plan((param, grad, state), [param, 5]) is None
    assert compiled._argument_plan((param, grad, state), [param, 7], offsets=True) is None


def compiled_reductions(optimizer: torch.optim.Optimizer) -> list[Any]:
    engine = optimizer._buckets  # type: ignore[attr-defined]
    return list(engine._reductions.values())


@pytest.mark.parametrize("name", ["amsgrad", "adabelief"])
def test_compiled_rows_split_among_threads_equal_reference(name: str) -> None:
    # 13503 elements: past ROWS_SERIAL_NUMEL, so the loop over rows splits them among the threads, mid-row.
    def wide() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 1500), nn.Tanh(), nn.Linear(1500, 3)).to(F64)

    assert sum(param.numel() for param in wide().parameters()) > compiled.ROWS_SERIAL_NUMEL
    options = dict(CONFIGS)[name]
    expected = reference(name, options, model=wide())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a split even where the machine has one core
    try:
        actual = train(name, options, "compiled", model=wide())
    finally:
        torch.set_num_threads(threads)
    assert_same(expected, actual, exact=False)
    variants = [variant for variant in compiled_updates(actual[1]) if variant is not None]
    assert sum(variant.row_calls for variant in variants) == STEPS - len(variants)


def compiled_updates(optimizer: torch.optim.Optimizer) -> list[CompiledUpdate | None]:
    engine = optimizer._buckets  # type: ignore[attr-defined]
    return list(engine._compiled.values())


def test_compiled_schedules_and_steps_do_not_recompile() -> None:
    # A warm-up-cosine schedule, an LR scheduler changing group["lr"], new steps, new bias corrections and
    # RAdam's rectifier changing value: inputs, not code. Only the rectifier switching on (None -> float)
    # selects the other branch, once, before step 7.
    counters.clear()
    for name, options in [("adam_warmup_cosine_decay", {"warmup": 3, "total_steps": 15}), ("radam", {})]:
        runs = []
        for path in ("reference", "compiled"):
            torch.manual_seed(0)
            model = mlp()
            optimizer = adaptopt.create(name, model.parameters(), lr=1e-2, execution=path, **options)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.9**k)
            train(name, options, path, model=model, optimizer=optimizer, steps=7)
            scheduler.step()
            graphs, compilations = counters["stats"]["unique_graphs"], CompiledUpdate.compilations
            for step in range(7, 25):
                train(name, options, path, model=model, optimizer=optimizer, steps=1, start=step)
                scheduler.step()
            assert counters["stats"]["unique_graphs"] == graphs and CompiledUpdate.compilations == compilations
            runs.append((model, optimizer))
        assert_same(*runs, exact=False)  # and the schedule did reach the compiled update


def test_hyperparameters_changing_every_step_stop_compiling_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    # OneCycleLR's cycle_momentum changes betas every step: each value is a new compiled update, up to a limit.
    monkeypatch.setattr(execution, "COMPILED_VARIANTS", 2)
    monkeypatch.setattr(execution, "_warned", set())

    def cycle_betas(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["betas"] = (0.9 - 0.01 * step, 0.999)

    expected = reference("adam", {}, mutate=cycle_betas, steps=6)
    compilations = CompiledUpdate.compilations
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = train("adam", {}, "compiled", mutate=cycle_betas, steps=6)
    assert CompiledUpdate.compilations - compilations == 2
    assert len([warning for warning in caught if "compiled sets of values" in str(warning.message)]) == 1
    assert_same(expected, actual, exact=False)


@pytest.mark.parametrize("name", ["adam", "prodigy", "lamb"])
def test_a_kernel_that_does_not_reproduce_torch_compile_is_not_called_directly(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were the kernel's argument order learned wrong (here: param and grad swapped), the self-test on scratch
    # inputs must catch it, and every call then goes through torch.compile. For a first pass (Prodigy's sums
    # of grad and param, LAMB's of the grad alone) the sums it returns give it away.
    real_itemgetter = operator.itemgetter

    def swapping_param_and_grad(*indices: int) -> Callable[[Any], Any]:
        return real_itemgetter(*[{0: 1, 1: 0}.get(index, index) for index in indices])

    monkeypatch.setattr(compiled, "operator", SimpleNamespace(itemgetter=swapping_param_and_grad))
    actual = train(name, {}, "compiled")
    assert_same(reference(name, {}), actual, exact=False)
    assert all(variant is not None and not variant.direct for variant in compiled_updates(actual[1]))
    reductions = compiled_reductions(actual[1])
    assert len(reductions) == (0 if name == "adam" else 1)
    assert all(reduction is not None and not reduction.direct for reduction in reductions)


def skipping_the_last_row(real: Callable[..., None]) -> Callable[..., None]:
    def loop(kernel: int, arity: int, column: int, element_bytes: int, table: int, rows: int, *rest: int) -> None:
        real(kernel, arity, column, element_bytes, table, rows - 1, *rest)

    return loop


def splitting_without_offsets(real: Callable[..., None]) -> Callable[..., None]:
    def loop(kernel: int, arity: int, length_column: int, element_bytes: int, table: int, *rest: int) -> None:
        zeros = np.zeros(arity, dtype=np.int64)
        real(kernel, arity, length_column, zeros.ctypes.data, table, *rest)

    return loop


@pytest.mark.parametrize("breakage", [skipping_the_last_row, splitting_without_offsets])
def test_rows_that_do_not_reproduce_torch_compile_are_not_called(
    breakage: Callable[[Callable[..., None]], Callable[..., None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were the C loop over rows wrong (skipping a row, or not moving the pointers where it splits a row among
    # threads), the self-test on scratch rows must catch it. The single-threaded kernel compiled for the rows
    # then makes way for a parallel one, called directly from Python, segment by segment.
    real = compiled._rows_function()
    assert real is not None
    monkeypatch.setattr(compiled, "_rows_function", lambda: breakage(real))
    actual = train("adam", {}, "compiled")
    assert_same(reference("adam", {}), actual, exact=False)
    variants = [variant for variant in compiled_updates(actual[1]) if variant]
    assert [(variant.direct, variant.calls_rows, variant._single_threaded) for variant in variants] == [
        (True, False, False)
    ]


def test_compile_failure_warns_once_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Callable[..., None]:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", broken)
    monkeypatch.setattr(execution, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = train("radam", {}, "compiled")
        train("adam", {}, "compiled")
    messages = [str(warning.message) for warning in caught if "torch.compile failed" in str(warning.message)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0]
    assert_same(reference("radam", {}), actual, exact=True)


def test_auto_compiles_after_enough_eager_work(monkeypatch: pytest.MonkeyPatch) -> None:
    (bucket_size,) = {sum(param.numel() for param in mlp().parameters())}
    monkeypatch.setattr(execution, "AUTO_COMPILE_WORK", 10 * bucket_size)
    expected = reference("adam", {})
    model, optimizer = train("adam", {}, "auto", steps=10)
    (bucket,) = buckets(optimizer)
    assert bucket.compiled is None and bucket.eager_work == 10 * bucket_size
    actual = train("adam", {}, "auto", model=model, optimizer=optimizer, steps=10, start=10)
    assert bucket.compiled is not None
    assert_same(expected, actual, exact=False)


def test_auto_compiles_every_bucket_once_the_buckets_together_did_enough_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # Adafactor's MLP makes four buckets (one per shape), the smallest of 3 elements. The threshold counts the
    # work of all four: after 10 steps of the whole model each bucket compiles, the small ones too, which
    # counted alone would take hundreds of steps to get there.
    model_size = sum(param.numel() for param in mlp().parameters())
    monkeypatch.setattr(execution, "AUTO_COMPILE_WORK", 10 * model_size)
    expected = reference("adafactor", {})
    model, optimizer = train("adafactor", {}, "auto", steps=10)
    every = all_buckets(optimizer)
    assert len(every) == BUCKETS["adafactor"] and min(bucket.numel for bucket in every) == 3
    assert all(bucket.compiled is None for bucket in every)
    assert sum(bucket.eager_work for bucket in every) == 10 * model_size
    actual = train("adafactor", {}, "auto", model=model, optimizer=optimizer, steps=STEPS - 10, start=10)
    # Before torch 2.9 matrix stacks run eagerly (execution.STACKS_COMPILE), and nothing compiles.
    assert all((bucket.compiled is not None) == execution.STACKS_COMPILE for bucket in every)
    assert_same(expected, actual, exact=False)


def test_auto_takes_an_update_compiled_already_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Moving the params rebuilds the bucket, whose eager work starts again at 0; the update compiled for the
    # old bucket has the same constants and costs nothing more, so the new bucket runs it from its first step.
    (bucket_size,) = {sum(param.numel() for param in mlp().parameters())}
    monkeypatch.setattr(execution, "AUTO_COMPILE_WORK", 10 * bucket_size)
    expected = reference("adam", {})
    model, optimizer = train("adam", {}, "auto", steps=12)
    (old,) = buckets(optimizer)
    assert old.compiled is not None
    for param in model.parameters():
        param.data = param.data.clone()
    compilations = CompiledUpdate.compilations
    actual = train("adam", {}, "auto", model=model, optimizer=optimizer, steps=1, start=12)
    (new,) = buckets(optimizer)
    assert new is not old and new.eager_work == 0 and new.compiled is old.compiled
    assert CompiledUpdate.compilations == compilations
    actual = train("adam", {}, "auto", model=model, optimizer=optimizer, steps=STEPS - 13, start=13)
    assert_same(expected, actual, exact=False)
