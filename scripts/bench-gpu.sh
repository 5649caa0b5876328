#!/usr/bin/env bash
# The BENCH.md benchmark on a GPU host, over the binaries of scripts/build-device-bin.sh (carried
# as device-bin/) and the PyTorch found there:
#
#   scripts/bench-gpu.sh [PART...]      PART = all | WORKLOAD | WORKLOAD:LEN   (default: all)
#
# e.g. `scripts/bench-gpu.sh ctr-small ctr-base:1024`. For each workload and length, one cell at a
# time (the exported folder of a ctr-wide cell is about 15 GB): device-bin/bench-gpu_bench times
# this crate's sparse and dense kernels and exports the batch and its output; torch_baselines.py
# checks FlexAttention EvoAttention against that output, then times it and flash SDPA; the folder
# is deleted. Both append a JSON line per cell to benches/results/raw/<gpu>.jsonl; after every
# cell benches/report.py rebuilds benches/results/<gpu>.{json,md} and <gpu>-speedup.svg, and
# $OUT/bench.tar.gz (benches/results and the logs) and $OUT/bench-summary.txt are repacked, so a
# command cut short still brings back every finished cell.
#
# Splitting over device calls (10 minutes each, 30 in all per session): run a few parts per call;
# the script starts no new cell after BUDGET_S seconds (default 420) and says which it skipped.
# Between calls, unpack the results over the working tree here (`tar -xzf bench.tar.gz -C benches
# results`), so that the next call carries the raw lines so far and appends to them;
# benches/report.py can also be rerun here (standard library only).
# Cost per cell: dominated by the dense kernels at n = 16384 (134 s for ctr-base on an H100) and
# by FlexAttention's torch.compile (six kernels per shape, each shape a new cell).
#
# Environment: REPS (default 20, BENCH.md's minimum), DENSE_REPS (default REPS; fewer only when
# time forces it: the results record the repetitions of every row), SYSTEMS (sparse,dense),
# TORCH=0 (skip the PyTorch baselines), TORCH_TIMEOUT_S (default 400: the PyTorch step of a cell
# is stopped there, keeping the passes it finished), BUDGET_S, OUT (default bench-out).
# FLEX_BIAS (default fast; fast,exact64 also times the bias as SPEC writes it, in int64 and f64),
# FLEX_PASSES (default fwd,fwd_bwd; fwd_branches adds the forward one FlexAttention call at a
# time), TORCH_SYSTEMS (default flex,sdpa): passed to torch_baselines.py.
# TORCH_CACHE=FILE: PyTorch's compile caches (Inductor's, with Triton's inside) as a tarball to
# start from where FILE, or its parts FILE.part-00, -01, ..., exist. After each cell's PyTorch step
# the caches are packed into $OUT/torch-cache.tar.gz.part-NN (14 MiB each, at most
# TORCH_CACHE_PARTS=4: the device tool's file limits), so a FlexAttention compilation that one
# 10-minute call cuts short resumes in the next: carry the parts back and name FILE here. The caches live at one fixed path, as compiled artifacts record where they were.
# Seen on an H100 (2026-11-22): a ctr-base n = 4096 cell took 100 s for this crate's rows;
# FlexAttention's forward compiled in 73 s, and the whole PyTorch step with the backward
# compilation ran past 300 s.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
dest=${OUT:-bench-out}
budget=${BUDGET_S:-420}
reps=${REPS:-20}
logs=$(mktemp -d)/logs
mkdir -p "$dest" "$logs" benches/results/raw
export SPARSECTR_COMMIT=$(cat device-bin/COMMIT 2>/dev/null || echo unknown)
export SPARSECTR_NVIDIA_DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
if command -v nvcc >/dev/null; then
  # NVRTC compiles the kernels at first use: the toolkit's libnvrtc must be loadable.
  export LD_LIBRARY_PATH="$(dirname "$(dirname "$(command -v nvcc)")")/lib64:${LD_LIBRARY_PATH:-}"
fi
bench=device-bin/bench-gpu_bench
if [ ! -x "$bench" ]; then
  echo "no $bench: run scripts/build-device-bin.sh on the build machine first" >&2
  exit 2
fi

workloads="ctr-small ctr-base ctr-wide"
lens="1024 4096 16384"
cells=()
for part in "${@:-all}"; do
  case "$part" in
    all) for w in $workloads; do for n in $lens; do cells+=("$w:$n"); done; done ;;
    *:*) cells+=("$part") ;;
    *) for n in $lens; do cells+=("$part:$n"); done ;;
  esac
done

if [ "${TORCH:-1}" != 0 ]; then
  export TORCHINDUCTOR_CACHE_DIR=/tmp/sparsectr-torch-cache
  export TRITON_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR/triton
  mkdir -p "$TRITON_CACHE_DIR"
  if [ -n "${TORCH_CACHE:-}" ]; then
    # One tarball, or the parts pack_torch_cache split it into (FILE.part-00, -01, ...).
    parts=$(ls "$TORCH_CACHE" "$TORCH_CACHE".part-* 2>/dev/null | head -1)
    if [ -f "$TORCH_CACHE" ]; then
      tar -xzf "$TORCH_CACHE" -C "$TORCHINDUCTOR_CACHE_DIR" && echo "torch caches from $TORCH_CACHE" >&2
    elif [ -n "$parts" ]; then
      cat "$TORCH_CACHE".part-* | tar -xzf - -C "$TORCHINDUCTOR_CACHE_DIR" \
        && echo "torch caches from $TORCH_CACHE.part-*" >&2
    fi
  fi
fi

pack_torch_cache() {
  # The device tool brings back at most 8 files of 16 MiB each (64 MiB in all): the caches go
  # back in parts of 14 MiB, at most TORCH_CACHE_PARTS (default 4) of them, so that a
  # FlexAttention compilation one call cuts short resumes in the next (the caches outgrew one
  # 15 MiB file on 2026-11-23, after the forward and part of the backward).
  local tmp="$dest/torch-cache.tar.gz.tmp" max=${TORCH_CACHE_PARTS:-4}
  tar -czf "$tmp" -C "$TORCHINDUCTOR_CACHE_DIR" . 2>/dev/null || { rm -f "$tmp"; return; }
  rm -f "$dest"/torch-cache.tar.gz "$dest"/torch-cache.tar.gz.part-*
  if [ "$(stat -c %s "$tmp")" -gt $((max * 14 * 1024 * 1024)) ]; then
    echo "torch caches over $max parts of 14 MiB: not packed" >> "$logs/status.txt"
    rm -f "$tmp"
    return
  fi
  split -b 14M -d -a 2 "$tmp" "$dest/torch-cache.tar.gz.part-"
  rm -f "$tmp"
}

pack() {
  local raw
  raw=$(ls -t benches/results/raw/*.jsonl 2>/dev/null | head -1)
  if [ -n "$raw" ]; then
    python3 benches/report.py "$raw" > "$logs/report.log" 2>&1 || echo "report.py failed" >> "$logs/status.txt"
  fi
  {
    cat "$logs/status.txt" 2>/dev/null
    if [ -n "$raw" ]; then
      sed -n '/^## Targets/,/^## Every/p' "benches/results/$(basename "$raw" .jsonl).md" | grep -v '^## Every'
    fi
  } > "$dest/bench-summary.txt"
  tar -czf "$dest/bench.tar.gz" -C benches results -C "$(dirname "$logs")" logs
}

status=0
{
  echo "commit $SPARSECTR_COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} > "$logs/status.txt" 2>&1
for cell in "${cells[@]}"; do
  w=${cell%%:*}
  n=${cell##*:}
  elapsed=$(( $(date +%s) - started ))
  if [ "$elapsed" -ge "$budget" ]; then
    echo "skipped $w n=$n: $elapsed s elapsed, budget $budget s" | tee -a "$logs/status.txt"
    continue
  fi
  export_dir=$(mktemp -d)
  t0=$(date +%s)
  args=(--workload "$w" --len "$n" --reps "$reps" --export "$export_dir")
  [ -n "${DENSE_REPS:-}" ] && args+=(--dense-reps "$DENSE_REPS")
  [ -n "${SYSTEMS:-}" ] && args+=(--systems "$SYSTEMS")
  if ! "$bench" "${args[@]}" > "$logs/$w-n$n-crate.log" 2>&1; then
    echo "FAILED crate bench $w n=$n (log $w-n$n-crate.log)" | tee -a "$logs/status.txt"
    status=1
  elif grep -q '^SKIPPED' "$logs/$w-n$n-crate.log"; then
    grep '^SKIPPED' "$logs/$w-n$n-crate.log" | tee -a "$logs/status.txt"
    rm -rf "$export_dir"
    status=3
    break
  elif [ "${TORCH:-1}" != 0 ]; then
    pack  # the crate's rows are safe before PyTorch starts compiling
    # Recompilations are logged: a FlexAttention call that recompiles when timed would time
    # the compiler, not the kernel.
    TORCH_LOGS="${TORCH_LOGS:-recompiles}" PYTHONUNBUFFERED=1 timeout "${TORCH_TIMEOUT_S:-400}" \
        python3 benches/torch_baselines.py \
        --data "$export_dir/$w-n$n" --len "$n" --reps "$reps" --flex-bias "${FLEX_BIAS:-fast}" \
        --passes "${FLEX_PASSES:-fwd,fwd_bwd}" --systems "${TORCH_SYSTEMS:-flex,sdpa}" \
        > "$logs/$w-n$n-torch.log" 2>&1
    rc=$?
    pack_torch_cache
    if [ "$rc" -eq 124 ]; then
      echo "TIMED OUT PyTorch baselines $w n=$n after ${TORCH_TIMEOUT_S:-400} s (passes finished before are kept)" \
        | tee -a "$logs/status.txt"
      status=1
    elif [ "$rc" -ne 0 ]; then
      echo "FAILED PyTorch baselines $w n=$n (log $w-n$n-torch.log)" | tee -a "$logs/status.txt"
      status=1
    fi
  fi
  rm -rf "$export_dir"
  echo "done $w n=$n in $(( $(date +%s) - t0 )) s" | tee -a "$logs/status.txt"
  tail -n 12 "$logs/$w-n$n-crate.log"
  grep -h -E "relative L2|\] run |Recompiling|guard failure" "$logs/$w-n$n-torch.log" 2>/dev/null
  pack
done
pack
cat "$dest/bench-summary.txt"
exit $status
