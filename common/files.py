"""Reading and writing files so that a reader never sees half of one: JSON, JSON Lines, whole files and folders."""
import ctypes
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from safetensors import SafetensorError

from common.errors import UserError

_RENAME_EXCHANGE = 2  # renameat2 flag (Linux): swap two paths in one step
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the two paths atomically where the OS can (Linux renameat2); False where it cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_folder(new: Path, dest: Path) -> None:
    """Puts folder `new` in the place of `dest`. `dest` always names a complete copy, old or new: the two are
    swapped in one step where the OS allows it; elsewhere the old copy is renamed aside first and put back if
    the second rename fails."""
    if not dest.exists():
        os.replace(new, dest)
        return
    if _exchange(new, dest):
        shutil.rmtree(new)  # `new` now names the old copy
        return
    aside = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(dest, aside)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(aside, dest)
        raise
    shutil.rmtree(aside)


@contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir`, put in its place (replacing it) when the block succeeds and removed
    when it fails, so readers see the old folder or the whole new one, never half of it and never neither."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        yield tmp
        replace_folder(tmp, out_dir)
    except OSError as err:  # e.g. a full disk: name the file the user will look for, not the temporary one
        if err.filename is None or not Path(err.filename).is_relative_to(tmp):
            raise
        raise OSError(err.errno, err.strerror, str(out_dir / Path(err.filename).relative_to(tmp))) from None
    except SafetensorError as err:  # a write that failed, in safetensors' words (no file named)
        raise OSError(None, f"writing a safetensors file failed: {' '.join(str(err).split())}",
                      str(out_dir)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unwritable_ancestor(path: Path) -> Path | None:
    """None where `path` can be written or created: its nearest existing ancestor (itself included) is a folder this
    process may write in. Otherwise that ancestor, for the error message."""
    nearest = next(p for p in (path, *path.parents) if p.exists())
    return None if nearest.is_dir() and os.access(nearest, os.W_OK) else nearest


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (in the main thread of a POSIX system; elsewhere the block
    runs as it is)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Calls write(file) on a temporary file beside `path`, flushed to disk, then renames it to `path`."""
    atomic_write_all({path: write})


def atomic_write_all(writes: dict[Path, Callable[[IO[bytes]], None]]) -> None:
    """atomic_write for a set of files that belong together: each is written to its temporary file first, and only
    once all are on disk are they renamed into place, so that a failure (a full disk) leaves the old set whole."""
    temporaries = {}
    try:
        for path, write in writes.items():
            current = path  # an error names the file the user asked for, not the temporary one
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporaries[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        with signals_held():  # a Ctrl-C between two renames would leave half a new set
            for path, tmp in temporaries.items():
                current = path
                os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(current)) from None
    finally:
        for tmp in temporaries.values():
            Path(tmp).unlink(missing_ok=True)


def json_writer(record: dict) -> Callable[[IO[bytes]], None]:
    """What writes `record` as indented JSON, for atomic_write and atomic_write_all."""
    text = json.dumps(record, indent=2, default=str) + "\n"
    return lambda f: f.write(text.encode())


def write_json(path: Path, record: dict) -> None:
    atomic_write(path, json_writer(record))


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_json(file: Path, missing: str) -> dict:
    """The JSON object in `file`; a missing file raises `missing`, a malformed one names the file and the error."""
    if not file.is_file():
        raise UserError(missing)
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{file}: not a JSON object")
    return value


def read_json_lines(path: Path) -> list[dict]:
    """The JSON objects of a JSON Lines file, blank lines skipped; a bad line is a UserError naming it."""
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}: line {line_number}: not a JSON object")
            records.append(record)
    return records
