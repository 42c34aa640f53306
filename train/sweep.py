"""`run.py sweep`: one `run.py train` per combination of a grid of train flags, in child processes, one at a time or
one per GPU at a time (a failing run becomes a row, not the end of the sweep), then a table of their validation
metrics."""
import argparse
import csv
import io
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.errors import Interrupted, UserError
from common.files import atomic_write, read_json, write_json

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
COLUMNS = ("accuracy", "auroc", "log_loss", "ece", "wall_s", "peak_memory_gb")
LOWER_IS_BETTER = ("log_loss",)
NOT_IN_GRID = ("out", "resume")  # the sweep owns each run's folder
SETTINGS = "sweep.json"  # the grid and flags of the sweep in a folder, so that a rerun continues the same sweep


def parse_grid(text: str, train: argparse.ArgumentParser) -> dict[str, list[str]]:
    """{train flag: values} from "rank=16,64 lr=1e-4,2e-4"; a bad key or value is one UserError naming it."""
    options = {a.dest: a for a in train._actions if a.option_strings}
    grid: dict[str, list[str]] = {}
    for item in text.split():
        key, sep, values = item.partition("=")
        name = key.lstrip("-").replace("-", "_")
        flag = "--" + name.replace("_", "-")
        if not sep or not key or not all(values.split(",")):
            raise UserError(f"--grid: {item!r} is not flag=value[,value...]")
        if name not in options or name in NOT_IN_GRID or name == "help":
            raise UserError(f"--grid: {key!r} is not a flag of `run.py train` that a sweep can vary")
        if name in grid:
            raise UserError(f"--grid: {flag} is given twice")
        action = options[name]
        if action.nargs == 0:
            raise UserError(f"--grid: {flag} is a switch without a value; pass it after --grid to set it for every run")
        for value in values.split(","):
            try:
                converted = action.type(value) if action.type else value
            except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
                raise UserError(f"--grid: {flag}={value}: {err}") from None
            if action.choices and converted not in action.choices:
                raise UserError(f"--grid: {flag}={value}: must be one of {', '.join(map(str, action.choices))}")
        grid[name] = values.split(",")
    if not grid:
        raise UserError("--grid: no flags given")
    return grid


def run_name(combo: dict[str, str]) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", f"{key.replace('_', '-')}{value}") for key, value in combo.items())


def grid_argv(combo: dict[str, str]) -> list[str]:
    return [arg for key, value in combo.items() for arg in ("--" + key.replace("_", "-"), value)]


def visible_gpus() -> list[str]:
    """The GPUs a sweep may spread its runs over, as CUDA_VISIBLE_DEVICES names them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


class Children:
    """The sweep's running trainings. Each runs in a session of its own, so that a Ctrl-C at the terminal reaches
    the sweep alone, which passes each signal on once (a second signal to a run stops it at once: it must not get
    the terminal's and ours); once stopping, no new run starts."""

    def __init__(self):
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping: int = 0  # the signal that stops the sweep; 0 while none came

    def start(self, command: list[str], **kwargs) -> subprocess.Popen | None:
        with self.lock:
            if self.stopping:
                return None
            child = subprocess.Popen(command, start_new_session=True, **kwargs)
            self.running.add(child)
            return child

    def finished(self, child: subprocess.Popen) -> None:
        with self.lock:
            self.running.discard(child)

    def pass_on(self, signum: int, frame=None) -> None:
        with self.lock:
            self.stopping = self.stopping or signum
            for child in self.running:
                child.send_signal(signum)


def run_child(argv: list[str], gpu: str | None = None, log: Path | None = None,
              children: Children | None = None) -> str | None:
    """Runs `run.py train` with `argv` (on `gpu` alone, when given), its output passed through or, with `log`,
    written there; None on success, else its one-line error (its last `error:` line)."""
    error = None
    env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
    children = children or Children()
    sink = sys.stderr if log is None else open(log, "a")
    child = children.start([sys.executable, str(RUN_PY), "train", *argv], env=env, text=True, errors="replace",
                           stdout=None if log is None else sink, stderr=subprocess.PIPE)
    if child is None:
        if log is not None:
            sink.close()
        return "not started: the sweep was stopped"
    try:
        for line in child.stderr:  # text mode reads tqdm's carriage returns as line ends
            sink.write(line)
            if line.startswith("error: "):
                error = line.removeprefix("error: ").strip()
        status = child.wait()
    finally:
        child.wait()  # stopped, it saves its checkpoint first
        children.finished(child)
        if log is not None:
            sink.close()
    return None if status == 0 else error or f"exit status {status}"


def run_row(run_dir: Path, combo: dict[str, str], error: str | None) -> dict:
    row = {"run": run_dir.name, **combo, **dict.fromkeys(COLUMNS), "best": None, "error": error}
    if error is None:
        summary = json.loads((run_dir / "summary.json").read_text())
        row.update({k: summary["final"].get(k) for k in COLUMNS[:4]}, wall_s=summary["wall_s"],
                   peak_memory_gb=summary["peak_gpu_allocated_gb"] if summary["peak_gpu_allocated_gb"] is not None
                   else summary["peak_host_rss_gb"])
        best = summary.get("best_val")
        if best and best["value"] is not None:
            row["best"] = f"{best['metric']} {best['value']:.4f} at step {best['step']}"
    return row


def sort_rows(rows: list[dict], metric: str) -> list[dict]:
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return sorted(rows, key=lambda r: (r[metric] is None, sign * (r[metric] or 0)))


def cell(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_report(out: Path, rows: list[dict], keys: list[str], metric: str) -> None:
    flags = ["--" + k.replace("_", "-") for k in keys]
    header = ["run", *flags, "val accuracy", "val AUROC", "val log loss", "val ECE", "training s",
              "peak memory GB (GPU, else host RSS)", "best adapter", "error"]
    lines = [f"# Sweep, sorted by validation {metric}", "",
             "Metrics of each run's final adapter (`adapter/`) on its validation split.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = [r["run"], *(r[k] for k in keys), *(cell(r[c]) for c in COLUMNS[:4]), cell(r["wall_s"], 1),
                  cell(r["peak_memory_gb"], 2), r["best"], r["error"]]
        lines.append("| " + " | ".join(cell(v).replace("|", "\\|") for v in values) + " |")
    atomic_write(out / "sweep.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))

    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["run", *keys, *COLUMNS, "best", "error"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "sweep.csv", lambda f: f.write(table.getvalue().encode()))
    plot_metric(out / "sweep.png", [r for r in rows if r[metric] is not None], metric)


def plot_metric(path: Path, rows: list[dict], metric: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 1.5 + 0.35 * len(rows)))
    ax = fig.add_subplot()
    ax.barh([r["run"] for r in rows][::-1], [r[metric] for r in rows][::-1])
    ax.set_xlabel(f"validation {metric}")
    ax.set_title("runs that finished, best on top")
    fig.tight_layout()
    atomic_write(path, lambda f: FigureCanvasAgg(fig).print_png(f))


def sweep(args: argparse.Namespace, train: argparse.ArgumentParser) -> Path:
    """`train` is run.py's train parser, which checks every flag before any run starts."""
    grid = parse_grid(args.grid, train)
    passed = {a.split("=")[0].lstrip("-").replace("-", "_") for a in args.train_flags if a.startswith("--")}
    clash = sorted(passed & {*grid, *NOT_IN_GRID})
    if clash:
        where = "is in --grid" if clash[0] in grid else "is set by the sweep (each run's folder)"
        raise UserError(f"sweep: --{clash[0].replace('_', '-')} {where}")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    train.parse_args([*args.train_flags, *grid_argv(combos[0])])  # bad train flags: one line, before any run
    out = Path(args.out or Path("sweeps") / time.strftime("%Y%m%d-%H%M%S")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"grid": grid, "train_flags": args.train_flags}
    if (out / SETTINGS).is_file() and read_json(out / SETTINGS, "") != settings:
        raise UserError(f"--out {out}: holds a sweep of other flags ({read_json(out / SETTINGS, '')}); continue it with "
                        f"those, or pass another --out")
    write_json(out / SETTINGS, settings)
    gpus = visible_gpus()[: args.gpus]
    parallel = len(gpus) > 1
    print(f"sweep of {len(combos)} runs in {out}" + (f", one per GPU on GPUs {','.join(gpus)}" if parallel else "")
          + f" (the same command with --out {out} continues it)")
    free_gpus: queue.Queue = queue.Queue()
    for gpu in gpus if parallel else [None]:
        free_gpus.put(gpu)
    children = Children()

    def train_one(i: int, combo: dict[str, str]) -> dict:
        run_dir = out / run_name(combo)
        tag = f"[{i}/{len(combos)}] {run_dir.name}"
        if (run_dir / "summary.json").is_file():
            print(f"{tag}: finished, skipped")
            return run_row(run_dir, combo, None)
        gpu = free_gpus.get()
        try:
            resume = (run_dir / "checkpoint" / "progress.json").is_file()
            argv = ["--resume", str(run_dir)] if resume else [*args.train_flags, *grid_argv(combo), "--out", str(run_dir)]
            log = out / f"{run_dir.name}.log" if parallel else None
            print(tag + (": resuming" if resume else "") + (f" on GPU {gpu} (output in {log.name})" if parallel else ""),
                  flush=True)
            error = run_child(argv, gpu, log, children)
            if parallel:
                print(f"{tag}: {'done' if error is None else 'failed: ' + error}", flush=True)
            return run_row(run_dir, combo, error)
        finally:
            free_gpus.put(gpu)

    previous = {s: signal.signal(s, children.pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(max_workers=len(gpus) if parallel else 1) as pool:
            rows = list(pool.map(train_one, range(1, len(combos) + 1), combos))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if children.stopping:  # the runs saved their checkpoints; the same command continues them
        raise Interrupted(f"sweep stopped; run the same command with --out {out} to continue",
                          signal.Signals(children.stopping))
    write_report(out, sort_rows(rows, args.metric), list(grid), args.metric)
    print(f"sweep saved in {out}: sweep.md, sweep.csv, sweep.png")
    return out
