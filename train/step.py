"""One optimizer step over accumulated micro-batches; the loop and the benchmarks share it."""
import math
from functools import partial

import torch
from torch import Tensor, nn

from train.batch import Rows
from train.distributed import GradientSync
from train.graphs import BackwardGraphs, MicroBackward
from train.objective import loss_sum
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


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Rows],
                   label_ids: Tensor, loss_kind: str = "classifier", max_grad_norm: float = 1.0,
                   graphs: BackwardGraphs | None = None, dtype: torch.dtype = torch.bfloat16,
                   scaler: LossScaler | None = None, sync: GradientSync | None = None,
                   step_rows: int | None = None) -> tuple[float, float]:
    """Accumulates the gradient of the mean loss over all rows of `micro_batches` (under `dtype` autocast on CUDA,
    the loss multiplied by `scaler`'s scale for fp16), then unscales, clips and steps; through `graphs` when given
    (from `graphed_backward` with the same model, labels, loss and dtype).

    Data-parallel: `micro_batches` are this rank's share of a step of `step_rows` rows (the mean is over all of
    them), and `sync` sums the ranks' gradients and losses before clipping, so every rank takes the same step.

    Returns (loss, gradient norm before clipping). A non-finite loss or norm leaves the parameters untouched (and,
    with a scaler, lowers its scale)."""
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
    loss, grad_norm = torch.stack([loss, grad_norm.to(loss.device)]).tolist()  # the step's one device sync
    loss /= scaler.scale  # exact: the scale is a power of two
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    scaler.update(finite)
    zero_grad(optimizer, graphs, sync)
    return loss, grad_norm


def zero_grad(optimizer: torch.optim.Optimizer, graphs: BackwardGraphs | None = None,
              sync: GradientSync | None = None) -> None:
    """Clears the gradients for the next step, in place where something holds on to them."""
    if sync is not None:  # the gradients are views of its buffer (which the graphs, if any, add into too)
        sync.zero_grad()
    elif graphs is not None:  # the graphs add into the gradients they were recorded with
        graphs.zero_grad()
    else:
        optimizer.zero_grad(set_to_none=True)
