"""The training loop: accumulation, autocast, clipping, evaluation, checkpoints, resume and clean stops."""
import contextlib
import json
import math
import resource
import signal
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from common.errors import Interrupted, UserError
from common.files import append_jsonl, atomic_write, read_json_lines, write_json
from data import (LINE_QUANTUM, LineShape, Tokenized, get_template, padded_length, read_table, split_tokens,
                  split_train_val, table_labels, tokenize_table)
from data.answers import question_key
from lora import apply_lora, save_adapter
from model.default import cache_dir
from model.llama import flash_varlen_available
from train.batch import Rows, packed_rows, padded_rows
from train.calibrate import save_decision
from train.consensus import fit_judge
from train.checkpoint import load_checkpoint, rng_state, save_checkpoint, saved_progress, set_rng_state
from train.distributed import GradientSync, World, broadcast_training_state, joined_world, scoring_share
from train.fastpath import FastPath
from train.interrupt import StopRequest, stop_requests
from train.metrics import binary_metrics
from train.optim import AdamW
from train.plots import plot_run
from train.predict import attention_without_cudnn, predict_p_true
from train.resume import resumed_flags
from train.runfolder import RunFolder, check_new_run_path, file_sha256, manifest, write_config
from train.runlog import RunLog
from train.schedule import lr_at, total_steps
from train.setup import Base, pick_device, resolve_base
from train.step import launch_optimizer_step, zero_grad
from train.stream import StepStream

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "default"
COMPILED_PAD = 64  # compiled unpacked runs pad batches to a multiple of this: each new shape costs a compilation
OOM_HINT = ("lower --batch-size (raising --grad-accum keeps the effective batch), add --grad-checkpoint, "
            "or lower --max-len (packed rows: --pack-tokens)")


def peak_memory_gb(device: torch.device) -> dict:
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"peak_host_rss_gb": round(host, 2), "peak_gpu_allocated_gb": gpu and round(gpu, 2)}


def default_packing(device: torch.device) -> str:
    """On where flash attention's variable-length kernel runs (CUDA, Ampere or newer). Off on a CPU: there packed
    lines ran at 137 real tokens/s against 301 for padded batches (SmolLM2, the embedded preset, 2 cores;
    bench/RESULTS.md), the per-row attention and larger tensors costing more than the padding saved. Off on an older
    GPU (a T4) too, where a line's attention would loop over its rows on the host, out of reach of CUDA graphs."""
    return "on" if flash_varlen_available(device) else "off"


def default_pack_tokens(device: torch.device, hidden_size: int, max_len: int) -> int:
    """Tokens per packed line: 4096 for a large model on a GPU (hidden size 2048 and up: what the 8B's recomputed
    activations leave room for in 15 GB), 16384 for a small one; 2048 on a CPU (where a larger batch outgrows the
    caches); at least --max-len."""
    return max(max_len, (16384 if hidden_size < 2048 else 4096) if device.type == "cuda" else 2048)


def fits_lines(step_tokens: float, pack_tokens: int) -> bool:
    """Whether a step's rows are cut to one line of their own (data.LineShape.fit): where a mean step, and a
    quarter more, fills at most a line. Its lines then vary in length from step to step, and the blocks compile
    for any length at once."""
    return 1.25 * step_tokens <= pack_tokens


def whole_questions(df: pd.DataFrame, train_idx: np.ndarray, val_idx: np.ndarray, say: bool,
                    group_col: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The validation rows' questions and answers, for fitting the consensus of a question's candidates. A question
    that also has candidates among the training rows has only part of them here, so its rows count as questions
    of their own, kept out of the fit (a --group-col keeps a question's candidates on one side)."""
    keys = np.array([question_key(q) for q in df["question"]], dtype=object)
    split = pd.Series(keys[val_idx]).isin(set(keys[train_idx])).to_numpy()  # hashed, not sorted
    if say and split.any():
        why = (f"the same question text under another {group_col}" if group_col
               else "pass --group-col to keep a question's candidates on one side")
        print(f"note: {int(split.sum())} validation rows ask questions that training rows ask too ({why}); the "
              f"consensus of answers is fitted without them")
    questions = df["question"].to_numpy()[val_idx].astype(object)
    questions[split] = [f"\x00split {i}" for i in np.flatnonzero(split)]  # a question of its own each
    return questions, df["answer"].to_numpy()[val_idx]


def trim_metrics(metrics: Path, step: int) -> None:
    """Drops the records of steps after `step` (logged before a crash, and trained again on resume)."""
    if metrics.is_file():
        kept = [r for r in read_json_lines(metrics) if r.get("step", 0) <= step]
        atomic_write(metrics, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))


def improves(metric: str, value: float | None, best: float | None) -> bool:
    """Whether `value` of the validation `metric` beats `best` (None: nothing yet); log loss falls, the rest rise,
    and a None value (AUROC with one class, log loss of scores outside [0, 1]) never wins."""
    if value is None:
        return False
    return best is None or (value < best if metric == "log_loss" else value > best)


def patience_ran_out(progress: dict, patience: int | None) -> bool:
    return patience is not None and progress.get("stale_evals", 0) >= patience


def absolute_paths(flags: dict) -> dict:
    """Paths as absolute, so that a run resumes and scores from any working directory."""
    paths = {key: str(Path(flags[key]).absolute()) for key in ("model", "data", "extra_data", "out") if flags.get(key)}
    if flags.get("template") and Path(flags["template"]).is_file():
        paths["template"] = str(Path(flags["template"]).absolute())
    return {**flags, **paths}


def train(args: Namespace) -> Path:
    """Fine-tunes LoRA adapters for the two-class judgement; returns the run folder. Under torchrun, data-parallel
    over its processes, rank 0 alone holding and writing the run folder."""
    with joined_world(pick_device()) as world:
        if not getattr(args, "resume", None):
            return _prepare_and_run(args, None, world)
        folder = RunFolder.open(Path(args.resume)) if world.main else None
        try:
            return _prepare_and_run(args, folder, world)
        finally:
            if folder is not None:
                folder.release()


def _prepare_and_run(args: Namespace, folder: RunFolder | None, world: World) -> Path:
    """`folder`: the run to resume (rank 0; None elsewhere, and for a new run)."""
    resuming = bool(getattr(args, "resume", None))
    config = world.broadcast_object(folder.read_config() if folder is not None else None)
    if resuming:
        given = dict(vars(args))
        flags, changes = resumed_flags(config["flags"], given, given.pop("defaults", None))
        flags["out"] = world.broadcast_object(str(folder.path) if folder is not None else None)  # it may have moved
    else:
        out = args.out or world.broadcast_object(str(Path("runs") / time.strftime("%Y%m%d-%H%M%S")))
        flags = absolute_paths({**{k: v for k, v in vars(args).items() if k != "defaults"}, "out": out})
    args = Namespace(**flags)

    # Every check that needs no weights, before any are read.
    template = get_template(args.template)
    device = world.device
    if args.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU")
    if args.cuda_graphs and args.eager:
        raise UserError("--cuda-graphs and --eager contradict each other")
    args.packing = args.packing or default_packing(device)
    if args.packing == "off" and args.grad_accum % world.size:  # packed, a step's rows are shared out by tokens
        raise UserError(f"--grad-accum {args.grad_accum}: {world.size} processes cannot share its micro-batches evenly "
                        f"with --packing off (a step is --batch-size x --grad-accum rows on any number of processes; "
                        f"pass a multiple of {world.size}, or --packing on)")
    for flag, budget in (("--eval-batch-tokens", args.eval_batch_tokens), ("--pack-tokens", args.pack_tokens)):
        if budget is not None and budget < args.max_len:
            raise UserError(f"{flag} {budget} is below --max-len {args.max_len}: the longest row would not fit")
    if not resuming and world.main:
        check_new_run_path(Path(args.out))
    data_path = Path(args.data) if args.data else DEFAULT_DATA_DIR / "train.csv"
    df = read_table(data_path, split="train", template=template, skip_bad_rows=args.skip_bad_rows)
    data_sha256 = file_sha256(data_path)
    extra = None
    if args.extra_data:
        extra = read_table(Path(args.extra_data), split="train", template=template, skip_bad_rows=args.skip_bad_rows)
        extra_sha256 = file_sha256(Path(args.extra_data))
        if extra_sha256 == data_sha256:
            raise UserError(f"--extra-data {args.extra_data}: the same table as --data (its rows would be validated "
                            f"on and trained on)")
        data_sha256 += "+" + extra_sha256  # the extra table is part of the data
    if resuming and config["manifest"]["data_sha256"] != data_sha256:
        tables = f"{data_path} or {args.extra_data}" if args.extra_data else str(data_path)
        raise UserError(f"--resume {args.out}: {tables} changed since the run started (its SHA-256 differs); "
                        "the split and data order would change — start a new run")
    base = resolve_base(args.model, args.quant, template, device, args.precision, fp8=args.fp8 == "on")
    args.quant, args.precision = base.quantization, base.numerics.name  # recorded resolved: infer loads the same
    train_idx, val_idx = split_train_val(df, args.val_size, args.seed, group_col=args.group_col)
    if extra is not None:  # training rows only: validation stays rows of --data, and no question of it is trained on
        asked = extra["question"].map(question_key).isin(set(df["question"].iloc[val_idx].map(question_key))).to_numpy()
        if asked.any() and world.main:
            print(f"note: {args.extra_data}: {int(asked.sum())} rows ask a validation question of {data_path}; "
                  f"they are left out of training")
        extra = extra[~asked]
        train_idx = np.concatenate([train_idx, len(df) + np.arange(len(extra))])
        df = pd.concat([df, extra], ignore_index=True)
    if len(train_idx) < world.size:
        raise UserError(f"{data_path}: {len(train_idx)} training rows for {world.size} processes (each needs rows)")
    table = tokenize_table(df, base.tokenizer, template, args.max_len, cache_dir=cache_dir() / "tokens")
    train_table, val_table, val_labels = table.subset(train_idx), table.subset(val_idx), table_labels(df)[val_idx]
    val_candidates = whole_questions(df, train_idx, val_idx, world.main, args.group_col)
    last_step = args.max_steps or total_steps(len(train_table), args.batch_size, args.grad_accum, args.epochs)
    args.pack_tokens = args.pack_tokens or default_pack_tokens(device, base.hidden_size, args.max_len)

    if world.main and not resuming:
        folder = RunFolder.create(Path(args.out))
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        config = {"manifest": manifest(data_sha256, str(device), gpu, base.precision, base.quantization,
                                       world.size), "resumes": []}
        write_config(folder, vars(args), config["manifest"], config["resumes"])
    elif world.main:
        saved = saved_progress(folder.checkpoint)
        done = saved["step"]
        # summary.json is the last file a run writes: without it (or without adapter/), the final phase is redone
        finished = folder.summary.is_file() and folder.adapter.is_dir()
        if done >= last_step and finished:
            raise UserError(f"--resume {folder.path}: the run already finished at step {done} "
                            f"(pass a larger --max-steps or --epochs to train further)")
        if done > last_step:
            raise UserError(f"--resume {folder.path}: its checkpoint is at step {done}, past the {last_step} steps "
                            f"asked (pass a --max-steps or --epochs of at least {done} steps)")
        if patience_ran_out(saved, args.patience) and finished:
            raise UserError(f"--resume {folder.path}: the run stopped early at step {done} after "
                            f"{saved['stale_evals']} evaluations without a better {args.select_by} "
                            f"(pass a larger --patience to train further)")
        # written once the checkpoint has loaded into this configuration (in _run): a refused resume changes nothing
        config["resumes"] = [*config.get("resumes", []), {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                         "changed": changes, "processes": world.size}]
    if world.main:
        from_extra = f" ({len(extra)} from {args.extra_data})" if extra is not None else ""
        print(f"{data_path}: {len(train_idx)} training rows{from_extra}, {len(val_idx)} validation rows; "
              f"run folder {folder.path}"
              + (f"; {world.size} processes" if world.size > 1 else ""))
    with stop_requests() as stop:
        try:
            # closed before a failed new run's folder is removed
            with RunLog(folder.tensorboard) if world.main else contextlib.nullcontext() as log:
                return _run(args, folder, config, base, train_table, val_table, val_labels, val_candidates,
                            last_step, stop, log, world)
        except KeyboardInterrupt as interrupt:
            number = getattr(signal.Signals, str(interrupt), signal.SIGINT)
            if folder is None and world.size > 1:  # rank 0 says what was kept
                raise Interrupted(f"{number.name}: stopped at once", number) from None
            if folder is not None and folder.discard_if_unsaved():
                raise Interrupted(f"interrupted before the first checkpoint; {folder.path} was removed",
                                  number) from None
            raise Interrupted(f"stopped at once; the last checkpoint is in {Path(args.out) / 'checkpoint'} "
                              f"(continue with `python run.py train --resume {args.out}`)", number) from None
        except BaseException:
            if folder is not None:
                folder.discard_if_unsaved()
            raise
        finally:
            if folder is not None:
                folder.release()


def _run(args: Namespace, folder: RunFolder | None, config: dict, base: Base, train_table: Tokenized,
         val_table: Tokenized, val_labels: np.ndarray, val_candidates: tuple[np.ndarray, np.ndarray], last_step: int,
         stop: StopRequest, log: RunLog | None, world: World) -> Path:
    """The loop; `folder` and `log` exist on rank 0 alone, which writes everything."""
    device = base.device
    torch.manual_seed(args.seed)
    model = base.load_model(classifier_only=args.loss == "classifier")
    n_blocks = len(model.model.layers)
    top_blocks = list(range(max(0, n_blocks - args.lora_layers), n_blocks)) if args.lora_layers else None
    model = apply_lora(model, args.rank, args.alpha, dropout=args.lora_dropout, layers=top_blocks)
    model.grad_checkpoint = args.grad_checkpoint
    pack = args.packing == "on"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sync = GradientSync(params, world) if world.size > 1 else None  # before the graphs, which add into its buffer
    if world.size > 1:
        torch.manual_seed(args.seed + world.rank)  # the ranks' LoRA weights start equal; their dropout masks differ
    step_tokens = args.batch_size * args.grad_accum * float(train_table.lengths.mean()) / world.size  # a rank's
    fit = pack and fits_lines(step_tokens, args.pack_tokens)
    on_gpu_fast = device.type == "cuda" and not args.eager
    dtype = base.numerics.compute_dtype
    fast = FastPath(model, device, compile=not args.eager and (args.compile or args.cuda_graphs or on_gpu_fast),
                    graphs=args.cuda_graphs or (on_gpu_fast and pack), params=params, label_ids=base.label_ids,
                    loss_kind=args.loss, dtype=dtype, any_length=fit)
    scaler = base.numerics.scaler()
    pad_to = COMPILED_PAD if fast.compiled and not pack else 1

    def step_rows(batches: list[np.ndarray], widest: bool = False) -> list[Rows]:
        """This rank's micro-batches of a step: its share of the step's rows packed into lines (shares of equal
        tokens; `widest`: none cut to its rows), or its share of the right-padded bucketed batches."""
        if pack:
            rows = split_tokens(train_table.lengths, np.concatenate(batches), world.size)[world.rank]
            shape = replace(line_shape, fit=False) if widest else line_shape
            return [line for _, line in packed_rows(train_table, rows, base.tokenizer.pad_id, shape)]
        return [padded_rows(train_table, rows, base.tokenizer.pad_id, pad_to) for rows in batches[world.rank::world.size]]

    progress = {"step": 0, "epoch": 0, "index": 0, "best_score": None, "best_step": None, "stale_evals": 0,
                "wall_s": 0.0}
    if world.broadcast_object(folder.has_checkpoint() if folder is not None else None):
        rng_states = []
        if folder is not None:
            progress, rng_states = load_checkpoint(folder.checkpoint, model, optimizer)
        progress, rng_states = world.broadcast_object((progress, rng_states))
        if world.rank < len(rng_states):  # a rank the checkpoint did not know keeps its seed + rank
            set_rng_state(rng_states[world.rank])
        if "loss_scaler" in progress:
            scaler.load_state_dict(progress["loss_scaler"])
        if folder is not None:
            write_config(folder, vars(args), config["manifest"], config["resumes"])
            trim_metrics(folder.metrics, progress["step"])  # steps after the checkpoint are trained again
            log.resume_after(progress["step"])
            print(f"resuming at step {progress['step']} of {last_step}")
            saved_on = progress.get("processes", config["manifest"].get("processes", 1))
            if saved_on != world.size:
                print(f"note: the checkpoint was saved by {saved_on} processes and resumes on {world.size}: the same "
                      f"rows make the same steps, now shared among {world.size} process(es)"
                      + (" (dropout draws its masks anew)" if args.lora_dropout else ""))
    broadcast_training_state(world, params, optimizer)
    stream = StepStream(train_table.lengths, args.batch_size, args.grad_accum, args.seed, progress["epoch"],
                        progress["index"])
    first_step = progress["step"]  # 0-based: this process's first
    line_budget = args.pack_tokens
    if fit:  # lines no longer than the largest step to come needs, the first step's that long: the peak comes first
        longest = max(stream.most_tokens(last_step - first_step), int(train_table.lengths.max(initial=1)))
        line_budget = min(line_budget, padded_length(longest, LINE_QUANTUM))
    line_shape = LineShape.of(train_table.lengths, line_budget, fit=fit) if pack else None
    val_share, val_shards = scoring_share(val_table, world)
    saved_step = progress["step"] if progress["step"] else None  # of the last checkpoint

    def attention_backends() -> contextlib.AbstractContextManager:
        # each eager batch has a shape of its own, for which cuDNN attention would first build a plan
        return contextlib.nullcontext() if fast.compiled or pack else attention_without_cudnn(device)

    def validation_scores() -> np.ndarray:
        """Each rank scores its share of the validation rows; every rank gets all the scores."""
        with attention_backends():
            shard = fast.run(lambda: predict_p_true(
                model, val_share, base.label_ids, base.tokenizer.pad_id,
                args.eval_batch_tokens or (args.pack_tokens if pack else None), device, pad_to_multiple=pad_to,
                pack=pack, dtype=dtype))
        p_true = world.gather(shard, val_shards, len(val_table))
        if not np.isfinite(p_true).all():
            raise UserError(f"evaluation at step {progress['step']}: {np.count_nonzero(~np.isfinite(p_true))} "
                            f"validation rows got a non-finite P(True) (try a lower --lr)")
        last_scores["val"] = p_true
        return p_true

    def evaluate() -> dict:
        p_true = validation_scores()
        metrics = {"step": progress["step"], "split": "val", **binary_metrics(p_true, val_labels)}
        better = improves(args.select_by, metrics[args.select_by], progress["best_score"])
        if better:
            progress.update(best_score=metrics[args.select_by], best_step=progress["step"], stale_evals=0)
        else:
            progress["stale_evals"] += 1
        if folder is not None:
            append_jsonl(folder.metrics, metrics)
            log.evaluation(metrics, p_true)
            if better:
                save_adapter(model, folder.adapter_best, base_model_name_or_path=str(base.model_path))
        return metrics

    def checkpoint() -> None:
        nonlocal saved_step
        rng_states = world.all_gather_object(rng_state())
        if folder is not None:
            save_checkpoint(folder.checkpoint, model, optimizer, {**progress, "processes": world.size}, rng_states)
        saved_step = progress["step"]

    last_scores: dict[str, np.ndarray] = {}
    model.train()
    bar = tqdm(total=last_step, initial=progress["step"], desc="train", dynamic_ncols=True, disable=not world.main)
    started = time.perf_counter() - progress["wall_s"]
    metrics = {}
    stop.deferred = True  # from here a signal stops the loop at the next step boundary, with a checkpoint
    pipelined = not scaler.enabled  # fp16's next step needs this one's loss scale, so it waits for each step
    last_done = started  # when the last step's values reached the host

    def launch(step: int) -> dict:
        """Queues optimizer step `step + 1` on the device; returns what finishing it needs."""
        lr = lr_at(step, args.lr, min(args.warmup_steps, last_step), last_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        launched_at = time.perf_counter()
        on_device = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if on_device is not None:  # reached once the device is done with what came before: the step's start
            on_device.record()
        batches = next(stream)
        micro_batches = [rows.to(device) for rows in step_rows(batches, widest=step == first_step)]
        with attention_backends():
            pending = fast.run(
                lambda: launch_optimizer_step(model, optimizer, micro_batches, base.label_ids, args.loss,
                                              args.max_grad_norm, fast.graphs, dtype, scaler, sync,
                                              step_rows=sum(len(rows) for rows in batches)),
                reset=lambda: zero_grad(optimizer, fast.graphs, sync))
        return {"step": step + 1, "lr": lr, "pending": pending, "launched_at": launched_at, "started": on_device,
                "epoch": stream.epoch, "position": stream.position(),
                "tokens": int(sum(train_table.lengths[rows].sum() for rows in batches))}

    def finish(job: dict) -> None:
        """Waits for a launched step's loss and gradient norm: ends the run at a non-finite one (fp16: counts it
        skipped), else records the step as done."""
        nonlocal last_done
        loss, grad_norm = job["pending"].get()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if not finite and scaler.enabled and not scaler.exhausted:  # fp16: skipped, at a lower loss scale
            finite = None
        elif not finite:
            what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
            if scaler.exhausted:
                what += f" at every fp16 loss scale ({scaler.skipped} steps skipped; try --precision fp32)"
            kept = (f"the last good checkpoint is in {Path(args.out) / 'checkpoint'}" if saved_step is not None
                    else "no checkpoint had been saved, so the run folder was removed")
            raise UserError(f"{what} at step {job['step']}; {kept} (try a lower --lr)")
        progress.update(step=job["step"], wall_s=time.perf_counter() - started, **job["position"])
        if scaler.enabled:
            progress["loss_scaler"] = scaler.state_dict()
        done, ready = job["pending"].done_at, job["pending"].ready
        if ready is not None:  # on the device's clock, from its launch or the previous step's end, the later
            seconds = job["started"].elapsed_time(ready) / 1e3
        else:  # known on the host as it finished (a CPU; fp16, which waits for each step)
            seconds = done - max(job["launched_at"], last_done)
        tokens_per_s = job["tokens"] / max(seconds, 1e-9)
        last_done = done
        record = {"step": job["step"], "loss": loss, "lr": job["lr"], "grad_norm": grad_norm,
                  "tokens_per_s": round(tokens_per_s, 1), "epoch": job["epoch"]}
        if scaler.enabled:
            record.update(loss_scale=scaler.scale, skipped=finite is None)
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        if folder is not None:
            append_jsonl(folder.metrics, record)
            log.step(record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{job['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        bar.update(1)

    # The host launches step k + 1 before it waits for step k, so the GPU always has a step queued; evaluations,
    # checkpoints and stops come between steps, with none in flight. The first step, long with compilation, is
    # waited for at once, so that it is reported as soon as it is done.
    in_flight = None
    launching = first_step  # 0-based: the step being launched
    try:
        while progress["step"] < last_step and not patience_ran_out(progress, args.patience):
            launching = progress["step"] + (in_flight is not None)
            job = launch(launching)
            if in_flight is not None:
                finish(in_flight)
            in_flight = job
            stop_signal = int(world.max(stop.signal_number))  # every rank stops at the same step, naming one signal
            boundary = job["step"] % args.eval_every == 0 or job["step"] == last_step
            if pipelined and not boundary and not stop_signal and launching > first_step:
                continue
            finish(in_flight)
            in_flight = None
            if progress["step"] % args.eval_every == 0 or progress["step"] == last_step:
                metrics = evaluate()
                bar.write(f"step {progress['step']}: val accuracy {metrics['accuracy']:.4f} "
                          f"auroc {metrics['auroc'] if metrics['auroc'] is None else round(metrics['auroc'], 4)}")
                checkpoint()
            elif stop_signal:
                checkpoint()
            if stop_signal and progress["step"] < last_step:
                # No rank exits before rank 0 has saved: torchrun ends the others as soon as one exits.
                world.barrier()
                stop.saved = True
                name = signal.Signals(stop_signal).name
                raise Interrupted(f"{name} at step {progress['step']}: checkpoint saved; continue with "
                                  f"`python run.py train --resume {args.out}`", signal.Signals(stop_signal))
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA out of memory at step {launching + 1}: {OOM_HINT}") from None
    finally:
        bar.close()

    stopped_early = patience_ran_out(progress, args.patience) and progress["step"] < last_step
    if stopped_early and world.main:
        bar.write(f"stopped early at step {progress['step']}: {args.patience} evaluations without a better "
                  f"{args.select_by} than {progress['best_score']} (step {progress['best_step']})")
    if "val" not in last_scores:  # resumed at its last step (or where patience ran out), before adapter/ was written
        metrics = {"step": progress["step"], "split": "val", **binary_metrics(validation_scores(), val_labels)}
    peak_memory = peak_memory_gb(device)
    peak_memory = {key: value if value is None else world.max(value) for key, value in peak_memory.items()}
    if folder is None:
        return Path(args.out)
    save_adapter(model, folder.adapter, base_model_name_or_path=str(base.model_path))
    save_decision(folder.path, fit_judge(last_scores["val"], val_labels, *val_candidates))  # for adapter/, as infer
    plot_run(folder.metrics, folder.plot)
    log.scalars("memory", peak_memory, progress["step"])
    summary = {"flags": vars(args), "model": str(base.model_path), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "processes": world.size, "steps": progress["step"], "train_rows": len(train_table),
               "val_rows": len(val_table), "truncated_rows": train_table.n_truncated + val_table.n_truncated,
               "wall_s": round(progress["wall_s"], 1), **peak_memory, "final": metrics,
               "best_val": {"metric": args.select_by, "value": progress["best_score"], "step": progress["best_step"]},
               "stopped_early": stopped_early, "stopped_at_step": progress["step"] if stopped_early else None,
               "skipped_steps": scaler.skipped}
    write_json(folder.summary, summary)
    print(f"run saved in {folder.path}: adapter/, adapter_best/, metrics.jsonl, training.png, summary.json")
    return folder.path
