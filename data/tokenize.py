"""Prompts → token ids in flat arrays, cut to max_len without touching the question or the answer, cached on disk.

Rows are tokenized in chunks with the tokenizer's parallel `encode_batch`, and each chunk goes straight into
numpy, so a million rows never sit in memory as Python lists. The cache is keyed by the rows' question,
answer and solution text (not the file's bytes: skipped rows or edits made in memory change the key too),
the tokenizer's `fingerprint`, the template text and max_len.
"""
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from data.errors import UserError
from data.tables import table_labels
from data.templates import FIELDS, Template

CACHE_VERSION = 1  # bump when the way prompts become ids changes
CHUNK_ROWS = 8192
ELLIPSIS = " ... "
SEAM_TOKENS = 4  # what the ellipsis and the two new seams around it usually cost; one re-tokenization then fits


@dataclass
class Tokenized:
    """The prompts of a table as token ids, flat."""

    ids: np.ndarray  # int32 [total tokens]: the prompts back to back, each starting with BOS where the model uses one
    offsets: np.ndarray  # int64 [rows + 1]: row i is ids[offsets[i]:offsets[i + 1]]
    labels: np.ndarray | None  # int64 [rows] of 0/1, or None for a table without labels
    truncated: np.ndarray  # int64: positions of the rows whose solution was shortened to fit max_len

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_truncated(self) -> int:
        return len(self.truncated)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def subset(self, indices: np.ndarray) -> "Tokenized":
        """The rows at `indices` (positions), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        shift = np.repeat(self.offsets[indices] - offsets[:-1], lengths)  # old position - new position, per token
        ids = self.ids[np.arange(offsets[-1], dtype=np.int64) + shift]
        labels = None if self.labels is None else self.labels[indices]
        return Tokenized(ids, offsets, labels, np.flatnonzero(np.isin(indices, self.truncated)))


def tokenize_table(
    df: pd.DataFrame, tokenizer, template: Template, max_len: int, cache_dir: str | Path | None = None
) -> Tokenized:
    """Token ids of every row's prompt (BOS included when `tokenizer.add_bos`), at most `max_len` each.

    A prompt over max_len has its solution cut from the middle, keeping its start and its last line; the count
    is printed and the rows are in `.truncated`. UserError if a prompt is over max_len even with no solution.
    The tokenizer needs a `fingerprint` string that changes whenever its ids would.
    """
    source = df.attrs.get("source", "table")
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"tokens-{_cache_key(df, tokenizer, template, max_len)}.npz"
    if cache is not None and cache.is_file():
        with np.load(cache) as saved:
            ids, offsets, truncated = saved["ids"], saved["offsets"], saved["truncated"]
    else:
        ids, offsets, truncated = _tokenize(df, tokenizer, template, max_len, source)
        if cache is not None:
            _save_atomic(cache, ids=ids, offsets=offsets, truncated=truncated)
    if len(truncated):
        rows = ", ".join(str(r) for r in df.index[truncated[:10]]) + (", ..." if len(truncated) > 10 else "")
        print(
            f"{source}: {len(truncated)} of {len(df)} prompts were over max_len {max_len} tokens; "
            f"their solutions were shortened in the middle (rows {rows})",
            file=sys.stderr,
        )
    return Tokenized(ids, offsets, table_labels(df), truncated)


def _tokenize(df, tokenizer, template, max_len, source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    columns = [c for c in FIELDS if c in df.columns]
    ids_chunks, length_chunks, truncated = [], [], []
    for start in range(0, len(df), CHUNK_ROWS):
        part = df.iloc[start : start + CHUNK_ROWS]
        fields = [dict(zip(columns, values)) for values in zip(*(part[c].tolist() for c in columns))]
        tokens = tokenizer.encode_batch([template.render(**f) for f in fields])
        too_long = [i for i, t in enumerate(tokens) if len(t) + len(bos) > max_len]
        if too_long:
            rows = [f"{source}: row {part.index[i]}" for i in too_long]
            if not template.uses_solution:
                raise UserError(
                    f"{rows[0]}: the prompt is {len(tokens[too_long[0]]) + len(bos)} tokens, over max_len {max_len}, "
                    f"and template {template.name!r} has no solution to shorten"
                )
            counts = [len(tokens[i]) for i in too_long]
            shortened = _shorten(tokenizer, template, [fields[i] for i in too_long], counts, rows, max_len, len(bos))
            for i, t in zip(too_long, shortened):
                tokens[i] = t
            truncated.extend(start + i for i in too_long)
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens)) + len(bos)
        ids = np.fromiter(chain.from_iterable(chain(bos, t) for t in tokens), dtype=np.int32, count=lengths.sum())
        ids_chunks.append(ids)
        length_chunks.append(lengths)
    lengths = np.concatenate(length_chunks) if length_chunks else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(ids_chunks) if ids_chunks else np.zeros(0, dtype=np.int32)
    return ids, offsets, np.asarray(truncated, dtype=np.int64)


def _shorten(
    tokenizer, template: Template, fields: list[dict], lengths: list[int], rows: list[str], max_len: int, n_bos: int
) -> list[list[int]]:
    """Prompt ids with each solution cut from the middle until the prompt, BOS included, fits max_len."""
    limit = max_len - n_bos
    solutions = tokenizer.encode_batch([f["solution"] for f in fields])
    last_lines = tokenizer.encode_batch([f["solution"].rstrip().rsplit("\n", 1)[-1] for f in fields])
    keep = [len(s) - (n - limit) - SEAM_TOKENS for s, n in zip(solutions, lengths)]  # first guess
    result: list[list[int]] = [[] for _ in fields]
    pending = list(range(len(fields)))
    while pending:
        cuts = [_cut_middle(tokenizer, solutions[i], keep[i], len(last_lines[i]) + 1) for i in pending]
        texts = [template.render(**{**fields[i], "solution": cut}) for i, cut in zip(pending, cuts)]
        still_long = []
        for i, cut, t in zip(pending, cuts, tokenizer.encode_batch(texts)):
            if len(t) <= limit:
                result[i] = t
            elif not cut:
                raise UserError(
                    f"{rows[i]}: the prompt is {len(t) + n_bos} tokens even with an empty solution, over max_len {max_len}"
                )
            else:
                keep[i] -= len(t) - limit
                still_long.append(i)
        pending = still_long
    return result


def _cut_middle(tokenizer, solution: list[int], keep: int, tail_min: int) -> str:
    """The first and last tokens of a solution, `keep` in all, the last `tail_min` (its last line) always among them."""
    if keep <= 0:
        return ""
    tail = min(keep, max(keep // 2, tail_min))
    head = keep - tail
    return (tokenizer.decode(solution[:head]).rstrip() + ELLIPSIS + tokenizer.decode(solution[-tail:]).lstrip()).strip()


def _cache_key(df: pd.DataFrame, tokenizer, template: Template, max_len: int) -> str:
    settings = [CACHE_VERSION, tokenizer.fingerprint, tokenizer.add_bos, tokenizer.bos_id, template.text, max_len]
    key = hashlib.sha256(json.dumps(settings).encode())
    columns = [c for c in FIELDS if c in df.columns]
    key.update(json.dumps(columns).encode())
    key.update(pd.util.hash_pandas_object(df[columns], index=False).to_numpy().tobytes())  # 64 bits a row
    return key.hexdigest()[:32]


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
