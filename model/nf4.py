"""NF4 (4-bit NormalFloat, double-quantized) linears through bitsandbytes, as QLoRA uses for the frozen base."""
import torch
from torch import Tensor, nn


def quantize_nf4(weight: Tensor, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A bias-free bitsandbytes `Linear4bit` holding `weight` [out, in] in NF4, on the weight's device."""
    import bitsandbytes as bnb  # imported on use: the float path needs no bitsandbytes

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     module=layer)._quantize(weight.device)
    return layer


def dequantize_nf4(layer: nn.Module) -> Tensor:
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
