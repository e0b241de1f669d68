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
from .config import ConfigError, RunConfig
from .model import MnistCnn, initial_state

__all__ = [
    "CheckpointError",
    "Interrupted",
    "OptimizerRun",
    "StopFlag",
    "epoch_order",
    "evaluate",
    "has_modes",
    "iterate_batches",
    "run_comparison",
    "set_mode",
    "train_epoch",
    "train_step",
]

CHECKPOINT_FORMAT = 1
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

    @property
    def epochs_done(self) -> int:
        return len(self.history)


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
    }
    partial = path.with_suffix(".pt.part")
    torch.save(payload, partial)
    partial.replace(path)


def load_checkpoint(run: OptimizerRun, path: Path, config: RunConfig) -> None:
    """Restore `run` from `path`; raises `CheckpointError` naming the file if it is corrupt or from another run."""
    advice = f"delete {path} to restart {run.name} from scratch (or use a new --out)"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not an adaptopt checkpoint of format 1")
    except Exception as error:  # torch.load raises many types (zip, pickle, EOF) for a damaged file
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({error}); {advice}") from None
    if payload["config"] != config.to_json() or payload.get("name") != run.name:
        raise CheckpointError(
            f"{path}: made with a different configuration than this command's; rerun with the original options, "
            f"or {advice}"
        )
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


def _progress(total: int, initial: int, description: str) -> Any:
    from tqdm import tqdm

    show = sys.stdout.isatty() and _is_rank_zero()
    return tqdm(total=total, initial=initial, desc=description, leave=False, disable=not show)


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
) -> list[OptimizerRun]:
    """Train every optimizer of `config` in turn; returns their runs, histories filled in.

    Checkpoints go to `out_dir/checkpoints/<name>.pt` after every epoch and when stopped (Ctrl-C or `stop`),
    in which case `Interrupted` is raised after saving. `on_epoch` gets all runs after each epoch (to write
    results as they come). With `resume`, each optimizer continues from its checkpoint.

    Inside a process group (`adaptopt.distributed.launch`) every rank calls this with the same arguments
    and trains on its share of each batch; only rank 0 evaluates, logs, saves checkpoints and calls
    `on_epoch` (the other ranks' histories hold the training loss only). A checkpoint holds no rank's
    own state, so a run can be resumed with any number of ranks.
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
    for name in config.optimizers:
        run = make_run(name, config.hyperparameters[name], weights, config.seed)
        path = _checkpoint_path(out_dir, name)
        if resume and path.exists():
            load_checkpoint(run, path, config)
        run.model.to(device)
        runs.append(run)

    with _stop_on_sigint(stop):
        for run in runs:
            path = _checkpoint_path(out_dir, run.name)
            while run.epochs_done < config.epochs and not run.diverged:
                epoch = run.epochs_done
                started = time.perf_counter() - run.epoch_seconds
                order = epoch_order(config.seed, epoch, len(train_labels)).to(device)
                batches = iterate_batches(train_images, train_labels, order, config.batch_size, run.batch_in_epoch)
                bar = _progress(steps_per_epoch, run.batch_in_epoch, f"{run.name} {epoch + 1}/{config.epochs}")

                def step_done(run: OptimizerRun, bar: Any = bar) -> None:
                    bar.update(1)
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
