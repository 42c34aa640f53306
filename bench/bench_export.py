"""`python run.py export` of a QLoRA run on the 8B shape: wall time and the export process's peak host memory.

The run folder holds a random r 64 adapter on all seven projections of every block (the seed-best shape) beside
random base weights of the 8B shape (bench/make_checkpoint.py), so no training is needed to time the merge.

    python bench/bench_export.py [--checkpoint DIR] [--tiny] [--rank 64] [--format hf] [--work /tmp/export-bench]
"""
import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import run  # noqa: E402
from bench.common import DEFAULT_CHECKPOINT, DEFAULT_TINY_CHECKPOINT, TINY, emit, random_checkpoint  # noqa: E402
from lora.inject import ALL_PROJECTIONS  # noqa: E402
from model.config import LLAMA_3_1_8B, LlamaConfig  # noqa: E402


def random_run(folder: Path, checkpoint: Path, config: LlamaConfig, rank: int) -> Path:
    """A finished-looking run folder: config.json with the flags a run records, and a random peft adapter."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "adapter").mkdir(parents=True)
    flags = vars(run.parse_args(["train", "--model", str(checkpoint), "--data", "train.csv", "--rank", str(rank),
                                 "--alpha", str(rank)]))
    flags.update(quant="nf4", precision="bf16", out=str(folder))
    (folder / "config.json").write_text(json.dumps({"flags": flags, "manifest": {}, "resumes": []}))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name, (out_features, in_features) in config.projection_shapes().items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    save_file(tensors, folder / "adapter" / "adapter_model.safetensors")
    adapter_config = {"r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "target_modules": list(ALL_PROJECTIONS),
                      "layers_to_transform": None, "peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
                      "base_model_name_or_path": str(checkpoint), "fan_in_fan_out": False, "inference_mode": True,
                      "use_rslora": False, "modules_to_save": None}
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help=f"base folder (default: random 8B weights in {DEFAULT_CHECKPOINT})")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy of the 8B shape: a smoke test")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--format", default="hf", choices=("hf", "hf-classifier"))
    parser.add_argument("--work", default="/tmp/export-bench", help="folder for the run and the export")
    args = parser.parse_args()
    config = TINY if args.tiny else LLAMA_3_1_8B
    checkpoint = Path(args.checkpoint or (DEFAULT_TINY_CHECKPOINT if args.tiny else DEFAULT_CHECKPOINT))
    random_checkpoint(checkpoint, config)
    tokenizer = checkpoint / "original" / "tokenizer.model"
    if not tokenizer.is_file():  # the export copies the base's tokenizer; Meta's, from llama-models
        import llama_models

        tokenizer.parent.mkdir(exist_ok=True)
        shutil.copy(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", tokenizer)
    work = Path(args.work)
    run_dir = random_run(work / "run", checkpoint, config, args.rank)
    out = work / "export"
    shutil.rmtree(out, ignore_errors=True)

    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "run.py"), "export", "--run", str(run_dir), "--out", str(out),
                    "--format", args.format, "--dtype", "bf16"], check=True)
    wall_s = time.perf_counter() - started
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    emit({"bench": "export", "checkpoint": str(checkpoint), "rank": args.rank, "format": args.format,
          "wall_s": round(wall_s, 1), "peak_host_rss_gb": round(peak_rss_gb, 2), "written_gb": round(written / 1e9, 2),
          "cpu": Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].split(":", 1)[1].strip()})
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
