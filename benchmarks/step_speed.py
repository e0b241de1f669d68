"""How long one optimizer step takes: adaptopt's execution paths against torch.optim and pytorch_optimizer.

    .venv/bin/python benchmarks/step_speed.py                # step times, compile times, memory, one epoch
    .venv/bin/python benchmarks/step_speed.py --no-epoch --repeats 5
    python3 benchmarks/step_speed.py --device cuda --repeats 5   # steps only; memory and epoch are CPU-only

Three parameter sets: the MNIST CNN's (8 tensors, 431k elements), 200 tensors of 10k, 4 tensors of 4M, all
fp32. Every contender has its own copy of the same params; grads come from a backward pass (of a loss that
is linear in the params, so backward is the same for all), after `zero_grad()` (torch's
default, `set_to_none=True`) unless the column says otherwise. Contenders are interleaved in one process:
each repeat runs a few timed steps of every contender in turn, so background load hits all alike; the
figure is the median over all timed steps, after warm-up. adaptopt's default path (`execution="auto"`) is
warmed up until it has compiled its buckets, so its column is the steady state of a long run. Ratios are
to `torch.optim.Adam(fused=True)` measured in the same run.

A second table times the whole iteration (zero_grad, backward, step) of the same runs: with
`zero_grad(set_to_none=False)` backward accumulates into the bucket's grad buffer, which makes the step
cheaper and backward dearer, and only the whole iteration shows the sum.

Peak extra memory during a step is measured in a subprocess with glibc's mmap threshold pinned at 64 KiB,
so every large temporary is a fresh mapping and the peak resident set (reset before the step through
/proc/self/clear_refs) sees it; in units of the largest param.

`--device cuda` times the steps on the GPU (each step's start and end after `torch.cuda.synchronize()`);
the memory and epoch measurements are CPU-only and are skipped there. pytorch_optimizer's contenders are
left out where it is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import adaptopt
from adaptopt import execution
from adaptopt.experiments.model import MnistCnn
from adaptopt.quantization import QuantizedTensor

CASES: dict[str, list[tuple[int, ...]]] = {
    "MNIST CNN (8 tensors, 431k)": [tuple(p.shape) for p in MnistCnn().parameters()],
    "200 tensors of 10k": [(10_000,)] * 200,
    "4 tensors of 4M": [(4_000_000,)] * 4,
    "32 matrices of 256x256": [(256, 256)] * 32,
}
STEPS_PER_REPEAT = {
    "MNIST CNN (8 tensors, 431k)": 20,
    "200 tensors of 10k": 10,
    "4 tensors of 4M": 3,
    "32 matrices of 256x256": 10,
}
DEFAULT_CASES = ["MNIST CNN (8 tensors, 431k)", "200 tensors of 10k", "4 tensors of 4M"]
"""The cases run without `--cases`; the matrices are for the optimizers that take matrices (Adafactor, Muon)."""

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _pytorch_optimizer(name: str, **options: Any) -> Factory:
    return lambda p: getattr(importlib.import_module("pytorch_optimizer"), name)(p, **options)


CONTENDERS: dict[str, Factory] = {
    "torch Adam fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "torch Adam(amsgrad=True) fused": lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True, fused=True),
    "torch Adam foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "torch Adam for-loop": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=False),
    "ours Adam reference": lambda p: adaptopt.Adam(p, execution="reference"),
    "ours Adam bucketed (eager)": lambda p: adaptopt.Adam(p, execution="bucketed"),
    "ours Adam": lambda p: adaptopt.Adam(p),
    "ours Adam, zero_grad(set_to_none=False)": lambda p: adaptopt.Adam(p),
    "ours AMSGrad": lambda p: adaptopt.AMSGrad(p),
    "ours RAdam": lambda p: adaptopt.RAdam(p),
    "ours AdaBelief": lambda p: adaptopt.AdaBelief(p),
    "ours Sophia": lambda p: adaptopt.Sophia(p),
    # The steps `execution="auto"` takes before it compiles a bucket (`AUTO_COMPILE_WORK`).
    "torch Adam(amsgrad=True) foreach": lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True, foreach=True),
    "ours AMSGrad bucketed (eager)": lambda p: adaptopt.AMSGrad(p, execution="bucketed"),
    "ours RAdam bucketed (eager)": lambda p: adaptopt.RAdam(p, execution="bucketed"),
    "ours AdaBelief bucketed (eager)": lambda p: adaptopt.AdaBelief(p, execution="bucketed"),
    "ours Sophia bucketed (eager)": lambda p: adaptopt.Sophia(p, execution="bucketed"),
}


def _schedule_free(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    optimizer = importlib.import_module("schedulefree").AdamWScheduleFree(params, lr=2.5e-3, foreach=True)
    optimizer.train()
    return optimizer


class _TorchMuonWithAdamW(torch.optim.Optimizer):
    """torch's Muon for the 2-D params, torch's fused AdamW for the rest: the peer of `muon_with_adamw`."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        matrices = [p for p in params if p.dim() == 2]
        rest = [p for p in params if p.dim() != 2]
        self.parts: list[torch.optim.Optimizer] = [torch.optim.Muon(matrices, lr=1e-3, adjust_lr_fn="match_rms_adamw")]
        if rest:
            self.parts.append(torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True))
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none)


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# The family beyond the seed, each beside its official code where that is installed (the test extras).
CONTENDERS.update(
    {
        "ours Lion": lambda p: adaptopt.Lion(p),
        "ours ADOPT": lambda p: adaptopt.ADOPT(p),
        "ours AdEMAMix": lambda p: adaptopt.AdEMAMix(p),
        "ours ScheduleFreeAdamW": lambda p: adaptopt.ScheduleFreeAdamW(p),
        # growth_rate=1: the loss is linear, so the distance to its minimum, and d without a cap, grow forever.
        "ours Prodigy": lambda p: adaptopt.Prodigy(p, growth_rate=1.0),
        "ours LAMB": lambda p: adaptopt.LAMB(p),
        "ours Adafactor": lambda p: adaptopt.Adafactor(p),
        "torch Adafactor foreach": lambda p: torch.optim.Adafactor(p, foreach=True),
        "torch Adafactor for-loop": lambda p: torch.optim.Adafactor(p, foreach=False),
        "ours Muon (+AdamW for non-matrices)": lambda p: adaptopt.muon_with_adamw(p),
    }
)
if hasattr(torch.optim, "Muon"):
    CONTENDERS["torch Muon (+fused AdamW for non-matrices)"] = _TorchMuonWithAdamW
if _available("prodigyopt"):
    CONTENDERS["prodigyopt Prodigy"] = lambda p: importlib.import_module("prodigyopt").Prodigy(p, growth_rate=1.0)
if _available("lion_pytorch"):
    CONTENDERS["lion_pytorch Lion"] = lambda p: importlib.import_module("lion_pytorch").Lion(p)
if _available("schedulefree"):
    CONTENDERS["schedulefree AdamWScheduleFree (foreach)"] = _schedule_free
if _available("pytorch_optimizer"):
    CONTENDERS["pytorch_optimizer AdaBelief"] = _pytorch_optimizer("AdaBelief", rectify=True)
    CONTENDERS["pytorch_optimizer RAdam"] = _pytorch_optimizer("RAdam")
    CONTENDERS["pytorch_optimizer ADOPT"] = _pytorch_optimizer("ADOPT")
    CONTENDERS["pytorch_optimizer AdEMAMix"] = _pytorch_optimizer("AdEMAMix", alpha=2.0)
    CONTENDERS["pytorch_optimizer Lamb"] = _pytorch_optimizer("Lamb", max_grad_norm=1.0, pre_norm=True)
# Low-bit state (issue 14): the fused decode, update and encode, against torchao's 8-bit AdamW where installed.
CONTENDERS.update(
    {
        "ours Adam 8-bit state (compiled)": lambda p: adaptopt.Adam(p, state_dtype="8bit", execution="compiled"),
        "ours Adam 4-bit state (compiled)": lambda p: adaptopt.Adam(p, state_dtype="4bit", execution="compiled"),
        "ours Adam 8-bit state (eager)": lambda p: adaptopt.Adam(p, state_dtype="8bit", execution="bucketed"),
        "ours Adam 8-bit state (reference loop)": lambda p: adaptopt.Adam(p, state_dtype="8bit", execution="reference"),
    }
)
if _available("torchao"):
    CONTENDERS["torchao AdamW8bit"] = lambda p: importlib.import_module("torchao.optim").AdamW8bit(p, weight_decay=0.0)
MATRIX_CASES = {"MNIST CNN (8 tensors, 431k)", "32 matrices of 256x256"}
ONLY_IN: dict[str, set[str]] = {
    "ours Muon (+AdamW for non-matrices)": MATRIX_CASES,
    "torch Muon (+fused AdamW for non-matrices)": MATRIX_CASES,
}
"""Contenders that only make sense where there are matrices (elsewhere their cell is empty)."""
KEEPS_GRADS = {"ours Adam, zero_grad(set_to_none=False)"}
WARM_UP_STEPS = 3000
"""At most this many warm-up steps: about six epochs of MNIST at batch 128, as long as a short run."""


class ParamBank(nn.Module):
    """Params of the given shapes and a loss linear in them, so backward hands every param a fresh grad."""

    def __init__(self, shapes: list[tuple[int, ...]], device: str = "cpu") -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterList(
            nn.Parameter((torch.randn(s, generator=generator) * 0.05).to(device)) for s in shapes
        )
        self.directions = [torch.randn(s, generator=generator).to(device) for s in shapes]

    def loss(self) -> torch.Tensor:
        return sum((p * d).sum() for p, d in zip(self.weights, self.directions, strict=True))  # type: ignore[return-value]


class Contender:
    def __init__(self, name: str, shapes: list[tuple[int, ...]], device: str = "cpu") -> None:
        self.name = name
        self.bank = ParamBank(shapes, device)
        self.synchronize = torch.device(device).type == "cuda"
        self.optimizer = CONTENDERS[name](list(self.bank.weights))
        self.set_to_none = name not in KEEPS_GRADS
        self.times: list[float] = []
        self.loop_times: list[float] = []
        self.compile_seconds: list[float] = []

    def backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        self.bank.loss().backward()

    def timed_step(self) -> float:
        """One training iteration; records and returns the time of its `step()` alone."""
        if self.synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.backward()
        if self.synchronize:
            torch.cuda.synchronize()
        stepping = time.perf_counter()
        self.optimizer.step()
        if self.synchronize:
            torch.cuda.synchronize()
        done = time.perf_counter()
        self.loop_times.append(done - start)
        return done - stepping

    def warm_up(self) -> None:
        for _ in range(3):
            self.timed_step()
        # adaptopt's auto path compiles an optimizer's buckets once they have done AUTO_COMPILE_WORK
        # element-updates between them: get there (for each of MuonWithAdamW's parts), and time the steps that
        # compile, within WARM_UP_STEPS. A part that would take longer (MuonWithAdamW's AdamW part on the
        # MNIST CNN, its 580 biases) stays eager, as in a real run of that length.
        parts = (
            [self.optimizer.muon, self.optimizer.adamw]
            if isinstance(self.optimizer, adaptopt.MuonWithAdamW)
            else [self.optimizer]
        )
        auto = [part for part in parts if getattr(part, "_buckets", None) is not None and part._buckets.mode == "auto"]
        steps = [math.ceil(execution.AUTO_COMPILE_WORK / sum(b.numel for b in execution.buckets(p))) for p in auto]
        pending = [
            bucket
            for part, needed in zip(auto, steps, strict=True)
            if needed <= WARM_UP_STEPS
            for bucket in execution.buckets(part)
            if bucket.compiled is None and not bucket.compile_failed
        ]
        if pending:
            for _ in range(min(WARM_UP_STEPS, max(steps) + 1)):
                was = [b.compiled for b in pending]
                seconds = self.timed_step()
                if any(b.compiled is not None and old is None for b, old in zip(pending, was, strict=True)):
                    self.compile_seconds.append(seconds)
                if all(b.compiled is not None or b.compile_failed for b in pending):
                    break
            for _ in range(3):
                self.timed_step()


def measure(
    repeats: int,
    case_names: list[str],
    names: list[str],
    device: str = "cpu",
    report: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every contender's step times on every case; `report(case, its results)` as each case finishes, so a
    long run shows its figures as it goes (the whole family on the four cases takes the better part of an
    hour on two cores)."""
    results: dict[str, dict[str, Any]] = {}
    for case in case_names:
        contenders = [Contender(name, CASES[case], device) for name in names if case in ONLY_IN.get(name, {case})]
        for contender in contenders:
            contender.warm_up()
        for _ in range(repeats):
            for contender in contenders:
                for _ in range(STEPS_PER_REPEAT[case]):
                    contender.times.append(contender.timed_step())
        results[case] = {
            c.name: {
                "median_ms": 1e3 * statistics.median(c.times),
                "loop_median_ms": 1e3 * statistics.median(c.loop_times[-len(c.times) :]),
                "compile_s": c.compile_seconds,
            }
            for c in contenders
        }
        if report is not None:
            report(case, results[case])
    return results


def print_table(results: dict[str, dict[str, Any]], key: str = "median_ms") -> None:
    cases = list(results)
    print("| contender | " + " | ".join(f"{case}: ms (x fused)" for case in cases) + " |")
    print("|---|" + "---|" * len(cases))
    names = list(dict.fromkeys(name for case in cases for name in results[case]))
    for name in names:
        cells = []
        for case in cases:
            if name not in results[case]:
                cells.append("—")
                continue
            fused = results[case]["torch Adam fused"][key]
            ms = results[case][name][key]
            cells.append(f"{ms:.3f} ({ms / fused:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    if key != "median_ms":
        return
    for case in cases:
        compiles = {n: r["compile_s"] for n, r in results[case].items() if r["compile_s"]}
        if compiles:
            text = ", ".join(f"{n.removeprefix('ours ')} {max(s):.1f} s" for n, s in compiles.items())
            print(f"first step with compilation, {case}: {text}")


# ----------------------------------------------------------------------------------------------------------
# Memory, in a subprocess with a pinned mmap threshold.

MEMORY_MODES = {"torch Adam fused": "", "reference": "reference", "bucketed": "bucketed", "compiled": "compiled"}


def _resident(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _peak_extra_bytes(step: Callable[[], Any]) -> int:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak resident set to the current one
    before = _resident("VmRSS:")
    step()
    return _resident("VmHWM:") - before


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor and low-bit code book entry of the optimizer's state (codes and scales)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, QuantizedTensor):
                total += value.nbytes
            elif isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def memory_child(case: str, name: str, optimizer_name: str) -> None:
    bank = ParamBank(CASES[case])
    params = list(bank.weights)
    if MEMORY_MODES[name]:
        # "adam@8bit": Adam with that state_dtype.
        base_name, _, state_dtype = optimizer_name.partition("@")
        options = {"state_dtype": state_dtype} if state_dtype else {}
        optimizer: torch.optim.Optimizer = adaptopt.create(base_name, params, execution=MEMORY_MODES[name], **options)
    else:
        optimizer = torch.optim.Adam(params, fused=True)
    for _ in range(10):  # past RAdam's and AdaBelief's first steps, which skip the adaptive branch
        optimizer.zero_grad()
        bank.loss().backward()
        optimizer.step()
    peaks = []
    for _ in range(3):
        optimizer.zero_grad()
        bank.loss().backward()
        peaks.append(_peak_extra_bytes(optimizer.step))
    largest = max(p.numel() * p.element_size() for p in params)
    state_per_param = _state_bytes(optimizer) / sum(p.numel() for p in params)
    print(json.dumps({"extra_bytes": min(peaks), "largest_param_bytes": largest, "state_per_param": state_per_param}))


MEMORY_OPTIMIZERS = ["adam", "radam", "adabelief", "sophia", "adam@bfloat16", "adam@8bit", "adam@4bit", "lion@8bit"]
"""`--memory`'s rows: optimizer names, with `@` a state_dtype (whose step the table measures on each path)."""


def measure_memory(case: str, optimizer_names: list[str]) -> None:
    print(f"\npeak extra memory during one step, {case}, in units of the largest param (state: bytes a param):")
    print("| optimizer | " + " | ".join(MEMORY_MODES) + " | state |")
    print("|---|" + "---|" * (len(MEMORY_MODES) + 1))
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for optimizer_name in optimizer_names:
        cells, state_per_param = [], 0.0
        for name in MEMORY_MODES:
            command = [sys.executable, __file__, "--memory-child", case, name, optimizer_name]
            output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout
            report = json.loads(output.strip().splitlines()[-1])
            cells.append(f"{report['extra_bytes'] / report['largest_param_bytes']:.2f}")
            state_per_param = report["state_per_param"] if name != "torch Adam fused" else state_per_param
        print(f"| {optimizer_name} | " + " | ".join(cells) + f" | {state_per_param:.2f} |")


# ----------------------------------------------------------------------------------------------------------
# One MNIST-CNN epoch end to end.


def epoch_seconds(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], batches: int) -> float:
    torch.manual_seed(0)
    model = MnistCnn()
    optimizer = make(list(model.parameters()))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batches, 64, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (batches, 64), generator=generator)
    start = time.perf_counter()
    for batch in range(batches):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    return time.perf_counter() - start


def measure_epoch(batches: int, repeats: int) -> None:
    contenders: dict[str, Factory] = {
        "torch Adam fused": CONTENDERS["torch Adam fused"],
        "ours Adam (default)": CONTENDERS["ours Adam"],
    }
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, make in contenders.items():
            seconds[name].append(epoch_seconds(make, batches))
    fused = statistics.median(seconds["torch Adam fused"])
    print(f"\nMNIST-CNN epoch ({batches} batches of 64, random data of MNIST's shape), median of {repeats}:")
    for name, values in seconds.items():
        print(f"  {name}: {statistics.median(values):.2f} s ({statistics.median(values) / fused:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="where the params live: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, choices=list(CASES))
    parser.add_argument("--contenders", nargs="*", default=list(CONTENDERS))
    parser.add_argument("--no-steps", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-epoch", action="store_true")
    parser.add_argument("--epoch-batches", type=int, default=938)
    parser.add_argument("--epoch-repeats", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, help="torch threads; 1 when other jobs load the cores (OpenMP barriers then stall)"
    )
    parser.add_argument(
        "--memory-optimizers",
        nargs="*",
        default=MEMORY_OPTIMIZERS,
        help="rows of the memory table (name[@state_dtype])",
    )
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
        if not (args.no_memory and args.no_epoch):
            print("memory and epoch are measured on the CPU only: skipped with --device", args.device, file=sys.stderr)
        args.no_memory = args.no_epoch = True
    else:
        where = f"{device.type}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; median step time, ms (ratio to fused)\n")
    if not args.no_steps:

        def report(case: str, case_results: dict[str, Any]) -> None:
            print(f"### {case}\n")
            print_table({case: case_results})
            print(flush=True)

        results = measure(
            args.repeats, args.cases, args.contenders, args.device, report if len(args.cases) > 1 else None
        )
        print("### every case\n")
        print_table(results)
        print("\nThe whole iteration, zero_grad + backward (of a loss linear in the params) + step, same runs:\n")
        print_table(results, key="loop_median_ms")
    if not args.no_memory:
        measure_memory("4 tensors of 4M", args.memory_optimizers)
    if not args.no_epoch:
        measure_epoch(args.epoch_batches, args.epoch_repeats)


if __name__ == "__main__":
    main()
