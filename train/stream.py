"""The training rows as a stream of optimizer steps, each a list of micro-batches of row positions; its position is
part of a checkpoint."""
import numpy as np

from data import train_batch_order


class StepStream:
    """Each step takes up to `grad_accum` micro-batches of one epoch: an epoch ends with a short step rather than
    lending rows of the next, so `epochs` passes are exactly that many (train.schedule.total_steps counts them so).
    Every rank streams the same steps: under data parallelism each takes its share of a step (train.loop)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, grad_accum: int, seed: int, epoch: int = 0,
                 index: int = 0):
        self.lengths, self.batch_size, self.grad_accum, self.seed = lengths, batch_size, grad_accum, seed
        self.epoch, self.index = epoch, index
        self.order = self._epoch_order()

    def _epoch_order(self) -> list[np.ndarray]:
        return train_batch_order(self.lengths, self.batch_size, self.seed, self.epoch)

    def __next__(self) -> list[np.ndarray]:
        if self.index == len(self.order):
            self.epoch, self.index = self.epoch + 1, 0
            self.order = self._epoch_order()
        step = self.order[self.index : self.index + self.grad_accum]
        self.index += len(step)
        return step

    def most_tokens(self, steps: int) -> int:
        """The most tokens any of the next `steps` steps holds; this stream stays where it is."""
        ahead = StepStream(self.lengths, self.batch_size, self.grad_accum, self.seed, self.epoch, self.index)
        return max((int(sum(self.lengths[rows].sum() for rows in next(ahead))) for _ in range(steps)), default=0)

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}
