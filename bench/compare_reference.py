"""Validation quality side by side: our product path against transformers + peft, same model, split and budget.

ours:  `run.py train` through train.loop.train (two-class loss on the label tokens, bf16 base on CUDA)
stack: transformers LlamaForCausalLM in float32 under bf16 autocast, peft LoRA on all seven projections, torch
       AdamW (fused on CUDA), SFT-style full-vocabulary LM loss on the label token appended to the prompt (" True"
       or " False", loss on it alone), the same warmup + linear decay, clipping, seed and batches
Both sides read the same rows (read_table, split_train_val with --group-col group) and the same prompt token ids:
the stack gets our tokenizer's ids for the with_solution prompt, not a second tokenizer's. Its validation
P(True) is the softmax over the two label tokens' logits at the last prompt position. One JSON line per side.

    python bench/compare_reference.py --impl both                      # dev.csv, SmolLM2-135M: minutes on an H100
    python bench/compare_reference.py --tiny --limit-rows 64 --epochs 1  # CPU smoke test
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run  # noqa: E402
from bench.bench_small import tiny_model  # noqa: E402
from bench.common import (DEV_CSV, clock, emit, env_info, peak_memory, pick_device, release,  # noqa: E402
                          reset_peak, stack_lora)
from data import (budget_batches, collate, get_template, label_token_ids, read_table, split_train_val,  # noqa: E402
                  table_labels, tokenize_table)
from model import load_tokenizer  # noqa: E402
from model.default import default_model_path  # noqa: E402
from train.loop import train  # noqa: E402
from train.stream import StepStream  # noqa: E402
from train.metrics import binary_metrics  # noqa: E402
from train.predict import autocast, default_batch_tokens  # noqa: E402
from train.schedule import lr_at, total_steps  # noqa: E402

IGNORE = -100  # transformers' ignored label


def train_argv(model: Path, data: Path, out: Path, epochs: int, seed: int) -> list[str]:
    """The reference hyperparameters (r 64, α 64, lr 2e-4, batch 16), validating once, at the end. dev.csv's 8 rows
    with an empty answer are rows like the others, on both sides."""
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--group-col", "group",
            "--val-size", "0.2", "--rank", "64", "--alpha", "64", "--lr", "2e-4", "--epochs", str(epochs),
            "--batch-size", "16", "--quant", "none", "--max-len", "1024", "--eval-every", "1000000000",
            "--seed", str(seed)]


def run_ours(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    run_dir = train(args)
    total = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    return {"impl": "ours", "val_accuracy": final["accuracy"], "val_auroc": final["auroc"],
            "train_s": summary["wall_s"], "total_s": round(total, 1), "steps": summary["steps"],
            "train_rows": summary["train_rows"], "val_rows": summary["val_rows"],
            "peak_allocated_gb": summary["peak_gpu_allocated_gb"], "loss": args.loss, "run_dir": str(run_dir)}


def with_label_token(tokens: torch.Tensor, lengths: torch.Tensor, label_tokens: torch.Tensor, pad_id: int):
    """(input ids, attention mask, LM targets): each prompt followed by its label token, the only target."""
    rows = torch.arange(len(tokens))
    ids = torch.cat([tokens, torch.full((len(tokens), 1), pad_id)], dim=1)
    ids[rows, lengths] = label_tokens
    mask = (torch.arange(ids.shape[1]) <= lengths[:, None]).long()
    targets = torch.full_like(ids, IGNORE)
    targets[rows, lengths] = label_tokens
    return ids, mask, targets


@torch.no_grad()
def stack_p_true(model, table, label_ids: torch.Tensor, pad_id: int, max_tokens: int, device) -> np.ndarray:
    """P(True) from the logits of (False, True) at each prompt's last position."""
    model.eval()
    p_true = np.empty(len(table), dtype=np.float32)
    for indices in budget_batches(table.lengths, max_tokens):
        tokens, lengths, _ = collate(table, indices, pad_id)
        mask = (torch.arange(tokens.shape[1]) < lengths[:, None]).long()
        with autocast(device):
            logits = model(input_ids=tokens.to(device), attention_mask=mask.to(device), use_cache=False).logits
        last = logits[torch.arange(len(indices)), lengths.to(device) - 1][:, label_ids]
        p_true[indices] = torch.softmax(last.float(), dim=-1)[:, 1].cpu().numpy()
    return p_true


def run_stack(args: argparse.Namespace, device: torch.device) -> dict:
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    template = get_template(args.template)
    df = read_table(args.data, split="train", template=template, skip_bad_rows=args.skip_bad_rows)
    tokenizer = load_tokenizer(args.model)
    table = tokenize_table(df, tokenizer, template, args.max_len)
    labels = table_labels(df)
    train_idx, val_idx = split_train_val(df, args.val_size, args.seed, group_col=args.group_col)
    train_table, val_table = table.subset(train_idx), table.subset(val_idx)
    true_id, false_id = label_token_ids(template, tokenizer)
    label_ids = torch.tensor([false_id, true_id])

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model = stack_lora(model, args.rank, args.alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    last_step = total_steps(len(train_table), args.batch_size, 1, args.epochs)
    stream = StepStream(train_table.lengths, args.batch_size, 1, args.seed)  # our batches, in our order

    model.train()
    reset_peak(device)
    train_start = clock(device)
    for step in range(last_step):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, min(args.warmup_steps, last_step), last_step)
        tokens, lengths, classes = collate(train_table, next(stream)[0], tokenizer.pad_id)
        ids, mask, targets = (t.to(device) for t in with_label_token(tokens, lengths, label_ids[classes],
                                                                     tokenizer.pad_id))
        with autocast(device):
            loss = model(input_ids=ids, attention_mask=mask, labels=targets, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == last_step:
            print(f"stack step {step + 1}/{last_step}: loss {loss.item():.4f}", file=sys.stderr)
    train_s = clock(device) - train_start
    p_true = stack_p_true(model, val_table, label_ids.to(device), tokenizer.pad_id,
                          args.eval_batch_tokens or default_batch_tokens(device), device)
    metrics = binary_metrics(p_true, labels[val_idx])
    return {"impl": "stack", "val_accuracy": metrics["accuracy"], "val_auroc": metrics["auroc"],
            "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - start, 1), "steps": last_step,
            "train_rows": len(train_idx), "val_rows": len(val_idx), **peak_memory(device),
            "loss": "lm on the appended label token"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("ours", "stack", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(DEV_CSV), help="table with a group column (default: gsm8k_verify dev)")
    parser.add_argument("--model", help="HF-layout Llama folder (default: the converted SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="a random two-block model with the real tokenizer")
    parser.add_argument("--limit-rows", type=int, help="only the table's first N rows (smoke tests)")
    parser.add_argument("--out", help="our run folder (default: a temporary folder)")
    args = parser.parse_args()

    device = pick_device()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = tiny_model(tmp / "tiny") if args.tiny else Path(args.model) if args.model else default_model_path()
        data = Path(args.data)
        if args.limit_rows:
            data = tmp / data.name
            pd.read_csv(args.data, dtype=str, keep_default_na=False).head(args.limit_rows).to_csv(data, index=False)
        flags = run.parse_args(train_argv(model, data, Path(args.out) if args.out else tmp / "run", args.epochs,
                                          args.seed))
        common = {"model": str(model), "data": str(args.data), "limit_rows": args.limit_rows, "epochs": args.epochs,
                  "flags": {k: v for k, v in vars(flags).items() if k not in ("model", "data", "out")}, **env_info()}
        if args.impl in ("ours", "both"):
            emit({**run_ours(flags), **common})
            release(device)
        if args.impl in ("stack", "both"):
            emit({**run_stack(flags, device), **common})


if __name__ == "__main__":
    main()
