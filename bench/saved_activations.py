"""Which tensors one decoder block keeps for its backward pass, per token: a block shaped like Llama-3.1-8B's but
small (hidden 256, 4 query and 2 key/value heads of 64, MLP 896), NF4 base, LoRA r 8 on all projections, under bf16
autocast, eager or compiled (whose partitioner decides what to keep: the same on a CPU as on a GPU). Runs on a CPU.

    python bench/saved_activations.py [--fp8] [--compile] [--activation-memory-budget 1.0] [--tokens 136]
"""
import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora import apply_lora  # noqa: E402
from model.checkpoint import PROJECTIONS  # noqa: E402
from model.config import LlamaConfig  # noqa: E402
from model.fp8 import use_fp8  # noqa: E402
from model.llama import Llama, rope_cos_sin  # noqa: E402
from model.nf4 import quantize_nf4  # noqa: E402

CONFIG = LlamaConfig(hidden_size=256, intermediate_size=896, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, vocab_size=512)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--activation-memory-budget", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=136, help="rows of activations (not a size of any weight, which the block keeps anyway)")
    args = p.parse_args()
    torch._functorch.config.activation_memory_budget = args.activation_memory_budget
    torch.manual_seed(0)
    model = Llama(CONFIG).bfloat16()
    for module in list(model.modules()):
        for name in PROJECTIONS:
            if isinstance(getattr(module, name, None), torch.nn.Linear):
                setattr(module, name, quantize_nf4(getattr(module, name).weight.data, torch.bfloat16))
    if args.fp8:
        use_fp8(model)
    apply_lora(model, 8, 8, verbose=False)
    block = model.model.layers[0]
    if args.compile:
        block.compile()
    tokens = args.tokens
    x = torch.randn(1, tokens, CONFIG.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(model.inv_freq, tokens, torch.bfloat16)
    kept = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if tokens in t.shape:  # activations; weights and scales are kept anyway
            kept[tuple(t.shape), str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, cos, sin)
    print(f"{vars(args)}: {sum(kept.values()) / tokens:.0f} bytes a token")
    for (shape, dtype), nbytes in sorted(kept.items(), key=lambda kv: -kv[1]):
        print(f"  {nbytes / tokens:7.0f}  {dtype:9s} {shape}")


if __name__ == "__main__":
    main()
