#!/usr/bin/env bash
# One-shot GPU check: run from the repository root on the GPU machine.
#
#   bash benchmarks/gpu_check.sh [extra gpu_check.py flags]
#
# Prints the environment, checks the Python modules moe_jax needs (the machine has no network, so
# nothing is installed here), runs benchmarks/gpu_check.py under a 470 s limit and leaves its JSON
# in benchmarks/results/ (and a copy in $OUT when that is set, so a remote runner gets it back).
# Parts: (a) grouped matmul, (b) switch-base-128 shapes vs transformers, (c) replication overhead
# of one layer, (d) a Qwen3-MoE decoder: prefill + KV-cached decode, home slots vs replicas
# (outputs must match). The JSON is rewritten after every part, so a part that runs past the limit
# still leaves the earlier parts' results. Select parts with --parts=a,b,c,d.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT_DIR="benchmarks/results"
mkdir -p "$OUT_DIR"

echo "== environment"
date -Is
hostname
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PYTHON" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "numpy", "safetensors", "sentencepiece", "torch",
             "transformers"):
  try:
    module = importlib.import_module(name)
    print(f"  {name:14s} {getattr(module, '__version__', '?')}")
  except Exception as e:  # noqa: BLE001
    print(f"  {name:14s} MISSING ({type(e).__name__}: {e})")
import jax
print("  jax devices", jax.devices())
EOF

echo "== gpu_check.py"
timeout 470 "$PYTHON" benchmarks/gpu_check.py --out_dir="$OUT_DIR" "$@"
status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_check.py ran past 470 s and was stopped"
fi
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  cp "$OUT_DIR"/gpu_check_*.json "$OUT"/ 2>/dev/null || true
fi
exit "$status"
