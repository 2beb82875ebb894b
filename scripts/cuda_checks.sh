#!/usr/bin/env bash
# The CUDA checks, for a GPU machine with no network: tiny in-memory models and this working tree only
# (no install; the machine's own torch and transformers). Prints the GPU, then the tests marked cuda.
#   bash scripts/cuda_checks.sh            # extra pytest arguments pass through, e.g. -x
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'| cuda visible:', torch.cuda.is_available())"
PYTHONPATH=src python3 -m pytest -m cuda -p no:cacheprovider -q -rs tests/test_cuda.py "$@"
