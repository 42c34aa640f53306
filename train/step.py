"""One optimizer step over accumulated micro-batches; the loop and the benchmarks share it."""
import math

import torch
from torch import Tensor, nn

from train.objective import loss_sum
from train.predict import autocast

MicroBatch = tuple[Tensor, Tensor, Tensor]  # tokens [B, T], lengths [B], labels [B], on the device


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[MicroBatch],
                   label_ids: Tensor, loss_kind: str = "classifier", max_grad_norm: float = 1.0) -> tuple[float, float]:
    """Accumulates the gradient of the mean loss over all rows of `micro_batches`, then clips and steps.

    Returns (loss, gradient norm). A non-finite loss leaves the parameters untouched."""
    rows = sum(len(labels) for _, _, labels in micro_batches)
    losses = []
    for tokens, lengths, labels in micro_batches:
        with autocast(tokens.device):
            loss = loss_sum(model, tokens, lengths, labels, label_ids, loss_kind) / rows
        loss.backward()
        losses.append(loss.detach())
    loss = torch.stack(losses).sum().item()  # one device sync per step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return loss, float("nan")
    grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm
