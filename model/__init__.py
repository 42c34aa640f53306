from model.checkpoint import load_llama, save_llama
from model.config import LlamaConfig
from model.llama import Llama

__all__ = ["LlamaConfig", "Llama", "load_llama", "save_llama"]
