"""Tokenizers behind one interface: Meta's Llama-3 tiktoken BPE, a Llama-2 sentencepiece model, and the
byte-level BPE that `model.gguf` extracts from a GGUF file (run by tiktoken too).

Special tokens written inside text are encoded as plain text (Meta's default, `disallowed_special=()`), so a
question or solution can never inject a control token; `bos`/`eos` are the only way specials enter `encode`.
"""
import base64
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sentencepiece
import tiktoken

from common.errors import UserError

BPE_FILE = "tokenizer_bpe.json"  # written by model.gguf.convert_gguf
MODEL_FILE = "tokenizer.model"  # Llama-3 tiktoken ranks or Llama-2 sentencepiece
BPE_FORMAT = "gguf-byte-level-bpe/1"
BPE_KEYS = ("pre", "bos_id", "eos_id", "pad_id", "add_bos", "tokens", "token_types", "merges")

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_BASE_TOKENS = 128000
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
LLAMA3_SPECIALS = LLAMA3_NAMED_SPECIALS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_NAMED_SPECIALS))
]

# GPT-2's byte-level pre-tokenizer; the "split every digit" variants first cut out each digit and then apply
# GPT-2's rule to the rest, so a whitespace run ending before a digit stays whole (`(?![^\s\p{N}])`).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DIGITS_THEN_GPT2_SPLIT = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
BYTE_LEVEL_SPLITS = {  # tokenizer.ggml.pre -> split rule, as llama.cpp defines them
    "gpt2": GPT2_SPLIT,
    "smollm": DIGITS_THEN_GPT2_SPLIT,
    "starcoder": DIGITS_THEN_GPT2_SPLIT,
}
NORMAL, CONTROL = 1, 3  # GGUF token types


def _fingerprint(kind: str, *parts: bytes | str) -> str:
    digest = hashlib.sha256(kind.encode())
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:20]


class TiktokenTokenizer:
    """A tiktoken `Encoding` plus the ids a model needs. Ids at or above `vocab_size` stand for bytes the
    vocabulary lacks; `encode` refuses text containing them instead of dropping it."""

    def __init__(self, encoding: tiktoken.Encoding, vocab_size: int, bos_id: int, eos_id: int, pad_id: int,
                 add_bos: bool, fingerprint: str):
        self.encoding = encoding
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos
        self.fingerprint = fingerprint

    def _checked(self, text: str, ids: list[int]) -> list[int]:
        if ids and max(ids) >= self.vocab_size:
            char = next(c for c in text if max(self.encoding.encode_ordinary(c)) >= self.vocab_size)
            raise UserError(f"text {text[:40]!r}...: character {char!r} (U+{ord(char):04X}) has a byte "
                            f"that this tokenizer's vocabulary cannot represent")
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._checked(text, self.encoding.encode_ordinary(text))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One share of the texts per thread (tiktoken releases the GIL); a task per text costs a quarter more.
        threads = min(os.cpu_count() or 1, max(1, len(texts)))
        shares = [texts[i::threads] for i in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            encoded = list(pool.map(lambda share: [self.encoding.encode_ordinary(t) for t in share], shares))
        batch = [None] * len(texts)
        for i, share in enumerate(encoded):
            batch[i::threads] = share
        return [self._checked(text, ids) for text, ids in zip(texts, batch)]

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


class SentencePieceTokenizer:
    """A Llama-2 style sentencepiece model (`tokenizer.model`, binary protobuf)."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, content: bytes):
        self.processor = processor
        self.vocab_size = self.processor.vocab_size()
        self.bos_id, self.eos_id = self.processor.bos_id(), self.processor.eos_id()
        self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else self.eos_id
        self.add_bos = True
        self.fingerprint = _fingerprint("sentencepiece", content)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.processor.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


def llama3_tokenizer(path: Path, content: bytes) -> TiktokenTokenizer:
    """Meta's Llama-3 tokenizer: 128,000 ranked byte sequences followed by 256 special tokens."""
    ranks = {}
    for number, line in enumerate(content.splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise UserError(f"{path}:{number}: expected a base64 token and a rank, got {line[:60]!r}") from None
    if len(ranks) != LLAMA3_BASE_TOKENS:
        raise UserError(f"{path}: {len(ranks)} ranks, but a Llama-3 tokenizer.model has {LLAMA3_BASE_TOKENS}")
    specials = {token: LLAMA3_BASE_TOKENS + i for i, token in enumerate(LLAMA3_SPECIALS)}
    encoding = tiktoken.Encoding(name=str(path), pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks,
                                 special_tokens=specials)
    return TiktokenTokenizer(
        encoding, LLAMA3_BASE_TOKENS + len(specials), bos_id=specials["<|begin_of_text|>"],
        eos_id=specials["<|end_of_text|>"], pad_id=specials["<|finetune_right_pad_id|>"], add_bos=True,
        fingerprint=_fingerprint("llama3-tiktoken", LLAMA3_SPLIT, content),
    )


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters, in which byte-level vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def _merge_bpe(symbols: list[str], merge_rank: dict[tuple[str, str], int]) -> list[str]:
    """Merges-driven BPE as Hugging Face and llama.cpp run it: apply the best-ranked listed pair, repeat."""
    while len(symbols) > 1:
        ranked = [(merge_rank.get(pair, len(merge_rank)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(ranked)
        if rank == len(merge_rank):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _merge_ranks(source: str, tokens: list[str], token_types: list[int], merges: list[str]) -> dict:
    """tiktoken ranks a merged byte string by its token id; that is merges-driven BPE when every merge creates
    a new token and ids grow in merge order. Raises UserError otherwise."""
    ids = {token: i for i, token in enumerate(tokens) if token_types[i] == NORMAL}
    merge_rank, previous_id = {}, -1
    for number, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        made = ids.get(left + right)
        if left not in ids or right not in ids or made is None or made <= previous_id:
            raise UserError(f"{source}: merge {number} {merge!r} does not create a token with a larger id than "
                            f"the merge before it, so this byte-level BPE cannot run on tiktoken")
        merge_rank[left, right] = number
        previous_id = made
    return merge_rank


def check_runs_on_tiktoken(source: str, tokens: list[str], token_types: list[int], merges: list[str]) -> None:
    """Besides the merge order (checked at every load), tiktoken returns a pre-token whole when it is in the
    vocabulary, so every token must be what merges-driven BPE makes of its own spelling. Run once, when
    `convert_gguf` writes the tokenizer: it takes seconds."""
    merge_rank = _merge_ranks(source, tokens, token_types, merges)
    for token, kind in zip(tokens, token_types):
        if kind == NORMAL and len(token) > 1 and _merge_bpe(list(token), merge_rank) != [token]:
            raise UserError(f"{source}: token {token!r} is not what its merges produce from its own spelling, "
                            f"so this byte-level BPE cannot run on tiktoken")


def byte_level_tokenizer(path: Path, spec: dict, content: bytes) -> TiktokenTokenizer:
    """The byte-level BPE that `convert_gguf` writes from a GGUF's tokenizer.ggml.* fields."""
    missing = [key for key in BPE_KEYS if key not in spec]
    if missing:
        raise UserError(f"{path}: {BPE_FORMAT} file lacks {', '.join(missing)}")
    tokens, types = spec["tokens"], spec["token_types"]
    if spec["pre"] not in BYTE_LEVEL_SPLITS:
        raise UserError(f"{path}: pre-tokenizer {spec['pre']!r} is not supported "
                        f"(supported: {', '.join(BYTE_LEVEL_SPLITS)})")
    unsupported = next((i for i, kind in enumerate(types) if kind not in (NORMAL, CONTROL)), None)
    if unsupported is not None:
        raise UserError(f"{path}: token {unsupported} {tokens[unsupported]!r} has token type "
                        f"{types[unsupported]}; only normal (1) and control (3) tokens are supported")
    _merge_ranks(str(path), tokens, types, spec["merges"])
    to_byte = {char: byte for byte, char in byte_to_unicode().items()}
    ranks, specials = {}, {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == CONTROL:
            specials[token] = i
        elif any(char not in to_byte for char in token):
            raise UserError(f"{path}: token {i} {token!r} is not spelled in the byte-level alphabet")
        else:
            ranks[bytes(to_byte[char] for char in token)] = i
    for byte in range(256):  # tiktoken needs every byte; one the vocabulary lacks gets an id past its end
        ranks.setdefault(bytes([byte]), len(tokens) + byte)
    encoding = tiktoken.Encoding(name=str(path), pat_str=BYTE_LEVEL_SPLITS[spec["pre"]], mergeable_ranks=ranks,
                                 special_tokens=specials)
    return TiktokenTokenizer(encoding, len(tokens), bos_id=spec["bos_id"], eos_id=spec["eos_id"],
                             pad_id=spec["pad_id"], add_bos=spec["add_bos"],
                             fingerprint=_fingerprint(BPE_FORMAT, BYTE_LEVEL_SPLITS[spec["pre"]], content))


def _read_tokenizer_file(path: Path) -> TiktokenTokenizer | SentencePieceTokenizer:
    content = path.read_bytes()
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", content):
        return llama3_tokenizer(path, content)
    if content.startswith(b"{"):
        try:
            spec = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            spec = None
        if isinstance(spec, dict) and spec.get("format") == BPE_FORMAT:
            return byte_level_tokenizer(path, spec, content)
    else:
        try:
            processor = sentencepiece.SentencePieceProcessor(model_proto=content)
        except RuntimeError:
            processor = None
        if processor is not None and processor.vocab_size() > 0:
            return SentencePieceTokenizer(processor, content)
    raise UserError(f"{path}: not a tokenizer this project reads (expected Llama-3 tiktoken ranks, "
                    f"a sentencepiece model, or {BPE_FILE} written by convert_gguf)")


def load_tokenizer(path: str | Path) -> TiktokenTokenizer | SentencePieceTokenizer:
    """The tokenizer in a model folder (`tokenizer_bpe.json`, `tokenizer.model` or `original/tokenizer.model`,
    first found wins) or in the named file; the kind is decided by the file's content."""
    path = Path(path)
    if path.is_file():
        return _read_tokenizer_file(path)
    tried = [path / BPE_FILE, path / MODEL_FILE, path / "original" / MODEL_FILE]
    for candidate in tried:
        if candidate.is_file():
            return _read_tokenizer_file(candidate)
    raise UserError(f"no tokenizer found: tried {', '.join(str(p) for p in tried)}")
