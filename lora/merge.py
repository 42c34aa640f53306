import torch
from torch import nn

from common.errors import UserError
from lora.inject import lora_layers


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
