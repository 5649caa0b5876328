#!/usr/bin/env bash
# Builds the GPU test and bench binaries here (no GPU or CUDA needed) and copies them into the
# git-ignored device-bin/, to be carried to a GPU host and run there by scripts/gpu-run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf device-bin && mkdir -p device-bin
msg_tests=$(cargo test --release --no-run --message-format=json 2>/dev/null)
msg_bench=$(cargo bench --no-run --message-format=json 2>/dev/null)
printf '%s\n%s\n' "$msg_tests" "$msg_bench" | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name = m["target"]["name"]
        kind = m["target"]["kind"][0]
        if kind in ("test", "bench") or (kind == "lib" and m["profile"]["test"]):
            shutil.copy(m["executable"], "device-bin/%s-%s" % (kind, name))
'
git rev-parse HEAD > device-bin/COMMIT
ls -la device-bin
