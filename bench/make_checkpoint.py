"""Writes random bf16 weights of the exact Llama-3.1-8B shape (16 GB of sharded safetensors, HF layout), or of the
shape another config.json gives (e.g. SmolLM2-135M's, for speed measurements without its weights).

    python bench/make_checkpoint.py [--out /tmp/llama31-8b-random] [--tiny | --config FILE] [--seed 0]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DEFAULT_CHECKPOINT, DEFAULT_TINY_CHECKPOINT, TINY, random_checkpoint  # noqa: E402
from model.config import LLAMA_3_1_8B, LlamaConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help=f"folder (default {DEFAULT_CHECKPOINT}; {DEFAULT_TINY_CHECKPOINT} with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy of the 8B shape")
    parser.add_argument("--config", help="a Hugging Face config.json whose shape to use (then --out is required)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.config and (args.tiny or not args.out):
        parser.error("--config needs --out and excludes --tiny")
    config = LlamaConfig.from_json(args.config) if args.config else TINY if args.tiny else LLAMA_3_1_8B
    out = args.out or (DEFAULT_TINY_CHECKPOINT if args.tiny else DEFAULT_CHECKPOINT)
    print(random_checkpoint(out, config, args.seed))


if __name__ == "__main__":
    main()
