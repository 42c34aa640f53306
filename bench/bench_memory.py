"""Memory of the 4-bit load: GPU memory held by the loaded model and the peak host RSS while loading.

Each load runs in a fresh process, so its peak RSS (ru_maxrss) is the load's, imports and CUDA context included.
Targets (LoRA issue): after the load, GPU memory <= 6.5 GB; peak host RSS during the load <= 8 GB.

    python bench/bench_memory.py [--checkpoint DIR] [--tiny] [--impl ours|stack|both]
"""
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (GB, checkpoint_path, clock, emit, env_info, implementations, load_stack,  # noqa: E402
                          parser, pick_device, reset_peak)
from model import load_llama  # noqa: E402


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2)  # ru_maxrss is in KiB on Linux


def measure_load(impl: str, path: Path) -> dict:
    """Loads the checkpoint in 4 bits in this process and reports its memory."""
    device = pick_device()
    torch.zeros(1, device=device)  # the CUDA context, so the RSS before the load includes it
    rss_before = peak_rss_gb()
    reset_peak(device)
    start = clock(device)
    if impl == "ours":
        model = load_llama(path, dtype=torch.bfloat16, device=device, quantize="nf4")
    else:
        model = load_stack(path, device)
    seconds = clock(device) - start
    record = {"load_s": round(seconds, 1), "peak_rss_before_load_gb": rss_before, "peak_rss_gb": peak_rss_gb()}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        record.update(gpu_allocated_gb=round(torch.cuda.memory_allocated(device) / GB, 2),
                      gpu_reserved_gb=round(torch.cuda.memory_reserved(device) / GB, 2),
                      gpu_peak_allocated_during_load_gb=round(torch.cuda.max_memory_allocated(device) / GB, 2),
                      gpu_used_by_process_and_others_gb=round((total - free) / GB, 2))
    record["parameters_bytes_gb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / GB, 2)
    return record


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--child", choices=("ours", "stack"), help="internal: load in this process and print the record")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure_load(args.child, Path(args.checkpoint))))
        return
    path = checkpoint_path(args)
    record = {"bench": "memory", "checkpoint": str(path), "device": str(pick_device())}
    for impl in implementations(args):
        started = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--checkpoint", str(path), "--child", impl],
                             stdout=subprocess.PIPE, text=True)
        if run.returncode:
            raise SystemExit(f"bench_memory: loading with {impl} failed (exit {run.returncode})")
        record[impl] = json.loads(run.stdout.strip().splitlines()[-1])
        record[impl]["process_s"] = round(time.perf_counter() - started, 1)
    if "ours" in record and "stack" in record and record["ours"].get("gpu_allocated_gb"):
        record["gpu_allocated_ratio_ours_to_stack"] = round(
            record["ours"]["gpu_allocated_gb"] / record["stack"]["gpu_allocated_gb"], 3)
    emit({**record, **env_info()})


if __name__ == "__main__":
    main()
