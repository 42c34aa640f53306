"""Validation split that mirrors the test set: stratified by label, grouped, deterministic by seed."""
import math

import numpy as np
import pandas as pd

from common.errors import UserError
from data.tables import table_labels

MAX_VAL_FRACTION = 0.2  # a count asked of a small table is capped at this share of its rows


def validation_rows(n_rows: int, val_size: float) -> int:
    """How many rows go to validation: a fraction in (0, 1) of the table, or a count capped at 20% of it."""
    if 0 < val_size < 1:
        return round(n_rows * val_size)
    if not math.isfinite(val_size) or val_size < 0 or val_size != int(val_size):
        raise UserError(f"val_size {val_size} must be a row count (0 for none) or a fraction between 0 and 1")
    if val_size == 0 or n_rows < 2:
        return 0
    return min(int(val_size), max(1, int(n_rows * MAX_VAL_FRACTION)))


def split_train_val(
    df: pd.DataFrame, val_size: float, seed: int, group_col: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row positions, sorted. The class ratio of validation matches the table's; rows that
    share a value of `group_col` (e.g. one question's solutions) land on the same side. UserError if either side
    would be empty, unless val_size is 0 (no validation)."""
    if group_col is not None and group_col not in df.columns:
        raise UserError(f"group column {group_col!r} is not in the table (columns: {', '.join(map(str, df.columns))})")
    size = validation_rows(len(df), val_size)
    labels = table_labels(df)
    labels = np.zeros(len(df), dtype=np.int64) if labels is None else labels
    groups = pd.factorize(df[group_col])[0] if group_col else np.arange(len(df))
    group_rows = np.bincount(groups).tolist()
    group_positives = np.bincount(groups, weights=labels).astype(np.int64).tolist()

    # Take whole groups in a random order while neither class overshoots its share of the validation set.
    positives_wanted = round(size * labels.mean()) if size else 0
    negatives_wanted = size - positives_wanted
    positives = negatives = 0
    chosen = np.zeros(len(group_rows), dtype=bool)
    for g in np.random.default_rng(seed).permutation(len(group_rows)).tolist():
        if positives == positives_wanted and negatives == negatives_wanted:
            break
        p, n = group_positives[g], group_rows[g] - group_positives[g]
        if positives + p <= positives_wanted and negatives + n <= negatives_wanted:
            chosen[g] = True
            positives += p
            negatives += n
    in_val = chosen[groups]
    train, val = np.flatnonzero(~in_val), np.flatnonzero(in_val)
    if len(train) == 0:
        raise UserError(
            f"the training set is empty: --val-size {val_size:g} puts all {len(df)} rows in validation; lower --val-size"
        )
    if len(val) == 0 and val_size != 0:
        why = _why_no_validation(len(df), val_size, size, group_col, group_rows)
        raise UserError(f"the validation set is empty: {why}")
    return train, val


def _why_no_validation(n_rows: int, val_size: float, size: int, group_col: str | None, group_rows: list[int]) -> str:
    if n_rows < 2:
        return f"a {n_rows}-row table cannot be split into training and validation rows; add rows"
    if size == 0:
        return f"--val-size {val_size:g} of {n_rows} rows is 0 rows; raise --val-size"
    return (
        f"no whole group of --group-col {group_col!r} fits in the {size} validation rows with the table's class ratio "
        f"(the smallest group has {min(group_rows)} rows); raise --val-size or use a finer --group-col"
    )
