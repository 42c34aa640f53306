"""The training loop: accumulation, autocast, clipping, evaluation, checkpoints, resume and clean stops."""
import contextlib
import math
import resource
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError
from common.files import append_jsonl, write_json
from data import Tokenized, collate, get_template, read_table, split_train_val, table_labels, tokenize_table
from lora import apply_lora, save_adapter
from model.default import cache_dir
from train.checkpoint import load_checkpoint, save_checkpoint
from train.interrupt import StopRequest, stop_requests
from train.metrics import binary_metrics
from train.optim import AdamW
from train.plots import plot_run
from train.predict import attention_without_cudnn, default_batch_tokens, predict_p_true
from train.resume import resumed_flags
from train.runfolder import RunFolder, check_new_run_path, file_sha256, manifest, write_config
from train.schedule import lr_at, total_steps
from train.setup import Base, pick_device, resolve_base
from train.step import graphed_backward, optimizer_step
from train.stream import StepStream

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "default"
COMPILED_PAD = 64  # compiled runs pad batches to a multiple of this: each new shape costs a compilation or a recording
OOM_HINT = ("lower --batch-size (raising --grad-accum keeps the effective batch), add --grad-checkpoint, "
            "or lower --max-len")


def peak_memory_gb(device: torch.device) -> dict:
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"peak_host_rss_gb": round(host, 2), "peak_gpu_allocated_gb": gpu and round(gpu, 2)}


def absolute_paths(flags: dict) -> dict:
    """Paths as absolute, so that a run resumes and scores from any working directory."""
    paths = {key: str(Path(flags[key]).absolute()) for key in ("model", "data", "out") if flags.get(key)}
    if flags.get("template") and Path(flags["template"]).is_file():
        paths["template"] = str(Path(flags["template"]).absolute())
    return {**flags, **paths}


def train(args: Namespace) -> Path:
    """Fine-tunes LoRA adapters for the two-class judgement; returns the run folder."""
    if not getattr(args, "resume", None):
        return _prepare_and_run(args, None)
    folder = RunFolder.open(Path(args.resume))
    try:
        return _prepare_and_run(args, folder)
    finally:
        folder.release()


def _prepare_and_run(args: Namespace, folder: RunFolder | None) -> Path:
    config = None
    if folder is not None:
        config = folder.read_config()
        flags, changes = resumed_flags(config["flags"], vars(args))
        flags["out"] = str(folder.path)  # the folder may have moved since
    else:
        flags = absolute_paths({**vars(args), "out": args.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))})
    args = Namespace(**flags)

    # Every check that needs no weights, before any are read.
    template = get_template(args.template)
    device = pick_device()
    if args.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU")
    eval_budget = args.eval_batch_tokens or max(default_batch_tokens(device), args.max_len)
    if eval_budget < args.max_len:
        raise UserError(f"--eval-batch-tokens {eval_budget} is below --max-len {args.max_len}: the longest "
                        "validation row would not fit one batch")
    if folder is None:
        check_new_run_path(Path(args.out))
    data_path = Path(args.data) if args.data else DEFAULT_DATA_DIR / "train.csv"
    df = read_table(data_path, split="train", template=template, skip_bad_rows=args.skip_bad_rows)
    data_sha256 = file_sha256(data_path)
    if config is not None and config["manifest"]["data_sha256"] != data_sha256:
        raise UserError(f"--resume {folder.path}: {data_path} changed since the run started (its SHA-256 differs); "
                        "the split and data order would change — start a new run")
    base = resolve_base(args.model, args.quant, template, device)
    args.quant = base.quantization  # recorded resolved, so that infer loads the same base on any device
    train_idx, val_idx = split_train_val(df, args.val_size, args.seed, group_col=args.group_col)
    table = tokenize_table(df, base.tokenizer, template, args.max_len, cache_dir=cache_dir() / "tokens")
    train_table, val_table, val_labels = table.subset(train_idx), table.subset(val_idx), table_labels(df)[val_idx]
    last_step = args.max_steps or total_steps(len(train_table), args.batch_size, args.grad_accum, args.epochs)

    if folder is None:
        folder = RunFolder.create(Path(args.out))
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        config = {"manifest": manifest(data_path, str(device), gpu, base.precision, base.quantization), "resumes": []}
    else:
        config["resumes"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": changes})
    write_config(folder, vars(args), config["manifest"], config["resumes"])
    print(f"{data_path}: {len(train_idx)} training rows, {len(val_idx)} validation rows; run folder {folder.path}")
    with stop_requests() as stop:
        try:
            return _run(args, folder, base, train_table, val_table, val_labels, last_step, stop)
        except KeyboardInterrupt:
            if folder.discard_if_unsaved():
                raise UserError(f"interrupted before the first checkpoint; {folder.path} was removed") from None
            raise UserError(f"stopped at once; the last checkpoint is in {folder.checkpoint} "
                            f"(continue with `python run.py train --resume {folder.path}`)") from None
        except BaseException:
            folder.discard_if_unsaved()
            raise
        finally:
            folder.release()


def _run(args: Namespace, folder: RunFolder, base: Base, train_table: Tokenized, val_table: Tokenized,
         val_labels: np.ndarray, last_step: int, stop: StopRequest) -> Path:
    device = base.device
    torch.manual_seed(args.seed)
    model = base.load_model()
    n_blocks = len(model.model.layers)
    top_blocks = list(range(max(0, n_blocks - args.lora_layers), n_blocks)) if args.lora_layers else None
    model = apply_lora(model, args.rank, args.alpha, dropout=args.lora_dropout, layers=top_blocks)
    model.grad_checkpoint = args.grad_checkpoint
    compiled = args.compile or args.cuda_graphs
    if compiled:
        model.compile_blocks()
    pad_to = COMPILED_PAD if compiled else 1
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    graphs = graphed_backward(model, params, base.label_ids, args.loss) if args.cuda_graphs else None

    progress = {"step": 0, "epoch": 0, "index": 0, "best_accuracy": -1.0, "wall_s": 0.0}
    if folder.has_checkpoint():
        progress = load_checkpoint(folder.checkpoint, model, optimizer)
        if progress["step"] >= last_step:
            raise UserError(f"--resume {folder.path}: the run already finished at step {progress['step']} "
                            f"(pass a larger --max-steps or --epochs to train further)")
        print(f"resuming at step {progress['step']} of {last_step}")
    stream = StepStream(train_table.lengths, args.batch_size, args.grad_accum, args.seed, progress["epoch"],
                        progress["index"])

    def attention_backends() -> contextlib.AbstractContextManager:
        # each eager batch has a shape of its own, for which cuDNN attention would first build a plan
        return contextlib.nullcontext() if compiled else attention_without_cudnn(device)

    def evaluate() -> dict:
        with attention_backends():
            p_true = predict_p_true(model, val_table, base.label_ids, base.tokenizer.pad_id,
                                    args.eval_batch_tokens, device, pad_to_multiple=pad_to)
        if not np.isfinite(p_true).all():
            raise UserError(f"evaluation at step {progress['step']}: {np.count_nonzero(~np.isfinite(p_true))} "
                            f"validation rows got a non-finite P(True) (try a lower --lr)")
        metrics = {"step": progress["step"], "split": "val", **binary_metrics(p_true, val_labels)}
        append_jsonl(folder.metrics, metrics)
        if metrics["accuracy"] > progress["best_accuracy"]:
            progress["best_accuracy"] = metrics["accuracy"]
            save_adapter(model, folder.adapter_best, base_model_name_or_path=str(base.model_path))
        return metrics

    model.train()
    bar = tqdm(total=last_step, initial=progress["step"], desc="train", dynamic_ncols=True)
    started = time.perf_counter() - progress["wall_s"]
    metrics = {}
    stop.deferred = True  # from here a signal stops the loop at the next step boundary, with a checkpoint
    try:
        while progress["step"] < last_step:
            step = progress["step"]
            lr = lr_at(step, args.lr, min(args.warmup_steps, last_step), last_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_started = time.perf_counter()
            batches = [collate(train_table, rows, base.tokenizer.pad_id, pad_to) for rows in next(stream)]
            tokens_seen = sum(int(lengths.sum()) for _, lengths, _ in batches)  # on the host: no device sync
            micro_batches = [[t.to(device) for t in batch] for batch in batches]
            with attention_backends():
                loss, grad_norm = optimizer_step(model, optimizer, micro_batches, base.label_ids, args.loss,
                                                 args.max_grad_norm, graphs)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
                kept = (f"the last good checkpoint is in {folder.checkpoint}" if folder.has_checkpoint()
                        else "no checkpoint had been saved, so the run folder was removed")
                raise UserError(f"{what} at step {step + 1}; {kept} (try a lower --lr)")
            progress.update(step=step + 1, wall_s=time.perf_counter() - started, **stream.position())
            tokens_per_s = tokens_seen / (time.perf_counter() - step_started)
            append_jsonl(folder.metrics, {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                          "tokens_per_s": round(tokens_per_s, 1), "epoch": stream.epoch})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)
            if progress["step"] % args.eval_every == 0 or progress["step"] == last_step:
                metrics = evaluate()
                bar.write(f"step {progress['step']}: val accuracy {metrics['accuracy']:.4f} "
                          f"auroc {metrics['auroc'] if metrics['auroc'] is None else round(metrics['auroc'], 4)}")
                save_checkpoint(folder.checkpoint, model, optimizer, progress)
            elif stop.requested:
                save_checkpoint(folder.checkpoint, model, optimizer, progress)
            if stop.requested and progress["step"] < last_step:
                raise UserError(f"{stop.signal_name} at step {progress['step']}: checkpoint saved; continue with "
                                f"`python run.py train --resume {folder.path}`")
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA out of memory at step {progress['step'] + 1}: {OOM_HINT}") from None
    finally:
        bar.close()

    save_adapter(model, folder.adapter, base_model_name_or_path=str(base.model_path))
    plot_run(folder.metrics, folder.plot)
    summary = {"flags": vars(args), "model": str(base.model_path), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "steps": progress["step"], "train_rows": len(train_table), "val_rows": len(val_table),
               "truncated_rows": train_table.n_truncated + val_table.n_truncated,
               "wall_s": round(progress["wall_s"], 1), **peak_memory_gb(device), "final": metrics,
               "best_val_accuracy": progress["best_accuracy"]}
    write_json(folder.summary, summary)
    print(f"run saved in {folder.path}: adapter/, adapter_best/, metrics.jsonl, training.png, summary.json")
    return folder.path
