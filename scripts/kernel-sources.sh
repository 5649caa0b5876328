#!/usr/bin/env bash
# Writes the generated kernel sources of earlier commits, for a build with the feature
# `dev-kernel-dir` to run in place of its own (SPARSECTR_KERNEL_DIR): one set of binaries then
# tests and times several kernel versions on one GPU (scripts/gpu-run.sh, steps `versions` and
# `ab`).
#
#   scripts/kernel-sources.sh OUT_DIR COMMIT...
#
# For each commit, OUT_DIR/<short hash>/ holds the modules (kernels/<name>.cu with its headers
# inlined and its instantiations appended, as build.rs writes them) whose source differs from
# the working tree's, and a COMMIT file with the full hash and subject. The sources are generated
# by this tree's build.rs, so a commit whose kernels/ needs another instantiation list, or whose
# kernels take other arguments than this tree's launch code passes, cannot be compared this way:
# the script refuses commits where build.rs or the launch code (src/cuda/) differ from this
# tree's in a way that touches a kernel's arguments, by requiring every extern "C" signature of
# the commit's sources to match this tree's.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,16p "$0"; exit 2; }
out=$1
shift
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# build.rs is a plain program over ./kernels and $OUT_DIR; without nvcc on its PATH it only
# writes the sources.
rustc --edition 2021 -O -o "$work/gen" build.rs 2>/dev/null
gen() {  # gen TREE DEST: the generated sources of TREE/kernels into DEST
  mkdir -p "$2"
  (cd "$1" && env -u CUDA_HOME -u CUDA_PATH -u SPARSECTR_NVCC PATH=/usr/bin:/bin \
    OUT_DIR="$2" "$work/gen" > /dev/null)
  rm -f "$2/kernels.rs"
}
mkdir -p "$work/head"
cp -r kernels "$work/head/"
gen "$work/head" "$work/head/out"
# The kernels' parameter lists: each instantiation macro that declares an extern "C" kernel,
# with the parameters of its NAME(...), whitespace dropped.
signatures() {
  python3 - "$1" <<'PY'
import glob, os, re, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.cu"))):
    text = open(path).read()
    for m in re.finditer(r'#define (SPARSECTR_[A-Z_0-9]+)\(([^)]*)\)((?:[^\n]*\\\n)*[^\n]*)', text):
        body = m.group(3)
        if 'extern "C"' not in body:
            continue
        at = body.index("NAME(") + len("NAME(")
        depth, end = 1, at
        while depth:
            depth += {"(": 1, ")": -1}.get(body[end], 0)
            end += 1
        print(os.path.basename(path), m.group(1), re.sub(r"\s+|\\", "", body[at:end - 1]))
PY
}
signatures "$work/head/out" > "$work/head.sig"
mkdir -p "$out"
for commit in "$@"; do
  full=$(git rev-parse --verify "$commit^{commit}")
  short=$(git rev-parse --short=7 "$full")
  tree="$work/$short"
  mkdir -p "$tree"
  git archive "$full" kernels | tar -x -C "$tree"
  gen "$tree" "$tree/out"
  signatures "$tree/out" > "$tree.sig"
  # Modules this tree has that the commit lacks keep running the built-in source.
  if ! diff <(grep -F -f <(cut -d' ' -f1 "$tree.sig" | sort -u) "$work/head.sig") "$tree.sig" > "$work/diff"; then
    echo "$short: kernel signatures differ from this tree's; not written" >&2
    cat "$work/diff" >&2
    exit 1
  fi
  dest="$out/$short"
  rm -rf "$dest"
  mkdir -p "$dest"
  changed=()
  for f in "$tree"/out/*.cu; do
    name=$(basename "$f")
    if ! cmp -s "$f" "$work/head/out/$name"; then
      cp "$f" "$dest/$name"
      changed+=("${name%.cu}")
    fi
  done
  git log -1 --format='%H %s' "$full" > "$dest/COMMIT"
  # Modules the commit lacks run this tree's source: say so, since its launch code may have
  # called another kernel there (bbd2154 had no backward_summary_tc).
  missing=()
  for f in "$work"/head/out/*.cu; do
    [ -f "$tree/out/$(basename "$f")" ] || missing+=("$(basename "${f%.cu}")")
  done
  [ ${#missing[@]} -eq 0 ] || echo "built in (not in $short): ${missing[*]}" >> "$dest/COMMIT"
  echo "$short: ${#changed[@]} modules differ (${changed[*]:-none})"
done
