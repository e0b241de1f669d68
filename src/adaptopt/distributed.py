"""Data-parallel training on one machine: start a process group, wrap the model, split each batch.

The optimizers need no code of their own for `torch.distributed`: under DDP, ZeroRedundancyOptimizer and
FSDP2 they see averaged (or sharded) gradients and behave as in one process over the whole batch; see
docs/distributed.md for how each is used and what is verified. This module holds what a training script,
such as `adaptopt mnist --nproc N`, needs around them:

```python
def worker(config):
    model = data_parallel(build_model())             # DDP when there is more than one rank
    optimizer = adaptopt.create(config.name, model.parameters())
    for inputs, targets in loader:                   # every rank iterates the same global batches
        inputs, targets = rank_share(inputs), rank_share(targets)
        ...

result_of_rank_0 = launch(worker, nproc, config)
```

Each rank takes a contiguous share of every global batch. With equal shares DDP's average of the ranks'
mean gradients is the mean gradient of the global batch, so N processes follow the trajectory of one
process up to rounding; for batches that do not split evenly (an epoch's last), `average_gradients` in
place of DDP weights the shares by their sizes. Sophia's `update_hessian` takes the *global* batch size.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "average_gradients",
    "data_parallel",
    "free_port",
    "launch",
    "loopback_interface",
    "rank_share",
    "world_size",
]

ResultT = TypeVar("ResultT")

_LOCALHOST = "127.0.0.1"


def world_size() -> int:
    """The number of ranks of the default process group, or 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_share(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the global `batch` (dimension 0); the whole batch without a group.

    The shares are as equal as they can be (`torch.tensor_split`: sizes differ by at most one, and a
    batch smaller than the group leaves some ranks empty). DDP averages the ranks' mean gradients with
    equal weights, which is the batch's mean gradient only when the shares are equal; `average_gradients`
    weights them by size and is exact for any split.
    """
    return torch.tensor_split(batch, world_size())[_rank()]


def average_gradients(parameters: Iterable[torch.Tensor], local_count: int) -> int:
    r"""Replace every rank's grads by the mean gradient of the global batch; return the global batch size.

    Call it on every rank after the backward of the *mean* loss over this rank's `local_count` examples;
    a rank with no examples calls it without a backward (missing grads count as zero). Each rank's grad
    is weighted by its share of the batch before the sum over ranks:
    $\sum_r \frac{n_r}{N} g_r = \frac{1}{N} \sum_i \nabla \ell_i$, whatever the sizes $n_r$. The
    returned $N$ is what Sophia's `update_hessian` takes. Without a process group it returns
    `local_count` and changes nothing.
    """
    if isinstance(local_count, bool) or not isinstance(local_count, int) or local_count < 0:
        raise ValueError(f"local_count must be an int >= 0, got {local_count!r}")
    if world_size() == 1:
        return local_count
    total = torch.tensor([local_count], dtype=torch.int64)
    dist.all_reduce(total)
    global_count = int(total.item())
    if global_count == 0:
        raise ValueError("the global batch is empty on every rank")
    for param in parameters:
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        param.grad.mul_(local_count / global_count)
        dist.all_reduce(param.grad)
    return global_count


def data_parallel(model: nn.Module, **ddp_options: Any) -> nn.Module:
    """`model` wrapped in `DistributedDataParallel` when more than one rank is running, else `model` itself."""
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, **ddp_options)


def launch(
    worker: Callable[..., ResultT],
    nproc: int,
    *args: Any,
    timeout: float = 3600.0,
    collective_timeout: float = 300.0,
) -> ResultT:
    """Run `worker(*args)` in `nproc` new processes forming a gloo group on 127.0.0.1; return rank 0's result.

    `worker` must be picklable (a module-level function): the processes are started with `spawn`. Inside
    it, `torch.distributed` is initialised; `world_size()`, `rank_share` and `data_parallel` use it. The
    CPU threads are divided among the ranks so that they do not oversubscribe the cores.

    If a rank raises, the others are stopped and `RuntimeError` carries the rank's traceback. If the ranks
    have not all finished after `timeout` seconds they are killed and `TimeoutError` is raised; a
    collective that waits longer than `collective_timeout` seconds for a peer fails inside the rank.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    context = torch.multiprocessing.get_context("spawn")
    reports = context.Queue()
    threads = max(1, torch.get_num_threads() // nproc)
    port = free_port()
    processes = [
        context.Process(
            target=_run_rank,
            args=(worker, args, rank, nproc, port, threads, collective_timeout, reports),
            name=f"adaptopt-rank-{rank}",
        )
        for rank in range(nproc)
    ]
    for process in processes:
        process.start()
    try:
        results = _collect(processes, reports, deadline=time.monotonic() + timeout)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
    result: ResultT = pickle.loads(results[0])
    return result


def _collect(processes: list[Any], reports: Any, *, deadline: float) -> dict[int, Any]:
    """Wait for every rank's report; raise as soon as one fails, dies silently or time runs out."""
    results: dict[int, Any] = {}
    while len(results) < len(processes):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(len(processes))) - results.keys())
            raise TimeoutError(f"ranks {missing} had not finished when the timeout expired")
        try:
            rank, error, result = reports.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            # A rank killed by a signal never reports; its exit code is the only sign. It is checked only
            # when the queue is empty, so a rank that reported and then exited is not mistaken for one.
            for rank, process in enumerate(processes):
                if rank not in results and process.exitcode is not None and reports.empty():
                    raise RuntimeError(f"rank {rank} exited with code {process.exitcode} without a result") from None
            continue
        if error is not None:
            raise RuntimeError(f"rank {rank} failed:\n{error}")
        results[rank] = result
    return results


def _run_rank(
    worker: Callable[..., Any],
    args: tuple[Any, ...],
    rank: int,
    nproc: int,
    port: int,
    threads: int,
    collective_timeout: float,
    reports: Any,
) -> None:
    try:
        # gloo would otherwise pick the interface of the machine's hostname; loopback keeps the group local.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
        torch.set_num_threads(threads)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{_LOCALHOST}:{port}",
            rank=rank,
            world_size=nproc,
            timeout=timedelta(seconds=collective_timeout),
        )
        result = worker(*args)
        # Only rank 0's result is returned; the others report that they finished. The result is pickled
        # here, by value: through the queue, torch would send tensors as shared-memory handles that the
        # launching process could no longer open once this process has exited.
        reports.put((rank, None, pickle.dumps(result) if rank == 0 else None))
    except BaseException:
        reports.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; another process could take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_LOCALHOST, 0))
        return int(probe.getsockname()[1])


def loopback_interface() -> str:
    """The loopback interface's name: 'lo' on Linux, 'lo0' on macOS."""
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    raise RuntimeError("no loopback network interface found")
