"""Training throughput and peak GPU memory of QLoRA on the 8B shape: ours beside transformers + peft + bitsandbytes.

Each implementation loads the 4-bit model once and runs every config (batch x sequence, with or without
activation checkpointing) on random tokens: warmup steps, then timed steps; a config that runs out of memory is
reported as "oom". Ours trains the two-class loss (train.step.optimizer_step, train.optim.AdamW); the stack, as the
reference report did, runs peft.prepare_model_for_kbit_training, LoRA on the seven projections, the
full-vocabulary LM loss under bf16 autocast and torch.optim.AdamW. Both clip gradients at norm 1.
--stack-autocast off times the stack without autocast instead (both: each way): prepare_model_for_kbit_training leaves the
embeddings, norms and LoRA weights in fp32, so then the residual stream, attention and LoRA matmuls run in fp32
(results keyed "BxT:mode:no-autocast"); that is how the stack figures of the issue and the GUIDE were taken.
Targets: with checkpointing 8x512 >= 3x the stack's tokens/s at <= 11 GB peak; without, >= 2.5x at <= half its peak.

    python bench/bench_train.py [--checkpoint DIR] [--tiny] [--impl ours|stack|both]
        [--configs 8x512:ckpt,4x1024:ckpt,8x512:nockpt,4x1024:nockpt] [--warmup 2] [--steps 5] [--compile] [--cuda-graphs] [--fp8]
        [--activation-memory-budget 1.0] [--checkpoint-whole-blocks]
        [--stack-autocast on|off|both]
"""
import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch._functorch.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (checkpoint_path, clock, emit, env_info, implementations, load_stack,  # noqa: E402
                          parser, peak_memory, pick_device, ratio, release, reset_peak, stack_lora,
                          trainable_parameters)
from lora import apply_lora  # noqa: E402
from model import LlamaConfig, load_llama  # noqa: E402
from model.fp8 import use_fp8  # noqa: E402
from train.optim import AdamW  # noqa: E402
from train.predict import autocast  # noqa: E402
from train.batch import right_padded  # noqa: E402
from train.fastpath import compile_for_training  # noqa: E402
from train.step import graphed_backward, optimizer_step  # noqa: E402

LABEL_IDS = (837, 3082)  # any two fixed token ids serve as (False, True) on random weights
LR = 2e-4


def parse_config(text: str) -> tuple[int, int, bool | int]:
    """BxT:ckpt (recompute every block), BxT:ckptN (ours only: the first N blocks) or BxT:nockpt."""
    shape, _, mode = text.partition(":")
    batch, seq = (int(n) for n in shape.split("x"))
    if mode == "ckpt" or mode == "nockpt":
        return batch, seq, mode == "ckpt"
    if mode.startswith("ckpt") and mode[4:].isdigit():
        return batch, seq, int(mode[4:])
    raise SystemExit(f"--configs: {text!r} is not BxT:ckpt, BxT:ckptN or BxT:nockpt")


def ours(path: Path, device: torch.device, args) -> tuple[Callable, Callable, torch.optim.Optimizer, int]:
    model = load_llama(path, dtype=torch.bfloat16, device=device, quantize="nf4", head_rows=LABEL_IDS)
    if args.fp8:
        use_fp8(model)
    apply_lora(model, args.rank, args.alpha, verbose=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=LR, weight_decay=0.0)
    label_ids = torch.tensor(LABEL_IDS, device=device)
    graphs = None

    def set_checkpointing(on: bool | int) -> None:
        nonlocal graphs
        model.grad_checkpoint = on
        if args.compile:  # compile anew, under this mode's budget
            torch._dynamo.reset()
            compile_for_training(model, not args.checkpoint_whole_blocks, args.activation_memory_budget)
        if args.cuda_graphs:  # graphs recorded before hold the other mode's pass
            graphs = graphed_backward(model, params, label_ids)

    def step(tokens: torch.Tensor) -> float:
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], device=device)
        labels = torch.randint(0, 2, (tokens.shape[0],), device=device)
        return optimizer_step(model, optimizer, [right_padded(tokens, lengths, labels)], label_ids, graphs=graphs)[0]

    return set_checkpointing, step, optimizer, trainable_parameters(model)


def stack(path: Path, device: torch.device, args) -> tuple[Callable, Callable, torch.optim.Optimizer, int]:
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(load_stack(path, device))  # upcasts unquantized weights to fp32
    model = stack_lora(model, args.rank, args.alpha)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    hf_model = model.get_base_model()

    def set_checkpointing(on: bool) -> None:
        if on:  # as prepare_model_for_kbit_training enables it
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={})
        else:
            hf_model.gradient_checkpointing_disable()

    def step(tokens: torch.Tensor, mixed_precision: bool) -> float:
        with autocast(device) if mixed_precision else contextlib.nullcontext():
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return set_checkpointing, step, optimizer, trainable_parameters(model)


def variants(impl: str, config: str, step: Callable, stack_autocast: str) -> list[tuple[str, Callable]]:
    """(result key, step) pairs to time for one config: ours once; the stack with, without or both ways autocast."""
    if impl == "ours":
        return [(config, step)]
    runs = {"on": [True], "off": [False], "both": [True, False]}[stack_autocast]
    return [(config if on else f"{config}:no-autocast", functools.partial(step, mixed_precision=on)) for on in runs]


def run_config(step: Callable, batch: int, seq: int, vocab: int, device: torch.device, args) -> dict:
    tokens = torch.randint(0, vocab, (batch, seq), device=device)
    reset_peak(device)
    for _ in range(args.warmup):
        step(tokens)
    start = clock(device)
    for _ in range(args.steps):
        loss = step(tokens)
    seconds = clock(device) - start
    return {"tokens_per_s": round(batch * seq * args.steps / seconds, 1), "step_s": round(seconds / args.steps, 3),
            "loss": round(loss, 4), **peak_memory(device)}


def run_implementation(impl: str, path: Path, device: torch.device, vocab: int, configs: list[str], args) -> dict:
    set_checkpointing, step, optimizer, trainable = (ours if impl == "ours" else stack)(path, device, args)
    results = {"trainable_parameters": trainable}
    for config in configs:
        batch, seq, checkpointing = parse_config(config)
        set_checkpointing(checkpointing)
        for name, run_step in variants(impl, config, step, args.stack_autocast):
            try:
                results[name] = run_config(run_step, batch, seq, vocab, device, args)
                if impl == "ours" and args.compile:
                    results[name]["activation_memory_budget"] = torch._functorch.config.activation_memory_budget
            except torch.OutOfMemoryError:
                results[name] = {"tokens_per_s": None, "oom": True, **peak_memory(device)}
                optimizer.zero_grad(set_to_none=True)  # drop the gradients a failed backward left behind
            release(device)
            print(f"{impl} {name}: {results[name]}", file=sys.stderr)
    return results


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--configs", help="comma-separated BxT:ckpt|nockpt (default: the reference report's four; "
                                     "2x64:ckpt,2x64:nockpt with --tiny)")
    p.add_argument("--warmup", type=int, help="untimed steps per config, counted for peak memory (default 2; 1 --tiny)")
    p.add_argument("--steps", type=int, help="timed steps per config (default 5; 1 with --tiny)")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile each block (run.py train --compile)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="ours: replay each step's forward and backward as a CUDA graph (run.py train's CUDA-graph path)")
    p.add_argument("--fp8", action="store_true", help="ours: the 4-bit base multiplies in FP8 (run.py train --fp8)")
    p.add_argument("--activation-memory-budget", type=float,
                   help="ours, compiled: torch._functorch.config.activation_memory_budget, the share of a compiled "
                        "block's activations its partitioner may keep for the backward pass (below 1 it recomputes "
                        "the cheapest of the rest; default as run.py train: train.fastpath.activation_budget)")
    p.add_argument("--checkpoint-whole-blocks", action="store_true",
                   help="ours, compiled, configs recomputing every block: wrap each in checkpoint() (budget 1 unless "
                        "given), as run.py train did before the partitioner recomputed inside the compiled blocks")
    p.add_argument("--stack-autocast", choices=("on", "off", "both"), default="on",
                   help="time the stack under bf16 autocast (on), without it (off), or both")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=64)
    args = p.parse_args()
    default_configs = "2x64:ckpt,2x64:nockpt" if args.tiny else "8x512:ckpt,4x1024:ckpt,8x512:nockpt,4x1024:nockpt"
    configs = (args.configs or default_configs).split(",")
    args.warmup = args.warmup if args.warmup is not None else 1 if args.tiny else 2
    args.steps = args.steps or (1 if args.tiny else 5)
    path, device = checkpoint_path(args), pick_device()
    vocab = LlamaConfig.from_json(path / "config.json").vocab_size
    torch.manual_seed(args.seed)

    record = {"bench": "train", "checkpoint": str(path), "device": str(device), "compile": args.compile,
              "cuda_graphs": args.cuda_graphs, "fp8": args.fp8,
              "rank": args.rank,
              "alpha": args.alpha, "warmup": args.warmup, "steps": args.steps}
    for impl in implementations(args):
        record[impl] = run_implementation(impl, path, device, vocab, configs, args)
        release(device)  # the model died with run_implementation's frame: the next one starts from an empty GPU
    if "stack" in record and "ours" in record:
        ours_results, stack_results = record["ours"], record["stack"]
        record["ratios_ours_to_stack"] = {
            name: {"tokens_per_s": ratio(ours_results[config]["tokens_per_s"], stack_results[name]["tokens_per_s"]),
                   "peak_allocated": ratio(ours_results[config]["peak_allocated_gb"],
                                           stack_results[name]["peak_allocated_gb"])}
            for config in configs for name in stack_results if name.removesuffix(":no-autocast") == config}
    emit({**record, **env_info()})


if __name__ == "__main__":
    main()
