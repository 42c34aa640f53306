"""Training rows from GSM8K's reference solutions: the correct one and a wrong one per problem, a slip carried
through every later calculator mark (issue 17, a stronger judge from the data we have)."""
import json
import random
import re
from pathlib import Path

import pandas as pd
import pytest

import run
from common.errors import UserError
from conftest import SHARED_DATA, train_args
from data.gsm8k import MARK, carry_slip, evaluate, gsm8k_rows, read_gsm8k
from data.gsm8k import main as gsm8k_main
from train.loop import train

NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
PROBLEMS = [{"question": "How many clips did Natalia sell in April and May?", "answer": NATALIA},
            {"question": "How much did Weng earn?",
             "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
                       "$<<0.2*50=10>>10.\n#### 10"}]


def wrong_marks(solution: str) -> int:
    """How many calculator marks do not add up: a slip is one, every later step computed right from it."""
    def adds_up(expression: str, result: str) -> bool:  # GSM8K rounds results to the decimals it shows
        decimals = len(result.partition(".")[2])
        return abs(evaluate(expression) - float(result)) <= 0.5 * 10 ** -decimals + 1e-9
    return sum(not adds_up(expression, result) for expression, result in MARK.findall(solution))


def test_a_slip_is_carried_through_every_later_step():
    for seed in range(20):
        work, answer = carry_slip(NATALIA, random.Random(seed))
        assert answer != "72" and wrong_marks(work) == 1
        first, second = MARK.findall(work)
        assert second[0] == f"48+{first[1]}" or first == ("48/2", "24")  # the second step works on from the first
        assert work.endswith(f"={answer}>>{answer} clips altogether in April and May.")
        assert f"48+{first[1]} = " in work  # the sum the prose shows is the one the mark computes


def test_every_problem_gets_its_correct_row_and_one_wrong_row():
    rows = gsm8k_rows(PROBLEMS, seed=0)
    assert list(rows["is_correct"]) == [True, False, True, False]
    assert list(rows["group"]) == ["gsm8k-0", "gsm8k-0", "gsm8k-1", "gsm8k-1"]
    assert rows["answer"][0] == "72" and rows["answer"][1] != "72" and rows["answer"][3] != "10"
    assert all(s.endswith(f"\nA: {a}") and "####" not in s for s, a in zip(rows["solution"], rows["answer"]))
    assert set(rows["source"]) <= {"gsm8k_reference", "gsm8k_slip", "gsm8k_final"}
    assert gsm8k_rows(PROBLEMS, seed=0).equals(rows)  # same seed, same rows


def test_a_bad_line_is_one_error_naming_it(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PROBLEMS[0]) + "\n{not json\n")
    with pytest.raises(UserError, match="bad.jsonl:2: not a GSM8K line"):
        read_gsm8k(path)
    path.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:1: the answer does not end with '#### <number>'"):
        read_gsm8k(path)


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "train.jsonl").is_file(), reason="needs ../shared/data")
def test_on_all_of_gsm8k_train_the_wrong_rows_are_wrong_and_their_marks_add_up():
    rows = gsm8k_rows(read_gsm8k(SHARED_DATA / "gsm8k" / "train.jsonl"), seed=0)
    truth = rows[rows["is_correct"]].set_index("group")["answer"]
    wrong = rows[~rows["is_correct"]]
    assert len(rows) == 2 * 7473 and len(wrong) == 7473
    assert (wrong["answer"].to_numpy() != truth[wrong["group"]].to_numpy()).all()
    slips = wrong[wrong["source"] == "gsm8k_slip"]
    assert len(slips) > 0.5 * len(wrong)
    assert (slips["solution"].map(wrong_marks) == 1).all()
    assert (rows[rows["source"] != "gsm8k_slip"]["solution"].map(wrong_marks) == 0).all()
    answers = wrong["answer"].astype(float)  # the form of a wrong answer gives nothing away: whole, not negative
    assert (answers % 1 == 0).all() and (answers >= 0).mean() >= (rows[rows["is_correct"]]["answer"].astype(float) >= 0).mean()


def test_extra_data_trains_on_more_rows_and_never_validates_on_them(tiny_llama3, tables, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))
    extra = tmp_path / "extra.csv"
    gsm8k_rows(PROBLEMS * 3).to_csv(extra, index=False)
    plain = train(train_args(tiny_llama3, tables[0], tmp_path / "plain", "--max-steps", "2"))
    more = train(train_args(tiny_llama3, tables[0], tmp_path / "more", "--max-steps", "2", "--extra-data", str(extra)))
    plain_summary, more_summary = (json.loads((p / "summary.json").read_text()) for p in (plain, more))
    assert more_summary["train_rows"] == plain_summary["train_rows"] + 12
    assert more_summary["val_rows"] == plain_summary["val_rows"]
    assert more_summary["final"]["auroc"] is not None
    gsm8k_rows(PROBLEMS * 4).to_csv(extra, index=False)  # the extra table changed: the split and order would too
    assert run.main(["train", "--resume", str(more), "--max-steps", "4"]) == 2


def test_extra_rows_never_ask_a_validation_question(tiny_llama3, tables, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="the same table as --data"):
        train(train_args(tiny_llama3, tables[0], tmp_path / "same", "--extra-data", str(tables[0])))
    copy = pd.read_csv(tables[0])
    copy["solution"] = copy["solution"] + " Checked."  # another file, the same questions (spaced otherwise)
    copy["question"] = copy["question"].str.replace(" ", "  \n", n=1)
    copy.to_csv(tmp_path / "copy.csv", index=False)
    folder = train(train_args(tiny_llama3, tables[0], tmp_path / "run", "--max-steps", "1",
                              "--extra-data", str(tmp_path / "copy.csv")))
    summary = json.loads((folder / "summary.json").read_text())
    left_out = int(re.search(r"(\d+) rows ask a validation question", capsys.readouterr().out).group(1))
    assert left_out >= 8  # every validation row's question, asked again in the copy (and by its group's other rows)
    assert summary["train_rows"] == 40 + 48 - left_out and summary["val_rows"] == 8


def test_the_module_writes_a_table(tmp_path):
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    assert gsm8k_main([str(source), "--out", str(tmp_path / "rows.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "rows.csv")) == 4
    assert Path(source).read_text().count("\n") == 2  # the input is untouched


@pytest.mark.parametrize("content, out, message", [
    ("", "rows.csv", "no problems in it"),
    ("\n\n", "rows.csv", "no problems in it"),
    ('{"question": "Q", "answer": 5}\n', "rows.csv", ":1: question and answer must be text"),
    ('{"question": null, "answer": "x\\n#### 5"}\n', "rows.csv", ":1: question and answer must be text"),
    ('{"question": "Q", "answer": "x\\n#### 2%0 apples"}\n', "rows.csv", ":1: the answer does not end with"),
    (b"\xff\xfe", "rows.csv", "not UTF-8 text"),
    (json.dumps(PROBLEMS[0]) + "\n", ".", "is a folder"),
    (json.dumps(PROBLEMS[0]) + "\n", "train.jsonl", "would overwrite the input"),
])
def test_bad_input_is_one_line_and_exit_2(content, out, message, tmp_path, capsys):
    source = tmp_path / "train.jsonl"
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = source.read_bytes()
    assert gsm8k_main([str(source), "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert source.read_bytes() == before
