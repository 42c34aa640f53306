"""Scoring a test table with a trained run: submission.csv (ID,is_correct) and P(True) per row, every row or none."""
import contextlib
import os
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from common.errors import UserError
from common.files import atomic_write_all, json_writer, read_json, unwritable_ancestor
from data import Template, get_template, read_labels, read_table, table_labels, tokenize_table
from lora import load_adapter
from model.default import cache_dir
from model.fp8 import fp8_unavailable
from train.calibrate import DECISION, decision_in_use
from train.consensus import judge
from train.distributed import World, joined_world, scoring_share
from train.loop import DEFAULT_DATA_DIR, default_packing
from train.metrics import binary_metrics
from train.fastpath import FastPath
from train.predict import attention_without_cudnn, default_batch_tokens, predict_p_true
from train.runfolder import CONFIG, read_run_config
from train.setup import pick_device, resolve_base

JUDGE = "judge.json"  # what `run.py export` writes beside merged weights for `infer --model`


def newest_run(runs_dir: Path = Path("runs")) -> Path:
    adapters = list(runs_dir.glob("*/adapter/adapter_config.json"))
    if not adapters:
        raise UserError(f"no trained run with an adapter under {runs_dir}/; train one first or pass --run")
    return max(adapters, key=lambda p: p.stat().st_mtime).parent.parent.absolute()


def csv_writer(df: pd.DataFrame) -> Callable[[IO[bytes]], None]:
    return lambda f: df.to_csv(f, index=False)


def output_files(out: Path) -> list[Path]:
    return [out, out.with_name(f"{out.stem}_p_true.csv"), out.with_name(f"{out.stem}_metrics.json")]


def check_outputs(outputs: list[Path], inputs: list[Path], folders: list[Path] = ()) -> None:
    """Before any work: each output is a writable file path that names none of the inputs and lies in none of
    `folders` (a run's own folders, the model's)."""
    real_inputs = {p.resolve(): p for p in inputs if p.exists()}
    for path in outputs:
        if path.resolve() in real_inputs:
            raise UserError(f"--out {outputs[0]}: would overwrite the input {real_inputs[path.resolve()]}")
        inside = [f for f in folders if path.resolve().is_relative_to(f.resolve())]
        if inside:
            raise UserError(f"--out {outputs[0]}: would write into {inside[0]}, which is not for outputs")
        if path.is_dir():
            raise UserError(f"--out {outputs[0]}: {path} is a folder")
        if path.exists() and not os.access(path, os.W_OK):
            raise UserError(f"--out {outputs[0]}: {path} is not writable")
    if blocked := unwritable_ancestor(outputs[0].parent):
        raise UserError(f"--out {outputs[0]}: cannot write in {blocked}")


@dataclass
class TrainedRun:
    """A finished run (or a merged export holding judge.json) resolved for scoring, with the scoring flags applied
    and checked; no weights read yet."""
    path: Path
    adapter: Path | None  # None: the model folder holds the merged weights
    config: dict
    template: Template
    model: str | None  # the base model folder
    max_len: int
    batch_tokens: int
    device: torch.device
    pack: bool
    eager: bool
    fp8: bool
    decision_file: str = DECISION  # in `path`

    def files(self) -> list[Path]:
        """The run's own files, which no output may overwrite."""
        return [p for p in self.path.iterdir() if p.is_file()]

    def folders(self) -> list[Path]:
        """The run's own folders and the base model's, where no output may go."""
        own = [p for p in self.path.iterdir() if p.is_dir()]
        return own + ([Path(self.model)] if self.model else [])


def run_folder(args: Namespace) -> Path | None:
    """The run a scoring command reads: --run, else the newest under runs/; None for a merged export (a `--model`
    folder holding judge.json, given without --run), which is scored as it is."""
    if not args.run and getattr(args, "model", None) and (Path(args.model) / JUDGE).is_file():
        return None
    return Path(args.run).absolute() if args.run else newest_run()


def open_run(args: Namespace) -> TrainedRun:
    """The run of `args.run` (default: the newest under runs/) and its adapter (`args.best`: adapter_best/), with
    `args.max_len`, `args.batch_tokens` and `args.model` defaulting to what the run used. Without `args.run`, an
    `args.model` folder holding judge.json (`run.py export`) is scored as it is, with no adapter."""
    run_dir = run_folder(args)
    if run_dir is None:
        return open_export(args)
    adapter_dir = run_dir / ("adapter_best" if args.best else "adapter")
    unfinished = f"--run {run_dir}: not a finished run (needs {CONFIG} and {adapter_dir.name}/)"
    if not adapter_dir.is_dir():
        raise UserError(unfinished)
    config = read_run_config(run_dir / CONFIG, unfinished)
    flags = Namespace(**config["flags"])
    return TrainedRun(run_dir, adapter_dir, config, get_template(flags.template), args.model or flags.model,
                      *_scoring(args, flags.max_len, getattr(flags, "fp8", "off")))


def _scoring(args: Namespace, run_max_len: int,
             run_fp8: str = "off") -> tuple[int, int, torch.device, bool, bool, bool]:
    """max_len, batch_tokens, device, pack, eager and fp8: the scoring flags, defaulting to the run's (FP8 only
    where this device has it)."""
    max_len = getattr(args, "max_len", None) or run_max_len
    device = pick_device()
    batch_tokens = args.batch_tokens or max(default_batch_tokens(device), max_len)
    if batch_tokens < max_len:
        raise UserError(f"--batch-tokens {batch_tokens} is below --max-len {max_len}: the longest row would not fit")
    pack = (getattr(args, "packing", None) or default_packing(device)) == "on"
    fp8 = getattr(args, "fp8", None)
    if fp8 is None and run_fp8 == "on" and (reason := fp8_unavailable(device)):
        print(f"note: the run trained with FP8 base products, but {reason}: scoring in {device.type}'s usual precision")
        run_fp8 = "off"
    return max_len, batch_tokens, device, pack, getattr(args, "eager", False), (fp8 or run_fp8) == "on"


def open_export(args: Namespace) -> TrainedRun:
    """A merged export's judge.json read as a run: its template, max_len, the run's quant and precision."""
    folder = Path(args.model).absolute()
    judge = read_json(folder / JUDGE, f"{folder}: no {JUDGE}")
    for key, kind in (("template", str), ("max_len", int), ("quant", str)):
        if not isinstance(judge.get(key), kind):
            raise UserError(f"{folder / JUDGE}: {key}={judge.get(key)!r} is not a {kind.__name__}")
    fp8 = judge.get("fp8", "off")  # exports from before the flag multiplied in bf16
    if fp8 not in ("on", "off"):
        raise UserError(f"{folder / JUDGE}: fp8={fp8!r} is not 'on' or 'off'")
    config = {"flags": {"quant": judge["quant"], "precision": judge.get("precision"), "fp8": fp8}}
    return TrainedRun(folder, None, config, Template(str(folder / JUDGE), judge["template"]), str(folder),
                      *_scoring(args, judge["max_len"], fp8), decision_file=JUDGE)


def score_table(run: TrainedRun, df: pd.DataFrame, world: World = World()) -> np.ndarray:
    """P(True) for every row of `df` (from read_table, with the run's template) by the run's adapter, in order.
    Under torchrun each rank scores its share of the rows, and every rank gets all the scores."""
    base = resolve_base(run.model, run.config["flags"]["quant"], run.template, run.device,
                        run.config["flags"].get("precision") if run.device.type == "cuda" else None, fp8=run.fp8)
    trained = run.config.get("manifest", {})
    trained_on = trained.get("device", "").split(":")[0]
    if world.main and (trained_on not in ("", run.device.type) or trained.get("precision") != base.precision):
        print(f"note: the run trained on {trained.get('device')} ({trained.get('precision')}); "
              f"scoring on {run.device} ({base.precision}), same {base.quantization} base")
    table = tokenize_table(df, base.tokenizer, run.template, run.max_len, cache_dir=cache_dir() / "tokens")
    table, shards = scoring_share(table, world)
    model = base.load_model()
    if run.adapter is not None:
        load_adapter(model, run.adapter)
    fast = FastPath(model, run.device, compile=not run.eager and run.device.type == "cuda")
    # unpacked, every batch has a shape of its own, for which cuDNN attention would first build a plan
    with (tqdm(total=len(table), desc="score", unit="row", dynamic_ncols=True, disable=not world.main) as bar,
          contextlib.nullcontext() if run.pack else attention_without_cudnn(run.device)):
        p_true = fast.run(lambda: predict_p_true(model, table, base.label_ids, base.tokenizer.pad_id, run.batch_tokens,
                                                 run.device, progress=bar, pack=run.pack,
                                                 dtype=base.numerics.compute_dtype),
                          reset=bar.reset)
    p_true = world.gather(p_true, shards, len(df))
    if not np.isfinite(p_true).all():
        raise UserError(f"{np.count_nonzero(~np.isfinite(p_true))} rows of {df.attrs['source']} got a non-finite "
                        f"P(True); the weights in {run.adapter or run.model} are broken")
    return p_true


def infer(args: Namespace) -> Path:
    """Writes the submission (and P(True), and metrics where labels exist); under torchrun the ranks share the
    scoring and rank 0 alone writes."""
    with joined_world(pick_device()) as world:
        return _infer(args, world)


def _infer(args: Namespace, world: World) -> Path:
    run = open_run(args)
    if args.data:
        data_path, labels_path = Path(args.data), Path(args.labels) if args.labels else None
    else:
        data_path, labels_path = DEFAULT_DATA_DIR / "test.csv", Path(args.labels or DEFAULT_DATA_DIR / "test_labels.csv")
    outputs = output_files(Path(args.out))
    check_outputs(outputs, [data_path, *([labels_path] if labels_path else []), *run.files()], run.folders())
    decision, used = decision_in_use(run.path, args.threshold, run.decision_file, consensus=args.consensus)

    df = read_table(data_path, split="test", template=run.template)
    labels = read_labels(labels_path, df["ID"]) if labels_path else table_labels(df)
    if world.main:
        print(f"decision: {used}")
    p_true, thresholds, by_consensus = judge(score_table(run, df, world), decision, df["question"], df["answer"])
    predicted = p_true >= thresholds
    if not world.main:
        return Path(args.out)

    out, p_true_out, metrics_out = outputs
    files = {out: csv_writer(pd.DataFrame({"ID": df["ID"], "is_correct": predicted})),
             p_true_out: csv_writer(pd.DataFrame({"ID": df["ID"], "p_true": p_true}))}
    if labels is not None:
        metrics = binary_metrics(p_true, labels, thresholds)
        files[metrics_out] = json_writer({**metrics, **decision})
    atomic_write_all(files)  # the set as a whole, or the old set untouched
    if labels is None:
        metrics_out.unlink(missing_ok=True)  # an earlier scoring's metrics would not describe these predictions
    print(f"{out}: {len(df)} predictions from {run.adapter or run.model} ({int(predicted.sum())} True"
          + (f"; {int(by_consensus.sum())} decided with the consensus of their question's candidates)"
             if by_consensus.any() else ")"))
    if labels is not None:
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return out
