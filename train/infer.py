"""Scoring a test table with a trained run: submission.csv (ID,is_correct) and P(True) per row."""
import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from data import get_template, read_table, table_labels, tokenize_table
from data.tables import parse_labels
from data.errors import UserError
from lora import load_adapter
from model.default import cache_dir
from model.files import read_json
from train.loop import DEFAULT_DATA_DIR, load_base, pick_device, write_json
from train.metrics import binary_metrics
from train.predict import attention_without_cudnn, predict_p_true


def newest_run(runs_dir: Path = Path("runs")) -> Path:
    adapters = list(runs_dir.glob("*/adapter/adapter_config.json"))
    if not adapters:
        raise UserError(f"no trained run with an adapter under {runs_dir}/; train one first or pass --run")
    return max(adapters, key=lambda p: p.stat().st_mtime).parent.parent


def write_csv(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def read_label_file(path: Path, ids: pd.Series) -> np.ndarray:
    """Labels by ID from a separate ID,is_correct table, in the order of `ids`."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    labels = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in ("ID", "is_correct"):
        if column not in labels.columns:
            raise UserError(f"{path}: column {column} missing")
    by_id = dict(zip(labels["ID"], parse_labels(labels["is_correct"])))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UserError(f"{path}: no label for ID {missing[0]} ({len(missing)} IDs without a label)")
    values = np.array([by_id[i] for i in ids], dtype=float)
    if np.isnan(values).any():
        raise UserError(f"{path}: column is_correct has a value that is not True/False, 1/0 or yes/no")
    return values.astype(np.int64)


def infer(args: Namespace) -> Path:
    run_dir = Path(args.run) if args.run else newest_run()
    adapter_dir = run_dir / ("adapter_best" if args.best else "adapter")
    unfinished = f"--run {run_dir}: not a finished run (needs config.json and {adapter_dir.name}/)"
    if not adapter_dir.is_dir():
        raise UserError(unfinished)
    flags = Namespace(**read_json(run_dir / "config.json", unfinished))
    if args.model:
        flags.model = args.model
    if args.data:
        data_path, labels_path = Path(args.data), Path(args.labels) if args.labels else None
    else:
        data_path, labels_path = DEFAULT_DATA_DIR / "test.csv", Path(args.labels or DEFAULT_DATA_DIR / "test_labels.csv")

    template = get_template(flags.template)
    df = read_table(data_path, split="test", template=template, skip_bad_rows=args.skip_bad_rows)
    setup = load_base(flags, pick_device(), template)
    table = tokenize_table(df, setup.tokenizer, template, flags.max_len, cache_dir=cache_dir() / "tokens")
    model = load_adapter(setup.model, adapter_dir)
    with (tqdm(total=len(table), desc="infer", unit="row", dynamic_ncols=True) as bar,
          attention_without_cudnn(setup.device)):  # every batch has a shape of its own
        p_true = predict_p_true(model, table, setup.label_ids, setup.tokenizer.pad_id, args.batch_tokens,
                                setup.device, progress=bar)

    out = Path(args.out)
    write_csv(pd.DataFrame({"ID": df["ID"], "is_correct": p_true >= 0.5}), out)
    write_csv(pd.DataFrame({"ID": df["ID"], "p_true": p_true}), out.with_name(f"{out.stem}_p_true.csv"))
    print(f"{out}: {len(df)} predictions from {adapter_dir} ({int((p_true >= 0.5).sum())} True)")

    labels = read_label_file(labels_path, df["ID"]) if labels_path else table_labels(df)
    if labels is not None:
        metrics = binary_metrics(p_true, labels)
        write_json(out.with_name(f"{out.stem}_metrics.json"), metrics)
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return out
