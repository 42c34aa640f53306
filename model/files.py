import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data.errors import UserError


@contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir`, renamed into its place (replacing it) when the block succeeds and
    removed when it fails, so readers see the old folder or the whole new one, never half of it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(file: Path, missing: str) -> dict:
    """The JSON object in `file`; a missing file raises `missing`, a malformed one names the file and the error."""
    if not file.is_file():
        raise UserError(missing)
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file}: not valid JSON ({err})") from None
