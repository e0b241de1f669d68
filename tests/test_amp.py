"""Mixed precision: torch.amp.GradScaler and autocast with every adaptopt optimizer.

GradScaler's scale is a power of two, and multiplying by a power of two commutes with rounding, so a run
with a scaler must be *bitwise* equal to the same run without one (as long as nothing overflows); and a
step in which a grad is inf or nan must be skipped without changing anything.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import adaptopt
from dropin_support import (
    NAMES,
    SUMS_IN_ANOTHER_ORDER,
    assert_identical,
    assert_same_params,
    make_model,
    make_optimizer,
    reference_execution,
    snapshot,
    train,
)

pytestmark = pytest.mark.usefixtures("single_thread")


class Autocast(torch.nn.Module):
    """A model whose forward runs under autocast to bf16 (the CPU's low-precision autocast dtype)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out: torch.Tensor = self.inner(inputs)
        return out


def with_scaler(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, steps: range) -> None:
    def step() -> None:
        for stepped in scaled_parts(optimizer):
            scaler.step(stepped)
        scaler.update()

    train(model, optimizer, steps, backward=lambda loss: scaler.scale(loss).backward(), optimizer_step=step)


def scaled_parts(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """What `scaler.step` is called on: the optimizer; for MuonWithAdamW with fp16 params, its Muon and its AdamW,
    each (GradScaler steps several optimizers per update). MuonWithAdamW does not pass on GradScaler's opt-in
    (`_step_supports_amp_scaling`) of the master-weight optimizers it holds, so `scaler.step` on it unscales
    the grads in place itself, which GradScaler refuses for fp16 grads ("Attempting to unscale FP16
    gradients"); stepped one by one, each unscales into its fp32 master weights."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    if isinstance(optimizer, adaptopt.MuonWithAdamW) and any(param.dtype == torch.float16 for param in params):
        return [optimizer.muon, optimizer.adamw]
    return [optimizer]


VARIANTS: dict[str, tuple[torch.dtype, bool, dict[str, Any]]] = {
    "fp32": (torch.float32, False, {}),
    "fp32-autocast-bf16": (torch.float32, True, {}),
    "bf16-master-weights": (torch.bfloat16, False, {"master_weights": True}),
    "fp32-bf16-state": (torch.float32, False, {"state_dtype": torch.bfloat16}),
}


def build(name: str, variant: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    dtype, autocast, options = VARIANTS[variant]
    model = make_model(dtype)
    optimizer = make_optimizer(name, model.parameters(), **options)
    return (Autocast(model) if autocast else model), optimizer


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", NAMES)
def test_training_with_a_grad_scaler_equals_training_without(name: str, variant: str) -> None:
    scaled_model, scaled = build(name, variant)
    plain_model, plain = build(name, variant)
    scaler = torch.amp.GradScaler("cpu", growth_interval=3)
    with_scaler(scaled_model, scaled, scaler, range(8))
    train(plain_model, plain, range(8))
    assert scaler.get_scale() == 2.0**18, "the scale should have grown twice, with no step skipped"
    assert_same_params(scaled_model, plain_model)
    assert_identical(scaled.state_dict(), plain.state_dict())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SKIP_VARIANTS: dict[str, tuple[torch.dtype, dict[str, Any]]] = {
    "fp32": (torch.float32, {}),
    "bf16-master-weights": (torch.bfloat16, {"master_weights": True}),
    "fp16-master-weights": (torch.float16, {"master_weights": True}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("variant", sorted(SKIP_VARIANTS))
@pytest.mark.parametrize("name", NAMES)
def test_an_inf_or_nan_grad_skips_the_step_and_changes_nothing(
    name: str, variant: str, bad: float, device: str
) -> None:
    dtype, options = SKIP_VARIANTS[variant]
    model = make_model(dtype).to(device)
    optimizer = make_optimizer(name, model.parameters(), **options)
    # A small initial scale, so that fp16 does not overflow in the steps before the bad one.
    scaler = torch.amp.GradScaler(device, init_scale=256.0)
    with_scaler(model, optimizer, scaler, range(3))
    assert all(state["step"] == 3 for state in optimizer.state.values()), "a step before the bad one was skipped"
    stepped_parts = scaled_parts(optimizer)
    before = [snapshot(part) for part in stepped_parts]

    optimizer.zero_grad()
    scaler.scale(
        torch.nn.functional.mse_loss(
            model(torch.ones(2, 6, dtype=dtype, device=device)), torch.zeros(2, 3, dtype=dtype, device=device)
        )
    ).backward()
    poisoned = list(model.parameters())[2]
    poisoned.grad[1, 4] = bad  # type: ignore[index]
    for part in stepped_parts:
        scaler.step(part)
    scaler.update()
    for part, then in zip(stepped_parts, before, strict=True):
        if any(param is poisoned for group in part.param_groups for param in group["params"]):
            assert_identical(snapshot(part), then)
        else:
            # MuonWithAdamW's AdamW, stepped by the scaler on its own (fp16, see `scaled_parts`): GradScaler
            # decides for each optimizer from its own grads, and AdamW's are finite.
            assert all(state["step"] == 4 for state in part.state.values())
    assert scaler.get_scale() == 128.0


def test_fp16_master_weights_unscale_into_fp32() -> None:
    # Grads of 1e-9 flush to zero in fp16 (smallest subnormal 6e-8). Scaled by 2**16 they are fp16 normals;
    # the optimizer unscales them into fp32, so the update sees them (GradScaler itself refuses to unscale
    # fp16 grads in place, for exactly this reason).
    true_grad = torch.full((5,), 1e-9)
    half = torch.zeros(5, dtype=torch.float16, requires_grad=True)
    optimizer = make_optimizer("adam", [half], master_weights=True, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(3):
        optimizer.zero_grad()
        scaler.scale((half.float() * true_grad).sum()).backward()
        assert half.grad is not None and half.grad.dtype == torch.float16
        scaler.step(optimizer)
        scaler.update()
    reference = torch.zeros(5, requires_grad=True)
    fp32 = make_optimizer("adam", [reference], lr=1e-3)
    for _ in range(3):
        reference.grad = true_grad.clone()
        fp32.step()
    # The moments must hold the unscaled grads; fp16's rounding of 2**16 * 1e-9 leaves 11 significant bits.
    ours, expected = optimizer.state[half], fp32.state[reference]
    torch.testing.assert_close(ours["master_weight"], reference.detach(), rtol=1e-3, atol=0)
    torch.testing.assert_close(ours["exp_avg"], expected["exp_avg"], rtol=1e-3, atol=0)
    torch.testing.assert_close(ours["exp_avg_sq"], expected["exp_avg_sq"], rtol=2e-3, atol=0)


def test_explicit_unscale_then_clip_with_master_weights() -> None:
    # scaler.unscale_ before clipping: the scaler unscales the bf16 grads in place and the step must not
    # unscale them a second time.
    scaled_model, plain_model = make_model(torch.bfloat16), make_model(torch.bfloat16)
    scaled = make_optimizer("adabelief", scaled_model.parameters(), master_weights=True)
    plain = make_optimizer("adabelief", plain_model.parameters(), master_weights=True)
    scaler = torch.amp.GradScaler("cpu")

    def unscale_clip_step() -> None:
        scaler.unscale_(scaled)
        torch.nn.utils.clip_grad_norm_(scaled_model.parameters(), max_norm=0.1)
        scaler.step(scaled)
        scaler.update()

    def clip_step() -> None:
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), max_norm=0.1)
        plain.step()

    backward = lambda loss: scaler.scale(loss).backward()  # noqa: E731
    train(scaled_model, scaled, range(5), backward=backward, optimizer_step=unscale_clip_step)
    train(plain_model, plain, range(5), optimizer_step=clip_step)
    assert_same_params(scaled_model, plain_model)


@pytest.mark.parametrize("name", NAMES)
def test_master_and_plain_groups_under_one_scaler(name: str) -> None:
    # With master weights in one group, the scaler leaves the unscaling of *every* group to the step.
    # Under a scaler every group steps through working copies, by the reference loop: for the optimizers whose
    # sums then go in another order (Prodigy, LAMB) the run without a scaler is the reference loop's too.
    def build_mixed(**options: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = make_model(torch.float32)
        model[0].to(torch.bfloat16)
        if name == "muon":  # muon_with_adamw takes params, not groups: the second layer's are added
            optimizer = make_optimizer(name, model[0].parameters(), master_weights=True, **options)
            optimizer.add_param_group({"params": [model[2].weight], "use_muon": True, "master_weights": False})
            optimizer.add_param_group({"params": [model[2].bias], "use_muon": False, "master_weights": False})
            return Autocast(model), optimizer
        groups = [{"params": model[0].parameters(), "master_weights": True}, {"params": model[2].parameters()}]
        return Autocast(model), make_optimizer(name, groups, **options)

    plain_options = reference_execution() if name in SUMS_IN_ANOTHER_ORDER else {}
    (scaled_model, scaled), (plain_model, plain) = build_mixed(), build_mixed(**plain_options)
    scaler = torch.amp.GradScaler("cpu")
    with_scaler(scaled_model, scaled, scaler, range(6))
    train(plain_model, plain, range(6))
    assert_same_params(scaled_model, plain_model)
    assert_identical(scaled.state_dict(), plain.state_dict())
