"""`python run.py eval`: score a labeled table with a run and report how well its P(True) separates, decides and is
calibrated, overall, per value of a column (--by) and as a best-of-N picker (--group-col). The P(True) is the judge's,
as `infer` gives it: with the consensus of a question's candidates where the run's decision has one (and the model
alone beside it). Writes RUN/eval/<table stem>/: eval.json, scores.csv, reliability.png, roc.png, summary.md; --fit
also fits and saves RUN/decision.json on this table."""
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.errors import UserError
from common.files import atomic_folder, unwritable_ancestor, write_json
from data import read_table, split_train_val, table_labels
from train.calibrate import DECISION, apply_temperature, decision_in_use, save_decision
from train.consensus import FEATURES, fit_judge, judge
from train.infer import TrainedRun, open_run, score_table
from train.metrics import ECE_BINS, best_of_n, binary_metrics, reliability_bins, roc_curve
from train.runfolder import RunFolder, file_sha256

COLUMNS = ("n", "accuracy", "precision", "recall", "f1", "auroc", "log_loss", "brier", "ece")


def table_metrics(p_true: np.ndarray, labels: np.ndarray, threshold: float | np.ndarray,
                  groups: np.ndarray | None = None) -> dict:
    m = binary_metrics(p_true, labels, threshold)
    metrics = {k: m[k] for k in COLUMNS} | {"confusion": {k: m[k] for k in ("tp", "fp", "tn", "fn")}}
    if groups is not None:
        metrics["best_of_n"] = best_of_n(p_true, labels, groups)
    return metrics


def evaluate(args: Namespace) -> Path:
    """Returns the folder written, RUN/eval/<table stem>/."""
    if args.fit and args.threshold is not None:
        raise UserError("--fit fits the threshold on this table; leave out --threshold")
    if args.threshold_for and not args.fit:
        raise UserError("--threshold-for says what --fit maximizes; add --fit")
    run = open_run(args)
    data_path = Path(args.data)
    validation = args.split == "val"
    out_dir = eval_folder(run.path, data_path, "-val" if validation else "")
    in_use = None if args.fit else decision_in_use(run.path, args.threshold, consensus=args.consensus)  # bad: stops
    if validation:
        df = validation_rows(run, data_path)
    else:
        df = read_table(data_path, split="train", template=run.template)  # a labeled table: is_correct required
    for flag, column in (("--group-col", args.group_col), ("--by", args.by)):
        if column and column not in df.columns:
            raise UserError(f"{flag} {column}: no such column in {data_path} (found: {', '.join(df.columns)})")
    labels = table_labels(df)

    if args.fit:
        p_raw, decision = fit_on_table(run, df, labels, args.threshold_for or "accuracy", args.consensus)
        used = (f"threshold {decision['threshold']:.4g}, temperature {decision['temperature']:.4g}"
                + (f", consensus threshold {decision['consensus']['threshold']:.4g}" if "consensus" in decision else "")
                + f", fitted on this table for {decision['threshold_for']} and saved to {run.path / DECISION}")
    else:
        p_raw, (decision, used) = score_table(run, df), in_use
    p_true, thresholds, by_consensus = judge(p_raw, decision, df["question"], df["answer"])
    groups = df[args.group_col].to_numpy() if args.group_col else None
    report = {"data": str(data_path.absolute()), "adapter": str(run.adapter), "decision": used,
              **table_metrics(p_true, labels, thresholds, groups),
              "threshold": decision["threshold"], "temperature": decision["temperature"]}
    p_alone = apply_temperature(p_raw, decision["temperature"])
    if by_consensus.any():
        fitted = decision["consensus"]
        report["consensus"] = {"rows": int(by_consensus.sum()), "threshold": fitted["threshold"],
                               "weights": {f: fitted["weights"][f] for f in FEATURES}, "bias": fitted["bias"]}
        report["model_alone"] = table_metrics(p_alone, labels, decision["threshold"], groups)
    if args.by:
        values = df[args.by].to_numpy()
        report["by"] = {str(v): table_metrics(p_true[values == v], labels[values == v], thresholds[values == v],
                                              None if groups is None else groups[values == v])
                        for v in sorted(set(values))}
    scores = pd.DataFrame({"row": df.index, "is_correct": labels.astype(bool), "p_true": p_true,
                           "decided": p_true >= thresholds, "by_consensus": by_consensus, "p_model": p_alone})

    summary = summary_markdown(report, args.by)
    with atomic_folder(out_dir) as tmp:
        write_json(tmp / "eval.json", report)
        scores.to_csv(tmp / "scores.csv", index=False)
        plot_reliability(p_true, labels, tmp / "reliability.png", report)
        plot_roc(p_true, labels, tmp / "roc.png", report)
        (tmp / "summary.md").write_text(summary)
    print(summary + f"\nwritten to {out_dir}/: eval.json, scores.csv, reliability.png, roc.png, summary.md")
    return out_dir


def validation_rows(run: TrainedRun, data_path: Path) -> pd.DataFrame:
    """The rows of `data_path` that were the run's validation split, drawn again as training drew them; the table
    must be the one the run trained on."""
    flags, trained_on = run.config["flags"], run.config.get("manifest", {}).get("data_sha256", "")
    if run.adapter is None:
        raise UserError("--split val: needs a run (--run); an export does not know its validation rows")
    if not data_path.is_file() or file_sha256(data_path) != trained_on.split("+")[0]:
        raise UserError(f"--split val: {data_path} is not the table {run.path.name} trained on (its SHA-256 differs)")
    df = read_table(data_path, split="train", template=run.template, skip_bad_rows=flags.get("skip_bad_rows", False))
    _, val_idx = split_train_val(df, flags["val_size"], flags["seed"], group_col=flags.get("group_col"))
    return df.iloc[val_idx]


def eval_folder(run_dir: Path, data_path: Path, suffix: str = "") -> Path:
    """RUN/eval/<table stem><suffix>, checked before any work: it is replaced as a whole, so it must not hold the
    table."""
    out_dir = run_dir / "eval" / (data_path.stem + suffix)
    if data_path.resolve().is_relative_to(out_dir.resolve()):
        raise UserError(f"--data {data_path}: lies in {out_dir}, which eval replaces; move the table first")
    if blocked := unwritable_ancestor(out_dir):
        raise UserError(f"--run {run_dir}: cannot write {out_dir} (in {blocked})")
    return out_dir


def fit_on_table(run: TrainedRun, df: pd.DataFrame, labels: np.ndarray, threshold_for: str,
                 consensus: bool = True) -> tuple[np.ndarray, dict]:
    """Scores the table, fits a decision on it (with a consensus where `consensus` and the table allow) and saves it
    to the run, holding the run's lock throughout (one writer at a time, as in training). Returns the uncalibrated
    P(True) and the decision."""
    writer = RunFolder.open(run.path)
    try:
        p_raw = score_table(run, df)
        candidates = (df["question"], df["answer"]) if consensus else (None, None)
        decision = fit_judge(p_raw, labels, *candidates, threshold_for=threshold_for)
        fitted_on = str(Path(df.attrs["source"]).absolute())
        save_decision(run.path, {**decision, "fitted_on": fitted_on, "adapter": run.adapter.name})
    finally:
        writer.release()
    return p_raw, decision


def summary_markdown(report: dict, by: str | None) -> str:
    def row(label: str, metrics: dict) -> str:
        cells = ["–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
                 for v in map(metrics.get, COLUMNS)]
        return "| " + " | ".join([label, *cells]) + " |"

    lines = [f"# {Path(report['data']).name} scored by {report['adapter']}", "", f"Decision: {report['decision']}.", "",
             "| subset | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|", row("all", report)]
    alone = report.get("model_alone")
    if alone:
        lines.append(row("all, model alone", alone))
    lines += [row(f"{by} = {value}", metrics) for value, metrics in report.get("by", {}).items()]
    if "best_of_n" in report:
        b = report["best_of_n"]
        lines += ["", f"Best of N over {b['groups']} groups: accuracy {b['accuracy']:.4f} "
                      f"(oracle {b['oracle']:.4f}, random pick {b['random']:.4f})"
                      + (f"; the model alone picks {alone['best_of_n']['accuracy']:.4f}." if alone else ".")]
    if "consensus" in report:
        c = report["consensus"]
        weights = ", ".join(f"{name} {weight:.3g}" for name, weight in c["weights"].items())
        lines += ["", f"Consensus of answers decided {c['rows']} rows (their question has other candidates in the "
                      f"table): weights {weights}, bias {c['bias']:.3g}, threshold {c['threshold']:.4g}."]
    c = report["confusion"]
    lines += ["", f"Confusion: tp {c['tp']}, fp {c['fp']}, tn {c['tn']}, fn {c['fn']}."]
    return "\n".join(lines) + "\n"


def plot_reliability(p_true: np.ndarray, labels: np.ndarray, png: Path, report: dict) -> None:
    """Share of correct answers against mean P(True) in each of ECE_BINS bins, with the rows per bin below."""
    bins = reliability_bins(p_true, labels)
    fig = Figure(figsize=(5.5, 6), layout="constrained")
    FigureCanvasAgg(fig)
    curve_ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    curve_ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="calibrated")
    filled = bins["count"] > 0
    curve_ax.plot(bins["mean_p_true"][filled], bins["positive_rate"][filled], "o-", markersize=4,
                  label=f"ECE {report['ece']:.3f}, T {report['temperature']:.3g}")
    curve_ax.set_ylabel("share correct")
    curve_ax.set_title(f"reliability: {Path(report['data']).name}")
    curve_ax.legend(loc="upper left")
    count_ax.bar(np.arange(ECE_BINS) / ECE_BINS, bins["count"], width=1 / ECE_BINS, align="edge", edgecolor="white")
    count_ax.set_xlabel("P(True)")
    count_ax.set_ylabel("rows")
    for ax in (curve_ax, count_ax):
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    fig.savefig(png, format="png", dpi=120)


def plot_roc(p_true: np.ndarray, labels: np.ndarray, png: Path, report: dict) -> None:
    fig = Figure(figsize=(5, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    if report["auroc"] is None:
        ax.text(0.5, 0.5, "one class only: no ROC curve", ha="center", va="center", color="gray")
    else:
        fpr, tpr = roc_curve(p_true, labels)
        ax.plot(fpr, tpr, label=f"AUROC {report['auroc']:.3f}")
        ax.legend(loc="lower right")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(f"ROC: {Path(report['data']).name}")
    ax.grid(alpha=0.3)
    fig.savefig(png, format="png", dpi=120)
