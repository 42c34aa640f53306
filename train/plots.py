"""Training curves of a run folder's metrics.jsonl as one PNG."""
import json
from pathlib import Path

from common.errors import UserError
from common.files import atomic_write, read_json_lines


def read_metrics(metrics_jsonl: Path) -> tuple[dict[int, dict], dict[str, dict[int, dict]]]:
    """Training records by step, and evaluation records by split then step.

    Training lines carry "loss" and no "split"; evaluation lines carry "split". A later line for a step
    replaces an earlier one, since a resumed run logs again the steps after its checkpoint.
    """
    train: dict[int, dict] = {}
    evals: dict[str, dict[int, dict]] = {}
    if not Path(metrics_jsonl).is_file():
        raise UserError(f"{metrics_jsonl}: metrics file not found")
    for record in read_json_lines(Path(metrics_jsonl)):
        if not isinstance(record.get("step"), int):
            raise UserError(f"{metrics_jsonl}: a record without an integer 'step': {json.dumps(record)[:80]}")
        if "split" in record:
            evals.setdefault(record["split"], {})[record["step"]] = record
        elif "loss" in record:
            train[record["step"]] = record
    return train, evals


def plot_run(metrics_jsonl: Path, out_png: Path) -> None:
    """Draw training loss (top) and evaluation accuracy and AUROC (bottom) against optimizer step."""
    train, evals = read_metrics(metrics_jsonl)
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # at the end of a run: not in its start-up time
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, eval_ax = fig.subplots(2, 1, sharex=True)

    steps = [s for s in sorted(train) if train[s]["loss"] is not None]  # None: an fp16 step skipped on overflow
    loss_ax.plot(steps, [train[s]["loss"] for s in steps], linewidth=1, color="tab:blue")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title(Path(metrics_jsonl).parent.name or str(metrics_jsonl))

    for split, records in sorted(evals.items()):
        for key, style in (("accuracy", "o-"), ("auroc", "s--")):
            points = [(s, records[s][key]) for s in sorted(records) if records[s].get(key) is not None]
            if points:
                xs, ys = zip(*points)
                eval_ax.plot(xs, ys, style, markersize=3, label=f"{split} {key}")
    if eval_ax.lines:
        eval_ax.legend(loc="lower right")
    eval_ax.set_ylabel("accuracy / AUROC")
    eval_ax.set_xlabel("optimizer step")
    for ax in (loss_ax, eval_ax):
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no records yet", transform=ax.transAxes, ha="center", va="center", color="gray")

    atomic_write(Path(out_png), lambda f: fig.savefig(f, format="png", dpi=120))
