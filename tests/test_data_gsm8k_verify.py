"""Real rows: ../shared/data/gsm8k_verify/dev.csv reads, splits by `group` and tokenizes with Llama-3."""
from pathlib import Path

import numpy as np
import pytest

from data import collate, get_template, read_table, split_train_val, tokenize_table, train_batch_order

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k_verify" / "dev.csv"
EMPTY_ANSWER_ROWS = [7, 119, 385, 387, 407, 1489, 1863, 2325]  # generations cut off before their answer


@pytest.fixture(scope="module")
def llama3():
    llama_models = pytest.importorskip("llama_models")
    from model.tokenizer import load_tokenizer

    return load_tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")


@pytest.fixture(scope="module")
def dev():
    if not DEV.is_file():
        pytest.skip(f"{DEV} is not beside the repository")
    before = DEV.read_bytes()
    df = read_table(DEV, "train", get_template("with_solution"))
    assert DEV.read_bytes() == before
    return df


def test_reads_every_row_counting_the_empty_answers(dev):
    assert len(dev) == 3_164
    assert dev.attrs["empty_answers"] == len(EMPTY_ANSWER_ROWS)
    assert (dev.loc[list(EMPTY_ANSWER_ROWS), "answer"] == "").all()
    assert abs(dev["is_correct"].mean() - 0.388) < 0.002


def test_splits_by_question(dev):
    train, val = split_train_val(dev, 10_000, seed=0, group_col="group")
    assert len(val) == pytest.approx(0.2 * len(dev), abs=4)  # 10,000 capped at 20% of the table
    assert not set(dev["group"].to_numpy()[train]) & set(dev["group"].to_numpy()[val])
    assert abs(dev["is_correct"].to_numpy()[val].mean() - dev["is_correct"].mean()) < 0.01


def test_tokenizes_keeping_question_answer_and_last_line(dev, llama3, tmp_path):
    template = get_template("with_solution")
    tokenized = tokenize_table(dev, llama3, template, max_len=256, cache_dir=tmp_path)
    assert len(tokenized) == len(dev) and tokenized.lengths.max() <= 256
    assert 100 < tokenized.n_truncated < len(dev) // 2
    assert (tokenized.ids[tokenized.offsets[:-1]] == llama3.bos_id).all()
    for i in tokenized.truncated[::10]:
        prompt = llama3.decode(tokenized.row(i)[1:].tolist())
        row = dev.iloc[i]
        before, after = template.text.split("{solution}")
        assert prompt.startswith(before.format(question=row["question"]))
        assert prompt.endswith(after.format(answer=row["answer"]))
        assert row["solution"].rstrip().rsplit("\n", 1)[-1] in prompt and " ... " in prompt
    first_batch = train_batch_order(tokenized.lengths, 16, seed=0, epoch=0)[0]
    tokens, lengths, labels = collate(tokenized, first_batch, llama3.pad_id)
    assert tokens.shape == (16, int(lengths.max()))
    assert labels.tolist() == dev["is_correct"].to_numpy()[first_batch].astype(np.int64).tolist()
