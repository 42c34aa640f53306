import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest

import run
import train.loop
from conftest import train_args
from data.synthetic import generate
from train.calibrate import apply_temperature
from train.metrics import auroc, best_of_n, binary_metrics, brier, ece, log_loss, reliability_bins, roc_curve
from train.runfolder import RunFolder

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVAL_KEYS = {"accuracy", "precision", "recall", "f1", "auroc", "log_loss", "brier", "ece", "threshold", "temperature",
             "confusion", "best_of_n", "by"}


# Metrics, each against a direct computation.

def direct_log_loss(p, y):
    return -sum(math.log(min(max(pi if yi else 1 - pi, 1e-12), 1 - 1e-12)) for pi, yi in zip(p, y)) / len(p)


def direct_ece(p, y, bins=15):
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        rows = [i for i, pi in enumerate(p) if lo <= pi < hi or (b == bins - 1 and pi == 1.0)]
        if rows:
            total += len(rows) * abs(np.mean([y[i] for i in rows]) - np.mean([p[i] for i in rows]))
    return total / len(p)


def direct_best_of_n(p, y, groups):
    picks, any_correct, shares = [], [], []
    for g in dict.fromkeys(groups):  # groups in order of first appearance
        rows = [i for i, gi in enumerate(groups) if gi == g]
        pick = max(rows, key=lambda i: (p[i], -i))  # highest P(True), then the first row
        picks.append(y[pick])
        any_correct.append(any(y[i] for i in rows))
        shares.append(np.mean([y[i] for i in rows]))
    return {"accuracy": np.mean(picks), "oracle": np.mean(any_correct), "random": np.mean(shares),
            "groups": len(picks)}


def test_log_loss_and_brier_on_hand_worked_cases():
    assert log_loss(np.array([0.8, 0.3]), np.array([1, 0])) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert brier(np.array([0.8, 0.3, 0.5]), np.array([1, 0, 1])) == pytest.approx((0.04 + 0.09 + 0.25) / 3)
    confident_mistakes = np.array([0.0, 1.0]), np.array([1, 0])
    assert log_loss(*confident_mistakes) == pytest.approx(-math.log(1e-12))  # clipped, finite
    assert brier(*confident_mistakes) == 1.0


def test_ece_on_a_hand_worked_case():
    # bins of width 1/15: 0.05 -> 0, 0.1 -> 1, 0.5 and 0.52 -> 7, 0.95 -> 14
    p, y = np.array([0.05, 0.1, 0.5, 0.52, 0.95]), np.array([0, 1, 1, 0, 1])
    assert ece(p, y) == pytest.approx((0.05 + 0.9 + 2 * abs(0.5 - 0.51) + 0.05) / 5)
    r = reliability_bins(p, y)
    assert r["count"].tolist() == [1, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 1]
    assert r["mean_p_true"][7] == pytest.approx(0.51) and r["positive_rate"][7] == 0.5
    assert np.isnan(r["mean_p_true"][2])
    assert reliability_bins(np.array([1.0, 0.0]), np.array([1, 0]))["count"][[0, 14]].tolist() == [1, 1]
    assert ece(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0


def test_probability_metrics_equal_direct_computation_on_random_scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(rng.beta(2, 2, 400) * 0.8 + 0.2 * y, 0, 1)
    p[:5] = [0.0, 1.0, 1.0, 0.5, 0.0]
    assert log_loss(p, y) == pytest.approx(direct_log_loss(p, y), rel=1e-12)
    assert brier(p, y) == pytest.approx(np.mean([(pi - yi) ** 2 for pi, yi in zip(p, y)]), rel=1e-12)
    assert ece(p, y) == pytest.approx(direct_ece(p, y), rel=1e-12)
    m = binary_metrics(p, y)
    assert (m["log_loss"], m["brier"], m["ece"]) == (log_loss(p, y), brier(p, y), ece(p, y))


def test_binary_metrics_leaves_probability_metrics_out_for_scores_outside_zero_one():
    m = binary_metrics(np.array([1.3, -0.2, 0.4]), np.array([1, 0, 1]))
    assert m["log_loss"] is m["brier"] is m["ece"] is None and m["auroc"] == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss(np.array([1.3, 0.2]), np.array([1, 0]))


def test_roc_curve_runs_from_corner_to_corner_and_its_area_is_the_auroc():
    fpr, tpr = roc_curve(np.array([0.9, 0.7, 0.7, 0.1]), np.array([1, 1, 0, 0]))
    assert fpr.tolist() == [0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1]  # the tie moves both rates at once
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * y, 1)
    fpr, tpr = roc_curve(scores, y)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, y.astype(bool)), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.array([0.2, 0.4]), np.array([1, 1]))


def test_best_of_n_with_ties_and_groups_of_one():
    groups = np.array(["a", "a", "a", "b", "c", "c", "d"])
    p = np.array([0.7, 0.9, 0.9, 0.4, 0.3, 0.3, 0.8])
    y = np.array([1, 0, 1, 1, 1, 0, 0])
    # a: 0.9 twice, the first (row 1) is wrong; b alone, right; c: 0.3 twice, the first (row 4) right; d alone, wrong
    expected = {"accuracy": 2 / 4, "oracle": 3 / 4, "random": (2 / 3 + 1 + 1 / 2 + 0) / 4, "groups": 4}
    assert best_of_n(p, y, groups) == pytest.approx(expected)
    order = np.array([6, 2, 4, 0, 3, 5, 1])  # interleaved groups: ties go to the first row of the new order
    assert best_of_n(p[order], y[order], groups[order]) == pytest.approx({**expected, "accuracy": 3 / 4})
    assert best_of_n(p, y, groups) == pytest.approx(direct_best_of_n(p, y, list(groups)))


def test_best_of_n_equals_direct_computation_on_random_groups():
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 60, 250)  # sizes from one up, integer ids
    y = rng.integers(0, 2, 250)
    p = np.round(rng.random(250) * 0.6 + 0.3 * y, 1)  # many ties
    result = best_of_n(p, y, groups)
    assert result == pytest.approx(direct_best_of_n(p, y, groups.tolist()))
    assert type(result["groups"]) is int and json.loads(json.dumps(result)) == result
    with pytest.raises(ValueError, match="one value per row"):
        best_of_n(p, y, groups[:-1])


# eval and infer with a trained run.

@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained_run(tiny_llama3, tables, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA_JUDGE_CACHE", str(folder / "cache"))
        return train.loop.train(train_args(tiny_llama3, tables[0], folder / "run"))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run, which a test may write into."""
    return shutil.copytree(trained_run, tmp_path / "run")


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """A labeled table with an ID, a group per question (some of one row) and a column to slice by."""
    df = generate(14, seed=4)
    df.insert(0, "ID", [f"q{i}" for i in range(len(df))])
    df["kind"] = np.where(np.arange(len(df)) % 3 == 0, "short", "long")
    path = tmp_path_factory.mktemp("labeled") / "val.csv"
    df.to_csv(path, index=False)
    return path


def test_eval_end_to_end_writes_every_metric_and_both_plots(run_copy, labeled, tmp_path, capsys):
    argv = ["eval", "--run", str(run_copy), "--data", str(labeled), "--group-col", "group", "--by", "kind"]
    assert run.main(argv) == 0
    out = run_copy / "eval" / "val"
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "reliability.png", "roc.png", "scores.csv",
                                                     "summary.md"]
    report = json.loads((out / "eval.json").read_text())
    assert EVAL_KEYS <= set(report)
    assert set(report["confusion"]) == {"tp", "fp", "tn", "fn"} and sum(report["confusion"].values()) == 14
    assert set(report["best_of_n"]) == {"accuracy", "oracle", "random", "groups"}
    table = pd.read_csv(labeled, dtype=str)
    assert report["best_of_n"]["groups"] == table["group"].nunique()
    assert set(report["by"]) == {"short", "long"} and sum(m["n"] for m in report["by"].values()) == 14
    assert all("best_of_n" in m and "confusion" in m for m in report["by"].values())
    decision = json.loads((run_copy / "decision.json").read_text())  # fitted at the end of training
    assert (report["threshold"], report["temperature"]) == (decision["threshold"], decision["temperature"])
    for png in ("reliability.png", "roc.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr().out
    assert "| all |" in printed and "kind = short" in printed and "Best of N" in printed
    assert (out / "summary.md").read_text() in printed

    # The same scores as infer: its metrics on the same labeled table agree.
    sub = tmp_path / "sub.csv"
    assert run.main(["infer", "--run", str(run_copy), "--data", str(labeled), "--out", str(sub)]) == 0
    inferred = json.loads((tmp_path / "sub_metrics.json").read_text())
    for key in ("accuracy", "auroc", "log_loss", "brier", "ece"):
        assert report[key] == pytest.approx(inferred[key], rel=1e-9), key
    p_true = pd.read_csv(tmp_path / "sub_p_true.csv")["p_true"].to_numpy()
    assert report["log_loss"] == pytest.approx(log_loss(p_true, table["is_correct"] == "True"), rel=1e-6)


def test_eval_split_val_scores_the_runs_own_validation_rows(run_copy, tables, labeled, capsys):
    """The validation rows drawn again as training drew them: the final adapter's AUROC on them is the run's."""
    assert run.main(["eval", "--run", str(run_copy), "--data", str(tables[0]), "--split", "val"]) == 0
    report = json.loads((run_copy / "eval" / "train-val" / "eval.json").read_text())
    summary = json.loads((run_copy / "summary.json").read_text())
    assert report["n"] == summary["val_rows"]
    assert report["auroc"] == pytest.approx(summary["final"]["auroc"], abs=1e-6)
    capsys.readouterr()
    assert run.main(["eval", "--run", str(run_copy), "--data", str(labeled), "--split", "val"]) == 2
    assert "is not the table run trained on (its SHA-256 differs)" in capsys.readouterr().err


def test_eval_fit_saves_a_decision_that_eval_then_applies(run_copy, labeled, capsys):
    assert run.main(["eval", "--run", str(run_copy), "--data", str(labeled), "--fit", "--threshold-for", "f1"]) == 0
    decision = json.loads((run_copy / "decision.json").read_text())
    assert decision["threshold_for"] == "f1" and decision["adapter"] == "adapter"
    assert decision["fitted_on"] == str(labeled.absolute())
    fitted = json.loads((run_copy / "eval" / "val" / "eval.json").read_text())
    assert (fitted["threshold"], fitted["temperature"]) == (decision["threshold"], decision["temperature"])
    assert "fitted on this table" in capsys.readouterr().out

    assert run.main(["eval", "--run", str(run_copy), "--data", str(labeled)]) == 0
    again = json.loads((run_copy / "eval" / "val" / "eval.json").read_text())
    assert again["f1"] == fitted["f1"] and again["threshold"] == decision["threshold"]
    assert run.main(["eval", "--run", str(run_copy), "--data", str(labeled), "--threshold", "0"]) == 0
    overridden = json.loads((run_copy / "eval" / "val" / "eval.json").read_text())
    assert overridden["threshold"] == 0.0 and overridden["temperature"] == decision["temperature"]
    assert overridden["recall"] == 1.0 and overridden["confusion"]["fn"] == overridden["confusion"]["tn"] == 0


def test_infer_applies_the_runs_decision_and_the_threshold_flag(run_copy, tables, tmp_path, capsys):
    test_csv = tables[1]

    def infer(*extra: str) -> tuple[pd.DataFrame, np.ndarray]:
        out = tmp_path / "sub.csv"
        assert run.main(["infer", "--run", str(run_copy), "--data", str(test_csv), "--out", str(out), *extra]) == 0
        return pd.read_csv(out, dtype=str), pd.read_csv(tmp_path / "sub_p_true.csv")["p_true"].to_numpy()

    (run_copy / "decision.json").unlink()  # the one training fitted
    plain, p_raw = infer()
    assert "threshold 0.5 (default), temperature 1 (default)" in capsys.readouterr().out
    assert plain["is_correct"].tolist() == np.where(p_raw >= 0.5, "True", "False").tolist()

    values = np.unique(p_raw)
    middle = float(values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    (run_copy / "decision.json").write_text(json.dumps({"temperature": 1.0, "threshold": middle}))
    split, _ = infer()
    assert split["is_correct"].tolist() == np.where(p_raw >= middle, "True", "False").tolist()
    assert set(split["is_correct"]) == {"True", "False"}

    (run_copy / "decision.json").write_text(json.dumps({"temperature": 3.0, "threshold": 0.0}))
    everything, p_calibrated = infer()
    assert set(everything["is_correct"]) == {"True"}
    np.testing.assert_allclose(p_calibrated, apply_temperature(p_raw, 3.0), rtol=1e-6)
    assert f"temperature 3 ({run_copy / 'decision.json'})" in capsys.readouterr().out

    (run_copy / "decision.json").write_text(json.dumps({"temperature": 1.0, "threshold": 1.0}))
    nothing, _ = infer()
    assert set(nothing["is_correct"]) == {"False"}
    overridden, _ = infer("--threshold", "0")
    assert set(overridden["is_correct"]) == {"True"}
    assert "threshold 0 (--threshold)" in capsys.readouterr().out
    assert nothing["ID"].tolist() == overridden["ID"].tolist() == plain["ID"].tolist()


def one_line_error(argv: list[str], capsys) -> str:
    try:
        code = run.main(argv)
    except SystemExit as stop:  # argparse's errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--group-col", "question_id"], r"^error: --group-col question_id: no such column in \S*val\.csv \(found: ID, "),
    (["--by", "model"], r"^error: --by model: no such column in \S*val\.csv"),
    (["--fit", "--threshold", "0.3"], r"^error: --fit fits the threshold on this table; leave out --threshold$"),
    (["--threshold-for", "f1"], r"^error: --threshold-for says what --fit maximizes; add --fit$"),
    (["--threshold", "2"], r"^error: argument --threshold: must be in \[0, 1\], got 2"),
])
def test_eval_refuses_bad_flags_before_scoring(run_copy, labeled, monkeypatch, capsys, extra, message):
    monkeypatch.setattr("train.evaluate.score_table", lambda *args: pytest.fail("scored before the checks"))
    assert re.search(message, one_line_error(["eval", "--run", str(run_copy), "--data", str(labeled), *extra], capsys))
    assert not (run_copy / "eval").exists()


def test_eval_refuses_bad_inputs_before_scoring(run_copy, labeled, tables, monkeypatch, capsys):
    monkeypatch.setattr("train.evaluate.score_table", lambda *args: pytest.fail("scored before the checks"))
    unlabeled = tables[1]
    err = one_line_error(["eval", "--run", str(run_copy), "--data", str(unlabeled)], capsys)
    assert err.startswith(f"error: {unlabeled}: column 'is_correct' is missing")

    inside = run_copy / "eval" / "val" / "val.csv"  # the folder eval would replace
    inside.parent.mkdir(parents=True)
    shutil.copy(labeled, inside)
    err = one_line_error(["eval", "--run", str(run_copy), "--data", str(inside)], capsys)
    assert err == (f"error: --data {inside}: lies in {run_copy / 'eval' / 'val'}, which eval replaces; "
                   "move the table first")
    assert inside.exists()

    (run_copy / "decision.json").write_text('{"temperature": 0, "threshold": 0.5}')
    err = one_line_error(["eval", "--run", str(run_copy), "--data", str(labeled)], capsys)
    assert err == f"error: {run_copy / 'decision.json'}: 'temperature' must be a positive number, got 0"

    writer = RunFolder.open(run_copy)  # as a training run resuming in this folder would
    try:
        err = one_line_error(["eval", "--run", str(run_copy), "--data", str(labeled), "--fit"], capsys)
    finally:
        writer.release()
    assert re.match(rf"^error: {re.escape(str(run_copy))}: another process \(pid \d+\) is writing this run", err)
    assert not (run_copy / "eval" / "val" / "eval.json").exists()


def test_eval_and_infer_judge_a_questions_candidates_together(run_copy, tmp_path, capsys):
    """eval --fit on a table where every question has two candidates fits a consensus; eval reports it beside the
    model alone, and infer gives the same P(True), or the model's alone with --no-consensus."""
    df = generate(40, seed=5)
    df.insert(0, "ID", [f"c{i}" for i in range(len(df))])
    table = tmp_path / "pairs.csv"
    df.to_csv(table, index=False)
    assert run.main(["eval", "--run", str(run_copy), "--data", str(table), "--fit"]) == 0
    decision = json.loads((run_copy / "decision.json").read_text())
    assert decision["consensus"]["rows"] == 40
    report = json.loads((run_copy / "eval" / "pairs" / "eval.json").read_text())
    assert report["consensus"]["rows"] == 40 and report["consensus"]["threshold"] == decision["consensus"]["threshold"]
    assert set(report["model_alone"]) >= {"accuracy", "auroc", "confusion"}
    assert "Consensus of answers decided 40 rows" in capsys.readouterr().out
    scores = pd.read_csv(run_copy / "eval" / "pairs" / "scores.csv")
    assert scores["by_consensus"].all() and scores["row"].tolist() == list(range(1, 41))
    assert report["accuracy"] == pytest.approx(np.mean(scores["decided"] == scores["is_correct"]))

    def infer(*extra: str) -> np.ndarray:
        out = tmp_path / "sub.csv"
        assert run.main(["infer", "--run", str(run_copy), "--data", str(table), "--out", str(out), *extra]) == 0
        return pd.read_csv(tmp_path / "sub_p_true.csv")["p_true"].to_numpy()

    np.testing.assert_allclose(infer(), scores["p_true"], rtol=1e-9)
    assert "40 decided with the consensus" in capsys.readouterr().out
    np.testing.assert_allclose(infer("--no-consensus"), scores["p_model"], rtol=1e-6)  # float32 as written
