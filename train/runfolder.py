"""A run folder: created once, written by one process at a time, its config.json a manifest of the run.

Layout: config.json (flags and manifest), metrics.jsonl, checkpoint/ (for --resume), adapter/, adapter_best/,
summary.json, training.png, tensorboard/. Every file and folder but the appended logs (metrics.jsonl, tensorboard/)
is replaced atomically (common.files)."""
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from common.errors import UserError
from common.files import read_json, unwritable_ancestor, write_json
from train.checkpoint import has_checkpoint

CONFIG = "config.json"
LOCK = ".lock"
PACKAGES = ("torch", "bitsandbytes", "numpy", "pandas", "safetensors", "tiktoken", "sentencepiece")
REPO = Path(__file__).resolve().parents[1]


class RunFolder:
    """Holds the folder's lock for as long as the object lives (released by the OS if the process dies)."""

    def __init__(self, path: Path, created: bool, new: bool = True):
        self.path, self.created, self.new = path, created, new  # created: the folder did not exist before
        self.config, self.metrics, self.summary = path / CONFIG, path / "metrics.jsonl", path / "summary.json"
        self.checkpoint, self.adapter, self.adapter_best = path / "checkpoint", path / "adapter", path / "adapter_best"
        self.plot, self.tensorboard = path / "training.png", path / "tensorboard"
        self._lock = _lock(path)

    @classmethod
    def create(cls, out: Path) -> "RunFolder":
        """A new run in `out`, which must not exist yet or be an empty folder."""
        out = out.absolute()
        check_new_run_path(out)
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--out {out}: cannot create the run folder ({err.strerror})") from None
        folder = cls(out, created)
        if any(p.name != LOCK for p in out.iterdir()):  # another process got here first
            folder.release()
            raise UserError(f"--out {out}: another run started in this folder")
        return folder

    @classmethod
    def open(cls, path: Path) -> "RunFolder":
        """An existing run, to resume."""
        path = path.absolute()
        if not (path / CONFIG).is_file():
            raise UserError(f"--resume {path}: no run there ({CONFIG} missing)")
        folder = cls(path, created=False, new=False)
        try:
            folder.read_config()
            if not folder.has_checkpoint():
                raise UserError(f"--resume {path}: no complete checkpoint in {folder.checkpoint} to resume from")
        except UserError:
            folder.release()
            raise
        return folder

    def read_config(self) -> dict:
        return read_run_config(self.config, f"--resume {self.path}: no run there ({CONFIG} missing)")

    def has_checkpoint(self) -> bool:
        return has_checkpoint(self.checkpoint)

    def discard_if_unsaved(self) -> bool:
        """Removes what a new run that failed before its first checkpoint wrote, so that the same command can run
        again; True if it did. A run with a checkpoint is kept for --resume, and a resumed run is never removed."""
        if not self.new or self.has_checkpoint():
            return False
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for child in self.path.iterdir():
                if child.name != LOCK:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.release()
        return True

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


# The saved flags that resume, infer, eval and export read without a default (run.py checks their values).
SCORING_FLAGS = ("model", "template", "max_len", "quant", "val_size", "seed")


def read_run_config(file: Path, missing: str) -> dict:
    """A run's config.json, with its 'flags' and 'manifest' objects; a missing file raises `missing`."""
    config = read_json(file, missing)
    for key in ("flags", "manifest"):
        if not isinstance(config.get(key), dict):
            raise UserError(f"{file}: not a run's config (no {key!r} object)")
    absent = [key for key in SCORING_FLAGS if key not in config["flags"]]
    if absent:
        raise UserError(f"{file}: corrupt run config (flag {absent[0]!r} is missing)")
    if not isinstance(config["manifest"].get("data_sha256"), str):
        raise UserError(f"{file}: corrupt run config (the manifest's 'data_sha256' is "
                        f"{config['manifest'].get('data_sha256')!r}, not the data's SHA-256)")
    return config


def check_new_run_path(out: Path) -> None:
    """A new run may only go where nothing would be overwritten: a path that does not exist or an empty folder."""
    if (out / CONFIG).is_file():
        try:
            is_run = "flags" in json.loads((out / CONFIG).read_text())
        except (ValueError, OSError):
            is_run = False
        if is_run:
            raise UserError(f"--out {out}: a run already lives there (use --resume {out} to continue it)")
        raise UserError(f"--out {out}: holds a {CONFIG} that is not a run's (a model folder?); choose a new folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise UserError(f"--out {out}: the folder is not empty and holds no run; choose a new or empty folder")
    if blocked := unwritable_ancestor(out):
        raise UserError(f"--out {out}: {blocked} is not writable")


def _lock(path: Path) -> int:
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{path}: another process (pid {holder}) is writing this run; wait for it or stop it") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=40"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def manifest(data_sha256: str, device: str, gpu: str | None, precision: str, quantization: str,
             processes: int = 1) -> dict:
    """What, besides the flags, decides what a run computes: code, packages, data, hardware, numerics (and how many
    data-parallel processes it started on, which changes only the order of float sums)."""
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv, "cwd": os.getcwd(),
            "git_commit": _git_commit(), "python": platform.python_version(),
            "packages": {p: _version(p) for p in PACKAGES}, "data_sha256": data_sha256,
            "device": device, "gpu": gpu, "precision": precision, "quantization": quantization,
            "processes": processes}


def write_config(folder: RunFolder, flags: dict, run_manifest: dict, resumes: list[dict] = ()) -> None:
    write_json(folder.config, {"flags": flags, "manifest": run_manifest, "resumes": list(resumes)})
