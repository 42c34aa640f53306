"""NF4 (4-bit NormalFloat, double-quantized) linears through bitsandbytes, as QLoRA uses for the frozen base."""
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.fp8 import fp8_linear


@functools.cache  # one class for every layer, so that one compiled graph serves all the blocks
def _nf4_linear_class() -> type[nn.Module]:
    import bitsandbytes as bnb  # imported on use: the float path needs no bitsandbytes

    class NF4Linear(bnb.nn.Linear4bit):
        """bitsandbytes' `Linear4bit`, except on the CPU, where its kernels are wrong for us: on AVX512-BF16
        CPUs an eval-mode forward repacks the weight into a CPU-only layout (and fails when the input size is not
        a multiple of the block size), and the AVX-512 dequantization reads one scale per block of a row, wrong
        when a row is not a whole number of blocks. There the weight is dequantized in the standard layout."""

        def forward(self, x: Tensor) -> Tensor:
            if getattr(self, "fp8_scale", None) is not None:  # switched by model.fp8.use_fp8
                return fp8_linear(x, self)
            if x.device.type != "cpu":
                return super().forward(x)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, dequantize_nf4(self, x.dtype), bias)

    return NF4Linear


def is_nf4(module: nn.Module) -> bool:
    return isinstance(module, _nf4_linear_class())


def quantize_nf4(weight: Tensor, compute_dtype: torch.dtype = torch.bfloat16, bias: Tensor | None = None) -> nn.Module:
    """A bitsandbytes 4-bit linear holding `weight` [out, in] in NF4 (and `bias` [out] as it is), on the weight's
    device."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = _nf4_linear_class()(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                                 compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     module=layer)._quantize(weight.device)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def dequantize_nf4(layer: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The weight [out, in] of a `quantize_nf4` layer, in `dtype` (default: the dtype it was quantized from)."""
    import bitsandbytes as bnb

    data, state = layer.weight.data, layer.weight.quant_state
    dtype = dtype or state.dtype
    if data.device.type != "cpu":
        return bnb.functional.dequantize_4bit(data, state).to(dtype)
    # On the CPU in plain torch: bitsandbytes' AVX-512 kernel misreads rows that are not whole blocks (NF4Linear).
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(absmax, state.state2) + state.offset
    packed = data.view(torch.uint8).reshape(-1, 1)
    codes = torch.cat((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:state.shape.numel()]  # high nibble first
    values = state.code.to(data.device)[codes.long()]
    # Blocks run over the flattened weight; the last one may be short.
    values = F.pad(values, (0, -values.numel() % state.blocksize)).view(-1, state.blocksize)
    weight = (values * absmax.float().view(-1, 1)).view(-1)[:state.shape.numel()]
    return weight.view(state.shape).to(dtype)
