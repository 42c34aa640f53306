from model.checkpoint import load_llama, save_llama
from model.config import LlamaConfig
from model.gguf import convert_gguf
from model.llama import Llama
from model.tokenizer import load_tokenizer

__all__ = ["LlamaConfig", "Llama", "load_llama", "save_llama", "load_tokenizer", "convert_gguf"]
