"""Scoring a tokenized table: one forward pass per token-budget batch, no generation."""
import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.attention import sdpa_kernel

from data import LineShape, Tokenized, budget_batches, pack_lines, padded_length
from data.prefixes import collate_families, pack_families, prefix_families
from model.llama import BACKENDS_WITHOUT_CUDNN
from train.batch import Rows, line_as_rows, line_rows, padded_rows
from train.objective import label_logits


def autocast(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` (bf16 or fp16) on CUDA; plain float32 elsewhere, or with dtype float32."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def attention_without_cudnn(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, scaled_dot_product_attention restricted to its flash, memory-efficient and math kernels. For batches
    whose shape keeps changing (eager training and scoring: each batch is padded to its own longest row), cuDNN's
    kernel costs more than it saves: it builds an execution plan for every new shape, about 80 ms of host time
    for the forward pass and as much for the backward on an H100 (bench/RESULTS.md)."""
    if device.type == "cuda":
        return sdpa_kernel(BACKENDS_WITHOUT_CUDNN)
    return contextlib.nullcontext()


def default_batch_tokens(device: torch.device) -> int:
    """Token budget of a scoring batch: large on a GPU; small on a CPU, where a batch that outgrows the caches runs
    slower (SmolLM2-135M on 2 cores: 479 tokens/s at 2k tokens a batch, 349 at 31k)."""
    return 32768 if device.type == "cuda" else 2048


def scoring_batches(table: Tokenized, pad_id: int, max_batch_tokens: int, pack: bool, pad_to_multiple: int = 1,
                    share_prefixes: bool = True) -> Iterator[tuple[np.ndarray, Rows]]:
    """(row positions, rows) of every scoring batch, collated as they are needed: lines of `max_batch_tokens` packed
    rows (rows that begin alike sharing their common beginning, with `share_prefixes`), or right-padded batches of
    at most that many tokens, longest first."""
    shape = LineShape.of(table.lengths, max_batch_tokens) if pack else None
    if pack and share_prefixes:
        for families in pack_families(prefix_families(table, np.arange(len(table)), shape), table.lengths, shape):
            positions, line = collate_families(table, families, pad_id, shape)
            yield positions, line_as_rows(line, len(positions))
    elif pack:
        for positions in pack_lines(table.lengths, np.arange(len(table)), shape):
            yield positions, line_rows(table, positions, pad_id, shape)
    else:
        for indices in budget_batches(padded_length(table.lengths, pad_to_multiple), max_batch_tokens):
            yield indices, padded_rows(table, indices, pad_id, pad_to_multiple)


@torch.no_grad()
def predict_p_true(model: nn.Module, table: Tokenized, label_ids: torch.Tensor, pad_id: int,
                   max_batch_tokens: int | None, device: torch.device, progress=None,
                   pad_to_multiple: int = 1, pack: bool = False, dtype: torch.dtype = torch.bfloat16,
                   share_prefixes: bool = True) -> np.ndarray:
    """P(True) for every row of `table`, in the table's order; batches of at most `max_batch_tokens`
    (default: `default_batch_tokens`, or the longest row where that is longer): lines of packed rows (rows that begin
    alike computing their common beginning once, unless not `share_prefixes`), or batches each padded to a multiple
    of `pad_to_multiple` tokens; on CUDA under `dtype` autocast."""
    padded = padded_length(table.lengths, pad_to_multiple)
    if max_batch_tokens is None and len(table):
        max_batch_tokens = max(default_batch_tokens(device), int(padded.max()))
    was_training = model.training
    model.eval()
    p_true = np.empty(len(table), dtype=np.float32)
    for indices, rows in scoring_batches(table, pad_id, max_batch_tokens, pack, pad_to_multiple, share_prefixes):
        with autocast(device, dtype):
            logits = label_logits(model, rows.to(device), label_ids)
        p_true[indices] = torch.softmax(logits, dim=-1)[: len(indices), 1].cpu().numpy()
        if progress is not None:
            progress.update(len(indices))
    model.train(was_training)
    return p_true
