"""FP8 matmuls for the frozen 4-bit base, on GPUs that have them (compute capability 8.9+: H100, L4, RTX 4090).

Each NF4 weight [N, K] is dequantized straight to float8 e4m3 with one scale per output row (W ≈ s_n · W8, the row's
largest block reaching e4m3's largest value), and multiplied by activations quantized to e4m3 with one scale per
row. The input gradient multiplies the output gradient, its columns first scaled by s, by the same float8 weight
transposed. The tensor cores accumulate at their own precision (cuBLAS' fast accumulation, about 8 % less float8 GEMM
time on the 8B's shapes): on an H100 a product's error against float32 arithmetic on the same e4m3 operands goes from
0.17 % to 0.21-0.33 %, beside the ~3 % by which those operands already differ from the weights and activations. The
frozen weight gets no gradient; LoRA's low-rank update stays in bf16 around this (lora.LoRALinear). On the GPU the
dequantization is one Triton pass (model/fp8_triton.py), inside an op torch.compile cannot see into, so that a
compiled block neither keeps the float8 weight for its backward pass nor computes it twice. A CPU runs
the same arithmetic in plain torch (nf4_to_fp8, the reference the tests hold the kernel to) and emulates the float8
products in float32."""
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def fp8_unavailable(device: torch.device) -> str | None:
    """Why FP8 matmuls cannot run on `device`, or None when they can (a CPU emulates them, slowly)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"{device.type} has no FP8 matmuls"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} (compute capability {major}.{minor}) has no FP8 matmuls; they need 8.9+ (H100, L4, RTX 4090)"
    return None


def fp8_fits(out_features: int, in_features: int, blocksize: int = 64) -> bool:
    """Whether a 4-bit weight of this shape can multiply in FP8: its NF4 blocks tile each row (so a row scale is a
    max over whole blocks) and its sizes suit the float8 kernels (multiples of 16)."""
    return in_features % blocksize == 0 and in_features % 16 == 0 and out_features % 16 == 0


def fp8_eligible(layer: nn.Module) -> bool:
    state = layer.weight.quant_state
    return fp8_fits(*state.shape, state.blocksize)


class NF4Parts(NamedTuple):
    """The tensors of an NF4 weight [N, K] (bitsandbytes' layout): `packed` [N, K / 2] two 4-bit codes a byte,
    high nibble first; `code` [16] their values; one scale per block of `blocksize` along a row, itself
    double-quantized when `inner_absmax` is given (absmax = inner_code[absmax] · inner_absmax[block] + offset)."""
    packed: Tensor
    code: Tensor
    absmax: Tensor
    inner_code: Tensor | None
    inner_absmax: Tensor | None
    offset: Tensor | None
    inner_blocksize: int


def nf4_parts(layer: nn.Module) -> NF4Parts:
    state = layer.weight.quant_state
    out_features, in_features = state.shape
    packed = layer.weight.data.view(torch.uint8).view(out_features, in_features // 2)
    if not state.nested:
        return NF4Parts(packed, state.code, state.absmax, None, None, None, 0)
    inner = state.state2
    return NF4Parts(packed, state.code, state.absmax, inner.code, inner.absmax, state.offset, inner.blocksize)


def block_absmax(parts: NF4Parts) -> Tensor:
    """The float32 scale of each NF4 block, [N, K / blocksize]."""
    absmax = parts.absmax
    if parts.inner_absmax is not None:
        block = torch.arange(absmax.numel(), device=absmax.device) // parts.inner_blocksize
        absmax = parts.inner_code[absmax.long()] * parts.inner_absmax[block] + parts.offset
    return absmax.float().view(parts.packed.shape[0], -1)


def attach_row_scales(layer: nn.Module) -> None:
    """Give an NF4 layer `fp8_scale` [N], s_n = (largest |weight| its NF4 row can hold) / 448, which turns its
    forward into FP8 matmuls (model.nf4.NF4Linear)."""
    parts = nf4_parts(layer)
    scale = block_absmax(parts).amax(1) * parts.code.abs().max() / E4M3_MAX
    layer.register_buffer("fp8_scale", scale.clamp(min=torch.finfo(torch.float32).tiny), persistent=False)


def nf4_to_fp8(parts: NF4Parts, scale: Tensor, transpose: bool = False) -> Tensor:
    """The weight as e4m3 W8 with W ≈ scale[:, None] · W8: [N, K] contiguous, or [K, N] when `transpose` (the
    layout the input-gradient product needs)."""
    out_features, in_features = parts.packed.shape[0], parts.packed.shape[1] * 2
    block_factor = block_absmax(parts) * scale.reciprocal()[:, None]  # at most 448: the row's largest block
    codes = torch.stack((parts.packed >> 4, parts.packed & 0xF), dim=-1).view(*block_factor.shape, -1)
    weight = (parts.code[codes.long()] * block_factor[..., None]).view(out_features, in_features)
    if transpose:
        weight = weight.t()
    return weight.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous()


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] as e4m3 rows with one float32 scale each: x ≈ scale [M, 1] · x8."""
    x = x.float()
    scale = x.abs().amax(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _dequantize(parts: NF4Parts, scale: Tensor, transpose: bool) -> Tensor:
    if parts.packed.is_cuda:
        from model.fp8_triton import nf4_to_fp8_triton  # Triton comes with CUDA builds of torch only

        return nf4_to_fp8_triton(parts, scale, transpose)
    return nf4_to_fp8(parts, scale, transpose)


@torch.library.custom_op("llama_judge::nf4_fp8_product", mutates_args=())
def nf4_fp8_product(a8: Tensor, a_scale: Tensor, scale: Tensor, packed: Tensor, code: Tensor, absmax: Tensor,
                    inner_code: Optional[Tensor], inner_absmax: Optional[Tensor], offset: Optional[Tensor],
                    inner_blocksize: int, transpose: bool) -> Tensor:
    """bf16 a · Wᵀ [M, N] for e4m3 rows a = a_scale · a8 [M, K], W = scale[:, None] · W8 the NF4 weight (the parts
    after `scale`), or with `transpose` a · W8 [M, K] for a [M, N] (the caller folds `scale` into a). Opaque to
    torch.compile, so that the float8 weight is made where it is used and never kept for the backward pass."""
    weight8 = _dequantize(NF4Parts(packed, code, absmax, inner_code, inner_absmax, offset, inner_blocksize), scale,
                          transpose)
    weight_scale = torch.ones(1, weight8.shape[0], device=a8.device) if transpose else scale[None, :]
    if a8.is_cuda:
        return torch._scaled_mm(a8, weight8.t(), scale_a=a_scale, scale_b=weight_scale, out_dtype=torch.bfloat16,
                                use_fast_accum=True)
    return ((a8.float() * a_scale) @ (weight8.float().t() * weight_scale)).to(torch.bfloat16)  # CPU: emulated


@nf4_fp8_product.register_fake
def _(a8, a_scale, scale, packed, code, absmax, inner_code, inner_absmax, offset, inner_blocksize, transpose):
    return a8.new_empty(a8.shape[0], packed.shape[1] * 2 if transpose else scale.shape[0], dtype=torch.bfloat16)


class NF4MatmulFP8(torch.autograd.Function):
    """x [M, K] @ W.T in FP8 → bf16 [M, N] for an NF4 weight W (its row scales, then its NF4Parts flattened); a
    gradient for x only, W being frozen."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, *flat_parts) -> Tensor:
        parts = NF4Parts(*flat_parts)
        ctx.save_for_backward(scale, *(t for t in parts[:-1] if t is not None))
        ctx.inner_blocksize, ctx.dtype = parts.inner_blocksize, x.dtype
        return nf4_fp8_product(*quantize_rows(x), scale, *parts, False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        scale, *tensors = ctx.saved_tensors
        parts = NF4Parts(*tensors, *(None,) * (6 - len(tensors)), ctx.inner_blocksize)
        grad_x = nf4_fp8_product(*quantize_rows(grad.float() * scale[None, :]), scale, *parts, True)
        return (grad_x.to(ctx.dtype), None) + (None,) * len(parts)


def fp8_linear(x: Tensor, layer: nn.Module) -> Tensor:
    """An NF4 layer's forward through FP8 matmuls: x [..., K] → [..., N] in x's dtype."""
    out = NF4MatmulFP8.apply(x.reshape(-1, x.shape[-1]), layer.fp8_scale, *nf4_parts(layer)).to(x.dtype)
    if layer.bias is not None:
        out = out + layer.bias.to(x.dtype)
    return out.view(*x.shape[:-1], out.shape[-1])


def use_fp8(model: nn.Module) -> int:
    """Switch every eligible NF4 layer of `model` to FP8 matmuls; returns how many were switched."""
    from model.nf4 import is_nf4

    layers = [m for m in model.modules() if is_nf4(m) and fp8_eligible(m)]
    for layer in layers:
        attach_row_scales(layer)
    return len(layers)
