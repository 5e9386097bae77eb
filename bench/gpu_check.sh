#!/usr/bin/env bash
# The GPU path, checked and measured in one go, everything written to one folder ($1, default
# bench/results/gpu-<date>). Run on a CUDA machine after `make install` and
# `.venv/bin/pip install -e '.[triton]'`:
#   bash bench/gpu_check.sh [OUT]
# 1. the test suite's CUDA subset: cache, presses, generate, architectures, and the kernels against
#    their twins on the GPU (no interpreter: conftest leaves TRITON_INTERPRET unset under CUDA);
# 2. jobs/calibrate.py --smoke-test on a local Ray whose model actors ask for num_gpus=1;
# 3. bench/bench_kernels.py (ragged decode, window scores, end-to-end decode on an 8B shape).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu-$(date +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"
echo "== 1. CUDA test subset" | tee "$OUT/summary.txt"
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cache.py tests/test_presses.py \
  tests/test_generate.py tests/test_architectures.py tests/test_decoder.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$? ($(tail -1 "$OUT/tests.txt"))" | tee -a "$OUT/summary.txt"
echo "== 2. calibrate --smoke-test on GPU actors" | tee -a "$OUT/summary.txt"
RAY_USAGE_STATS_ENABLED=0 "$PY" jobs/calibrate.py --smoke-test --workers 1 --out "$OUT/runs" > "$OUT/calibrate.txt" 2>&1
echo "calibrate rc=$?" | tee -a "$OUT/summary.txt"
echo "== 3. kernel benchmark" | tee -a "$OUT/summary.txt"
"$PY" bench/bench_kernels.py --out "$OUT" > "$OUT/bench.txt" 2>&1
echo "bench rc=$?" | tee -a "$OUT/summary.txt"
echo "everything in $OUT"
