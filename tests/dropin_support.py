"""What the drop-in tests share: every adaptopt optimizer with settings that exercise it, a small model with
deterministic batches, a training step (with Sophia's Hessian estimate), and deep comparisons of state.

Used by test_checkpoints, test_torch_contract, test_amp, test_master_weights and test_hostile, which run on
one intra-op thread (conftest's `single_thread`): they step tensors of tens of elements, and a second thread
only adds synchronisation, which on a loaded 2-core machine made a 10-step run take 0.4 s instead of 5 ms.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

import adaptopt
from adaptopt import WeightDecay
from adaptopt.base import CommonOptions

FEATURES, HIDDEN, CLASSES, BATCH = 6, 10, 3, 12

# Every registered adaptopt optimizer, with settings under which its particular features act within a few
# steps: warm-ups shorter than the runs, a cosine that decays, Sophia's Hessian estimated every other step.
# Every one gets `WeightDecay(0.01)` unless its settings say otherwise.
OPTIMIZER_SETTINGS: dict[str, dict[str, Any]] = {
    "adam": dict(lr=1e-2),
    "amsgrad": dict(lr=1e-2),
    "adam_warmup": dict(lr=1e-2, warmup=3),
    "adam_warmup_cosine_decay": dict(lr=1e-2, warmup=2, total_steps=10),
    "noam": dict(lr=1.0, warmup=3, d_model=16),
    "radam": dict(lr=1e-2),
    "adabelief": dict(lr=1e-2),
    "sophia": dict(lr=1e-2, rho=0.05),
    "lion": dict(lr=1e-3),
    "adopt": dict(lr=1e-2),
    "ademamix": dict(lr=1e-2, alpha_warmup=4, beta3_warmup=4),
    # Its own decay (a float: taken at y on the normalised gradient) rather than the shared policy.
    "schedule_free_adamw": dict(lr=1e-2, warmup_steps=3, weight_decay=0.01),
    # Its rate, d lr: on this model d grows from d0 from the third step on (2.4 d0 after 5 steps, 23 d0 after 10).
    "prodigy": dict(lr=1.0, d0=1e-4),
    # Its own decay (apex's: inside the trust ratio) and its global-norm clipping, which acts on this model.
    "lamb": dict(lr=1e-2, weight_decay=0.01, max_grad_norm=0.5),
    "adafactor": dict(lr=1e-2),
    # muon_with_adamw: Muon for the weights, AdamW for the biases; its weight_decay is a float, decoupled, both's.
    "muon": dict(lr=1e-2, weight_decay=0.01),
}
NAMES = sorted(OPTIMIZER_SETTINGS)
SUMS_IN_ANOTHER_ORDER = ("prodigy", "lamb")
"""Optimizers whose step sums over many elements (Prodigy's estimate over every param, LAMB's norms): the default
execution sums over a bucket, the reference loop (which master weights and working copies take) param by param,
so the two differ in the last bits of those sums, and from them of the params and the state."""
assert set(NAMES) == set(adaptopt.available()) - {"sgd"}, "a registered optimizer is missing from the settings"

HESSIAN_EVERY = 2


def reference_execution() -> dict[str, Any]:
    """The options that select the reference (per-parameter loop) execution, where the base offers a choice."""
    return {"execution": "reference"} if "execution" in CommonOptions.__annotations__ else {}


def make_optimizer(name: str, params: Iterable[Any], **overrides: Any) -> torch.optim.Optimizer:
    settings = {"weight_decay": WeightDecay(0.01), **OPTIMIZER_SETTINGS[name], **overrides}
    return adaptopt.create(name, params, **settings)


def make_model(dtype: torch.dtype = torch.float64, *, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)).to(
        dtype
    )


def batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(BATCH, FEATURES, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return inputs.to(dtype), labels


def loss_at(model: torch.nn.Module, step: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    inputs, labels = batch(step, dtype)
    return F.cross_entropy(model(inputs).to(wide(dtype)), labels)


def wide(dtype: torch.dtype) -> torch.dtype:
    """The loss is computed in at least fp32, as under autocast."""
    return torch.promote_types(dtype, torch.float32)


def estimate_hessian(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Sophia's Gauss-Newton-Bartlett estimate: the loss on labels sampled from the model's own logits."""
    dtype = next(model.parameters()).dtype
    inputs, _ = batch(step, dtype)
    logits = model(inputs).to(wide(dtype))
    sampler = torch.Generator().manual_seed(5000 + step)
    sampled = torch.multinomial(logits.detach().softmax(-1), 1, generator=sampler).squeeze(-1)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(logits, sampled).backward()
    optimizer.update_hessian(BATCH)  # type: ignore[attr-defined]
    optimizer.zero_grad(set_to_none=True)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: range,
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    optimizer_step: Callable[[], Any] | None = None,
) -> None:
    """Train over the batches numbered `steps`; Sophia also estimates its Hessian every other step."""
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        backward(loss_at(model, step))
        if optimizer_step is None:
            optimizer.step()
        else:
            optimizer_step()
        if isinstance(optimizer, adaptopt.Sophia) and step % HESSIAN_EVERY == HESSIAN_EVERY - 1:
            estimate_hessian(model, optimizer, step)


def snapshot(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of everything the optimizer holds: state by param position, and the groups."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": [copy.deepcopy(optimizer.state.get(p, {})) for p in params],
        "groups": [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups],
        "params": [id(p) for group in optimizer.param_groups for p in group["params"]],
        "values": [p.detach().clone() for p in params],
    }


def assert_identical(actual: Any, expected: Any, where: str = "") -> None:
    """Bitwise equality of nested state: tensors equal in dtype, shape and every bit; other values equal."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__} instead of a tensor"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.device == expected.device, f"{where}: device {actual.device} != {expected.device}"
        if expected.device.type != "meta":
            assert torch.equal(bits(actual), bits(expected)), f"{where} differs"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and set(actual) == set(expected), f"{where}: keys differ"
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{where}: lengths differ"
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{where}[{index}]")
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of `tensor`, so that comparisons are bitwise and NaN equals the same NaN."""
    flat = torch.empty(tensor.numel(), dtype=tensor.dtype, device=tensor.device)  # strides of exactly 1
    return flat.copy_(tensor.detach().reshape(-1)).view(torch.uint8)


def assert_same_params(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    for (name, a), b in zip(actual.named_parameters(), expected.parameters(), strict=True):
        assert_identical(a.detach(), b.detach(), name)
