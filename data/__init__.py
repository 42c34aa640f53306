"""Tables → validated rows → prompts → token ids (cached) → length-bucketed, right-padded batches."""
from data.batches import (LINE_QUANTUM, LineShape, PackedLine, budget_batches, collate, collate_line, pack_lines,
                          padded_length, scoring_shards, split_tokens, train_batch_order)
from data.split import split_train_val, validation_rows
from data.tables import read_labels, read_table, required_columns, table_labels
from data.templates import Template, get_template, label_token_ids
from data.tokenize import Tokenized, tokenize_table

__all__ = [
    "LINE_QUANTUM",
    "LineShape",
    "PackedLine",
    "Template",
    "Tokenized",
    "budget_batches",
    "collate",
    "collate_line",
    "get_template",
    "label_token_ids",
    "pack_lines",
    "padded_length",
    "read_labels",
    "read_table",
    "required_columns",
    "scoring_shards",
    "split_tokens",
    "split_train_val",
    "table_labels",
    "tokenize_table",
    "train_batch_order",
    "validation_rows",
]
