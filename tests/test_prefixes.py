"""Shared prefixes at scoring: rows that begin alike compute their common beginning once, and every row's P(True)
is what it gets alone."""
import numpy as np
import pytest
import torch

from data import LineShape, Tokenized
from data.prefixes import MIN_SHARED_TOKENS, collate_families, max_sequences, pack_families, prefix_families
from lora import apply_lora, lora_layers
from model import load_llama
from model.llama import Packing, packed_causal_attention, repeat_kv
from train.batch import right_padded
from train.objective import label_logits
from train.predict import predict_p_true

LABEL_IDS = torch.tensor([3, 4])


def table_of(rows: list[np.ndarray]) -> Tokenized:
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    labels = np.random.default_rng(0).integers(0, 2, len(rows))
    return Tokenized(np.concatenate(rows).astype(np.int32), offsets, labels, np.zeros(0, dtype=np.int64))


def questions_table(seed: int = 0, questions: int = 5, candidates: int = 4) -> Tokenized:
    """Each question's candidates share an instruction (6 tokens, as every row does) and the question's tokens."""
    rng = np.random.default_rng(seed)
    instruction = rng.integers(1, 300, 6)
    rows = []
    for _ in range(questions):
        question = rng.integers(1, 300, rng.integers(MIN_SHARED_TOKENS, MIN_SHARED_TOKENS + 20))
        rows += [np.concatenate([instruction, question, rng.integers(1, 300, rng.integers(1, 25))])
                 for _ in range(candidates)]
    rows.append(np.concatenate([instruction, rng.integers(1, 300, 50)]))  # a question with one candidate
    rows.append(rows[0].copy())  # a row twice
    return table_of([rows[i] for i in rng.permutation(len(rows))])


def test_rows_that_begin_alike_form_families_that_save_tokens():
    table = questions_table()
    shape = LineShape.of(table.lengths, 512)
    families = prefix_families(table, np.arange(len(table)), shape)
    assert sorted(np.concatenate([f.rows for f in families]).tolist()) == list(range(len(table)))
    shared = [f for f in families if f.shared]
    assert len(shared) == 5 and sorted(len(f.rows) for f in shared) == [4, 4, 4, 4, 5]
    for family in shared:
        first = table.row(family.rows[0])
        assert family.shared >= MIN_SHARED_TOKENS
        assert all((table.row(r)[: family.shared] == first[: family.shared]).all() for r in family.rows)
        assert family.shared < table.lengths[family.rows].min()  # every member keeps its last token
    assert sum(f.tokens(table.lengths) for f in families) < table.lengths.sum() * 0.6


def test_families_keep_to_a_lines_budget_and_capacity():
    table = questions_table(candidates=12)
    shape = LineShape(budget=256, max_seqlen=int(table.lengths.max()), capacity=6)
    families = prefix_families(table, np.arange(len(table)), shape)
    assert all(len(f.rows) <= 6 and f.tokens(table.lengths) <= 256 for f in families)
    lines = pack_families(families, table.lengths, shape)
    for line in lines:
        assert sum(f.tokens(table.lengths) for f in line) <= 256 and sum(len(f.rows) for f in line) <= 6
        positions, packed = collate_families(table, line, 0, shape)
        assert packed.tokens.shape == (1, 256) and len(packed.cu_seqlens) == max_sequences(shape) + 1
        assert packed.kv_index.shape == (512,) and packed.last.shape == (6,)


def test_a_member_reads_its_prefix_then_itself_at_positions_that_go_on():
    prefix = np.arange(1, 41)
    table = table_of([np.concatenate([prefix, [50, 51]]), np.concatenate([prefix, [60, 61, 62]]), np.arange(5, 9)])
    shape = LineShape.of(table.lengths, 128)
    families = prefix_families(table, np.arange(3), shape)
    positions, line = collate_families(table, pack_families(families, table.lengths, shape)[0], 0, shape)
    assert positions.tolist() == [0, 1, 2]  # the family (longer) first, then the lone row
    assert line.tokens[0, :49].tolist() == [*prefix, 50, 51, 60, 61, 62, 5, 6, 7, 8]
    assert line.positions[:49].tolist() == [*range(40), 40, 41, 40, 41, 42, *range(4)]
    assert line.last[:3].tolist() == [41, 44, 48]
    cu_k, kv = line.cu_seqlens_k.tolist(), line.kv_index.tolist()
    assert kv[cu_k[1]:cu_k[2]] == [*range(40), 40, 41] and kv[cu_k[2]:cu_k[3]] == [*range(40), 42, 43, 44]
    assert (line.kv_doc[cu_k[2]:cu_k[3]] == 2).all() and line.doc[42:45].tolist() == [2, 2, 2]


def test_attention_with_a_shared_prefix_is_each_rows_own_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    # sequences: prefix 0:4, members 4:6 and 6:9 (each reads the prefix first)
    kv_index = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 6, 7, 8])
    packing = Packing(torch.tensor([0, 4, 6, 9], dtype=torch.int32), torch.zeros(9, dtype=torch.int64),
                      torch.zeros(9, dtype=torch.int64), 7, kv_index, torch.zeros(17, dtype=torch.int64),
                      torch.tensor([0, 4, 10, 17], dtype=torch.int32))
    out = packed_causal_attention(q, k, v, packing)
    for rows in ([0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 6, 7, 8]):
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[rows].transpose(0, 1), repeat_kv(k[rows], 4, 1).transpose(0, 1), repeat_kv(v[rows], 4, 1).transpose(0, 1),
            is_causal=True).transpose(0, 1)
        own = [r for r in rows if r >= 4] or rows
        torch.testing.assert_close(out[own], alone[-len(own):])


def lora_model(checkpoint, device="cpu", dtype=torch.float32):
    model = apply_lora(load_llama(checkpoint, dtype=dtype, device=device), 4, 8, verbose=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
    return model


def test_shared_prefixes_score_every_row_as_alone(tiny_checkpoint):
    model, table = lora_model(tiny_checkpoint), questions_table(seed=1)
    with torch.no_grad():
        alone = torch.cat([label_logits(model, right_padded(torch.from_numpy(table.row(i).astype(np.int64))[None],
                                                            torch.tensor([table.lengths[i]])), LABEL_IDS)
                           for i in range(len(table))])
    expected = torch.softmax(alone, -1)[:, 1]
    for budget in (128, 512):
        shared = predict_p_true(model, table, LABEL_IDS, 0, budget, torch.device("cpu"), pack=True)
        torch.testing.assert_close(torch.from_numpy(shared), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's variable-length kernel needs a GPU")
def test_flash_attention_with_shared_prefixes_matches_rows_alone_within_bf16(tiny_checkpoint):
    model, table = lora_model(tiny_checkpoint, "cuda", torch.bfloat16), questions_table(seed=2, questions=20)
    truth = predict_p_true(lora_model(tiny_checkpoint), table, LABEL_IDS, 0, 512, torch.device("cpu"), pack=True,
                           share_prefixes=False)
    unshared = predict_p_true(model, table, LABEL_IDS.cuda(), 0, 512, torch.device("cuda"), pack=True,
                              share_prefixes=False)
    shared = predict_p_true(model, table, LABEL_IDS.cuda(), 0, 512, torch.device("cuda"), pack=True)
    assert np.abs(shared - truth).max() <= 1.5 * np.abs(unshared - truth).max() + 1e-3
