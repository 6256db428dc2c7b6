#!/usr/bin/env bash
# The speed and patch benchmarks on a CUDA machine, in one prepared run of under 8 minutes:
#
#   1. `positronic bench speed --shape tinyllama --device cuda`: HF `generate` (the baseline),
#      the loop in one process and split over loopback gRPC, for halo (lm repairer), halo-kv
#      (K/V merge, no extra forward) and full; a random model of TinyLlama-1.1B's shape in
#      float16 (speed does not depend on weight values); the worker's replicas live on the GPU.
#   2. `positronic bench patch`: the authority's Patch at TinyLlama's K/V geometry (the authority
#      is CPU-only; on an otherwise idle machine this is the p99 the loaded dev box could not show).
#
# Prints both tables; writes speed.json, patch.json and the logs under $OUT (default: a new
# temporary directory). PYTHON picks the interpreter (default .venv/bin/python, else python3).
# Exits 2 when torch sees no CUDA device, before any work.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
TOKENS="${TOKENS:-256}"  # tokens per run; budget 64, so halo merges on every tick past ~60
BUDGET="${BUDGET:-64}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to torch ($PY); nothing measured" >&2
  exit 2
fi
"$PY" - <<'PY' | tee "$OUT/device.txt"
import torch, transformers
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
      f"transformers {transformers.__version__}, CUDA {torch.version.cuda}")
PY
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv 2>/dev/null \
  | tee -a "$OUT/device.txt" || true

start=$(date +%s)
echo "== bench speed: TinyLlama shape, float16 on cuda, $TOKENS tokens, budget $BUDGET"
timeout 330 "$PY" -m positronic.cli bench speed --shape tinyllama --device cuda \
  --dtype float16 --tokens "$TOKENS" --budget "$BUDGET" --policies halo,halo-kv,full \
  --threads 4 --json "$OUT/speed.json" 2>"$OUT/speed.log" | tee "$OUT/speed.txt"

echo "== bench patch: TinyLlama K/V geometry, durability none and fsync"
timeout 150 "$PY" -m positronic.cli bench patch --rows 256,2048 --edits append,merge,evict \
  --durability none,fsync --patches 300 --warmup 30 --json "$OUT/patch.json" \
  2>"$OUT/patch.log" | tee "$OUT/patch.txt"

echo "== done in $(($(date +%s) - start)) s; results under $OUT"
