#!/usr/bin/env bash
# Runs on a GPU host over the binaries of scripts/build-device-bin.sh (carried as device-bin/):
# the GPU tests with SPARSECTR_REQUIRE_GPU=1, the main job (examples/evoattention), compute-sanitizer (memcheck, racecheck, initcheck)
# on the GPU test binaries, a smoke run of the benchmark, and (from a CANDLE_CUDA=1 build) the
# candle op's CUDA test and the training example with --cuda; on request (STEPS=... ncu) an ncu
# profile of the sparse kernels. Everything lands in one tarball,
# $OUT/gpu-run.tar.gz (the device tool brings back at most 8 files), plus summary.txt, both
# rewritten after every step: a command the device tool stops at its time limit still returns
# what finished.
#
#   STEPS="tests example sanitize bench train"   the steps to run, in order (default: these
#                                         five; "ncu", "ncu-source" and "red" are not by
#                                         default; "red" times f32 reductions, red-rate.cu)
#   BUDGET_S=540                          no step starts later than this, and each step is cut
#                                         off (timeout) where it would run past it
#   SANITIZE="memcheck racecheck initcheck", SANITIZE_BINS (default: the forward, backward and
#   dense GPU test binaries), SANITIZER_CASES=3, BENCH_ARGS, TRAIN_ARGS,
#   NCU_BACKWARD_KERNELS=5 (backward launches profiled), NCU_WORKLOAD=ctr-base (n = 4096; the
#   ncu and ncu-source steps)
#
# Earlier kernels (device-bin/kernels/<hash>/, from scripts/build-device-bin.sh), run through
# SPARSECTR_KERNEL_DIR (feature `dev-kernel-dir`) behind the binaries of device-bin/prev/ where
# the build made them (PREV_COMMIT: launch code that calls those kernels), else behind these:
#   versions   the GPU forward and backward tests for each of them (VERSION_CASES=8 cases a
#              test), to find which one broke a test the build's own kernels fail
#   ab         the benchmark's sparse passes (AB_WORKLOAD=ctr-base, n = 4096, AB_REPS=10) for each of them and
#              the build's own kernels, alternated over AB_ROUNDS=2 rounds, into
#              results/ab.jsonl and the side-by-side table ab.txt (benches/ab_report.py)
#
# A device command may run at most 10 minutes: split a first full run in two calls, e.g.
# STEPS="tests" then STEPS="sanitize bench train".
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${OUT:-gpu-out}
out=$(mktemp -d)/gpu-run
mkdir -p "$out/results" "$dest"
export SPARSECTR_REQUIRE_GPU=1
export SPARSECTR_COMMIT=$(cat device-bin/COMMIT 2>/dev/null || echo unknown)
cuda_lib=$(dirname "$(dirname "$(command -v nvcc)")")/lib64
export LD_LIBRARY_PATH="$cuda_lib:${LD_LIBRARY_PATH:-}"
steps=${STEPS:-tests example sanitize bench train}
budget=${BUDGET_S:-540}
started=$(date +%s)
{
  echo "commit $SPARSECTR_COMMIT"
  echo "steps: $steps (budget ${budget} s)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvcc --version | tail -2
} > "$out/env.txt" 2>&1
status=0

pack() {
  grep -h -E "test result|ERROR SUMMARY|sparse-ours|^(evo|dense) |error|TIMED OUT|SKIPPED STEP|^(copy|store|red\.)|sums" \
    "$out"/*.log > "$dest/summary.txt" 2>/dev/null
  [ -f "$out/ab.txt" ] && cat "$out/ab.txt" >> "$dest/summary.txt"
  tar -C "$(dirname "$out")" -czf "$dest/gpu-run.tar.gz" gpu-run
}

# Runs "$@" with stdout and stderr into $out/$1-log-name ($log), cut off at the budget.
run_logged() {
  local log=$1
  shift
  local left=$((budget - ($(date +%s) - started)))
  if [ "$left" -le 5 ]; then
    echo "SKIPPED STEP $log: budget of ${budget} s spent" | tee "$out/$log"
    status=1
    return
  fi
  timeout "$left" "$@" > "$out/$log" 2>&1
  local rc=$?
  if [ "$rc" -eq 124 ]; then
    echo "TIMED OUT after the budget of ${budget} s" >> "$out/$log"
  fi
  [ "$rc" -eq 0 ] || status=1
  tail -3 "$out/$log"
}

# The binary $1 (e.g. bench-gpu_bench) that runs the kernel folders, and the commit it was built
# from: device-bin/prev/'s where there is one (build-device-bin.sh, PREV_COMMIT).
folder_bin() {
  if [ -x "device-bin/prev/$1" ]; then
    echo "device-bin/prev/$1 $(cat device-bin/prev/COMMIT)"
  else
    echo "device-bin/$1 $SPARSECTR_COMMIT"
  fi
}

if [ -f device-bin/candle-cuda.tar.xz ]; then
  tar -C device-bin -xJf device-bin/candle-cuda.tar.xz 2>/dev/null || python3 -c '
import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' device-bin/candle-cuda.tar.xz device-bin
fi

for step in $steps; do
  case $step in
    tests)
      for bin in device-bin/test-gpu_forward device-bin/test-gpu_backward device-bin/test-gpu_dense \
                 device-bin/test-nvrtc_compile device-bin/lib-sparsectr_attn device-bin/test-candle_cuda; do
        [ -x "$bin" ] || continue
        run_logged "$(basename "$bin").log" "$bin" --test-threads 1
        pack
      done
      ;;
    sanitize)
      # Few cases under the sanitizer: it slows kernels down 10-100x.
      export SPARSECTR_GPU_CASES=${SANITIZER_CASES:-3}
      for tool in ${SANITIZE:-memcheck racecheck initcheck}; do
        for bin in ${SANITIZE_BINS:-device-bin/test-gpu_forward device-bin/test-gpu_backward device-bin/test-gpu_dense}; do
          [ -x "$bin" ] || continue
          run_logged "sanitizer-$tool-$(basename "$bin").log" \
            compute-sanitizer --tool "$tool" --error-exitcode 9 "$bin" --test-threads 1
          pack
        done
      done
      unset SPARSECTR_GPU_CASES
      ;;
    bench)
      # A smoke run of the benchmark (sparse only, one cell, few repetitions); the full BENCH.md
      # run is scripts/bench-gpu.sh.
      if [ -x device-bin/bench-gpu_bench ]; then
        run_logged bench-gpu_bench.log device-bin/bench-gpu_bench --workload ctr-base --len 4096 \
          --reps 5 --systems sparse --out "$out/results/gpu-bench-smoke.jsonl" ${BENCH_ARGS:-}
        pack
      fi
      ;;
    ncu)
      # Where the sparse kernels' time goes (bf16, NCU_WORKLOAD at n = 4096): one forward and one of
      # each backward kernel, with the stall reasons of a latency-bound kernel (WarpStateStats)
      # and, for the forward, where in the SASS its warps stall (SourceCounters: the top stall
      # locations, which the static counts of scripts/sass-loops.py cannot show).
      # ncu locks clocks, so its durations run about 15-25% above the live timings.
      if [ -x device-bin/bench-gpu_bench ]; then
        for what in "forward:evo_forward_tc:1:SourceCounters" \
                    "backward:evo_backward_:${NCU_BACKWARD_KERNELS:-5}:"; do
          IFS=: read -r name regex count extra <<< "$what"
          run_logged "ncu-$name.log" ncu --section SpeedOfLight --section Occupancy \
            --section LaunchStats --section WarpStateStats ${extra:+--section "$extra"} \
            -k "regex:$regex" -c "$count" \
            device-bin/bench-gpu_bench --workload "${NCU_WORKLOAD:-ctr-base}" --len 4096 --reps 1 --systems sparse \
            --out "$out/results/ncu-$name.jsonl"
          pack
        done
      fi
      ;;
    ncu-source)
      # Per SASS instruction (stall samples, excess sectors and shared wavefronts): where the
      # forward and the query backward lose their time, which the summaries of `ncu` cannot
      # say (2026-11-23: 47% of the forward's global sectors and 40% of its shared wavefronts
      # were excess, at unknown instructions). Each kernel's report is printed as CSV, per SASS
      # instruction and per line of the kernel sources: SPARSECTR_LINEINFO=1 (a dev-kernel-dir
      # hook) compiles with -lineinfo, which leaves the SASS as it is, and build.rs's #line
      # directives name kernels/attn/x.cuh:N, the lines that the CPU emulation's bank model
      # (EMU_BANKS) reports for the tile helpers.
      if [ -x device-bin/bench-gpu_bench ]; then
        for regex in evo_forward_tc evo_backward_query_tc; do
          run_logged "ncu-source-$regex.log" env SPARSECTR_LINEINFO=1 ncu --section SourceCounters --section WarpStateStats \
            --section InstructionStats -k "regex:$regex" -c 1 -o "$out/ncu-$regex" \
            device-bin/bench-gpu_bench --workload "${NCU_WORKLOAD:-ctr-base}" --len 4096 --reps 1 --systems sparse \
            --out "$out/results/ncu-source.jsonl"
          run_logged "ncu-source-$regex.csv" ncu --import "$out/ncu-$regex.ncu-rep" --page source \
            --print-source sass --csv
          ncu --import "$out/ncu-$regex.ncu-rep" --page source --print-source cuda --csv \
            > "$out/ncu-source-$regex-lines.csv" 2>&1 ||
            echo "(no per-line export from this ncu)" >> "$out/ncu-source-$regex-lines.csv"
          rm -f "$out/ncu-$regex.ncu-rep"
          pack
        done
      fi
      ;;
    versions)
      export SPARSECTR_GPU_CASES=${VERSION_CASES:-8}
      for v in $(cat device-bin/kernels/ORDER 2>/dev/null); do
        for name in test-gpu_forward test-gpu_backward; do
          read -r bin commit <<< "$(folder_bin "$name")"
          [ -x "$bin" ] || continue
          SPARSECTR_KERNEL_DIR=device-bin/kernels/$v SPARSECTR_COMMIT=$commit \
            run_logged "versions-$v-$name.log" "$bin" --test-threads 1
          pack
        done
      done
      unset SPARSECTR_GPU_CASES
      ;;
    ab)
      if [ -x device-bin/bench-gpu_bench ]; then
        for round in $(seq "${AB_ROUNDS:-2}"); do
          for v in $(cat device-bin/kernels/ORDER 2>/dev/null) built-in; do
            dir=device-bin/kernels/$v
            read -r bin commit <<< "$(folder_bin bench-gpu_bench)"
            [ "$v" = built-in ] && dir= bin=device-bin/bench-gpu_bench commit=$SPARSECTR_COMMIT
            SPARSECTR_KERNEL_DIR=$dir SPARSECTR_COMMIT=$commit run_logged "ab-$round-$v.log" "$bin" \
              --workload "${AB_WORKLOAD:-ctr-base}" --len 4096 --reps "${AB_REPS:-10}" --systems sparse \
              --out "$out/results/ab.jsonl"
            [ -f "$out/results/ab.jsonl" ] &&
              python3 benches/ab_report.py "$out/results/ab.jsonl" > "$out/ab.txt" 2>&1
            pack
          done
        done
      fi
      ;;
    red)
      # The L2's f32 reduction rate into a dQ-shaped buffer (scripts/red-rate.cu): whether dQ of
      # the local branch by atomics on the key side could pay (the results' notes, session 40).
      run_logged red-rate-build.log nvcc -O3 -arch=sm_90 -o "$out/red-rate" scripts/red-rate.cu
      [ -x "$out/red-rate" ] && run_logged red-rate.log "$out/red-rate"
      rm -f "$out/red-rate"
      pack
      ;;
    example)
      # The main job (README's first command) on the GPU, forward and backward checked.
      if [ -x device-bin/example-evoattention ]; then
        run_logged example-evoattention.log device-bin/example-evoattention ${EXAMPLE_ARGS:-}
        pack
      fi
      ;;
    train)
      # The training example on the GPU (a CANDLE_CUDA=1 build), with TRAIN_ARGS.
      if [ -x device-bin/example-sparsectr_train ]; then
        run_logged train-cuda.log device-bin/example-sparsectr_train --cuda ${TRAIN_ARGS:-}
        pack
      fi
      ;;
    *)
      echo "unknown step $step (tests, example, sanitize, bench, ncu, ncu-source, train, versions, ab, red)" | tee -a "$out/env.txt"
      status=2
      ;;
  esac
done
pack
exit $status
