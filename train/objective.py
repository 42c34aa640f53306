"""The classifier: the logits of the two label tokens at each row's last real token (C = 2)."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.batch import Rows


def last_token_hidden(model: nn.Module, rows: Rows) -> Tensor:
    """Final hidden state [R, D] at each row's last real position."""
    return model.hidden_states(rows.tokens, last=rows.last, packing=rows.packing)


def label_logits(model: nn.Module, rows: Rows, label_ids: Tensor) -> Tensor:
    """[R, 2] float32 logits of (False, True) from two lm_head rows; full-vocabulary logits are never built.
    The small product stays float32 even under autocast: bf16 logits would tie and blur the ranking (AUROC)."""
    hidden = last_token_hidden(model, rows)
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.float() @ model.head_weight(label_ids).float().T


def loss_sum(model: nn.Module, rows: Rows, label_ids: Tensor, kind: str = "classifier") -> Tensor:
    """Summed cross-entropy over the rows (a packed line's empty slots weigh 0); `label_ids` holds the
    (False, True) token ids.

    kind="classifier": two-class cross-entropy over the label tokens' logits.
    kind="lm": the full-vocabulary next-token loss on the label token (the reference stack's objective)."""
    if kind == "classifier":
        logits, targets = label_logits(model, rows, label_ids), rows.labels
    elif kind == "lm":
        logits, targets = model.lm_head(last_token_hidden(model, rows)), label_ids[rows.labels]
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    return losses.sum() if rows.weights is None else (losses * rows.weights).sum()
