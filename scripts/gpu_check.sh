#!/usr/bin/env bash
# GPU check (< 5 minutes on one GPU): a few MGRPO steps in bf16 on a random-initialised model with
# Qwen2.5-1.5B's shapes (no download), printing rollout tokens/s, train-step tokens/s and peak GPU
# memory. Extra arguments go to scripts/gpu_check.py (e.g. --steps 4 --max-new-tokens 512).
# Last line: GPU_CHECK rollout_tokens_per_s=... train_tokens_per_s=... peak_mem_gib=...
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
timeout 290 "$python" scripts/gpu_check.py "$@"
