"""Data parallelism under torchrun (gloo, two CPU processes): the same flags on 1 and 2 processes give the same run
(float32, within float summation order), the same submission, and rank 0 alone writes; a checkpoint of 2 processes
resumes on 1; a stop signal to one rank stops all at one checkpoint; a rank that dies or hangs ends the job with a line
naming a rank (issue 15)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import run
from common.errors import UserError
from train.distributed import TIMEOUT_VARIABLE, timeout_s
from conftest import REPO

ADAPTER = "adapter/adapter_model.safetensors"


def train_flags(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--rank", "4", "--alpha", "8",
            "--batch-size", "3", "--grad-accum", "2", "--max-steps", "4", "--warmup-steps", "1", "--val-size", "9",
            "--eval-every", "2", "--max-len", "256", "--lr", "1e-3", "--quant", "none", "--precision", "fp32", *extra]


def torchrun(argv: list[str], cache: Path, processes: int = 2, script: str = "run.py", timeout_s: float = 20,
             wait: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAMA_JUDGE_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "LLAMA_JUDGE_DIST_TIMEOUT_S": str(timeout_s)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "--", script, *argv]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=wait)


def one_process(argv: list[str], cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(cache))
    assert run.main(argv) == 0


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = load_file(a / ADAPTER), load_file(b / ADAPTER)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def two_process_run(tiny_llama3, tables, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "two"
    done = torchrun(train_flags(tiny_llama3, tables[0], out), out.parent / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("packing", ["off", "on"])
def test_two_processes_train_the_same_adapter_as_one(packing, two_process_run, tiny_llama3, tables, tmp_path,
                                                     monkeypatch):
    two = two_process_run
    if packing == "on":
        two = tmp_path / "two-packed"
        done = torchrun(train_flags(tiny_llama3, tables[0], two, "--packing", "on"), tmp_path / "cache")
        assert done.returncode == 0, done.stderr[-3000:]
    one = tmp_path / "one"
    one_process(train_flags(tiny_llama3, tables[0], one, "--packing", packing), tmp_path / "cache", monkeypatch)
    assert_same_adapter(one, two)
    first, second = (json.loads((run_dir / "summary.json").read_text()) for run_dir in (one, two))
    assert second["processes"] == 2 and first["processes"] == 1
    assert abs(first["final"]["auroc"] - second["final"]["auroc"]) < 1e-6


def test_rank_zero_alone_writes(two_process_run):
    records = [json.loads(line) for line in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # one record a step, not one per rank
    assert [r["step"] for r in records if r.get("split") == "val"] == [2, 4]
    assert len(list((two_process_run / "tensorboard").iterdir())) == 1
    config = json.loads((two_process_run / "config.json").read_text())
    assert config["manifest"]["processes"] == 2
    assert sorted(p.name for p in two_process_run.iterdir() if not p.name.startswith(".")) == [
        "adapter", "adapter_best", "checkpoint", "config.json", "decision.json", "metrics.jsonl", "summary.json",
        "tensorboard", "training.png"]


def test_two_processes_write_the_same_submission_as_one(two_process_run, tables, tmp_path, monkeypatch):
    infer = ["infer", "--run", str(two_process_run), "--data", str(tables[1])]
    one_process([*infer, "--out", str(tmp_path / "one.csv")], tmp_path / "cache", monkeypatch)
    done = torchrun([*infer, "--out", str(tmp_path / "two.csv")], tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
    one, two = (pd.read_csv(tmp_path / f"{name}_p_true.csv") for name in ("one", "two"))
    assert one["ID"].equals(two["ID"])
    assert (one["p_true"] - two["p_true"]).abs().max() < 1e-6
    assert sorted(p.name for p in tmp_path.glob("two*")) == ["two.csv", "two_p_true.csv"]


def test_a_checkpoint_of_two_processes_resumes_on_one(two_process_run, tiny_llama3, tables, tmp_path, monkeypatch):
    """Both runs train 4 steps, then resume to 6 in one process: from the 2-process checkpoint and from a 1-process
    one; the same rows make the same steps, so the adapters agree."""
    resumed = tmp_path / "from-two"
    shutil.copytree(two_process_run, resumed)
    one = tmp_path / "one"
    one_process(train_flags(tiny_llama3, tables[0], one), tmp_path / "cache", monkeypatch)
    for folder in (resumed, one):
        one_process(["train", "--resume", str(folder), "--max-steps", "6"], tmp_path / "cache", monkeypatch)
    assert_same_adapter(one, resumed)
    config = json.loads((resumed / "config.json").read_text())
    assert config["resumes"][-1]["processes"] == 1


def test_a_grad_accum_the_processes_cannot_share_is_one_line(tiny_llama3, tables, tmp_path):
    flags = train_flags(tiny_llama3, tables[0], tmp_path / "run", "--packing", "off")
    flags[flags.index("--grad-accum") + 1] = "3"
    done = torchrun(flags, tmp_path / "cache")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("--grad-accum 3: 2 processes cannot share its micro-batches evenly" in line
                          for line in errors), done.stderr
    assert f'File "{REPO}' not in done.stderr  # torchrun reports the failed ranks with its own traceback; ours is none
    assert not (tmp_path / "run").exists()


def test_more_processes_than_training_rows_is_one_line(tiny_llama3, tables, tmp_path):
    two_rows = tmp_path / "two.csv"
    pd.read_csv(tables[0]).head(2).to_csv(two_rows, index=False)
    flags = train_flags(tiny_llama3, two_rows, tmp_path / "run")
    flags[flags.index("--val-size") + 1] = "1"  # one row left to train on
    done = torchrun(flags, tmp_path / "cache")
    assert done.returncode != 0
    assert "1 training rows for 2 processes (each needs rows)" in done.stderr, done.stderr[-3000:]


def test_commands_outside_train_and_infer_refuse_torchrun(tmp_path):
    done = torchrun(["export", "--out", str(tmp_path / "x")], tmp_path / "cache")
    assert done.returncode != 0
    assert "error: rank 0: run.py export runs in one process" in done.stderr


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_rank_that_dies_or_hangs_ends_the_job(mode, tiny_llama3, tables, tmp_path):
    started = time.monotonic()
    done = torchrun(["die" if mode == "die" else "hang", "1", *train_flags(tiny_llama3, tables[0], tmp_path / "run")],
                    tmp_path / "cache", script="tests/dist_faults.py", timeout_s=5)
    assert done.returncode != 0
    assert time.monotonic() - started < 120
    if mode == "die":
        assert "injected failure" in done.stderr
    else:  # rank 0 waited at the gradient all-reduce for its timeout, then said so
        assert "error: rank 0: the gradient all-reduce across 2 processes failed" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # no checkpoint yet: the new run's folder is gone


@pytest.mark.parametrize("stopped_rank", [0, 1])
def test_a_stop_signal_to_one_rank_stops_all_at_one_checkpoint_that_resumes_exactly(stopped_rank, tiny_llama3, tables,
                                                                                   tmp_path):
    """SIGTERM to one rank at step 2: every rank stops after that step, none exits before rank 0 has saved (torchrun
    ends the rest when one exits), and the resumed run equals one never stopped, dropout masks included."""
    flags = train_flags(tiny_llama3, tables[0], tmp_path / "stopped", "--lora-dropout", "0.1", "--eval-every", "3")
    done = torchrun(["stop", str(stopped_rank), *flags], tmp_path / "cache", script="tests/dist_faults.py")
    assert done.returncode != 0
    assert "SIGTERM at step 2: checkpoint saved" in done.stderr, done.stderr[-3000:]
    progress = json.loads((tmp_path / "stopped" / "checkpoint" / "progress.json").read_text())
    assert progress["progress"]["step"] == 2 and progress["rng_ranks"] == 2
    resumed = torchrun(["train", "--resume", str(tmp_path / "stopped")], tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = torchrun(train_flags(tiny_llama3, tables[0], tmp_path / "straight", "--lora-dropout", "0.1",
                                    "--eval-every", "3"), tmp_path / "cache")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same_adapter(tmp_path / "straight", tmp_path / "stopped")


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan"])
def test_a_bad_timeout_is_one_line(value, monkeypatch):
    monkeypatch.setenv(TIMEOUT_VARIABLE, value)
    with pytest.raises(UserError, match=f"{TIMEOUT_VARIABLE}='{value}': must be a positive number of seconds"):
        timeout_s()


def test_readme_torchrun_commands_get_past_torchrun_parser():
    """torchrun's own parser sees every option of the command line: README's lines must reach run.py intact."""
    from torch.distributed.run import get_args_parser
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines() if line.strip().startswith("torchrun")]
    assert len(lines) >= 3
    for line in lines:
        argv = line.split()[1:]
        args = get_args_parser().parse_args(argv)
        assert args.training_script == "run.py", line
        assert args.training_script_args[0] in ("train", "infer"), line
        run.parse_args(args.training_script_args)
