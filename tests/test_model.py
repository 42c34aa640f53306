import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_checkpoint, read_index
from data.errors import UserError
from model import Llama, LlamaConfig, load_llama
from model.config import LLAMA_3_1_8B

transformers = pytest.importorskip("transformers")


def hf_logits(path, tokens, dtype=torch.float32):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path, tied):
    path = make_hf_checkpoint(tmp_path, tie_word_embeddings=tied)
    assert len(set(read_index(path)["weight_map"].values())) > 1, "the checkpoint should be sharded"
    tokens = torch.randint(0, 300, (2, 80))  # past original_max_position_embeddings=32: llama3 scaling shows
    ours = load_llama(path, dtype=torch.float32)
    with torch.no_grad():
        logits = ours(tokens)
    assert (logits - hf_logits(path, tokens)).abs().max().item() <= 1e-4


def test_hidden_states_feed_lm_head(tiny_checkpoint):
    model = load_llama(tiny_checkpoint, dtype=torch.float32)
    tokens = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model.hidden_states(tokens)), model(tokens))


def test_right_padding_leaves_real_positions_exact(tiny_checkpoint):
    model = load_llama(tiny_checkpoint, dtype=torch.float32)
    row = torch.randint(3, 300, (1, 11))
    padded = torch.cat([row, torch.zeros(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone, in_batch = model(row), model(torch.cat([padded, torch.randint(0, 300, (1, 20))]))
    assert (alone[0] - in_batch[0, :11]).abs().max().item() <= 1e-5


def test_llama3_8b_shape():
    with torch.device("meta"):
        model = Llama(LLAMA_3_1_8B)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248


def test_unsupported_rope_type_is_named():
    with pytest.raises(UserError, match="rope_scaling.rope_type='yarn'"):
        LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_unsupported_architecture_is_named(tiny_checkpoint, tmp_path):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(UserError, match="architectures=.*MistralForCausalLM"):
        load_llama(path)


# Each bad checkpoint ends in one UserError line that names the file or tensor.
def _first_shard(path):
    return path / sorted(set(read_index(path)["weight_map"].values()))[0]


def _edit_first_shard(path, edit):
    shard = _first_shard(path)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)


def test_missing_config(tiny_checkpoint, tmp_path):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (path / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_llama(path)


def test_missing_tensor(tiny_checkpoint, tmp_path):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    _edit_first_shard(path, lambda t: t.pop(sorted(t)[0]))
    with pytest.raises(UserError, match=r"tensor \S+ missing from checkpoint"):
        load_llama(path)


def test_unexpected_tensor(tiny_checkpoint, tmp_path):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    _edit_first_shard(path, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match=r"unexpected tensor model.layers.0.mystery.weight \(2,\)"):
        load_llama(path)


def test_wrong_shape(tiny_checkpoint, tmp_path):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    _edit_first_shard(path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    if "model.norm.weight" not in load_file(_first_shard(path)):
        pytest.fail("edit did not land")
    with pytest.raises(UserError, match=r"tensor model.norm.weight has shape \(65,\), expected \(64,\)"):
        load_llama(path)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_shard(tiny_checkpoint, tmp_path, damage):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    shard = _first_shard(path)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    with pytest.raises(UserError, match=f"{shard.name}: corrupt or truncated safetensors"):
        load_llama(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_8b_shape_bf16_matches_transformers_on_gpu():
    """Random weights of the real Llama-3.1-8B shape on the GPU: our bf16 forward is as close to the float32
    truth as transformers' bf16 forward is, and the two bf16 forwards agree to bf16 tolerance."""
    config = transformers.LlamaConfig(**LLAMA_3_1_8B.to_dict())
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising 8B parameters on the CPU would take minutes
        reference = transformers.LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 512), device="cuda")
    with torch.no_grad():
        truth = reference(tokens).logits
        reference.to(torch.bfloat16)
        theirs = reference(tokens).logits.float()
        with torch.device("cuda"):
            ours = Llama(LLAMA_3_1_8B).to(torch.bfloat16).eval()
        ours.load_state_dict(reference.state_dict())
        del reference
        got = ours(tokens).float()
    our_error, their_error = (got - truth).abs().mean().item(), (theirs - truth).abs().mean().item()
    print(f"mean |logit error| vs float32: ours {our_error:.4f}, transformers {their_error:.4f}")
    assert our_error <= 1.25 * their_error
    assert (got - theirs).abs().mean().item() <= 2 * their_error
    assert (got.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9
