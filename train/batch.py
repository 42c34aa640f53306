"""What one forward pass reads: rows right-padded [B, T] or packed end to end into a line [1, T]."""
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from data import LineShape, PackedLine, Tokenized, collate, collate_line, pack_lines
from model.llama import Packing


@dataclass
class Rows:
    tokens: Tensor  # [B, T] right-padded, or [1, T] packed
    last: Tensor  # [R] each row's last token: its index within the row (padded) or within the line (packed)
    labels: Tensor | None  # [R]
    n_rows: int  # real rows: a packed line has slots for more, with weight 0
    weights: Tensor | None = None  # [R] 1 for a row, 0 for an empty slot; None when every slot is a row
    packing: Packing | None = None

    def tensors(self) -> list[Tensor]:
        fields = (self.tokens, self.last, self.labels, self.weights, *(self.packing or ()))
        return [t for t in fields if isinstance(t, Tensor)]

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Rows":
        """The same rows with `fn` applied to every tensor (e.g. a move to the device)."""
        def apply(t):
            return fn(t) if isinstance(t, Tensor) else t
        packing = None if self.packing is None else Packing(*map(apply, self.packing))
        return replace(self, tokens=fn(self.tokens), last=fn(self.last), labels=apply(self.labels),
                       weights=apply(self.weights), packing=packing)

    def to(self, device) -> "Rows":
        """On `device`; to a GPU through pinned memory, so that the copy need not wait for the work queued before it
        (from pageable memory the host waits for the whole stream)."""
        if torch.device(device).type == "cuda":
            return self.map(lambda t: t.pin_memory().to(device, non_blocking=True))
        return self.map(lambda t: t.to(device))


def right_padded(tokens: Tensor, lengths: Tensor, labels: Tensor | None = None) -> Rows:
    """Rows of right-padded token ids [B, T] with their lengths [B]."""
    return Rows(tokens, lengths - 1, labels, len(lengths))


def padded_rows(table: Tokenized, rows: np.ndarray, pad_id: int, pad_to_multiple: int = 1) -> Rows:
    return right_padded(*collate(table, rows, pad_id, pad_to_multiple))


def line_as_rows(line: PackedLine, n_rows: int) -> Rows:
    packing = Packing(line.cu_seqlens, line.doc, line.positions, line.max_seqlen, line.kv_index, line.kv_doc,
                      line.cu_seqlens_k)
    return Rows(line.tokens, line.last, line.labels, n_rows, line.weights, packing)


def line_rows(table: Tokenized, positions: np.ndarray, pad_id: int, shape: LineShape) -> Rows:
    """The rows at `positions` packed into one line of `shape`."""
    return line_as_rows(collate_line(table, positions, pad_id, shape), len(positions))


def packed_rows(table: Tokenized, rows: np.ndarray, pad_id: int, shape: LineShape) -> list[tuple[np.ndarray, Rows]]:
    """`rows` packed into as few lines of `shape` as first-fit decreasing finds: the row positions of each line, in
    the line's order, and its Rows. Rows that make one line get it cut to them where `shape.fit`."""
    lines = pack_lines(table.lengths, rows, shape)
    if shape.fit and len(lines) == 1:
        shape = shape.fitted(int(table.lengths[lines[0]].sum()), len(lines[0]))
    return [(positions, line_rows(table, positions, pad_id, shape)) for positions in lines]
