"""How close the 4 x 4M step is to what memory allows: steps against kernels that only move the same bytes.

    .venv/bin/python benchmarks/bandwidth_floor.py --repeats 15

Adam's step reads param, grad, exp_avg and exp_avg_sq and writes three of them back: 7 passes over 64 MB
here. AMSGrad also reads and writes its running maximum: 9 passes. Timed side by side, interleaved, medians,
ratios to `torch.optim.Adam(fused=True)`, in `step_speed.py`'s conditions: before every step, of every
contender, backward (or, for the kernels, the same multiplication) hands over 4 new grads of 4M.

* the optimizers' steps (ours compiled, torch's fused);
* "7 passes" and "9 passes": `torch.compile`d kernels that only add each grad into the three or four other
  buffers, the same bytes read and written as Adam's and AMSGrad's steps with no arithmetic to speak of: the
  floor that memory bandwidth sets. Their other buffers are where a bucket keeps its own (`bucket_buffer`:
  on huge pages where Linux allows it), the grads where torch's allocator puts them, as in our steps.
  AdEMAMix, with three moments, moves AMSGrad's 9.
* "11 passes in 3 kernels", LAMB's floor. Its global grad norm must be known before the moments are updated
  (a pass over the grads), and each tensor's norms of the param and of the update before the param moves:
  one kernel reads grad, param and the moments and writes the moments (with the norms), one more reads the
  param and the moments and writes the param. (Writing the update into the grad instead costs the same.)
* "12 passes in 2 kernels", Prodigy's floor. Its estimate of d, which the step divides by, needs sums over
  every param first: a kernel reads grad, param, its initial value and s and writes s (with the sums), then
  Adam's 7 passes.

(No kernel here does an optimizer's arithmetic: that is written once, in the optimizers, and timed as their
steps.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import adaptopt
from adaptopt.memory import bucket_buffer

PARAMS = 4
NUMEL = 4_000_000


def _optimizer_step(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> Callable[[], float]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(NUMEL, generator=generator) * 0.05) for _ in range(PARAMS)]
    directions = [torch.randn(NUMEL, generator=generator) for _ in range(PARAMS)]
    optimizer = make(params)

    def step() -> float:
        optimizer.zero_grad()
        sum((param * direction).sum() for param, direction in zip(params, directions, strict=True)).backward()
        start = time.perf_counter()
        optimizer.step()
        return time.perf_counter() - start

    return step


@torch.compile(dynamic=True)
def _seven_passes(param: torch.Tensor, grad: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
    param.add_(grad)
    first.add_(grad)
    second.add_(grad)


@torch.compile(dynamic=True)
def _nine_passes(
    param: torch.Tensor, grad: torch.Tensor, first: torch.Tensor, second: torch.Tensor, third: torch.Tensor
) -> None:
    param.add_(grad)
    first.add_(grad)
    second.add_(grad)
    third.add_(grad)


@torch.compile(dynamic=True)
def _grad_norm_pass(grad: torch.Tensor) -> torch.Tensor:
    return grad.square().sum()


@torch.compile(dynamic=True)
def _moments_and_norms_pass(
    param: torch.Tensor, grad: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> torch.Tensor:
    first.add_(grad)
    second.add_(grad)
    return param.square().sum() + (first + second).square().sum()


@torch.compile(dynamic=True)
def _param_pass(param: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
    param.add_(first + second)


def _eleven_passes_in_three_kernels(
    param: torch.Tensor, grad: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> None:
    _grad_norm_pass(grad)
    _moments_and_norms_pass(param, grad, first, second)
    _param_pass(param, first, second)


@torch.compile(dynamic=True)
def _distance_pass(param: torch.Tensor, grad: torch.Tensor, initial: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s.add_(grad)
    return (grad * (initial - param)).sum() + s.abs().sum()


def _twelve_passes_in_two_kernels(
    param: torch.Tensor,
    grad: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    initial: torch.Tensor,
    s: torch.Tensor,
) -> None:
    _distance_pass(param, grad, initial, s)
    _seven_passes(param, grad, first, second)


def _kernel_step(kernel: Callable[..., None], buffers: int) -> Callable[[], float]:
    generator = torch.Generator().manual_seed(0)
    flat = [bucket_buffer(PARAMS * NUMEL, torch.float32, torch.device("cpu")) for _ in range(buffers - 1)]
    for buffer in flat:
        buffer.uniform_(generator=generator)
    directions = [torch.randn(NUMEL, generator=generator) for _ in range(PARAMS)]
    parts = [[buffer[index * NUMEL : (index + 1) * NUMEL] for buffer in flat] for index in range(PARAMS)]

    def step() -> float:
        grads = [direction * 1.0 for direction in directions]  # new tensors, as backward hands them over
        start = time.perf_counter()
        for (param, *state), grad in zip(parts, grads, strict=True):
            kernel(param, grad, *state)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contenders = {
        "torch Adam fused": _optimizer_step(lambda p: torch.optim.Adam(p, fused=True)),
        "torch Adam(amsgrad=True) fused": _optimizer_step(lambda p: torch.optim.Adam(p, amsgrad=True, fused=True)),
        "ours Adam (compiled)": _optimizer_step(lambda p: adaptopt.Adam(p, execution="compiled")),
        "ours AMSGrad (compiled)": _optimizer_step(lambda p: adaptopt.AMSGrad(p, execution="compiled")),
        "ours AdEMAMix (compiled)": _optimizer_step(lambda p: adaptopt.AdEMAMix(p, execution="compiled")),
        "ours LAMB (compiled)": _optimizer_step(lambda p: adaptopt.LAMB(p, execution="compiled")),
        # growth_rate=1, as in step_speed.py: the loss is linear, and d without a cap would grow forever.
        "ours Prodigy (compiled)": _optimizer_step(
            lambda p: adaptopt.Prodigy(p, growth_rate=1.0, execution="compiled")
        ),
        "7 passes": _kernel_step(_seven_passes, 4),
        "9 passes": _kernel_step(_nine_passes, 5),
        "11 passes in 3 kernels (LAMB's floor)": _kernel_step(_eleven_passes_in_three_kernels, 4),
        "12 passes in 2 kernels (Prodigy's floor)": _kernel_step(_twelve_passes_in_two_kernels, 6),
    }
    for step in contenders.values():  # compile, and leave the first steps out
        for _ in range(3):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, step in contenders.items():
            for _ in range(3):
                seconds[name].append(step())
    fused = statistics.median(seconds["torch Adam fused"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {PARAMS} x {NUMEL} fp32, median ms")
    print("| contender | ms (x fused Adam) |")
    print("|---|---|")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"| {name} | {1e3 * median:.2f} ({median / fused:.2f}x) |")


if __name__ == "__main__":
    main()
