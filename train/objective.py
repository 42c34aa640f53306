"""The classifier: the logits of the two label tokens at each row's last real token (C = 2)."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def last_token_hidden(model: nn.Module, tokens: Tensor, lengths: Tensor) -> Tensor:
    """Final hidden state [B, D] at each right-padded row's last real position."""
    return model.hidden_states(tokens, last=lengths - 1)


def label_logits(model: nn.Module, tokens: Tensor, lengths: Tensor, label_ids: Tensor) -> Tensor:
    """[B, 2] float32 logits of (False, True) from two lm_head rows; full-vocabulary logits are never built.
    The small product stays float32 even under autocast: bf16 logits would tie and blur the ranking (AUROC)."""
    hidden = last_token_hidden(model, tokens, lengths)
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.float() @ model.lm_head.weight[label_ids].float().T


def loss_sum(model: nn.Module, tokens: Tensor, lengths: Tensor, labels: Tensor, label_ids: Tensor,
             kind: str = "classifier") -> Tensor:
    """Summed cross-entropy over the rows; `label_ids` holds the (False, True) token ids.

    kind="classifier": two-class cross-entropy over the label tokens' logits.
    kind="lm": the full-vocabulary next-token loss on the label token (the reference stack's objective)."""
    if kind == "classifier":
        logits, targets = label_logits(model, tokens, lengths, label_ids), labels
    elif kind == "lm":
        logits, targets = model.lm_head(last_token_hidden(model, tokens, lengths)), label_ids[labels]
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    return F.cross_entropy(logits.float(), targets, reduction="sum")
