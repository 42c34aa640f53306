import json
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import run
import train.infer
import train.loop
import train.step
from conftest import REPO, train_args
from common.errors import UserError
from lora import apply_lora
from model import load_llama
from model.llama import Llama
from train.objective import label_logits, loss_sum
from train.batch import right_padded


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))


def test_two_class_loss_is_the_full_vocabulary_loss_restricted_to_the_label_tokens(tiny_checkpoint):
    model = load_llama(tiny_checkpoint, dtype=torch.float32)
    tokens, lengths = torch.randint(0, 300, (3, 9)), torch.tensor([9, 4, 6])
    labels, label_ids = torch.tensor([1, 0, 1]), torch.tensor([17, 42])
    with torch.no_grad():
        full = model(tokens)[torch.arange(3), lengths - 1]
        expected = F.cross_entropy(full[:, label_ids], labels, reduction="sum")
        torch.testing.assert_close(label_logits(model, right_padded(tokens, lengths), label_ids), full[:, label_ids])
        torch.testing.assert_close(loss_sum(model, right_padded(tokens, lengths, labels), label_ids), expected)
        lm = F.cross_entropy(full, label_ids[labels], reduction="sum")
        torch.testing.assert_close(loss_sum(model, right_padded(tokens, lengths, labels), label_ids, kind="lm"), lm)


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(tiny_checkpoint):
    model = apply_lora(load_llama(tiny_checkpoint, dtype=torch.float32), 4, 8, verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lengths = torch.tensor([12, 5, 9, 12, 3, 7])
    tokens = torch.randint(0, 300, (6, 12)) * (torch.arange(12) < lengths[:, None])  # right-padded with 0
    labels, label_ids = torch.tensor([1, 0, 0, 1, 1, 0]), torch.tensor([5, 6])
    params = [p for p in model.parameters() if p.requires_grad]

    (loss_sum(model, right_padded(tokens, lengths, labels), label_ids) / 6).backward()
    one_batch = [p.grad.clone() for p in params]
    model.zero_grad()
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        width = int(lengths[rows].max())
        (loss_sum(model, right_padded(tokens[rows, :width], lengths[rows], labels[rows]), label_ids) / 6).backward()
    for accumulated, expected in zip((p.grad for p in params), one_batch):
        torch.testing.assert_close(accumulated, expected, rtol=1e-4, atol=1e-6)


def test_train_then_infer_end_to_end(tiny_llama3, tables, tmp_path, monkeypatch):
    train_csv, test_csv = tables
    run_dir = train.loop.train(train_args(tiny_llama3, train_csv, tmp_path / "run"))
    for name in ("config.json", "metrics.jsonl", "summary.json", "training.png", "adapter/adapter_model.safetensors",
                 "adapter_best/adapter_config.json", "checkpoint/state.safetensors",
                 "checkpoint/progress.json"):
        assert (run_dir / name).exists(), name
    # each step's throughput is its own time's, also at the evaluation steps, which finish right after the step
    # before them (timed from there, they came out thousands of times too high); a busy CPU varies it tenfold
    rates = [r["tokens_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert len(rates) == 6 and max(rates) < 100 * float(np.median(rates))
    out = tmp_path / "sub" / "submission.csv"
    monkeypatch.chdir(tmp_path)  # infer with no --run takes the newest run under ./runs
    shutil.copytree(run_dir, tmp_path / "runs" / "only")
    assert run.main(["infer", "--data", str(test_csv), "--out", str(out)]) == 0
    submission, test = pd.read_csv(out, dtype=str), pd.read_csv(test_csv, dtype=str)
    assert list(submission.columns) == ["ID", "is_correct"]
    assert submission["ID"].tolist() == test["ID"].tolist()
    assert set(submission["is_correct"]) <= {"True", "False"}
    p_true = pd.read_csv(out.with_name("submission_p_true.csv"))
    assert p_true["p_true"].between(0, 1).all() and len(p_true) == len(test)


def signal_at_step(monkeypatch, step: int, *signals: signal.Signals) -> None:
    """Sends `signals` to this process while the loop prepares 0-based step `step` (from inside lr_at)."""
    real_lr_at = train.loop.lr_at

    def lr_at(at, *rest):
        if at == step:
            for s in signals:
                os.kill(os.getpid(), s)
        return real_lr_at(at, *rest)
    monkeypatch.setattr(train.loop, "lr_at", lr_at)


def adapters_equal(a: Path, b: Path) -> bool:
    expected, got = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("sent, flags", [(signal.SIGINT, ()),
                                         (signal.SIGTERM, ("--packing", "on", "--pack-tokens", "300", "--grad-checkpoint"))])
def test_a_signal_stops_at_the_step_boundary_and_resume_ends_with_the_same_adapter(tiny_llama3, tables, tmp_path,
                                                                                  monkeypatch, sent, flags):
    train_csv, _ = tables
    straight = train.loop.train(train_args(tiny_llama3, train_csv, tmp_path / "straight", *flags))
    signal_at_step(monkeypatch, 3, sent)  # during the 4th step, between two checkpoints (every 3 steps)
    with pytest.raises(UserError, match=rf"^{sent.name} at step 4: checkpoint saved; continue with"):
        train.loop.train(train_args(tiny_llama3, train_csv, tmp_path / "resumed", *flags))
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "progress.json").read_text())["progress"]["step"] == 4
    monkeypatch.undo()
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))
    resumed = train.loop.train(run.parse_args(["train", "--resume", str(tmp_path / "resumed")]))
    assert adapters_equal(straight / "adapter", resumed / "adapter")  # with --lora-dropout 0.1: the RNG resumes too


@pytest.mark.parametrize("broken,message", [("loss", "loss became nan"), ("gradient", "gradient norm became (inf|nan)")])
def test_non_finite_step_stops_with_the_step(tiny_llama3, tables, tmp_path, monkeypatch, broken, message):
    train_csv, _ = tables
    real_loss_sum = train.step.loss_sum
    calls = []

    def broken_from_step_5(*args, **kwargs):
        calls.append(1)
        loss = real_loss_sum(*args, **kwargs)
        if len(calls) <= 8:  # two micro-batches a step (unpacked)
            return loss
        if broken == "loss":
            return loss * float("nan")
        return loss + (loss - loss.detach()) * 1e38 * 1e38  # the same value; a gradient of 1e76 overflows

    monkeypatch.setattr(train.step, "loss_sum", broken_from_step_5)
    with pytest.raises(UserError, match=rf"{message} at step 5; the last good checkpoint is in .*checkpoint"):
        train.loop.train(train_args(tiny_llama3, train_csv, tmp_path / "run", "--packing", "off"))
    assert (tmp_path / "run" / "checkpoint" / "state.safetensors").is_file()


@pytest.mark.parametrize("flags,message", [
    (["--rank", "0"], "argument --rank: must be positive, got 0"),
    (["--lr=-1e-4"], "argument --lr: must be positive, got -1e-4"),
    (["--batch-size", "two"], "argument --batch-size: 'two' is not an integer"),
    (["--alpha", "0"], "argument --alpha: must be positive, got 0"),
    (["--template", "no-such-template"], "no-such-template"),
    (["--data", "missing.csv"], "missing.csv"),
    (["--model", "no-such-model"], "no-such-model: model folder does not exist"),
])
def test_bad_flags_get_one_line_and_exit_2(flags, message, tmp_path):
    env = {"LLAMA_JUDGE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    if "PYTHONPATH" in os.environ:  # packages installed with pip --target, as on the GPU machines
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "train", *flags], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # no half-made run folder


def random_rows(lengths: list[int]):
    """A tokenized table of random ids with rows of the given lengths and no labels."""
    from data import Tokenized

    ids = torch.randint(0, 300, (sum(lengths),), generator=torch.Generator().manual_seed(0)).numpy().astype("int32")
    offsets = torch.tensor([0] + lengths).cumsum(0).numpy()
    return Tokenized(ids=ids, offsets=offsets, labels=None, truncated=offsets[:0])


def test_default_scoring_budget_fits_a_row_longer_than_the_cpu_budget(tiny_checkpoint):
    from train.predict import default_batch_tokens, predict_p_true

    model = load_llama(tiny_checkpoint, dtype=torch.float32, device="cpu")
    lengths = [default_batch_tokens(torch.device("cpu")) + 5, 7, 300]
    table = random_rows(lengths)
    label_ids, device = torch.tensor([3, 4]), torch.device("cpu")
    by_default = predict_p_true(model, table, label_ids, 0, None, device)
    explicit = predict_p_true(model, table, label_ids, 0, max(lengths), device)
    assert by_default.shape == (3,)
    torch.testing.assert_close(torch.from_numpy(by_default), torch.from_numpy(explicit), rtol=1e-5, atol=1e-6)


def test_scores_are_the_same_with_batches_padded_to_a_multiple(tiny_checkpoint):
    from train.predict import predict_p_true

    model = load_llama(tiny_checkpoint, dtype=torch.float32, device="cpu")
    table = random_rows([5, 17, 9, 64, 3])
    label_ids, device = torch.tensor([3, 4]), torch.device("cpu")
    plain = predict_p_true(model, table, label_ids, 0, 80, device)
    padded = predict_p_true(model, table, label_ids, 0, 80, device, pad_to_multiple=16)
    torch.testing.assert_close(torch.from_numpy(padded), torch.from_numpy(plain), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags, multiple", [((), 1), (("--compile",), 64)])
def test_compiled_runs_pad_training_and_evaluation_batches(tiny_llama3, tables, tmp_path, monkeypatch, flags, multiple):
    # Each new batch shape costs a compiled run a compilation; padding to multiples of 64 keeps the shapes few.
    widths, real_hidden_states = [], Llama.hidden_states

    def recording_hidden_states(self, tokens, last=None, packing=None):
        widths.append(tokens.shape[1])
        return real_hidden_states(self, tokens, last, packing)
    monkeypatch.setattr(Llama, "compile_blocks", lambda self, *args, **kwargs: None)  # inductor on the CPU takes a minute
    monkeypatch.setattr(Llama, "hidden_states", recording_hidden_states)
    train.loop.train(train_args(tiny_llama3, tables[0], tmp_path / "run", "--packing", "off", *flags))
    assert widths and all(width % multiple == 0 for width in widths)
    assert multiple == 64 or any(width % 64 for width in widths)  # the plain run does not pad


@pytest.mark.parametrize("flags, passes_without_cudnn", [((), 6 + 2), (("--compile",), 0)])
def test_eager_runs_avoid_cudnn_attention_and_compiled_ones_keep_it(tiny_llama3, tables, tmp_path, monkeypatch, flags,
                                                                    passes_without_cudnn):
    # Unpacked eager batches each take a new shape, for which cuDNN would build a plan; compiled runs pad to few
    # shapes (and packed ones have one). train_args runs 6 steps and evaluates twice; then infer scores a table once.
    devices = []

    @contextmanager
    def record(device):
        devices.append(device)  # on entering: a context made but never entered is not counted
        yield
    monkeypatch.setattr(Llama, "compile_blocks", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(train.loop, "attention_without_cudnn", record)
    monkeypatch.setattr(train.infer, "attention_without_cudnn", record)
    run_dir = train.loop.train(train_args(tiny_llama3, tables[0], tmp_path / "run", "--packing", "off", *flags))
    assert len(devices) == passes_without_cudnn
    assert run.main(["infer", "--run", str(run_dir), "--data", str(tables[1]), "--out", str(tmp_path / "sub.csv"),
                     "--packing", "off"]) == 0
    assert len(devices) == passes_without_cudnn + 1
    assert set(devices) == {train.loop.pick_device()}


def test_attention_without_cudnn_turns_off_only_cudnn_and_restores_it():  # the flags exist in CPU builds too
    from train.predict import attention_without_cudnn

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_without_cudnn(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_cuda_graphs_without_a_gpu_is_one_line(tiny_llama3, tables, tmp_path):
    with pytest.raises(UserError, match=r"^--cuda-graphs needs a CUDA GPU$"):
        train.loop.train(train_args(tiny_llama3, tables[0], tmp_path / "run", "--cuda-graphs"))
    assert not (tmp_path / "run").exists()


def test_a_run_with_a_corrupt_config_is_named_in_one_error(tmp_path):
    from argparse import Namespace

    from train.infer import infer

    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=rf"^{re.escape(str(run_dir / 'config.json'))}: not valid JSON \("):
        train.loop.train(Namespace(resume=str(run_dir)))
    with pytest.raises(UserError, match=rf"^{re.escape(str(run_dir / 'config.json'))}: not valid JSON \("):
        infer(Namespace(run=str(run_dir), best=False))
    (run_dir / "config.json").unlink()
    with pytest.raises(UserError, match=r"no run there \(config.json missing\)$"):
        train.loop.train(Namespace(resume=str(run_dir)))
