#!/usr/bin/env bash
# Builds the GPU test and bench binaries and the main job (examples/evoattention) here (no GPU or CUDA needed) and copies them into the
# git-ignored device-bin/, to be carried to a GPU host and run there by scripts/gpu-run.sh.
# CANDLE_CUDA=1 adds the candle op's CUDA test and the training example built with
# `--features candle-cuda` (see scripts/candle-cuda-env.sh; nvcc comes from the Python index).
#
# The binaries are built with the feature `dev-kernel-dir`, and device-bin/kernels/<hash>/ holds
# the kernel sources of the commits in KERNEL_VERSIONS (scripts/kernel-sources.sh; oldest first,
# listed in device-bin/kernels/ORDER), so that gpu-run.sh can test (`versions`) and time (`ab`)
# earlier kernels behind the same binaries in the same device call. Default: the steps that
# the H100 run of 2026-11-24 (benches/results, logs/h100-2026-11-24) had no time to separate:
# da5d161, session 16's kernels, before session 17's shared addresses by the compiler's
# conversion; 0ef2c27, session 20's kernels, before the conflict-free gathers (gather_slot,
# tile_rows_async at D = 32); 64e71e3, session 21's kernels, before the summary gathers' 4-byte
# split stores (store_split); 37d4067, session 22's kernels, before the forward's unmasked full
# local sub-tiles and one-add dt (session 24); 3e95d9c, session 24's kernels, before the same
# cuts in the key side's walks (session 25). Timed there and still buildable: 417e835 (saved
# branch outputs), 8390b61 (inner-loop cuts), 84ec198 (prefix walks in two warp sets). 8d9eaeb's
# kernels no longer run behind PREV_COMMIT's binaries (their user-key launch of 16 warps is an
# invalid argument to 8d9eaeb's kernel), so it is left out.
# KERNEL_VERSIONS="" builds none.
#
# Those folders predate the user token's dK and dV in the query kernel, which changed what the
# backward launches (no user-key pass; a reduction of the query kernel's partials), so they run
# behind binaries built from PREV_COMMIT (default bda23bc, the last commit before it):
# device-bin/prev/ holds its benchmark and GPU forward and backward tests, the folders are
# written against its kernels (KERNEL_BASE), and ORDER ends with PREV_COMMIT's own folder (no
# module: those binaries' built-in kernels, the step right before this tree's). gpu-run.sh runs
# every folder with device-bin/prev/ where it exists. PREV_COMMIT="" builds none: the folders
# then run behind this tree's binaries, which only kernels with this tree's parameters can.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf device-bin && mkdir -p device-bin
# NVRTC's kernels, as CI checks and benches/results times them (nvcc's front end makes other code,
# build.rs), even where this machine has an nvcc; and SPARSECTR_LINEINFO reaches only those.
export SPARSECTR_NVCC=off
features=(--features dev-kernel-dir)
# Copies the executables that cargo's JSON messages on stdin name into folder $1, as
# <kind>-<name>, where the Python condition $2 over kind, name and the message m holds.
copy_artifacts() {
  python3 -c '
import json, shutil, sys
dest, keep = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name, kind = m["target"]["name"], m["target"]["kind"][0]
        if eval(keep, {}, {"kind": kind, "name": name, "m": m}):
            shutil.copy(m["executable"], "%s/%s-%s" % (dest, kind, name))
' "$1" "$2"
}
msg_tests=$(cargo test --release --no-run "${features[@]}" --message-format=json 2>/dev/null)
msg_bench=$(cargo bench --no-run "${features[@]}" --message-format=json 2>/dev/null)
msg_main=$(cargo build --release --example evoattention "${features[@]}" --message-format=json 2>/dev/null)
printf '%s\n%s\n%s\n' "$msg_tests" "$msg_bench" "$msg_main" | copy_artifacts device-bin \
  'kind in ("test", "bench") or (kind == "lib" and m["profile"]["test"]) or (kind, name) == ("example", "evoattention")'
if [ "${CANDLE_CUDA:-0}" = 1 ]; then
    # The candle op's CUDA path: candle's `cuda` feature needs nvcc and CUDA's libraries to link
    # (installed from the Python package index by the env script). These binaries load
    # libcuda.so.1 and CUDA 13.0's libnvrtc, libcublas, libcublasLt, libcurand and libcudart at
    # start-up, so they run only where those are on the loader path (scripts/gpu-run.sh sees to it).
    source scripts/candle-cuda-env.sh
    msg_cuda=$(cargo test --release --features candle-cuda --test candle_cuda --no-run --message-format=json 2>/dev/null)
    msg_train=$(cargo build --release --features candle-cuda --example sparsectr_train --message-format=json 2>/dev/null)
    printf '%s\n%s\n' "$msg_cuda" "$msg_train" | copy_artifacts device-bin \
      '(kind, name) in (("test", "candle_cuda"), ("example", "sparsectr_train"))'
    # ~60 MB each after strip, mostly candle's kernels (the same in both): one xz archive with a
    # window that spans both is ~8 MB, inside what a GPU run can carry. gpu-run.sh unpacks it.
    strip device-bin/test-candle_cuda device-bin/example-sparsectr_train
    tar -C device-bin -cf - test-candle_cuda example-sparsectr_train \
        | xz --lzma2=preset=6,dict=128MiB > device-bin/candle-cuda.tar.xz
    rm device-bin/test-candle_cuda device-bin/example-sparsectr_train
fi
versions=${KERNEL_VERSIONS-da5d161 0ef2c27 64e71e3 37d4067 3e95d9c}
prev=${PREV_COMMIT-bda23bc}
if [ -n "$prev" ]; then
  mkdir -p device-bin/prev
  wt=$(mktemp -d)/prev
  git worktree add --quiet --detach "$wt" "$prev"
  # The same target folder: the dependencies are built once (the worktree's crate is another
  # package to cargo, so nothing of this tree's build is overwritten).
  target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  msg_prev=$(cd "$wt" && export CARGO_TARGET_DIR="$target" &&
    cargo test --release --no-run "${features[@]}" --test gpu_forward --test gpu_backward --message-format=json 2>/dev/null &&
    cargo bench --no-run "${features[@]}" --bench gpu_bench --message-format=json 2>/dev/null)
  printf '%s\n' "$msg_prev" | copy_artifacts device-bin/prev 'kind in ("test", "bench")'
  git worktree remove --force "$wt"
  git rev-parse "$prev^{commit}" > device-bin/prev/COMMIT
  versions="$versions $prev"
fi
if [ -n "$versions" ]; then
  # shellcheck disable=SC2086 # a list of commits
  KERNEL_BASE=$prev scripts/kernel-sources.sh device-bin/kernels $versions
  for c in $versions; do git rev-parse --short=7 "$c"; done > device-bin/kernels/ORDER
fi
git rev-parse HEAD > device-bin/COMMIT
ls -la device-bin
