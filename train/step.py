"""One optimizer step over accumulated micro-batches; the loop and the benchmarks share it. `launch_optimizer_step`
queues the step on the device without waiting for it, so that the host can prepare the next while the GPU works;
`optimizer_step` waits for its loss and gradient norm."""
import math
import time
from functools import partial

import torch
from torch import Tensor, nn

from train.batch import Rows
from train.distributed import GradientSync
from train.graphs import BackwardGraphs, MicroBackward
from train.objective import loss_sum
from train.optim import AdamW
from train.precision import LossScaler
from train.predict import autocast


def micro_backward(model: nn.Module, rows: Rows, scale: Tensor | float, *, label_ids: Tensor,
                   loss_kind: str = "classifier", dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Adds the gradients of scale · (summed loss of the rows) into the parameters' .grad; returns that scaled loss.
    On CUDA the pass runs under `dtype` autocast."""
    with autocast(rows.tokens.device, dtype):
        loss = loss_sum(model, rows, label_ids, loss_kind) * scale
    loss.backward()
    return loss.detach()


def graphed_backward(model: nn.Module, params: list[Tensor], label_ids: Tensor, loss_kind: str = "classifier",
                     dtype: torch.dtype = torch.bfloat16) -> BackwardGraphs:
    """`micro_backward` replayed as CUDA graphs; pass it to `optimizer_step`."""
    return BackwardGraphs(partial(micro_backward, model, label_ids=label_ids, loss_kind=loss_kind, dtype=dtype), params)


class PendingStep:
    """A launched step's (loss, gradient norm before clipping), on their way to the host: copied into pinned memory
    behind the step's work, so that `get` waits for this step alone, not for work queued after it. `done_at`: the
    perf_counter time the values were known on the host (on a CPU, at once; on a GPU, when `get` had them)."""

    def __init__(self, loss: Tensor, grad_norm: Tensor):
        values = torch.stack([loss.float(), grad_norm.to(loss.device).float()])
        self.ready, self.done_at = None, None
        if values.is_cuda:
            self.host = torch.empty(2, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event(enable_timing=True)  # the loop times the step on the device with it
            self.ready.record()
        else:
            self.host, self.done_at = values, time.perf_counter()

    @classmethod
    def known(cls, loss: float, grad_norm: float) -> "PendingStep":
        return cls(torch.tensor(loss), torch.tensor(grad_norm))

    def get(self) -> tuple[float, float]:
        if self.done_at is None:
            self.ready.synchronize()
            self.done_at = time.perf_counter()
        loss, grad_norm = self.host.tolist()
        return loss, grad_norm


def optimizer_step(*args, **kwargs) -> tuple[float, float]:
    """`launch_optimizer_step`, waiting for its (loss, gradient norm before clipping)."""
    return launch_optimizer_step(*args, **kwargs).get()


def launch_optimizer_step(model: nn.Module, optimizer: AdamW, micro_batches: list[Rows],
                          label_ids: Tensor, loss_kind: str = "classifier", max_grad_norm: float = 1.0,
                          graphs: BackwardGraphs | None = None, dtype: torch.dtype = torch.bfloat16,
                          scaler: LossScaler | None = None, sync: GradientSync | None = None,
                          step_rows: int | None = None) -> PendingStep:
    """Accumulates the gradient of the mean loss over all rows of `micro_batches` (under `dtype` autocast on CUDA,
    the loss multiplied by `scaler`'s scale for fp16), then unscales, clips and steps; through `graphs` when given
    (from `graphed_backward` with the same model, labels, loss and dtype).

    Data-parallel: `micro_batches` are this rank's share of a step of `step_rows` rows (the mean is over all of
    them), and `sync` sums the ranks' gradients and losses before clipping, so every rank takes the same step.

    Returns the step's (loss, gradient norm before clipping), pending. A non-finite loss or norm leaves the
    parameters untouched, decided on the device; with a scaler (fp16), whose scale the next step needs, the step
    waits for them and a non-finite one lowers the scale."""
    scaler = scaler or LossScaler.disabled()
    n_rows = step_rows or sum(rows.n_rows for rows in micro_batches)
    backward: MicroBackward = graphs or partial(micro_backward, model, label_ids=label_ids, loss_kind=loss_kind,
                                                dtype=dtype)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = params[0].device
    loss = sum((backward(rows, scaler.scaled(1 / n_rows)) for rows in micro_batches), torch.zeros((), device=device))
    if sync is not None:
        loss = sync.all_reduce(loss)
    scaler.unscale_(params)
    grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not scaler.enabled:
        optimizer.step(found_inf=(~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float())
        zero_grad(optimizer, graphs, sync)
        return PendingStep(loss, grad_norm)
    loss, grad_norm = torch.stack([loss, grad_norm.to(loss.device)]).tolist()  # the step's one device sync
    loss /= scaler.scale  # exact: the scale is a power of two
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    scaler.update(finite)
    zero_grad(optimizer, graphs, sync)
    return PendingStep.known(loss, grad_norm)


def zero_grad(optimizer: torch.optim.Optimizer, graphs: BackwardGraphs | None = None,
              sync: GradientSync | None = None) -> None:
    """Clears the gradients for the next step, in place where something holds on to them."""
    if sync is not None:  # the gradients are views of its buffer (which the graphs, if any, add into too)
        sync.zero_grad()
    elif graphs is not None:  # the graphs add into the gradients they were recorded with
        graphs.zero_grad()
    else:
        optimizer.zero_grad(set_to_none=True)
