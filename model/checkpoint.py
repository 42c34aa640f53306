"""Hugging Face-layout checkpoints: `config.json` plus (sharded) safetensors, read tensor by tensor."""
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from common.errors import UserError
from model.config import LlamaConfig
from common.files import atomic_folder
from model.llama import Llama, rope_inv_freq
from model.nf4 import quantize_nf4

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shard_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise UserError(f"{index}: not a safetensors index ({err})") from None
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE_FILE).is_file():
        shards = [path / SINGLE_FILE]
    else:
        raise UserError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    for shard in shards:
        if not shard.is_file():
            raise UserError(f"{shard}: shard named in {INDEX_FILE} does not exist")
    return shards


def read_tensors(shards: list[Path]) -> Iterator[tuple[str, Tensor]]:
    """Yields (name, tensor) one at a time from memory-mapped shards."""
    for shard in shards:
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as err:
            raise UserError(f"{shard}: corrupt or truncated safetensors file ({err})") from None


def _set_tensor(model: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, value)


def load_llama(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quantize: str | None = None,
    head_rows: Sequence[int] | None = None,
) -> Llama:
    """Loads a Hugging Face-layout Llama folder; with quantize="nf4" each projection becomes a bitsandbytes
    4-bit linear as it is read, so the full-precision model never exists in memory. `head_rows` keeps only those
    rows of an untied lm_head, in that order (the label tokens a classifier reads): for the 8B, 1 GB of bf16 head
    the classifier never uses stays off the device."""
    if quantize not in (None, "nf4"):
        raise UserError(f"quantize={quantize!r} is not supported (use None or 'nf4')")
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: model folder does not exist")
    config = LlamaConfig.from_json(path / "config.json")
    shards = shard_files(path)
    with torch.device("meta"):
        model = Llama(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # a tied lm_head is listed once
    loaded = set()
    for name, tensor in read_tensors(shards):
        if name not in expected:
            raise UserError(f"{path}: unexpected tensor {name} {tuple(tensor.shape)} in checkpoint")
        if tuple(tensor.shape) != expected[name]:
            raise UserError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        module_name, _, kind = name.rpartition(".")
        if name == "lm_head.weight" and head_rows is not None and not config.tie_word_embeddings:
            model.lm_head.out_features = len(head_rows)
            model.head_rows = tuple(head_rows)
            tensor = tensor[list(head_rows)]
        if quantize == "nf4" and kind == "weight" and module_name.rsplit(".", 1)[-1] in PROJECTIONS:
            bias = model.get_submodule(module_name).bias  # read already, or still on meta and set when read
            _set_tensor(model, module_name, quantize_nf4(tensor.to(device=device, dtype=dtype), dtype, bias))
        else:
            _set_tensor(model, name, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{path}: tensor {missing[0]}{more} missing from checkpoint")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config, device=device)
    return model.eval()


def save_llama(model: Llama, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Writes `config.json` and `model.safetensors` (Hugging Face layout), atomically."""
    out_dir = Path(out_dir)
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if tensor.dtype == torch.uint8 or ".weight." in name:
            raise UserError(f"save_llama: {name} is quantized; only a full-precision model can be saved")
        state[name] = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
    with atomic_folder(out_dir) as tmp:
        save_file(state, tmp / SINGLE_FILE, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
