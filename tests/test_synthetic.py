import operator
import random
import re
from collections import Counter, defaultdict

import pandas as pd
import pytest

from data.synthetic import DEFAULT_DIR, FAMILIES, MAX_VALUE, MISTAKE_SHARES, generate, generate_examples, work
from data.synthetic import write_default

CALCULATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


@pytest.fixture(scope="module")
def examples():
    return generate_examples(3001, seed=7)


def calculations(solution: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(c)) for a, op, b, c in CALCULATION.findall(solution)]


def holds(a: int, op: str, b: int, c: int) -> bool:
    return OPERATORS[op](a, b) == c


def test_same_seed_gives_same_rows_and_another_seed_others():
    first = generate(300, seed=5)
    pd.testing.assert_frame_equal(first, generate(300, seed=5))
    assert not first["solution"].equals(generate(300, seed=6)["solution"])


def test_columns_and_types():
    rows = generate(10, seed=0)
    assert list(rows.columns) == ["question", "answer", "solution", "is_correct", "group"]
    assert rows["is_correct"].dtype == bool
    assert all(answer.isdigit() for answer in rows["answer"])


@pytest.mark.parametrize("n_rows", [1, 2, 9, 300, 301])
def test_labels_balanced_and_each_problem_has_both(n_rows):
    rows = generate(n_rows, seed=3)
    assert len(rows) == n_rows
    assert rows["is_correct"].sum() == n_rows // 2
    per_group = rows.groupby("group")["is_correct"].agg(["size", "sum"])
    complete = per_group[per_group["size"] == 2]
    assert (complete["sum"] == 1).all()
    assert len(complete) == n_rows // 2


def test_answers_follow_the_truth(examples):
    for e in examples:
        assert e.solution.endswith(f"\nThe answer is {e.answer}.")
        if e.mistake is None:
            assert e.answer == e.true_answer
        else:
            assert e.answer != e.true_answer


def test_mistake_kinds_come_in_their_shares(examples):
    counts = Counter(e.mistake for e in examples if e.mistake)
    n_incorrect = sum(counts.values())
    assert n_incorrect == 1501
    assert set(counts) == set(MISTAKE_SHARES)
    for kind, share in MISTAKE_SHARES.items():
        assert abs(counts[kind] - share * n_incorrect) <= 1


def test_shown_arithmetic_is_right_except_a_slip(examples):
    for e in examples:
        shown = calculations(e.solution)
        assert 1 <= len(shown) == e.solution.count("\n"), e.solution
        wrong = [line for line in shown if not holds(*line)]
        assert len(wrong) == (1 if e.mistake == "slip" else 0), e.solution
        stated = shown[-1][3]
        assert (e.answer != stated) == (e.mistake == "final"), e.solution


def test_each_mistake_is_the_kind_it_claims(examples):
    by_group = defaultdict(dict)
    for e in examples:
        by_group[e.group][e.mistake is None] = e
    checked = Counter()
    for pair in by_group.values():
        if len(pair) < 2:
            continue
        right, wrong = calculations(pair[True].solution), calculations(pair[False].solution)
        kind = pair[False].mistake
        if kind == "dropped":
            assert len(wrong) == len(right) - 1
        else:
            assert len(wrong) == len(right)
            first = next((i for i, (r, w) in enumerate(zip(right, wrong)) if r != w), None)
            if kind == "final":
                assert first is None
            elif kind == "operation":
                assert right[first][1] != wrong[first][1] and right[first][0::2] == wrong[first][0::2]
            else:  # slip: same inputs, another result
                assert right[first][:3] == wrong[first][:3] and right[first][3] != wrong[first][3]
        checked[kind] += 1
    assert set(checked) == set(MISTAKE_SHARES)


def test_every_family_gives_whole_numbers_within_range():
    rng = random.Random(0)
    for name, family in FAMILIES.items():
        for _ in range(300):
            problem = family(rng)
            assert 2 <= len(problem.steps) <= 4, name
            done = work(problem)
            assert done is not None, (name, problem.question)
            assert all(0 < line[3] <= MAX_VALUE for line in done[0])


def test_committed_sample_is_what_the_generator_writes(tmp_path):
    write_default(tmp_path)
    for name in ("train.csv", "test.csv", "test_labels.csv"):
        assert (tmp_path / name).read_bytes() == (DEFAULT_DIR / name).read_bytes(), name


def test_committed_test_file_has_ids_and_no_labels():
    test = pd.read_csv(DEFAULT_DIR / "test.csv")
    labels = pd.read_csv(DEFAULT_DIR / "test_labels.csv")
    assert list(test.columns) == ["ID", "question", "answer", "solution"]
    assert list(labels.columns) == ["ID", "is_correct"]
    assert test["ID"].tolist() == labels["ID"].tolist() == list(range(len(test)))
    assert labels["is_correct"].mean() == 0.5
    train = pd.read_csv(DEFAULT_DIR / "train.csv")
    assert train["is_correct"].mean() == 0.5
    assert sum(path.stat().st_size for path in DEFAULT_DIR.iterdir()) < 2_000_000
