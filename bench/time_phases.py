"""Where `python run.py train ...` spends its time before and around the first optimizer steps: wall-clock spans of
loading the base, tokenizing, compiling, recording CUDA graphs and the steps' launches, then torch's own compile
timers. Prints one JSON line (`bench: phases`) and the compile table.

    python bench/time_phases.py [--label NAME] -- train --model DIR --data TABLE ... --out RUN
"""
import argparse
import functools
import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch._functorch.partitioners  # noqa: E402

import run  # noqa: E402
import train.graphs  # noqa: E402
import train.loop  # noqa: E402
import train.setup  # noqa: E402
from bench.common import parse_with_run_command  # noqa: E402

spans: list[dict] = []


def timed(owner: object, name: str, label: str) -> None:
    """Replaces owner.name by a wrapper that appends its span (start and seconds since this script began)."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spans.append({"phase": label, "at_s": round(began - STARTED, 2),
                          "s": round(time.perf_counter() - began, 2)})
    setattr(owner, name, wrapper)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="run.py train")
    args, command = parse_with_run_command(parser)
    imported_s = time.perf_counter() - STARTED
    timed(train.setup.Base, "load_model", "load base")
    timed(train.loop, "tokenize_table", "tokenize")
    timed(train.loop, "apply_lora", "add LoRA")
    timed(train.graphs.BackwardGraphs, "_record", "record a CUDA graph (warm-up passes included)")
    timed(train.loop, "launch_optimizer_step", "launch a step")
    timed(train.loop, "predict_p_true", "score validation rows")
    timed(torch._functorch.partitioners, "choose_saved_values_set", "partitioner: what to save")
    status = run.main(command)
    record = {"bench": "phases", "label": args.label, "command": " ".join(command), "status": status,
              "imports_s": round(imported_s, 2), "wall_s": round(time.perf_counter() - STARTED, 2), "spans": spans,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__}
    print(json.dumps(record))
    print(torch._dynamo.utils.compile_times(repr="str", aggregate=True))
    return status


if __name__ == "__main__":
    sys.exit(main())
