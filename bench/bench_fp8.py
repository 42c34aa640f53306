"""The FP8 lever alone: each projection shape of Llama-3.1-8B on M tokens, bitsandbytes' NF4 path (dequantize to
bf16, bf16 GEMM) beside ours in FP8 (one-pass NF4 → e4m3, row-scaled float8 GEMM), forward and input gradient,
and the pieces of each (dequantization, GEMM). GPU milliseconds per call, replayed from CUDA graphs (no host time),
median of --repeats; one JSON line.

    python bench/bench_fp8.py [--tokens 4096] [--repeats 20]
"""
import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import emit, env_info  # noqa: E402
from model.fp8 import fp8_linear, nf4_parts, quantize_rows, use_fp8  # noqa: E402
from model.fp8_triton import nf4_to_fp8_triton  # noqa: E402
from model.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402

SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate_proj/up_proj": (14336, 4096),
          "down_proj": (4096, 14336)}  # (out, in)
PER_BLOCK = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1}


def gpu_ms(fn: Callable[[], object], repeats: int, calls: int = 10) -> float:
    """GPU time of one call of `fn`: `calls` calls recorded as one CUDA graph, so that no host launch shows."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def measure(out_features: int, in_features: int, tokens: int, repeats: int) -> dict[str, float]:
    holder = torch.nn.Module()
    holder.layer = quantize_nf4(torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02)
    layer = holder.layer
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out_features, device="cuda", dtype=torch.bfloat16)
    weight = dequantize_nf4(layer, torch.bfloat16)
    times = {
        "bnb_forward": gpu_ms(lambda: layer(x), repeats),
        "bnb_forward_backward": gpu_ms(lambda: layer(x).backward(grad), repeats),
        "bnb_dequantize": gpu_ms(lambda: dequantize_nf4(layer, torch.bfloat16), repeats),
        "bf16_gemm": gpu_ms(lambda: x @ weight.t(), repeats),
    }
    use_fp8(holder)
    parts, scale = nf4_parts(layer), layer.fp8_scale
    x8, x_scale = quantize_rows(x.detach())
    weight8 = nf4_to_fp8_triton(parts, scale)
    times |= {
        "fp8_forward": gpu_ms(lambda: fp8_linear(x, layer), repeats),
        "fp8_forward_backward": gpu_ms(lambda: fp8_linear(x, layer).backward(grad), repeats),
        "fp8_dequantize": gpu_ms(lambda: nf4_to_fp8_triton(parts, scale), repeats),
        "fp8_dequantize_transposed": gpu_ms(lambda: nf4_to_fp8_triton(parts, scale, transpose=True), repeats),
        "fp8_quantize_rows_eager": gpu_ms(lambda: quantize_rows(x.detach()), repeats),
        "fp8_gemm": gpu_ms(lambda: torch._scaled_mm(x8, weight8.t(), scale_a=x_scale, scale_b=scale[None, :],
                                                    out_dtype=torch.bfloat16, use_fast_accum=True), repeats),
    }
    flops = 2 * tokens * in_features * out_features
    times["bf16_gemm_tflops"] = flops / times["bf16_gemm"] / 1e9
    times["fp8_gemm_tflops"] = flops / times["fp8_gemm"] / 1e9
    return {k: round(v, 3) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="rows of activations (8 x 512 by default)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    record = {"bench": "fp8", "tokens": args.tokens}
    for name, (out_features, in_features) in SHAPES.items():
        record[name] = measure(out_features, in_features, args.tokens, args.repeats)
        print(name, record[name], file=sys.stderr)
    for kind in ("bnb_forward_backward", "fp8_forward_backward"):  # one decoder block's seven projections
        record[f"block_{kind}_ms"] = round(sum(record[n][kind] * k for n, k in PER_BLOCK.items()), 3)
    emit({**record, **env_info()})


if __name__ == "__main__":
    main()
