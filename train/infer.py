"""Scoring a test table with a trained run: submission.csv (ID,is_correct) and P(True) per row, every row or none."""
import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from common.errors import UserError
from common.files import atomic_write, read_json, write_json
from data import get_template, read_labels, read_table, table_labels, tokenize_table
from lora import load_adapter
from model.default import cache_dir
from train.loop import DEFAULT_DATA_DIR
from train.metrics import binary_metrics
from train.predict import attention_without_cudnn, default_batch_tokens, predict_p_true
from train.runfolder import CONFIG
from train.setup import pick_device, resolve_base


def newest_run(runs_dir: Path = Path("runs")) -> Path:
    adapters = list(runs_dir.glob("*/adapter/adapter_config.json"))
    if not adapters:
        raise UserError(f"no trained run with an adapter under {runs_dir}/; train one first or pass --run")
    return max(adapters, key=lambda p: p.stat().st_mtime).parent.parent.absolute()


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda f: df.to_csv(f, index=False))


def output_files(out: Path) -> list[Path]:
    return [out, out.with_name(f"{out.stem}_p_true.csv"), out.with_name(f"{out.stem}_metrics.json")]


def check_outputs(outputs: list[Path], inputs: list[Path]) -> None:
    """Before any work: each output is a writable file path that names none of the inputs."""
    real_inputs = {p.resolve(): p for p in inputs if p.exists()}
    for path in outputs:
        if path.resolve() in real_inputs:
            raise UserError(f"--out {outputs[0]}: would overwrite the input {real_inputs[path.resolve()]}")
        if path.is_dir():
            raise UserError(f"--out {outputs[0]}: {path} is a folder")
        if path.exists() and not os.access(path, os.W_OK):
            raise UserError(f"--out {outputs[0]}: {path} is not writable")
    parent = next(p for p in (outputs[0].parent, *outputs[0].parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"--out {outputs[0]}: cannot write in {parent}")


def infer(args: Namespace) -> Path:
    run_dir = Path(args.run).absolute() if args.run else newest_run()
    adapter_dir = run_dir / ("adapter_best" if args.best else "adapter")
    unfinished = f"--run {run_dir}: not a finished run (needs {CONFIG} and {adapter_dir.name}/)"
    if not adapter_dir.is_dir():
        raise UserError(unfinished)
    config = read_json(run_dir / CONFIG, unfinished)
    if not isinstance(config.get("flags"), dict):
        raise UserError(f"{run_dir / CONFIG}: not a run's config (no 'flags' object)")
    flags = Namespace(**config["flags"])
    if args.data:
        data_path, labels_path = Path(args.data), Path(args.labels) if args.labels else None
    else:
        data_path, labels_path = DEFAULT_DATA_DIR / "test.csv", Path(args.labels or DEFAULT_DATA_DIR / "test_labels.csv")
    max_len = getattr(args, "max_len", None) or flags.max_len
    device = pick_device()
    batch_tokens = args.batch_tokens or max(default_batch_tokens(device), max_len)
    if batch_tokens < max_len:
        raise UserError(f"--batch-tokens {batch_tokens} is below --max-len {max_len}: the longest row would not fit")
    outputs = output_files(Path(args.out))
    check_outputs(outputs, [data_path, *([labels_path] if labels_path else []), run_dir / CONFIG,
                            *adapter_dir.iterdir()])

    template = get_template(flags.template)
    df = read_table(data_path, split="test", template=template)
    labels = read_labels(labels_path, df["ID"]) if labels_path else table_labels(df)
    base = resolve_base(args.model or flags.model, flags.quant, template, device)
    trained = config.get("manifest", {})
    if trained.get("device", "").split(":")[0] not in ("", device.type) or trained.get("precision") != base.precision:
        print(f"note: the run trained on {trained.get('device')} ({trained.get('precision')}); "
              f"scoring on {device} ({base.precision}), same {base.quantization} base")
    table = tokenize_table(df, base.tokenizer, template, max_len, cache_dir=cache_dir() / "tokens")
    model = load_adapter(base.load_model(), adapter_dir)
    with (tqdm(total=len(table), desc="infer", unit="row", dynamic_ncols=True) as bar,
          attention_without_cudnn(device)):  # every batch has a shape of its own
        p_true = predict_p_true(model, table, base.label_ids, base.tokenizer.pad_id, batch_tokens, device,
                                progress=bar)
    if not np.isfinite(p_true).all():
        raise UserError(f"{np.count_nonzero(~np.isfinite(p_true))} rows of {data_path} got a non-finite P(True); "
                        f"the adapter in {adapter_dir} is broken")

    out, p_true_out, metrics_out = outputs
    write_csv(pd.DataFrame({"ID": df["ID"], "is_correct": p_true >= 0.5}), out)
    write_csv(pd.DataFrame({"ID": df["ID"], "p_true": p_true}), p_true_out)
    print(f"{out}: {len(df)} predictions from {adapter_dir} ({int((p_true >= 0.5).sum())} True)")
    if labels is not None:
        metrics = binary_metrics(p_true, labels)
        write_json(metrics_out, metrics)
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return out
