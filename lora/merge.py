import re
from pathlib import Path

import torch
from torch import Tensor, nn

from common.errors import UserError
from lora.adapter import PEFT_PREFIX, read_adapter
from lora.inject import lora_layers

LowRank = tuple[Tensor, Tensor, float]  # (A, B, alpha/r): the update is B @ A * alpha/r


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Folds (alpha/r)·B·A into each wrapped base weight and puts the plain base layer back in place."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if type(base) is not nn.Linear:
            raise UserError(f"merge_lora: {name} has a {type(base).__name__} base; merging needs an unquantized "
                            f"model (load it with quantize=None / --quant none)")
        base.weight += layer.delta_weight().to(base.weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def adapter_updates(adapter_dir: str | Path) -> dict[str, LowRank]:
    """The base weight each LoRA pair of a peft-format adapter updates (`model.layers.0.self_attn.q_proj.weight`)
    → its (A, B, alpha/r), checked against the adapter's target_modules and layers_to_transform."""
    config, tensors = read_adapter(adapter_dir)
    scaling = float(config["lora_alpha"]) / int(config["r"])
    layers = config.get("layers_to_transform")
    updates = {}
    for key in tensors:
        parts = key.removeprefix(PEFT_PREFIX).rsplit(".", 2)
        if not key.startswith(PEFT_PREFIX) or parts[1:] not in (["lora_A", "weight"], ["lora_B", "weight"]):
            raise UserError(f"{adapter_dir}: adapter tensor {key} is not a peft LoRA weight")
        module, block = parts[0], re.search(r"\.layers\.(\d+)\.", parts[0])
        if module.rsplit(".", 1)[-1] not in config["target_modules"] or (
                layers is not None and (block is None or int(block[1]) not in layers)):
            raise UserError(f"{adapter_dir}: adapter tensor {key} lies outside its target_modules / "
                            f"layers_to_transform")
        pair = (tensors.get(f"{PEFT_PREFIX}{module}.lora_A.weight"), tensors.get(f"{PEFT_PREFIX}{module}.lora_B.weight"))
        if pair[0] is None or pair[1] is None:
            raise UserError(f"{adapter_dir}: adapter tensor {key} has no lora_A / lora_B partner")
        updates[f"{module}.weight"] = (*pair, scaling)
    return updates


def merged_weight(name: str, weight: Tensor, update: LowRank) -> Tensor:
    """weight + B @ A * alpha/r, in float32."""
    a, b, scaling = update
    if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
        raise UserError(f"adapter update of {name} is {tuple(b.shape)} @ {tuple(a.shape)}, "
                        f"which does not fit the base weight {tuple(weight.shape)}")
    return weight.float() + (b.float() @ a.float()) * scaling
