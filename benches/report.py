#!/usr/bin/env python3
"""Merges the raw benchmark lines of one GPU into its results table, JSON and plot.

    python3 benches/report.py benches/results/raw/<gpu>.jsonl [--out-dir benches/results]

Reads the JSON lines `benches/gpu_bench.rs` and `benches/torch_baselines.py` append (several
device calls may have added to the file; for each workload, length and source the last line
wins) and writes `<gpu>.json` (every number, merged per workload and length), `<gpu>.md` (the
table, speed-ups, fraction of copy bandwidth, peak memory, spread of the two runs, the targets
met or missed by how much) and `<gpu>-speedup.svg` (speed-up of sparse forward + backward over
each baseline against n), `<gpu>` being the raw file's stem. Python standard library only.

A figure is the mean of the two runs' medians; the spread is |run 1 - run 2| / mean.
"""

import argparse
import json
import math
import os
import sys

SPARSE = "sparse-ours"
BASELINES = [("dense-ours", "dense (ours)"), ("sdpa-flash", "SDPA flash, causal, no bias"),
             ("flex-evo", "FlexAttention EvoAttention, fast bias")]
# FlexAttention with the bias computed as SPEC writes it (int64 and f64 per element): the only
# form torch_baselines.py had before 2026-11-23, whose lines carry no `flex_bias`. The speed-up
# table takes it where a cell has no flex-evo (fast form) row, and marks it.
FLEX_EXACT64 = "flex-evo-exact64"
SYSTEM_NAMES = dict(BASELINES, **{SPARSE: "sparse EvoAttention (ours)",
                                  FLEX_EXACT64: "FlexAttention EvoAttention, exact64 bias"})
PASS_NAMES = {"chunking": "GPU chunking", "fwd": "forward",
              "fwd_warp": "forward, warp-per-query kernel (bf16 default before tensor cores)",
              "fwd_saving": "forward saving the branch outputs (as training runs it)",
              "fwd_bwd": "forward + backward",
              "fwd_bwd_two_pass": "forward + backward without saved branch outputs (query backward in two passes)",
              "fwd_bwd_det": "forward + backward, deterministic",
              "fwd_bwd_stored": "forward + backward, key side reading the query kernel's stored pairs",
              "e2e_fwd_bwd": "chunking + forward + backward",
              "fwd_global": "forward, only the summaries' FlexAttention call",
              "fwd_transition": "forward, only the tails' FlexAttention call",
              "fwd_local": "forward, only the local FlexAttention call"}
# The targets: H100, ctr-base, bf16, forward + backward (fast backward).
TARGET_WORKLOAD = "ctr-base"
DENSE_TARGETS = {4096: 8.0, 16384: 30.0}
FLEX_TARGET = 3.0
COPY_TARGET = 0.60
RATIO_TARGET = 3.5  # issue 4: fwd + bwd over fwd
DET_TARGET = 1.3  # issue 4: deterministic over fast
ORDER = {"ctr-small": 0, "ctr-base": 1, "ctr-wide": 2}


def load(path):
    cells = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                sys.exit(f"{path}:{number}: not JSON ({e})")
            key = (obj["workload"], obj["len"])
            if obj["source"] == "torch_baselines":
                # torch_baselines.py checks and times against the batch that the cell's last
                # crate line exported: each row remembers that line, so that a ratio to a later
                # crate line (another run, maybe another commit) is marked as not side by side.
                crate = cells.get(key, {}).get("gpu_bench")
                for r in obj["rows"]:
                    r["crate_line"] = crate["line"] if crate else None
                    r["crate_commit"] = crate.get("commit") if crate else None
                obj = torch_line(obj, cells.get(key, {}).get("torch_baselines"))
            else:
                obj["line"] = number
            cells.setdefault(key, {})[obj["source"]] = obj
    return cells


def torch_line(obj, before):
    """A torch_baselines line merged over the cell's earlier ones: each line holds every row its
    run has finished, so a later row replaces an earlier one of the same system and pass, and
    rows the later run did not time (another bias form) are kept. Lines without `flex_bias`
    timed the exact64 form under the name flex-evo."""
    obj = dict(obj)
    if "flex_bias" not in obj:
        obj["rows"] = [dict(r, system=FLEX_EXACT64) if r["system"] == "flex-evo" else r
                       for r in obj["rows"]]
        if obj.get("check_rel_l2") is not None:
            obj["flex_forms"] = {"exact64": {"system": FLEX_EXACT64, "check_rel_l2": obj["check_rel_l2"],
                                             "grad_coeffs": obj.get("flex_grad_coeffs", True)}}
    if before is None:
        return obj
    rows = {(r["system"], r["pass"]): r for r in before["rows"]}
    rows.update({(r["system"], r["pass"]): r for r in obj["rows"]})
    obj["rows"] = list(rows.values())
    obj["flex_forms"] = {**before.get("flex_forms", {}), **obj.get("flex_forms", {})}
    return obj


def figure(row):
    ms = [m for m in row["ms"] if m is not None and math.isfinite(m)]
    if not ms:
        return None, None
    mean = sum(ms) / len(ms)
    spread = abs(ms[0] - ms[1]) / mean if len(ms) == 2 and mean > 0 else None
    return mean, spread


def merge(cells):
    merged = []
    for (workload, n), sources in sorted(cells.items(), key=lambda kv: (ORDER.get(kv[0][0], 9), kv[0][0], kv[0][1] or 0)):
        rust, torch = sources.get("gpu_bench"), sources.get("torch_baselines")
        cell = {"workload": workload, "len": n, "systems": {}, "notes": []}
        for src in (rust, torch):
            if src is None:
                continue
            for k in ("num_seqs", "num_tokens", "heads", "head_dim", "num_chunks", "tail_tokens",
                      "window", "candidates", "dtype"):
                if k in src:
                    cell.setdefault(k, src[k])
            for row in src["rows"]:
                if row.get("compiled_while_timed"):
                    cell["notes"].append(f"{row['system']} {row['pass']}: dynamo compiled "
                                         f"{row['compiled_while_timed']} frames while it was timed, so its "
                                         "time includes compilation")
                ms, spread = figure(row)
                entry = {"ms": ms, "runs_ms": row["ms"], "spread": spread, "reps": row["reps"],
                         "peak_bytes": row.get("peak_bytes")}
                if src is torch and rust and row.get("crate_line") != rust["line"]:
                    entry["other_run_commit"] = row.get("crate_commit") or "unknown"
                cell["systems"].setdefault(row["system"], {})[row["pass"]] = entry
        if rust and torch and rust["num_tokens"] != torch["num_tokens"]:
            cell["notes"].append(f"token counts differ: crate {rust['num_tokens']}, "
                                 f"PyTorch {torch['num_tokens']} (not the same batch)")
        if rust:
            cell["commit"] = rust.get("commit")
            copy = [c for c in rust["copy_bytes_per_s"] if c]
            cell["copy_bytes_per_s"] = rust["copy_bytes_per_s"]
            cell["min_bytes_sparse_fwd"] = rust["min_bytes_sparse_fwd"]
            cell["min_bytes_dense_fwd"] = rust["min_bytes_dense_fwd"]
            fwd = cell["systems"].get(SPARSE, {}).get("fwd")
            if fwd and fwd["ms"] and copy:
                bw = rust["min_bytes_sparse_fwd"] / (fwd["ms"] * 1e-3)
                cell["sparse_fwd_bytes_per_s"] = bw
                cell["sparse_fwd_fraction_of_copy"] = bw / (sum(copy) / len(copy))
                cell["copy_spread"] = abs(copy[0] - copy[-1]) / (sum(copy) / len(copy))
        if torch:
            cell["flex_forms"] = torch.get("flex_forms", {})
            cell["sdpa_padded_tokens"] = torch.get("sdpa_padded_tokens")
        if "flex-evo" not in cell["systems"] and FLEX_EXACT64 in cell["systems"]:
            cell["flex_speedup_form"] = "exact64"
        sparse = cell["systems"].get(SPARSE, {})
        cell["speedups"] = {}
        for base, _ in BASELINES:
            for p in ("fwd", "fwd_bwd"):
                ours = sparse.get(p, {}).get("ms")
                flex_form = base == "flex-evo" and cell.get("flex_speedup_form") == "exact64"
                row = cell["systems"].get(FLEX_EXACT64 if flex_form else base, {}).get(p, {})
                theirs = row.get("ms")
                if ours and theirs:
                    cell["speedups"].setdefault(base, {})[p] = theirs / ours
                    if "other_run_commit" in row:
                        cell.setdefault("other_run", {}).setdefault(base, {})[p] = row["other_run_commit"]
        merged.append(cell)
    return merged


def header(cells_raw):
    rust = [s["gpu_bench"] for s in cells_raw.values() if "gpu_bench" in s]
    torch = [s["torch_baselines"] for s in cells_raw.values() if "torch_baselines" in s]
    one = lambda objs, k: sorted({str(o.get(k)) for o in objs})
    return {"gpu": one(rust + torch, "gpu"), "arch": one(rust, "arch"),
            "nvidia_driver": one(rust, "nvidia_driver"), "driver_cuda": one(rust, "driver_cuda"),
            "commit": one(rust, "commit"), "torch": one(torch, "torch"),
            "torch_cuda": one(torch, "torch_cuda")}


def fmt_ms(x):
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def fmt_x(x):
    return "-" if x is None else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def fmt_pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_gib(b):
    return "-" if b is None else f"{b / 2**30:.2f}"


def targets(merged, gpu_names):
    lines = []
    by = {(c["workload"], c["len"]): c for c in merged}
    not_h100 = not any("H100" in g for g in gpu_names)
    if not_h100:
        lines.append(f"The targets are stated for an H100; these results come from {', '.join(gpu_names)}.")

    def verdict(value, target, what):
        if value is None:
            return f"- {what}: not measured (target {target:g}x)"
        if value >= target:
            return f"- {what}: {value:.2f}x, target {target:g}x: **met**"
        return (f"- {what}: {value:.2f}x, target {target:g}x: **missed** by "
                f"{target - value:.2f}x ({100 * (1 - value / target):.0f}% short)")

    lens = sorted({c["len"] for c in merged if c["workload"] == TARGET_WORKLOAD})
    for n, target in sorted(DENSE_TARGETS.items()):
        cell = by.get((TARGET_WORKLOAD, n), {})
        value = cell.get("speedups", {}).get("dense-ours", {}).get("fwd_bwd")
        lines.append(verdict(value, target, f"sparse vs dense-ours, {TARGET_WORKLOAD}, n = {n}, fwd + bwd"))
    for n in lens or [1024, 4096, 16384]:
        cell = by.get((TARGET_WORKLOAD, n), {})
        value = cell.get("speedups", {}).get("flex-evo", {}).get("fwd_bwd")
        form = " (exact64 bias form)" if cell.get("flex_speedup_form") == "exact64" else ""
        lines.append(verdict(value, FLEX_TARGET, f"sparse vs FlexAttention EvoAttention{form}, "
                             f"{TARGET_WORKLOAD}, n = {n}, fwd + bwd"))
    # Issue 4: forward + backward at most 3.5x the forward, deterministic at most 1.3x fast.
    for n in lens or [4096]:
        sp = by.get((TARGET_WORKLOAD, n), {}).get("systems", {}).get(SPARSE, {})
        ms = lambda p: sp.get(p, {}).get("ms")
        fb, det = ms("fwd_bwd"), ms("fwd_bwd_det")
        for base, what in (("fwd", "the forward alone (inference, no branch outputs)"),
                           ("fwd_saving", "the forward saving branch outputs (training)")):
            if fb and ms(base):
                r = fb / ms(base)
                lines.append(f"- sparse fwd + bwd over {what}, {TARGET_WORKLOAD}, n = {n}: {r:.2f}x, target "
                             f"at most {RATIO_TARGET:g}x: " + ("**met**" if r <= RATIO_TARGET else
                             f"**missed** by {r / RATIO_TARGET:.2f}x"))
        if fb and det:
            r = det / fb
            lines.append(f"- deterministic over fast fwd + bwd, {TARGET_WORKLOAD}, n = {n}: {r:.2f}x, target at "
                         f"most {DET_TARGET:g}x: " + ("**met**" if r <= DET_TARGET else "**missed**"))
        if fb and ms("fwd_bwd_stored"):
            st = ms("fwd_bwd_stored")
            lines.append(f"- stored local pairs (LocalPairs::Stored): fwd + bwd {st:.2f} ms against {fb:.2f} ms "
                         f"recomputing them, {fb / st:.2f}x; over the forward {st / ms('fwd'):.2f}x"
                         if ms("fwd") else f"- stored local pairs: fwd + bwd {st:.2f} ms against {fb:.2f} ms")
        if fb and ms("fwd_bwd_two_pass"):
            lines.append(f"- saved branch outputs: fwd + bwd {fb:.2f} ms against {ms('fwd_bwd_two_pass'):.2f} ms "
                         f"without them (query backward in two passes), {ms('fwd_bwd_two_pass') / fb:.2f}x")
    for n in lens or [1024, 4096, 16384]:
        frac = by.get((TARGET_WORKLOAD, n), {}).get("sparse_fwd_fraction_of_copy")
        what = f"sparse forward bandwidth, {TARGET_WORKLOAD}, n = {n}"
        if frac is None:
            lines.append(f"- {what}: not measured (target {COPY_TARGET:.0%} of copy)")
        elif frac >= COPY_TARGET:
            lines.append(f"- {what}: {frac:.1%} of copy, target {COPY_TARGET:.0%}: **met**")
        else:
            lines.append(f"- {what}: {frac:.1%} of copy, target {COPY_TARGET:.0%}: **missed** by "
                         f"{100 * (COPY_TARGET - frac):.1f} points")
    return lines


def markdown(stem, head, merged, notes=None):
    out = [f"# Benchmark results: {', '.join(head['gpu'])}", ""]
    out.append(f"GPU {', '.join(head['gpu'])} ({', '.join(head['arch'])}), NVIDIA driver "
               f"{', '.join(head['nvidia_driver'])}, driver CUDA version {', '.join(head['driver_cuda'])}; "
               + (f"PyTorch {', '.join(head['torch'])} (CUDA {', '.join(head['torch_cuda'])}); "
                  if any(head["torch"]) else "PyTorch baselines not run; ")
               + f"crate commit {', '.join(head['commit'])}.")
    if len(head["commit"]) > 1:
        out.append("")
        out.append("**These rows come from more than one commit** (see `commit` per cell in the JSON).")
    out += ["", "Protocol: `BENCH.md` (bf16; `B = 2^20 / n` users of `[0.75 n, n]` behaviors, a user "
            "token, candidates). Times are CUDA-event medians of the stated repetitions after warm-up, "
            "two input sets alternated; each figure is the mean of two identical runs, the spread "
            "`|run 1 - run 2| / mean` is shown beside it. Speed-ups are of sparse (fast backward) over "
            "the baseline, same pass. Bandwidth: the fewest bytes the sparse forward must move (Q, K, V, "
            "gates, timestamps read once; O, LSE written once) over its time, as a fraction of a "
            "device-to-device copy measured in the same run. Peak memory: the bytes of what the system "
            "reads plus the most it allocates at once during one call (the crate: CUDA memory-pool "
            "high-water mark; PyTorch: `max_memory_allocated`), GiB. SDPA runs users sorted into "
            "length buckets, each padded to its longest user; FlexAttention EvoAttention is checked "
            "against this crate's output (relative L2, bf16 tolerance 1e-2) before it is timed.", ""]
    out.append("## Targets")
    out.append("")
    out += targets(merged, head["gpu"])
    out.append("")
    out.append("## Speed-ups of sparse EvoAttention")
    out.append("")
    out.append("| workload | n | T | vs dense-ours fwd | fwd+bwd | vs SDPA flash fwd | fwd+bwd | "
               "vs FlexAttention fwd | fwd+bwd | sparse fwd, % of copy |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for c in merged:
        s = c["speedups"]
        other = c.get("other_run", {})
        g = lambda b, p: fmt_x(s.get(b, {}).get(p)) + (" (b)" if p in other.get(b, {}) else "")
        mark = " (a)" if c.get("flex_speedup_form") == "exact64" else ""
        f = lambda p: g("flex-evo", p) + (mark if s.get("flex-evo", {}).get(p) else "")
        out.append(f"| {c['workload']} | {c['len']} | {c.get('num_tokens', '-')} | {g('dense-ours', 'fwd')} | "
                   f"{g('dense-ours', 'fwd_bwd')} | {g('sdpa-flash', 'fwd')} | {g('sdpa-flash', 'fwd_bwd')} | "
                   f"{f('fwd')} | {f('fwd_bwd')} | "
                   f"{fmt_pct(c.get('sparse_fwd_fraction_of_copy'))} |")
    if any(c.get("flex_speedup_form") == "exact64" for c in merged):
        out += ["", "(a) Against FlexAttention with the bias computed as SPEC writes it, in int64 and f64 "
                "per element (the only form timed before 2026-11-23); `torch_baselines.py` now times a form "
                "in 32-bit operations (flex-evo) by default, and this cell has no row of it yet."]
    crossed = sorted({(c["workload"], c["len"], commit) for c in merged
                      for by_pass in c.get("other_run", {}).values() for commit in by_pass.values()})
    if crossed:
        runs = "; ".join(f"{w} n = {n}: PyTorch timed beside the crate at {commit[:7]}"
                         for w, n, commit in crossed)
        out += ["", "(b) Not side by side: the PyTorch row was timed in an earlier run than the sparse "
                f"row it is divided by ({runs}); the sparse rows are the cell's latest. Read it as an "
                "estimate until both are timed again in one run."]
    out += ["", f"![speed-up against n]({stem}-speedup.svg)", ""]
    out.append("## Every measurement")
    for c in merged:
        out += ["", f"### {c['workload']}, n = {c['len']}", ""]
        out.append(f"B = {c.get('num_seqs', '-')}, T = {c.get('num_tokens', '-')}, H = {c.get('heads', '-')}, "
                   f"D = {c.get('head_dim', '-')}, P = {c.get('num_chunks', '-')}, m = {c.get('tail_tokens', '-')}, "
                   f"w = {c.get('window', '-')}, {c.get('candidates', '-')} candidates per user.")
        if len(head["commit"]) > 1 and c.get("commit"):
            out.append(f"Crate rows at commit {c['commit'][:7]}.")
        copy = c.get("copy_bytes_per_s")
        if copy:
            out.append(f"Device-to-device copy: {sum(copy) / len(copy) / 1e9:.0f} GB/s "
                       f"(spread {fmt_pct(c.get('copy_spread'))}); sparse forward moves at least "
                       f"{c['min_bytes_sparse_fwd'] / 1e9:.3f} GB: "
                       f"{fmt_pct(c.get('sparse_fwd_fraction_of_copy'))} of copy.")
        for form, info in sorted(c.get("flex_forms", {}).items()):
            if info.get("check_rel_l2") is None:
                continue
            out.append(f"FlexAttention EvoAttention ({form} bias) vs this crate: relative L2 "
                       f"{info['check_rel_l2']:.2e}"
                       + ("" if info.get("grad_coeffs", True) else
                          "; its backward ran without coefficient gradients (unsupported by this PyTorch)")
                       + ".")
        if c.get("sdpa_padded_tokens"):
            out.append(f"SDPA computes {c['sdpa_padded_tokens']} padded tokens for the "
                       f"{c.get('num_tokens')} real ones.")
        for note in c["notes"]:
            out.append(f"**Note:** {note}.")
        earlier = sorted({r["other_run_commit"][:7] for sys_rows in c["systems"].values()
                          for r in sys_rows.values() if "other_run_commit" in r})
        if earlier:
            out.append(f"**Note:** the PyTorch rows come from an earlier run (crate at {', '.join(earlier)}) "
                       "than the crate's rows above them.")
        out += ["", "| system | pass | ms | spread | reps | peak GiB |", "|---|---|---|---|---|---|"]
        for system in [SPARSE] + [b for b, _ in BASELINES] + [FLEX_EXACT64]:
            for p, r in c["systems"].get(system, {}).items():
                out.append(f"| {SYSTEM_NAMES.get(system, system)} | {PASS_NAMES.get(p, p)} | {fmt_ms(r['ms'])} | "
                           f"{fmt_pct(r['spread'])} | {r['reps']} | {fmt_gib(r['peak_bytes'])} |")
    if notes:
        # Written by hand beside the raw lines (what the profile shows where a target is missed),
        # carried into every regeneration.
        out += ["", notes.strip()]
    return "\n".join(out) + "\n"


COLORS = {"dense-ours": "#1b6ca8", "sdpa-flash": "#c0392b", "flex-evo": "#27865a"}
DASHES = {"ctr-small": "4 3", "ctr-base": "", "ctr-wide": "1 3"}


def svg(merged, title):
    """Speed-up of sparse fwd+bwd over each baseline against n; log-log, hand-written SVG."""
    w, h, left, right, top, bottom = 760, 460, 70, 230, 40, 55
    series = {}
    for c in merged:
        for base, _ in BASELINES:
            v = c["speedups"].get(base, {}).get("fwd_bwd")
            if v:
                series.setdefault((base, c["workload"]), []).append((c["len"], v))
    xs = sorted({n for pts in series.values() for n, _ in pts}) or [1024, 16384]
    ys = [v for pts in series.values() for _, v in pts] + [1.0]
    x0, x1 = math.log2(xs[0]) - 0.3, math.log2(xs[-1]) + 0.3
    y0, y1 = math.floor(math.log10(min(ys)) * 3) / 3, math.ceil(math.log10(max(ys)) * 3) / 3
    if y1 - y0 < 1:
        y1 = y0 + 1
    px = lambda n: left + (math.log2(n) - x0) / (x1 - x0) * (w - left - right)
    py = lambda v: top + (y1 - math.log10(v)) / (y1 - y0) * (h - top - bottom)
    e = []
    e.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">')
    e.append(f'<rect width="{w}" height="{h}" fill="white"/>')
    e.append(f'<text x="{left}" y="22" font-size="14">{escape(title)}</text>')
    # Grid and ticks: 1, 2, 5 per decade.
    for d in range(math.floor(y0), math.ceil(y1) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** d
            if y0 <= math.log10(v) <= y1:
                y = py(v)
                e.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" '
                         f'stroke="{"#999" if v == 1 else "#e4e4e4"}"/>')
                e.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}x</text>')
    for n in xs:
        x = px(n)
        e.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{h - bottom}" stroke="#e4e4e4"/>')
        e.append(f'<text x="{x:.1f}" y="{h - bottom + 18}" text-anchor="middle">{n}</text>')
    e.append(f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
             f'fill="none" stroke="#333"/>')
    e.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 14}" text-anchor="middle">'
             f'behaviors per user n (log scale)</text>')
    e.append(f'<text transform="translate(18 {(top + h - bottom) / 2:.0f}) rotate(-90)" '
             f'text-anchor="middle">speed-up of sparse fwd + bwd (log scale)</text>')
    legend_y = top + 8
    for (base, wl), pts in sorted(series.items()):
        pts.sort()
        path = " ".join(f"{px(n):.1f},{py(v):.1f}" for n, v in pts)
        dash = DASHES.get(wl, "")
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        color = COLORS.get(base, "#555")
        e.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash_attr}/>')
        for n, v in pts:
            e.append(f'<circle cx="{px(n):.1f}" cy="{py(v):.1f}" r="3" fill="{color}">'
                     f'<title>{escape(wl)} n={n}: {v:.2f}x over {escape(base)}</title></circle>')
        lx = w - right + 15
        e.append(f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 28}" y2="{legend_y}" stroke="{color}" '
                 f'stroke-width="2"{dash_attr}/>')
        e.append(f'<text x="{lx + 34}" y="{legend_y + 4}">{escape(base)}, {escape(wl)}</text>')
        legend_y += 18
    if not series:
        e.append(f'<text x="{left + 20}" y="{top + 30}">no speed-up measured yet</text>')
    e.append("</svg>")
    return "\n".join(e) + "\n"


def escape(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", help="benches/results/raw/<gpu>.jsonl")
    ap.add_argument("--out-dir", default=os.path.join("benches", "results"))
    args = ap.parse_args()
    stem = os.path.splitext(os.path.basename(args.raw))[0]
    cells_raw = load(args.raw)
    if not cells_raw:
        sys.exit(f"{args.raw}: no results")
    merged = merge(cells_raw)
    head = header(cells_raw)
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, stem)
    with open(base + ".json", "w") as f:
        json.dump({"header": head, "cells": merged,
                   "raw": {f"{k[0]}-n{k[1]}": v for k, v in sorted(cells_raw.items(), key=str)}},
                  f, indent=1)
    notes_path = base + "-notes.md"
    notes = open(notes_path).read() if os.path.exists(notes_path) else None
    with open(base + ".md", "w") as f:
        f.write(markdown(stem, head, merged, notes))
    with open(base + "-speedup.svg", "w") as f:
        f.write(svg(merged, f"Sparse EvoAttention fwd + bwd speed-up, {', '.join(head['gpu'])}, bf16"))
    print(f"wrote {base}.json, {base}.md, {base}-speedup.svg")


if __name__ == "__main__":
    main()
