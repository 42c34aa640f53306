import json

import numpy as np
import pytest

from train.metrics import binary_metrics


def pairwise_auroc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_confusion_counts_and_ratios_on_a_hand_worked_example():
    p_true = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.7])
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    # predicted positive: 0.9, 0.8 (true), 0.6, 0.7 (false); missed: 0.3
    m = binary_metrics(p_true, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (2, 2, 2, 1, 7)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_threshold_is_inclusive_and_movable():
    p_true = np.array([0.5, 0.4, 0.2])
    labels = np.array([True, True, False])
    assert binary_metrics(p_true, labels)["tp"] == 1
    m = binary_metrics(p_true, labels, threshold=0.3)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 0, 1, 0)
    assert m["accuracy"] == 1.0


def test_auroc_with_ties_on_a_hand_worked_example():
    # Pairs (pos, neg): 0.8 beats 0.4 and ties 0.8 -> 1.5; 0.4 ties 0.4 and loses to 0.8 -> 0.5. 2 / 4.
    m = binary_metrics(np.array([0.8, 0.4, 0.4, 0.8]), np.array([1, 1, 0, 0]))
    assert m["auroc"] == pytest.approx(0.5)
    m = binary_metrics(np.array([0.9, 0.7, 0.7, 0.1]), np.array([1, 1, 0, 0]))
    assert m["auroc"] == pytest.approx(3.5 / 4)


def test_auroc_equals_pairwise_count_on_random_scores_with_many_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=500)
    scores = np.round(rng.random(500) * 0.5 + labels * 0.2, 1)  # few distinct values: heavy ties
    assert binary_metrics(scores, labels)["auroc"] == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_is_invariant_to_monotone_rescaling_and_flips_with_the_scores():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=200)
    scores = rng.random(200) + 0.3 * labels
    auroc = binary_metrics(scores, labels)["auroc"]
    assert binary_metrics(scores**3, labels)["auroc"] == pytest.approx(auroc)
    assert binary_metrics(1 - scores, labels)["auroc"] == pytest.approx(1 - auroc)


def test_a_missing_class_gives_none_auroc_zero_ratios_and_valid_json():
    only_negatives = binary_metrics(np.array([0.2, 0.7, 0.1]), np.array([0, 0, 0]))
    assert only_negatives["auroc"] is None
    assert only_negatives["recall"] == 0.0 and only_negatives["precision"] == 0.0 and only_negatives["f1"] == 0.0
    assert only_negatives["accuracy"] == pytest.approx(2 / 3)
    only_positives = binary_metrics(np.array([0.9, 0.8]), np.array([1, 1]))
    assert only_positives["auroc"] is None
    assert only_positives["precision"] == only_positives["recall"] == only_positives["f1"] == 1.0
    for m in (only_negatives, only_positives):
        assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_values_are_plain_python_numbers():
    m = binary_metrics(np.array([0.9, 0.1], dtype=np.float32), np.array([1, 0], dtype=np.int64))
    assert all(type(v) in (int, float) for v in m.values())


@pytest.mark.parametrize(
    "p_true, labels",
    [
        (np.array([0.1, 0.2]), np.array([0, 1, 1])),
        (np.array([]), np.array([])),
        (np.array([0.1, np.nan]), np.array([0, 1])),
        (np.array([0.1, 0.9]), np.array([0, 2])),
    ],
)
def test_rejects_malformed_inputs(p_true, labels):
    with pytest.raises(ValueError):
        binary_metrics(p_true, labels)


# train/plots.py draws these metrics; its tests live here beside them.
from common.errors import UserError  # noqa: E402
from train.plots import plot_run, read_metrics  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run_metrics(path):
    lines = [{"step": s, "loss": 0.7 * 0.98**s, "lr": 2e-4, "tokens_per_s": 9000.0} for s in range(0, 120, 2)]
    lines += [{"step": s, "split": "val", "accuracy": 0.6 + s / 1000, "auroc": 0.55 + s / 800} for s in (0, 50, 100)]
    lines.append({"step": 50, "split": "val", "accuracy": 0.75, "auroc": None})  # resumed run logs step 50 again
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_plot_run_writes_a_png_atomically(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_run_metrics(metrics)
    out = tmp_path / "curves.png"
    plot_run(metrics, out)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_plot_run_draws_an_empty_run(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    plot_run(metrics, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE


def test_read_metrics_separates_training_from_evaluation_and_keeps_the_latest_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_run_metrics(metrics)
    train, evals = read_metrics(metrics)
    assert sorted(train) == list(range(0, 120, 2))
    assert list(evals) == ["val"] and sorted(evals["val"]) == [0, 50, 100]
    assert evals["val"][50]["accuracy"] == 0.75


def test_read_metrics_names_the_line_of_a_torn_record(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n')
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2: not valid JSON"):
        read_metrics(metrics)
