import json

import pytest
import torch
from torch import nn

from common.errors import UserError
from lora import LoRALinear, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter
from model import load_llama, save_llama
from model.checkpoint import PROJECTIONS
from model.llama import Llama
from model.config import LLAMA_3_1_8B
from model.nf4 import dequantize_nf4

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("rank,alpha", [(64, 64), (64, 128), (16, 16), (8, 32)])
def test_lora_linear_equals_merged_weight(rank, alpha):
    base = nn.Linear(96, 80, bias=False)
    layer = LoRALinear(base, rank, alpha)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 96)
    expected = x @ (base.weight + (alpha / rank) * layer.lora_B.weight @ layer.lora_A.weight).T
    assert (layer(x) - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_fresh_adapter_leaves_logits_unchanged(tiny_checkpoint):
    tokens = torch.randint(0, 300, (2, 12))
    base = load_llama(tiny_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        before = base(tokens)
        after = apply_lora(base, 8, 16)(tokens)
    assert torch.equal(before, after)


def test_trainable_parameter_count_of_llama_3_1_8b():
    with torch.device("meta"):
        model = apply_lora(Llama(LLAMA_3_1_8B), 64, 64, verbose=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 167_772_160


def test_only_adapters_learn(tiny_checkpoint):
    model = apply_lora(load_llama(tiny_checkpoint, dtype=torch.float32), 4, 8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    model(torch.randint(0, 300, (2, 9))).logsumexp(-1).mean().backward()
    optimizer.step()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in trainable)


def test_bad_rank_and_targets():
    with torch.device("meta"):
        model = Llama(LLAMA_3_1_8B)
    with pytest.raises(UserError, match="--rank must be a positive integer, got 0"):
        apply_lora(model, 0, 16)
    with pytest.raises(UserError, match=r"LoRA targets \['lm_head'\]"):
        apply_lora(model, 8, 16, targets=("q_proj", "lm_head"))


def _peft_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_adapter_saved_here_loads_in_peft(tiny_checkpoint, tmp_path):
    tokens = torch.randint(0, 300, (2, 10))
    ours = apply_lora(load_llama(tiny_checkpoint, dtype=torch.float32), 8, 16)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tiny_checkpoint))
    theirs = peft.PeftModel.from_pretrained(_peft_model(tiny_checkpoint), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() <= 1e-5


def test_adapter_on_some_blocks_round_trips_with_peft(tiny_checkpoint, tmp_path):
    tokens = torch.randint(0, 300, (2, 10))
    ours = apply_lora(load_llama(tiny_checkpoint, dtype=torch.float32), 4, 8, layers=[1])
    assert all(".layers.1." in name for name in lora_layers(ours))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_peft_model(tiny_checkpoint), tmp_path / "adapter").eval()
    again = load_adapter(load_llama(tiny_checkpoint, dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        expected = ours(tokens)
        assert (theirs(tokens).logits - expected).abs().max().item() <= 1e-5
        assert torch.equal(again(tokens), expected)


def test_adapter_saved_by_peft_loads_here(tiny_checkpoint, tmp_path):
    tokens = torch.randint(0, 300, (2, 10))
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(_peft_model(tiny_checkpoint), config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(load_llama(tiny_checkpoint, dtype=torch.float32), tmp_path / "adapter")
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_layers(ours)}) == ["down_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() <= 1e-5


def test_adapter_mismatch_is_refused(tiny_checkpoint, tmp_path):
    ours = apply_lora(load_llama(tiny_checkpoint, dtype=torch.float32), 8, 16)
    save_adapter(ours, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(UserError, match=r"lora_A.weight has shape \(8, 64\), expected \(4, 64\)"):
        load_adapter(load_llama(tiny_checkpoint, dtype=torch.float32), tmp_path / "adapter")
    config_file.write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(UserError, match="does not fit the model"):
        load_adapter(load_llama(tiny_checkpoint, dtype=torch.float32), tmp_path / "adapter")
    config_file.write_text(json.dumps({**config, "target_modules": PROJECTIONS + ("lm_head",)}))
    with pytest.raises(UserError, match="lm_head"):
        load_adapter(load_llama(tiny_checkpoint, dtype=torch.float32), tmp_path / "adapter")


def test_merged_checkpoint_reads_back_everywhere(tiny_checkpoint, tmp_path):
    tokens = torch.randint(0, 300, (2, 10))
    model = apply_lora(load_llama(tiny_checkpoint, dtype=torch.float32), 8, 16)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(tokens)
    save_llama(merge_lora(model), tmp_path / "merged")
    assert not lora_layers(model)
    with torch.no_grad():
        ours = load_llama(tmp_path / "merged", dtype=torch.float32)(tokens)
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(tokens).logits
    assert (ours - adapted).abs().max().item() <= 1e-4
    assert (theirs - adapted).abs().max().item() <= 1e-4


def test_merging_a_4bit_base_is_refused(tiny_checkpoint):
    model = apply_lora(load_llama(tiny_checkpoint, dtype=torch.bfloat16, quantize="nf4"), 4, 4)
    with pytest.raises(UserError, match="merging needs an unquantized model"):
        merge_lora(model)


def test_nf4_weights_within_quantization_error(tiny_checkpoint):
    full = load_llama(tiny_checkpoint, dtype=torch.float32)
    quantized = load_llama(tiny_checkpoint, dtype=torch.bfloat16, quantize="nf4")
    for (name, module), (_, q_module) in zip(full.named_modules(), quantized.named_modules()):
        if name.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        weight = module.weight
        error = (dequantize_nf4(q_module).float() - weight).abs()
        # NF4's 16 levels over [-absmax, absmax] of each 64-value block: spacing at most ~0.28·absmax.
        blocks_absmax = weight.reshape(-1, 64).abs().amax(1, keepdim=True)
        assert (error.reshape(-1, 64) <= 0.16 * blocks_absmax + 1e-3).all(), name
        assert error.mean() <= 0.1 * weight.abs().mean(), name


def test_4bit_lora_model_stays_close_to_float(tiny_checkpoint):
    tokens = torch.randint(0, 300, (2, 16))
    full = apply_lora(load_llama(tiny_checkpoint, dtype=torch.float32), 8, 16)
    quantized = apply_lora(load_llama(tiny_checkpoint, dtype=torch.bfloat16, quantize="nf4"), 8, 16)
    randomize_adapters(full)
    randomize_adapters(quantized)
    with torch.no_grad():
        reference = full(tokens)
        approx = quantized(tokens).float()
    relative_error = ((approx - reference).norm() / reference.norm()).item()
    print(f"4-bit LoRA model: relative logits error {relative_error:.4f}")
    assert relative_error <= 0.15
    assert (approx.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.7


def test_4bit_lora_trains_on_cpu(tiny_checkpoint):
    model = apply_lora(load_llama(tiny_checkpoint, dtype=torch.bfloat16, quantize="nf4"), 4, 8, verbose=False)
    randomize_adapters(model)
    model(torch.randint(0, 300, (2, 9))).float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 2 * 7 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
