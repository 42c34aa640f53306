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

    Returns (loss, gradient norm before clipping). A non-finite loss or norm leaves the parameters untouched."""
    rows = sum(len(labels) for _, _, labels in micro_batches)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    cuda_graphs = getattr(model, "cuda_graphs", False)
    if cuda_graphs:  # gradients the graphs return live in memory their next replay reuses: add them up elsewhere
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    loss = 0
    for tokens, lengths, labels in micro_batches:
        with autocast(tokens.device):
            micro_loss = loss_sum(model, tokens, lengths, labels, label_ids, loss_kind) / rows
        micro_loss.backward()
        loss = loss + micro_loss.detach()
    grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    loss, grad_norm = torch.stack([loss, grad_norm.to(loss.device)]).tolist()  # the step's one device sync
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=not cuda_graphs)
    return loss, grad_norm
