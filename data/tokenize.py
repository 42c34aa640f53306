"""Prompts → token ids in flat arrays, cut to max_len in the middle of the solution, then of the question, cached.

Rows are tokenized in chunks with the tokenizer's parallel `encode_batch`, and each chunk goes straight into
numpy, so a million rows never sit in memory as Python lists. The cache is keyed by the rows' question,
answer and solution text (not the file's bytes: skipped rows or edits made in memory change the key too),
the tokenizer's `fingerprint`, the template text and max_len.
"""
import hashlib
import json
import sys
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError
from common.files import atomic_write
from data.tables import table_labels
from data.templates import FIELDS, Template

CACHE_VERSION = 2  # bump when the way prompts become ids changes
CHUNK_ROWS = 8192
ELLIPSIS = " ... "
MARKER = ELLIPSIS.strip()  # all that is left of a field cut to nothing
SEAM_TOKENS = 4  # what the ellipsis and the two new seams around it usually cost; one re-tokenization then fits


@dataclass
class Tokenized:
    """The prompts of a table as token ids, flat."""

    ids: np.ndarray  # int32 [total tokens]: the prompts back to back, each starting with BOS where the model uses one
    offsets: np.ndarray  # int64 [rows + 1]: row i is ids[offsets[i]:offsets[i + 1]]
    labels: np.ndarray | None  # int64 [rows] of 0/1, or None for a table without labels
    truncated: np.ndarray  # int64: positions of the rows whose prompt was shortened to fit max_len

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

    def by_tokens(self, rows: np.ndarray) -> np.ndarray:
        """`rows` (positions) sorted by their token ids, as words are: rows that begin alike lie side by side."""
        return np.array(sorted(np.asarray(rows).tolist(), key=lambda r: self.row(r).astype(">u4").tobytes()),
                        dtype=np.int64)

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

    A prompt over max_len has its solution cut from the middle, keeping its start and its last line, and where
    that is not enough its question too; the count is printed and the rows are in `.truncated`. UserError only
    if a prompt is over max_len even with both reduced to MARKER. An unreadable cache file is rebuilt.
    The tokenizer needs a `fingerprint` string that changes whenever its ids would.
    """
    source = df.attrs.get("source", "table")
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"tokens-{_cache_key(df, tokenizer, template, max_len)}.npz"
    saved = _load_cache(cache, len(df)) if cache is not None and cache.is_file() else None
    if saved is not None:
        ids, offsets, truncated = saved
    else:
        ids, offsets, truncated = _tokenize(df, tokenizer, template, max_len, source)
        if cache is not None:
            atomic_write(cache, lambda f: np.savez(f, ids=ids, offsets=offsets, truncated=truncated))
    if len(truncated):
        what = "their solutions (then questions, where needed)" if template.uses_solution else "their questions"
        rows = ", ".join(str(r) for r in df.index[truncated[:10]]) + (", ..." if len(truncated) > 10 else "")
        print(
            f"{source}: {len(truncated)} of {len(df)} prompts were over max_len {max_len} tokens; "
            f"{what} were shortened in the middle (rows {rows})",
            file=sys.stderr,
        )
    return Tokenized(ids, offsets, table_labels(df), truncated)


def _load_cache(cache: Path, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(ids, offsets, truncated) from a cache file, or None (with a line printed) where it cannot be used."""
    try:
        with np.load(cache) as saved:
            ids, offsets, truncated = saved["ids"], saved["offsets"], saved["truncated"]
        if ids.dtype != np.int32 or offsets.dtype != np.int64 or truncated.dtype != np.int64:
            raise ValueError(f"dtypes {ids.dtype}, {offsets.dtype}, {truncated.dtype}")
        fits = offsets.shape == (n_rows + 1,) and offsets[0] == 0 and offsets[-1] == ids.size
        if ids.ndim != 1 or not fits or (np.diff(offsets) < 0).any():
            raise ValueError(f"offsets do not fit {n_rows} rows of {ids.size} tokens")
        if truncated.ndim != 1 or ((truncated < 0) | (truncated >= n_rows)).any():
            raise ValueError("truncated rows out of range")
    except Exception as e:  # a truncated or garbage file: numpy and zipfile raise many kinds
        print(f"{cache}: unreadable token cache ({type(e).__name__}: {' '.join(str(e).split())}); rebuilding it",
              file=sys.stderr)
        return None
    return ids, offsets, truncated


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
    """Prompt ids cut to fit max_len, BOS included: the middle of the solution first, then of the question."""
    limit = max_len - n_bos
    fields, lengths = list(fields), list(lengths)  # entries are replaced as fields are cut to MARKER
    result: list[list[int]] = [[] for _ in fields]
    pending = list(range(len(fields)))  # rows still over the limit with `name` whole
    for name in ("solution", "question") if template.uses_solution else ("question",):
        if not pending:
            break
        at_marker = [{**fields[i], name: MARKER} for i in pending]
        floors = tokenizer.encode_batch([template.render(**f) for f in at_marker])
        fits = [k for k, t in enumerate(floors) if len(t) <= limit]
        cut = _cut_to_fit(tokenizer, template, name, [fields[pending[k]] for k in fits],
                          [lengths[pending[k]] for k in fits], limit)
        for k, t in zip(fits, cut):
            result[pending[k]] = t
        over = [k for k, t in enumerate(floors) if len(t) > limit]
        for k in over:
            fields[pending[k]], lengths[pending[k]] = at_marker[k], len(floors[k])
        pending = [pending[k] for k in over]
    if pending:
        i = pending[0]
        cut = "question and solution" if template.uses_solution else "question"
        raise UserError(
            f"{rows[i]}: the prompt is {lengths[i] + n_bos} tokens even with its {cut} cut to {MARKER!r}, "
            f"over max_len {max_len}"
        )
    return result


def _cut_to_fit(tokenizer, template: Template, name: str, fields: list[dict], lengths: list[int], limit: int
                ) -> list[list[int]]:
    """Prompt ids with field `name` cut from the middle until each prompt fits `limit` tokens; every prompt must
    fit with the field reduced to MARKER. A solution keeps its last line."""
    texts = tokenizer.encode_batch([f[name] for f in fields])
    if name == "solution":
        tails = [len(t) + 1 for t in tokenizer.encode_batch([f[name].rstrip().rsplit("\n", 1)[-1] for f in fields])]
    else:
        tails = [0] * len(fields)
    keep = [len(t) - (n - limit) - SEAM_TOKENS for t, n in zip(texts, lengths)]  # first guess
    result: list[list[int]] = [[] for _ in fields]
    pending = list(range(len(fields)))
    while pending:  # keep shrinks every round, down to MARKER alone, which fits
        cuts = [_cut_middle(tokenizer, texts[i], keep[i], tails[i]) for i in pending]
        prompts = tokenizer.encode_batch([template.render(**{**fields[i], name: c}) for i, c in zip(pending, cuts)])
        still_long = []
        for i, t in zip(pending, prompts):
            if len(t) <= limit:
                result[i] = t
            else:
                keep[i] -= len(t) - limit
                still_long.append(i)
        pending = still_long
    return result


def _cut_middle(tokenizer, text: list[int], keep: int, tail_min: int) -> str:
    """The first and last tokens of a text around MARKER, `keep` in all, the last `tail_min` always among them."""
    if keep <= 0:
        return MARKER
    tail = min(keep, max(keep // 2, tail_min))
    head = keep - tail
    return (tokenizer.decode(text[:head]).rstrip() + ELLIPSIS + tokenizer.decode(text[-tail:]).lstrip()).strip()


def _cache_key(df: pd.DataFrame, tokenizer, template: Template, max_len: int) -> str:
    settings = [CACHE_VERSION, tokenizer.fingerprint, tokenizer.add_bos, tokenizer.bos_id, template.text, max_len]
    key = hashlib.sha256(json.dumps(settings).encode())
    columns = [c for c in FIELDS if c in df.columns]
    key.update(json.dumps(columns).encode())
    key.update(pd.util.hash_pandas_object(df[columns], index=False).to_numpy().tobytes())  # 64 bits a row
    return key.hexdigest()[:32]
