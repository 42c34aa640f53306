"""Adapters in peft's file format: `adapter_config.json` and `adapter_model.safetensors`."""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import UserError
from lora.inject import apply_lora, lora_layers
from common.files import atomic_folder, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's key names."""
    return {f"{PEFT_PREFIX}{name}.{key}": p.detach()
            for name, layer in lora_layers(model).items() for key, p in layer.adapter_parameters().items()}


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str = "") -> None:
    """Writes the adapter in peft's format, atomically (a temp folder renamed into place)."""
    if not lora_layers(model):
        raise UserError("save_adapter: the model has no LoRA layers")
    out_dir = Path(out_dir)
    config = {**model.lora_config, "peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
              "base_model_name_or_path": str(base_model_name_or_path), "fan_in_fan_out": False,
              "inference_mode": True, "use_rslora": False, "modules_to_save": None}
    tensors = {k: v.to("cpu", torch.float32).contiguous() for k, v in adapter_state_dict(model).items()}
    with atomic_folder(out_dir) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    config = read_json(file, f"{path}: no {CONFIG_FILE}")
    for key, wanted in (("peft_type", "LORA"), ("use_rslora", False), ("use_dora", False), ("bias", "none")):
        if config.get(key, wanted) != wanted:
            raise UserError(f"{file}: {key}={config[key]!r} is not supported (expected {wanted!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise UserError(f"{file}: {key}={config[key]!r} is not supported")
    if not isinstance(config.get("target_modules"), list):
        raise UserError(f"{file}: target_modules={config.get('target_modules')!r} must be a list of projection names")
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        config["layers_to_transform"] = [layers]
    elif layers is not None and not isinstance(layers, list):
        raise UserError(f"{file}: layers_to_transform={layers!r} must be a list of block numbers")
    return config


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter folder's checked config and its tensors under peft's key names."""
    path = Path(adapter_dir)
    config = _read_config(path)
    try:
        return config, load_file(path / WEIGHTS_FILE)
    except FileNotFoundError:
        raise UserError(f"{path}: no {WEIGHTS_FILE}") from None
    except SafetensorError as err:
        raise UserError(f"{path / WEIGHTS_FILE}: corrupt or truncated safetensors file ({err})") from None


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Injects the LoRA layers an adapter folder describes (written here or by peft) and loads its weights."""
    path = Path(adapter_dir)
    config, tensors = read_adapter(path)
    apply_lora(model, int(config["r"]), float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
               targets=tuple(config["target_modules"]), layers=config.get("layers_to_transform"), verbose=False)
    expected = adapter_state_dict(model)
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected:
        raise UserError(f"{path}: adapter tensor {unexpected[0]} does not fit the model "
                        f"({len(unexpected)} unexpected; targets {config['target_modules']})")
    if missing:
        raise UserError(f"{path}: adapter tensor {missing[0]} missing ({len(missing)} missing)")
    with torch.no_grad():
        for key, param in expected.items():
            if tensors[key].shape != param.shape:
                raise UserError(f"{path}: adapter tensor {key} has shape {tuple(tensors[key].shape)}, "
                                f"expected {tuple(param.shape)}")
            param.copy_(tensors[key])
    return model
