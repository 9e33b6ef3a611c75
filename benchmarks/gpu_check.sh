#!/usr/bin/env bash
# The checks that need a GPU, in one run of about 5 minutes on one H100/H200, stopped at 8:
# 1. bf16 + LoRA step of a 0.89B Llama at T 512 and T 2048: tokens/s, MFU, peak memory;
# 2. rsa-cvar against dpo (step time, peak memory) with the fused loss and the plain one;
# 3. the same step under QLoRA NF4 (rsa_pl.models.load_quantized);
# 4. the paper preset's step (configs/paper.yaml: 7B geometry, NF4, B 16 x T 512): its peak
#    memory at 4 and 8 layers, extrapolated to 32, then measured at 32.
# Each part prints as soon as it is measured and benchmarks/results/gpu_check.json is rewritten
# after each, so a run stopped by the limit keeps what it finished. CI never runs it.
# Usage: bash benchmarks/gpu_check.sh [gpu_check.py options]   (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout --kill-after=15 480 "$PYTHON" benchmarks/gpu_check.py "$@"
