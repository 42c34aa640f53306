"""`python run.py train ...` under torch.profiler for ten optimizer steps after the first `--after` (default 32):
the kernels by device time, by host time, and the window's wall time. It profiles the run a user starts, packing,
compiled blocks and CUDA graphs included, where bench/profile_train.py profiles a fixed batch.

    python bench/profile_run.py [--after 32] OUT.txt -- train --model DIR --data TABLE ... --out RUN
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run  # noqa: E402
import train.loop  # noqa: E402
from bench.common import parse_with_run_command  # noqa: E402

WARMUP, ACTIVE = 2, 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the text file the tables go to")
    parser.add_argument("--after", type=int, default=32, help="optimizer steps run before the ten profiled")
    args, command = parse_with_run_command(parser)
    skipped = max(args.after - WARMUP, 0)
    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=skipped, warmup=WARMUP, active=ACTIVE, repeat=1))
    launched_at: list[float] = []
    launch = train.loop.launch_optimizer_step

    def profiled_launch(*args, **kwargs):
        pending = launch(*args, **kwargs)
        launched_at.append(time.perf_counter())
        profiler.step()
        return pending

    train.loop.launch_optimizer_step = profiled_launch
    with profiler:
        status = run.main(command)
    first = skipped + WARMUP
    if len(launched_at) <= first + ACTIVE:
        print(f"the run launched {len(launched_at)} steps; the profile needs {first + ACTIVE + 1}", file=sys.stderr)
        return 2
    wall_ms = (launched_at[first + ACTIVE - 1] - launched_at[first - 1]) * 1e3
    events = profiler.key_averages()
    with args.out.open("w") as f:
        f.write(f"run.py exit status {status}; steps {first + 1}-{first + ACTIVE}: "
                f"{wall_ms:.1f} ms of host wall time\n")
        f.write(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
        f.write("\n\nBy host time\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))
    print(f"{args.out}: written")
    return status


if __name__ == "__main__":
    sys.exit(main())
