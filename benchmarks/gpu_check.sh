#!/usr/bin/env bash
# The checks that need a GPU (bf16 throughput and MFU of a ~1.1B Llama with LoRA, the 4-bit
# path, rsa-cvar's memory against dpo at T = 512), in one run of a few minutes on one H100/H200.
# Writes benchmarks/results/gpu_check.json; CI never runs it. Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 python benchmarks/gpu_check.py "$@"
