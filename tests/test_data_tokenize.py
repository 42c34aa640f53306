"""tokenize_table: the prompts' ids, long prompts cut in the middle (solution, then question), the cache."""
import re

import numpy as np
import pandas as pd
import pytest

import data.tokenize
from common.errors import UserError
from data import get_template, read_table, tokenize_table

LAST_LINE = "So the answer is 42."


class ByteTokenizer:
    """One token per UTF-8 byte (id = byte + 3), with the interface of model.tokenizer."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 259

    def __init__(self, add_bos: bool = True, fingerprint: str = "bytes/1"):
        self.add_bos = add_bos
        self.fingerprint = fingerprint
        self.texts_encoded = 0

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + [b + 3 for b in text.encode()] + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.texts_encoded += len(texts)
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


def table(tmp_path, rows: list[tuple[str, str, str, str]], name: str = "train.csv") -> pd.DataFrame:
    pd.DataFrame(rows, columns=["question", "answer", "solution", "is_correct"]).to_csv(tmp_path / name, index=False)
    return read_table(tmp_path / name)


def long_solution(lines: int) -> str:
    return "\n".join([f"Step {i}: add {i} apples to the basket." for i in range(lines)] + [LAST_LINE])


@pytest.mark.parametrize("add_bos", [True, False])
def test_ids_are_the_prompt_tokens(tmp_path, add_bos):
    df = table(tmp_path, [("What is 6*7?", "42", "6*7=42", "True"), ("Is 2+2 5?", "5", "2+2=5", "false")])
    tokenizer, template = ByteTokenizer(add_bos), get_template("with_solution")
    tokenized = tokenize_table(df, tokenizer, template, max_len=512)
    assert len(tokenized) == 2 and tokenized.n_truncated == 0
    assert tokenized.ids.dtype == np.int32 and tokenized.offsets.dtype == np.int64
    for i, (q, a, s) in enumerate(zip(df["question"], df["answer"], df["solution"])):
        expected = tokenizer.encode(template.render(question=q, answer=a, solution=s), bos=add_bos)
        assert tokenized.row(i).tolist() == expected
        assert tokenized.lengths[i] == len(expected)
    assert tokenized.labels.tolist() == [1, 0]


def test_long_solution_is_cut_in_the_middle(tmp_path, capsys):
    question, solution = "How many apples are in the basket at the end?", long_solution(40)
    df = table(tmp_path, [("Short?", "1", "1=1", "True"), (question, "42", solution, "True")])
    tokenizer, template = ByteTokenizer(), get_template("with_solution")
    max_len = 400
    tokenized = tokenize_table(df, tokenizer, template, max_len)
    assert tokenized.truncated.tolist() == [1]
    assert tokenized.lengths[1] <= max_len and tokenized.lengths[1] >= max_len - 10  # cut no more than needed
    prompt = tokenizer.decode(tokenized.row(1).tolist())
    kept = re.fullmatch(template.render(question="(.*)", answer="(.*)", solution="(.*)"), prompt, flags=re.S)
    assert kept.group(1) == question and kept.group(3) == "42"
    head, tail = kept.group(2).split(" ... ")
    assert solution.startswith(head) and len(head) > 50
    assert solution.endswith(tail) and tail.endswith(LAST_LINE)
    short = template.render(question="Short?", answer="1", solution="1=1")
    assert tokenized.row(0).tolist() == tokenizer.encode(short, bos=True)
    report = "1 of 2 prompts were over max_len 400 tokens; their solutions (then questions, where needed) were"
    assert report in capsys.readouterr().err


def test_last_line_is_kept_even_when_it_is_most_of_the_room(tmp_path):
    last = "Adding them all up, " + " + ".join(str(i) for i in range(40)) + " = 780, so " + LAST_LINE
    solution = "\n".join(["A first line of the work."] * 30 + [last])
    df = table(tmp_path, [("Sum?", "780", solution, "True")])
    tokenizer, template = ByteTokenizer(), get_template("with_solution")
    room = len(template.render(question="Sum?", answer="780")) + len(last) + 30
    tokenized = tokenize_table(df, tokenizer, template, max_len=room)
    assert tokenized.n_truncated == 1
    assert last in tokenizer.decode(tokenized.row(0).tolist())


def test_long_question_is_cut_once_the_solution_is_gone(tmp_path, capsys):
    question = "Long? " * 50 + "How many?"
    df = table(tmp_path, [("Short?", "1", "s", "True"), (question, "1", long_solution(3), "True")])
    tokenizer, template = ByteTokenizer(), get_template("with_solution")
    tokenized = tokenize_table(df, tokenizer, template, max_len=200)
    assert tokenized.truncated.tolist() == [1] and 190 <= tokenized.lengths[1] <= 200
    prompt = tokenizer.decode(tokenized.row(1).tolist())
    kept = re.fullmatch(template.render(question="(.*)", answer="(.*)", solution="(.*)"), prompt, flags=re.S)
    assert kept.group(2) == "..." and kept.group(3) == "1"
    head, tail = kept.group(1).split(" ... ")
    assert question.startswith(head) and question.endswith(tail) and tail.endswith("How many?")
    report = "their solutions (then questions, where needed) were shortened in the middle (rows 2)"
    assert report in capsys.readouterr().err


def test_template_without_solution_cuts_the_question(tmp_path, capsys):
    question = "Long? " * 50
    df = table(tmp_path, [(question, "1", "s", "True")])
    tokenizer, template = ByteTokenizer(), get_template("original")
    tokenized = tokenize_table(df, tokenizer, template, max_len=120)
    assert tokenized.truncated.tolist() == [0] and 110 <= tokenized.lengths[0] <= 120
    kept = re.fullmatch(template.render(question="(.*)", answer="(.*)"), tokenizer.decode(tokenized.row(0).tolist()))
    head, tail = kept.group(1).split(" ... ")
    assert question.startswith(head) and question.rstrip().endswith(tail) and kept.group(2) == "1"
    assert "their questions were shortened in the middle (rows 1)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["with_solution", "original"])
@pytest.mark.parametrize("add_bos", [True, False])
def test_every_row_fits_down_to_the_smallest_max_len(tmp_path, name, add_bos):
    rows = [("Short?", "", "1=1", "True"), ("Long? " * 40, "12", long_solution(6), "False"),
            ("Why? " * 9, "7", long_solution(30), "True"), ("Ünïcödé? " * 12, "3", "é" * 200 + "\nSo 3.", "True")]
    df = table(tmp_path, rows)
    tokenizer, template = ByteTokenizer(add_bos), get_template(name)
    smallest = add_bos + len(template.render(question="...", answer="12", solution="..."))
    for max_len in range(smallest, smallest + 120, 7):
        tokenized = tokenize_table(df, tokenizer, template, max_len)
        assert len(tokenized) == 4 and tokenized.lengths.max() <= max_len
        whole = [len(tokenizer.encode(template.render(*row[:3]), bos=add_bos)) for row in rows]
        assert tokenized.truncated.tolist() == [i for i, n in enumerate(whole) if n > max_len]
    with pytest.raises(UserError, match=f"row 2: the prompt is {smallest} tokens even with its"):
        tokenize_table(df, tokenizer, template, smallest - 1)


def test_answer_too_long_for_any_cut_is_refused_cheaply(tmp_path):
    df = table(tmp_path, [("Short?", "1", "s", "True"), ("Long? " * 50, "9" * 300, long_solution(20), "True")])
    tokenizer, template = ByteTokenizer(), get_template("with_solution")
    with pytest.raises(UserError) as raised:
        tokenize_table(df, tokenizer, template, max_len=300)
    tokens = 1 + len(template.render(question="...", answer="9" * 300, solution="..."))
    assert str(raised.value) == (
        f"{tmp_path / 'train.csv'}: row 2: the prompt is {tokens} tokens even with its question and solution cut "
        "to '...', over max_len 300"
    )
    assert tokenizer.texts_encoded == 2 + 2  # the prompts, then one floor each for the solution and the question


def test_max_len_smaller_than_the_template(tmp_path):
    df = table(tmp_path, [("q", "1", "s", "True")])
    template = get_template("original")
    with pytest.raises(UserError, match=r"train.csv: row 1: the prompt is \d+ tokens even with its question cut to "):
        tokenize_table(df, ByteTokenizer(), template, max_len=20)


def test_chunks_join_up(tmp_path, monkeypatch):
    rows = [(f"Question {i}?", str(i), long_solution(i % 4 * 5), "True") for i in range(10)]
    df = table(tmp_path, rows)
    whole = tokenize_table(df, ByteTokenizer(), get_template("with_solution"), max_len=300)
    monkeypatch.setattr(data.tokenize, "CHUNK_ROWS", 3)
    chunked = tokenize_table(df, ByteTokenizer(), get_template("with_solution"), max_len=300)
    assert whole.n_truncated >= 2
    np.testing.assert_array_equal(chunked.ids, whole.ids)
    np.testing.assert_array_equal(chunked.offsets, whole.offsets)
    np.testing.assert_array_equal(chunked.truncated, whole.truncated)


def test_second_run_loads_the_cache(tmp_path):
    df = table(tmp_path, [(f"Question {i}?", str(i), long_solution(i), "True") for i in range(6)])
    template, cache = get_template("with_solution"), tmp_path / "cache"
    first = tokenize_table(df, ByteTokenizer(), template, 300, cache_dir=cache)
    tokenizer = ByteTokenizer()
    again = tokenize_table(df, tokenizer, template, 300, cache_dir=cache)
    assert tokenizer.texts_encoded == 0
    for name in ("ids", "offsets", "truncated", "labels"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert [p.name for p in cache.iterdir()] == [f"tokens-{data.tokenize._cache_key(df, tokenizer, template, 300)}.npz"]


def test_cache_key_follows_every_input(tmp_path):
    df = table(tmp_path, [("What is 6*7?", "42", "6*7=42", "True")])
    template, tokenizer = get_template("with_solution"), ByteTokenizer()
    key = data.tokenize._cache_key(df, tokenizer, template, 300)
    changed_cell = df.copy()
    changed_cell.loc[1, "answer"] = "43"
    assert data.tokenize._cache_key(df, tokenizer, template, 300) == key
    assert data.tokenize._cache_key(changed_cell, tokenizer, template, 300) != key
    assert data.tokenize._cache_key(df, tokenizer, template, 301) != key
    assert data.tokenize._cache_key(df, tokenizer, get_template("original"), 300) != key
    assert data.tokenize._cache_key(df, ByteTokenizer(fingerprint="bytes/2"), template, 300) != key
    assert data.tokenize._cache_key(df, ByteTokenizer(add_bos=False), template, 300) != key


def test_subset(tmp_path):
    df = table(tmp_path, [(f"Question {i}?", str(i), long_solution(i), "True" if i % 2 else "False") for i in range(8)])
    tokenized = tokenize_table(df, ByteTokenizer(), get_template("with_solution"), 250)
    rows = np.array([7, 2, 5])
    part = tokenized.subset(rows)
    assert [part.row(i).tolist() for i in range(3)] == [tokenized.row(r).tolist() for r in rows]
    assert part.labels.tolist() == [1, 0, 1]
    assert part.truncated.tolist() == [i for i, r in enumerate(rows) if r in tokenized.truncated]
    assert part.n_truncated >= 1


def test_test_table_without_labels(tmp_path):
    (tmp_path / "test.csv").write_text("ID,question,answer,solution\n1,q,1,s\n")
    df = read_table(tmp_path / "test.csv", split="test")
    tokenized = tokenize_table(df, ByteTokenizer(), get_template("with_solution"), 200)
    assert tokenized.labels is None and len(tokenized) == 1


def corrupt_truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_garbage(path):
    path.write_bytes(b"not a numpy archive" * 10)


def corrupt_missing_key(path):
    with np.load(path) as saved:
        np.savez(path, ids=saved["ids"], offsets=saved["offsets"])


def corrupt_offsets(path):
    with np.load(path) as saved:
        ids, offsets, truncated = saved["ids"], saved["offsets"], saved["truncated"]
    np.savez(path, ids=ids, offsets=offsets[::-1].copy(), truncated=truncated)


@pytest.mark.parametrize("corrupt", [corrupt_truncated, corrupt_garbage, corrupt_missing_key, corrupt_offsets])
def test_corrupt_cache_is_rebuilt(tmp_path, capsys, corrupt):
    df = table(tmp_path, [(f"Question {i}?", str(i), long_solution(i * 3), "True") for i in range(6)])
    template, cache = get_template("with_solution"), tmp_path / "cache"
    first = tokenize_table(df, ByteTokenizer(), template, 200, cache_dir=cache)
    (path,) = cache.iterdir()
    corrupt(path)
    capsys.readouterr()
    tokenizer = ByteTokenizer()
    again = tokenize_table(df, tokenizer, template, 200, cache_dir=cache)
    assert tokenizer.texts_encoded > 0
    for name in ("ids", "offsets", "truncated"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    (rebuilt,) = [line for line in capsys.readouterr().err.splitlines() if "token cache" in line]
    assert rebuilt.startswith(f"{path}: unreadable token cache (") and rebuilt.endswith("); rebuilding it")
    assert [p.name for p in cache.iterdir()] == [path.name]  # overwritten, no temporary file left
    tokenizer = ByteTokenizer()
    tokenize_table(df, tokenizer, template, 200, cache_dir=cache)
    assert tokenizer.texts_encoded == 0
