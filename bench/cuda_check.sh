#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA device (CI has none):
#   1. device=auto picks CUDA, and the default run reproduces the puzzle there;
#   2. the same seed twice gives identical metrics on the same device (cold cache, then cached);
#   3. bench/run.py --device cuda (PPO vs floor, TRL, cost growth), reported apart from the CPU numbers.
# Usage: bash bench/cuda_check.sh [OUT_DIR]   (python: $PY, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${1:-outputs/cuda_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; print('cuda:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
for r in a b; do
  start=$SECONDS
  "$PY" -m rlhf_sweep.cli run device=auto progress=false mlflow.enabled=false \
    cache_dir="$OUT/cache" hydra.run.dir="$OUT/run_$r" | tail -n 25
  echo "run $r: $((SECONDS - start)) s wall"
done
"$PY" - "$OUT" <<'EOF'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/run_{r}/summary.json")) for r in "ab")
print("device:", a["device"], "| timing a:", a["timing"], "| timing b:", b["timing"])
same = a["metrics"] == b["metrics"] and a["history"] == b["history"]
diff = [k for k in a["metrics"] if a["metrics"][k] != b["metrics"][k]]
print("same seed twice on", a["device"], "identical metrics and history:", same, "| differing keys:", diff[:10])
print("observations:", {k: v["value"] for k, v in a["observations"].items()})
EOF
"$PY" bench/run.py --device cuda --skip-sweep --threads 1 | tee "$OUT/bench_cuda.txt"
