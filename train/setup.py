"""What training and scoring share before the loop: the device, the tokenizer and label tokens, the frozen base."""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError
from common.launch import launched_ranks, local_rank
from data import Template, label_token_ids
from model import LlamaConfig, load_llama, load_tokenizer
from model.default import default_model_path
from model.fp8 import fp8_fits, fp8_unavailable, use_fp8
from train.precision import Precision, resolve_precision


@dataclass
class Base:
    """The frozen base a run trains on, resolved but not yet loaded: tokenizer, label tokens and numerics."""
    device: torch.device
    model_path: Path
    tokenizer: object
    template: Template
    label_ids: torch.Tensor  # (False, True) token ids on the device: class 1 is True
    quantization: str  # "nf4" or "none"
    numerics: Precision  # what autocast computes in
    dtype: torch.dtype  # of the frozen weights
    hidden_size: int
    fp8: bool = False  # the 4-bit base's products in FP8 (model.fp8)

    @property
    def precision(self) -> str:
        autocast = "no autocast" if self.numerics.name == "fp32" else f"{self.numerics.name} autocast"
        fp8 = ", FP8 base products" if self.fp8 else ""
        return f"{str(self.dtype).removeprefix('torch.')} weights, {autocast}{fp8}"

    def load_model(self, classifier_only: bool = True) -> nn.Module:
        """The frozen base on the device; `classifier_only` keeps just the label tokens' rows of the lm_head."""
        model = load_llama(self.model_path, dtype=self.dtype, device=self.device,
                           quantize=None if self.quantization == "none" else self.quantization,
                           head_rows=self.label_ids.tolist() if classifier_only else None)
        if self.fp8:
            use_fp8(model)
        return model


SMALL_BASE_BYTES = 1e9  # a base whose projections take less in bf16 keeps them in bf16 on a GPU by default


def default_quantization(config: LlamaConfig, device: torch.device) -> str:
    """NF4 on CUDA for a base whose projections take 1 GB or more in bf16 (Llama-3.2-1B: 1.9 GB; the 8B: 14 GB).
    A smaller base keeps them in bf16: SmolLM2-135M's take 0.2 GB, 4 bits would save 0.15 GB of it, and dequantizing
    them cost a tenth of its training step (bench/RESULTS.md). A CPU computes in fp32 without 4-bit weights."""
    projection_bytes = 2 * config.num_hidden_layers * sum(out * in_ for out, in_ in config.projection_shapes().values())
    return "nf4" if device.type == "cuda" and projection_bytes >= SMALL_BASE_BYTES else "none"


def pick_device() -> torch.device:
    """The GPU if there is one (under torchrun, the one of this process's local rank), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank()) if launched_ranks() > 1 else torch.device("cuda")


def resolve_base(model: str | None, quant: str | None, template: Template, device: torch.device,
                 precision: str | None = None, fp8: bool = False) -> Base:
    """The tokenizer and label tokens of `model` (default: the packaged SmolLM2), and the quantization, precision
    and dtype its weights will have on `device`: `quant`, else default_quantization's; `precision` as
    train.precision.resolve_precision reads it; `fp8`: the NF4 base's products in FP8. Reads no weights."""
    model_path = Path(model).absolute() if model else default_model_path()
    if not model_path.is_dir():
        raise UserError(f"--model {model_path}: model folder does not exist")
    config = LlamaConfig.from_json(model_path / "config.json")
    tokenizer = load_tokenizer(model_path)
    true_id, false_id = label_token_ids(template, tokenizer)
    quantization = quant or default_quantization(config, device)
    numerics = resolve_precision(precision, device)
    # On a CPU 4-bit weights dequantize to bf16, the compute dtype bitsandbytes' CPU path expects.
    dtype = torch.bfloat16 if device.type == "cpu" and quantization == "nf4" else numerics.compute_dtype
    if max(true_id, false_id) >= config.vocab_size:
        raise UserError(f"--model {model_path}: the label tokens {true_id} and {false_id} of its tokenizer lie outside "
                        f"its vocabulary of {config.vocab_size} (a tokenizer of another model?)")
    if fp8 and quantization != "nf4":
        why = ("the run's --quant none" if quant == "none" else "a CPU keeps the base unquantized unless --quant nf4"
               if device.type == "cpu" else "a base this small stays unquantized on a GPU unless --quant nf4")
        raise UserError(f"--fp8 on: FP8 products are for a 4-bit base, and this one is not ({why})")
    if fp8 and (reason := fp8_unavailable(device)):
        raise UserError(f"--fp8 on: {reason}")
    if fp8 and not any(fp8_fits(*shape) for shape in config.projection_shapes().values()):
        raise UserError(f"--fp8 on: no projection of {model_path} can multiply in FP8 (their input sizes must be "
                        f"multiples of 64 and every size a multiple of 16)")
    label_ids = torch.tensor([false_id, true_id], device=device)
    return Base(device, model_path, tokenizer, template, label_ids, quantization, numerics, dtype, config.hidden_size,
                fp8)
