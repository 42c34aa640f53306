from lora.adapter import load_adapter, save_adapter
from lora.inject import apply_lora, lora_layers
from lora.layer import LoRALinear
from lora.merge import merge_lora

__all__ = ["LoRALinear", "apply_lora", "lora_layers", "save_adapter", "load_adapter", "merge_lora"]
