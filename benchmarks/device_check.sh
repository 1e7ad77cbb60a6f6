#!/usr/bin/env bash
# The GPU check (benchmarks/device_check.py) on one H100 / H200: a LLaVA-1.5-7B-shaped model with random bf16
# weights, nothing downloaded; DPO ours vs TRL, MFU, prefix-sharing log-probs in bf16, K-answer sampling, SFT with
# gradient checkpointing, QLoRA. Writes one JSON (default logs/device_check.json); exit 0 when every part passed.
#
#   bash benchmarks/device_check.sh [OUT.json] [extra device_check.py arguments]
#   bash benchmarks/device_check.sh --dry-run          # tiny backbone on the CPU (what make test runs)
#
# PYTHON: the interpreter (default .venv/bin/python, else python3). LIMIT: seconds before it is stopped (480).
# The model (~14 GB) is built once under data/device_check/ (--work to move it) and reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT=logs/device_check.json
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then OUT="$1"; shift; fi
mkdir -p "$(dirname "$OUT")"
if [[ " $* " != *" --dry-run "* ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
fi
exec timeout --signal=INT --kill-after=30 "${LIMIT:-480}" "$PYTHON" benchmarks/device_check.py --out "$OUT" "$@"
