"""One optimizer step over accumulated micro-batches; the loop and the benchmarks share it."""
import math
from functools import partial

import torch
from torch import Tensor, nn

from train.graphs import BackwardGraphs, MicroBackward
from train.objective import loss_sum
from train.predict import autocast

MicroBatch = tuple[Tensor, Tensor, Tensor]  # tokens [B, T], lengths [B], labels [B], on the device


def micro_backward(model: nn.Module, tokens: Tensor, lengths: Tensor, labels: Tensor, scale: Tensor | float, *,
                   label_ids: Tensor, loss_kind: str = "classifier") -> Tensor:
    """Adds the gradients of scale · (summed loss of the rows) into the parameters' .grad; returns that scaled loss."""
    with autocast(tokens.device):
        loss = loss_sum(model, tokens, lengths, labels, label_ids, loss_kind) * scale
    loss.backward()
    return loss.detach()


def graphed_backward(model: nn.Module, params: list[Tensor], label_ids: Tensor,
                     loss_kind: str = "classifier") -> BackwardGraphs:
    """`micro_backward` replayed as CUDA graphs (`run.py train --cuda-graphs`); pass it to `optimizer_step`."""
    return BackwardGraphs(partial(micro_backward, model, label_ids=label_ids, loss_kind=loss_kind), params)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[MicroBatch],
                   label_ids: Tensor, loss_kind: str = "classifier", max_grad_norm: float = 1.0,
                   graphs: BackwardGraphs | None = None) -> tuple[float, float]:
    """Accumulates the gradient of the mean loss over all rows of `micro_batches`, then clips and steps; through
    `graphs` when given (from `graphed_backward` with the same model, labels and loss).

    Returns (loss, gradient norm before clipping). A non-finite loss or norm leaves the parameters untouched."""
    rows = sum(len(labels) for _, _, labels in micro_batches)
    backward: MicroBackward = graphs or partial(micro_backward, model, label_ids=label_ids, loss_kind=loss_kind)
    loss = sum(backward(tokens, lengths, labels, 1 / rows) for tokens, lengths, labels in micro_batches)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    loss, grad_norm = torch.stack([loss, grad_norm.to(loss.device)]).tolist()  # the step's one device sync
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    if graphs is None:
        optimizer.zero_grad(set_to_none=True)
    else:  # the graphs add into the gradients they were recorded with
        graphs.zero_grad()
    return loss, grad_norm
