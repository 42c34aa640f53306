"""`python run.py train ...` end to end as a user runs it, timed from outside: seconds from the command's start to
its first optimizer step, the median real (unpadded) tokens/s of the steps after the first `--skip` ones (from the
run's metrics.jsonl), the peak GPU memory and wall time (from summary.json).

    python bench/bench_run.py [--skip 2] [--label NAME] [--nproc N] -- train --model DIR --data TABLE ... --out RUN

With --nproc N the command runs under `torchrun --standalone --nproc-per-node N` (data-parallel, one GPU each); the
peak GPU memory is then the largest of any rank's.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import emit, env_info, parse_with_run_command  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip", type=int, default=2, help="steps left out of the median (compilation, warm-up)")
    parser.add_argument("--label", default="run.py train")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) under torchrun")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before the run and every process it started are killed")
    args, command = parse_with_run_command(parser)
    out = Path(command[command.index("--out") + 1])
    metrics = out / "metrics.jsonl"

    started = time.perf_counter()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
                "--"] if args.nproc > 1 else [sys.executable]
    # its own session, so that a timeout ends torchrun's workers too and leaves no process holding our output open
    process = subprocess.Popen([*launcher, str(REPO / "run.py"), *command], start_new_session=True)
    first_step_s = None
    while process.poll() is None:
        if first_step_s is None and metrics.is_file() and metrics.stat().st_size:
            first_step_s = time.perf_counter() - started
        if args.timeout and time.perf_counter() - started > args.timeout:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise SystemExit(f"run.py killed after {args.timeout:.0f} s ({args.label})")
        time.sleep(0.2)
    wall_s = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"run.py exited with {process.returncode}")

    steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    timed = [r["tokens_per_s"] for r in steps[args.skip:]] or [r["tokens_per_s"] for r in steps]
    emit({"bench": "run", "label": args.label, "command": " ".join(command), "processes": args.nproc,
          "steps": len(steps),
          "median_real_tokens_per_s": round(statistics.median(timed)), "first_step_s": round(first_step_s or 0, 1),
          "wall_s": round(wall_s, 1), "peak_gpu_allocated_gb": summary["peak_gpu_allocated_gb"],
          "skipped_steps": summary.get("skipped_steps"), "final": {k: summary["final"].get(k) for k in
                                                                   ("accuracy", "auroc")}, **env_info()})


if __name__ == "__main__":
    main()
