"""From P(True) to a decision: a temperature that calibrates it and a threshold that decides, fitted on labeled
scores (a validation split or table) and kept in the run folder as decision.json.

Calibrated P(True) = sigmoid(logit(p) / T); the threshold applies to the calibrated value (True where >=). A decision
may also hold a `consensus` (consensus.py) for rows whose question has other candidates in the table."""
import math
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import read_json, write_json
from train.metrics import check_scores

DECISION = "decision.json"
THRESHOLD_METRICS = ("accuracy", "f1")
T_MIN, T_MAX = 0.01, 100.0
EPS = 1e-12  # P(True) is clipped to [EPS, 1 - EPS] before its logit: a saturated float32 1.0 stays finite


def logit(p_true: np.ndarray) -> np.ndarray:
    p_true = np.clip(np.asarray(p_true, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p_true) - np.log1p(-p_true)


def apply_temperature(p_true: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T) in p's floating dtype; at T = 1, p itself (no clipping round trip)."""
    p_true = np.asarray(p_true)
    if temperature == 1:
        return p_true.copy()
    dtype = p_true.dtype if np.issubdtype(p_true.dtype, np.floating) else np.float64
    return (0.5 + 0.5 * np.tanh(logit(p_true) / (2 * temperature))).astype(dtype)  # sigmoid without overflow


def fit_temperature(p_true: np.ndarray, labels: np.ndarray, iterations: int = 60) -> float:
    """The T in [T_MIN, T_MAX] that minimizes the log loss of the calibrated P(True): a golden-section search over
    log T, exact for this loss since it is convex in 1/T (logistic regression with one weight), so unimodal."""
    p_true, positive = check_scores(p_true, labels, probabilities=True)
    margin = np.where(positive, -1.0, 1.0) * logit(p_true)  # a row's loss is log(1 + exp(margin / T))
    if not margin.any():
        return 1.0  # every P(True) is 0.5: no temperature changes anything

    def loss(log_t: float) -> float:
        return float(np.mean(np.logaddexp(0.0, margin / math.exp(log_t))))

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    shrink = (math.sqrt(5) - 1) / 2
    a, b = hi - shrink * (hi - lo), lo + shrink * (hi - lo)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(iterations):
        if loss_a <= loss_b:
            hi, b, loss_b = b, a, loss_a
            a = hi - shrink * (hi - lo)
            loss_a = loss(a)
        else:
            lo, a, loss_a = a, b, loss_b
            b = lo + shrink * (hi - lo)
            loss_b = loss(b)
    return math.exp((lo + hi) / 2)


def fit_threshold(p_true: np.ndarray, labels: np.ndarray, for_metric: str = "accuracy") -> float:
    """The threshold (True where p >= it) that maximizes accuracy or F1 on these rows. Candidates are 0, the
    midpoints between consecutive distinct values of p, and 1; among equally good ones the nearest to 0.5 wins,
    then the lower."""
    if for_metric not in THRESHOLD_METRICS:
        raise ValueError(f"for_metric must be one of {THRESHOLD_METRICS}, not {for_metric!r}")
    p_true, positive = check_scores(p_true, labels, probabilities=True)
    values = np.unique(p_true)
    candidates = np.concatenate(([0.0], (values[1:] + values[:-1]) / 2, [1.0]))
    order = np.argsort(p_true, kind="stable")
    below = np.searchsorted(p_true[order], candidates, side="left")  # rows predicted False at each candidate
    fn = np.r_[0, np.cumsum(positive[order])][below]
    tp, tn = positive.sum() - fn, below - fn
    fp = len(p_true) - below - tp
    score = tp + tn if for_metric == "accuracy" else 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = candidates[score == score.max()]
    return float(min(best, key=lambda t: (abs(t - 0.5), t)))


def fit_decision(p_true: np.ndarray, labels: np.ndarray, threshold_for: str = "accuracy") -> dict:
    """Temperature, then the threshold over the calibrated P(True), fitted on these (uncalibrated) scores."""
    temperature = fit_temperature(p_true, labels)
    threshold = fit_threshold(apply_temperature(p_true, temperature), labels, threshold_for)
    return {"temperature": temperature, "threshold": threshold, "threshold_for": threshold_for}


def save_decision(run_dir: Path, decision: dict) -> None:
    """Writes RUN/decision.json (atomically); extra keys, such as what it was fitted on, are kept."""
    _check_decision(decision, "decision")
    write_json(Path(run_dir) / DECISION, decision)


def load_decision(run_dir: Path, file: str = DECISION) -> dict | None:
    """RUN/decision.json (or another `file` holding a temperature and threshold, e.g. an export's judge.json), or
    None where the run has none; a malformed one is a UserError naming the file."""
    path = Path(run_dir) / file
    if not path.exists():
        return None
    decision = read_json(path, f"{path}: not a file")
    try:
        _check_decision(decision, str(path))
    except ValueError as err:
        raise UserError(str(err)) from None
    return decision


def decision_in_use(run_dir: Path, threshold: float | None = None, file: str = DECISION,
                    consensus: bool = True) -> tuple[dict, str]:
    """The temperature and threshold to score with: the run's decision.json (T = 1 and 0.5 without one), with its
    consensus unless `consensus` is False, every threshold replaced by `threshold` when given; and a line saying
    where each came from."""
    stored = load_decision(run_dir, file)
    where = str(Path(run_dir) / file) if stored else "default"
    temperature = stored["temperature"] if stored else 1.0
    if threshold is None:
        threshold, threshold_from = (stored["threshold"] if stored else 0.5), where
    else:
        threshold_from = "--threshold"
    decision = {"temperature": temperature, "threshold": threshold}
    used = f"threshold {threshold:.4g} ({threshold_from}), temperature {temperature:.4g} ({where})"
    if consensus and stored and "consensus" in stored:
        decision["consensus"] = {**stored["consensus"]} | ({} if threshold_from == where else {"threshold": threshold})
        used += (f"; rows whose question has other candidates: consensus of answers, threshold "
                 f"{decision['consensus']['threshold']:.4g} ({threshold_from})")
    return decision, used


def _check_decision(decision: dict, where: str) -> None:
    temperature, threshold = decision.get("temperature"), decision.get("threshold")
    if not is_number(temperature) or not temperature > 0:
        raise ValueError(f"{where}: 'temperature' must be a positive number, got {temperature!r}")
    if not is_number(threshold) or not 0 <= threshold <= 1:
        raise ValueError(f"{where}: 'threshold' must be a number in [0, 1], got {threshold!r}")
    if "consensus" in decision:
        from train.consensus import check_consensus  # consensus.py builds on this file
        check_consensus(decision["consensus"], where)


def is_number(value) -> bool:
    """A finite JSON number (not a bool; an int too large for a float is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
