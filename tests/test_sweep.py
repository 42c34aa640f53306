"""`run.py sweep`: a grid of train flags run one by one or one per GPU, failures as rows, resumable (issue 17, item 3)."""
import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import run
import train.sweep


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))


def tiny_flags(model: Path, data: Path) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--rank", "4", "--alpha", "8", "--batch-size", "4",
            "--max-steps", "2", "--warmup-steps", "1", "--val-size", "8", "--eval-every", "2", "--lr", "1e-3"]


def one_line_error(argv: list[str], capsys) -> str:
    """The one line of a failing command, from run.main or from the train parser checking the flags of each run."""
    capsys.readouterr()
    try:
        status = run.main(argv)
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_grid_runs_every_combination_a_failure_is_a_row_and_a_rerun_skips_finished_runs(tiny_llama3, tables,
                                                                                           tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--grid", "max-len=256,128 eval_batch_tokens=200,512", "--out", str(out),
            *tiny_flags(tiny_llama3, tables[0])]
    assert run.main(argv) == 0
    rows = {r["run"]: r for r in csv.DictReader((out / "sweep.csv").open())}
    assert set(rows) == {"max-len256_eval-batch-tokens200", "max-len256_eval-batch-tokens512",
                         "max-len128_eval-batch-tokens200", "max-len128_eval-batch-tokens512"}
    failed = rows["max-len256_eval-batch-tokens200"]
    assert failed["error"] == "--eval-batch-tokens 200 is below --max-len 256: the longest row would not fit"
    assert failed["auroc"] == "" and not (out / failed["run"]).exists()
    finished = [r for name, r in rows.items() if r is not failed]
    for r in finished:
        summary = json.loads((out / r["run"] / "summary.json").read_text())
        assert r["error"] == "" and float(r["accuracy"]) == summary["final"]["accuracy"]
        assert summary["flags"]["max_len"] == int(r["max_len"]) and float(r["peak_memory_gb"]) > 0
    aurocs = [float(r["auroc"]) for r in csv.DictReader((out / "sweep.csv").open()) if r["auroc"]]
    assert aurocs == sorted(aurocs, reverse=True) and len(aurocs) == 3

    table = (out / "sweep.md").read_text().splitlines()
    assert table[0] == "# Sweep, sorted by validation auroc"
    body = [line for line in table if line.startswith("| max-len")]
    assert len(body) == 4 and body[-1].startswith("| max-len256_eval-batch-tokens200 | 256 | 200 |")
    assert body[-1].endswith("| --eval-batch-tokens 200 is below --max-len 256: the longest row would not fit |")
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    written = {r["run"]: (out / r["run"] / "summary.json").stat().st_mtime_ns for r in finished}
    capsys.readouterr()
    assert run.main(argv) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 3
    assert written == {r["run"]: (out / r["run"] / "summary.json").stat().st_mtime_ns for r in finished}
    assert len(list(csv.DictReader((out / "sweep.csv").open()))) == 4


def test_an_interrupted_run_is_resumed(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "sweep" / "rank4" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "progress.json").write_text("{}")
    calls = []
    monkeypatch.setattr(train.sweep, "run_child", lambda argv, gpu=None, log=None, children=None: calls.append(argv) or "it broke")
    assert run.main(["sweep", "--grid", "rank=4,8", "--out", str(tmp_path / "sweep"), "--max-steps", "3"]) == 0
    assert calls == [["--resume", str(tmp_path / "sweep" / "rank4")],
                     ["--max-steps", "3", "--rank", "8", "--out", str(tmp_path / "sweep" / "rank8")]]
    assert [r["error"] for r in csv.DictReader((tmp_path / "sweep" / "sweep.csv").open())] == ["it broke"] * 2


def test_several_gpus_run_one_run_each_at_a_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    busy, seen, lock = set(), [], threading.Lock()

    def fake_run(argv, gpu=None, log=None, children=None):
        with lock:
            assert gpu not in busy  # never two runs on one GPU
            busy.add(gpu)
            seen.append((gpu, log and log.name))
        time.sleep(0.05)
        with lock:
            busy.remove(gpu)
        return "it broke"

    monkeypatch.setattr(train.sweep, "run_child", fake_run)
    assert run.main(["sweep", "--grid", "rank=4,8 alpha=8,16", "--out", str(tmp_path / "s"), "--max-steps", "3"]) == 0
    assert {gpu for gpu, _ in seen} == {"3", "5"} and len(seen) == 4
    assert sorted(log for _, log in seen) == sorted(f"{name}.log" for name in
                                                     ("rank4_alpha8", "rank4_alpha16", "rank8_alpha8", "rank8_alpha16"))
    assert "one per GPU on GPUs 3,5" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "s" / "sweep.csv").open()))
    assert len(rows) == 4 and {r["error"] for r in rows} == {"it broke"}
    seen.clear()
    assert run.main(["sweep", "--grid", "rank=4,8", "--out", str(tmp_path / "t"), "--gpus", "1"]) == 0
    assert seen == [(None, None), (None, None)]  # one at a time, output passed through, the GPU left as it is


FAKE_TRAIN = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True)
def stop(signum, frame):
    (out / "signals").open("a").write(signal.Signals(signum).name + "\\n")
    time.sleep(0.5)  # saving a checkpoint
    print("error: SIGINT at step 1: checkpoint saved", file=sys.stderr)
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
(out / "started").write_text("")
time.sleep(30)
"""


def test_a_signal_to_the_sweep_reaches_each_running_run_once_and_starts_no_more(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    monkeypatch.setattr(train.sweep, "RUN_PY", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    out = tmp_path / "s"

    def interrupt_when_both_started():
        deadline = time.monotonic() + 20
        while len(list(out.glob("*/started"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_both_started, daemon=True).start()
    assert run.main(["sweep", "--grid", "rank=4,8,16", "--out", str(out)]) == 128 + signal.SIGINT
    started = sorted(p.parent.name for p in out.glob("*/started"))
    assert len(started) == 2 and not (out / "rank16").exists()  # the queued run never started
    assert all((out / name / "signals").read_text() == "SIGINT\n" for name in started)  # once each, not twice
    assert "sweep stopped; run the same command" in capsys.readouterr().err


def test_a_rerun_with_other_flags_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.sweep, "run_child", lambda argv, gpu=None, log=None, children=None: "it broke")
    out = str(tmp_path / "s")
    assert run.main(["sweep", "--grid", "rank=4,8", "--out", out, "--max-steps", "3"]) == 0
    assert "holds a sweep of other flags" in one_line_error(["sweep", "--grid", "rank=4,8", "--out", out,
                                                             "--max-steps", "9"], capsys)
    assert run.main(["sweep", "--grid", "rank=4,8", "--out", out, "--max-steps", "3"]) == 0  # the same: continues


@pytest.mark.parametrize("grid, extra, message", [
    ("rank=16,x", [], "--grid: --rank=x: 'x' is not an integer"),
    ("colour=1,2", [], "--grid: 'colour' is not a flag of `run.py train` that a sweep can vary"),
    ("rank", [], "--grid: 'rank' is not flag=value[,value...]"),
    ("rank=4,", [], "--grid: 'rank=4,' is not flag=value[,value...]"),
    ("eager=1", [], "--grid: --eager is a switch without a value"),
    ("loss=classifier,mse", [], "--grid: --loss=mse: must be one of classifier, lm"),
    ("out=a,b", [], "'out' is not a flag of `run.py train` that a sweep can vary"),
    ("rank=4,8", ["--rank", "16"], "sweep: --rank is in --grid"),
    ("rank=4,8", ["--resume", "x"], "sweep: --resume is set by the sweep"),
    ("rank=4,8", ["--lr", "fast"], "argument --lr: 'fast' is not a number"),
    ("rank=4,8", ["--colour", "3"], "unrecognized arguments: --colour 3"),
])
def test_bad_grids_and_flags_are_one_line_before_any_run(grid, extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.sweep, "run_child", lambda *args: pytest.fail("a run started"))
    assert message in one_line_error(["sweep", "--grid", grid, "--out", str(tmp_path / "s"), *extra], capsys)
