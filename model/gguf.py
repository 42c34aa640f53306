"""A llama.cpp GGUF file of a Llama-architecture model → a Hugging Face-layout folder that `load_llama` and
`load_tokenizer` read: `config.json`, `model.safetensors` (dequantized to float32), `tokenizer_bpe.json`; and back:
`write_gguf` writes such a model (merged weights, config, byte-level BPE tokenizer) as one llama.cpp GGUF file."""
import json
import re
from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from safetensors.numpy import save_file

from common.errors import UserError
from common.files import atomic_folder
from model.config import LlamaConfig
from model.tokenizer import BPE_FILE, BPE_FORMAT, BYTE_LEVEL_SPLITS, check_runs_on_tiktoken, load_tokenizer

BLOCK_TENSORS = {  # llama.cpp name inside blk.N -> Hugging Face name inside model.layers.N
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
MODEL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

REQUIRED = object()


def _field(reader: gguf.GGUFReader, key: str, default=REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is REQUIRED:
            raise UserError(f"{reader.data.filename}: GGUF field {key} is missing")
        return default
    return field.contents()


def _float32(value: float) -> float:
    """The shortest decimal that a float32 field rounds to (9.999999747378752e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _config(reader: gguf.GGUFReader) -> dict:
    source = reader.data.filename
    hidden, heads = _field(reader, "llama.embedding_length"), _field(reader, "llama.attention.head_count")
    head_dim = _field(reader, "llama.attention.key_length", hidden // heads)
    rotary = _field(reader, "llama.rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise UserError(f"{source}: llama.rope.dimension_count = {rotary} differs from the head size {head_dim}; "
                        f"partial rotary embeddings are not supported")
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # fastest-varying dimension first
    if "token_embd.weight" not in shapes:
        raise UserError(f"{source}: tensor token_embd.weight is missing")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in shapes:
        raise UserError(f"{source}: RoPE scaling (llama.rope.scaling.type = {scaling!r} or a rope_freqs.weight "
                        f"tensor) is not supported in GGUF conversion; use the Hugging Face checkpoint")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _field(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "vocab_size": shapes["token_embd.weight"][1],
        "max_position_embeddings": _field(reader, "llama.context_length"),
        "rope_theta": _float32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "rms_norm_eps": _float32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": "blk.0.ffn_up.bias" in shapes,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def _tokenizer_spec(reader: gguf.GGUFReader) -> dict:
    source = reader.data.filename
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{source}: tokenizer.ggml.model = {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_SPLITS:
        raise UserError(f"{source}: tokenizer.ggml.pre = {pre!r} is not supported "
                        f"(supported: {', '.join(BYTE_LEVEL_SPLITS)})")
    tokens, token_types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    check_runs_on_tiktoken(source, tokens, token_types, merges)
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    return {
        "format": BPE_FORMAT,
        "pre": pre,
        "bos_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_id": eos_id,
        "pad_id": _field(reader, "tokenizer.ggml.padding_token_id", eos_id),
        "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "tokens": tokens,
        "token_types": token_types,
        "merges": merges,
    }


def _hf_name(gguf_name: str, source: str) -> str:
    if gguf_name in MODEL_TENSORS:
        return MODEL_TENSORS[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match is None or match[2] not in BLOCK_TENSORS:
        raise UserError(f"{source}: tensor {gguf_name} has no Hugging Face Llama counterpart")
    return f"model.layers.{match[1]}.{BLOCK_TENSORS[match[2]]}.{match[3]}"


def _interleaved_to_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: GGUF rotates interleaved pairs (2i, 2i+1) of each head's rows,
    Hugging Face rotates halves (i, i + head_dim/2)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensors(reader: gguf.GGUFReader, config: dict) -> dict[str, np.ndarray]:
    source = reader.data.filename
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, source)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if ".q_proj." in name:
            weight = _interleaved_to_halves(weight, config["num_attention_heads"])
        elif ".k_proj." in name:
            weight = _interleaved_to_halves(weight, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weight)
    return tensors


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Converts a Llama-architecture GGUF into a Hugging Face-layout folder, replacing `out_dir` atomically."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise UserError(f"{gguf_file}: GGUF file does not exist")
    try:
        reader = gguf.GGUFReader(gguf_file)
    except (ValueError, OSError) as err:
        raise UserError(f"{gguf_file}: not a readable GGUF file ({err})") from None
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise UserError(f"{gguf_file}: general.architecture = {architecture!r}, expected 'llama'")
    config = _config(reader)
    tokenizer = _tokenizer_spec(reader)
    tensors = _tensors(reader, config)

    with atomic_folder(out_dir) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / BPE_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
        load_tokenizer(tmp)  # what was written must read back
    return out_dir


GGUF_TYPES = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
              torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}
HF_TO_GGUF = {hf: name for name, hf in MODEL_TENSORS.items()} | {
    f"model.layers.N.{hf}": name for name, hf in BLOCK_TENSORS.items()}


def _gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    name = match and HF_TO_GGUF.get(f"model.layers.N.{match[2]}")
    if name is None:
        raise UserError(f"tensor {hf_name} has no GGUF Llama counterpart")
    return f"blk.{match[1]}.{name}.{match[3]}"


def _halves_to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k permutation, the inverse of `_interleaved_to_halves`."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def write_gguf(path: Path, raw_config: dict, tokenizer: dict, tensors: Iterable[tuple[str, torch.Tensor]],
               dtype: torch.dtype) -> None:
    """Writes Hugging Face-named Llama tensors, its config.json and a `tokenizer_bpe.json` spec as one GGUF file.
    Matrices are stored in `dtype`, 1-D tensors (norms, biases) in float32 as llama.cpp does."""
    config = LlamaConfig.from_dict(raw_config, str(path))
    if config.rope_scaling is not None:
        raise UserError(f"{path}: RoPE scaling ({config.rope_scaling.get('rope_type')}) is not supported "
                        f"in GGUF export")
    writer = gguf.GGUFWriter(path, "llama", use_temp_file=True)  # tensors spill to a temp file, not memory
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(GGUF_TYPES[dtype])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["token_types"])
    writer.add_token_merges(tokenizer["merges"])
    writer.add_bos_token_id(tokenizer["bos_id"])
    writer.add_eos_token_id(tokenizer["eos_id"])
    writer.add_pad_token_id(tokenizer["pad_id"])
    writer.add_add_bos_token(tokenizer["add_bos"])
    for name, tensor in tensors:
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if ".q_proj." in name:
            tensor = _halves_to_interleaved(tensor, config.num_attention_heads)
        elif ".k_proj." in name:
            tensor = _halves_to_interleaved(tensor, config.num_key_value_heads)
        tensor = tensor.to(dtype if tensor.dim() > 1 else torch.float32).contiguous()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its raw bits, typed for the writer
            writer.add_tensor(_gguf_name(name), tensor.view(torch.int16).numpy(),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(_gguf_name(name), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
