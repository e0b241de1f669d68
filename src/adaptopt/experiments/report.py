"""What a comparison leaves in --out: results.json, results.md, loss.png and accuracy.png.

The schema of results.json is documented in docs/experiments.md; bump `SCHEMA_VERSION` when it changes.
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

__all__ = ["SCHEMA_VERSION", "environment", "results_document", "table", "write_plots", "write_results"]

SCHEMA_VERSION = 1


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
                }
                for run in runs
            },
        }
    )
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


def write_plots(out_dir: Path, document: dict[str, Any], *, title: str) -> list[Path]:
    """loss.png (train and test loss per epoch) and accuracy.png (test accuracy), one curve per optimizer."""
    plt = pyplot()
    results = document["optimizers"]
    loss_figure, (train_axis, test_axis) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    accuracy_figure, accuracy_axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for name, result in results.items():
        epochs = [e["epoch"] for e in result["epochs"]]
        train_axis.plot(epochs, [_nan(e["train_loss"]) for e in result["epochs"]], marker="o", label=name)
        test_axis.plot(epochs, [_nan(e["test_loss"]) for e in result["epochs"]], marker="o", label=name)
        accuracy_axis.plot(epochs, [100 * _nan(e["test_accuracy"]) for e in result["epochs"]], marker="o", label=name)
    for axis, label in ((train_axis, "train loss"), (test_axis, "test loss")):
        axis.set(xlabel="epoch", ylabel=label, yscale="log", title=f"{title}: {label}")
        axis.grid(True, which="both", alpha=0.3)
    test_axis.legend(fontsize="small")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{title}: test accuracy")
    accuracy_axis.grid(True, alpha=0.3)
    accuracy_axis.legend(fontsize="small")
    from matplotlib.ticker import MaxNLocator

    for axis in (train_axis, test_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    return [save_figure(loss_figure, out_dir / "loss.png"), save_figure(accuracy_figure, out_dir / "accuracy.png")]


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)
