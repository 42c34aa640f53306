"""Linear warmup then linear decay to zero, the convention of HF's get_linear_schedule_with_warmup."""
import math


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based; the first update uses step 0).

    step < warmup_steps:  base_lr * step / warmup_steps        (so step 0 gets lr 0 when warming up)
    otherwise:            base_lr * (total_steps - step) / (total_steps - warmup_steps), floored at 0
    The last update, step total_steps - 1, gets base_lr / (total_steps - warmup_steps); step total_steps
    would get 0. With warmup_steps == 0 the first step gets the full base_lr.
    """
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got warmup {warmup_steps}, total {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return 0.0
    return base_lr * (total_steps - step) / (total_steps - warmup_steps)


def total_steps(n_rows: int, batch_size: int, grad_accum: int, epochs: int) -> int:
    """Optimizer steps for `epochs` passes over `n_rows` rows.

    An epoch has ceil(n_rows / batch_size) micro-batches (shared among the ranks, if several), and an epoch ends with
    an optimizer step even when its last accumulation window is short, so each epoch has
    ceil(micro_batches / grad_accum) steps.
    """
    for name, value in (("n_rows", n_rows), ("batch_size", batch_size), ("grad_accum", grad_accum),
                        ("epochs", epochs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    micro_batches = math.ceil(n_rows / batch_size)
    return math.ceil(micro_batches / grad_accum) * epochs
