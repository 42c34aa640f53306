"""Batches: training order bucketed and deterministic; shares for ranks; inference by token budget; collate pads."""
import numpy as np
import pytest
import torch

from common.errors import UserError
from data import Tokenized, budget_batches, collate, padded_length, scoring_shards, split_tokens, train_batch_order


def ragged(lengths: list[int], labels: list[int] | None = None) -> Tokenized:
    """Row i holds the ids 1000*i + 1, 1000*i + 2, ... so every token says which row it came from."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([1000 * i + np.arange(1, n + 1) for i, n in enumerate(lengths)]).astype(np.int32)
    return Tokenized(ids, offsets, None if labels is None else np.array(labels), np.zeros(0, dtype=np.int64))


def lengths_of(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 500, size=rows)


def test_every_row_once_per_epoch():
    lengths = lengths_of(1_003)
    batches = train_batch_order(lengths, 16, seed=0, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1_003))
    assert all(1 <= len(b) <= 16 for b in batches) and sum(len(b) < 16 for b in batches) <= 1


def test_bucketing_cuts_padding():
    lengths = lengths_of(10_000)
    batches = train_batch_order(lengths, 16, seed=0, epoch=0)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    shuffled = np.random.default_rng(0).permutation(10_000)
    padded_unsorted = sum(16 * lengths[shuffled[i : i + 16]].max() for i in range(0, 10_000, 16))
    assert padded < 1.05 * lengths.sum() < 0.7 * padded_unsorted


def test_order_depends_on_seed_and_epoch_only():
    lengths = lengths_of(500)
    first = train_batch_order(lengths, 8, seed=3, epoch=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, train_batch_order(lengths, 8, seed=3, epoch=1)))
    assert not np.array_equal(np.concatenate(first), np.concatenate(train_batch_order(lengths, 8, seed=3, epoch=2)))
    assert not np.array_equal(np.concatenate(first), np.concatenate(train_batch_order(lengths, 8, seed=4, epoch=1)))


def test_split_tokens_deals_every_row_once_in_near_equal_token_shares():
    lengths = lengths_of(256)
    rows = np.random.default_rng(1).permutation(256)[:200]
    shares = split_tokens(lengths, rows, 3)
    assert sorted(np.concatenate(shares).tolist()) == sorted(rows.tolist())
    totals = [int(lengths[share].sum()) for share in shares]
    assert max(totals) - min(totals) <= lengths[rows].max()  # greedy, longest first: within one row
    assert all(np.array_equal(share, np.sort(share)) for share in shares)
    assert [len(s) for s in split_tokens(lengths, rows[:1], 2)] == [1, 0]  # fewer rows than ranks: an empty share


def test_scoring_shards_cover_every_row_once_with_even_tokens_and_keep_alike_rows_together():
    lengths = lengths_of(1_001)
    rng = np.random.default_rng(5)
    starts = rng.integers(0, 30, size=(100, 8))  # 100 beginnings, ~10 rows each
    ids = [np.concatenate([starts[i % 100], rng.integers(0, 30, n - 8)]) for i, n in enumerate(lengths + 8)]
    offsets = np.concatenate([[0], np.cumsum(lengths + 8)])
    table = Tokenized(np.concatenate(ids).astype(np.int32), offsets, None, np.zeros(0, dtype=np.int64))
    shards = scoring_shards(table, 4)
    assert sorted(np.concatenate(shards).tolist()) == list(range(1_001))
    totals = [int(table.lengths[s].sum()) for s in shards]
    assert max(totals) - min(totals) <= 2 * table.lengths.max()
    beginnings = [{tuple(starts[i % 100]) for i in s} for s in shards]
    assert sum(len(b) for b in beginnings) <= 100 + 3  # a beginning is split only where a share ends
    assert sorted(len(s) for s in scoring_shards(table.subset(np.arange(2)), 4)) == [0, 0, 1, 1]  # fewer rows than ranks
    equal = Tokenized(np.arange(800, dtype=np.int32), np.arange(0, 801, 100), None, np.zeros(0, dtype=np.int64))
    assert [len(s) for s in scoring_shards(equal, 2)] == [4, 4]  # a row ending on a cut stays before it
    assert [len(s) for s in scoring_shards(equal.subset(np.arange(2)), 2)] == [1, 1]


def test_budget_batches_fill_the_budget_and_cover_every_row():
    lengths = lengths_of(2_000)
    batches = budget_batches(lengths, max_tokens=4_096)
    assert sorted(np.concatenate(batches).tolist()) == list(range(2_000))
    assert all(len(b) * lengths[b].max() <= 4_096 for b in batches)
    assert all(len(b) == 4_096 // lengths[b].max() for b in batches[:-1])  # full, except the last
    assert lengths[batches[0]].max() == lengths.max()  # the largest shape first


def test_budget_batches_put_predictions_back_in_order():
    tokenized = ragged([5, 1, 9, 3, 7, 2])
    predictions = np.zeros(6, dtype=np.int64)
    for rows in budget_batches(tokenized.lengths, max_tokens=12):
        tokens, lengths, _ = collate(tokenized, rows, pad_id=0)
        last = tokens[torch.arange(len(rows)), lengths - 1]  # what a model reads: each row's last token
        predictions[rows] = last.numpy() // 1000
    assert predictions.tolist() == list(range(6))


def test_budget_smaller_than_a_row():
    with pytest.raises(UserError, match=r"^token budget 100 is smaller than the longest prompt \(120 tokens\)$"):
        budget_batches(np.array([50, 120, 80]), max_tokens=100)


def test_collate_right_pads():
    tokenized = ragged([3, 1, 4], labels=[1, 0, 1])
    tokens, lengths, labels = collate(tokenized, np.array([2, 1]), pad_id=-1)
    assert tokens.dtype == torch.int64 and lengths.dtype == torch.int64 and labels.dtype == torch.int64
    assert tokens.tolist() == [[2001, 2002, 2003, 2004], [1001, -1, -1, -1]]
    assert lengths.tolist() == [4, 1] and labels.tolist() == [1, 0]
    assert collate(ragged([2]), np.array([0]), pad_id=0)[2] is None


def test_collate_pads_to_a_multiple_and_keeps_the_true_lengths():
    tokenized = ragged([3, 1, 4], labels=[1, 0, 1])
    tokens, lengths, _ = collate(tokenized, np.array([2, 1]), pad_id=-1, pad_to_multiple=3)
    assert tokens.tolist() == [[2001, 2002, 2003, 2004, -1, -1], [1001, -1, -1, -1, -1, -1]]
    assert lengths.tolist() == [4, 1]
    assert collate(tokenized, np.array([0]), pad_id=-1, pad_to_multiple=3)[0].shape == (1, 3)  # already a multiple
    assert padded_length(np.array([1, 64, 65]), 64).tolist() == [64, 64, 128]
