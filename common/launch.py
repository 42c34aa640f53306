"""Where torchrun placed this process (its RANK, WORLD_SIZE and LOCAL_RANK), read from the environment before any
process group exists; rank 0 of 1 without torchrun."""
import os

from common.errors import UserError


def _from_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise UserError(f"{name}={os.environ[name]!r} is not a whole number (torchrun sets it)") from None


def launched_ranks() -> int:
    """How many processes torchrun started."""
    return _from_env("WORLD_SIZE", 1)


def process_rank() -> int:
    return _from_env("RANK", 0) if launched_ranks() > 1 else 0


def local_rank() -> int:
    """This process's index on its node: the GPU it takes."""
    return _from_env("LOCAL_RANK", 0) if launched_ranks() > 1 else 0
