"""Candidates that agree. Where a table holds several candidate solutions to one question (rows with the same
question text), a candidate whose answer the others reach too is more often right (self-consistency), the more so
when the candidates that agree with it are ones the judge trusts (verifier-weighted voting, as in Cobbe et al.,
"Training Verifiers to Solve Math Word Problems", 2021). For such a row the judge's P(True) is a logistic regression
over three numbers, fitted on the validation split with a threshold of its own:
- logit: the row's logit P(True);
- agree: the share of its question's other candidates that give the same answer;
- vote:  the share of its question's summed P(True) that lies on its answer.
A row alone with its question keeps the calibrated P(True) and the decision's threshold."""
import numpy as np

from data.answers import candidate_groups
from train.calibrate import apply_temperature, fit_decision, fit_threshold, is_number, logit

FEATURES = ("logit", "agree", "vote")
MIN_ROWS = 20  # rows with peers, of both labels, needed to fit the regression
RIDGE = 1e-3  # keeps the fit finite where the features separate the labels


def consensus_features(p_true: np.ndarray, questions, answers) -> tuple[np.ndarray, np.ndarray]:
    """([rows, 3] features in FEATURES order, bool [rows]: the row's question has other candidates)."""
    p_true = np.asarray(p_true, dtype=np.float64)
    question_ids, answer_ids = candidate_groups(questions, answers)
    candidates = np.bincount(question_ids)[question_ids]
    given, answer = answer_ids >= 0, np.maximum(answer_ids, 0)  # an empty answer (-1) counts alone
    n_answers = max(int(answer_ids.max(initial=-1)) + 1, 1)  # at least one bin, for a table of empty answers
    same_answer = np.where(given, np.bincount(answer[given], minlength=n_answers)[answer], 1)
    p_on_answer = np.where(given, np.bincount(answer[given], weights=p_true[given], minlength=n_answers)[answer],
                           p_true)
    p_on_question = np.bincount(question_ids, weights=p_true)[question_ids]
    has_peers = candidates > 1
    agree = np.where(has_peers, (same_answer - 1) / np.maximum(candidates - 1, 1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        vote = np.where(p_on_question > 0, p_on_answer / p_on_question, 1 / candidates)
    return np.stack([logit(p_true), agree, vote], axis=1), has_peers


def fit_logistic(x: np.ndarray, labels: np.ndarray, iterations: int = 100) -> tuple[np.ndarray, float]:
    """Weights and bias minimizing the mean log loss plus RIDGE/2 * |weights|^2, by Newton's method (the loss is
    strictly convex, so it converges to the one minimum)."""
    design = np.column_stack([x, np.ones(len(x))])
    y = np.asarray(labels, dtype=np.float64)
    ridge = np.diag([RIDGE] * x.shape[1] + [0.0])
    theta = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = 0.5 + 0.5 * np.tanh(design @ theta / 2)
        gradient = design.T @ (p - y) / len(y) + ridge @ theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(y) + ridge + 1e-12 * np.eye(len(theta))
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def fit_consensus(p_true: np.ndarray, labels: np.ndarray, questions, answers,
                  threshold_for: str = "accuracy") -> dict | None:
    """The regression and its threshold, fitted on these labeled rows (uncalibrated P(True)); None where fewer than
    MIN_ROWS rows have other candidates of their question, or those rows hold one label only."""
    x, has_peers = consensus_features(p_true, questions, answers)
    y = np.asarray(labels, dtype=bool)[has_peers]
    if has_peers.sum() < MIN_ROWS or y.all() or not y.any():
        return None
    weights, bias = fit_logistic(x[has_peers], y)
    fitted = {"weights": dict(zip(FEATURES, weights.tolist())), "bias": bias, "rows": int(has_peers.sum())}
    fitted["threshold"] = fit_threshold(_regression(x[has_peers], fitted), y, threshold_for)
    return fitted


def judge(p_true: np.ndarray, decision: dict, questions=None,
          answers=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The judge's P(True), the threshold of each row and which rows the consensus decided, for uncalibrated
    scores under a decision (calibrate.py's, with its `consensus` where fitted and `questions` given)."""
    p_judged = apply_temperature(p_true, decision["temperature"]).astype(np.float64)
    thresholds = np.full(len(p_judged), float(decision["threshold"]))
    by_consensus = np.zeros(len(p_judged), dtype=bool)
    fitted = decision.get("consensus")
    if fitted and questions is not None:
        x, by_consensus = consensus_features(p_true, questions, answers)
        p_judged[by_consensus] = _regression(x[by_consensus], fitted)
        thresholds[by_consensus] = fitted["threshold"]
    return p_judged, thresholds, by_consensus


def check_consensus(fitted, where: str) -> None:
    """ValueError naming `where` unless `fitted` is a consensus as fit_consensus returns it."""
    weights = fitted.get("weights") if isinstance(fitted, dict) else None
    numbers = [fitted.get("bias"), fitted.get("threshold"), *weights.values()] if isinstance(weights, dict) else [None]
    if not (isinstance(weights, dict) and set(weights) == set(FEATURES) and all(map(is_number, numbers))):
        raise ValueError(f"{where}: 'consensus' must hold finite 'weights' ({', '.join(FEATURES)}), 'bias' and "
                         f"'threshold', got {fitted!r}")
    if not 0 <= fitted["threshold"] <= 1:
        raise ValueError(f"{where}: the consensus 'threshold' must be in [0, 1], got {fitted['threshold']!r}")


def _regression(x: np.ndarray, fitted: dict) -> np.ndarray:
    z = x @ np.array([fitted["weights"][f] for f in FEATURES]) + fitted["bias"]
    return 0.5 + 0.5 * np.tanh(z / 2)


def fit_judge(p_true: np.ndarray, labels: np.ndarray, questions=None, answers=None,
              threshold_for: str = "accuracy") -> dict:
    """A decision (calibrate.fit_decision) fitted on these labeled rows, with a consensus where the rows allow one."""
    fitted = None if questions is None else fit_consensus(p_true, labels, questions, answers, threshold_for)
    return fit_decision(p_true, labels, threshold_for) | ({"consensus": fitted} if fitted else {})
