"""Where a QLoRA training step spends its GPU time: kernel time by kind (GEMM, 4-bit dequantize, attention,
fused elementwise, copies) beside the step's wall time (the gap is the GPU waiting on the host), for our path on the 8B shape, one JSON line, plus torch.profiler's top kernels on stderr.

    python bench/profile_train.py [--checkpoint DIR] [--tiny] [--compile] [--cuda-graphs] [--fp8] [--configs 8x512:ckpt] [--steps 2]
"""
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_train import ours, parse_config  # noqa: E402
from bench.common import checkpoint_path, clock, emit, env_info, parser, pick_device, release  # noqa: E402
from model import LlamaConfig  # noqa: E402

# First match wins; names are CUDA kernel names as the profiler reports them.
KINDS = (
    ("dequantize_4bit", ("dequantize", "kDequantize")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")),
    ("fused_elementwise", ("triton",)),
    ("copy_cast", ("copy", "cast", "Memcpy", "Memset", "fill")),
    ("reduce", ("reduce", "norm")),
    ("optimizer", ("foreach", "multi_tensor")),
)


def kind_of(kernel: str) -> str:
    lowered = kernel.lower()
    return next((kind for kind, marks in KINDS if any(m.lower() in lowered for m in marks)), "other_elementwise")


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="8x512:ckpt", help="comma-separated BxT:ckpt|ckptN|nockpt")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--fp8", action="store_true", help="the 4-bit base multiplies in FP8")
    p.add_argument("--activation-memory-budget", type=float, help="as bench_train.py's (default: as run.py train)")
    p.add_argument("--checkpoint-whole-blocks", action="store_true", help="as bench_train.py's")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=64)
    p.add_argument("--top", type=int, default=30, help="kernels listed on stderr")
    args = p.parse_args()
    path, device = checkpoint_path(args), pick_device()
    vocab = LlamaConfig.from_json(path / "config.json").vocab_size
    set_checkpointing, step, _, _ = ours(path, device, args)
    record = {"bench": "profile_train", "compile": args.compile, "cuda_graphs": args.cuda_graphs, "fp8": args.fp8,
              "steps": args.steps}
    for config in args.configs.split(","):
        batch, seq, checkpointing = parse_config(config)
        set_checkpointing(checkpointing)
        tokens = torch.randint(0, vocab, (batch, seq), device=device)
        for _ in range(args.warmup):
            step(tokens)
        start = clock(device)
        for _ in range(args.steps):
            step(tokens)
        step_ms = (clock(device) - start) * 1e3 / args.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step(tokens)
            clock(device)  # waits for the GPU
        by_kind: dict[str, float] = defaultdict(float)
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        for e in kernels:
            by_kind[kind_of(e.key)] += e.self_device_time_total / 1e3 / args.steps
        print(f"--- {config} ---", file=sys.stderr)
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]:
            print(f"{e.self_device_time_total / 1e3 / args.steps:9.2f} ms  {e.count // args.steps:6d}x  "
                  f"{kind_of(e.key):18s} {e.key[:110]}", file=sys.stderr)
        record[config] = {"step_ms": round(step_ms, 1), "kernel_ms_per_step": round(sum(by_kind.values()), 1),
                          "by_kind_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}
        if args.compile:
            record[config]["activation_memory_budget"] = torch._functorch.config.activation_memory_budget
        release(device)
    emit({**record, **env_info()})


if __name__ == "__main__":
    main()
