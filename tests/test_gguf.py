import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import model.default
from common.errors import UserError
from model import LlamaConfig, load_llama
from model.default import INSTALL, default_model_path, packaged_gguf
from model.gguf import _interleaved_to_halves, convert_gguf
from model.tokenizer import load_tokenizer

PROMPTS = [
    "Question: Tom has 3 apples and buys 12 more. How many apples does he have?\nAnswer:",
    "Solve for x: 2x + 7 = 19. Step 1: subtract 7 from both sides, so",
]


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_llama(smollm2_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers", reason="transformers (test-only reference) is missing")
    gguf_file = packaged_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(smollm2_dir) -> list[list[int]]:
    return load_tokenizer(smollm2_dir).encode_batch(PROMPTS)


def test_config_describes_smollm2(smollm2_dir):
    raw = json.loads((smollm2_dir / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["model_type"] == "llama"
    config = LlamaConfig.from_dict(raw)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.rope_theta, config.rms_norm_eps) == (49152, 100000.0, 1e-5)
    assert config.tie_word_embeddings and config.rope_scaling is None
    assert (config.bos_token_id, config.eos_token_id, config.max_position_embeddings) == (1, 2, 8192)


def test_next_token_logits_match_transformers(ours, reference, prompt_ids):
    for ids in prompt_ids:
        tokens = torch.tensor([ids])
        with torch.no_grad():
            expected = reference(tokens).logits
            actual = ours(tokens)
        assert actual.shape == expected.shape == (1, len(ids), 49152)
        assert (actual - expected).abs().max().item() < 1e-3


def test_greedy_continuation_matches_transformers(ours, reference, prompt_ids):
    prompt = prompt_ids[1]
    ids = list(prompt)
    for _ in range(20):  # no KV cache: the whole sequence runs again each step
        with torch.no_grad():
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
    # the reference's greedy pick after each prefix, all prefixes in one causal pass
    with torch.no_grad():
        picks = reference(torch.tensor([ids[:-1]])).logits[0, len(prompt) - 1:].argmax(-1)
    assert picks.tolist() == ids[len(prompt):]


def test_rotary_rows_undo_llama_cpp_permutation():
    heads, head_dim, width = 3, 8, 5
    weight = np.random.default_rng(0).standard_normal((heads * head_dim, width)).astype(np.float32)
    # llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) applied to a Hugging Face weight
    gguf_weight = weight.reshape(heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(weight.shape)
    assert not np.array_equal(gguf_weight, weight)
    np.testing.assert_array_equal(_interleaved_to_halves(gguf_weight, heads), weight)


def test_default_model_path_second_call_reuses_cache(smollm2_dir, monkeypatch):
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(smollm2_dir.parent))

    def convert_again(*args):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(model.default, "convert_gguf", convert_again)
    start = time.perf_counter()
    assert default_model_path() == smollm2_dir
    assert time.perf_counter() - start < 0.5


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(model.default.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=INSTALL):
        packaged_gguf()


def write_gguf(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_non_llama_architecture_is_refused(tmp_path):
    with pytest.raises(UserError, match="general.architecture = 'qwen2'"):
        convert_gguf(write_gguf(tmp_path / "m.gguf", "qwen2"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_field_is_named(tmp_path):
    with pytest.raises(UserError, match="llama.embedding_length"):
        convert_gguf(write_gguf(tmp_path / "m.gguf", "llama"), tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
