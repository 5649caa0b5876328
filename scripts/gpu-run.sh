#!/usr/bin/env bash
# Runs on a GPU host over the binaries of scripts/build-device-bin.sh (carried as device-bin/):
# the GPU tests with SPARSECTR_REQUIRE_GPU=1, compute-sanitizer (memcheck, racecheck, initcheck)
# on the GPU test binaries, a smoke run of the benchmark, and (from a CANDLE_CUDA=1 build) the
# candle op's CUDA test and the training example with --cuda. Everything lands in one tarball,
# $OUT/gpu-run.tar.gz (the device tool brings back at most 8 files), plus summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${OUT:-gpu-out}
out=$(mktemp -d)/gpu-run
mkdir -p "$out/results" "$dest"
export SPARSECTR_REQUIRE_GPU=1
export SPARSECTR_COMMIT=$(cat device-bin/COMMIT 2>/dev/null || echo unknown)
cuda_lib=$(dirname "$(dirname "$(command -v nvcc)")")/lib64
export LD_LIBRARY_PATH="$cuda_lib:${LD_LIBRARY_PATH:-}"
{
  echo "commit $SPARSECTR_COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvcc --version | tail -2
} > "$out/env.txt" 2>&1
status=0
if [ -f device-bin/candle-cuda.tar.xz ]; then
  tar -C device-bin -xJf device-bin/candle-cuda.tar.xz 2>/dev/null || python3 -c '
import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' device-bin/candle-cuda.tar.xz device-bin
fi
for bin in device-bin/test-gpu_forward device-bin/test-gpu_backward device-bin/test-gpu_dense device-bin/test-nvrtc_compile device-bin/lib-sparsectr_attn device-bin/test-candle_cuda; do
  [ -x "$bin" ] || continue
  name=$(basename "$bin")
  "$bin" --test-threads 1 > "$out/$name.log" 2>&1 || status=1
  tail -3 "$out/$name.log"
done
sanitize=${SANITIZE:-memcheck racecheck initcheck}
# Few cases under the sanitizer: it slows kernels down 10-100x.
for tool in $sanitize; do
  for bin in device-bin/test-gpu_forward device-bin/test-gpu_backward device-bin/test-gpu_dense; do
    [ -x "$bin" ] || continue
    SPARSECTR_GPU_CASES=${SANITIZER_CASES:-3} compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$bin" --test-threads 1 > "$out/sanitizer-$tool-$(basename "$bin").log" 2>&1 || status=1
    tail -2 "$out/sanitizer-$tool-$(basename "$bin").log"
  done
done
# A smoke run of the benchmark (sparse only, one cell, few repetitions); the full BENCH.md run is
# scripts/bench-gpu.sh.
if [ -x device-bin/bench-gpu_bench ]; then
  device-bin/bench-gpu_bench --workload ctr-base --len 4096 --reps 5 --systems sparse \
    --out "$out/results/gpu-bench-smoke.jsonl" ${BENCH_ARGS:-} > "$out/bench-gpu_bench.log" 2>&1 || status=1
  cat "$out/bench-gpu_bench.log"
fi
# The training example on the GPU (a CANDLE_CUDA=1 build), with TRAIN_ARGS (default: its defaults).
if [ -x device-bin/example-sparsectr_train ]; then
  device-bin/example-sparsectr_train --cuda ${TRAIN_ARGS:-} > "$out/train-cuda.log" 2>&1 || status=1
  tail -8 "$out/train-cuda.log"
fi
grep -h -E "test result|ERROR SUMMARY|sparse-ours|^(evo|dense) |error" "$out"/*.log > "$dest/summary.txt" 2>/dev/null
tar -C "$(dirname "$out")" -czf "$dest/gpu-run.tar.gz" gpu-run
exit $status
