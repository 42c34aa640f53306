"""How much of the consensus's validation figures is fitting: its regression and threshold fitted on the other folds
of questions and applied to the held-out one (5 folds, grouped by question), beside the in-sample figures `eval`
reports, the model alone, and the answers alone (the share of other candidates agreeing: majority voting). Reads
what `run.py eval --split val --group-col COL` wrote (scores.csv, eval.json) and the table.

    python bench/crossfit_consensus.py RUN/eval/<table>-val TABLE [--group-col group] [--folds 5]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import emit  # noqa: E402
from data import read_table  # noqa: E402
from train.calibrate import apply_temperature  # noqa: E402
from train.consensus import consensus_features, fit_consensus, judge  # noqa: E402
from train.metrics import auroc, best_of_n  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", type=Path)
    parser.add_argument("table", type=Path)
    parser.add_argument("--group-col", default="group")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    report = json.loads((args.eval_dir / "eval.json").read_text())
    scores = pd.read_csv(args.eval_dir / "scores.csv")
    rows = read_table(args.table).loc[scores["row"]]
    labels = scores["is_correct"].to_numpy(bool)
    p_raw = apply_temperature(scores["p_model"].to_numpy(np.float64), 1 / report["temperature"])  # undo T
    questions, answers, groups = rows["question"].to_numpy(), rows["answer"].to_numpy(), rows[args.group_col].to_numpy()

    fold_of_group = {g: i % args.folds for i, g in enumerate(np.random.default_rng(0).permutation(np.unique(groups)))}
    folds = np.array([fold_of_group[g] for g in groups])
    p_judged, decided = np.zeros(len(labels)), np.zeros(len(labels), dtype=bool)
    for k in range(args.folds):
        held = folds == k
        fitted = fit_consensus(p_raw[~held], labels[~held], questions[~held], answers[~held])
        decision = {"temperature": report["temperature"], "threshold": report["threshold"], "consensus": fitted}
        p, thresholds, _ = judge(p_raw[held], decision, questions[held], answers[held])
        p_judged[held], decided[held] = p, p >= thresholds
    agree = consensus_features(p_raw, questions, answers)[0][:, 1]
    emit({"bench": "consensus cross-fitted", "eval": str(args.eval_dir), "rows": len(labels), "folds": args.folds,
          "in_sample": {"auroc": report["auroc"], "accuracy": report["accuracy"],
                        "best_of_n": report["best_of_n"]["accuracy"]},
          "cross_fitted": {"auroc": auroc(p_judged, labels), "accuracy": float(np.mean(decided == labels)),
                           "best_of_n": best_of_n(p_judged, labels, groups)["accuracy"]},
          "model_alone": {k: report["model_alone"][k] for k in ("auroc", "accuracy")}
                         | {"best_of_n": report["model_alone"]["best_of_n"]["accuracy"]},
          "answers_alone": {"auroc": auroc(agree, labels), "best_of_n": best_of_n(agree, labels, groups)["accuracy"]}})


if __name__ == "__main__":
    main()
