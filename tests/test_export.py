"""`run.py export`: the merged Hugging Face folders load in transformers and judge as the run does; `infer --model`
scores an export like `infer --run`; the GGUF export converts back to the hf export's model (issue 18)."""
import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import run
import train.loop
from conftest import make_hf_checkpoint, train_args
from data import read_table, tokenize_table
from model import load_llama
from model.gguf import convert_gguf
from model.tokenizer import BPE_FILE, load_tokenizer
from train.infer import open_run, score_table
from train.setup import resolve_base

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ROWS = 4


@pytest.fixture(scope="module")
def exported(tiny_llama3, tables, tmp_path_factory) -> dict[str, Path]:
    """A tiny run adapting only its top block, and its hf and hf-classifier exports in fp32."""
    work = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA_JUDGE_CACHE", str(work / "cache"))
        run_dir = train.loop.train(train_args(tiny_llama3, tables[0], work / "run", "--lora-layers", "1"))
        for fmt in ("hf", "hf-classifier"):
            assert run.main(["export", "--run", str(run_dir), "--out", str(work / fmt), "--format", fmt,
                             "--dtype", "fp32"]) == 0
    return {"run": run_dir, "hf": work / "hf", "hf-classifier": work / "hf-classifier", "work": work}


@pytest.fixture(autouse=True)
def _private_cache(exported, monkeypatch):
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(exported["work"] / "cache"))


@pytest.fixture(scope="module")
def judged(exported, tables) -> tuple[list[torch.Tensor], np.ndarray, list[int]]:
    """The first test rows' token ids, the run's P(True) for them (its adapter, uncalibrated), and (False, True)."""
    scoring = open_run(Namespace(run=str(exported["run"]), best=False, model=None, max_len=None, batch_tokens=None))
    df = read_table(tables[1], split="test", template=scoring.template).head(ROWS)
    base = resolve_base(scoring.model, "none", scoring.template, torch.device("cpu"))
    table = tokenize_table(df, base.tokenizer, scoring.template, scoring.max_len)
    ids = [torch.tensor(table.row(i), dtype=torch.long)[None] for i in range(ROWS)]
    return ids, score_table(scoring, df), base.label_ids.tolist()


def test_export_equals_peft_merge_and_unload(exported, tiny_llama3):
    def base():
        return transformers.LlamaForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32)

    expected = peft.PeftModel.from_pretrained(base(), exported["run"] / "adapter").merge_and_unload().state_dict()
    ours = transformers.AutoModelForCausalLM.from_pretrained(exported["hf"], dtype=torch.float32).state_dict()
    assert ours.keys() == expected.keys()
    unmerged = base().state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], unmerged[k])]
    assert changed and all(".layers.1." in k for k in changed)
    for key, value in expected.items():
        assert (ours[key] - value).abs().max().item() <= 1e-6, key
    assert (exported["hf"] / "tokenizer.model").is_file()


def test_export_judges_as_the_run(exported, judged):
    ids, p_run, label_ids = judged
    model = transformers.LlamaForCausalLM.from_pretrained(exported["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        p = [torch.softmax(model(row).logits[0, -1, label_ids], -1)[1].item() for row in ids]
    np.testing.assert_allclose(p, p_run, atol=1e-5)


def test_classifier_export_judges_as_the_run(exported, judged):
    ids, p_run, _ = judged
    model = transformers.AutoModelForSequenceClassification.from_pretrained(exported["hf-classifier"],
                                                                            dtype=torch.float32).eval()
    assert model.config.id2label == {0: "False", 1: "True"}
    with torch.no_grad():
        p = [torch.softmax(model(row).logits[0], -1)[1].item() for row in ids]
    np.testing.assert_allclose(p, p_run, atol=1e-5)
    assert (exported["hf-classifier"] / "prompt_template.txt").read_text().endswith("Correct:")


def test_infer_on_the_export_writes_the_runs_submission(exported, tables, tmp_path):
    for name, source in (("run", ["--run", str(exported["run"])]), ("export", ["--model", str(exported["hf"])])):
        assert run.main(["infer", *source, "--data", str(tables[1]), "--out", str(tmp_path / f"{name}.csv")]) == 0
    assert (tmp_path / "run.csv").read_text() == (tmp_path / "export.csv").read_text()
    p_run, p_export = (pd.read_csv(tmp_path / f"{name}_p_true.csv")["p_true"] for name in ("run", "export"))
    np.testing.assert_allclose(p_export, p_run, atol=1e-5)


def test_export_never_writes_over_a_folder_or_into_the_run(exported, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for out, message in ((tmp_path / "full", "exists and is not an empty folder"),
                         (exported["run"] / "merged", "would write into")):
        capsys.readouterr()
        assert run.main(["export", "--run", str(exported["run"]), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (exported["run"] / "merged").exists()


@pytest.fixture(scope="module")
def gguf_exported(smollm2_dir, tables, tmp_path_factory) -> Path:
    """A tiny run on a random base with SmolLM2's GGUF tokenizer, exported as hf and as gguf in fp32."""
    work = tmp_path_factory.mktemp("export_gguf")
    base = make_hf_checkpoint(work / "base", vocab_size=49152, rope_scaling=None, max_shard_size="4MB")
    shutil.copy(smollm2_dir / BPE_FILE, base / BPE_FILE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA_JUDGE_CACHE", str(work / "cache"))
        run_dir = train.loop.train(train_args(base, tables[0], work / "run"))
        for fmt in ("hf", "gguf"):
            assert run.main(["export", "--run", str(run_dir), "--out", str(work / fmt), "--format", fmt,
                             "--dtype", "fp32"]) == 0
    return work


def test_gguf_export_converts_back_to_the_hf_export(gguf_exported):
    assert sorted(p.name for p in (gguf_exported / "gguf").iterdir()) == ["judge.json", "model.gguf"]
    assert (json.loads((gguf_exported / "gguf" / "judge.json").read_text())
            == json.loads((gguf_exported / "hf" / "judge.json").read_text()))
    back = convert_gguf(gguf_exported / "gguf" / "model.gguf", gguf_exported / "back")
    hf_model, back_model = (load_llama(path, dtype=torch.float32) for path in (gguf_exported / "hf", back))
    prompts = ["Question: 2 + 3 = ?\nAnswer: 5\nCorrect:", "Solve for x: 2x + 7 = 19, so x = 6. Correct:"]
    assert load_tokenizer(back).encode_batch(prompts) == load_tokenizer(gguf_exported / "hf").encode_batch(prompts)
    for ids in load_tokenizer(back).encode_batch(prompts):
        with torch.no_grad():
            expected, actual = (model(torch.tensor([ids])) for model in (hf_model, back_model))
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_gguf_export_refuses_a_tiktoken_base(exported, tmp_path, capsys):
    capsys.readouterr()
    assert run.main(["export", "--run", str(exported["run"]), "--out", str(tmp_path / "g"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GGUF export needs a GGUF byte-level BPE tokenizer" in err, err
    assert not (tmp_path / "g").exists()
