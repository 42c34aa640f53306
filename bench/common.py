"""What every benchmark shares: the random-weight checkpoint, the reference stack's loader, timing, memory and
the one JSON line each script prints."""
import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import LLAMA_3_1_8B, LlamaConfig
from model.llama import Llama
from train.setup import pick_device  # noqa: F401  (the benchmarks take it from here)

REPO = Path(__file__).resolve().parents[1]

DEV_CSV = REPO.parent / "shared" / "data" / "gsm8k_verify" / "dev.csv"
DEFAULT_CHECKPOINT = Path("/tmp/llama31-8b-random")
DEFAULT_TINY_CHECKPOINT = Path("/tmp/llama31-tiny-random")
# The 8B's vocabulary and RoPE with a toy body, so the real tokenizer and label ids work and CPU runs take seconds.
TINY = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_scaling=LLAMA_3_1_8B.rope_scaling)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_SHARD_BYTES = 5 * 10**9
GB = 1e9


def random_checkpoint(path: str | Path, config: LlamaConfig = LLAMA_3_1_8B, seed: int = 0) -> Path:
    """A Hugging Face-layout folder of bf16 random weights (std 0.02, norms one) in shards of at most 5 GB.

    Kept as is when it already holds this config; written to a temporary folder renamed into place, so a folder
    with a config.json is complete. Tensors are drawn on the GPU when there is one."""
    path = Path(path)
    if (path / "config.json").is_file():
        if json.loads((path / "config.json").read_text()) != json.loads(json.dumps(config.to_dict())):
            raise SystemExit(f"{path}: holds a checkpoint of another config; remove it or pass another --checkpoint")
        return path
    with torch.device("meta"):
        shapes = [(name, p.shape) for name, p in Llama(config).named_parameters()]
    shards, size = [[]], 0
    for name, shape in shapes:
        nbytes = shape.numel() * 2
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes

    device = pick_device()
    generator = torch.Generator(device).manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    tmp.chmod(0o755)
    weight_map, total = {}, 0
    start = time.perf_counter()
    try:
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name, shape in shard:
                if "norm" in name:
                    tensor = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16).mul_(0.02)
                tensors[name] = tensor.cpu()
                weight_map[name] = file
                total += tensor.numel() * 2
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{path}: {len(shards)} shards, {total / GB:.1f} GB of random weights in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    return path


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--checkpoint", help=f"HF-layout Llama folder (default: random 8B weights written to "
                                        f"{DEFAULT_CHECKPOINT}, or {DEFAULT_TINY_CHECKPOINT} with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy of the 8B shape: a CPU smoke test in seconds")
    p.add_argument("--impl", choices=("ours", "stack", "both"), default="both",
                   help="which implementation to run; 'both' runs the stack only when it is importable")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_with_run_command(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[str]]:
    """The bench's own arguments, and run.py's that follow them after `--`."""
    parser.add_argument("command", nargs=argparse.REMAINDER, help="run.py's arguments, after --")
    args = parser.parse_args()
    return args, args.command[1:] if args.command[:1] == ["--"] else args.command


def checkpoint_path(args: argparse.Namespace) -> Path:
    """--checkpoint when it holds a model, else a random checkpoint there (or at the default path)."""
    path = Path(args.checkpoint) if args.checkpoint else DEFAULT_TINY_CHECKPOINT if args.tiny else DEFAULT_CHECKPOINT
    if args.checkpoint and (path / "config.json").is_file():
        return path
    return random_checkpoint(path, TINY if args.tiny else LLAMA_3_1_8B, args.seed)


def implementations(args: argparse.Namespace) -> list[str]:
    if args.impl != "both":
        return [args.impl]
    return ["ours", "stack"] if stack_available() else ["ours"]


# ---- the reference stack: transformers + peft + bitsandbytes ----

def stack_available() -> bool:
    return all(importlib.util.find_spec(name) for name in ("transformers", "peft", "bitsandbytes"))


def load_stack(path: Path, device: torch.device) -> torch.nn.Module:
    """The checkpoint through transformers' BitsAndBytesConfig: NF4, double quantization, bf16 compute, sdpa."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16,
                                                attn_implementation="sdpa", device_map={"": device})


def stack_lora(model: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(PROJECTIONS),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# ---- timing, memory, output ----

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished all queued work."""
    synchronize(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 2)}


def release(device: torch.device) -> None:
    """Returns freed tensors' memory to the device, so the next model starts from an empty GPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ratio(ours: float | None, stack: float | None) -> float | None:
    return round(ours / stack, 3) if ours and stack else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info() -> dict:
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "versions": {name: _version(name) for name in ("torch", "transformers", "peft", "bitsandbytes")},
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def emit(record: dict) -> None:
    """Prints the record as one JSON line; appends it to the file named by $BENCH_LOG too, when set."""
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("BENCH_LOG"):
        with open(os.environ["BENCH_LOG"], "a") as f:
            f.write(line + "\n")
