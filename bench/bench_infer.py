"""Inference on a realistic test table: rows/s of P(True) for ours beside transformers + peft + bitsandbytes.

The table has 10,000 rows shaped like ../shared/data/gsm8k_verify/dev.csv under the with_solution template and
Meta's Llama-3 tokenizer: its question groups drawn with replacement, each copy with its rows' lengths and what they
share (the template's instruction, then random tokens for the question), the rest random. Both models are the 4-bit
checkpoint with a fresh LoRA (B = 0) on the seven projections. Ours runs train.predict.predict_p_true as `run.py
infer` does by default (compiled blocks, rows packed into lines of each budget given, rows that begin alike sharing
their common beginning), packed without sharing (key ours_unshared), and as it did before packing
(`--packing off --eager`: token-budget batches, each padded to its longest row, attention without cuDNN); the stack runs
batches of 32 rows in input order, left-padded with an attention mask, last position only (logits_to_keep=1).
P(True) comes from the same two label-token logits.
Target: >= 1.5x the stack's rows/s, same predictions.

    python bench/bench_infer.py [--checkpoint DIR] [--tiny] [--impl ours|stack|both] [--rows 10000]
        [--budgets 32768,65536] [--stack-batch 32] [--fp8]
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (DEV_CSV, checkpoint_path, clock, emit, env_info, implementations, load_stack,  # noqa: E402
                          parser, peak_memory, pick_device, ratio, release, reset_peak, stack_lora)
from data import Tokenized, get_template, label_token_ids, read_table, tokenize_table  # noqa: E402
from data.prefixes import common_prefix  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import LlamaConfig, load_llama, load_tokenizer  # noqa: E402
from model.fp8 import use_fp8  # noqa: E402
from train.fastpath import FastPath  # noqa: E402
from train.predict import attention_without_cudnn, autocast, predict_p_true  # noqa: E402

WARMUP_ROWS = 64


def llama3_tokenizer(path: str | None = None):
    """Meta's Llama-3 tokenizer: `path`, or the tokenizer.model the llama-models package ships."""
    if path is None:
        import llama_models

        path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    return load_tokenizer(path)


def realistic_table(tokenizer, rows: int, vocab_size: int, seed: int) -> Tokenized:
    """`rows` rows shaped like dev.csv's with_solution prompts: its question groups drawn with replacement; a copy
    keeps the real tokens all dev.csv's rows begin with (BOS, the instruction), random tokens as long as what its
    group's rows share beyond that (the question), and each row's own length, its remainder random."""
    template = get_template("with_solution")
    dev = read_table(DEV_CSV, "train", template)
    dev_table = tokenize_table(dev, tokenizer, template, max_len=100_000)
    everyone = dev_table.row(0)
    for i in range(len(dev_table)):
        everyone = everyone[: common_prefix(everyone, dev_table.row(i))]
    groups = []  # (tokens its rows share, their lengths)
    for members in dev.groupby("group", sort=True).indices.values():
        shared = min(int(dev_table.lengths[members].min()) - 1, min(
            (common_prefix(dev_table.row(members[0]), dev_table.row(m)) for m in members[1:]), default=0))
        groups.append((max(shared, len(everyone)), dev_table.lengths[members]))
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < rows:
        shared, lengths = groups[rng.integers(len(groups))]
        question = rng.integers(0, vocab_size, shared - len(everyone))
        out += [np.concatenate([everyone, question, rng.integers(0, vocab_size, n - shared)]) for n in lengths]
    out = [out[i] for i in rng.permutation(len(out))[:rows]]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in out])]).astype(np.int64)
    return Tokenized(np.concatenate(out).astype(np.int32), offsets, None, np.zeros(0, dtype=np.int64))


def ours_p_true(model: torch.nn.Module, table: Tokenized, label_ids: torch.Tensor, pad_id: int, budget: int,
                device: torch.device, packed: bool, share_prefixes: bool = True) -> np.ndarray:
    """As `run.py infer` scores: packed lines of one shape (rows that begin alike sharing their beginning, or not),
    or token-budget batches with attention without cuDNN (every batch has its own shape)."""
    if packed:
        return predict_p_true(model, table, label_ids, pad_id, budget, device, pack=True,
                              share_prefixes=share_prefixes)
    with attention_without_cudnn(device):
        return predict_p_true(model, table, label_ids, pad_id, budget, device)


@torch.no_grad()
def stack_p_true(model: torch.nn.Module, table: Tokenized, label_ids: torch.Tensor, pad_id: int, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """P(True) per row: input-order batches, left-padded, positions counted from each row's first real token."""
    p_true = np.empty(len(table), dtype=np.float32)
    for start in range(0, len(table), batch_size):
        rows = np.arange(start, min(start + batch_size, len(table)))
        lengths = table.lengths[rows]
        width = int(lengths.max())
        is_token = np.arange(width) >= (width - lengths)[:, None]
        tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
        tokens[is_token] = table.subset(rows).ids
        mask = torch.from_numpy(is_token).long().to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with autocast(device):
            logits = model(input_ids=torch.from_numpy(tokens).to(device), attention_mask=mask, position_ids=positions,
                           logits_to_keep=1, use_cache=False).logits[:, -1]
        p_true[rows] = torch.softmax(logits[:, label_ids].float(), dim=-1)[:, 1].cpu().numpy()
    return p_true


def timed(predict, table: Tokenized, device: torch.device) -> tuple[np.ndarray, dict]:
    warm_start = clock(device)
    predict(table.subset(np.arange(min(WARMUP_ROWS, len(table) // 4 + 1))))  # compiles; kernels and allocator warm
    warmup_s = clock(device) - warm_start
    reset_peak(device)
    start = clock(device)
    p_true = predict(table)
    seconds = clock(device) - start
    return p_true, {"rows_per_s": round(len(table) / seconds, 1),
                    "tokens_per_s": round(int(table.lengths.sum()) / seconds),
                    "seconds": round(seconds, 1), "warmup_s": round(warmup_s, 1), **peak_memory(device)}


def agreement(p: np.ndarray, reference: np.ndarray) -> dict:
    delta = np.abs(p - reference)
    return {"same_decision": round(float(np.mean((p >= 0.5) == (reference >= 0.5))), 5),
            "max_abs_dp": round(float(delta.max()), 5), "mean_abs_dp": round(float(delta.mean()), 6)}


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="rows of the test table (default 10000; 64 with --tiny)")
    p.add_argument("--budgets", help="comma-separated token budgets for ours (default 32768,65536; 4096 with --tiny)")
    p.add_argument("--stack-batch", type=int, default=32, help="rows per batch for the stack")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank of the fresh adapter; 0 for the bare model")
    p.add_argument("--alpha", type=float, default=64)
    p.add_argument("--fp8", action="store_true",
                   help="ours, packed: then again with the 4-bit base's products in FP8 (results keyed ours_fp8)")
    p.add_argument("--tokenizer", help="Meta's Llama-3 tokenizer.model (default: the one llama-models ships)")
    args = p.parse_args()
    rows = args.rows or (64 if args.tiny else 10_000)
    budgets = [int(b) for b in (args.budgets or ("4096" if args.tiny else "32768,65536")).split(",")]
    path, device = checkpoint_path(args), pick_device()
    tokenizer = llama3_tokenizer(args.tokenizer)
    true_id, false_id = label_token_ids(get_template("with_solution"), tokenizer)
    label_ids = torch.tensor([false_id, true_id], device=device)
    table = realistic_table(tokenizer, rows, LlamaConfig.from_json(path / "config.json").vocab_size, args.seed)
    torch.manual_seed(args.seed)

    lengths = table.lengths
    record = {"bench": "infer", "checkpoint": str(path), "device": str(device), "rows": rows, "lora_rank": args.rank,
              "fp8": args.fp8,
              "tokens": int(lengths.sum()), "mean_tokens": round(float(lengths.mean()), 1),
              "max_tokens": int(lengths.max())}
    predictions = {}
    for impl in implementations(args):
        if impl == "ours":
            model = load_llama(path, dtype=torch.bfloat16, device=device, quantize="nf4", head_rows=label_ids.tolist())
            if args.rank:
                apply_lora(model, args.rank, args.alpha, verbose=False)
            predictions["unpacked"], record["ours_unpacked_eager"] = timed(
                lambda t: ours_p_true(model, t, label_ids, tokenizer.pad_id, budgets[0], device, packed=False),
                table, device)
            print(f"ours, unpacked eager, budget {budgets[0]}: {record['ours_unpacked_eager']}", file=sys.stderr)
            fast = FastPath(model, device, compile=device.type == "cuda")
            for key, share in (("ours_unshared", False), ("ours", True)) + ((("ours_fp8", True),) if args.fp8 else ()):
                if key == "ours_fp8":  # the same packed runs again, the base's products in FP8
                    use_fp8(model)
                record[key] = {}
                for budget in budgets:
                    predictions[key, budget], record[key][budget] = timed(
                        lambda t: fast.run(lambda: ours_p_true(model, t, label_ids, tokenizer.pad_id, budget, device,
                                                               packed=True, share_prefixes=share)), table, device)
                    record[key][budget]["vs_unpacked"] = agreement(predictions[key, budget], predictions["unpacked"])
                    print(f"{key}, packed, compiled: {fast.compiled}, budget {budget}: {record[key][budget]}",
                          file=sys.stderr)
        else:
            model = load_stack(path, device)
            if args.rank:
                model = stack_lora(model, args.rank, args.alpha)
            model.eval()
            predictions["stack"], record["stack"] = timed(
                lambda t: stack_p_true(model, t, label_ids, tokenizer.pad_id, args.stack_batch, device), table, device)
            record["stack"]["batch_rows"] = args.stack_batch
            print(f"stack: {record['stack']}", file=sys.stderr)
        del model
        release(device)
    if "ours" in record:
        best = max(budgets, key=lambda b: record["ours"][b]["rows_per_s"])
        record["ours_best_budget"] = best
        if "stack" in record:
            for budget in budgets:
                record["ours"][budget]["vs_stack"] = agreement(predictions["ours", budget], predictions["stack"])
            record["rows_per_s_ratio_ours_to_stack"] = ratio(record["ours"][best]["rows_per_s"],
                                                             record["stack"]["rows_per_s"])
    emit({**record, **env_info()})


if __name__ == "__main__":
    main()
