"""The `adaptopt` command: `list`, `mnist` (the optimizer comparison) and `synthetic` (the papers' problems).

See docs/experiments.md for every option, the per-optimizer defaults and the results.json schema.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import registry
from . import data
from .config import (
    DEFAULT_HYPERPARAMETERS,
    SIZED_TO_THE_RUN,
    ConfigError,
    RunConfig,
    parse_overrides,
    resolve_hyperparameters,
)
from .report import ResultsError
from .train import CheckpointError, Interrupted, OptimizerRun

__all__ = ["build_parser", "main"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptopt", description="Compare the adaptopt optimizers on MNIST and on the papers' synthetic problems."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("list", help="every optimizer with its description, paper and defaults")

    mnist = commands.add_parser(
        "mnist",
        help="train the seed's CNN once per optimizer and compare them",
        description="Train the seed's CNN with each optimizer from the same initial weights on the same data "
        "order, evaluate on the test set every epoch, and write results.json, results.md, loss.png and "
        "accuracy.png to --out.",
    )
    mnist.add_argument(
        "--optimizers",
        default=",".join(registry.available()),
        help="comma-separated names (default: all: %(default)s)",
    )
    mnist.add_argument(
        "--dataset",
        choices=sorted(data.DATASETS),
        default=None,
        help="default: MNIST if present or downloadable, else Fashion-MNIST",
    )
    mnist.add_argument("--data-dir", type=Path, default=None, help="look here first for the IDX files")
    mnist.add_argument("--epochs", type=_positive_int, default=10)
    mnist.add_argument("--batch-size", type=_positive_int, default=128)
    mnist.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="override a hyper-parameter, e.g. --set adam.lr=3e-4 --set sophia.rho=0.05 (repeatable)",
    )
    mnist.add_argument("--seed", type=int, default=0)
    mnist.add_argument("--limit-train", type=_positive_int, default=None, help="use the first N training images")
    mnist.add_argument("--limit-test", type=_positive_int, default=None, help="use the first N test images")
    mnist.add_argument("--out", type=Path, default=Path("runs/mnist"), help="output directory (default: %(default)s)")
    mnist.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    mnist.add_argument("--overwrite", action="store_true", help="discard a run already saved in --out")
    mnist.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    mnist.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is several times faster when other work shares the CPU",
    )
    mnist.add_argument(
        "--hessian-every",
        type=_positive_int,
        default=10,
        metavar="K",
        help="Sophia: estimate the Hessian every K steps (default: %(default)s)",
    )
    mnist.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        metavar="N",
        help="data-parallel training in N CPU processes, each on 1/N of every batch; the results equal one "
        "process's up to rounding (default: %(default)s)",
    )
    mnist.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write TensorBoard scalars to DIR/<optimizer> (loss and lr every step, test loss and accuracy "
        "every epoch); needs pip install 'adaptopt[tensorboard]'",
    )

    plot = commands.add_parser(
        "plot",
        help="redraw results.md and the plots of a saved comparison from its results.json",
        description="Reads RUN_DIR/results.json of any schema version (version 1 has no per-step curves: its "
        "plots show the per-epoch training loss) and writes results.md and the plots next to it.",
    )
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR")

    data_command = commands.add_parser(
        "data",
        help="find (or download) the dataset `mnist` would use and say where it is",
        description="Exits 1 with the offline message, saying how to get the data, when none is available.",
    )
    data_command.add_argument("--dataset", choices=sorted(data.DATASETS), default=None)
    data_command.add_argument("--data-dir", type=Path, default=None)

    synthetic = commands.add_parser(
        "synthetic",
        help="the AMSGrad paper's online counterexample and Rosenbrock, with every optimizer",
    )
    synthetic.add_argument("--out", type=Path, default=Path("runs/synthetic"))
    synthetic.add_argument("--steps", type=_positive_int, default=None, help="override each problem's step count")
    synthetic.add_argument("--optimizers", default=",".join(registry.available()))
    return parser


def _optimizer_names(text: str) -> list[str]:
    names: list[str] = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            name = registry.describe(part.strip()).name
        except ValueError as error:
            raise ConfigError(f"--optimizers: {error}") from None
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError("--optimizers: give at least one optimizer")
    return names


def command_list() -> int:
    for name in registry.available():
        info = registry.describe(name)
        print(f"{name}: {info.summary}")
        print(f"    paper:    {info.paper}")
        defaults = ", ".join(f"{key}={_shown(value)}" for key, value in info.defaults.items())
        print(f"    defaults: {defaults}")
        if name in DEFAULT_HYPERPARAMETERS:
            mnist = [f"{key}={value!r}" for key, value in DEFAULT_HYPERPARAMETERS[name].items()]
            if name in SIZED_TO_THE_RUN:
                mnist.append(f"{', '.join(SIZED_TO_THE_RUN[name])} sized to the run (see docs/experiments.md)")
            print(f"    mnist:    {', '.join(mnist)}")
    return 0


def _shown(value: Any) -> str:
    """A default as `adaptopt list` shows it: functions by name, not by address."""
    return str(getattr(value, "__name__", value)) if callable(value) else repr(value)


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ConfigError(f"--device {text!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {text!r}: CUDA is not available here; use --device cpu")
    return device


def _load_data(args: argparse.Namespace) -> data.LoadedDataset:
    """The dataset of --dataset, or the default one (saying which and why), from --data-dir or the search path."""
    dataset_name = args.dataset
    if dataset_name is None:
        dataset_name, why = data.resolve_default_dataset(args.data_dir, fetcher=data.urllib_fetcher)
        print(f"dataset: {data.DATASETS[dataset_name].title} ({why}; choose with --dataset)")
    return data.load_dataset(dataset_name, args.data_dir, fetcher=data.urllib_fetcher)


def command_data(args: argparse.Namespace) -> int:
    dataset = _load_data(args)
    print(f"{dataset.spec.name} {dataset.directory}")
    return 0


def command_mnist(args: argparse.Namespace) -> int:
    from . import report

    optimizers = _optimizer_names(args.optimizers)
    overrides = parse_overrides(args.settings, optimizers)
    device = _device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dataset = _load_data(args)
    dataset_name = dataset.spec.name
    train_images, train_labels = dataset.train_images, dataset.train_labels
    test_images, test_labels = dataset.test_images, dataset.test_labels
    if args.limit_train is not None:
        train_images, train_labels = train_images[: args.limit_train], train_labels[: args.limit_train]
    if args.limit_test is not None:
        test_images, test_labels = test_images[: args.limit_test], test_labels[: args.limit_test]
    print(
        f"{dataset.spec.title} from {dataset.directory}: {len(train_labels)} training and {len(test_labels)} "
        f"test images; {len(optimizers)} optimizers x {args.epochs} epochs"
    )
    total_steps = args.epochs * math.ceil(len(train_labels) / args.batch_size)
    config = RunConfig(
        dataset=dataset_name,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        hessian_every=args.hessian_every,
        optimizers=tuple(optimizers),
        hyperparameters={
            name: resolve_hyperparameters(name, overrides.get(name, {}), total_steps) for name in optimizers
        },
    )
    out_dir: Path = args.out
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other; choose one")
    if args.nproc > 1 and device.type != "cpu":
        raise ConfigError(f"--nproc {args.nproc} runs CPU processes (gloo); use --device cpu or --nproc 1")
    if args.overwrite:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    env = report.environment(device)
    if args.nproc > 1:
        env["nproc"] = args.nproc
    description = dataset.describe()
    if args.tensorboard is not None:
        from .tensorboard_log import TensorBoardLog

        TensorBoardLog(args.tensorboard)  # a missing tensorboard package is an error now, not after training
    job = _MnistJob(
        config, (train_images, train_labels), (test_images, test_labels), out_dir, args.resume, device, args.tensorboard
    )
    if args.nproc == 1:
        document, interruption = _train_and_report(job, description, env)
    else:
        from .. import distributed

        # Rank 0 prints the epoch lines itself, so that they appear as they happen.
        document, interruption = distributed.launch(_train_and_report, args.nproc, job, description, env)
    if interruption is not None:
        print(f"\nInterrupted: {interruption}.", file=sys.stderr)
        print("Continue with the same command plus --resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    plots = report.write_plots(out_dir, document, title=dataset.spec.title)
    print()
    print(report.table(document))
    print()
    print(f"Results: {out_dir / 'results.json'}, {out_dir / 'results.md'}")
    print(f"Plots:   {', '.join(str(path) for path in plots)}")
    return 0


@dataclass(frozen=True)
class _MnistJob:
    """What every rank of `adaptopt mnist` trains on (sent to the ranks, so it holds no open resources)."""

    config: RunConfig
    train_data: tuple[torch.Tensor, torch.Tensor]
    test_data: tuple[torch.Tensor, torch.Tensor]
    out_dir: Path
    resume: bool
    device: torch.device
    tensorboard: Path | None = None


def _train_and_report(
    job: _MnistJob, description: dict[str, Any], env: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """Run the comparison, writing results.json after every epoch; (the final document, why it stopped or None).

    Module level so that `distributed.launch` can start it in every rank; inside a group only rank 0 writes,
    and its document is the one returned.
    """
    from . import report, train

    def write(runs: list[OptimizerRun]) -> dict[str, Any]:
        document = report.results_document(job.config, description, runs, env)
        report.write_results(job.out_dir, document)
        return document

    def log(line: str) -> None:
        print(line, flush=True)  # a rank's stdout is not line-buffered by `main`

    scalars: train.ScalarLog = train.ScalarLog()
    if job.tensorboard is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        from .tensorboard_log import TensorBoardLog

        scalars = TensorBoardLog(job.tensorboard)
    try:
        runs = train.run_comparison(
            job.config,
            job.train_data,
            job.test_data,
            job.out_dir,
            resume=job.resume,
            device=job.device,
            on_epoch=write,
            log=log,
            scalars=scalars,
        )
    except Interrupted as interruption:
        return {}, str(interruption)
    finally:
        scalars.close()
    other_rank = torch.distributed.is_initialized() and torch.distributed.get_rank() != 0
    return {} if other_rank else write(runs), None


def command_plot(args: argparse.Namespace) -> int:
    from . import report

    document = report.read_results(args.run_dir / "results.json")
    report.write_results(args.run_dir, document)
    dataset = document["dataset"]
    plots = report.write_plots(args.run_dir, document, title=dataset.get("title", dataset.get("name", "")))
    print(report.table(document))
    print(f"\nResults: {args.run_dir / 'results.md'}\nPlots:   {', '.join(str(path) for path in plots)}")
    return 0


def command_synthetic(args: argparse.Namespace) -> int:
    from . import synthetic

    paths = synthetic.run_all(args.out, optimizers=_optimizer_names(args.optimizers), steps=args.steps)
    print(f"Plots and results: {', '.join(str(path) for path in paths)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `adaptopt` script and `python -m adaptopt`; returns the exit status."""
    args = build_parser().parse_args(argv)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # one line per epoch should reach a log file as it happens
        reconfigure(line_buffering=True)
    try:
        if args.command == "list":
            return command_list()
        if args.command == "mnist":
            return command_mnist(args)
        if args.command == "data":
            return command_data(args)
        if args.command == "plot":
            return command_plot(args)
        return command_synthetic(args)
    except (data.DataError, ConfigError, CheckpointError, ResultsError) as error:
        print(f"adaptopt: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # outside training (loading, plotting): nothing to save
        print("\nadaptopt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
