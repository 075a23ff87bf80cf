#!/usr/bin/env bash
# GPU check (< 8 minutes on one GPU): at Qwen2.5-1.5B's shapes with random weights (no download),
# decode tokens/s of our decoder and of transformers' generate with a static cache against the
# bandwidth bound, the loss pass's MFU, and MGRPO step times in 32-true / bf16-mixed / bf16-true on the
# tiny model and at 1.5B shapes. Writes everything to outputs/gpu_check.json (or $GPU_CHECK_JSON), rewritten
# after each part. Extra arguments go to scripts/gpu_check.py (e.g. --parts decode --bandwidth 4.8).
# Last line: GPU_CHECK decode_tokens_per_s=... decode_fraction_of_bound=... generate_tokens_per_s=... loss_mfu=...
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}
json=${GPU_CHECK_JSON:-outputs/gpu_check.json}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
# no part starts after 400 s; the whole run is stopped at 470 s (the JSON keeps the parts done)
timeout 470 "$python" scripts/gpu_check.py --budget-s 400 --json "$json" "$@"
