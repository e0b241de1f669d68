"""`adaptopt mnist --tensorboard DIR`: the comparison's scalars as TensorBoard event files, one run per optimizer.

`DIR/<optimizer>/` gets `train/loss` and `train/lr` at every step and `test/loss` and `test/accuracy` at every
epoch's end, all against the step count, through `torch.utils.tensorboard`. It needs the `tensorboard`
package (`pip install 'adaptopt[tensorboard]'`). A resumed optimizer purges what its writer had logged past the
checkpoint's step, so a run killed between checkpoints is not drawn twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError
from .train import ScalarLog

__all__ = ["TensorBoardLog"]


class TensorBoardLog(ScalarLog):
    """A `ScalarLog` writing one TensorBoard run per optimizer under `directory`."""

    takes_steps = True

    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch.utils.tensorboard imports the tensorboard package
            raise ConfigError(
                "--tensorboard needs the tensorboard package: pip install 'adaptopt[tensorboard]' "
                "(or pip install tensorboard)"
            ) from None
        self._writer_type = SummaryWriter
        self.directory = directory
        self._writers: dict[str, Any] = {}

    def start(self, name: str, steps_done: int) -> None:
        if name in self._writers:
            self._writers.pop(name).close()
        # purge_step drops events at or past the step training continues from (none on a fresh run).
        purge_step = steps_done + 1 if steps_done else None
        self._writers[name] = self._writer_type(log_dir=str(self.directory / name), purge_step=purge_step)

    def train_step(self, name: str, step: int, loss: float, learning_rate: float | None) -> None:
        writer = self._writers[name]
        writer.add_scalar("train/loss", loss, step)
        if learning_rate is not None:
            writer.add_scalar("train/lr", learning_rate, step)

    def test(self, name: str, step: int, loss: float, accuracy: float) -> None:
        writer = self._writers[name]
        writer.add_scalar("test/loss", loss, step)
        writer.add_scalar("test/accuracy", accuracy, step)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
