"""Binary classification metrics as a flat, JSON-ready dict."""
import numpy as np


def binary_metrics(p_true: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """Score probabilities of the positive class against 0/1 (or bool) labels.

    Predicts positive where p_true >= threshold. Returns accuracy, precision, recall, f1, auroc, the
    confusion counts tp, fp, tn, fn, and n. A ratio with a zero denominator (precision with no positive
    predictions, recall with no positive labels) is 0.0, as in sklearn; auroc is None when either class is
    absent, since no ranking can be scored.
    """
    p_true = np.asarray(p_true, dtype=np.float64)
    labels = np.asarray(labels)
    if p_true.ndim != 1 or p_true.shape != labels.shape:
        raise ValueError(f"p_true and labels must be 1-D and of equal length, got {p_true.shape} and {labels.shape}")
    if len(p_true) == 0:
        raise ValueError("binary_metrics needs at least one prediction")
    if not np.isfinite(p_true).all():
        raise ValueError(f"p_true has {np.count_nonzero(~np.isfinite(p_true))} non-finite values")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(labels)[:5].tolist()}")
    positive = labels.astype(bool)
    predicted = p_true >= threshold

    tp = int(np.count_nonzero(predicted & positive))
    fp = int(np.count_nonzero(predicted & ~positive))
    tn = int(np.count_nonzero(~predicted & ~positive))
    fn = int(np.count_nonzero(~predicted & positive))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auroc": auroc(p_true, positive),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "n": len(labels),
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
