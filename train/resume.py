"""Which flags `--resume` may change: those that leave the steps already taken valid."""
from pathlib import Path

from common.errors import UserError

# How long to train (and when to stop early), how often to evaluate, how fast to run (the same rows in the same
# steps, summed in another order), and where the base or the (unchanged) tables now lie. Not --select-by: the
# best score so far was kept by the old metric.
CHANGEABLE = ("max_steps", "epochs", "patience", "eval_every", "eval_batch_tokens", "compile", "cuda_graphs", "eager",
              "packing", "pack_tokens", "grad_checkpoint", "model", "data", "extra_data")
NOT_FLAGS = ("command", "resume")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resumed_flags(saved: dict, given: dict, defaults: dict | None = None) -> tuple[dict, dict]:
    """The run's saved flags with the explicitly `given` ones applied, and {flag: [old, new]} of what changed.
    A flag the saved config lacks (a run from before the flag existed) takes its value from `defaults`.

    A flag outside CHANGEABLE that differs from the saved value is one UserError. Giving --epochs alone
    clears a saved --max-steps, so that the epochs decide the length."""
    saved = {**{k: v for k, v in (defaults or {}).items() if k not in NOT_FLAGS}, **saved}
    given = {k: v for k, v in given.items() if k not in NOT_FLAGS}
    for key in ("model", "data", "extra_data"):
        if given.get(key):
            given[key] = str(Path(given[key]).absolute())
    if "epochs" in given and "max_steps" not in given:
        given["max_steps"] = None
    changed = {k: v for k, v in given.items() if saved.get(k) != v}
    refused = [k for k in changed if k not in CHANGEABLE]
    if refused:
        key = refused[0]
        allowed = ", ".join(flag(k) for k in CHANGEABLE)
        raise UserError(f"--resume: {flag(key)} cannot change in a resumed run (it has {saved.get(key)!r}, "
                        f"given {given[key]!r}); only {allowed} can — start a new run to change the rest")
    if changed:
        print("resume applies " + ", ".join(f"{flag(k)} {saved.get(k)!r} -> {v!r}" for k, v in changed.items()))
    return {**saved, **given}, {flag(k): [saved.get(k), v] for k, v in changed.items()}
