"""A training micro-batch's forward and backward pass, recorded once per batch shape as a CUDA graph and replayed.

Small models spend most of a step waiting on the host to launch kernels (SmolLM2-135M at 16 × 512 compiled: ~100 ms
a step, of which the GPU is busy ~30); a replay launches the whole pass at once."""
from collections.abc import Callable

import torch
from torch import Tensor

from train.batch import Rows

MicroBackward = Callable[[Rows, "Tensor | float"], Tensor]  # (rows, scale) -> the scaled loss


class BackwardGraphs:
    """Does what `backward(rows, scale)` does — adds the gradients of the scaled loss into each
    parameter's .grad and returns the scaled loss, detached — by replaying a CUDA graph recorded the first time
    those shapes come.

    The graphs add into the .grad tensors that exist when they are recorded: zero them with `zero_grad`, never
    replace them. All graphs share one memory pool, which is safe because one runs at a time and their one output,
    the loss, is copied out before the next replay."""

    def __init__(self, backward: MicroBackward, params: list[Tensor], warmup_passes: int = 3):
        self.backward, self.params, self.warmup_passes = backward, params, warmup_passes
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in params]
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Rows, Tensor, Tensor]] = {}
        self.pool = None

    def __call__(self, rows: Rows, scale: float) -> Tensor:
        if any(p.grad is not grad for p, grad in zip(self.params, self.grads)):
            raise RuntimeError("BackwardGraphs: a parameter's .grad was replaced; the graphs add into the old one "
                               "(zero them with BackwardGraphs.zero_grad)")
        key = tuple((tuple(t.shape), t.dtype) for t in rows.tensors())
        if key not in self.graphs:
            self.graphs[key] = self._record(rows)
        graph, static_rows, static_scale, loss = self.graphs[key]
        torch._foreach_copy_(static_rows.tensors(), rows.tensors())
        static_scale.fill_(scale)
        graph.replay()
        return loss.clone()

    def zero_grad(self) -> None:
        """In place, as the graphs need, in one multi-tensor fill rather than a kernel per parameter."""
        torch._foreach_zero_(self.grads)

    def _record(self, rows: Rows) -> tuple[torch.cuda.CUDAGraph, Rows, Tensor, Tensor]:
        device = rows.tokens.device
        static_rows, static_scale = rows.map(torch.clone), torch.zeros((), device=device)
        before = [grad.cpu() for grad in self.grads]  # the warm-up passes add into the gradients; no GPU memory
        # Warm-up on a side stream, as capture requires: compiles new shapes and sets up cuBLAS and autograd state.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_passes):
                self.backward(static_rows, static_scale)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self.backward(static_rows, static_scale)
        self.pool = graph.pool()
        torch._foreach_copy_(self.grads, before)
        return graph, static_rows, static_scale, loss
