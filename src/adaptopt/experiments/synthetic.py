r"""Synthetic problems from the papers: the AMSGrad paper's online counterexample, and Rosenbrock.

**Online counterexample** (Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018, §5):
on $\mathcal{F} = [-1, 1]$ the losses are

$$f_t(x) = \begin{cases} 1010\,x & t \bmod 101 = 1 \\ -10\,x & \text{otherwise,} \end{cases}$$

so every 101 steps sum to $10x$ and the best fixed point is $x = -1$. Adam with $\beta_1 = 0.9$,
$\beta_2 = 0.99$ and $\alpha_t = \alpha/\sqrt t$ forgets the rare large gradient within a few dozen steps,
so the 100 small ones win and it converges to the worst point, $x = +1$; AMSGrad's $\hat v_t = \max(\hat
v_{t-1}, v_t)$ remembers it and converges to $-1$. Every step is projected back onto $[-1, 1]$. Noam with
$d_{model} = 1$ and a warm-up of 1 step is exactly the $\alpha/\sqrt t$ schedule, so it gets no second one.
This loss has no curvature, so Sophia runs with $h = 0$: clipped sign-momentum steps. ADOPT runs without
its clipping, as analysed in its paper (Taniguchi et al., 2024): the clip bounds the normalised gradient by
$t^{1/4}$, which here cuts the rare large gradient down to a few times a small one, and it then goes the
way of Adam; unclipped, it converges to $-1$ with $\beta_2 = 0.99$ as the paper proves. AdEMAMix keeps its
slow $\beta_3 = 0.9999$ beside the paper's pair. Prodigy and LAMB take steps relative to a distance, and
here there is none to start from: LAMB moves each tensor by its learning rate times the tensor's norm, 0 at
$x_0 = 0$, and Prodigy's estimate $d$ of the distance to travel stays near its $d_0 = 10^{-6}$ (the
schedule multiplies its lr, a factor of $d$); both stay within $2 \cdot 10^{-6}$ of 0. Adafactor goes to
$+1$ as Adam does. `muon`'s $x$ is a vector, which `muon_with_adamw` gives to its AdamW: with the paper's
betas and no decay (as for the rest of the family), that is Adam (both problems' points are vectors).

**Rosenbrock**, $f(x, y) = (1 - x)^2 + 100 (y - x^2)^2$ from $(-1.2, 1)$, minimum at $(1, 1)$. Sophia's
Hessian estimate is the Gauss-Newton-Bartlett one of a least-squares loss: $f = \tfrac12 \lVert r \rVert^2$
with residuals $r = \sqrt 2\,(1 - x,\ 10 (y - x^2))$, and $\hat g = J_r^\top \varepsilon$ with
$\varepsilon \sim N(0, I)$ has $E[\hat g \odot \hat g] = \mathrm{diag}(J_r^\top J_r)$, the Gauss-Newton
diagonal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..optimizers import Sophia
from .report import pyplot, save_figure

__all__ = ["ONLINE_STEPS", "ROSENBROCK_STEPS", "online_counterexample", "rosenbrock", "run_all"]

ONLINE_PERIOD = 101
ONLINE_LARGE, ONLINE_SMALL = 1010.0, -10.0
ONLINE_ALPHA = 0.5
ONLINE_STEPS = 101 * 200
ROSENBROCK_START = (-1.2, 1.0)
ROSENBROCK_STEPS = 3000

# The online problem uses the paper's betas for the whole Adam family.
_ONLINE_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "noam": {"d_model": 1, "warmup": 1},
    "sophia": {"betas": (0.9, 0.99)},
    "adopt": {"clip_lambda": None},
    "ademamix": {"betas": (0.9, 0.99, 0.9999)},
    # x is a vector: muon_with_adamw gives it to its AdamW, whose betas are `adamw_betas`.
    "muon": {"adamw_betas": (0.9, 0.99), "weight_decay": 0.0},
    "sgd": {"momentum": 0.0},
}
# Rosenbrock: the Adam family at a step that crosses the valley in a few thousand steps; SGD needs
# lr < 2 / L with L ~ 1300 at the start, Noam's lr is its peak-matching scale for a 5% warm-up. RAdam's and
# AdaBelief's first steps would be plain SGD at that lr, which flings the point out of the steep valley
# (measured: to 1e57), so they skip the update until the variance is rectifiable instead. Lion's sign steps
# move each coordinate by lr, so its lr is the precision it ends at: 2e-3. The gradient shrinks by orders of
# magnitude along the valley, so ADOPT's second moment, which starts at g_0^2 and is not bias-corrected,
# forgets the start's gradient only with beta2 = 0.99 (with its 0.9999 it ends at (-0.54, 0.30)), and
# Schedule-Free gets the same beta2. AdEMAMix's slow momentum with beta3 = 0.9999 remembers the whole
# descent and carries the point out of the curving valley (measured: to (6.5, 42)); 0.999 with the
# paper's warm-ups over the whole run follows it. Prodigy estimates its own step: at lr 1 (its default, a
# factor of the estimate) it ends 1.5e-7 from the minimum. LAMB moves the point by lr times its norm every step
# (the trust ratio, always on with use_nvlamb, and without apex's decay, which pulls the point to 0): 1e-2 ends
# 0.036 from the minimum, circling it at that step; at 3e-3 its steps shrink with the norm on the way through
# the origin, where it stays. Adafactor at the 0.02 of the rest ends 0.13 from the minimum (0.30 at its default
# 1e-2): its steps are relative, that rate times the point's RMS, and their RMS is clipped at 1. muon: its AdamW
# (the point is a vector) without decay, 4e-4 from the minimum; Moonshot's default decay of 0.1 pulls it 0.12 off.
_ROSENBROCK_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "radam": {"degenerate_to_sgd": False},
    "adabelief": {"degenerate_to_sgd": False},
    "adam_warmup": {"warmup": ROSENBROCK_STEPS // 20},
    "adam_warmup_cosine_decay": {"warmup": ROSENBROCK_STEPS // 20, "total_steps": ROSENBROCK_STEPS},
    "noam": {"warmup": ROSENBROCK_STEPS // 20, "lr": 0.02 * math.sqrt(512 * ROSENBROCK_STEPS // 20)},
    "sophia": {"lr": 0.02, "rho": 0.05},
    "lion": {"lr": 2e-3},
    "adopt": {"betas": (0.9, 0.99)},
    "ademamix": {
        "betas": (0.9, 0.999, 0.999),
        "alpha_warmup": ROSENBROCK_STEPS,
        "beta3_warmup": ROSENBROCK_STEPS,
    },
    "schedule_free_adamw": {"betas": (0.9, 0.99), "warmup_steps": ROSENBROCK_STEPS // 20},
    "prodigy": {"lr": 1.0},
    "lamb": {"lr": 1e-2, "weight_decay": 0.0, "use_nvlamb": True},
    "muon": {"lr": 0.02, "weight_decay": 0.0},
    "sgd": {"lr": 5e-4, "momentum": 0.9},
}


def _uses_betas(name: str) -> bool:
    return "betas" in registry.describe(name).defaults


def online_counterexample(name: str, steps: int = ONLINE_STEPS, alpha: float = ONLINE_ALPHA) -> list[float]:
    """The iterates $x_1, \\dots, x_T$ of optimizer `name` on the online problem, starting from $x_0 = 0$."""
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    hyperparameters: dict[str, Any] = {"betas": (0.9, 0.99)} if _uses_betas(name) else {}
    hyperparameters.update(_ONLINE_HYPERPARAMETERS.get(name, {}))
    optimizer = registry.create(name, [x], lr=alpha, **hyperparameters)
    own_schedule = name == "noam"
    large = torch.tensor([ONLINE_LARGE], dtype=torch.float64)
    small = torch.tensor([ONLINE_SMALL], dtype=torch.float64)
    iterates: list[float] = []
    for t in range(1, steps + 1):
        if not own_schedule:
            for group in optimizer.param_groups:  # muon's: its Muon's (empty) and its AdamW's
                group["lr"] = alpha / math.sqrt(t)
        x.grad = large if t % ONLINE_PERIOD == 1 else small
        optimizer.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)
        iterates.append(x.item())
    return iterates


def last_period_mean(iterates: list[float]) -> float:
    """The mean of the last 101 iterates: where the method has settled, free of the within-period wiggle."""
    tail = iterates[-ONLINE_PERIOD:]
    return sum(tail) / len(tail)


def _rosenbrock_residuals(point: torch.Tensor) -> torch.Tensor:
    x, y = point[0], point[1]
    return math.sqrt(2.0) * torch.stack([1.0 - x, 10.0 * (y - x * x)])


def rosenbrock(
    name: str, steps: int = ROSENBROCK_STEPS, *, hessian_every: int = 10, seed: int = 0
) -> tuple[list[tuple[float, float]], list[float]]:
    """The path and the loss of optimizer `name` on Rosenbrock (the loss is half the squared residuals)."""
    point = torch.tensor(ROSENBROCK_START, dtype=torch.float64, requires_grad=True)
    hyperparameters: dict[str, Any] = {"lr": 0.02}
    hyperparameters.update(_ROSENBROCK_HYPERPARAMETERS.get(name, {}))
    optimizer = registry.create(name, [point], **hyperparameters)
    noise = torch.Generator().manual_seed(seed)
    path = [(point[0].item(), point[1].item())]
    losses: list[float] = []
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = 0.5 * _rosenbrock_residuals(point).pow(2).sum()
        torch.autograd.backward(loss)
        optimizer.step()
        losses.append(loss.item())
        if isinstance(optimizer, Sophia) and step % hessian_every == 0:
            optimizer.zero_grad(set_to_none=True)
            residuals = _rosenbrock_residuals(point)
            epsilon = torch.randn(residuals.shape, generator=noise, dtype=torch.float64)
            torch.autograd.backward((residuals * epsilon).sum())
            optimizer.update_hessian(1)
        path.append((point[0].item(), point[1].item()))
    return path, losses


def _plot_online(out_dir: Path, iterates: dict[str, list[float]]) -> Path:
    figure, axis = pyplot().subplots(figsize=(9, 5), constrained_layout=True)
    for name, values in iterates.items():
        # One point per period (its mean) keeps the plot readable and shows where each method settles.
        means = [
            sum(values[start : start + ONLINE_PERIOD]) / ONLINE_PERIOD
            for start in range(0, len(values) - ONLINE_PERIOD + 1, ONLINE_PERIOD)
        ]
        axis.plot([ONLINE_PERIOD * (i + 1) for i in range(len(means))], means, label=name)
    axis.axhline(-1.0, color="black", linestyle="--", linewidth=1, label="optimum x = -1")
    axis.set(
        xlabel="step t",
        ylabel="x (mean over each period of 101 steps)",
        ylim=(-1.05, 1.05),
        title="Reddi et al. 2018 online problem: 1010x once, then -10x, every 101 steps",
    )
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small", ncol=2)
    return save_figure(figure, out_dir / "online_counterexample.png")


def _plot_rosenbrock(
    out_dir: Path, paths: dict[str, list[tuple[float, float]]], losses: dict[str, list[float]]
) -> Path:
    import numpy as np

    figure, (map_axis, loss_axis) = pyplot().subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    xs, ys = np.meshgrid(np.linspace(-2.0, 2.0, 300), np.linspace(-1.0, 3.0, 300))
    surface = (1 - xs) ** 2 + 100 * (ys - xs**2) ** 2
    map_axis.contour(xs, ys, np.log10(surface + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
    for name, path in paths.items():
        points = np.array(path)
        map_axis.plot(points[:, 0], points[:, 1], linewidth=1.2, label=name)
        loss_axis.plot(np.arange(1, len(losses[name]) + 1), np.maximum(losses[name], 1e-16), label=name)
    map_axis.plot(*ROSENBROCK_START, "ko")
    map_axis.plot(1.0, 1.0, "k*", markersize=12)
    map_axis.set(xlim=(-2, 2), ylim=(-1, 3), xlabel="x", ylabel="y", title="Rosenbrock: paths from (-1.2, 1)")
    loss_axis.set(xlabel="step", ylabel="loss", yscale="log", title="Rosenbrock: loss")
    loss_axis.grid(True, which="both", alpha=0.3)
    loss_axis.legend(fontsize="small", ncol=2)
    return save_figure(figure, out_dir / "rosenbrock.png")


def run_all(
    out_dir: Path,
    *,
    optimizers: list[str],
    steps: int | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Run both problems with every optimizer; write synthetic.json and the two plots, return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    online = {name: online_counterexample(name, steps or ONLINE_STEPS) for name in optimizers}
    rosenbrock_runs = {name: rosenbrock(name, steps or ROSENBROCK_STEPS) for name in optimizers}
    summary: dict[str, Any] = {"online_counterexample": {}, "rosenbrock": {}}
    log("online counterexample (optimum x = -1), mean x over the last 101 steps:")
    for name, iterates in online.items():
        settled = last_period_mean(iterates)
        summary["online_counterexample"][name] = {"steps": len(iterates), "last_period_mean_x": settled}
        log(f"  {name:>24}: {settled:+.3f}")
    log("Rosenbrock (minimum 0 at (1, 1)), final point and loss:")
    for name, (path, losses) in rosenbrock_runs.items():
        x, y = path[-1]
        summary["rosenbrock"][name] = {"steps": len(losses), "final_point": [x, y], "final_loss": losses[-1]}
        log(f"  {name:>24}: ({x:+.4f}, {y:+.4f}), loss {losses[-1]:.3e}")
    json_path = out_dir / "synthetic.json"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return [
        json_path,
        _plot_online(out_dir, online),
        _plot_rosenbrock(
            out_dir,
            {n: run[0] for n, run in rosenbrock_runs.items()},
            {n: run[1] for n, run in rosenbrock_runs.items()},
        ),
    ]
