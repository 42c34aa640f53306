"""Tokenization at competition scale: a 1,000,000-row train.csv with solutions of 200-400 Llama-3 tokens,
read and tokenized cold, then read and loaded from the token cache. Prints one JSON line of timings.

The table is built in a temporary folder (never in the repo) from GSM8K reference solutions, each row's
solution a concatenation of randomly chosen ones, so lines repeat across rows but whole prompts do not.
CPU seconds are printed beside wall seconds: on a shared machine the wall time depends on the neighbours.

    python bench/bench_tokenize.py [--rows 1000000] [--max-len 512]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import get_template, read_table, tokenize_table  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def llama3_tokenizer_path() -> Path:
    import llama_models  # ships Meta's Llama-3 tokenizer.model

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def build_table(path: Path, rows: int, tokenizer, seed: int = 0) -> None:
    """train.csv in the competition's columns; each solution runs to a length drawn from 200-400 tokens."""
    problems = pd.read_json(GSM8K, lines=True)
    steps = problems["answer"].str.rsplit("\n#### ", n=1).str[0].tolist()  # reasoning without the final line
    finals = problems["answer"].str.rsplit("#### ", n=1).str[1].str.strip().tolist()
    step_tokens = np.array([len(t) for t in tokenizer.encode_batch(steps)])
    rng = np.random.default_rng(seed)
    targets = rng.integers(200, 401, size=rows)
    picks = rng.integers(0, len(steps), size=(rows, 12))  # 12 of GSM8K's shortest steps still pass 400 tokens
    counts = np.abs(np.cumsum(step_tokens[picks], axis=1) - targets[:, None]).argmin(axis=1) + 1
    questions = rng.integers(0, len(steps), size=rows)
    correct = rng.random(rows) < 0.4
    solutions, answers = [], []
    for r in range(rows):
        chosen = picks[r, : counts[r]]
        answer = finals[chosen[-1]]
        solutions.append("\n".join(steps[i] for i in chosen) + f"\nThe answer is {answer}.")
        answers.append(answer if correct[r] else str(rng.integers(0, 1000)))
    table = pd.DataFrame(
        {
            "question": problems["question"].to_numpy()[questions],
            "answer": answers,
            "solution": solutions,
            "is_correct": correct,
        }
    )
    table.to_csv(path, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--max-len", type=int, default=512)
    args = parser.parse_args()
    tokenizer = load_tokenizer(llama3_tokenizer_path())
    template = get_template("with_solution")
    workdir = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    try:
        table, cache = workdir / "train.csv", workdir / "cache"
        start = time.perf_counter()
        build_table(table, args.rows, tokenizer)
        build_s = time.perf_counter() - start

        start, start_cpu = time.perf_counter(), time.process_time()
        df = read_table(table, "train", template)
        read_s = time.perf_counter() - start
        tokenized = tokenize_table(df, tokenizer, template, args.max_len, cache_dir=cache)
        cold_s, cold_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
        del df, tokenized

        start, start_cpu = time.perf_counter(), time.process_time()
        df = read_table(table, "train", template)
        cached_read_s = time.perf_counter() - start
        tokenized = tokenize_table(df, tokenizer, template, args.max_len, cache_dir=cache)
        cached_s, cached_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
        lengths = tokenized.lengths
        print(
            json.dumps(
                {
                    "rows": len(tokenized),
                    "csv_mb": round(table.stat().st_size / 2**20),
                    "tokens": int(lengths.sum()),
                    "mean_prompt_tokens": round(float(lengths.mean()), 1),
                    "max_len": args.max_len,
                    "truncated_rows": tokenized.n_truncated,
                    "build_table_s": round(build_s, 1),
                    "cold_read_s": round(read_s, 1),
                    "cold_tokenize_s": round(cold_s - read_s, 1),
                    "cold_total_s": round(cold_s, 1),
                    "cold_cpu_s": round(cold_cpu_s, 1),
                    "cached_read_s": round(cached_read_s, 1),
                    "cached_tokenize_s": round(cached_s - cached_read_s, 1),
                    "cached_total_s": round(cached_s, 1),
                    "cached_cpu_s": round(cached_cpu_s, 1),
                    "cpus": os.cpu_count(),
                    "load_average_1min": round(os.getloadavg()[0], 1),
                }
            )
        )
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
