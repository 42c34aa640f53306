"""The float8 GEMM alone, on the 8B's product shapes (forward, and the input gradient's, whose K is the projection's
output) and on q/k/v or gate/up merged into one product: row-wise scaled e4m3 → bf16 with cuBLAS' fast
accumulation off (`fast0_*`) and on (`fast1_*`): GPU microseconds a call (bench_fp8's CUDA-graph timing), TFLOP/s,
and the relative error against float32 arithmetic on the same float8 operands; the bf16 GEMM of the same shape
beside them. One JSON line per shape. (bench/results/h100-fp8-fast-accumulation.jsonl was recorded by this script
as of commit 161a689, which timed one replay of 50 calls rather than the median of --repeats.)

    python bench/bench_scaled_mm.py [--repeats 20]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_fp8 import gpu_ms  # noqa: E402
from model.fp8 import quantize_rows  # noqa: E402

M = 4096  # tokens
SHAPES = [("q/o", 4096, 4096), ("kv", 1024, 4096), ("qkv", 6144, 4096), ("gate/up", 14336, 4096),
          ("gate+up", 28672, 4096), ("down", 4096, 14336), ("bwd gate (K=N)", 4096, 14336),
          ("bwd gate+up", 4096, 28672), ("bwd qkv", 4096, 6144)]  # (name, N, K)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    for name, n, k in SHAPES:
        a = torch.randn(M, k, device="cuda")
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        a8, a_scale = quantize_rows(a)
        w8, w_scale = quantize_rows(w)
        truth = (a8.float() * a_scale) @ (w8.float() * w_scale).t()
        record = {"shape": name, "M": M, "N": n, "K": k}
        for fast in (False, True):
            def product() -> torch.Tensor:
                return torch._scaled_mm(a8, w8.t(), scale_a=a_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)
            error = float((product().float() - truth).norm() / truth.norm())
            us = gpu_ms(product, args.repeats, calls=50) * 1000
            record[f"fast{int(fast)}_us"] = round(us, 1)
            record[f"fast{int(fast)}_tflops"] = round(2 * M * n * k / us / 1e6, 0)
            record[f"fast{int(fast)}_relerr"] = error
        a16, w16 = a.bfloat16(), w.bfloat16()
        record["bf16_us"] = round(gpu_ms(lambda: a16 @ w16.t(), args.repeats, calls=50) * 1000, 1)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
