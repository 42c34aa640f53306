"""Metrics of P(True) against 0/1 labels as JSON-ready values: thresholded and ranking (binary_metrics, auroc,
roc_curve), probability quality (log_loss, brier, ece, reliability_bins), and best-of-N selection (best_of_n)."""
import numpy as np

ECE_BINS = 15
EPS = 1e-12  # log_loss clips P(True) to [EPS, 1 - EPS]: one confident mistake costs ~27.6 nats, not infinity


def check_scores(p_true: np.ndarray, labels: np.ndarray, probabilities: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """p_true as float64 and labels as bool; ValueError unless both are 1-D, non-empty, of equal length, p_true
    finite (and in [0, 1] with `probabilities`) and labels 0/1."""
    p_true = np.asarray(p_true, dtype=np.float64)
    labels = np.asarray(labels)
    if p_true.ndim != 1 or p_true.shape != labels.shape:
        raise ValueError(f"p_true and labels must be 1-D and of equal length, got {p_true.shape} and {labels.shape}")
    if len(p_true) == 0:
        raise ValueError("metrics need at least one prediction")
    if not np.isfinite(p_true).all():
        raise ValueError(f"p_true has {np.count_nonzero(~np.isfinite(p_true))} non-finite values")
    if probabilities and not ((p_true >= 0) & (p_true <= 1)).all():
        raise ValueError(f"p_true must lie in [0, 1], got values in [{p_true.min()}, {p_true.max()}]")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(labels)[:5].tolist()}")
    return p_true, labels.astype(bool)


def binary_metrics(p_true: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """Score probabilities of the positive class against 0/1 (or bool) labels.

    Predicts positive where p_true >= threshold. Returns accuracy, precision, recall, f1, auroc, log_loss, brier,
    ece, the confusion counts tp, fp, tn, fn, and n. A ratio with a zero denominator (precision with no positive
    predictions, recall with no positive labels) is 0.0, as in sklearn; auroc is None when either class is
    absent, since no ranking can be scored; log_loss, brier and ece are None when p_true leaves [0, 1] (scores
    rather than probabilities).
    """
    p_true, positive = check_scores(p_true, labels)
    predicted = p_true >= threshold

    tp = int(np.count_nonzero(predicted & positive))
    fp = int(np.count_nonzero(predicted & ~positive))
    tn = int(np.count_nonzero(~predicted & ~positive))
    fn = int(np.count_nonzero(~predicted & positive))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    is_probability = bool(((p_true >= 0) & (p_true <= 1)).all())
    return {
        "accuracy": (tp + tn) / len(positive),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auroc": auroc(p_true, positive),
        **{name: metric(p_true, positive) if is_probability else None
           for name, metric in (("log_loss", log_loss), ("brier", brier), ("ece", ece))},
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "n": len(positive),
    }


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a random positive outscores a random negative, ties counting half (Mann-Whitney U)."""
    n_pos = int(np.count_nonzero(positive))
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, group_of, group_sizes = np.unique(scores, return_inverse=True, return_counts=True)
    group_ends = np.cumsum(group_sizes)
    mean_rank = group_ends - (group_sizes - 1) / 2  # 1-based ranks; tied scores share their mean rank
    positive_rank_sum = mean_rank[group_of][positive].sum()
    return float((positive_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates as the threshold falls through each distinct score, from (0, 0) to (1, 1);
    tied scores move both rates in one step. Needs both classes."""
    scores, positive = check_scores(scores, labels)
    if positive.all() or not positive.any():
        raise ValueError("a ROC curve needs both classes")
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_score = np.r_[scores[1:] != scores[:-1], True]
    tp, fp = np.cumsum(positive)[last_of_score], np.cumsum(~positive)[last_of_score]
    return np.r_[0, fp] / fp[-1], np.r_[0, tp] / tp[-1]


def log_loss(p_true: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels (nats), P(True) clipped to [EPS, 1 - EPS]."""
    p_true, positive = check_scores(p_true, labels, probabilities=True)
    p_true = np.clip(p_true, EPS, 1 - EPS)
    return float(-np.mean(np.where(positive, np.log(p_true), np.log1p(-p_true))))


def brier(p_true: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared difference between P(True) and the 0/1 label."""
    p_true, positive = check_scores(p_true, labels, probabilities=True)
    return float(np.mean((p_true - positive) ** 2))


def reliability_bins(p_true: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Rows per equal-width bin of P(True) (bin b holds b/bins <= p < (b+1)/bins; p = 1 falls in the last), with
    their mean P(True) and share of positives (NaN where a bin is empty)."""
    p_true, positive = check_scores(p_true, labels, probabilities=True)
    which = np.minimum((p_true * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_p_true = np.bincount(which, weights=p_true, minlength=bins) / count
        positive_rate = np.bincount(which, weights=positive, minlength=bins) / count
    return {"count": count, "mean_p_true": mean_p_true, "positive_rate": positive_rate}


def ece(p_true: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of P(True): |share of positives - mean P(True)| in each equal-width bin,
    averaged over bins weighted by their rows."""
    r = reliability_bins(p_true, labels, bins)
    filled = r["count"] > 0
    gaps = np.abs(r["positive_rate"][filled] - r["mean_p_true"][filled])
    return float(np.sum(r["count"][filled] * gaps) / r["count"].sum())


def best_of_n(p_true: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict:
    """Best-of-N selection: each group (the candidate solutions of one question) picks its highest-P(True) row,
    the first in table order among equals. Returns accuracy (share of groups whose pick is correct), oracle
    (share of groups with any correct candidate), random (a group's share of correct candidates, averaged over
    groups: the accuracy of a random pick) and groups (their number; groups of one count like any other)."""
    p_true, positive = check_scores(p_true, labels)
    groups = np.asarray(groups)
    if groups.shape != p_true.shape:
        raise ValueError(f"groups must have one value per row, got {groups.shape} for {p_true.shape}")
    _, group_of = np.unique(groups, return_inverse=True)
    order = np.lexsort((np.arange(len(p_true)), -p_true, group_of))  # by group, P(True) descending, table order
    picks = order[np.r_[True, group_of[order][1:] != group_of[order][:-1]]]
    size, correct = np.bincount(group_of), np.bincount(group_of, weights=positive)
    return {"accuracy": float(positive[picks].mean()), "oracle": float(np.mean(correct > 0)),
            "random": float(np.mean(correct / size)), "groups": len(size)}
