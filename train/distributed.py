"""Data parallelism under torchrun: one process per GPU (NCCL), or per CPU process (gloo), each holding the whole
frozen base and a replica of the LoRA weights. Gradients are summed once per optimizer step and every rank steps
the same AdamW state, so the replicas never drift; rank 0 alone writes."""
import contextlib
import datetime
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from common.errors import UserError
from common.launch import launched_ranks, local_rank, process_rank
from data import Tokenized, scoring_shards

TIMEOUT_VARIABLE = "LLAMA_JUDGE_DIST_TIMEOUT_S"  # how long a collective waits for a lost rank (default 600 s)


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_VARIABLE, "600")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{TIMEOUT_VARIABLE}={text!r}: must be a positive number of seconds")
    return value


@dataclass(frozen=True)
class World:
    """This process's place among the `size` processes torchrun started (one process: rank 0 of 1)."""
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        with _collective(self, "broadcast"):
            dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def broadcast_(self, tensors: list[Tensor]) -> None:
        """Overwrites each of `tensors` (on self.device) with rank 0's."""
        if self.size == 1:
            return
        with _collective(self, "broadcast"):
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        objects = [None] * self.size
        with _collective(self, "all_gather"):
            dist.all_gather_object(objects, obj)
        return objects

    def barrier(self) -> None:
        """Returns once every rank has come here (a tiny all-reduce: NCCL's own barrier guesses the GPU)."""
        self.max(0.0)

    def max(self, value: float) -> float:
        """The largest of every rank's `value`, on every rank."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        with _collective(self, "all_reduce"):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def gather(self, values: np.ndarray, shards: list[np.ndarray], n: int) -> np.ndarray:
        """Every rank's float32 `values` (rank r's for positions `shards[r]`) laid out as one array of `n`, on every
        rank."""
        if self.size == 1:
            out = np.empty(n, dtype=np.float32)
            out[shards[0]] = values
            return out
        width = max(len(shard) for shard in shards)
        padded = torch.zeros(width, dtype=torch.float32, device=self.device)
        padded[: len(values)] = torch.from_numpy(np.asarray(values, dtype=np.float32)).to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        with _collective(self, "all_gather"):
            dist.all_gather(parts, padded)
        out = np.empty(n, dtype=np.float32)
        for shard, part in zip(shards, parts):
            out[shard] = part[: len(shard)].cpu().numpy()
        return out


def scoring_share(table: Tokenized, world: World) -> tuple[Tokenized, list[np.ndarray]]:
    """This rank's share of the rows to score (the whole table in one process) and every rank's row positions, for
    `World.gather`."""
    if world.size == 1:  # no need to sort the rows to share them out
        return table, [np.arange(len(table))]
    shards = scoring_shards(table, world.size)
    return table.subset(shards[world.rank]), shards


@contextlib.contextmanager
def joined_world(device: torch.device) -> Iterator[World]:
    """This process's World, its process group set up for the run and torn down after it. Under torchrun with
    several processes: NCCL on CUDA (`device` is the GPU of this local rank: train.setup.pick_device), gloo on a
    CPU."""
    rank, size, local = process_rank(), launched_ranks(), local_rank()
    if size == 1:
        yield World(0, 1, device)
        return
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"rank {rank}: torchrun started local rank {local} on a node with "
                            f"{torch.cuda.device_count()} GPUs (pass --nproc-per-node {torch.cuda.device_count()} "
                            f"or fewer)")
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timeout_s()
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout),
                                **({"device_id": device} if device.type == "cuda" else {}))
    except (RuntimeError, ValueError, dist.DistError) as err:
        raise UserError(f"rank {rank}: setting up {backend} for {size} processes failed: {_first_line(err)}") from None
    try:
        yield World(rank, size, device)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _collective(world: World, what: str) -> Iterator[None]:
    """A collective that fails (a rank died, or hangs past the timeout) as one line naming this rank."""
    try:
        yield
    except (RuntimeError, dist.DistError) as err:
        raise UserError(f"rank {world.rank}: {what} across {world.size} processes failed ({_first_line(err)}): "
                        f"another rank died, or did not answer within {timeout_s():.0f} s") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


class GradientSync:
    """The trainable parameters' gradients as views of one flat float32 buffer, summed across ranks in one
    all-reduce per optimizer step (with the step's loss in its last slot). The views must stay: zero them with
    `zero_grad`, never set them to None."""

    def __init__(self, params: list[Tensor], world: World):
        self.params, self.world = params, world
        self.flat = torch.zeros(sum(p.numel() for p in params) + 1, dtype=torch.float32, device=world.device)
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("GradientSync: the trainable parameters must be float32")
        offset = 0
        for p in params:
            p.grad = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.grads = [p.grad for p in params]

    def all_reduce(self, loss: Tensor) -> Tensor:
        """Sums every rank's gradients in place; returns the sum of every rank's `loss`."""
        if any(p.grad is not grad for p, grad in zip(self.params, self.grads)):
            raise RuntimeError("GradientSync: a parameter's .grad was replaced; it must stay a view of the buffer")
        self.flat[-1] = loss
        with _collective(self.world, "the gradient all-reduce"):
            dist.all_reduce(self.flat)
        return self.flat[-1].clone()

    def zero_grad(self) -> None:
        self.flat.zero_()


def broadcast_training_state(world: World, params: list[Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Every rank takes rank 0's LoRA weights and AdamW moments and step counts (after rank 0 loaded a checkpoint,
    or to start from one initialization whatever each rank drew)."""
    if world.size == 1:
        return
    steps = world.broadcast_object([int(optimizer.state[p]["step"]) if p in optimizer.state else None for p in params])
    moments = []
    for p, step in zip(params, steps):
        if step is None:
            optimizer.state.pop(p, None)
            continue
        state = optimizer.state.setdefault(p, {})
        state["step"] = step
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=torch.float32)
            moments.append(state[key])
    with torch.no_grad():
        world.broadcast_([p.data for p in params] + moments)
