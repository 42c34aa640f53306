#!/usr/bin/env bash
# Data-parallel scaling of `run.py train` under torchrun (issue 15), on 1, 2 and 4 GPUs of one machine, one run after
# another, every run with its speed defaults: the 8B shape (random weights, Meta's tokenizer, QLoRA seed-best with
# checkpointing) and the SmolLM2 shape (3 epochs, r 64, batch 16 and 64). One JSON line per run on stdout
# (bench/bench_run.py); each run is killed, with its workers, past its time.
#
#   bash bench/scaling.sh DEV_CSV LLAMA3_TOKENIZER_MODEL SMOLLM2_CONFIG_DIR [GPU_COUNTS] > results.jsonl
#
# SMOLLM2_CONFIG_DIR holds SmolLM2's config.json and tokenizer_bpe.json (random weights are made from them).
set -u
dev=$1 tokenizer=$2 smol=$3 counts=${4:-"1 2 4"}
here=$(cd "$(dirname "$0")" && pwd)
python3 "$here/make_checkpoint.py" --out /tmp/scaling-8b >&2
mkdir -p /tmp/scaling-8b/original && cp "$tokenizer" /tmp/scaling-8b/original/tokenizer.model
python3 "$here/make_checkpoint.py" --config "$smol/config.json" --out /tmp/scaling-smol >&2
cp "$smol/tokenizer_bpe.json" /tmp/scaling-smol/
big="--model /tmp/scaling-8b --data $dev --group-col group --preset seed-best --grad-checkpoint --warmup-steps 2 --val-size 200 --max-steps 6 --eval-every 6"
small="--model /tmp/scaling-smol --data $dev --group-col group --val-size 0.2 --rank 64 --alpha 64 --lr 2e-4 --epochs 3 --eval-every 100000"
for n in $counts; do
  rm -rf /tmp/scaling-run-8b-$n
  python3 "$here/bench_run.py" --nproc "$n" --timeout 240 --label "8B seed-best, $n GPU" -- train $big --out /tmp/scaling-run-8b-$n 2>/dev/null | grep '^{'
done
for batch in 16 64; do
  for n in $counts; do
    rm -rf /tmp/scaling-run-smol-$batch-$n
    python3 "$here/bench_run.py" --nproc "$n" --timeout 240 --label "SmolLM2 3 epochs batch $batch, $n GPU" -- train $small --batch-size "$batch" --out /tmp/scaling-run-smol-$batch-$n 2>/dev/null | grep '^{'
  done
done
