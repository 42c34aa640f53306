"""split_train_val: class ratio kept, groups never split, same seed same split."""
import numpy as np
import pandas as pd
import pytest

from common.errors import UserError
from data import split_train_val, validation_rows


def labelled(rows: int, positive_share: float, group_size: int = 1, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"is_correct": rng.random(rows) < positive_share, "group": [str(i // group_size) for i in range(rows)]}
    )


def test_class_ratio_kept_within_one_percent():
    df = labelled(20_000, 0.3)
    train, val = split_train_val(df, 2_000, seed=0)
    ratio = df["is_correct"].mean()
    assert len(val) == 2_000
    assert abs(df["is_correct"].to_numpy()[val].mean() - ratio) < 0.01
    assert abs(df["is_correct"].to_numpy()[train].mean() - ratio) < 0.01
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(df)))


def test_groups_land_on_one_side():
    df = labelled(6_000, 0.4, group_size=4)
    train, val = split_train_val(df, 0.15, seed=1, group_col="group")
    assert not set(df["group"].to_numpy()[train]) & set(df["group"].to_numpy()[val])
    assert abs(len(val) - 900) <= 4
    assert abs(df["is_correct"].to_numpy()[val].mean() - df["is_correct"].mean()) < 0.01


def test_same_seed_same_split():
    df = labelled(3_000, 0.5, group_size=3)
    first = split_train_val(df, 300, seed=7, group_col="group")
    again = split_train_val(df, 300, seed=7, group_col="group")
    other = split_train_val(df, 300, seed=8, group_col="group")
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_validation_size():
    assert validation_rows(1_000_000, 10_000) == 10_000
    assert validation_rows(3_000, 10_000) == 600  # capped at 20% of a small table
    assert validation_rows(3_000, 0.1) == 300
    assert validation_rows(3_000, 0) == 0
    assert validation_rows(1, 10_000) == 0
    assert validation_rows(4, 10_000) == 1
    for bad in (-1, 1.5, float("nan"), float("inf"), float("-inf")):
        with pytest.raises(UserError, match=f"^val_size {bad} must be a row count"):
            validation_rows(100, bad)


def test_no_validation():
    train, val = split_train_val(labelled(50, 0.5), 0, seed=0)
    assert len(val) == 0 and train.tolist() == list(range(50))


def test_unknown_group_column():
    message = r"^group column 'question_id' is not in the table \(columns: is_correct, group\)$"
    with pytest.raises(UserError, match=message):
        split_train_val(labelled(10, 0.5), 2, seed=0, group_col="question_id")


def test_table_without_labels_still_splits():
    df = pd.DataFrame({"ID": [str(i) for i in range(100)]})
    train, val = split_train_val(df, 10, seed=0)
    assert len(val) == 10 and len(train) == 90


def test_one_row_table_cannot_be_split():
    message = r"^the validation set is empty: a 1-row table cannot be split into training and validation rows; add rows$"
    for val_size in (10_000, 0.3):
        with pytest.raises(UserError, match=message):
            split_train_val(labelled(1, 0.5), val_size, seed=0)
    assert split_train_val(labelled(1, 0.5), 0, seed=0)[0].tolist() == [0]


def test_fraction_too_small_for_the_table():
    message = (r"^the validation set is empty: --val-size 0.001 of 100 rows is 0 rows; "
               r"raise --val-size$")
    with pytest.raises(UserError, match=message):
        split_train_val(labelled(100, 0.5), 0.001, seed=0)


def test_groups_bigger_than_the_validation_set():
    message = (r"^the validation set is empty: no whole group of --group-col 'group' fits in the 4 validation rows "
               r"with the table's class ratio \(the smallest group has 10 rows\); "
               r"raise --val-size or use a finer --group-col$")
    with pytest.raises(UserError, match=message):
        split_train_val(labelled(100, 0.5, group_size=10), 0.04, seed=0, group_col="group")


def test_fraction_that_leaves_no_training_rows():
    message = r"^the training set is empty: --val-size 0.9 puts all 1 rows in validation; lower --val-size$"
    with pytest.raises(UserError, match=message):
        split_train_val(labelled(1, 0.5), 0.9, seed=0)
    with pytest.raises(UserError, match=r"^the training set is empty: --val-size 0.8 puts all 2 rows"):
        split_train_val(labelled(2, 0.5), 0.8, seed=0)
