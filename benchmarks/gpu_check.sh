#!/usr/bin/env bash
# The GPU check, from the repository root on a machine with a GPU (about 6 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh
# 1. python -m benchmarks.gpu_check: base pre-training (bf16, the training loop Ray Train runs; also
#    with activation checkpointing and torch.compile), the SDPA kernels the attention reaches, kNN
#    scoring on the GPU, LoRA fine-tuning, GPU embedding, 2-process NCCL with two or more GPUs; one
#    JSON line, also written to benchmarks/results/gpu_check.json;
# 2. the `gpu` tests (Ray Train on a GPU worker, Ray Data embedding and scoring on GPUs), when
#    pytest, Ray and soundfile are installed (DEVELOPERS.md: bringing them to a bare GPU image).
# Without a GPU it runs the same code paths at toy size on the CPU. Exit status: non-zero when a
# part failed.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=${GPU_CHECK_OUT:-benchmarks/results}
mkdir -p "$out"
python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'no CUDA device: CPU-sized check')"
timeout 420 python -m benchmarks.gpu_check --out "$out/gpu_check.json"
check=$?
tests=skipped
if python -c "import pytest, ray, soundfile" 2>/dev/null; then
  # only the files that hold gpu tests: the others import Hydra, which a bare GPU image may lack
  timeout 240 python -m pytest -p no:cacheprovider -q -m gpu $(grep -l "mark.gpu" tests/test_*.py)
  tests=$?   # tests/conftest.py sets the local test cluster up
else
  echo "gpu tests skipped: pytest, ray or soundfile is missing (see DEVELOPERS.md)"
fi
echo "gpu tests: $tests; gpu_check: $check"
[ "$check" = 0 ] && { [ "$tests" = skipped ] || [ "$tests" = 0 ]; }
