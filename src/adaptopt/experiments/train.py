r"""Train the CNN once per optimizer, fairly, with a checkpoint every epoch and on Ctrl-C.

Fairness: every optimizer starts from `initial_state(seed)` and sees the same data order, a permutation
drawn from `(seed, epoch)` alone, so the order needs no state beyond the epoch and the batch index.
Sophia's label sampling has its own generator, saved in the checkpoint with the global RNG.

Data parallelism (`adaptopt mnist --nproc N`, inside `adaptopt.distributed.launch`): every rank walks the
same global batches of `epoch_order`; `train_step` takes this rank's `rank_share` of each and its
`sync_grads` hook, called between backward and the optimizer step, averages the grads over the ranks
(`average_gradients`) and returns the global batch size, which Sophia's `update_hessian` gets. Sophia's
labels are sampled over the whole global batch from the generator all ranks share, so they are the
single-process run's labels. Evaluation, logging and checkpoints are rank 0's (the params are identical).
Without a process group every one of these steps is the identity.

Optimizers with modes (Schedule-Free: param groups with a `"train_mode"`, the official `schedulefree`
optimizers' convention too) train at one point and are evaluated at another: `train_step` calls
`optimizer.train()` before every step and the loop calls `optimizer.eval()` after every epoch, on every rank
(so that the ranks' params stay identical), before evaluating and saving. An epoch's checkpoint therefore
holds the evaluated weights, with the optimizer in eval mode, and one taken mid-epoch (Ctrl-C) the training
weights in train mode; the mode is in the optimizer's state dict, so a resumed run continues bitwise either way.

The training-loss curve (`OptimizerRun.curve`): a point every `curve_interval(steps_per_epoch)` steps of an
epoch and at its last step, each the mean batch loss over the steps since the previous point, with the step
count and the optimizer's wall time so far. The open window is part of the checkpoint, so an interrupted run's
curve is the uninterrupted one's.

Extending a run: `--resume` with a larger `--epochs` continues each optimizer whose hyper-parameters do not
depend on the run's length from its checkpoint, and so equals a straight run of the new length. Those whose
schedule is sized from the total step count (`SIZED_TO_THE_RUN`) would have taken their first steps on another
schedule, so they are refused, all together, with the `--set` flags that keep their saved schedules.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..distributed import average_gradients, rank_share, world_size
from ..optimizers import Sophia
from .config import SIZED_TO_THE_RUN, ConfigError, RunConfig
from .model import MnistCnn, initial_state

__all__ = [
    "CheckpointError",
    "Interrupted",
    "OptimizerRun",
    "StopFlag",
    "curve_interval",
    "epoch_order",
    "evaluate",
    "has_modes",
    "iterate_batches",
    "run_comparison",
    "set_mode",
    "train_epoch",
    "train_step",
]

CHECKPOINT_FORMAT = 2
READABLE_CHECKPOINT_FORMATS = (1, 2)
"""Format 1 (adaptopt 0.1) has no training-loss curve: a run resumed from it lacks the points before it."""
POINTS_PER_EPOCH = 50
EVAL_BATCH_SIZE = 1000
GradSync = Callable[[nn.Module, int], int]
"""(model, examples in this rank's share) -> examples in the global batch, after making the grads global."""


def no_sync(model: nn.Module, local_count: int) -> int:
    """The single-process `GradSync`: the grads already are the batch's."""
    return local_count


def sync_over_ranks(model: nn.Module, local_count: int) -> int:
    """The data-parallel `GradSync`: every rank's grads become the global batch's mean gradient."""
    return average_gradients(model.parameters(), local_count)


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _global_mean(local_mean: float, local_count: int, global_count: int) -> float:
    """The mean over the global batch of a per-example quantity whose mean over this rank's share is given."""
    if world_size() == 1:
        return local_mean
    total = torch.tensor([local_mean * local_count if local_count else 0.0], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return float(total.item()) / global_count


def _sample_labels(probabilities: torch.Tensor, global_size: int, generator: torch.Generator) -> torch.Tensor:
    """One label per row of this rank's share of `probabilities`, as one process would draw it for the batch.

    The ranks' rows are put together into the global batch's (an all-reduce of zero-padded rows, exact
    because every entry has one non-zero addend) and sampled with the generator all ranks hold in the same
    state; each rank keeps its share. So the labels do not depend on the number of ranks.
    """
    if world_size() > 1:
        rows = rank_share(torch.arange(global_size))
        whole = torch.zeros(global_size, probabilities.shape[1], dtype=probabilities.dtype)
        if len(rows):
            whole[rows] = probabilities
        torch.distributed.all_reduce(whole)
        return rank_share(torch.multinomial(whole, 1, generator=generator).squeeze(1))
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C) after saving a checkpoint."""


@dataclass
class StopFlag:
    """Set by the SIGINT handler (or a test); the loop checks it between steps, never inside one."""

    requested: bool = False


@dataclass
class OptimizerRun:
    """One optimizer's training: its model and optimizer, the position in the data order, and its history."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: torch.Generator
    hyperparameters: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    batch_in_epoch: int = 0
    loss_sum: float = 0.0
    examples_seen: int = 0
    epoch_seconds: float = 0.0
    steps: int = 0
    diverged: bool = False
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    """(steps done, wall time in s, mean training loss over the steps since the previous point)."""
    window_loss_sum: float = 0.0
    window_steps: int = 0
    training_seconds: float = 0.0
    """Seconds spent training in the finished epochs, evaluation left out: the curve's clock."""
    last_loss: float = math.nan

    @property
    def epochs_done(self) -> int:
        return len(self.history)


def curve_interval(steps_per_epoch: int) -> int:
    """Steps between two points of the training-loss curve: about `POINTS_PER_EPOCH` points an epoch."""
    return max(1, steps_per_epoch // POINTS_PER_EPOCH)


def record_curve_point(run: OptimizerRun, *, interval: int, epoch_end: bool, wall_time_s: float) -> bool:
    """Add the step just taken (`run.last_loss`) to the open window; close it as a point when it is full or the
    epoch ends. Returns whether a point was added."""
    run.window_loss_sum += run.last_loss
    run.window_steps += 1
    if not epoch_end and run.batch_in_epoch % interval:
        return False
    run.curve.append((run.steps, wall_time_s, run.window_loss_sum / run.window_steps))
    run.window_loss_sum, run.window_steps = 0.0, 0
    return True


def epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    """The training order of epoch `epoch` (0-based): a permutation that depends on (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


def iterate_batches(
    images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int, start_batch: int = 0
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(batch index, images, labels) for the batches of `order` from `start_batch` on; the last may be short."""
    for batch_index in range(start_batch, math.ceil(len(order) / batch_size)):
        indices = order[batch_index * batch_size : (batch_index + 1) * batch_size]
        yield batch_index, images[indices], labels[indices]


def has_modes(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` trains and evaluates at different points (`train()`/`eval()`, Schedule-Free)."""
    return any("train_mode" in group for group in optimizer.param_groups) and callable(getattr(optimizer, "eval", None))


def set_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """`optimizer.train()` or `optimizer.eval()` for an optimizer with modes; nothing for the others."""
    if has_modes(optimizer):
        getattr(optimizer, "train" if training else "eval")()


def estimate_sophia_hessian(run: OptimizerRun, images: torch.Tensor, sync_grads: GradSync = no_sync) -> None:
    """Sophia-G's Gauss-Newton-Bartlett estimate: labels sampled from the model's logits, then their loss's grad.

    `images` is the global batch; this rank works on its `rank_share`.
    """
    optimizer = run.optimizer
    assert isinstance(optimizer, Sophia)
    optimizer.zero_grad(set_to_none=True)
    local_images = rank_share(images)
    logits = run.model(local_images)
    with torch.no_grad():
        probabilities = torch.softmax(logits.detach().float(), dim=1).cpu()
        sampled = _sample_labels(probabilities, images.shape[0], run.sampler).to(logits.device)
    if len(sampled):  # a share can be empty when the batch is smaller than the group: its grads count as 0
        torch.autograd.backward(F.cross_entropy(logits, sampled))
    optimizer.update_hessian(sync_grads(run.model, len(sampled)))
    optimizer.zero_grad(set_to_none=True)


def train_step(
    run: OptimizerRun,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    hessian_every: int,
    sync_grads: GradSync = no_sync,
) -> float:
    """One optimizer step on a global batch (and, for Sophia every `hessian_every` steps, a Hessian estimate).

    This rank computes the loss on its `rank_share`; `sync_grads` makes the grads the global batch's.
    Returns the mean loss over the global batch.
    """
    run.model.train()
    set_mode(run.optimizer, training=True)
    run.optimizer.zero_grad(set_to_none=True)
    local_images, local_labels = rank_share(images), rank_share(labels)
    local_count = len(local_labels)
    local_loss = 0.0
    if local_count:  # a share can be empty when the batch is smaller than the group: its grads count as 0
        loss = F.cross_entropy(run.model(local_images), local_labels)
        torch.autograd.backward(loss)
        local_loss = float(loss.item())
    global_count = sync_grads(run.model, local_count)
    run.optimizer.step()
    run.steps += 1
    if isinstance(run.optimizer, Sophia) and run.steps % hessian_every == 0:
        estimate_sophia_hessian(run, images, sync_grads)
    return _global_mean(local_loss, local_count, global_count)


def train_epoch(
    run: OptimizerRun,
    batches: Iterator[tuple[int, torch.Tensor, torch.Tensor]],
    *,
    hessian_every: int,
    stop: StopFlag,
    on_step: Callable[[OptimizerRun], None] | None = None,
    sync_grads: GradSync = no_sync,
) -> bool:
    """Train over `batches`, keeping the position and loss sums in `run`; False if stopped early.

    Stops early when `stop` is requested (the position then says where to continue) or the loss stops
    being finite (`run.diverged`).
    """
    for batch_index, images, labels in batches:
        loss = train_step(run, images, labels, hessian_every=hessian_every, sync_grads=sync_grads)
        run.last_loss = loss
        run.batch_in_epoch = batch_index + 1
        run.loss_sum += loss * len(labels)
        run.examples_seen += len(labels)
        if not math.isfinite(loss):
            run.diverged = True
            return False
        if on_step is not None:
            on_step(run)
        if stop.requested:
            return False
    return True


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on the whole of (images, labels)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), EVAL_BATCH_SIZE):
        logits = model(images[start : start + EVAL_BATCH_SIZE])
        batch_labels = labels[start : start + EVAL_BATCH_SIZE]
        loss_sum += float(F.cross_entropy(logits, batch_labels, reduction="sum").item())
        correct += int((logits.argmax(dim=1) == batch_labels).sum().item())
    return loss_sum / len(labels), correct / len(labels)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_path(out_dir: Path, name: str) -> Path:
    return out_dir / "checkpoints" / f"{name}.pt"


def save_checkpoint(run: OptimizerRun, path: Path, config: RunConfig) -> None:
    """Write `run`'s whole state atomically (a crash mid-write leaves the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_json(),
        "name": run.name,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "sampler": run.sampler.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": run.history,
        "batch_in_epoch": run.batch_in_epoch,
        "loss_sum": run.loss_sum,
        "examples_seen": run.examples_seen,
        "epoch_seconds": run.epoch_seconds,
        "steps": run.steps,
        "diverged": run.diverged,
        "curve": run.curve,
        "window_loss_sum": run.window_loss_sum,
        "window_steps": run.window_steps,
        "training_seconds": run.training_seconds,
    }
    partial = path.with_suffix(".pt.part")
    torch.save(payload, partial)
    partial.replace(path)


class ScheduleSizedToTheRun(CheckpointError):
    """A longer `--epochs` for an optimizer whose schedule was sized to the saved run's length."""

    def __init__(self, path: Path, name: str, saved: dict[str, Any]) -> None:
        super().__init__(f"{path}: {name}'s schedule is sized to the run's length")
        self.path, self.name, self.saved = path, name, saved


def _run_settings(config: dict[str, Any], name: str) -> dict[str, Any]:
    """What must not change for `name` to continue from a checkpoint: all of the config but the number of
    epochs, and of the hyper-parameters only `name`'s."""
    settings = {key: value for key, value in config.items() if key not in ("epochs", "hyperparameters")}
    hyperparameters = config.get("hyperparameters")
    settings["hyperparameters"] = hyperparameters.get(name) if isinstance(hyperparameters, dict) else None
    return settings


def _restart_advice(path: Path, name: str) -> str:
    return f"delete {path} to restart {name} from scratch (or use a new --out)"


def _check_continuable(path: Path, name: str, saved: Any, epochs_done: int, config: RunConfig) -> None:
    """Raise `CheckpointError` unless the checkpoint of `name` (config `saved`, `epochs_done` epochs) can go on
    under `config`: the same settings, and at least as many epochs as it has done."""
    advice = _restart_advice(path, name)
    current = config.to_json()
    if not isinstance(saved, dict) or _run_settings(saved, name) != _run_settings(current, name):
        if isinstance(saved, dict) and saved.get("epochs") != config.epochs and name in SIZED_TO_THE_RUN:
            # Refused as sized only if the saved schedule's own values are the whole difference.
            saved_schedule = {
                key: value
                for key, value in (saved.get("hyperparameters", {}).get(name) or {}).items()
                if key in SIZED_TO_THE_RUN[name]
            }
            on_saved_schedule = {**current["hyperparameters"][name], **saved_schedule}
            with_saved_schedule = {**current, "hyperparameters": {name: on_saved_schedule}}
            if _run_settings(with_saved_schedule, name) == _run_settings(saved, name):
                raise ScheduleSizedToTheRun(path, name, saved_schedule)
        raise CheckpointError(
            f"{path}: made with a different configuration than this command's; rerun with the original options, "
            f"or {advice}"
        )
    if epochs_done > config.epochs:
        raise CheckpointError(
            f"{path}: {name} has already trained {epochs_done} epochs, more than --epochs {config.epochs}; "
            f"pass --epochs {epochs_done} or more to continue it, or {advice}"
        )


def load_checkpoint(run: OptimizerRun, path: Path, config: RunConfig) -> None:
    """Restore `run` from `path`; raises `CheckpointError` naming the file if it is corrupt or from another run
    (`ScheduleSizedToTheRun` if only `--epochs` changed and `run`'s schedule depends on it)."""
    advice = _restart_advice(path, run.name)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") not in READABLE_CHECKPOINT_FORMATS:
            raise ValueError(
                f"not an adaptopt checkpoint of format {' or '.join(map(str, READABLE_CHECKPOINT_FORMATS))}"
            )
    except Exception as error:  # torch.load raises many types (zip, pickle, EOF) for a damaged file
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({error}); {advice}") from None
    if payload.get("name") != run.name:
        raise CheckpointError(f"{path}: a checkpoint of {payload.get('name')!r}, not of {run.name}; {advice}")
    history = payload.get("history")
    _check_continuable(path, run.name, payload.get("config"), len(history) if isinstance(history, list) else 0, config)
    try:
        run.model.load_state_dict(payload["model"])
        run.optimizer.load_state_dict(payload["optimizer"])
        run.sampler.set_state(payload["sampler"])
        torch.set_rng_state(payload["torch_rng"])
        run.history = list(payload["history"])
        run.batch_in_epoch = int(payload["batch_in_epoch"])
        run.loss_sum = float(payload["loss_sum"])
        run.examples_seen = int(payload["examples_seen"])
        run.epoch_seconds = float(payload["epoch_seconds"])
        run.steps = int(payload["steps"])
        run.diverged = bool(payload["diverged"])
        run.curve = [(int(step), float(seconds), float(loss)) for step, seconds, loss in payload.get("curve", [])]
        run.window_loss_sum = float(payload.get("window_loss_sum", 0.0))
        run.window_steps = int(payload.get("window_steps", 0))
        # Format 1 did not keep it: its epochs' times, evaluation included, are the nearest there is.
        run.training_seconds = float(
            payload.get("training_seconds", sum(record["wall_time_s"] for record in run.history))
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: corrupt checkpoint ({error}); {advice}") from None


# ---------------------------------------------------------------------------------------------------------
# The comparison


@contextmanager
def _stop_on_sigint(stop: StopFlag) -> Iterator[None]:
    """The first Ctrl-C asks the loop to save and stop; a second one interrupts at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


GIVEN_THE_MODEL = ("muon",)
"""Optimizers whose factory splits a model by its modules, and so is given the model itself rather than its
params: `muon_with_adamw` leaves the output layer (fc2) to AdamW, as well as the convs' 4-D weights and the
biases, so that Muon takes the hidden matrix, fc1."""


def make_run(name: str, hyperparameters: dict[str, Any], weights: dict[str, torch.Tensor], seed: int) -> OptimizerRun:
    """A fresh model from `weights` and the optimizer `name` over it."""
    model = MnistCnn()
    model.load_state_dict(copy.deepcopy(weights))
    params: Any = model if name in GIVEN_THE_MODEL else model.parameters()
    optimizer = registry.create(name, params, **hyperparameters)
    sampler = torch.Generator().manual_seed(seed + 1)
    return OptimizerRun(name, model, optimizer, sampler, hyperparameters)


def current_learning_rate(optimizer: torch.optim.Optimizer) -> float | None:
    """The learning rate of the step just taken, first param group: an adaptopt optimizer's scheduled rate
    (`learning_rate`), else the group's `lr`; None if there is no float `lr`."""
    group = optimizer.param_groups[0]
    learning_rate = getattr(optimizer, "learning_rate", None)
    state = optimizer.state.get(group["params"][0]) if group["params"] else None
    if callable(learning_rate) and state and "step" in state:
        return float(learning_rate(state, group))
    lr = group.get("lr")
    return float(lr) if isinstance(lr, (int, float)) else None


def _progress(total: int, initial: int, description: str) -> Any:
    """One optimizer's epoch as a tqdm bar, on a terminal only (logs get the per-epoch lines)."""
    from tqdm import tqdm

    show = sys.stdout.isatty() and _is_rank_zero()
    return tqdm(total=total, initial=initial, desc=description, leave=False, disable=not show, unit="step")


class ScalarLog:
    """Where the comparison sends its scalars as they happen (`--tensorboard`); this one drops them."""

    takes_steps = False
    """Whether `train_step` wants every step: if not, the loop does not work out the learning rate for it."""

    def start(self, name: str, steps_done: int) -> None:
        """`name` begins or resumes training after `steps_done` steps."""

    def train_step(self, name: str, step: int, loss: float, learning_rate: float | None) -> None:
        """The loss of step `step` (1-based) and the learning rate it was taken with."""

    def test(self, name: str, step: int, loss: float, accuracy: float) -> None:
        """The test loss and accuracy after `step` steps (an epoch's end)."""

    def close(self) -> None:
        """Flush everything written."""


def _refuse_sized_schedules(refused: list[ScheduleSizedToTheRun], epochs: int) -> ConfigError:
    """One error for every optimizer that a longer --epochs would put on another schedule."""
    names = ", ".join(error.name for error in refused)
    pins = " ".join(f"--set {error.name}.{key}={value!r}" for error in refused for key, value in error.saved.items())
    return ConfigError(
        f"--epochs {epochs} cannot extend {names}: the saved run sized their schedules from its own length "
        f"(warm-ups over a share of all steps, decays to its last step), so a longer run would have taken their "
        f"steps so far on another schedule. To continue them on the saved schedules, add {pins}; to train them "
        f"on one sized to the new length, delete {', '.join(str(error.path) for error in refused)} (or use a "
        "new --out)"
    )


def run_comparison(
    config: RunConfig,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    out_dir: Path,
    *,
    resume: bool = False,
    device: torch.device | str = "cpu",
    stop: StopFlag | None = None,
    on_step: Callable[[OptimizerRun], None] | None = None,
    on_epoch: Callable[[list[OptimizerRun]], object] | None = None,
    log: Callable[[str], None] = print,
    scalars: ScalarLog | None = None,
) -> list[OptimizerRun]:
    """Train every optimizer of `config` in turn; returns their runs, histories filled in.

    Checkpoints go to `out_dir/checkpoints/<name>.pt` after every epoch and when stopped (Ctrl-C or `stop`),
    in which case `Interrupted` is raised after saving. `on_epoch` gets all runs after each epoch (to write
    results as they come). With `resume`, each optimizer continues from its checkpoint.

    Inside a process group (`adaptopt.distributed.launch`) every rank calls this with the same arguments
    and trains on its share of each batch; only rank 0 evaluates, logs, saves checkpoints and calls
    `on_epoch` (the other ranks' histories hold the training loss only). A checkpoint holds no rank's
    own state, so a run can be resumed with any number of ranks. `scalars` gets every step's loss and
    learning rate and every epoch's test figures, on rank 0.
    """
    rank_zero = _is_rank_zero()
    sync_grads = sync_over_ranks if world_size() > 1 else no_sync
    stop = stop if stop is not None else StopFlag()
    device = torch.device(device)
    train_images, train_labels = (tensor.to(device) for tensor in train_data)
    test_images, test_labels = (tensor.to(device) for tensor in test_data)
    steps_per_epoch = math.ceil(len(train_labels) / config.batch_size)
    weights = initial_state(config.seed)

    existing = sorted((out_dir / "checkpoints").glob("*.pt"))
    if existing and not resume:
        raise ConfigError(
            f"{out_dir} already holds a run ({len(existing)} checkpoints); pass --resume to continue it, "
            "or --overwrite to start again"
        )
    runs: list[OptimizerRun] = []
    refused: list[ScheduleSizedToTheRun] = []
    for name in config.optimizers:
        run = make_run(name, config.hyperparameters[name], weights, config.seed)
        path = _checkpoint_path(out_dir, name)
        if resume and path.exists():
            try:
                load_checkpoint(run, path, config)
            except ScheduleSizedToTheRun as error:
                refused.append(error)
        run.model.to(device)
        runs.append(run)
    if refused:
        raise _refuse_sized_schedules(refused, config.epochs)
    scalars = scalars if scalars is not None and rank_zero else ScalarLog()
    interval = curve_interval(steps_per_epoch)

    with _stop_on_sigint(stop):
        for run in runs:
            path = _checkpoint_path(out_dir, run.name)
            if run.epochs_done < config.epochs and not run.diverged:
                scalars.start(run.name, run.steps)
            while run.epochs_done < config.epochs and not run.diverged:
                epoch = run.epochs_done
                started = time.perf_counter() - run.epoch_seconds
                order = epoch_order(config.seed, epoch, len(train_labels)).to(device)
                batches = iterate_batches(train_images, train_labels, order, config.batch_size, run.batch_in_epoch)
                bar = _progress(steps_per_epoch, run.batch_in_epoch, f"{run.name} {epoch + 1}/{config.epochs}")

                def step_done(run: OptimizerRun, bar: Any = bar, started: float = started) -> None:
                    epoch_end = run.batch_in_epoch == steps_per_epoch
                    seconds = run.training_seconds + time.perf_counter() - started
                    bar.update(1)
                    if record_curve_point(run, interval=interval, epoch_end=epoch_end, wall_time_s=seconds):
                        # Redrawn at every point (about 50 an epoch), whatever tqdm's own rate limit says.
                        bar.set_postfix(loss=f"{run.curve[-1][2]:.4f}")
                    if scalars.takes_steps:
                        scalars.train_step(run.name, run.steps, run.last_loss, current_learning_rate(run.optimizer))
                    if on_step is not None:
                        on_step(run)

                try:
                    completed = train_epoch(
                        run,
                        batches,
                        hessian_every=config.hessian_every,
                        stop=stop,
                        on_step=step_done,
                        sync_grads=sync_grads,
                    )
                finally:
                    bar.close()
                if not completed and not run.diverged:
                    run.epoch_seconds = time.perf_counter() - started
                    if rank_zero:
                        save_checkpoint(run, path, config)
                    raise Interrupted(
                        f"stopped {run.name} in epoch {epoch + 1} at batch {run.batch_in_epoch}/{steps_per_epoch}; "
                        f"checkpoint saved in {path.parent}"
                    )
                run.training_seconds += time.perf_counter() - started
                set_mode(run.optimizer, training=False)  # every rank: the params stay the same everywhere
                test_loss, test_accuracy = (
                    evaluate(run.model, test_images, test_labels) if rank_zero else (math.nan, math.nan)
                )
                train_loss = run.loss_sum / max(run.examples_seen, 1)
                run.history.append(
                    {
                        "epoch": epoch + 1,
                        "train_loss": train_loss,
                        "test_loss": test_loss,
                        "test_accuracy": test_accuracy,
                        "wall_time_s": time.perf_counter() - started,
                        "steps": run.steps,
                    }
                )
                run.batch_in_epoch, run.loss_sum, run.examples_seen, run.epoch_seconds = 0, 0.0, 0, 0.0
                if not rank_zero:
                    continue
                scalars.test(run.name, run.steps, test_loss, test_accuracy)
                save_checkpoint(run, path, config)
                record = run.history[-1]
                log(
                    f"{run.name:>24} epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, "
                    f"test loss {test_loss:.4f}, test accuracy {100 * test_accuracy:.2f}% "
                    f"({record['wall_time_s']:.1f} s)" + ("  DIVERGED (non-finite loss)" if run.diverged else "")
                )
                if on_epoch is not None:
                    on_epoch(runs)
                if stop.requested:
                    raise Interrupted(f"stopped {run.name} after epoch {epoch + 1}; checkpoint saved in {path.parent}")
    return runs
