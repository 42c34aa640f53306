"""The fast path a CUDA run takes by default: compiled blocks, and for training each micro-batch's forward and
backward replayed as one CUDA graph; each steps back (to eager, to no graphs) in one line when it fails."""
import importlib.util
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

from model.llama import flash_varlen_available
from train.graphs import BackwardGraphs
from train.step import graphed_backward

T = TypeVar("T")
# Blocks that keep their activations for the backward pass (not recomputed) keep fewer: the partitioner recomputes
# SwiGLU's product and two norms' outputs instead, 30 % fewer bytes a token for 1 % of the step (the 8B in FP8
# without checkpointing: 19.2 GB instead of 25.0; bench/RESULTS.md). Blocks recomputed whole gain nothing by it.
KEPT_ACTIVATION_BUDGET = 0.9
# Recomputing every block: rather than wrap each in checkpoint(), which keeps only its input and recomputes the
# whole block, the partitioner keeps the few results dearest to recompute for their size (the 8B at 8 x 512 in bf16:
# 12,237 tokens/s at 8.83 GB, against 11,039 at 8.34 GB under checkpoint(); bench/RESULTS.md).
RECOMPUTED_ACTIVATION_BUDGET = 0.02
COMPILE_ERRORS: tuple[type[BaseException], ...] = (torch._dynamo.exc.TorchDynamoException,)
if hasattr(torch._inductor.exc, "InductorError"):
    COMPILE_ERRORS += (torch._inductor.exc.InductorError,)


def compile_available(device: torch.device) -> str | None:
    """None where torch.compile can build kernels for `device`, else why not."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def recomputes_every_block(model: nn.Module) -> bool:
    return model.grad_checkpoint is True or model.grad_checkpoint >= len(model.model.layers)


def blocks_compile_whole(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a block compiles to one graph: where packed attention is flash attention's variable-length kernel
    (bf16 or fp16 on an Ampere or newer GPU). Elsewhere it loops over a line's sequences on the host; the loop breaks
    the graph, and what runs between the pieces keeps its activations unless checkpoint() recomputes it."""
    return flash_varlen_available(device) and dtype in (torch.bfloat16, torch.float16)


def activation_budget(model: nn.Module, in_graph: bool = True) -> float:
    """Where every block is to be recomputed: RECOMPUTED_ACTIVATION_BUDGET inside the compiled graphs (`in_graph`),
    else 1 (each block under checkpoint(), where a budget would only add recomputation). Otherwise
    KEPT_ACTIVATION_BUDGET: the blocks `--grad-checkpoint N` names run under checkpoint() either way."""
    if recomputes_every_block(model):
        return RECOMPUTED_ACTIVATION_BUDGET if in_graph else 1.0
    return KEPT_ACTIVATION_BUDGET


def compile_for_training(model: nn.Module, in_graph: bool, activation_memory_budget: float | None = None,
                         any_length: bool = False) -> None:
    """Compiles the blocks under `activation_memory_budget` (default: activation_budget's), for packed lines of any
    length at once where `any_length`. Where every block is to be recomputed and `in_graph` (blocks_compile_whole), the
    partitioner recomputes inside the compiled blocks and no block runs under checkpoint()."""
    in_graph = in_graph and recomputes_every_block(model)
    budget = activation_budget(model, in_graph) if activation_memory_budget is None else activation_memory_budget
    model.compile_blocks(budget, recompute_in_graph=in_graph, any_length=any_length)


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


class FastPath:
    """Compiled blocks (`compile`; for packed lines of any length where `any_length`, else for each new length as it
    comes) and CUDA graphs of the training pass (`graphs`, given the trainable `params`; one a shape) while they
    work. `run(fn)` calls fn(); if compiling or recording fails, it says so in one line, drops what failed, restores
    the RNG, calls `reset` and fn() again."""

    def __init__(self, model: nn.Module, device: torch.device, compile: bool, graphs: bool = False,
                 params: list[Tensor] = (), label_ids: Tensor | None = None, loss_kind: str = "classifier",
                 dtype: torch.dtype = torch.bfloat16, any_length: bool = False):
        self.model, self.compiled, self.graphs = model, False, None
        if compile:
            why_not = compile_available(device)
            if why_not is None:
                compile_for_training(model, blocks_compile_whole(device, dtype), any_length=any_length)
                self.compiled = True
            else:
                print(f"note: running eager, without compiled blocks ({why_not})")
        if graphs:
            self.graphs: BackwardGraphs | None = graphed_backward(model, list(params), label_ids, loss_kind, dtype)

    def run(self, fn: Callable[[], T], reset: Callable[[], None] = lambda: None) -> T:
        if not self.compiled and self.graphs is None:
            return fn()
        rng = torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            raise
        except COMPILE_ERRORS as err:
            print(f"note: compilation failed ({first_line(err)}); running eager from here")
            self.model.uncompile_blocks()
            self.compiled = False
        except RuntimeError as err:
            if self.graphs is None:
                raise
            print(f"note: recording CUDA graphs failed ({first_line(err)}); running without them from here")
            torch.cuda.synchronize()
            self.graphs = None
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1])
        reset()
        return self.run(fn, reset)
