"""What a comparison leaves in --out: results.json, results.md, loss.png, loss_by_time.png and accuracy.png.

The schema of results.json is documented in docs/experiments.md; bump `SCHEMA_VERSION` when it changes and
keep `read_results` reading the older ones. Version 2 added each optimizer's training-loss `curve`.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .config import RunConfig
from .train import OptimizerRun

__all__ = [
    "SCHEMA_VERSION",
    "ResultsError",
    "environment",
    "read_results",
    "results_document",
    "smooth",
    "table",
    "write_plots",
    "write_results",
]

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)


class ResultsError(Exception):
    """A results.json that cannot be read; the message names the file and what to do."""


def environment(device: torch.device | str) -> dict[str, Any]:
    """Versions and the machine, for results.json."""
    return {
        "adaptopt": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: a diverged run's losses are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def results_document(
    config: RunConfig, dataset: dict[str, Any], runs: list[OptimizerRun], env: dict[str, Any]
) -> dict[str, Any]:
    """The content of results.json."""
    hyperparameters = config.to_json()["hyperparameters"]
    document: dict[str, Any] = _finite_or_none(
        {
            "schema_version": SCHEMA_VERSION,
            "config": config.to_json(),
            "dataset": dataset,
            "environment": env,
            "optimizers": {
                run.name: {
                    "hyperparameters": hyperparameters[run.name],
                    "diverged": run.diverged,
                    "epochs": run.history,
                    "curve": {
                        "step": [step for step, _, _ in run.curve],
                        "wall_time_s": [seconds for _, seconds, _ in run.curve],
                        "train_loss": [loss for _, _, loss in run.curve],
                    },
                }
                for run in runs
            },
        }
    )
    return document


def read_results(path: Path) -> dict[str, Any]:
    """A results.json of any readable schema version, as the current version's document: a version-1 file
    (no per-step curves) gets empty curves, which the plots replace by the per-epoch training loss."""
    try:
        document: dict[str, Any] = json.loads(path.read_text())
        version = document["schema_version"]
        optimizers = document["optimizers"]
        if not isinstance(optimizers, dict) or not isinstance(document["config"], dict):
            raise TypeError("its 'optimizers' or 'config' is not an object")
        # What results.md's heading reads: a file without them would fail there, with a traceback.
        missing = [key for key in ("title", "sha256", "train_size", "test_size") if key not in document["dataset"]]
        if missing:
            raise KeyError(f"dataset.{missing[0]}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ResultsError(
            f"{path}: not a readable results.json ({error}); rerun the comparison to rewrite it"
        ) from None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ResultsError(
            f"{path}: schema version {version!r}, this adaptopt reads {READABLE_SCHEMA_VERSIONS}; "
            "upgrade adaptopt, or rerun the comparison"
        )
    for result in optimizers.values():
        result.setdefault("curve", {"step": [], "wall_time_s": [], "train_loss": []})
    document["schema_version"] = SCHEMA_VERSION
    return document


def table(document: dict[str, Any]) -> str:
    """A Markdown table of the final epoch of each optimizer, best test accuracy first."""
    rows = []
    for name, result in document["optimizers"].items():
        epochs = result["epochs"]
        if not epochs:
            continue
        last = epochs[-1]
        accuracy = last["test_accuracy"]
        rows.append(
            (
                -1.0 if accuracy is None else accuracy,
                f"| {name} | {_number(result['hyperparameters'].get('lr'), '.3g')} | {last['epoch']} | "
                f"{_number(last['train_loss'], '.4f')} | {_number(last['test_loss'], '.4f')} | "
                f"{_percent(accuracy)} | {_percent(max((e['test_accuracy'] or 0.0) for e in epochs))} | "
                f"{sum(e['wall_time_s'] for e in epochs):.1f} |" + (" diverged |" if result["diverged"] else " |"),
            )
        )
    header = (
        "| optimizer | lr | epochs | train loss | test loss | test accuracy | best test accuracy | time (s) | note |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([header] + [row for _, row in sorted(rows, key=lambda item: -item[0])])


def _number(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def write_results(out_dir: Path, document: dict[str, Any]) -> None:
    """Write results.json and results.md (atomically, so a reader never sees half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "results.json", json.dumps(document, indent=2) + "\n")
    dataset = document["dataset"]
    config = document["config"]
    limit = f", first {config['limit_train']} training images" if config["limit_train"] else ""
    markdown = (
        f"# Optimizer comparison on {dataset['title']}\n\n"
        f"CNN of the seed, {config['epochs']} epochs, batch size {config['batch_size']}, seed {config['seed']}"
        f"{limit}; {dataset['train_size']} training and {dataset['test_size']} test images "
        f"(dataset SHA-256 {dataset['sha256'][:16]}...). Final epoch shown; time is training plus evaluation.\n\n"
        f"{table(document)}\n"
    )
    _write_text(out_dir / "results.md", markdown)


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_text(text)
    partial.replace(path)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> Path:
    """Write `figure` as a PNG and free it."""
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def smooth(values: list[float], points_per_window: float) -> list[float]:
    r"""The debiased exponential moving average of `values` (TensorBoard's smoothing, without its bias):
    $s_t = \beta s_{t-1} + (1 - \beta) x_t$, divided by $1 - \beta^t$, with $\beta = 1 - 1/w$ for a window of
    $w$ points. Non-finite values (a diverged run) are skipped, leaving NaN in their place."""
    beta = 1.0 - 1.0 / max(points_per_window, 1.0)
    average, weight, smoothed = 0.0, 0.0, []
    for value in values:
        if not math.isfinite(value):
            smoothed.append(math.nan)
            continue
        average = beta * average + (1.0 - beta) * value
        weight = beta * weight + (1.0 - beta)
        smoothed.append(average / weight)
    return smoothed


SMOOTHING_WINDOW_FRACTION = 1 / 25
"""The smoothing window, as a share of a curve's points (capped at 50 points): about half an epoch of a
10-epoch run's 50 points an epoch, a tenth of an epoch of the 2-epoch demo's per-step points."""


def _training_curve(result: dict[str, Any]) -> tuple[list[float], list[float], list[float]]:
    """(steps, wall times, training losses): the per-step curve, or for a version-1 document the epochs'."""
    curve = result.get("curve") or {}
    if curve.get("step"):
        return curve["step"], curve["wall_time_s"], [_nan(loss) for loss in curve["train_loss"]]
    epochs = result["epochs"]
    elapsed = np.cumsum([e["wall_time_s"] for e in epochs]).tolist()
    return [e["steps"] for e in epochs], elapsed, [_nan(e["train_loss"]) for e in epochs]


def write_plots(out_dir: Path, document: dict[str, Any], *, title: str) -> list[Path]:
    """loss.png (training loss per step, smoothed over the faint raw curve, and test loss per epoch, against
    steps), loss_by_time.png (the smoothed training loss against wall time) and accuracy.png (test accuracy
    per epoch), one colour per optimizer."""
    plt = pyplot()
    results = document["optimizers"]
    loss_figure, (train_axis, test_axis) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    time_figure, time_axis = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    accuracy_figure, accuracy_axis = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for index, (name, result) in enumerate(results.items()):
        # Sixteen optimizers outnumber the ten colours: the line style tells the second ten apart.
        look = {"color": colours[index % len(colours)], "linestyle": styles[index // len(colours) % len(styles)]}
        steps, seconds, losses = _training_curve(result)
        per_step = bool((result.get("curve") or {}).get("step"))
        window = min(50.0, max(1.0, SMOOTHING_WINDOW_FRACTION * len(losses)))
        smoothed = smooth(losses, window) if per_step else losses
        if per_step:
            train_axis.plot(steps, losses, color=look["color"], alpha=0.2, linewidth=0.7)
        train_axis.plot(steps, smoothed, label=name, marker=None if per_step else "o", **look)
        time_axis.plot(seconds, smoothed, label=name, marker=None if per_step else "o", **look)
        epochs = result["epochs"]
        test_axis.plot(
            [e["steps"] for e in epochs], [_nan(e["test_loss"]) for e in epochs], marker="o", label=name, **look
        )
        accuracy_axis.plot(
            [e["epoch"] for e in epochs],
            [100 * _nan(e["test_accuracy"]) for e in epochs],
            marker="o",
            label=name,
            **look,
        )
    train_axis.set(xlabel="step", ylabel="training loss", yscale="log", title=f"{title}: training loss (smoothed)")
    test_axis.set(xlabel="step", ylabel="test loss", yscale="log", title=f"{title}: test loss, every epoch")
    time_axis.set(xlabel="wall time (s)", ylabel="training loss", yscale="log", title=f"{title}: training loss by time")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{title}: test accuracy")
    from matplotlib.ticker import MaxNLocator

    accuracy_axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    for axis in (train_axis, test_axis, time_axis, accuracy_axis):
        axis.grid(True, which="both", alpha=0.3)
    # One legend per figure, beside the axes: over them, seventeen names hide the curves.
    for figure, axis in ((loss_figure, train_axis), (time_figure, time_axis), (accuracy_figure, accuracy_axis)):
        figure.legend(*axis.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    return [
        save_figure(loss_figure, out_dir / "loss.png"),
        save_figure(time_figure, out_dir / "loss_by_time.png"),
        save_figure(accuracy_figure, out_dir / "accuracy.png"),
    ]


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)
