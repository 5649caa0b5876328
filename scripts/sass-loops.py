#!/usr/bin/env python3
"""Static SASS profile of a kernel module, on a machine with no GPU.

Compiles one generated module (build.rs writes them to OUT_DIR) with NVRTC for a real
architecture, disassembles the cubin with nvdisasm, and prints per kernel its registers and
spills, its instruction count, and every innermost loop (a backward branch with no other loop
inside) with its size, its tensor-core MMAs and its most frequent opcodes. The inner loops of
the attention kernels run once per sub-tile of keys, so "instructions per MMA" there is the
figure that a change to the per-key work moves.

These are static counts: a loop body's conditional blocks are counted whether or not they run.
`--paths` adds, per loop, the shortest and longest paths once round it (one iteration runs one
path: where a loop holds two passes' copies of its work, the longest is about the costlier pass).

    source scripts/nvrtc-env.sh
    python3 scripts/sass-loops.py forward_tc --kernel bf16_d64 [--arch sm_90] [--out-dir DIR] [--paths]

nvdisasm comes from $NVDISASM, PATH, or the nvidia-cuda-nvdisasm wheel (installed with pip if
missing: CUDA 13.2's reads sm_80 and sm_90 cubins of NVRTC 13.0).
"""

import argparse
import collections
import ctypes
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def newest_module(module):
    paths = glob.glob(os.path.join(ROOT, "target", "*", "build", "sparsectr-attn-*", "out", module + ".cu"))
    if not paths:
        sys.exit(f"no generated {module}.cu under target/: run `cargo build --release` first")
    return max(paths, key=os.path.getmtime)


def load_nvrtc():
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        path = os.path.join(d, "libnvrtc.so.13")
        if d and os.path.exists(path):
            return ctypes.CDLL(path)
    try:
        return ctypes.CDLL("libnvrtc.so.13")
    except OSError:
        sys.exit("libnvrtc.so.13 not found: `source scripts/nvrtc-env.sh` first")


def compile_cubin(src_path, arch):
    nvrtc = load_nvrtc()
    src = open(src_path, "rb").read()
    prog = ctypes.c_void_p()
    name = os.path.basename(src_path).encode()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, name, 0, None, None) != 0:
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"--ptxas-options=--verbose", b"-lineinfo"]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    log = log.value.decode(errors="replace")
    if rc != 0:
        sys.exit(log[-4000:])
    nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw, log


def find_nvdisasm():
    exe = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if exe:
        return exe

    def from_wheel():
        spec = importlib.util.find_spec("nvidia")
        for root in spec.submodule_search_locations if spec else []:
            path = os.path.join(root, "cu13", "bin", "nvdisasm")
            if os.path.exists(path):
                return path
        return None

    exe = from_wheel()
    if exe is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "nvidia-cuda-nvdisasm==13.2.*"], check=True)
        importlib.invalidate_caches()
        exe = from_wheel()
    if exe is None:
        sys.exit("nvdisasm not found (set NVDISASM)")
    return exe


def ptxas_usage(log):
    """kernel -> 'N registers[, spills]' from the ptxas log."""
    usage, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            usage[current] = usage.get(current, "") + f"{m.group(1)} registers"
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current and (m.group(1) != "0" or m.group(2) != "0"):
            usage[current] = usage.get(current, "") + f", SPILLS {m.group(1)} B stored {m.group(2)} B loaded "
    return usage


def where(loc):
    """'file:line' of a (file, line) from the line info (build.rs's `#line` directives name the
    original kernel sources)."""
    name, line = loc
    return f"{os.path.basename(name)}:{line}" if name else "?"


def parse(sass):
    """kernel -> list of (address, opcode, text, (file, line)), and kernel -> {label: address}."""
    kernels, labels = {}, {}
    current, line, pending = None, ("", 0), []
    for raw in sass.splitlines():
        m = re.match(r"\.text\.(\w+):", raw.strip())
        if m:
            current = m.group(1)
            kernels.setdefault(current, [])
            labels.setdefault(current, {})
            continue
        if current is None:
            continue
        m = re.search(r'//## File "([^"]*)", line (\d+)', raw)
        if m:
            line = (m.group(1), int(m.group(2)))
            continue
        m = re.match(r"(\.L_x_\d+):", raw.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", raw)
        if m:
            addr = int(m.group(1), 16)
            text = m.group(2).strip()
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
            kernels[current].append((addr, op, text, line))
            for label in pending:
                labels[current][label] = addr
            pending = []
    return kernels, labels


def loops(instrs, labels):
    index = {addr: i for i, (addr, *_) in enumerate(instrs)}
    found = []
    for i, (addr, op, text, _) in enumerate(instrs):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"(\.L_x_\d+)", text)
        target = labels.get(m.group(1)) if m else None
        if target is not None and target <= addr:
            found.append((index[target], i))
    return sorted(set(found))


def iteration_paths(body, labels):
    """(shortest, longest) instruction count of one trip round a loop: paths through its body's
    forward branches from the head to a branch back to it. Static counts add every conditional
    block (both passes' copies of the query backward's element work, say); these bound what one
    iteration can execute. None where no path returns to the head."""
    index = {addr: i for i, (addr, *_) in enumerate(body)}
    head = body[0][0]
    best = [None] * (len(body) + 1)  # (shortest, longest) from instruction i to the back edge

    def successors(i):
        _, op, text, _ = body[i]
        if op.startswith("EXIT") or op.startswith("RET"):
            return [], False
        if not op.startswith("BRA"):
            return [i + 1], False
        m = re.search(r"(\.L_x_\d+)", text)
        target = labels.get(m.group(1)) if m else None
        # `@P0 BRA`, or a predicate operand (`BRA P1, target`): either way it may fall through.
        conditional = text.startswith("@") or re.search(r"!?U?P\w+\s*,", text.split("BRA", 1)[1].split("`")[0])
        back = target == head
        out = [] if back else ([index[target]] if target in index and target > body[i][0] else [])
        if conditional:
            out.append(i + 1)
        return out, back

    for i in range(len(body) - 1, -1, -1):
        succ, back = successors(i)
        options = [(0, 0)] if back else []
        options += [best[j] for j in succ if j < len(body) and best[j] is not None]
        if options:
            best[i] = (1 + min(o[0] for o in options), 1 + max(o[1] for o in options))
    return best[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", help="generated module name, e.g. forward_tc, or a path to a .cu")
    ap.add_argument("--kernel", default="", help="only kernels whose name contains this")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out-dir", help="build.rs's OUT_DIR (default: the newest under target/)")
    ap.add_argument("--top", type=int, default=10, help="opcodes listed per loop")
    ap.add_argument("--dump", default="", help="also print the loop starting at this address (hex)")
    ap.add_argument("--paths", action="store_true",
                    help="also the shortest and longest paths once round each loop")
    args = ap.parse_args()

    if args.module.endswith(".cu"):
        src = args.module
    elif args.out_dir:
        src = os.path.join(args.out_dir, args.module + ".cu")
    else:
        src = newest_module(args.module)
    cubin, log = compile_cubin(src, args.arch)
    usage = ptxas_usage(log)
    nvdisasm = find_nvdisasm()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", "-g", f.name], check=True, capture_output=True, text=True).stdout
    kernels, labels = parse(sass)
    print(f"{src} ({args.arch})")
    for name in sorted(kernels):
        if args.kernel not in name:
            continue
        instrs = kernels[name]
        print(f"\n{name}: {len(instrs)} instructions, {usage.get(name, '?')}")
        found = loops(instrs, labels[name])
        for start, end in found:
            if any(s >= start and e <= end and (s, e) != (start, end) for s, e in found):
                continue  # not innermost
            body = instrs[start:end + 1]
            ops = collections.Counter(op.split(".")[0] for _, op, _, _ in body)
            mma = ops.get("HMMA", 0)
            per_mma = f", {len(body) / mma:.1f} per MMA" if mma else ""
            print(f"  loop {body[0][0]:#07x}: {len(body):4d} instructions, {mma} MMA{per_mma}"
                  f" (ends at {where(body[-1][3])})")
            print("    " + ", ".join(f"{k} {v}" for k, v in ops.most_common(args.top)))
            if args.paths:
                paths = iteration_paths(body, labels[name])
                if paths:
                    print(f"    one trip: {paths[0]} to {paths[1]} instructions")
            if args.dump and int(args.dump, 16) == body[0][0]:
                for addr, _, text, line in body:
                    print(f"      {addr:#07x}  {text:<60} {where(line)}")


if __name__ == "__main__":
    main()
