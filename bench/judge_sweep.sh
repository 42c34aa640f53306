#!/usr/bin/env bash
# Issue 17's measurement: sweeps of SmolLM2 (the default model, full precision) on gsm8k_verify's dev.csv split by
# question, without and with GSM8K's reference solutions and their made-wrong twins as extra training rows
# (`python -m data.gsm8k`), one run per GPU; then the best run of either, by validation AUROC, scored on its own
# validation rows with best-of-N per question (`run.py eval --split val --group-col group --by source`).
#
#   bash bench/judge_sweep.sh DEV_CSV GSM8K_TRAIN_JSONL OUT_DIR
#
# Run again with the same OUT_DIR to continue after a stop (finished runs are skipped, stopped ones resumed).
# OUT_DIR gets gsm8k_rows.csv, plain/ and gsm8k/ (each a sweep: sweep.md, sweep.csv, a folder per run) and
# best.txt; the best run's eval lands in its folder, eval/dev-val/.
set -eu
dev=$1 gsm8k=$2 out=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
python3 -m data.gsm8k "$gsm8k" --out "$out/gsm8k_rows.csv"
common=(--data "$dev" --group-col group --val-size 0.2 --alpha 64 --batch-size 16 --eval-every 100000 --quant none)
python3 "$repo/run.py" sweep --grid "rank=16,64 lr=2e-4,4e-4,8e-4 epochs=3,5" --out "$out/plain" "${common[@]}"
python3 "$repo/run.py" sweep --grid "rank=16,64 lr=1e-4,2e-4,4e-4 epochs=1,2" --out "$out/gsm8k" "${common[@]}" \
  --extra-data "$out/gsm8k_rows.csv"
python3 - "$out" > "$out/best.txt" <<'PY'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [(float(r["auroc"]), out / sweep / r["run"]) for sweep in ("plain", "gsm8k")
        for r in csv.DictReader(open(out / sweep / "sweep.csv")) if r["auroc"]]
print(max(rows)[1])
PY
python3 "$repo/run.py" eval --run "$(cat "$out/best.txt")" --data "$dev" --split val --group-col group --by source
