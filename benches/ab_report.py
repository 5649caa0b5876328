#!/usr/bin/env python3
"""Side-by-side table of kernel versions timed in one device call (scripts/gpu-run.sh, step `ab`).

    python3 benches/ab_report.py AB.jsonl [--base LABEL]

Every line of AB.jsonl is one `gpu_bench` run (sparse system, one cell); its `kernel_dir` says
which kernels ran (`built-in`, or a folder of scripts/kernel-sources.sh and that folder's commit).
Runs of one version are pooled: the table gives the median over every run of that version's
per-run medians, each pass's ratio to the base version (default: the first in the file), and
the spread (largest over smallest) of that version's medians, so a ratio can be read against
the noise of its own runs.
"""

import argparse
import json
import statistics
import sys

PASSES = ("fwd", "fwd_bwd", "fwd_bwd_det", "e2e_fwd_bwd")


def label(run):
    """The version's name, and the rest of its COMMIT note (modules it ran built in)."""
    kd = run.get("kernel_dir", "built-in")
    if kd == "built-in":
        return "built-in " + run.get("commit", "?")[:7], ""
    # "<dir>: <hash> <subject>[\n<note>]" -> "<short hash> <subject>", "<note>"
    note = kd.split(": ", 1)[1] if ": " in kd else kd
    first, _, rest = note.partition("\n")
    return (first[:7] + first[40:] if len(first) > 41 else first), rest.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl")
    ap.add_argument("--base", help="label prefix of the version ratios are taken against")
    args = ap.parse_args()
    runs = [json.loads(line) for line in open(args.jsonl) if line.strip()]
    if not runs:
        sys.exit(f"{args.jsonl}: no runs")
    order, times, notes = [], {}, {}
    cells = {(r["workload"], r["len"]) for r in runs}
    if len(cells) != 1:
        sys.exit(f"{args.jsonl}: runs of several cells {sorted(cells)}; compare one cell at a time")
    for r in runs:
        name, note = label(r)
        if note:
            notes[name] = note
        if name not in times:
            order.append(name)
            times[name] = {}
        for row in r["rows"]:
            if row["system"] == "sparse-ours" and row["pass"] in PASSES:
                times[name].setdefault(row["pass"], []).extend(row["ms"])
    base = order[0]
    if args.base:
        matches = [n for n in order if n.startswith(args.base)]
        if not matches:
            sys.exit(f"--base {args.base}: no version labelled so; versions: {order}")
        base = matches[0]
    (workload, n), = cells
    r0 = runs[0]
    print(f"{r0['gpu']}, driver {r0.get('nvidia_driver', '?')}, {workload} n = {n}, bf16; "
          f"build {r0.get('commit', '?')[:7]}; ratios against {base}\n")
    print("| kernels | " + " | ".join(f"{p} ms | x" for p in PASSES) + " | runs | spread |")
    print("|---|" + "---:|---:|" * len(PASSES) + "---:|---:|")
    for name in order:
        cols, spreads, count = [], [], 0
        for p in PASSES:
            ms = times[name].get(p)
            base_ms = times[base].get(p)
            if not ms:
                cols += ["-", "-"]
                continue
            med = statistics.median(ms)
            count = max(count, len(ms))
            spreads.append(max(ms) / min(ms))
            ratio = f"{statistics.median(base_ms) / med:.2f}" if base_ms else "-"
            cols += [f"{med:.2f}", ratio]
        spread = f"{max(spreads):.3f}" if spreads else "-"
        print(f"| {name} | " + " | ".join(cols) + f" | {count} | {spread} |")
    print("\nx: the base version's median over this version's (above 1: faster than the base).")
    for name in order:
        if name in notes:
            print(f"{name}: {notes[name]}")


if __name__ == "__main__":
    main()
