"""`run.py export`: a run's LoRA update merged into its full-precision base, written in the Hugging Face layout that
transformers loads: LlamaForCausalLM plus judge.json (`infer --model` scores it), or LlamaForSequenceClassification
whose two-row head is the LM head's (False, True) label rows; or as one llama.cpp GGUF file plus judge.json.
Written shard by shard: memory stays about one shard."""
import json
import shutil
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.errors import UserError
from common.files import atomic_folder, read_json, unwritable_ancestor
from lora.merge import adapter_updates, merged_weight
from model.checkpoint import INDEX_FILE, read_tensors, shard_files
from model.gguf import write_gguf
from model.tokenizer import BPE_FILE
from train.calibrate import decision_in_use
from train.infer import JUDGE, open_run
from train.setup import resolve_base

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "tokenizer_bpe.json", "original/tokenizer.model")
TEMPLATE_FILE = "prompt_template.txt"
GGUF_FILE = "model.gguf"


def check_out(out: Path, inputs: list[Path]) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder")
    for folder in inputs:
        if out.resolve().is_relative_to(folder.resolve()):
            raise UserError(f"--out {out}: would write into {folder}, which is not for outputs")
    if blocked := unwritable_ancestor(out.parent):
        raise UserError(f"--out {out}: cannot write in {blocked}")


def merged_shards(model_path: Path, adapter: Path) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """The base's tensors shard by shard, the adapter's LoRA update (B·A·α/r) merged into those it adapts. Each
    shard's tensors come one at a time (a merged one in float32), so that a caller who casts and keeps them holds
    one shard in its output dtype, not a float32 copy of it (an 8B shard: 5 GB rather than 15)."""
    updates = adapter_updates(adapter)
    for shard in shard_files(model_path):
        yield ((key, merged_weight(key, tensor, updates.pop(key)) if key in updates else tensor)
               for key, tensor in read_tensors([shard]))
    if updates:
        raise UserError(f"{adapter}: the adapter updates {next(iter(updates))}, which {model_path} lacks")


def export(args: Namespace) -> Path:
    run = open_run(Namespace(run=args.run, best=args.best, model=args.model, max_len=None, batch_tokens=None))
    base = resolve_base(run.model, "none", run.template, torch.device("cpu"))  # tokenizer and labels; no weights
    out, dtype, classifier = Path(args.out).absolute(), DTYPES[args.dtype], args.format == "hf-classifier"
    check_out(out, [run.path, base.model_path])
    config = read_json(base.model_path / "config.json", f"{base.model_path}: no config.json")
    if args.format == "gguf" and not (base.model_path / BPE_FILE).is_file():
        raise UserError(f"{base.model_path}: GGUF export needs a GGUF byte-level BPE tokenizer ({BPE_FILE}, as in "
                        f"a base converted from a GGUF file); this base has no such tokenizer")

    with atomic_folder(out) as tmp:
        if args.format == "gguf":
            tokenizer = json.loads((base.model_path / BPE_FILE).read_text(encoding="utf-8"))
            tensors = (item for shard in merged_shards(base.model_path, run.adapter) for item in shard)
            write_gguf(tmp / GGUF_FILE, config, tokenizer, tensors, dtype)
            (tmp / JUDGE).write_text(json.dumps(judge_record(run, base.label_ids.tolist()), indent=2))
            print(f"{out}: wrote {GGUF_FILE}")
        else:
            write_hf(tmp, out, run, base, config, dtype, classifier)
    print(f"{out}: {args.format} export of {run.adapter} merged into {base.model_path} ({args.dtype})")
    return out


def write_hf(tmp: Path, out: Path, run, base, config: dict, dtype: torch.dtype, classifier: bool) -> None:
    false_id, true_id = base.label_ids.tolist()
    head = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
    shards, weight_map = shard_files(base.model_path), {}
    for number, merged in enumerate(merged_shards(base.model_path, run.adapter), 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, tensor in merged:
            if classifier and key == head:
                tensors["score.weight"] = tensor[[false_id, true_id]].to(dtype).contiguous()
            if not (classifier and key == "lm_head.weight"):
                tensors[key] = tensor.to(dtype).contiguous()
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        print(f"{out}: wrote {name}")
    (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    dtype_name = str(dtype).removeprefix("torch.")
    config.update(torch_dtype=dtype_name, dtype=dtype_name)  # transformers < 4.56 reads torch_dtype
    if classifier:
        config.update(architectures=["LlamaForSequenceClassification"], num_labels=2,
                      id2label={0: "False", 1: "True"}, label2id={"False": 0, "True": 1},
                      pad_token_id=base.tokenizer.pad_id, tie_word_embeddings=False)
        (tmp / TEMPLATE_FILE).write_text(run.template.text, encoding="utf-8")
    else:
        (tmp / JUDGE).write_text(json.dumps(judge_record(run, base.label_ids.tolist()), indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for file in TOKENIZER_FILES:
        if (base.model_path / file).is_file():
            (tmp / file).parent.mkdir(exist_ok=True)
            shutil.copy(base.model_path / file, tmp / file)


def judge_record(run, label_ids: list[int]) -> dict:
    """What `infer --model` needs besides the weights: the prompt, the labels and the run's decision."""
    decision, used = decision_in_use(run.path)
    flags = run.config["flags"]
    return {"template": run.template.text, "template_name": run.template.name,
            "label_words": dict(zip(("True", "False"), run.template.label_words)),
            "label_token_ids": {"False": label_ids[0], "True": label_ids[1]},
            **decision, "decision_from": used, "max_len": run.max_len,
            "quant": flags["quant"], "precision": flags.get("precision"), "fp8": flags.get("fp8", "off"),
            "run": str(run.path), "adapter": str(run.adapter)}
