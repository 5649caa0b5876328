#!/usr/bin/env python3
"""PyTorch baselines of BENCH.md, on a batch exported by `benches/gpu_bench.rs --export` (or
`examples/export_batch.rs`): the same users, timestamps and chunks as this crate's rows.

- `flex-evo`: EvoAttention written the way a PyTorch user would: FlexAttention (torch.compile'd),
  one call per branch with a block mask and a score_mod for the RelTemporal bias, the chunk
  pooling and the gather of the chunk tails in PyTorch. It is checked against this crate's output
  (the `o` of the export) before it is timed; a mismatch exits 1 and times nothing.
- `sdpa-flash`: `scaled_dot_product_attention` with the flash backend, causal, no bias, on the
  same tokens: users sorted by length into `--buckets` groups, each padded to its longest user
  (one call per group), a lower bound on any dense attention.

Both are timed forward and forward + backward (gradients of q, k, v, and for flex-evo also of
the gates and the coefficients, as this crate's backward computes), CUDA events, median of
`--reps` after warm-up, two input sets alternated, each pass twice (two identical runs). Peak
memory: the bytes of the tensors the system reads (inputs, layout and block masks) plus the
high-water mark of `torch.cuda.max_memory_allocated` over one call, above what was allocated
before it (the same definition `gpu_bench.rs` measures with the CUDA memory pool).

    python3 benches/torch_baselines.py --data DIR [--len N] [--reps 20] [--out FILE.jsonl]
        [--systems flex,sdpa] [--buckets 4] [--check-only] [--flex-bias fast[,exact64]]
        [--passes fwd,fwd_bwd[,fwd_branches]] [--dry-run]

The RelTemporal bias in the score_mods (`--flex-bias`): `fast` (system flex-evo), what a user
tuning FlexAttention would write: per element only 32-bit integer and f32 operations, on per-token
features made once per batch (times relative to the sequence as int32, the day phase's cos and
sin, weekend as 0 or 1); `exact64` (system flex-evo-exact64), SPEC section 4 written literally:
int64 times, a f64 log2 and an int64 modulo per element. Both are exact (SPEC's bucket, the hour
term by SPEC's own cos/sin rewrite) and both are checked against this crate's output. Before
2026-11-23 this script had only the exact64 form, under the name flex-evo.

A timed call that makes dynamo compile again would time the compiler: every row records
`compiled_while_timed` (frames dynamo compiled during its timed calls), and a warning is printed
when it is not 0.

SDPA is timed first (it needs no compilation), then FlexAttention is compiled, checked and timed.
After every pass it appends a JSON object holding every row so far to `--out` (default
`benches/results/raw/<gpu>.jsonl`; `report.py` keeps the last one per cell), so a run cut off by
a time limit keeps what it finished. Without a GPU it
runs the check on the CPU with eager FlexAttention (small batches only), verifies the hand-built
block masks against `create_block_mask`, and skips the timing.

Block masks: the branches' masks are sparse but the packed batch is about 2^20 tokens long, so
`create_block_mask` would evaluate 2^40 (query, key) pairs. The block lists come instead from the
layout (which users a block of queries holds, the window before it), and the exact mask_mod
still decides every element; on small batches they are checked to cover every block that
`create_block_mask` finds.
"""

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch._dynamo
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

DAY = 86400
BLOCK = 128
TOLERANCE = {"f32": 1e-5, "f16": 3e-3, "bf16": 1e-2}
TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
WARMUP = 2
# `--dry-run`: the GPU code path on the CPU (eager FlexAttention, math SDPA, wall-clock timing,
# no memory statistics) to test this script without a GPU. Its numbers mean nothing.
DRY = False


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
    """Per-token, per-chunk and per-tail index tensors that the masks, the bias and the block
    lists read. Built once per batch, like this crate's chunks."""

    def __init__(self, meta, x, device):
        t = meta["num_tokens"]
        offsets = x["seq_offsets"]
        num_seqs = len(offsets) - 1
        user = 1 if meta["has_user_token"] else 0
        seq_id = np.repeat(np.arange(num_seqs), np.diff(offsets))
        cand_start = offsets[1:] - x["num_candidates"]
        beh_end = cand_start[seq_id]  # first candidate of each token's sequence
        pos = np.arange(t)
        kind = np.where(pos >= beh_end, 2, 1)  # 0 user, 1 behavior, 2 candidate
        if user:
            kind[offsets[:-1][np.diff(offsets) > 0]] = 0
        # Chunks: members, last member, sequence; tails: the last m members of each chunk.
        lengths = x["chunk_lengths"]
        co = x["chunk_offsets"]
        chunk_seq = np.repeat(np.arange(num_seqs), np.diff(co))
        first_beh = offsets[:-1] + user
        starts = np.zeros(len(lengths), np.int64)
        for s in range(num_seqs):
            c0, c1 = co[s], co[s + 1]
            starts[c0:c1] = first_beh[s] + np.concatenate([[0], np.cumsum(lengths[c0:c1])[:-1]])
        chunk_last = starts + lengths - 1
        chunk_of = np.full(t, -1, np.int64)
        chunk_of[np.repeat(starts, lengths) + _ragged_arange(lengths)] = np.repeat(
            np.arange(len(lengths)), lengths)
        tails = np.minimum(lengths, meta["tail_tokens"])
        tail_idx = np.repeat(chunk_last - tails + 1, tails) + _ragged_arange(tails)
        tail_seq = seq_id[tail_idx]
        tail_offsets = np.searchsorted(tail_seq, np.arange(num_seqs + 1))

        ts = x["timestamps"].copy()
        ts[kind == 0] = 0  # the user token has no time; its bias is masked below
        weekend = (np.floor_divide(ts + meta["utc_offset"], DAY) + 4) % 7
        weekend = (weekend == 0) | (weekend == 6)
        dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        self.tail_idx = dev(tail_idx)  # the tails' gather (int64: an index)
        # What the masks compare, in int32 like FlexAttention's indices: int64 compares cost
        # two instructions each on a GPU.
        i32 = lambda a: dev(np.asarray(a).astype(np.int32))
        self.m = {"seq_id": i32(seq_id), "kind": i32(kind), "beh_end": i32(beh_end),
                  "chunk_seq": i32(chunk_seq), "chunk_last": i32(chunk_last),
                  "tail_idx": i32(tail_idx), "tail_seq": i32(tail_seq)}
        # Per-token time features of the two bias forms (`--flex-bias`, see `BIAS`):
        #   exact64: the timestamps (int64) and weekend flags, the bias computed as SPEC writes it;
        #   fast: times relative to their sequence's earliest (int32: SPEC bounds a
        #         sequence's span by i32::MAX seconds), the hour term's phases cos, sin of
        #         2 pi (t mod 86400) / 86400 (SPEC's exact rewrite) and weekend as 0 or 1 in f32.
        seq_t0 = np.full(num_seqs, np.iinfo(np.int64).max)
        timed = kind != 0
        np.minimum.at(seq_t0, seq_id[timed], ts[timed])
        rel = np.where(kind == 0, 0, ts - seq_t0[seq_id])
        assert rel.min(initial=0) >= 0 and rel.max(initial=0) <= np.iinfo(np.int32).max, \
            "a sequence spans more than i32::MAX seconds (SPEC rejects it)"
        phase = 2 * np.pi * np.mod(ts, DAY) / DAY
        token = {"exact64": (dev(ts), dev(weekend)),
                 "fast": (i32(rel), dev(np.cos(phase).astype(np.float32)),
                          dev(np.sin(phase).astype(np.float32)), dev(weekend.astype(np.float32)))}
        chunk_idx = dev(chunk_last)
        self.time = {form: {"token": f, "chunk": tuple(a[chunk_idx] for a in f),
                            "tail": tuple(a[self.tail_idx] for a in f)}
                     for form, f in token.items()}
        beh = chunk_of >= 0
        self.beh_tokens = dev(np.nonzero(beh)[0])
        self.beh_chunk = dev(chunk_of[beh])
        self.chunk_counts = dev(np.maximum(lengths, 1).astype(np.float32))
        self.num_chunks = len(lengths)
        self.num_tails = len(tail_idx)
        self.window = meta["window"]
        self.nb = meta["num_time_buckets"]
        self.num_tokens = t
        # For the block lists (host side).
        self.np = {"seq_id": seq_id, "offsets": offsets, "chunk_offsets": co,
                   "tail_offsets": tail_offsets, "user": user,
                   "max_candidates": int(x["num_candidates"].max(initial=0))}

    def nbytes(self, bias_form):
        """Bytes of the tensors one bias form's FlexAttention calls read."""
        def walk(v):
            if isinstance(v, torch.Tensor):
                return v.nbytes
            if isinstance(v, dict):
                return sum(walk(u) for u in v.values())
            if isinstance(v, (tuple, list)):
                return sum(walk(u) for u in v)
            return 0
        return walk({k: v for k, v in vars(self).items() if k != "time"}) + walk(self.time[bias_form])


def _ragged_arange(lengths):
    """[0..l0) ++ [0..l1) ++ ... for non-negative lengths."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.arange(total) - np.repeat(ends - lengths, lengths)


def rel_temporal_exact64(coeffs, h, fq, fk, nb):
    """SPEC section 4's bias as SPEC writes it, for query/key features `fq`, `fk` = (timestamp
    (int64), weekend (bool)); `coeffs` = (s1, s2, s3), one [H] tensor each: FlexAttention's
    backward takes the gradient of a captured tensor only if the score_mod indexes it once."""
    (tq, wq), (tk, wk) = fq, fk
    dt = (tq - tk).abs()
    x = dt + 1
    # floor(log2 x) in f64 is exact for x < 2^53; then the bit below the top one.
    e = torch.floor(torch.log2(x.to(torch.float64))).to(torch.int64)
    r = torch.where(e >= 1, torch.bitwise_and(torch.bitwise_right_shift(x, (e - 1).clamp(min=0)), 1), 0)
    bucket = (2 * e + r).clamp(max=nb)
    bk = -bucket.to(torch.float32) / nb
    hr = -torch.sin(math.pi * (dt % DAY).to(torch.float32) / DAY) ** 2
    wkf = -(wq != wk).to(torch.float32)
    s1, s2, s3 = coeffs
    return s1[h] * bk + s2[h] * hr + s3[h] * wkf


def half_octave_bucket(dt):
    """SPEC's exact bucket of int32 `dt` in [0, i32::MAX] with 32-bit operations only. For
    y = dt + 1 < 2^24 the f32 conversion is exact, and floor(log2 y) in f32 is off by at most one
    near a power of two, which two integer compares correct. Larger y are shifted right by 8
    first: that keeps the top bit and the one below it, and the bucket is 16 more. (Reading the
    exponent from the f32 bits would be shorter, but a dtype view has no vmap rule, so eager
    FlexAttention could not run it.) check_bucket tests it against SPEC's integer definition,
    eager and compiled, before every run that times this form."""
    big = dt >= (1 << 24) - 1
    # (dt + 1) >> 8 without overflowing at dt = i32::MAX.
    y = torch.where(big, (dt >> 8) + (((dt & 255) + 1) >> 8), dt + 1)
    e = torch.floor(torch.log2(y.to(torch.float32))).to(torch.int32)
    one = torch.ones_like(e)
    e = e - (torch.bitwise_left_shift(one, e) > y).to(torch.int32)
    e = e + (torch.bitwise_left_shift(one, e + 1) <= y).to(torch.int32)
    r = torch.where(e >= 1, torch.bitwise_right_shift(y, (e - 1).clamp(min=0)) & 1, 0)
    return 2 * e + r + 16 * big.to(torch.int32)


def check_bucket(device):
    """half_octave_bucket against the integer definition, eager and compiled on `device` (the
    compiled code is what a score_mod runs): every dt < 2^16, every power of two and 1.5 times
    one +-3, and 2^20 random values up to i32::MAX. Returns the number of mismatches."""
    edges = {v for k in range(32) for c in ((1 << k), (3 << k) // 2) for v in range(c - 4, c + 3)}
    dt = torch.cat([torch.arange(1 << 16),
                    torch.tensor(sorted(v for v in edges if 0 <= v <= 2**31 - 1)),
                    torch.randint(0, 2**31 - 1, (1 << 20,), generator=torch.Generator().manual_seed(7))])
    x = dt + 1  # int64 on the host: SPEC's definition, bit by bit
    e = torch.zeros_like(x)
    for k in range(1, 32):
        e += (x >= (1 << k)).to(torch.int64)
    r = torch.where(e >= 1, (x >> (e - 1).clamp(min=0)) & 1, 0)
    want = 2 * e + r
    d = dt.to(torch.int32).to(device)
    bad = 0
    for fn in (half_octave_bucket, torch.compile(half_octave_bucket, dynamic=False)):
        bad += int((fn(d).cpu().to(torch.int64) != want).sum())
    return bad


def rel_temporal_fast(coeffs, h, fq, fk, nb):
    """The same bias from features (relative time (int32), cos, sin of the day phase, weekend as
    0 or 1): Hr = -sin^2(pi dt / 86400) = (cos a cos b + sin a sin b - 1) / 2 (SPEC section 4),
    no int64 or f64 operation per element."""
    (tq, cq, sq, wq), (tk, ck, sk, wk) = fq, fk
    bucket = torch.clamp(half_octave_bucket((tq - tk).abs()), max=nb)
    bk = bucket.to(torch.float32) * (-1.0 / nb)
    hr = (cq * ck + sq * sk - 1.0) * 0.5
    wkf = -(wq - wk).abs()
    s1, s2, s3 = coeffs
    return s1[h] * bk + s2[h] * hr + s3[h] * wkf


# `--flex-bias`: how the score_mods compute the RelTemporal bias (see Layout.time).
BIAS = {"fast": rel_temporal_fast, "exact64": rel_temporal_exact64}
FLEX_SYSTEM = {"fast": "flex-evo", "exact64": "flex-evo-exact64"}


def mask_mods(lay):
    w = lay.window
    m = lay.m

    def global_mask(b, h, qi, ci):
        kq = m["kind"][qi]
        visible = (kq == 2) | ((kq == 1) & (m["chunk_last"][ci] <= qi))
        return (m["chunk_seq"][ci] == m["seq_id"][qi]) & visible

    def transition_mask(b, h, qi, ti):
        kq = m["kind"][qi]
        visible = (kq == 2) | ((kq == 1) & (m["tail_idx"][ti] <= qi))
        return (m["tail_seq"][ti] == m["seq_id"][qi]) & visible

    def local_mask(b, h, qi, ki):
        kq, kk = m["kind"][qi], m["kind"][ki]
        user = (kk == 0) & (kq != 0)
        window = (kq == 1) & (kk == 1) & (ki <= qi) & (ki > qi - w)
        cand_window = (kq == 2) & (kk == 1) & (ki >= m["beh_end"][qi] + 1 - w)
        itself = (kq == 2) & (ki == qi)
        return (m["seq_id"][qi] == m["seq_id"][ki]) & (user | window | cand_window | itself)

    return {"global": (global_mask, lay.num_chunks), "transition": (transition_mask, lay.num_tails),
            "local": (local_mask, lay.num_tokens)}


def block_lists(lay):
    """Per block of queries, key index ranges `[lo, hi)` that hold every key of its users (and,
    for the local branch, the user token of its first user), per branch."""
    n = lay.np
    t = lay.num_tokens
    a = np.arange(0, t, BLOCK)
    s_first = n["seq_id"][a]
    s_last = n["seq_id"][np.minimum(a + BLOCK, t) - 1]
    ranges = {
        "global": (n["chunk_offsets"][s_first], n["chunk_offsets"][s_last + 1], None),
        "transition": (n["tail_offsets"][s_first], n["tail_offsets"][s_last + 1], None),
    }
    # A behavior sees w - 1 keys back, a candidate at most w - 1 behaviors and the other
    # candidates before it; users starting inside the block have their user token inside it.
    lo = np.maximum(n["offsets"][s_first], a - (lay.window + n["max_candidates"]))
    hi = np.minimum(a + BLOCK, t)
    user = n["offsets"][s_first] if n["user"] else None
    ranges["local"] = (lo, hi, user)
    return ranges


def kv_block_mask(lo, hi, extra, mask_mod, q_len, kv_len, device):
    """A BlockMask whose query block i visits the key blocks covering `[lo[i], hi[i])` and the
    block of key `extra[i]`, every block partial (mask_mod decides each element)."""
    sentinel = np.iinfo(np.int64).max
    first, last = lo // BLOCK, (hi - 1) // BLOCK
    empty = hi <= lo
    width = int(np.max(np.where(empty, 0, last - first + 1), initial=0)) or 1
    cols = first[:, None] + np.arange(width)[None, :]
    cols = np.where((cols <= last[:, None]) & ~empty[:, None], cols, sentinel)
    if extra is not None:
        cols = np.concatenate([(extra // BLOCK)[:, None], cols], axis=1)
    cols.sort(axis=1)
    dup = np.zeros_like(cols, bool)
    dup[:, 1:] = cols[:, 1:] == cols[:, :-1]
    cols[dup] = sentinel
    cols.sort(axis=1)
    num = (cols != sentinel).sum(axis=1)
    # BlockMask expects one column per key block (it densifies the lists to transpose them).
    kv_blocks = -(-kv_len // BLOCK)
    cols = cols[:, :kv_blocks]
    cols = np.pad(cols, ((0, 0), (0, kv_blocks - cols.shape[1])), constant_values=0)
    cols[cols == sentinel] = 0
    as_dev = lambda arr: torch.from_numpy(arr.astype(np.int32))[None, None].to(device)
    return BlockMask.from_kv_blocks(as_dev(num), as_dev(cols), BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len))


def block_masks(lay, device):
    mods = mask_mods(lay)
    masks = {}
    for branch, (lo, hi, extra) in block_lists(lay).items():
        fn, kv_len = mods[branch]
        masks[branch] = kv_block_mask(lo, hi, extra, fn, lay.num_tokens, kv_len, device)
    return masks


def verify_block_masks(lay, masks, device):
    """Every block that create_block_mask finds non-empty is in the hand-built lists."""
    for branch, (fn, kv_len) in mask_mods(lay).items():
        ref = create_block_mask(fn, 1, None, lay.num_tokens, kv_len, device=device,
                                BLOCK_SIZE=BLOCK, _compile=False).to_dense().bool()
        ours = masks[branch].to_dense().bool()
        missing = int((ref & ~ours).sum())
        print(f"block mask {branch}: {int(ours.sum())} blocks visited, "
              f"{int(ref.sum())} needed, {missing} missing")
        if missing:
            sys.exit(f"hand-built block mask of the {branch} branch misses {missing} blocks")


BRANCHES = ("global", "transition", "local")


def evo_attention(lay, masks, flex, q, k, v, gates, coeffs, scale, bias_form="fast",
                  branches=BRANCHES):
    """EvoAttention with FlexAttention: q, k, v [T, H, D]; gates [T, H, 3]; returns [T, H, D].
    `branches` leaves out the other branches' FlexAttention calls (a diagnostic: the output is
    then not EvoAttention's)."""
    t, h, d = q.shape
    nb = lay.nb
    # Chunk pooling in PyTorch: the means of each chunk's members, in f32.
    kbar = torch.zeros(lay.num_chunks, h, d, dtype=torch.float32, device=q.device)
    vbar = torch.zeros_like(kbar)
    kbar = kbar.index_add(0, lay.beh_chunk, k[lay.beh_tokens].float())
    vbar = vbar.index_add(0, lay.beh_chunk, v[lay.beh_tokens].float())
    kbar = (kbar / lay.chunk_counts[:, None, None]).to(q.dtype)
    vbar = (vbar / lay.chunk_counts[:, None, None]).to(q.dtype)
    # Chunk tails gathered into their own keys.
    ktail, vtail = k[lay.tail_idx], v[lay.tail_idx]
    # Separate copies of the coefficient columns (see rel_temporal_exact64); gradients still
    # reach coeffs.
    coeffs = tuple(coeffs[:, j].clone() for j in range(3))

    rel = BIAS[bias_form]
    tf = lay.time[bias_form]
    at = lambda feats, i: tuple(f[i] for f in feats)

    def summary_bias(score, b, hh, qi, ci):
        return score + rel(coeffs, hh, at(tf["token"], qi), at(tf["chunk"], ci), nb)

    def tail_bias(score, b, hh, qi, ti):
        return score + rel(coeffs, hh, at(tf["token"], qi), at(tf["tail"], ti), nb)

    def token_bias(score, b, hh, qi, ki):
        bias = rel(coeffs, hh, at(tf["token"], qi), at(tf["token"], ki), nb)
        return score + torch.where(lay.m["kind"][ki] == 0, 0.0, bias)

    as_bhtd = lambda x: x.permute(1, 0, 2).unsqueeze(0)
    qq = as_bhtd(q)
    calls = [
        (kbar, vbar, summary_bias, masks["global"]),
        (ktail, vtail, tail_bias, masks["transition"]),
        (k, v, token_bias, masks["local"]),
    ]
    out = None
    for b, (kk, vv, mod, mask) in enumerate(calls):
        if BRANCHES[b] not in branches:
            continue
        o_b = flex(qq, as_bhtd(kk), as_bhtd(vv), score_mod=mod, block_mask=mask, scale=scale)
        # Rows with no key at all come back as 0 from FlexAttention, as SPEC asks.
        o_b = gates[:, :, b:b + 1].float() * o_b.squeeze(0).permute(1, 0, 2).float()
        out = o_b if out is None else out + o_b
    return out.to(q.dtype)  # O in the input dtype, as this crate returns it


def rel_l2(x, ref, rows=1 << 16):
    num = den = 0.0
    for i in range(0, x.shape[0], rows):
        xs, rs = x[i:i + rows].double(), ref[i:i + rows].double()
        num += float((xs - rs).pow(2).sum())
        den += float(rs.pow(2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")


def dynamo_frames():
    """How many frames dynamo has compiled so far (each recompilation is one more)."""
    from torch._dynamo.utils import counters
    return int(counters["frames"]["total"])


def time_ms(fn, reps, compiled):
    """Median ms of `fn(i)` over `reps` calls after WARMUP, CUDA events around each call; adds
    to `compiled[0]` the frames dynamo compiled during the timed calls (a call that recompiles
    would time the compiler, not the kernel)."""
    for i in range(WARMUP):
        fn(i)
    frames = dynamo_frames()
    times = []
    for i in range(reps):
        if DRY:
            started = time.perf_counter()
            fn(WARMUP + i)
            times.append(1e3 * (time.perf_counter() - started))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(WARMUP + i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    compiled[0] += dynamo_frames() - frames
    times.sort()
    return times[len(times) // 2]


def peak_bytes(fn, read_tensors):
    """Bytes of the tensors the call reads plus the most it allocates at once."""
    if DRY:
        fn(0)
        return sum(t.nbytes for t in read_tensors)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before + sum(t.nbytes for t in read_tensors)


def sync():
    if not DRY:
        torch.cuda.synchronize()


def block_mask_nbytes(mask):
    return sum(t.nbytes for t in mask.as_tuple() if isinstance(t, torch.Tensor))


def flex_systems(lay, masks, meta, x, device, dtype, bias_form, per_branch):
    """The flex-evo passes of one bias form: name -> (fn(i), tensors read). Checks the output
    first. With `per_branch` the forward is also timed with one branch's FlexAttention call at a
    time (pooling and gathers still included), to see which call takes the time."""
    flex = flex_attention if DRY else torch.compile(flex_attention, dynamic=False)
    to = lambda a: torch.from_numpy(a).to(device)
    q, k, v = (to(x[n]).to(dtype) for n in ("q", "k", "v"))
    gates, coeffs = to(x["gates"]).to(dtype), to(x["coeffs"])
    scale = meta["scale"]
    started = time.time()
    with torch.no_grad():
        out = evo_attention(lay, masks, flex, q, k, v, gates, coeffs, scale, bias_form)
    sync()
    compile_s = time.time() - started
    err = rel_l2(out, to(x["o"]))
    del out
    second = tuple((2 * torch.rand_like(a, dtype=torch.float32) - 1).to(dtype) for a in (q, k, v))
    sets = [(q, k, v, gates), second + (gates.flip(0),)]
    for s in sets:
        for a in s:
            a.requires_grad_(True)
    d_o = [torch.randn(q.shape, device=device, dtype=dtype) for _ in range(2)]
    coeffs_leaf = coeffs.clone().requires_grad_(True)
    # Gradients of tensors captured by a score_mod need a recent PyTorch; without them the
    # coefficients get no gradient and the results say so.
    grad_coeffs = {"on": True}

    def fwd(i, branches=BRANCHES):
        with torch.no_grad():
            evo_attention(lay, masks, flex, *(a.detach() for a in sets[i % 2]), coeffs, scale,
                          bias_form, branches)

    def fwd_bwd(i):
        args = sets[i % 2]
        c = coeffs_leaf if grad_coeffs["on"] else coeffs
        for a in args + (c,):
            a.grad = None
        out = evo_attention(lay, masks, flex, *args, c, scale, bias_form)
        out.backward(d_o[i % 2])

    read = [q, k, v, gates, coeffs]
    read_layout = lay.nbytes(bias_form) + sum(block_mask_nbytes(m) for m in masks.values())
    passes = {"fwd": (fwd, read, read_layout)}
    if per_branch:
        for b, name in enumerate(BRANCHES):
            passes[f"fwd_{name}"] = (lambda i, b=b: fwd(i, (BRANCHES[b],)), read, read_layout)
    if not DRY:  # FlexAttention has no CPU backward
        passes["fwd_bwd"] = (fwd_bwd, read + [d_o[0]], read_layout)
    return err, compile_s, passes, grad_coeffs


def sdpa_systems(meta, x, device, dtype, buckets):
    """sdpa-flash passes: users sorted by length, `buckets` groups each padded to its longest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    lens = np.diff(x["seq_offsets"])
    order = np.argsort(lens, kind="stable")
    groups = [g for g in np.array_split(order, min(buckets, len(order))) if len(g)]
    h, d = meta["heads"], meta["head_dim"]
    shapes = [(len(g), h, int(lens[g].max()), d) for g in groups]
    make = lambda: [[torch.randn(s, device=device, dtype=dtype) for _ in range(4)] for s in shapes]
    sets = [make(), make()]  # q, k, v, d_o per group
    leaves = [[[a.clone().requires_grad_(True) for a in g[:3]] + [g[3]] for g in s] for s in sets]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = SDPBackend.MATH if DRY else SDPBackend.FLASH_ATTENTION

    def fwd(i):
        with sdpa_kernel(backend), torch.no_grad():
            for qq, kk, vv, _ in sets[i % 2]:
                sdpa(qq, kk, vv, is_causal=True)

    def fwd_bwd(i):
        with sdpa_kernel(backend):
            for qq, kk, vv, do in leaves[i % 2]:
                for a in (qq, kk, vv):
                    a.grad = None
                sdpa(qq, kk, vv, is_causal=True).backward(do)

    read = [a for g in sets[0] for a in g[:3]]
    padded = sum(s[0] * s[2] for s in shapes)
    return {"fwd": (fwd, read, 0), "fwd_bwd": (fwd_bwd, read + [g[3] for g in sets[0]], 0)}, padded


def gpu_stem(name):
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", name.lower())).strip("-")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--len", type=int, help="n of the cell (default: from the folder name)")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--systems", default="flex,sdpa")
    ap.add_argument("--out")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the GPU code path on the CPU (tests this script; numbers mean nothing)")
    ap.add_argument("--flex-bias", default="fast",
                    help="bias forms of flex-evo, comma-separated: fast (int32 and f32 per element, "
                         "system flex-evo) and exact64 (int64 and f64 log2 as SPEC writes it, system "
                         "flex-evo-exact64; the only form before 2026-11-23)")
    ap.add_argument("--passes", default="fwd,fwd_bwd",
                    help="flex-evo passes to time: fwd, fwd_bwd, and fwd_branches (the forward with one "
                         "branch's FlexAttention call at a time)")
    args = ap.parse_args()
    forms = args.flex_bias.split(",")
    bad = [f for f in forms if f not in BIAS]
    if bad:
        ap.error(f"--flex-bias: unknown form {bad[0]!r} (known: {', '.join(BIAS)})")
    passes_wanted = set(args.passes.split(","))
    # Every branch's key length, with and without gradients, and two input sets are separate
    # compilations: past dynamo's default limit of 8 FlexAttention falls back to its eager path,
    # which materializes the T x T scores (and runs out of memory).
    for name, value in (("recompile_limit", 256), ("cache_size_limit", 256),
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    global DRY
    DRY = args.dry_run
    systems = set(args.systems.split(","))

    meta, x = load(args.data)
    n = args.len
    if n is None:
        m = re.search(r"-n(\d+)/?$", os.path.abspath(args.data))
        n = int(m.group(1)) if m else None
    cuda = torch.cuda.is_available() or DRY
    device = "cuda" if cuda and not DRY else "cpu"
    dtype = TORCH_DTYPE[meta["dtype"]]
    if "fast" in forms and "flex" in systems:
        bad = check_bucket(device)
        print(f"fast bias form: half-octave bucket {'exact' if not bad else f'WRONG on {bad} values'} "
              "(eager and compiled, against SPEC's integer definition)")
        if bad:
            sys.exit(1)
    lay = Layout(meta, x, device)
    masks = block_masks(lay, device)
    tol = TOLERANCE[meta["dtype"]]
    result = {"source": "torch_baselines", "workload": meta["workload"], "len": n,
              "num_seqs": meta["num_seqs"], "num_tokens": meta["num_tokens"],
              "dtype": meta["dtype"], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "output_source": meta["output_source"], "tolerance": tol, "warmup": WARMUP}

    if not cuda:
        if meta["num_tokens"] <= 1 << 15:
            verify_block_masks(lay, masks, device)
        to = lambda a: torch.from_numpy(a)
        q, k, v = (to(x[name]).to(dtype) for name in ("q", "k", "v"))
        ok = True
        for form in forms:
            out = evo_attention(lay, masks, flex_attention, q, k, v, to(x["gates"]).to(dtype),
                                to(x["coeffs"]), meta["scale"], form)
            err = rel_l2(out, to(x["o"]))
            ok &= math.isfinite(err) and err <= tol
            print(f"FlexAttention EvoAttention, {form} bias (eager, CPU) vs this crate "
                  f"({meta['output_source']}): relative L2 {err:.3e} (tolerance {tol:.0e}) "
                  f"{'ok' if math.isfinite(err) and err <= tol else 'FAILED'}")
        print("no GPU: timing skipped")
        sys.exit(0 if ok else 1)

    result["gpu"] = "dry run (cpu)" if DRY else torch.cuda.get_device_name()
    out_path = args.out or os.path.join("benches", "results", "raw", gpu_stem(result["gpu"]) + ".jsonl")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    started_all = time.time()
    rows = []

    def say(msg):
        print(f"[{time.time() - started_all:7.1f} s] {msg}", flush=True)

    def emit():
        # A line after every pass, each holding every row so far (report.py keeps the last line
        # per cell and source): a run cut short by its time limit keeps what it finished.
        result["rows"] = rows
        with open(out_path, "a") as f:
            f.write(json.dumps(result) + "\n")

    def time_pass(system, pass_name, fn, read, extra, retry=None):
        started = time.time()
        try:
            peak = peak_bytes(fn, read) + extra
        except Exception as e:  # noqa: BLE001 - only a pass with a fallback is retried
            if retry is None:
                raise
            retry(e)
            peak = peak_bytes(fn, read) + extra
        row = {"system": system, "pass": pass_name, "reps": args.reps, "ms": [],
               "peak_bytes": int(peak), "first_call_s": time.time() - started}
        compiled = [0]
        for run in range(2):  # two identical runs: their spread is reported
            row["ms"].append(time_ms(fn, args.reps, compiled))
            say(f"run {run + 1}: {system:<10} {pass_name:<8} {row['ms'][-1]:10.3f} ms")
        row["compiled_while_timed"] = compiled[0]
        if compiled[0]:
            say(f"WARNING: {system} {pass_name}: dynamo compiled {compiled[0]} frames during the "
                "timed calls; these times include compilation")
        rows.append(row)
        emit()

    # SDPA first: it needs no compilation, so a short run still records it.
    if "sdpa" in systems:
        sdpa_passes, padded = sdpa_systems(meta, x, device, dtype, args.buckets)
        result["sdpa_buckets"] = args.buckets
        result["sdpa_padded_tokens"] = int(padded)
        if not args.check_only:
            for pass_name, (fn, read, extra) in sdpa_passes.items():
                time_pass("sdpa-flash", pass_name, fn, read, extra)
        del sdpa_passes
        if not DRY:
            torch.cuda.empty_cache()
    if "flex" in systems:
        # Rows of the fast form are flex-evo, the system of the speed-up table; lines without
        # `flex_bias` come from before the fast form existed and timed the exact64 one.
        result["flex_bias"] = forms
        result["flex_forms"] = {}
        for form in forms:
            system = FLEX_SYSTEM[form]
            say(f"FlexAttention EvoAttention, {form} bias: compiling and checking")
            err, compile_s, flex_passes, grad_coeffs = flex_systems(
                lay, masks, meta, x, device, dtype, form, "fwd_branches" in passes_wanted)
            ok = math.isfinite(err) and err <= tol
            say(f"FlexAttention EvoAttention, {form} bias, vs this crate ({meta['output_source']}): "
                f"relative L2 {err:.3e} (tolerance {tol:.0e}) {'ok' if ok else 'FAILED'}; "
                f"first call (compilation) {compile_s:.1f} s")
            info = {"system": system, "check_rel_l2": err, "check_ok": ok, "first_call_s": compile_s}
            result["flex_forms"][form] = info
            if not ok:
                emit()
                sys.exit(1)
            if args.check_only:
                emit()
                continue

            def without_coeff_grads(e, grad_coeffs=grad_coeffs, info=info, system=system):
                if not grad_coeffs["on"]:
                    raise e
                say(f"{system} backward with coefficient gradients failed ({e!r}); "
                    "timing it without them")
                grad_coeffs["on"] = False
                info["grad_coeffs"] = False

            info["grad_coeffs"] = grad_coeffs["on"]
            for pass_name, (fn, read, extra) in flex_passes.items():
                wanted = pass_name if pass_name in ("fwd", "fwd_bwd") else "fwd_branches"
                if wanted not in passes_wanted:
                    continue
                time_pass(system, pass_name, fn, read, extra,
                          retry=without_coeff_grads if pass_name == "fwd_bwd" else None)
            del flex_passes
            if not DRY:
                torch.cuda.empty_cache()
    say(f"appended to {out_path}")


if __name__ == "__main__":
    main()
