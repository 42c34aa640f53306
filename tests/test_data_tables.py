"""read_table: every kind of bad input gets its one-line message naming file, row and column, and the file
is never changed."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.errors import UserError
from data import get_template, read_labels, read_table, table_labels

TRAIN = "question,answer,solution,is_correct\nWhat is 2+3?,5,2+3=5,True\nWhat is 2*3?,5,2*3=5,False\n"
TEST = "ID,question,answer,solution\n7,What is 2+3?,5,2+3=5\n8,What is 2*3?,5,2*3=5\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_bytes(text.encode())
    return path


def rejects(path: Path, message: str, **kwargs) -> None:
    """read_table raises exactly `message` (one line) and leaves the file and its folder as they were."""
    before = path.read_bytes() if path.exists() else None
    listing = sorted(path.parent.iterdir())
    with pytest.raises(UserError) as raised:
        read_table(path, **kwargs)
    assert str(raised.value) == message
    assert "\n" not in str(raised.value)
    assert (path.read_bytes() if path.exists() else None) == before
    assert sorted(path.parent.iterdir()) == listing


def test_file_not_found(tmp_path):
    rejects(tmp_path / "train.csv", f"{tmp_path / 'train.csv'}: file not found")


def test_empty_file(tmp_path):
    path = write(tmp_path, "train.csv", "")
    rejects(path, f"{path}: file is empty")


def test_blank_lines_only_is_empty(tmp_path):
    path = write(tmp_path, "train.csv", "\n\n")
    rejects(path, f"{path}: file is empty")


def test_header_only(tmp_path):
    path = write(tmp_path, "train.csv", "question,answer,solution,is_correct\n")
    rejects(path, f"{path}: has a header but no data rows")


def test_missing_label_column(tmp_path):
    path = write(tmp_path, "train.csv", "question,answer,solution\nq,1,s\n")
    rejects(
        path,
        f"{path}: column 'is_correct' is missing; a train table for template 'with_solution' needs "
        "question, answer, solution, is_correct (found: question, answer, solution)",
    )


def test_missing_solution_column_depends_on_template(tmp_path):
    path = write(tmp_path, "train.csv", "question,answer,is_correct\nq,1,True\n")
    rejects(
        path,
        f"{path}: column 'solution' is missing; a train table for template 'with_solution' needs "
        "question, answer, solution, is_correct (found: question, answer, is_correct)",
    )
    assert len(read_table(path, template=get_template("original"))) == 1


def test_missing_id_column_in_test_table(tmp_path):
    path = write(tmp_path, "test.csv", "question,answer,solution\nq,1,s\n")
    rejects(
        path,
        f"{path}: column 'ID' is missing; a test table for template 'with_solution' needs "
        "ID, question, answer, solution (found: question, answer, solution)",
        split="test",
    )


def test_label_that_is_not_boolean(tmp_path):
    path = write(tmp_path, "train.csv", TRAIN + "q,1,s,maybe\n")
    rejects(
        path,
        f"{path}: row 3, column 'is_correct': 'maybe' is not a boolean (use True/False, true/false, 1/0 or yes/no)",
    )


def test_empty_label(tmp_path):
    path = write(tmp_path, "train.csv", TRAIN + "q,1,s,\n")
    rejects(
        path, f"{path}: row 3, column 'is_correct': '' is not a boolean (use True/False, true/false, 1/0 or yes/no)"
    )


def test_boolean_spellings(tmp_path):
    values = ["True", "False", "true", "false", "1", "0", "yes", "no", "TRUE", " No "]
    rows = "".join(f"q{i},1,s,{v}\n" for i, v in enumerate(values))
    df = read_table(write(tmp_path, "train.csv", "question,answer,solution,is_correct\n" + rows))
    assert df["is_correct"].tolist() == [True, False, True, False, True, False, True, False, True, False]
    assert table_labels(df).tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]


def test_empty_question(tmp_path):
    path = write(tmp_path, "train.csv", TRAIN + ",1,s,True\n")
    rejects(path, f"{path}: row 3, column 'question': is empty")


def test_empty_answers_are_rows_and_counted(tmp_path, capsys):
    path = write(tmp_path, "train.csv", TRAIN + 'q,"  ",s,True\n' + "q,,s,False\n" * 11)
    df = read_table(path)
    assert len(df) == 14 and df["answer"].tolist()[2:4] == ["  ", ""]
    assert df.attrs["empty_answers"] == 11 + 1
    listed = ", ".join(map(str, range(3, 13)))
    assert capsys.readouterr().err == f"{path}: 12 rows have an empty answer (rows {listed}, ...)\n"


def test_one_empty_answer_in_a_test_table(tmp_path, capsys):
    path = write(tmp_path, "test.csv", TEST + "9,q,,s\n")
    df = read_table(path, split="test")
    assert df.attrs["empty_answers"] == 1 and df["answer"][3] == ""
    assert capsys.readouterr().err == f"{path}: 1 rows have an empty answer (rows 3)\n"


def test_no_empty_answer_prints_nothing(tmp_path, capsys):
    assert read_table(write(tmp_path, "train.csv", TRAIN)).attrs["empty_answers"] == 0
    assert capsys.readouterr().err == ""


def test_empty_answers_count_only_kept_rows(tmp_path):
    path = write(tmp_path, "train.csv", TRAIN + ",,s,True\nq,,s,True\n")
    df = read_table(path, skip_bad_rows=True)
    assert df.index.tolist() == [1, 2, 4] and df.attrs["empty_answers"] == 1


def test_gsm8k_verify_dev_reads_with_its_empty_answers(capsys):
    dev = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k_verify" / "dev.csv"
    if not dev.is_file():
        pytest.skip(f"{dev} is not beside the repository")
    df = read_table(dev, template=get_template("with_solution"))
    assert len(df) == 3_164 and df.attrs["empty_answers"] == 8
    report = f"{dev}: 8 rows have an empty answer (rows 7, 119, 385, 387, 407, 1489, 1863, 2325)"
    assert report in capsys.readouterr().err


def test_empty_solution_only_where_the_template_uses_it(tmp_path):
    path = write(tmp_path, "train.csv", TRAIN + "q,1,,True\n")
    rejects(path, f"{path}: row 3, column 'solution': is empty (the template uses the solution)")
    assert read_table(path, template=get_template("original"))["solution"].tolist() == ["2+3=5", "2*3=5", ""]


def test_null_answer_in_json_lines_is_empty(tmp_path):
    rows = [{"question": "q", "answer": 4, "solution": "s", "is_correct": True},
            {"question": "q", "answer": None, "solution": "s", "is_correct": False}]
    df = read_table(write(tmp_path, "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert df["answer"].tolist() == ["4", ""] and df.attrs["empty_answers"] == 1


def test_null_solution_in_json_lines(tmp_path):
    rows = [{"question": "q", "answer": 4, "solution": "s", "is_correct": True}, {"question": "q", "answer": 4}]
    path = write(tmp_path, "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    rejects(path, f"{path}: row 2, column 'solution': is empty (the template uses the solution)")


def test_nan_answer_in_parquet_is_empty(tmp_path):
    path = tmp_path / "train.parquet"
    columns = {"question": ["q", "q"], "answer": [1.5, np.nan], "solution": ["s", "s"], "is_correct": [1, 0]}
    pd.DataFrame(columns).to_parquet(path)
    df = read_table(path)
    assert df["answer"].tolist() == ["1.5", ""] and df.attrs["empty_answers"] == 1


def test_null_beside_integers_in_parquet_keeps_them_integers(tmp_path):
    columns = {"question": ["q", "q"], "answer": pd.array([4, None], dtype="Int64"), "solution": ["s", "s"],
               "is_correct": [True, False]}
    pd.DataFrame(columns).to_parquet(tmp_path / "train.parquet")
    assert read_table(tmp_path / "train.parquet")["answer"].tolist() == ["4", ""]


def test_duplicate_ids_in_test_table(tmp_path):
    path = write(tmp_path, "test.csv", TEST + "9,q,1,s\n7,q,2,s\n")
    rejects(path, f"{path}: row 4, column 'ID': duplicate ID '7' (first at row 1)", split="test")


def test_empty_id_in_test_table(tmp_path):
    path = write(tmp_path, "test.csv", TEST + ",q,1,s\n")
    rejects(path, f"{path}: row 3, column 'ID': ID is empty", split="test")


def test_first_bad_row_in_file_order_is_named(tmp_path):
    path = write(tmp_path, "train.csv", TRAIN + "q,1,s,maybe\n,1,s,True\n")
    rejects(
        path,
        f"{path}: row 3, column 'is_correct': 'maybe' is not a boolean (use True/False, true/false, 1/0 or yes/no)",
    )


def test_malformed_csv(tmp_path):
    path = write(tmp_path, "train.csv", TRAIN + "q,1,s,True,extra\n")
    rejects(
        path, f"{path}: cannot be read as CSV: Error tokenizing data. C error: Expected 4 fields in line 4, saw 5"
    )


def test_invalid_json_line(tmp_path):
    path = write(tmp_path, "train.jsonl", '{"question": "q"}\n{"question": \n')
    rejects(path, f"{path}: line 2: not valid JSON (Expecting value)")


def test_unknown_format(tmp_path):
    path = write(tmp_path, "train.xlsx", "x")
    rejects(path, f"{path}: unknown table format '.xlsx' (use .csv, .tsv, .jsonl, .parquet)")


def test_skip_bad_rows_reports_how_many_and_which(tmp_path, capsys):
    path = write(tmp_path, "train.csv", TRAIN + "q,1,s,maybe\nq,2,s,no\n,1,s,True\n")
    before = path.read_bytes()
    df = read_table(path, skip_bad_rows=True)
    assert df.index.tolist() == [1, 2, 4]
    assert df["answer"].tolist() == ["5", "5", "2"]
    assert df.attrs["skipped"] == [
        "row 3 'is_correct': 'maybe' is not a boolean (use True/False, true/false, 1/0 or yes/no)",
        "row 5 'question': is empty",
    ]
    assert f"{path}: skipped 2 bad rows of 5: row 3 'is_correct'" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_skip_bad_rows_when_every_row_is_bad(tmp_path):
    path = write(tmp_path, "train.csv", "question,answer,solution,is_correct\nq,1,s,x\n")
    rejects(
        path,
        f"{path}: every row is bad (row 1, column 'is_correct': 'x' is not a boolean "
        "(use True/False, true/false, 1/0 or yes/no))",
        skip_bad_rows=True,
    )


def test_cells_are_text_exactly_as_written(tmp_path):
    path = write(tmp_path, "train.csv", "question,answer,solution,is_correct\nq,0.50,s,1\nNA,NaN,None,0\nq,007,s,1\n")
    df = read_table(path)
    assert df["answer"].tolist() == ["0.50", "NaN", "007"]
    assert df["question"].tolist() == ["q", "NA", "q"]
    assert df["solution"].tolist() == ["s", "None", "s"]


def test_test_table_labels_used_only_when_all_valid(tmp_path, capsys):
    header = "ID,question,answer,solution,is_correct\n"
    placeholder = read_table(write(tmp_path, "a.csv", header + "1,q,1,s,?\n2,q,1,s,True\n"), split="test")
    assert table_labels(placeholder) is None
    assert placeholder["is_correct"].tolist() == ["?", "True"]
    assert capsys.readouterr().err == (f"{tmp_path / 'a.csv'}: row 1, column 'is_correct': '?' is not a boolean (use "
                                       f"True/False, true/false, 1/0 or yes/no); the column is ignored (1 of 2 "
                                       f"values are not booleans)\n")
    empty = read_table(write(tmp_path, "e.csv", header + "1,q,1,s,\n2,q,1,s, \n"), split="test")
    assert table_labels(empty) is None and capsys.readouterr().err == ""  # a placeholder column, nothing to name
    valid = read_table(write(tmp_path, "b.csv", header + "1,q,1,s,no\n2,q,1,s,True\n"), split="test")
    assert table_labels(valid).tolist() == [0, 1]
    assert table_labels(read_table(write(tmp_path, "c.csv", TEST), split="test")) is None


def test_formats_read_alike(tmp_path):
    csv = read_table(write(tmp_path, "train.csv", TRAIN))
    tsv = read_table(write(tmp_path, "train.tsv", TRAIN.replace(",", "\t")))
    records = [{"question": q, "answer": int(a), "solution": s, "is_correct": l == "True"}
               for q, a, s, l in (line.split(",") for line in TRAIN.splitlines()[1:])]
    jsonl = read_table(write(tmp_path, "train.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n"))
    pd.DataFrame(records).to_parquet(tmp_path / "train.parquet")
    parquet = read_table(tmp_path / "train.parquet")
    for other in (tsv, jsonl, parquet):
        pd.testing.assert_frame_equal(other, csv, check_dtype=False, check_index_type=False)
    assert csv.attrs["source"] == str(tmp_path / "train.csv")


def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbf" + TRAIN.encode())
    assert read_table(path).columns.tolist() == ["question", "answer", "solution", "is_correct"]


IDS = pd.Series(["7", "8", "9"])
LABELS = "ID,is_correct\n9,no\n7,True\n8,1\n"


def rejects_labels(path: Path, message: str, ids: pd.Series = IDS) -> None:
    with pytest.raises(UserError) as raised:
        read_labels(path, ids)
    assert str(raised.value) == message


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_labels_in_the_order_of_the_ids(tmp_path, suffix):
    rows = [line.split(",") for line in LABELS.splitlines()[1:]]
    path = tmp_path / f"labels{suffix}"
    if suffix == ".csv":
        write(tmp_path, path.name, LABELS)
    elif suffix == ".tsv":
        write(tmp_path, path.name, LABELS.replace(",", "\t"))
    elif suffix == ".jsonl":
        write(tmp_path, path.name, "".join(json.dumps({"ID": int(i), "is_correct": v}) + "\n" for i, v in rows))
    else:
        pd.DataFrame({"ID": [int(i) for i, _ in rows], "is_correct": [v == "True" or v == "1" for _, v in rows]}
                     ).to_parquet(path)
    labels = read_labels(path, IDS)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 1, 0]


def test_labels_file_not_found(tmp_path):
    rejects_labels(tmp_path / "labels.csv", f"{tmp_path / 'labels.csv'}: file not found")


def test_labels_column_missing(tmp_path):
    path = write(tmp_path, "labels.csv", "ID,label\n7,True\n")
    message = f"{path}: column 'is_correct' is missing; a labels table needs ID, is_correct (found: ID, label)"
    rejects_labels(path, message)


def test_id_without_a_label(tmp_path):
    path = write(tmp_path, "labels.csv", "ID,is_correct\n8,True\n")
    rejects_labels(path, f"{path}: no label for ID '7' (and 1 other IDs)")
    rejects_labels(path, f"{path}: no label for ID '9'", ids=pd.Series(["8", "9"]))


def test_duplicate_id_in_labels(tmp_path):
    path = write(tmp_path, "labels.csv", LABELS + "5,no\n7,False\n")
    rejects_labels(path, f"{path}: row 5, column 'ID': duplicate ID '7' (first at row 2)")


def test_label_value_not_boolean(tmp_path):
    path = write(tmp_path, "labels.csv", LABELS + "5,maybe\n")
    not_boolean = "'maybe' is not a boolean (use True/False, true/false, 1/0 or yes/no)"
    rejects_labels(path, f"{path}: row 4, column 'is_correct': {not_boolean}")


def test_a_name_twice_in_the_header_is_refused(tmp_path):
    path = write(tmp_path, "t.csv", "question,answer,solution,is_correct,is_correct\nq,1,s,True,False\n")
    rejects(path, f"{path}: column 'is_correct' appears 2 times in the header")


def test_rows_longer_than_the_header_are_refused_not_shifted(tmp_path):
    path = write(tmp_path, "t.tsv", "question\tanswer\tsolution\tis_correct\nx\tq\t1\ts\tTrue\ny\tq\t2\ts\tFalse\n")
    rejects(path, f"{path}: the rows have more fields than the header's 4 names")


def test_blank_names_of_trailing_delimiters_are_not_a_repeated_column(tmp_path):
    df = read_table(write(tmp_path, "t.csv", "question,answer,solution,is_correct,,\nq,1,s,True,,\n"))
    assert df["is_correct"].tolist() == [True]
