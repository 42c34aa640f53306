"""The training loop: accumulation, autocast, clipping, evaluation, checkpoints and resume."""
import contextlib
import json
import math
import os
import resource
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import (Template, collate, get_template, label_token_ids, read_table, split_train_val,
                  table_labels, tokenize_table, train_batch_order)
from data.errors import UserError
from lora import apply_lora, save_adapter
from model import load_llama, load_tokenizer
from model.default import cache_dir, default_model_path
from model.files import read_json
from train.checkpoint import load_checkpoint, save_checkpoint
from train.metrics import binary_metrics
from train.optim import AdamW
from train.plots import plot_run
from train.predict import attention_without_cudnn, predict_p_true
from train.schedule import lr_at, total_steps
from train.step import graphed_backward, optimizer_step

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "default"
COMPILED_PAD = 64  # compiled runs pad batches to a multiple of this: each new shape costs a compilation or a recording
OOM_HINT = ("lower --batch-size (raising --grad-accum keeps the effective batch), add --grad-checkpoint, "
            "or lower --max-len")


@dataclass
class Setup:
    """Everything a run or an inference needs, loaded once."""
    device: torch.device
    model_path: Path
    model: torch.nn.Module
    tokenizer: object
    template: Template
    label_ids: torch.Tensor  # (False, True) token ids: class 1 is True


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(args: Namespace, device: torch.device, template: Template) -> Setup:
    """Tokenizer, label tokens and the frozen base model (4-bit on request)."""
    model_path = Path(args.model) if args.model else default_model_path()
    if not model_path.is_dir():
        raise UserError(f"--model {model_path}: model folder does not exist")
    tokenizer = load_tokenizer(model_path)
    true_id, false_id = label_token_ids(template, tokenizer)
    quant = args.quant or ("nf4" if device.type == "cuda" else "none")
    dtype = torch.bfloat16 if device.type == "cuda" or quant == "nf4" else torch.float32
    model = load_llama(model_path, dtype=dtype, device=device, quantize=None if quant == "none" else quant)
    return Setup(device, model_path, model, tokenizer, template, torch.tensor([false_id, true_id], device=device))


class BatchStream:
    """Micro-batches of row indices, epoch after epoch; its position is part of a checkpoint. Under data
    parallelism each rank streams its own disjoint share (rank, world_size)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, epoch: int = 0, index: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = epoch, index
        self.order = self._epoch_order()

    def _epoch_order(self) -> list[np.ndarray]:
        return train_batch_order(self.lengths, self.batch_size, self.seed, self.epoch, self.rank, self.world_size)

    def __next__(self) -> np.ndarray:
        if self.index == len(self.order):
            self.epoch, self.index = self.epoch + 1, 0
            self.order = self._epoch_order()
        self.index += 1
        return self.order[self.index - 1]

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


def peak_memory_gb(device: torch.device) -> dict:
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"peak_host_rss_gb": round(host, 2), "peak_gpu_allocated_gb": gpu and round(gpu, 2)}


def new_run_dir(out: str | None) -> Path:
    run_dir = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if (run_dir / "config.json").exists():
        raise UserError(f"--out {run_dir}: a run already lives there (use --resume {run_dir} to continue it)")
    return run_dir


def train(args: Namespace) -> Path:
    """Fine-tunes LoRA adapters for the two-class judgement; returns the run folder."""
    if args.resume:
        run_dir = Path(args.resume)
        flags = read_json(run_dir / "config.json", f"--resume {run_dir}: no run there (config.json missing)")
        args = Namespace(**{**flags, "resume": str(run_dir)})
    template = get_template(args.template)
    device = pick_device()
    cuda_graphs = getattr(args, "cuda_graphs", False)  # runs saved before the flag existed lack it
    if cuda_graphs and device.type != "cuda":  # before the table is read, which may take minutes
        raise UserError("--cuda-graphs needs a CUDA GPU")
    data_path = Path(args.data) if args.data else DEFAULT_DATA_DIR / "train.csv"
    df = read_table(data_path, split="train", template=template, skip_bad_rows=args.skip_bad_rows)
    if not args.resume:
        run_dir = new_run_dir(args.out)
    torch.manual_seed(args.seed)

    setup = load_base(args, device, template)
    if not args.resume:  # created only once the inputs have proven good
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", vars(args))
    table = tokenize_table(df, setup.tokenizer, template, args.max_len, cache_dir=cache_dir() / "tokens")
    labels = table_labels(df)
    train_idx, val_idx = split_train_val(df, args.val_size, args.seed, group_col=args.group_col)
    train_table, val_table, val_labels = table.subset(train_idx), table.subset(val_idx), labels[val_idx]
    print(f"{data_path}: {len(train_idx)} training rows, {len(val_idx)} validation rows")

    n_blocks = len(setup.model.model.layers)
    top_blocks = list(range(max(0, n_blocks - args.lora_layers), n_blocks)) if args.lora_layers else None
    model = apply_lora(setup.model, args.rank, args.alpha, dropout=args.lora_dropout, layers=top_blocks)
    model.grad_checkpoint = args.grad_checkpoint
    compiled = args.compile or cuda_graphs
    if compiled:
        model.compile_blocks()
    pad_to = COMPILED_PAD if compiled else 1
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    graphs = graphed_backward(model, params, setup.label_ids, args.loss) if cuda_graphs else None
    last_step = args.max_steps or total_steps(len(train_table), args.batch_size, args.grad_accum, args.epochs)
    files = {name: run_dir / name for name in ("metrics.jsonl", "checkpoint", "adapter", "adapter_best")}

    progress = {"step": 0, "epoch": 0, "index": 0, "best_accuracy": -1.0, "wall_s": 0.0}
    if args.resume:
        progress = load_checkpoint(files["checkpoint"], model, optimizer)
    stream = BatchStream(train_table.lengths, args.batch_size, args.seed, progress["epoch"], progress["index"])

    def checkpoint() -> None:
        save_checkpoint(files["checkpoint"], model, optimizer, progress)

    def attention_backends() -> contextlib.AbstractContextManager:
        # each eager batch has a shape of its own, for which cuDNN attention would first build a plan
        return contextlib.nullcontext() if compiled else attention_without_cudnn(device)

    def evaluate() -> dict:
        with attention_backends():
            p_true = predict_p_true(model, val_table, setup.label_ids, setup.tokenizer.pad_id,
                                    args.eval_batch_tokens, device, pad_to_multiple=pad_to)
        metrics = {"step": progress["step"], "split": "val", **binary_metrics(p_true, val_labels)}
        append_jsonl(files["metrics.jsonl"], metrics)
        if metrics["accuracy"] > progress["best_accuracy"]:
            progress["best_accuracy"] = metrics["accuracy"]
            save_adapter(model, files["adapter_best"], base_model_name_or_path=str(setup.model_path))
        return metrics

    model.train()
    bar = tqdm(total=last_step, initial=progress["step"], desc="train", dynamic_ncols=True)
    started = time.perf_counter() - progress["wall_s"]
    metrics = {}
    try:
        while progress["step"] < last_step:
            step = progress["step"]
            lr = lr_at(step, args.lr, min(args.warmup_steps, last_step), last_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_started = time.perf_counter()
            batches = [collate(train_table, next(stream), setup.tokenizer.pad_id, pad_to)
                       for _ in range(args.grad_accum)]
            tokens_seen = sum(int(lengths.sum()) for _, lengths, _ in batches)  # on the host: no device sync
            micro_batches = [[t.to(device) for t in batch] for batch in batches]
            with attention_backends():
                loss, grad_norm = optimizer_step(model, optimizer, micro_batches, setup.label_ids, args.loss,
                                                 args.max_grad_norm, graphs)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
                raise UserError(f"{what} at step {step + 1}; the last good checkpoint is in "
                                f"{files['checkpoint']} (try a lower --lr)")
            progress.update(step=step + 1, wall_s=time.perf_counter() - started, **stream.position())
            tokens_per_s = tokens_seen / (time.perf_counter() - step_started)
            append_jsonl(files["metrics.jsonl"], {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                                  "tokens_per_s": round(tokens_per_s, 1), "epoch": stream.epoch})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)
            if progress["step"] % args.eval_every == 0 or progress["step"] == last_step:
                metrics = evaluate()
                bar.write(f"step {progress['step']}: val accuracy {metrics['accuracy']:.4f} "
                          f"auroc {metrics['auroc'] if metrics['auroc'] is None else round(metrics['auroc'], 4)}")
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        bar.close()
        raise UserError(f"interrupted at step {progress['step']}; checkpoint saved, continue with "
                        f"`python run.py train --resume {run_dir}`") from None
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA out of memory at step {progress['step'] + 1}: {OOM_HINT}") from None
    bar.close()

    save_adapter(model, files["adapter"], base_model_name_or_path=str(setup.model_path))
    plot_run(files["metrics.jsonl"], run_dir / "training.png")
    summary = {"flags": vars(args), "model": str(setup.model_path), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "steps": progress["step"], "train_rows": len(train_idx), "val_rows": len(val_idx),
               "truncated_rows": table.n_truncated, "wall_s": round(progress["wall_s"], 1),
               **peak_memory_gb(device), "final": metrics, "best_val_accuracy": progress["best_accuracy"]}
    write_json(run_dir / "summary.json", summary)
    print(f"run saved in {run_dir}: adapter/, adapter_best/, metrics.jsonl, training.png, summary.json")
    return run_dir
