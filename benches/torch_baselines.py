#!/usr/bin/env python3
"""PyTorch baselines of BENCH.md, on a batch exported by `examples/export_batch.rs`.

- EvoAttention written the way a PyTorch user would: FlexAttention with block masks and a
  score_mod for the RelTemporal bias, one call per branch, chunk pooling in PyTorch. It is
  checked against this crate's output (the `o` the export wrote) before it is timed.
- `scaled_dot_product_attention` with the flash backend, causal, no bias, on the same tokens
  (each user's sequence padded to the longest): a lower bound on any dense attention.

    python3 benches/torch_baselines.py --data DIR [--check-only] [--reps 20] [--json OUT]

On a machine without a GPU it runs the check on the CPU with eager FlexAttention (slow, small
batches only) and skips the timing.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

DAY = 86400
TOLERANCE = {"f32": 1e-5, "f16": 3e-3, "bf16": 1e-2}
TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def load(data_dir):
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)

    def arr(name, dtype):
        return np.fromfile(os.path.join(data_dir, name), dtype=dtype)

    t, h, d = meta["num_tokens"], meta["heads"], meta["head_dim"]
    x = {
        "seq_offsets": arr("seq_offsets", "<i8"),
        "num_candidates": arr("num_candidates", "<i8"),
        "timestamps": arr("timestamps", "<i8"),
        "chunk_offsets": arr("chunk_offsets", "<i8"),
        "chunk_lengths": arr("chunk_lengths", "<i8"),
        "q": arr("q", "<f4").reshape(t, h, d),
        "k": arr("k", "<f4").reshape(t, h, d),
        "v": arr("v", "<f4").reshape(t, h, d),
        "gates": arr("gates", "<f4").reshape(t, h, 3),
        "coeffs": arr("coeffs", "<f4").reshape(h, 3),
        "o": arr("o", "<f4").reshape(t, h, d),
    }
    return meta, x


class Layout:
    """Per-token and per-chunk index tensors that the masks and the bias read."""

    def __init__(self, meta, x, device):
        t = meta["num_tokens"]
        offsets = x["seq_offsets"]
        user = 1 if meta["has_user_token"] else 0
        seq_id = np.zeros(t, np.int64)
        kind = np.zeros(t, np.int64)  # 0 user, 1 behavior, 2 candidate
        beh_end = np.zeros(t, np.int64)
        for s in range(len(offsets) - 1):
            start, end = offsets[s], offsets[s + 1]
            cand = end - x["num_candidates"][s]
            seq_id[start:end] = s
            kind[start + user:cand] = 1
            kind[cand:end] = 2
            beh_end[start:end] = cand
        # Chunks: member tokens, last member, sequence, tail tokens.
        lengths = x["chunk_lengths"]
        c_total = len(lengths)
        chunk_seq = np.zeros(c_total, np.int64)
        chunk_last = np.zeros(c_total, np.int64)
        chunk_of = np.full(t, -1, np.int64)
        is_tail = np.zeros(t, bool)
        co = x["chunk_offsets"]
        for s in range(len(co) - 1):
            pos = offsets[s] + user
            for c in range(co[s], co[s + 1]):
                n = lengths[c]
                chunk_seq[c] = s
                chunk_last[c] = pos + n - 1
                chunk_of[pos:pos + n] = c
                tail_from = max(pos, pos + n - meta["tail_tokens"])
                is_tail[tail_from:pos + n] = True
                pos += n
        ts = x["timestamps"].copy()
        ts[kind == 0] = 0  # the user token has no time; its bias is masked below
        weekend = ((np.floor_divide(ts + meta["utc_offset"], DAY) + 4) % 7)
        weekend = (weekend == 0) | (weekend == 6)
        dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        self.seq_id, self.kind, self.beh_end = dev(seq_id), dev(kind), dev(beh_end)
        self.chunk_seq, self.chunk_last, self.chunk_of = dev(chunk_seq), dev(chunk_last), dev(chunk_of)
        self.is_tail, self.ts, self.weekend = dev(is_tail), dev(ts), dev(weekend)
        self.chunk_ts = self.ts[self.chunk_last]
        self.chunk_weekend = self.weekend[self.chunk_last]
        self.num_chunks = c_total
        self.window = meta["window"]
        self.nb = meta["num_time_buckets"]


def rel_temporal(coeffs, h, tq, tk, wq, wk, nb):
    """SPEC section 4's bias for query/key times `tq`, `tk` and weekend flags `wq`, `wk`."""
    dt = (tq - tk).abs()
    x = dt + 1
    # floor(log2 x) in f64 is exact for x < 2^53; then the bit below the top one.
    e = torch.floor(torch.log2(x.to(torch.float64))).to(torch.int64)
    r = torch.where(e >= 1, torch.bitwise_and(torch.bitwise_right_shift(x, (e - 1).clamp(min=0)), 1), 0)
    bucket = (2 * e + r).clamp(max=nb)
    bk = -bucket.to(torch.float32) / nb
    hr = -torch.sin(math.pi * (dt % DAY).to(torch.float32) / DAY) ** 2
    wkf = -(wq != wk).to(torch.float32)
    return coeffs[h, 0] * bk + coeffs[h, 1] * hr + coeffs[h, 2] * wkf


def evo_attention(lay, q, k, v, gates, coeffs, scale, compiled):
    """EvoAttention with FlexAttention: q, k, v [T, H, D]; gates [T, H, 3]; returns [T, H, D]."""
    t, h, d = q.shape
    w, nb = lay.window, lay.nb
    flex = compiled["flex"]
    masks = compiled["masks"]
    # Chunk pooling in PyTorch: means of each chunk's members.
    beh = lay.chunk_of >= 0
    counts = torch.bincount(lay.chunk_of[beh], minlength=lay.num_chunks).clamp(min=1)
    kbar = torch.zeros(lay.num_chunks, h, d, dtype=torch.float32, device=q.device)
    vbar = torch.zeros_like(kbar)
    kbar.index_add_(0, lay.chunk_of[beh], k[beh].float())
    vbar.index_add_(0, lay.chunk_of[beh], v[beh].float())
    kbar = (kbar / counts[:, None, None]).to(q.dtype)
    vbar = (vbar / counts[:, None, None]).to(q.dtype)

    def token_bias(score, b, hh, qi, ki):
        bias = rel_temporal(coeffs, hh, lay.ts[qi], lay.ts[ki], lay.weekend[qi], lay.weekend[ki], nb)
        return score + torch.where(lay.kind[ki] == 0, 0.0, bias)

    def summary_bias(score, b, hh, qi, ci):
        return score + rel_temporal(coeffs, hh, lay.ts[qi], lay.chunk_ts[ci], lay.weekend[qi],
                                    lay.chunk_weekend[ci], nb)

    as_bhtd = lambda x: x.permute(1, 0, 2).unsqueeze(0)
    qq = as_bhtd(q)
    out = torch.zeros(t, h, d, dtype=torch.float32, device=q.device)
    calls = [
        (as_bhtd(kbar), as_bhtd(vbar), summary_bias, masks["global"]),
        (as_bhtd(k), as_bhtd(v), token_bias, masks["transition"]),
        (as_bhtd(k), as_bhtd(v), token_bias, masks["local"]),
    ]
    for b, (kk, vv, mod, mask) in enumerate(calls):
        o_b = flex(qq, kk, vv, score_mod=mod, block_mask=mask, scale=scale)
        o_b = o_b.squeeze(0).permute(1, 0, 2).float()
        # Rows with no key at all come back as 0 from FlexAttention, as SPEC asks.
        out += gates[:, :, b:b + 1].float() * o_b
    return out


def block_masks(lay, t, device, compile_masks):
    w = lay.window

    def same(qi, ki):
        return lay.seq_id[qi] == lay.seq_id[ki]

    def global_mask(b, h, qi, ci):
        visible = (lay.kind[qi] == 2) | ((lay.kind[qi] == 1) & (lay.chunk_last[ci] <= qi))
        return (lay.chunk_seq[ci] == lay.seq_id[qi]) & visible

    def transition_mask(b, h, qi, ki):
        visible = (lay.kind[qi] == 2) | ((lay.kind[qi] == 1) & (ki <= qi))
        return same(qi, ki) & lay.is_tail[ki] & visible

    def local_mask(b, h, qi, ki):
        kq, kk = lay.kind[qi], lay.kind[ki]
        user = (kk == 0) & (kq != 0)
        window = (kq == 1) & (kk == 1) & (ki <= qi) & (ki > qi - w)
        cand_window = (kq == 2) & (kk == 1) & (ki >= lay.beh_end[qi] + 1 - w)
        itself = (kq == 2) & (ki == qi)
        return same(qi, ki) & (user | window | cand_window | itself)

    mk = lambda fn, kv_len: create_block_mask(fn, 1, None, t, kv_len, device=device, _compile=compile_masks)
    return {
        "global": mk(global_mask, lay.num_chunks),
        "transition": mk(transition_mask, t),
        "local": mk(local_mask, t),
    }


def rel_l2(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def sdpa_flash_ms(meta, x, device, dtype, reps):
    """Median ms of causal flash SDPA, no bias, each user padded to the longest sequence."""
    offsets = x["seq_offsets"]
    lens = np.diff(offsets)
    b, lmax, h, d = len(lens), int(lens.max()), meta["heads"], meta["head_dim"]
    qkv = [torch.randn(b, h, lmax, d, device=device, dtype=dtype) for _ in range(3)]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True)
        return time_ms(fn, reps)


def time_ms(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()

    meta, x = load(args.data)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = TORCH_DTYPE[meta["dtype"]]
    lay = Layout(meta, x, device)
    t = meta["num_tokens"]
    to = lambda a: torch.from_numpy(a).to(device)
    q, k, v = (to(x[n]).to(dtype) for n in ("q", "k", "v"))
    gates = to(x["gates"]).to(dtype)
    coeffs = to(x["coeffs"])
    flex = torch.compile(flex_attention) if cuda else flex_attention
    compiled = {"flex": flex, "masks": block_masks(lay, t, device, compile_masks=cuda)}

    out = evo_attention(lay, q, k, v, gates, coeffs, meta["scale"], compiled)
    err = rel_l2(out, to(x["o"]))
    tol = TOLERANCE[meta["dtype"]]
    ok = math.isfinite(err) and err <= tol
    print(f"FlexAttention EvoAttention vs this crate ({meta['output_source']}): "
          f"relative L2 {err:.3e} (tolerance {tol:.0e}) {'ok' if ok else 'FAILED'}")
    result = {"check_rel_l2": err, "check_ok": ok, "device": device,
              "torch": torch.__version__, "output_source": meta["output_source"]}
    if not ok:
        sys.exit(1)
    if cuda and not args.check_only:
        fn = lambda: evo_attention(lay, q, k, v, gates, coeffs, meta["scale"], compiled)
        result["flex_evo_ms"] = time_ms(fn, args.reps)
        result["sdpa_flash_causal_ms"] = sdpa_flash_ms(meta, x, device, dtype, args.reps)
        result["gpu"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
        fn()
        result["flex_evo_peak_bytes"] = torch.cuda.max_memory_allocated()
        print(json.dumps(result))
    elif not cuda:
        print("no GPU: timing skipped")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
