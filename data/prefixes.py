"""Rows that begin alike, scored with their common beginning computed once: a question's candidate answers share
the template's instructions and the question (a third of gsm8k_verify's tokens). In a line, such a family is its
shared prefix, then each member's remainder, which attends to the prefix and to itself; positions go on from the
prefix, so every row's hidden states are those it has alone."""
from typing import NamedTuple

import numpy as np
import torch

from data.batches import LineShape, PackedLine, chunk_sizes, first_fit_decreasing
from data.tokenize import Tokenized

MIN_SHARED_TOKENS = 32  # a shorter common beginning is not worth a sequence of its own
KV_PER_TOKEN = 2  # a line gathers at most this many keys a token: each token's own, and the prefixes members read


class Family(NamedTuple):
    rows: np.ndarray  # positions in the table
    shared: int  # leading tokens all rows have in common, computed once (0: none; fewer than any row has)

    def tokens(self, lengths: np.ndarray) -> int:
        return int(lengths[self.rows].sum()) - self.shared * (len(self.rows) - 1)

    def reread(self) -> int:
        """Keys read beyond each token's own: every member reads the prefix's."""
        return self.shared * len(self.rows)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


def prefix_families(table: Tokenized, rows: np.ndarray, shape: LineShape) -> list[Family]:
    """`rows` grouped into families that fit a line of `shape`. Sorted by their tokens, rows that begin alike lie
    side by side; a row joins its neighbours' family while their common beginning, computed once, saves at least
    as many tokens as before it joined (shared × (members - 1)) and is MIN_SHARED_TOKENS or more."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return []
    lengths = table.lengths
    order = table.by_tokens(rows).tolist()
    families, members, shared = [], [order[0]], 0
    row_tokens = int(lengths[order[0]])  # of the members, whole
    for previous, row in zip(order, order[1:]):
        limit = min(int(lengths[previous]), int(lengths[row])) - 1  # every member keeps a token of its own
        candidate = min(common_prefix(table.row(previous), table.row(row)), limit,
                        shared if len(members) > 1 else limit)
        n = len(members) + 1
        tokens = row_tokens + int(lengths[row]) - candidate * (n - 1)
        if (candidate >= MIN_SHARED_TOKENS and candidate * (n - 1) >= shared * (n - 2) and n <= shape.capacity
                and tokens <= shape.budget and candidate * n <= (KV_PER_TOKEN - 1) * shape.budget):
            members.append(row)
            shared, row_tokens = candidate, row_tokens + int(lengths[row])
        else:
            families.append(Family(np.array(members, dtype=np.int64), shared if len(members) > 1 else 0))
            members, shared, row_tokens = [row], 0, int(lengths[row])
    families.append(Family(np.array(members, dtype=np.int64), shared if len(members) > 1 else 0))
    return families


def pack_families(families: list[Family], lengths: np.ndarray, shape: LineShape) -> list[list[Family]]:
    """The families in lines of at most `shape.budget` tokens, `shape.capacity` rows and KV_PER_TOKEN keys a token,
    by first-fit decreasing."""
    if not families:
        return []
    sizes = np.array([(f.tokens(lengths), len(f.rows), f.reread()) for f in families], dtype=np.int64)
    limits = np.array([shape.budget, shape.capacity, (KV_PER_TOKEN - 1) * shape.budget])
    line_of = first_fit_decreasing(sizes, limits)
    order = np.argsort(-sizes[:, 0], kind="stable")
    return [[families[i] for i in order if line_of[i] == line] for line in range(line_of.max() + 1)]


def max_sequences(shape: LineShape) -> int:
    """Sequences of a line with shared prefixes: rows, at most one prefix per two rows, padding chunks (fewer than
    budget tokens), then the chunks that hold the unused keys (fewer than budget too: each token reads its own)."""
    return shape.capacity + shape.capacity // 2 + 2 * -(-shape.budget // shape.max_seqlen)


def collate_families(tokenized: Tokenized, families: list[Family], pad_id: int,
                     shape: LineShape) -> tuple[np.ndarray, PackedLine]:
    """The families packed into one line of `shape`: the row positions in the line's order, and the line, whose
    keys are gathered (`kv_index`) so that a member's sequence reads its prefix's keys and then its own."""
    budget, max_seqlen, n_keys = shape.budget, shape.max_seqlen, KV_PER_TOKEN * shape.budget
    segments: list[tuple[np.ndarray, int, int | None]] = []  # (token ids, first position, its prefix's segment)
    row_segments, rows = [], []
    for family in families:
        prefix = None
        if family.shared:
            prefix = len(segments)
            segments.append((tokenized.row(family.rows[0])[: family.shared], 0, None))
        for row in family.rows.tolist():
            row_segments.append(len(segments))
            rows.append(row)
            segments.append((tokenized.row(row)[family.shared:], family.shared, prefix))
    used = sum(len(ids) for ids, _, _ in segments)
    if len(rows) > shape.capacity or used > budget:
        raise ValueError(f"{len(rows)} rows of {used} tokens do not fit a line of {budget} tokens and "
                         f"{shape.capacity} rows")
    for size in chunk_sizes(budget - used, max_seqlen):
        segments.append((np.full(size, pad_id, dtype=np.int64), 0, None))

    q_lengths = np.array([len(ids) for ids, _, _ in segments], dtype=np.int64)
    q_starts = np.concatenate([[0], np.cumsum(q_lengths)[:-1]])
    kv_parts, kv_lengths = [], []
    for s, (_, _, prefix) in enumerate(segments):
        own = np.arange(q_starts[s], q_starts[s] + q_lengths[s])
        keys = own if prefix is None else np.concatenate([np.arange(q_starts[prefix], q_starts[prefix]
                                                                    + q_lengths[prefix]), own])
        kv_parts.append(keys)
        kv_lengths.append(len(keys))
    spare = n_keys - sum(kv_lengths)
    if spare < 0:
        raise ValueError(f"the line's rows read {sum(kv_lengths)} keys, more than its {n_keys}")
    spare_chunks = chunk_sizes(spare, max_seqlen)
    n_sequences = max_sequences(shape)
    if len(segments) + len(spare_chunks) > n_sequences:
        raise ValueError(f"{len(segments) + len(spare_chunks)} sequences do not fit a line's {n_sequences}")
    cu_q = np.full(n_sequences + 1, budget, dtype=np.int32)
    cu_q[: len(segments) + 1] = np.concatenate([[0], np.cumsum(q_lengths)])
    all_kv_lengths = np.array(kv_lengths + spare_chunks, dtype=np.int64)
    cu_k = np.full(n_sequences + 1, n_keys, dtype=np.int32)
    cu_k[: len(all_kv_lengths) + 1] = np.concatenate([[0], np.cumsum(all_kv_lengths)])
    kv_index = np.concatenate(kv_parts + [np.zeros(spare, dtype=np.int64)])  # spare keys: token 0, read by no query
    kv_doc = np.repeat(np.arange(len(all_kv_lengths)), all_kv_lengths)

    tokens = np.concatenate([ids for ids, _, _ in segments]).astype(np.int64)
    positions = np.concatenate([np.arange(first, first + len(ids)) for ids, first, _ in segments])
    last, labels, weights = (np.zeros(shape.capacity, np.int64), np.zeros(shape.capacity, np.int64),
                             np.zeros(shape.capacity, np.float32))
    last[: len(rows)] = cu_q[np.array(row_segments, dtype=np.int64) + 1] - 1
    weights[: len(rows)] = 1
    if tokenized.labels is not None:
        labels[: len(rows)] = tokenized.labels[rows]
    line = PackedLine(torch.from_numpy(tokens)[None], torch.from_numpy(positions), torch.from_numpy(cu_q),
                      torch.from_numpy(np.repeat(np.arange(len(segments)), q_lengths)), torch.from_numpy(last),
                      None if tokenized.labels is None else torch.from_numpy(labels), torch.from_numpy(weights),
                      max_seqlen, torch.from_numpy(kv_index), torch.from_numpy(kv_doc), torch.from_numpy(cu_k))
    return np.array(rows, dtype=np.int64), line
