"""One pass from bitsandbytes' packed NF4 bytes to float8 e4m3 (model.fp8.nf4_to_fp8's arithmetic, on the GPU):
half a byte read per weight, one byte written, in the weight's layout or transposed."""
import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _nf4_to_fp8_kernel(packed, absmax, inner_code, inner_absmax, offset, code, scale, out, N, K,
                       NESTED: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCKSIZE: tl.constexpr,
                       INNER_BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
    """A tile of BLOCK_N rows × BLOCKS whole NF4 blocks: one scale per block, two code lookups per byte."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    blocks = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    row_ok = rows < N
    block_ok = row_ok[:, None] & (blocks[None, :] < K // BLOCKSIZE)  # [BLOCK_N, BLOCKS]
    block = rows[:, None] * (K // BLOCKSIZE) + blocks[None, :]
    if NESTED:
        block_scale = tl.load(absmax + block, mask=block_ok, other=0).to(tl.int32)
        block_scale = (tl.load(inner_code + block_scale) * tl.load(inner_absmax + block // INNER_BLOCKSIZE,
                                                                    mask=block_ok, other=0) + tl.load(offset))
    else:
        block_scale = tl.load(absmax + block, mask=block_ok, other=0).to(tl.float32)
    inverse = tl.math.div_rn(tl.full((BLOCK_N,), 1.0, tl.float32), tl.load(scale + rows, mask=row_ok, other=1.0))
    factor = block_scale * inverse[:, None]  # [BLOCK_N, BLOCKS]; a correctly rounded 1 / s, as torch's
    byte = tl.arange(0, BLOCKSIZE // 2)
    byte_ok = block_ok[:, :, None] & (byte[None, None, :] >= 0)
    data = tl.load(packed + block[:, :, None] * (BLOCKSIZE // 2) + byte[None, None, :], mask=byte_ok,
                   other=0).to(tl.int32)  # [BLOCK_N, BLOCKS, BLOCKSIZE / 2]
    high = tl.load(code + (data >> 4)) * factor[:, :, None]  # the high nibble is the first of the two weights
    low = tl.load(code + (data & 0xF)) * factor[:, :, None]
    values = tl.reshape(tl.interleave(high, low), (BLOCK_N, BLOCKS * BLOCKSIZE))
    values = tl.clamp(values, -448.0, 448.0).to(tl.float8e4nv)
    cols = tl.program_id(1) * BLOCKS * BLOCKSIZE + tl.arange(0, BLOCKS * BLOCKSIZE)
    mask = row_ok[:, None] & (cols[None, :] < K)
    if TRANSPOSE:
        tl.store(out + cols[:, None] * N + rows[None, :], tl.trans(values), mask=tl.trans(mask))
    else:
        tl.store(out + rows[:, None] * K + cols[None, :], values, mask=mask)


def nf4_to_fp8_triton(parts, scale: Tensor, transpose: bool = False) -> Tensor:
    """model.fp8.nf4_to_fp8 of the same NF4Parts and row scales: [N, K] or (`transpose`) [K, N] e4m3."""
    packed = parts.packed
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    shape = (in_features, out_features) if transpose else (out_features, in_features)
    out = torch.empty(shape, dtype=torch.float8_e4m3fn, device=packed.device)
    nested = parts.inner_absmax is not None
    blocksize = out_features * in_features // parts.absmax.numel()
    # Tiles timed on an H100 (bench/results/h100-fp8-dequant-tiles.txt): 32 rows x 256 values, or for the
    # transposed store 128 rows x 64 values (columns of 128 bytes).
    block_n, blocks = (128, max(64 // blocksize, 1)) if transpose else (32, max(256 // blocksize, 1))
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(in_features // blocksize, blocks))
    unused = parts.code  # a pointer for the arguments a flat absmax does not read
    _nf4_to_fp8_kernel[grid](
        packed, parts.absmax, parts.inner_code if nested else unused, parts.inner_absmax if nested else unused,
        parts.offset if nested else unused, parts.code, scale, out, out_features, in_features,
        NESTED=nested, TRANSPOSE=transpose, BLOCKSIZE=blocksize, INNER_BLOCKSIZE=max(parts.inner_blocksize, 1),
        BLOCK_N=block_n, BLOCKS=blocks)
    return out
