"""Reading competition tables (CSV, TSV, JSON Lines, Parquet) with the schema checked before anything else.

Every cell is read as text, exactly as written: an answer "0.50" stays "0.50", a cell reading "NaN" is the
text "NaN", and only an empty cell (or a JSON/Parquet null) is empty. Rows are numbered from 1 at the first
data row (a CSV header is not a row). The input file is only ever opened for reading.
"""
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError
from common.files import read_json_lines
from data.templates import DEFAULT, Template, get_template

ID, LABEL = "ID", "is_correct"
BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
FORMATS = {".csv": "CSV", ".tsv": "TSV", ".jsonl": "JSON Lines", ".parquet": "Parquet"}


def required_columns(template: Template, split: str) -> list[str]:
    """Columns a table must have: test tables need an ID and no label; `solution` only if the template uses it."""
    text = ["question", "answer"] + (["solution"] if template.uses_solution else [])
    return text + [LABEL] if split == "train" else [ID] + text


def read_table(
    path: str | Path, split: str = "train", template: Template | None = None, skip_bad_rows: bool = False
) -> pd.DataFrame:
    """Read and check a train or test table; every column is text, except `is_correct` which becomes bool.

    A bad row raises UserError naming file, row and column, unless `skip_bad_rows`, which drops the bad rows
    and reports how many and which (printed, and listed in `df.attrs["skipped"]`). In a test table the labels
    are kept only if the column is present and every value is a valid boolean; otherwise they are ignored, and
    unless the column is empty the first bad value is named.
    An empty answer is valid (a model that gave none): their count is printed and kept in
    `df.attrs["empty_answers"]`. The index holds the row numbers, `df.attrs["source"]` the path.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    template = template or get_template(DEFAULT)
    path = Path(path)
    df = _read_text_columns(path)
    df.index = pd.RangeIndex(1, len(df) + 1, name="row")
    missing = [c for c in required_columns(template, split) if c not in df.columns]
    if missing:
        raise UserError(
            f"{path}: column {missing[0]!r} is missing; a {split} table for template {template.name!r} needs "
            f"{', '.join(required_columns(template, split))} (found: {', '.join(map(str, df.columns))})"
        )
    problems = _row_problems(df, template, split)
    if problems:
        if not skip_bad_rows:
            row, column, what = problems[0]
            raise UserError(f"{path}: row {row}, column {column!r}: {what}")
        df = _drop_rows(df, path, problems)
    labels = parse_labels(df[LABEL]) if LABEL in df.columns else None
    if labels is not None and not labels.isna().any():
        df[LABEL] = labels.astype(bool)
    elif labels is not None and (df[LABEL].str.strip() != "").any():  # an empty column is no labels, said or not
        row = int(labels.index[labels.isna().to_numpy()][0])
        print(f"{path}: row {row}, column {LABEL!r}: {_not_boolean(df[LABEL][row])}; the column is ignored "
              f"({int(labels.isna().sum())} of {len(df)} values are not booleans)", file=sys.stderr)
    df.attrs["source"] = str(path)
    df.attrs["empty_answers"] = _report_empty_answers(df, path)
    return df


def read_labels(path: str | Path, ids: pd.Series) -> np.ndarray:
    """Labels from an ID,is_correct table (any format read_table reads) as int64 0/1, in the order of `ids`."""
    path = Path(path)
    table = _read_text_columns(path)
    table.index = pd.RangeIndex(1, len(table) + 1, name="row")
    for column in (ID, LABEL):
        if column not in table.columns:
            raise UserError(
                f"{path}: column {column!r} is missing; a labels table needs {ID}, {LABEL} "
                f"(found: {', '.join(map(str, table.columns))})"
            )
    repeated = table[ID].duplicated()
    if repeated.any():
        row = int(table.index[repeated.to_numpy()][0])
        first = int(table.index[(table[ID] == table[ID][row]).to_numpy()][0])
        raise UserError(f"{path}: row {row}, column {ID!r}: duplicate ID {table[ID][row]!r} (first at row {first})")
    labels = parse_labels(table[LABEL])
    if labels.isna().any():
        row = int(labels.index[labels.isna().to_numpy()][0])
        raise UserError(f"{path}: row {row}, column {LABEL!r}: {_not_boolean(table[LABEL][row])}")
    wanted = ids.to_numpy()
    positions = pd.Index(table[ID]).get_indexer(wanted)
    missing = wanted[positions < 0]
    if len(missing):
        others = f" (and {len(missing) - 1} other IDs)" if len(missing) > 1 else ""
        raise UserError(f"{path}: no label for ID {missing[0]!r}{others}")
    return labels.to_numpy()[positions].astype(np.int64)


def table_labels(df: pd.DataFrame) -> np.ndarray | None:
    """The labels of a table from read_table as int64 0/1, or None where the table has no valid labels."""
    if LABEL in df.columns and df[LABEL].dtype == bool:
        return df[LABEL].to_numpy(dtype=np.int64)
    return None


def _read_text_columns(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path}: {'a folder, not a table' if path.is_dir() else 'file not found'}")
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"{path}: unknown table format {path.suffix!r} (use {', '.join(FORMATS)})")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            df = _read_delimited(path, sep="\t" if suffix == ".tsv" else ",")
        elif suffix == ".jsonl":
            df = _read_jsonl(path)
        else:
            df = pd.read_parquet(path, dtype_backend="numpy_nullable")  # an int column with nulls stays int
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as e:
        detail = " ".join(str(e).split())
        raise UserError(f"{path}: cannot be read as {FORMATS[suffix]}: {detail}") from None
    if len(df) == 0:
        raise UserError(f"{path}: has a header but no data rows" if len(df.columns) else f"{path}: has no rows")
    return pd.DataFrame({str(c): _as_text(df[c]) for c in df.columns})


def _read_delimited(path: Path, sep: str) -> pd.DataFrame:
    """CSV or TSV as text, refusing what pandas would repair in silence: a name twice in the header (it would
    rename the second) and rows longer than the header (it would make their first fields an index)."""
    options = dict(sep=sep, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    header = pd.read_csv(path, header=None, nrows=1, **options).iloc[0].tolist()
    repeated = next((name for name in header if name.strip() and header.count(name) > 1), None)  # not blanks
    if repeated is not None:
        raise UserError(f"{path}: column {repeated!r} appears {header.count(repeated)} times in the header")
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(path, index_col=False, **options)
        except pd.errors.ParserWarning:  # every row longer than the header: pandas would drop the extra fields
            raise UserError(f"{path}: the rows have more fields than the header's {len(header)} names") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = read_json_lines(path)
    if not records:
        raise pd.errors.EmptyDataError
    return pd.DataFrame(records, dtype=object)  # no inference: an int column with nulls stays int


def _as_text(column: pd.Series) -> pd.Series:
    """Cells as written: numbers and booleans as their text, null (from JSON or Parquet) as empty."""
    if pd.api.types.is_string_dtype(column) and not column.isna().any():
        return column.astype(str)
    return column.map(_cell_text).astype(str)


def _cell_text(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def parse_labels(column: pd.Series) -> pd.Series:
    """True/False, true/false, 1/0, yes/no as booleans; anything else as NaN."""
    return column.str.strip().str.lower().map(BOOLEANS)


def _row_problems(df: pd.DataFrame, template: Template, split: str) -> list[tuple[int, str, str]]:
    """(row, column, what) for every bad cell, in file order, at most one per row."""
    checks = []  # (column, mask of bad rows, message for a row)
    if split == "test":
        ids = df[ID]
        repeated = ids.duplicated(keep="first")
        first_rows = pd.Series(ids.index[~repeated], index=ids[~repeated].to_numpy()) if repeated.any() else None
        checks.append((ID, ids.str.strip() == "", lambda row: "ID is empty"))
        checks.append((ID, repeated, lambda row: f"duplicate ID {ids[row]!r} (first at row {first_rows[ids[row]]})"))
    for column in ("question",) + (("solution",) if template.uses_solution else ()):
        why = " (the template uses the solution)" if column == "solution" else ""
        checks.append((column, df[column].str.strip() == "", lambda row, why=why: f"is empty{why}"))
    if split == "train":
        bad_label = parse_labels(df[LABEL]).isna()
        checks.append(
            (
                LABEL,
                bad_label,
                lambda row: _not_boolean(df[LABEL][row]),
            )
        )
    problems = {}
    for column, bad, message in checks:
        for row in df.index[bad.to_numpy()]:
            problems.setdefault(int(row), (int(row), column, message(row)))
    return [problems[row] for row in sorted(problems)]


def _drop_rows(df: pd.DataFrame, path: Path, problems: list[tuple[int, str, str]]) -> pd.DataFrame:
    kept = df.drop(index=[row for row, _, _ in problems])
    if len(kept) == 0:
        raise UserError(f"{path}: every row is bad (row {problems[0][0]}, column {problems[0][1]!r}: {problems[0][2]})")
    listed = [f"row {row} {column!r}: {what}" for row, column, what in problems]
    more = f"; and {len(listed) - 20} more" if len(listed) > 20 else ""
    print(f"{path}: skipped {len(problems)} bad rows of {len(df)}: {'; '.join(listed[:20])}{more}", file=sys.stderr)
    kept.attrs["skipped"] = listed
    return kept


def _not_boolean(value: str) -> str:
    return f"{value[:40]!r} is not a boolean (use True/False, true/false, 1/0 or yes/no)"


def _report_empty_answers(df: pd.DataFrame, path: Path) -> int:
    rows = df.index[(df["answer"].str.strip() == "").to_numpy()]
    if len(rows):
        listed = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        print(f"{path}: {len(rows)} rows have an empty answer (rows {listed})", file=sys.stderr)
    return len(rows)
