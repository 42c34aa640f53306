"""TensorBoard event files of a run (RUN/tensorboard/), beside metrics.jsonl: `tensorboard --logdir runs`."""
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.errors import UserError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "loss_scale")


class RunLog:
    """Writes scalars and histograms by optimizer step. The writer opens at the first write, so a run (or a refused
    resume) that logs nothing leaves no event file; a resumed run drops the events of steps after its checkpoint."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
        self.folder, self._summary_writer, self._writer = folder, SummaryWriter, None
        self.purge_step: int | None = None

    def resume_after(self, step: int) -> None:
        """Events from `step` + 1 on, logged before a crash, are hidden by TensorBoard (as trim_metrics drops them)."""
        self.purge_step = step + 1

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        """Every int or float value as `prefix/name`; None (and anything else) is skipped."""
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def step(self, record: dict) -> None:
        self.scalars("train", {name: record.get(name) for name in TRAIN_SCALARS}, record["step"])

    def evaluation(self, metrics: dict, p_true: np.ndarray) -> None:
        split, step = metrics["split"], metrics["step"]
        self.scalars(split, {k: v for k, v in metrics.items() if k != "step"}, step)
        self.writer.add_histogram(f"{split}/p_true", p_true, step)

    @property
    def writer(self) -> "SummaryWriter":
        if self._writer is None:
            self._writer = self._summary_writer(str(self.folder), purge_step=self.purge_step)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
