"""Which adapter is best (--select-by) and when to stop (--patience): issue 17, items 1-2."""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import run
import train.loop
from conftest import train_args
from lora import save_adapter
from train.loop import improves


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))


def flat(labels: np.ndarray) -> np.ndarray:  # AUROC 0.5, log loss 0.693
    return np.full(len(labels), 0.5, dtype=np.float32)


def ranked_but_low(labels: np.ndarray) -> np.ndarray:  # AUROC 1, every row called False, log loss ~0.85
    return np.where(labels == 1, 0.2, 0.1).astype(np.float32)


def confident_one_wrong(labels: np.ndarray) -> np.ndarray:  # AUROC < 1, accuracy 7/8, the lowest log loss
    p_true = np.where(labels == 1, 0.9, 0.1).astype(np.float32)
    p_true[np.flatnonzero(labels == 0)[0]] = 0.95
    return p_true


def scripted_scores(monkeypatch, tmp_path: Path, scores: list) -> list[Path]:
    """Each evaluation gets the next of `scores` (a function of the validation labels); the adapter it scored is
    saved to the returned folders, in order."""
    saved: list[Path] = []

    def predict(model, table, *args, **kwargs):
        saved.append(tmp_path / f"eval{len(saved)}")
        save_adapter(model, saved[-1])
        return scores[min(len(saved), len(scores)) - 1](table.labels)
    monkeypatch.setattr(train.loop, "predict_p_true", predict)
    return saved


def same_adapter(a: Path, b: Path) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def test_improves():
    assert improves("auroc", 0.6, None) and improves("auroc", 0.7, 0.6) and not improves("auroc", 0.6, 0.6)
    assert not improves("auroc", None, None) and not improves("auroc", None, 0.5)
    assert improves("log_loss", 0.4, 0.5) and not improves("log_loss", 0.6, 0.5)


@pytest.mark.parametrize("select_by, best_eval", [("auroc", 1), ("log_loss", 2), ("accuracy", 2)])
def test_the_best_adapter_is_the_one_with_the_best_selected_metric(tiny_llama3, tables, tmp_path, monkeypatch,
                                                                   select_by, best_eval):
    saved = scripted_scores(monkeypatch, tmp_path, [flat, ranked_but_low, confident_one_wrong])
    out = train.loop.train(train_args(tiny_llama3, tables[0], tmp_path / "run", "--eval-every", "2",
                                      "--select-by", select_by))
    assert len(saved) == 3  # steps 2, 4, 6
    assert same_adapter(out / "adapter_best", saved[best_eval])
    assert not any(same_adapter(out / "adapter_best", s) for i, s in enumerate(saved) if i != best_eval)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val"]["metric"] == select_by and summary["best_val"]["step"] == 2 * (best_eval + 1)
    assert summary["stopped_early"] is False
    metrics = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "split" in r]
    assert summary["best_val"]["value"] == metrics[best_eval][select_by]


def test_patience_stops_early_and_the_run_ends_like_a_finished_one(tiny_llama3, tables, tmp_path, monkeypatch,
                                                                     capsys):
    saved = scripted_scores(monkeypatch, tmp_path, [ranked_but_low, flat])  # the first is best, then none better
    args = train_args(tiny_llama3, tables[0], tmp_path / "run", "--eval-every", "1", "--patience", "2")
    out = train.loop.train(args)
    assert len(saved) == 3  # steps 1, 2, 3: two evaluations without a better AUROC
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["stopped_at_step"] == 3 and summary["steps"] == 3
    assert summary["best_val"] == {"metric": "auroc", "value": 1.0, "step": 1}
    assert (out / "adapter").is_dir() and (out / "decision.json").is_file()
    assert same_adapter(out / "adapter_best", saved[0]) and same_adapter(out / "adapter", saved[2])

    capsys.readouterr()
    assert run.main(["train", "--resume", str(out)]) == 2
    assert "stopped early at step 3" in capsys.readouterr().err
    assert run.main(["train", "--resume", str(out), "--patience", "3"]) == 0  # one more evaluation, then stops
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_at_step"] == 4 and len(saved) == 4


def test_select_by_cannot_change_on_resume(tiny_llama3, tables, tmp_path, monkeypatch, capsys):
    scripted_scores(monkeypatch, tmp_path, [flat])
    out = train.loop.train(train_args(tiny_llama3, tables[0], tmp_path / "run", "--max-steps", "3"))
    capsys.readouterr()
    assert run.main(["train", "--resume", str(out), "--max-steps", "6", "--select-by", "accuracy"]) == 2
    assert "--select-by cannot change in a resumed run" in capsys.readouterr().err
