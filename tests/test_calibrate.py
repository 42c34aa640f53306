import json

import numpy as np
import pytest

from common.errors import UserError
from train.calibrate import (apply_temperature, decision_in_use, fit_decision, fit_temperature, fit_threshold,
                             load_decision, save_decision)
from train.metrics import log_loss


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def synthetic_scores(scale: float, n: int = 20_000, seed: int = 0):
    """Labels drawn from sigmoid(z), reported P(True) = sigmoid(scale * z): the temperature that undoes it is scale."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    labels = (rng.random(n) < sigmoid(z)).astype(np.int64)
    return sigmoid(scale * z), labels


def accuracy_and_f1(p_true, labels, threshold):
    predicted, positive = p_true >= threshold, labels == 1
    tp, fp, fn = (predicted & positive).sum(), (predicted & ~positive).sum(), (~predicted & positive).sum()
    return (predicted == positive).mean(), 2 * tp / max(2 * tp + fp + fn, 1)


def test_apply_temperature_is_the_scaled_logit_and_exact_at_one():
    p = np.array([0.01, 0.2, 0.5, 0.7, 0.999], dtype=np.float32)
    same = apply_temperature(p, 1.0)
    assert same.dtype == np.float32 and np.array_equal(same, p) and same is not p
    p64 = p.astype(np.float64)
    expected = sigmoid(np.log(p64 / (1 - p64)) / 2.5)
    scaled = apply_temperature(p, 2.5)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, expected, rtol=1e-6)
    np.testing.assert_allclose(apply_temperature(p64, 0.5), sigmoid(2 * np.log(p64 / (1 - p64))), rtol=1e-12)
    saturated = apply_temperature(np.array([0.0, 1.0]), 0.01)  # logits clipped, no overflow, order kept
    assert np.isfinite(saturated).all() and saturated[0] < 0.5 < saturated[1]


@pytest.mark.parametrize("scale", [2.5, 1.0, 0.4])
def test_fit_temperature_recovers_a_known_temperature(scale):
    p_true, labels = synthetic_scores(scale)
    assert fit_temperature(p_true, labels) == pytest.approx(scale, rel=0.05)


def test_fitted_temperature_minimizes_the_log_loss():
    p_true, labels = synthetic_scores(1.7, n=3000, seed=1)
    fitted = fit_temperature(p_true, labels)
    best = log_loss(apply_temperature(p_true, fitted), labels)
    for t in [*np.geomspace(0.05, 20, 200), fitted * 0.999, fitted * 1.001]:
        assert best <= log_loss(apply_temperature(p_true, t), labels) + 1e-12


def test_fit_temperature_stays_in_bounds_and_ignores_uninformative_scores():
    separable = fit_temperature(np.array([0.4, 0.45, 0.55, 0.6]), np.array([0, 0, 1, 1]))
    assert separable == pytest.approx(0.01, rel=1e-6)  # sharper is always better: the lower bound
    assert fit_temperature(np.full(4, 0.5), np.array([0, 1, 1, 0])) == 1.0


@pytest.mark.parametrize("p_true, labels, expected", [
    ([0.1, 0.2, 0.3, 0.6, 0.7, 0.9], [0, 0, 0, 1, 1, 1], 0.45),  # separable: the midpoint of the gap
    ([0.1, 0.2, 0.3, 0.35, 0.4, 0.9], [0, 0, 1, 1, 1, 1], 0.25),
    ([0.1, 0.3, 0.7, 0.9], [0, 1, 0, 1], 0.2),  # 0.2 and 0.8 tie, equally far from 0.5: the lower
    ([0.1, 0.3, 0.65, 0.9], [0, 1, 0, 1], 0.775),  # 0.2 and 0.775 tie: the nearer to 0.5
    ([0.2, 0.8], [0, 0], 1.0),  # all False is best
    ([0.2, 0.8], [1, 1], 0.0),  # all True is best
])
def test_fit_threshold_on_hand_made_cases(p_true, labels, expected):
    assert fit_threshold(np.array(p_true), np.array(labels)) == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["accuracy", "f1"])
def test_fit_threshold_matches_a_brute_force_search(metric):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 300)
    p_true = np.round(np.clip(rng.normal(0.35 + 0.2 * labels, 0.2), 0, 1), 2)  # ties and both ends
    which = 0 if metric == "accuracy" else 1
    fitted = fit_threshold(p_true, labels, for_metric=metric)
    best = max(accuracy_and_f1(p_true, labels, t)[which] for t in [*np.linspace(0, 1, 2001), 1.0 + 1e-9])
    assert accuracy_and_f1(p_true, labels, fitted)[which] == pytest.approx(best)


def test_fit_threshold_for_f1_prefers_recall_where_accuracy_does_not():
    p_true, labels = np.array([0.1, 0.2, 0.9, 0.95]), np.array([1, 0, 1, 1])
    assert fit_threshold(p_true, labels, "accuracy") == pytest.approx(0.55)  # 3 of 4, as all True: nearer 0.5
    assert fit_threshold(p_true, labels, "f1") == pytest.approx(0.0)  # all True: F1 6/7 beats 4/5
    with pytest.raises(ValueError, match="for_metric"):
        fit_threshold(p_true, labels, "auroc")


def test_fit_decision_calibrates_then_thresholds():
    p_true, labels = synthetic_scores(3.0, seed=3)
    decision = fit_decision(p_true, labels)
    assert set(decision) == {"temperature", "threshold", "threshold_for"} and decision["threshold_for"] == "accuracy"
    assert decision["temperature"] == pytest.approx(3.0, rel=0.05)
    assert decision["threshold"] == pytest.approx(0.5, abs=0.05)  # calibrated scores: the Bayes threshold
    calibrated = apply_temperature(p_true, decision["temperature"])
    assert decision["threshold"] == fit_threshold(calibrated, labels)
    assert json.loads(json.dumps(decision)) == decision
    assert fit_decision(p_true, labels, threshold_for="f1")["threshold_for"] == "f1"


def test_decision_round_trips_through_the_run_folder(tmp_path):
    assert load_decision(tmp_path) is None
    decision = {"temperature": 1.37, "threshold": 0.4125, "threshold_for": "accuracy", "fitted_on": "val"}
    save_decision(tmp_path, decision)
    assert load_decision(tmp_path) == decision
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decision.json"]
    with pytest.raises(ValueError, match="'temperature' must be a positive number"):
        save_decision(tmp_path, {"temperature": 0, "threshold": 0.5})


@pytest.mark.parametrize("text, message", [
    ("{oops", r"decision.json: not valid JSON"),
    ('{"temperature": -1, "threshold": 0.5}', r"decision.json: 'temperature' must be a positive number, got -1"),
    ('{"temperature": 1, "threshold": 1.5}', r"decision.json: 'threshold' must be a number in \[0, 1\], got 1.5"),
    ('{"temperature": 1}', r"decision.json: 'threshold' must be a number in \[0, 1\], got None"),
    ('{"temperature": true, "threshold": 0.5}', r"'temperature' must be a positive number, got True"),
    ('{"temperature": 1' + "0" * 400 + ', "threshold": 0.5}', r"'temperature' must be a positive number, got 10"),
])
def test_a_malformed_decision_is_one_line_naming_the_file(tmp_path, text, message):
    (tmp_path / "decision.json").write_text(text)
    with pytest.raises(UserError, match=message) as err:
        load_decision(tmp_path)
    assert str(tmp_path / "decision.json") in str(err.value) and "\n" not in str(err.value)


def test_decision_in_use_prefers_the_flag_then_the_run_then_the_defaults(tmp_path):
    assert decision_in_use(tmp_path)[0] == {"temperature": 1.0, "threshold": 0.5}
    assert decision_in_use(tmp_path, 0.3)[0] == {"temperature": 1.0, "threshold": 0.3}
    save_decision(tmp_path, {"temperature": 2.0, "threshold": 0.7, "threshold_for": "f1"})
    decision, line = decision_in_use(tmp_path)
    assert decision == {"temperature": 2.0, "threshold": 0.7} and "decision.json" in line
    decision, line = decision_in_use(tmp_path, 0.0)
    assert decision == {"temperature": 2.0, "threshold": 0.0} and "--threshold" in line
