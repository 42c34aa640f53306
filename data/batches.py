"""Batches of row positions: length-bucketed and shuffled for training, filled to a token budget for inference;
right-padded [B, T], or packed end to end into lines of a token budget (or cut to their rows: LineShape.fit)."""
from dataclasses import dataclass, replace

import numpy as np
import torch

from common.errors import UserError
from data.tokenize import Tokenized

BUCKET_BATCHES = 64  # rows are sorted by length within windows of this many steps
MIN_ROW_TOKENS = 16  # a line holds at most budget // 16 rows, whatever its table's shortest row
LINE_QUANTUM = 512  # a line cut to its rows (LineShape.fit) is a multiple of this many tokens: few shapes to record


def train_batch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch, the same on every call with the same (seed, epoch), whatever the number of ranks.

    Rows are shuffled, sorted by length within windows of 64 batches so a batch holds rows of similar length, and
    the batches are shuffled.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), window):
        rows = order[start : start + window]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches.extend(rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def split_tokens(lengths: np.ndarray, rows: np.ndarray, parts: int) -> list[np.ndarray]:
    """`rows` dealt into `parts` shares of near-equal token totals (longest first, each to the share with the
    fewest tokens so far), each share in ascending position order: a data-parallel step's rows, one share a rank."""
    rows = np.asarray(rows, dtype=np.int64)
    shares: list[list[int]] = [[] for _ in range(parts)]
    totals = np.zeros(parts, dtype=np.int64)
    for row in rows[np.argsort(-lengths[rows], kind="stable")].tolist():
        share = int(np.argmin(totals))
        shares[share].append(row)
        totals[share] += lengths[row]
    return [np.sort(np.array(share, dtype=np.int64)) for share in shares]


def scoring_shards(table: Tokenized, parts: int) -> list[np.ndarray]:
    """Every row position in one of `parts` shares of near-equal tokens, the rows each rank scores: the rows sorted
    by their tokens and cut in `parts` runs, so that rows that begin alike are scored together (data.prefixes)."""
    order = table.by_tokens(np.arange(len(table)))
    ends = np.cumsum(table.lengths[order])
    cuts = (np.searchsorted(ends, ends[-1] * np.arange(1, parts) / parts, side="right") if len(order)
            else np.zeros(parts - 1, dtype=np.int64))
    return [np.sort(share) for share in np.split(order, cuts)]


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


@dataclass(frozen=True)
class LineShape:
    """The shape of the lines packed from a table: `budget` tokens, sequences of at most `max_seqlen` (the table's
    longest row) and at most `capacity` rows (as many as its shortest rows fill). Flash attention launches work for
    every sequence slot up to max_seqlen, so neither is larger than the table needs. With `fit`, rows that make one
    line get a line cut to them (`fitted`): steps of a few rows, whose lengths vary from step to step, would
    otherwise fill a fraction of a line sized for the longest of them."""
    budget: int
    max_seqlen: int
    capacity: int
    fit: bool = False

    @classmethod
    def of(cls, lengths: np.ndarray, budget: int, fit: bool = False) -> "LineShape":
        longest, shortest = (int(lengths.max()), int(lengths.min())) if len(lengths) else (1, 1)
        if longest > budget:
            raise UserError(f"token budget {budget} is smaller than the longest prompt ({longest} tokens)")
        return cls(budget, longest, max(1, budget // max(MIN_ROW_TOKENS, shortest)), fit)

    def fitted(self, tokens: int, rows: int) -> "LineShape":
        """The shape of one line holding `rows` rows of `tokens` tokens in all: the budget rounded up to a multiple of
        LINE_QUANTUM (at most this one's), the row slots in proportion (at least `rows`)."""
        budget = min(self.budget, padded_length(max(tokens, 1), LINE_QUANTUM))
        capacity = min(self.capacity, max(rows, -(-self.capacity * budget // self.budget)))
        return replace(self, budget=budget, capacity=capacity)


def first_fit_decreasing(sizes: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """The line of each item [n] with `sizes` [n, k] (tokens, rows, ...), no line over `limits` [k] in any: largest
    first (by the first size), each into the first line with room for it, so that few lines carry padding."""
    order = np.argsort(-sizes[:, 0], kind="stable")
    room = np.zeros((len(order), sizes.shape[1]), dtype=np.int64)  # what each line opened so far has left
    line_of = np.empty(len(order), dtype=np.int64)
    n_lines = 0
    for item in order.tolist():
        fits = (room[:n_lines] >= sizes[item]).all(axis=1)
        line = int(np.argmax(fits)) if fits.any() else n_lines
        if line == n_lines:
            room[line], n_lines = limits, n_lines + 1
        room[line] -= sizes[item]
        line_of[item] = line
    return line_of


def pack_lines(lengths: np.ndarray, rows: np.ndarray, shape: LineShape) -> list[np.ndarray]:
    """`rows` (positions) in lines of at most `shape.budget` tokens and `shape.capacity` rows, by first-fit
    decreasing; each line's rows longest first."""
    rows = np.asarray(rows, dtype=np.int64)
    rows = rows[np.argsort(-lengths[rows], kind="stable")]
    if len(rows) and lengths[rows[0]] > shape.max_seqlen:
        raise ValueError(f"a row of {lengths[rows[0]]} tokens is longer than the line's {shape.max_seqlen}")
    sizes = np.stack([lengths[rows], np.ones(len(rows), dtype=np.int64)], axis=1)
    line_of = first_fit_decreasing(sizes, np.array([shape.budget, shape.capacity]))
    return [rows[line_of == line] for line in range(line_of.max() + 1 if len(rows) else 0)]


def chunk_sizes(total: int, size: int) -> list[int]:
    """`total` tokens in pieces of `size`, the last one shorter; no empty piece."""
    return [size] * (total // size) + ([total % size] if total % size else [])


@dataclass
class PackedLine:
    """Rows laid end to end in `budget` tokens, every tensor of a size fixed by the LineShape."""
    tokens: torch.Tensor  # int64 [1, budget]: the rows, then pad_id
    positions: torch.Tensor  # int64 [budget]: each token's position within its row (or padding chunk)
    cu_seqlens: torch.Tensor  # int32 [S + 1]: rows (shared prefixes among them), padding chunks of at most max_seqlen,
    # then sequences with no token (with shared prefixes, those hold the unused keys)
    doc: torch.Tensor  # int64 [budget]: each token's sequence
    last: torch.Tensor  # int64 [capacity]: each row's last token; 0 in the empty slots
    labels: torch.Tensor | None  # int64 [capacity], 0 in the empty slots
    weights: torch.Tensor  # float32 [capacity]: 1 for a row, 0 for an empty slot
    max_seqlen: int
    # With shared prefixes (data.prefixes) each sequence reads keys gathered from the line: a member its prefix's, then
    # its own
    kv_index: torch.Tensor | None = None  # int64 [K]: the line's token at each key
    kv_doc: torch.Tensor | None = None  # int64 [K]: each key's sequence
    cu_seqlens_k: torch.Tensor | None = None  # int32 [S + 1]


def collate_line(tokenized: Tokenized, rows: np.ndarray, pad_id: int, shape: LineShape) -> PackedLine:
    """The rows at `rows` (in that order) packed into one line of `shape`."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = tokenized.lengths[rows]
    budget, max_seqlen, capacity = shape.budget, shape.max_seqlen, shape.capacity
    used = int(lengths.sum())
    if len(rows) > capacity or used > budget or (len(rows) and lengths.max() > max_seqlen):
        raise ValueError(f"{len(rows)} rows of {used} tokens do not fit a line of {budget} tokens and {capacity} rows")
    sequences = np.array([*lengths, *chunk_sizes(budget - used, max_seqlen)], dtype=np.int64)
    n_sequences = capacity + -(-budget // max_seqlen)
    cu_seqlens = np.full(n_sequences + 1, budget, dtype=np.int32)
    cu_seqlens[: len(sequences) + 1] = np.concatenate([[0], np.cumsum(sequences)])
    starts = np.repeat(cu_seqlens[: len(sequences)], sequences)
    tokens = np.full(budget, pad_id, dtype=np.int64)
    tokens[:used] = tokenized.subset(rows).ids
    last, labels, weights = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64), np.zeros(capacity, np.float32)
    last[: len(rows)] = cu_seqlens[1 : len(rows) + 1] - 1
    weights[: len(rows)] = 1
    if tokenized.labels is not None:
        labels[: len(rows)] = tokenized.labels[rows]
    return PackedLine(torch.from_numpy(tokens)[None], torch.from_numpy(np.arange(budget) - starts),
                      torch.from_numpy(cu_seqlens), torch.from_numpy(np.repeat(np.arange(len(sequences)), sequences)),
                      torch.from_numpy(last), None if tokenized.labels is None else torch.from_numpy(labels),
                      torch.from_numpy(weights), max_seqlen)
