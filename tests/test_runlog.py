"""TensorBoard event files of a run (issue 18): the same numbers as metrics.jsonl, each step once after a resume."""
import json
import signal
import sys
from pathlib import Path

import pytest
import torch

import run
import train.loop
from common.errors import UserError
from conftest import train_args
from test_train import signal_at_step
from train.runlog import RunLog

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

TRAIN = ("loss", "lr", "grad_norm", "tokens_per_s")
VAL = ("accuracy", "auroc", "log_loss", "brier", "ece", "f1", "precision", "recall")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))


def events(run_dir: Path):
    accumulator = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0})
    accumulator.Reload()
    return accumulator


def logged(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """metrics.jsonl's training and validation records by step (a later record for a step wins)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r for r in records if "loss" in r},
            {r["step"]: r for r in records if r.get("split") == "val"})


def assert_events_match_metrics(run_dir: Path) -> None:
    acc, (steps, evals) = events(run_dir), logged(run_dir)
    for name in TRAIN:
        scalars = acc.Scalars(f"train/{name}")
        assert [e.step for e in scalars] == sorted(steps), name
        assert [e.value for e in scalars] == pytest.approx([steps[e.step][name] for e in scalars], rel=1e-6), name
    for name in VAL:
        scalars = acc.Scalars(f"val/{name}")
        assert [e.step for e in scalars] == sorted(evals), name
        assert [e.value for e in scalars] == pytest.approx([evals[e.step][name] for e in scalars], rel=1e-6), name
    histograms = acc.Histograms("val/p_true")
    assert [h.step for h in histograms] == sorted(evals)
    assert all(h.histogram_value.num == evals[h.step]["n"] for h in histograms)
    tags = acc.Tags()["scalars"]
    assert "train/loss_scale" not in tags  # fp16 only
    assert [e.step for e in acc.Scalars("memory/peak_host_rss_gb")] == [max(steps)]
    assert ("memory/peak_gpu_allocated_gb" in tags) == torch.cuda.is_available()


def test_a_run_logs_the_metrics_to_tensorboard(tiny_llama3, tables, tmp_path):
    run_dir = train.loop.train(train_args(tiny_llama3, tables[0], tmp_path / "run"))
    assert len(logged(run_dir)[0]) == 6 and sorted(logged(run_dir)[1]) == [3, 6]
    assert_events_match_metrics(run_dir)


def test_a_resumed_run_logs_each_step_once(tiny_llama3, tables, tmp_path, monkeypatch):
    # stops at once while launching step 6, with step 5 in flight (unlogged); checkpoint at 3, step 4 logged
    signal_at_step(monkeypatch, 5, signal.SIGINT, signal.SIGINT)
    with pytest.raises(UserError, match="stopped at once"):
        train.loop.train(train_args(tiny_llama3, tables[0], tmp_path / "run"))
    assert [e.step for e in events(tmp_path / "run").Scalars("train/loss")] == [1, 2, 3, 4]
    monkeypatch.undo()
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))
    assert run.main(["train", "--resume", str(tmp_path / "run")]) == 0
    first, resumed = sorted((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    purges = [e.step for e in EventFileLoader(str(resumed)).Load() if e.HasField("session_log")]
    assert purges == [4]  # TensorBoard drops the events of steps 4 and on from the interrupted run's file
    assert_events_match_metrics(tmp_path / "run")


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing(tiny_llama3, tables, tmp_path, monkeypatch):
    signal_at_step(monkeypatch, 1, signal.SIGINT, signal.SIGINT)
    with pytest.raises(UserError, match="interrupted before the first checkpoint"):
        train.loop.train(train_args(tiny_llama3, tables[0], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_without_tensorboard_the_error_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(UserError, match="needs the tensorboard package: pip install tensorboard"):
        RunLog(tmp_path / "tensorboard")
