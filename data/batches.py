"""Batches of row positions: length-bucketed and shuffled for training, filled to a token budget for inference."""
import numpy as np
import torch

from common.errors import UserError
from data.tokenize import Tokenized

BUCKET_BATCHES = 64  # rows are sorted by length within windows of this many steps


def train_batch_order(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[np.ndarray]:
    """This rank's batches for one epoch, the same on every call with the same (seed, epoch).

    Rows are shuffled, sorted by length within windows of 64 steps so a batch holds rows of similar length, and
    the steps are shuffled. A step is world_size batches, one per rank, of similar lengths; with several ranks
    a few rows are repeated so that every rank gets as many rows (as torch's DistributedSampler does).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    order = np.resize(order, -(-len(order) // world_size) * world_size)
    step = batch_size * world_size
    window = step * BUCKET_BATCHES
    steps = []
    for start in range(0, len(order), window):
        rows = order[start : start + window]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        steps.extend(rows[i : i + step] for i in range(0, len(rows), step))
    return [steps[i][rank::world_size] for i in rng.permutation(len(steps))]


def budget_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Batches for inference, longest rows first, each with rows × its longest length ≤ max_tokens.

    The batches together hold every row once; the positions they carry put predictions back in input order.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if len(order) and lengths[order[0]] > max_tokens:
        raise UserError(f"token budget {max_tokens} is smaller than the longest prompt ({lengths[order[0]]} tokens)")
    batches = []
    start = 0
    while start < len(order):
        rows = max_tokens // int(lengths[order[start]])
        batches.append(order[start : start + rows])
        start += rows
    return batches


def padded_length(length: int | np.ndarray, multiple: int) -> int | np.ndarray:
    """`length` rounded up to a multiple of `multiple`."""
    return -(-length // multiple) * multiple


def collate(
    tokenized: Tokenized, rows: np.ndarray, pad_id: int, pad_to_multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """tokens [B, T] right-padded with pad_id (T = the longest row, rounded up to `pad_to_multiple`), lengths [B],
    labels [B] or None."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = tokenized.lengths[rows]
    tokens = np.full((len(rows), padded_length(int(lengths.max()), pad_to_multiple)), pad_id, dtype=np.int64)
    is_token = np.arange(tokens.shape[1]) < lengths[:, None]
    tokens[is_token] = tokenized.subset(rows).ids  # row-major: row after row, as subset lays them out
    labels = None if tokenized.labels is None else torch.from_numpy(tokenized.labels[rows])
    return torch.from_numpy(tokens), torch.from_numpy(lengths), labels
