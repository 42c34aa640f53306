"""Training throughput of the default small model, SmolLM2-135M with LoRA r 64, α 64 on all seven projections.

ours:  load_llama (bf16 base), apply_lora, train.optim.AdamW, train.step.optimizer_step (two-class loss)
stack: transformers LlamaForCausalLM from the same folder in float32 under bf16 autocast, peft LoRA, torch AdamW
       (fused on CUDA), full-vocabulary LM loss on the last token, gradient clipping — the reference stack
Rows are random tokens of one length (no padding), so padded and real tokens/s agree. One JSON line per
configuration. `--compile` modes for ours: none (`run.py train`), blocks (`--compile`), cuda-graphs (`--cuda-graphs`:
compiled blocks, each micro-batch's forward and backward replayed as one CUDA graph), graphs (the same graphs over
uncompiled blocks), and two prototypes that compile the whole decoder as one graph (the second replayed as CUDA
graphs by torch.compile's mode="reduce-overhead"); `--profile` adds the GPU's busy time per step.

    python bench/bench_small.py --impl both --batch 16 64 --seq 512 --compile none blocks cuda-graphs --profile
    python bench/bench_small.py --tiny --batch 2 --seq 32 --steps 2   # CPU smoke test
"""
import argparse
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (clock, emit, env_info, peak_memory, pick_device, ratio, release,  # noqa: E402
                          reset_peak, stack_lora, trainable_parameters)
from data import get_template, label_token_ids  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import Llama, LlamaConfig, load_llama, load_tokenizer, save_llama  # noqa: E402
from model.default import default_model_path  # noqa: E402
from model.tokenizer import BPE_FILE  # noqa: E402
from train.optim import AdamW  # noqa: E402
from train.predict import autocast  # noqa: E402
from train.batch import right_padded  # noqa: E402
from train.step import graphed_backward, optimizer_step  # noqa: E402

RANK = ALPHA = 64
LR = 2e-4
COMPILE_MODES = ("none", "blocks", "cuda-graphs", "graphs", "hidden", "hidden-cudagraphs")


def tiny_model(out_dir: Path) -> Path:
    """A random two-block Llama with the default model's vocabulary and tokenizer, for CPU smoke tests."""
    source = default_model_path()
    config = replace(LlamaConfig.from_json(source / "config.json"), hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = Llama(config)
    with torch.no_grad():  # small weights, so losses start near ln(classes) as in a trained model's fine-tuning
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(std=0.02)
    save_llama(model, out_dir, dtype=torch.float32)
    shutil.copy(source / BPE_FILE, out_dir / BPE_FILE)
    return out_dir


def compile_ours(model: Llama, mode: str) -> None:
    """torch.compile on the decoder: per block as `run.py train --compile` / `--cuda-graphs` do (one graph reused by
    all blocks), or prototypes compiling the whole `hidden_states` in one graph, optionally replayed as a CUDA graph
    (mode="reduce-overhead")."""
    if mode in ("blocks", "cuda-graphs"):
        model.compile_blocks()
    elif mode == "hidden":
        model.hidden_states = torch.compile(model.hidden_states)
    elif mode == "hidden-cudagraphs":
        model.hidden_states = torch.compile(model.hidden_states, mode="reduce-overhead")


def ours_trainer(path: Path, device: torch.device, compile_mode: str):
    """(model, step function(tokens)) for our stack; labels are random classes of the real label tokens."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = apply_lora(load_llama(path, dtype=dtype, device=device), RANK, ALPHA, verbose=False)
    compile_ours(model, compile_mode)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=LR)
    true_id, false_id = label_token_ids(get_template("with_solution"), load_tokenizer(path))
    label_ids = torch.tensor([false_id, true_id], device=device)
    graphs = graphed_backward(model, params, label_ids) if compile_mode in ("cuda-graphs", "graphs") else None

    def step(tokens: torch.Tensor) -> None:
        if compile_mode == "hidden-cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten now
        batch, seq = tokens.shape
        lengths = torch.full((batch,), seq, device=device)
        labels = torch.randint(0, 2, (batch,), device=device)
        optimizer_step(model, optimizer, [right_padded(tokens, lengths, labels)], label_ids, graphs=graphs)
    return model, step


def stack_trainer(path: Path, device: torch.device):
    """(model, step function(tokens)) for transformers + peft: the label is the last token of each row."""
    from transformers import LlamaForCausalLM

    model = stack_lora(LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device), RANK, ALPHA)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, fused=device.type == "cuda")

    def step(tokens: torch.Tensor) -> None:
        targets = torch.full_like(tokens, -100)  # transformers' ignored label
        targets[:, -1] = tokens[:, -1]
        with autocast(device):
            loss = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=targets,
                         use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # a sync per step, as optimizer_step does
    return model, step


def gpu_busy_ms(step, tokens: torch.Tensor, steps: int, device: torch.device) -> float:
    """GPU kernel time per step, from torch.profiler: the step's floor once host overhead is gone."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(tokens)
        clock(device)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return round(sum(e.self_device_time_total for e in kernels) / 1e3 / steps, 2)


def measure(step, vocab_size: int, batch: int, seq: int, steps: int, warmup: int, device: torch.device,
            with_profile: bool = False) -> dict:
    """Tokens/s over `steps` steps after `warmup` (compilation and CUDA-graph recording happen there); with
    `with_profile`, also the GPU kernel time per step over as many more steps."""
    tokens = torch.randint(0, vocab_size, (batch, seq), device=device)
    reset_peak(device)
    try:
        for _ in range(warmup):
            step(tokens)
        start = clock(device)
        for _ in range(steps):
            step(tokens)
        seconds = clock(device) - start
        busy = {"gpu_busy_ms": gpu_busy_ms(step, tokens, steps, device)} if with_profile else {}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", **peak_memory(device)}
    return {"tokens_per_s": round(batch * seq * steps / seconds), "step_ms": round(1000 * seconds / steps, 2),
            **busy, **peak_memory(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("ours", "stack", "both"), default="both")
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="rows per step (several: a sweep)")
    parser.add_argument("--seq", type=int, nargs="+", default=[512], help="tokens per row (several: a sweep)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens there)")
    parser.add_argument("--compile", nargs="+", choices=COMPILE_MODES, default=["none"],
                        help="torch.compile modes for ours, each measured separately")
    parser.add_argument("--profile", action="store_true", help="also report GPU kernel time per step (CUDA only)")
    parser.add_argument("--model", help="HF-layout Llama folder (default: the converted SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="a random two-block model: a CPU smoke test")
    args = parser.parse_args()

    device = pick_device()
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_model(Path(tmp) / "tiny") if args.tiny else Path(args.model) if args.model else default_model_path()
        vocab_size = LlamaConfig.from_json(path / "config.json").vocab_size
        shapes = [(b, s) for b in args.batch for s in args.seq]
        runs = ([("stack", None)] if args.impl in ("stack", "both") else []) + (
            [("ours", mode) for mode in args.compile] if args.impl in ("ours", "both") else [])
        common = {"model": str(path), "lora": {"r": RANK, "alpha": ALPHA}, **env_info()}
        stack_speed = {}
        for impl, mode in runs:
            torch.manual_seed(0)
            model, step = stack_trainer(path, device) if impl == "stack" else ours_trainer(path, device, mode)
            for batch, seq in shapes:
                result = measure(step, vocab_size, batch, seq, args.steps, args.warmup, device,
                                 args.profile and device.type == "cuda")
                record = {"impl": impl, "compile": mode, "batch": batch, "seq": seq, "steps": args.steps, **result,
                          "trainable_params": trainable_parameters(model),
                          "loss": "lm (full vocabulary)" if impl == "stack" else "classifier (two label tokens)"}
                if impl == "stack":
                    stack_speed[batch, seq] = result.get("tokens_per_s")
                elif (batch, seq) in stack_speed:
                    record["ratio_vs_stack"] = ratio(result.get("tokens_per_s"), stack_speed[batch, seq])
                emit({**record, **common})
            del model, step
            torch._dynamo.reset()
            release(device)


if __name__ == "__main__":
    main()
