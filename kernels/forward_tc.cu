// Fused three-branch EvoAttention forward on tensor cores (bf16, f16). A block takes 64 queries
// of one sequence and one head (16 rows per warp, the rows of one MMA tile). For each branch it
// walks the union of its rows' key sets in tiles of kCols "slots", resolved like the warp kernel's
// slots (attn/branches.cuh) but for the whole tile of queries:
//
//   global      the summaries of the chunks the tile's last query has completed
//   transition  the last m positions of every chunk that query has started (slots before a
//               chunk's first behavior are masked)
//   local       the user token, the behaviors from the first query's window start to the last
//               query's visible end, and the tile's candidates (each visible to itself only)
//
// Each row masks the slots it does not see, adds the RelTemporal bias per element, and keeps one
// online softmax per branch; the gated sum of the branches is written once. Chunk summaries are
// f32: they are split into a 16-bit high part and the 16-bit rest, and both go through the MMA,
// so summaries keep about 16 bits of mantissa (the backward recomputes their logits in f32 against
// this forward's LSE).
//
// Shared memory: K, K_lo [kCols][D + pad] and V^T, V^T_lo [D][kCols + pad]: at most 37.9 KB.
//
// @instantiate SPARSECTR_FORWARD_TC dtype16 head_dim

#include "common/dtype.cuh"
#include "common/mma.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/branches.cuh"
#include "attn/softmax.cuh"
#include "attn/query.cuh"
#include "attn/dense.cuh"
#include "attn/tile_softmax.cuh"

constexpr int kForwardTcMinBlocks = 2;

// Slots per tile: 64 keys at D = 32; 32 from D = 64 on, where 64 kept the rows' S tile, the
// branch and the gated sums above 255 registers (NVRTC 13.0, sm_80 spilled 64 B).
template <int kHeadDim>
struct TcCols {
    static constexpr int kValue = kHeadDim == 32 ? 64 : 32;
};

// Slot kinds of the local branch.
enum : int { kLocalUser = 0, kLocalBehavior = 1, kLocalCandidate = 2 };

// What a row (query) needs to test slots.
struct TcRow {
    int q;
    bool live;        // a real query that is not the user token (which sees nothing)
    int visible_end;  // behaviors below this are in its past
    int completed;    // chunks whose last behavior is below visible_end
    int first_local;  // first behavior of its window
};

// The tile-wide slot ranges of the three branches.
struct TcTile {
    int completed;  // of the tile's last query
    int started;
    int local_lo, local_hi;  // behaviors [lo, hi) of the local branch
    int user;                // 1 if the sequence has a user token
    int cand_lo;             // first candidate of the tile (tile end if none)
};

// Chunks of the sequence whose exclusive end is at most `end` (chunk ends increase).
__device__ __forceinline__ int chunks_completed(const int* __restrict__ ends, int count, int end) {
    int lo = 0, hi = count;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (ends[mid] <= end) lo = mid + 1; else hi = mid;
    }
    return lo;
}

__device__ __forceinline__ int visible_end_of(const SeqInfo& si, int q) {
    return q >= si.candidates ? si.candidates : q + 1;
}

__device__ __forceinline__ int window_start(const SeqInfo& si, int q, int window) {
    return max(si.behaviors, min(q, si.candidates) + 1 - window);
}

// Row -1 (a slot past the branch's end, or before a chunk's first behavior) is never visible.
template <int kBranch>
__device__ __forceinline__ bool slot_visible(const TcRow& r, int row, int aux) {
    if (row < 0) return false;
    if (kBranch == 0) return r.live && aux < r.completed;
    if (kBranch == 1) return r.live && row < r.visible_end;
    if (aux == kLocalUser) return r.live;
    if (aux == kLocalBehavior) return r.live && row >= r.first_local && row < r.visible_end;
    return row == r.q;  // a candidate sees itself
}

template <int kBranch>
__device__ __forceinline__ int branch_slots(const TcTile& tt, const EvoParams& p) {
    if (kBranch == 0) return tt.completed;
    if (kBranch == 1) return tt.started * p.tail_tokens;
    return tt.user + (tt.local_hi - tt.local_lo);  // + the candidates, added by the caller
}

// Resolves slot s of a branch to (row, aux, time); row -1 is masked for every query. Rows are
// tokens, or summary slots (seq * P + chunk) for the global branch.
template <int kBranch>
__device__ __forceinline__ void resolve_slot(const TcTile& tt, const SeqInfo& si, const EvoParams& p,
                                             int chunk_base, const int* __restrict__ chunk_ends,
                                             const unsigned* __restrict__ rel_time, int s,
                                             int* row, int* aux, unsigned* time) {
    if (kBranch == 0) {
        const int c = chunk_base + s;
        *row = c;
        *aux = s;
        *time = rel_time[chunk_ends[c] - 1];
    } else if (kBranch == 1) {
        const int k = s / p.tail_tokens, o = s - k * p.tail_tokens;
        const int end = chunk_ends[chunk_base + k];
        const int start = k == 0 ? si.behaviors : chunk_ends[chunk_base + k - 1];
        const int token = end - p.tail_tokens + o;
        *aux = 0;
        *row = token >= start ? token : -1;
        *time = token >= start ? rel_time[token] : 0u;
    } else {
        const int behaviors = tt.local_hi - tt.local_lo;
        if (s < tt.user) {
            *row = si.start;
            *aux = kLocalUser;
            *time = 0u;
        } else if (s < tt.user + behaviors) {
            *row = tt.local_lo + s - tt.user;
            *aux = kLocalBehavior;
            *time = rel_time[*row];
        } else {
            *row = tt.cand_lo + s - tt.user - behaviors;
            *aux = kLocalCandidate;
            *time = rel_time[*row];
        }
    }
}

// Copies the K and V rows of a tile's slots into shared memory: K as rows, V transposed. Token
// rows come in T; summary rows (f32) are split into a high and a low 16-bit part.
template <typename T, int kHeadDim, int kCols, bool kSummary>
__device__ __forceinline__ void gather_slots(const EvoParams& p, int head, const T* __restrict__ k,
                                             const T* __restrict__ v, const float* __restrict__ kbar,
                                             const float* __restrict__ vbar, const int* sRow,
                                             T* sK, T* sKlo, T* sVt, T* sVtlo) {
    constexpr int kRowStride = kHeadDim + SmemPad<T>::kValue;
    constexpr int kColStride = kCols + SmemPad<T>::kValue;
    if (kSummary) {
        constexpr int kPerRow = kHeadDim / 4;  // float4 pieces
        for (int i = threadIdx.x; i < kCols * kPerRow; i += kDenseThreads) {
            const int r = i / kPerRow, c = i % kPerRow;
            const int row = sRow[r];
            uint4 rk = {0u, 0u, 0u, 0u}, rv = {0u, 0u, 0u, 0u};
            if (row >= 0) {
                const size_t at = (static_cast<size_t>(row) * p.heads + head) * kHeadDim;
                rk = __ldg(reinterpret_cast<const uint4*>(kbar + at) + c);
                rv = __ldg(reinterpret_cast<const uint4*>(vbar + at) + c);
            }
            const unsigned wk[4] = {rk.x, rk.y, rk.z, rk.w}, wv[4] = {rv.x, rv.y, rv.z, rv.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int d = c * 4 + e;
                const float xk = __uint_as_float(wk[e]), xv = __uint_as_float(wv[e]);
                const T hk = from_float<T>(xk), hv = from_float<T>(xv);
                sK[r * kRowStride + d] = hk;
                sKlo[r * kRowStride + d] = from_float<T>(xk - to_float(hk));
                sVt[d * kColStride + r] = hv;
                sVtlo[d * kColStride + r] = from_float<T>(xv - to_float(hv));
            }
        }
    } else {
        constexpr int kVec = VecWidth<T>::kValue;
        constexpr int kPerRow = kHeadDim / kVec;
        for (int i = threadIdx.x; i < kCols * kPerRow; i += kDenseThreads) {
            const int r = i / kPerRow, c = i % kPerRow;
            const int row = sRow[r];
            uint4 rk = {0u, 0u, 0u, 0u}, rv = {0u, 0u, 0u, 0u};
            if (row >= 0) {
                const size_t at = (static_cast<size_t>(row) * p.heads + head) * kHeadDim;
                rk = __ldg(reinterpret_cast<const uint4*>(k + at) + c);
                rv = __ldg(reinterpret_cast<const uint4*>(v + at) + c);
            }
            *reinterpret_cast<uint4*>(sK + r * kRowStride + c * kVec) = rk;
            const T* ev = reinterpret_cast<const T*>(&rv);
#pragma unroll
            for (int e = 0; e < kVec; ++e) sVt[(c * kVec + e) * kColStride + r] = ev[e];
        }
    }
}

// One branch for the block's rows: O_b (normalized, into acc) and its softmax state.
template <typename T, int kHeadDim, int kBranch>
__device__ __forceinline__ void tc_branch(const EvoParams& p, int head, const SeqInfo& si,
                                          const TcTile& tt, int num_slots, int chunk_base,
                                          const RowOperand<T, kHeadDim, true>& qf,
                                          const TcRow (&rw)[2], const TokenTime (&row_time)[2],
                                          int wd0, const TemporalCoeffs& tc, const T* __restrict__ k,
                                          const T* __restrict__ v, const float* __restrict__ kbar,
                                          const float* __restrict__ vbar,
                                          const int* __restrict__ chunk_ends,
                                          const unsigned* __restrict__ rel_time, bool warp_live,
                                          T* sK, T* sKlo, T* sVt, T* sVtlo, int* sRow, int* sAux,
                                          TokenTime* sTime, FragC (&acc)[kHeadDim / 8],
                                          RowSoftmax& sm) {
    constexpr int kCols = TcCols<kHeadDim>::kValue;
    constexpr bool kSummary = kBranch == 0;
    constexpr int kRowStride = kHeadDim + SmemPad<T>::kValue;
    constexpr int kColStride = kCols + SmemPad<T>::kValue;
    constexpr int kKeyTiles = kCols / 8;
    const int lane = threadIdx.x % kWarpSize, g = lane >> 2, t = lane & 3;
    const float inv_buckets = __frcp_rn(static_cast<float>(p.num_time_buckets));
#pragma unroll
    for (int dt = 0; dt < kHeadDim / 8; ++dt) clear(acc[dt]);
    sm.init();
    for (int base = 0; base < num_slots; base += kCols) {
        __syncthreads();  // the previous tile's readers are done
        const int tid = threadIdx.x;
        if (tid < kCols) {
            int row = -1, aux = 0;
            unsigned time = 0u;
            if (base + tid < num_slots)
                resolve_slot<kBranch>(tt, si, p, chunk_base, chunk_ends, rel_time, base + tid, &row,
                                      &aux, &time);
            sRow[tid] = row;
            sAux[tid] = aux;
            sTime[tid] = token_time(time, wd0);
        }
        __syncthreads();
        gather_slots<T, kHeadDim, kCols, kSummary>(p, head, k, v, kbar, vbar, sRow, sK, sKlo, sVt,
                                                   sVtlo);
        __syncthreads();
        if (!warp_live) continue;  // warp-uniform: none of its rows attends

        FragC sc[kKeyTiles];
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
            clear(sc[n]);
#pragma unroll
            for (int kk = 0; kk < kHeadDim / 16; ++kk) {
                const int at = (n * 8 + g) * kRowStride + kk * 16;
                mma(sc[n], qf.get(kk), load_b(sK + at));
                if (kSummary) mma(sc[n], qf.get(kk), load_b(sKlo + at));
            }
        }
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1, col = n * 8 + 2 * t + (i & 1);
                const int row = sRow[col], aux = sAux[col];
                float z = neg_inf();
                if (slot_visible<kBranch>(rw[r], row, aux)) {
                    z = sc[n].c[i] * p.scale;
                    if (kBranch != 2 || aux != kLocalUser)
                        z += tc.bias(pair_features(row_time[r], sTime[col], p.num_time_buckets,
                                                   inv_buckets));
                }
                sc[n].c[i] = z;
            }
        }
        float corr[2];
        sm.update(sc, corr);
        scale_rows(acc, corr);
#pragma unroll
        for (int kk = 0; kk < kCols / 16; ++kk) {
            const FragA<T> pa = a_from_c<T>(sc[2 * kk], sc[2 * kk + 1]);
#pragma unroll
            for (int dt = 0; dt < kHeadDim / 8; ++dt) {
                const int at = (dt * 8 + g) * kColStride + kk * 16;
                mma(acc[dt], pa, load_b(sVt + at));
                if (kSummary) mma(acc[dt], pa, load_b(sVtlo + at));
            }
        }
    }
    float inv[2];
    sm.finish(inv);
    scale_rows(acc, inv);
}

template <typename T, int kHeadDim>
__device__ void evo_forward_tc(const EvoParams& p, const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const float* __restrict__ kbar,
                               const float* __restrict__ vbar, const void* __restrict__ gates,
                               const float* __restrict__ coeffs,
                               const unsigned* __restrict__ rel_time,
                               const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
                               const int* __restrict__ chunk_ends,
                               const int* __restrict__ chunk_counts, T* __restrict__ o,
                               float* __restrict__ lse) {
    constexpr int kCols = TcCols<kHeadDim>::kValue;
    constexpr int kPad = SmemPad<T>::kValue;
    constexpr int kDimTiles = kHeadDim / 8;
    alignas(16) __shared__ T sK[kCols * (kHeadDim + kPad)];
    alignas(16) __shared__ T sKlo[kCols * (kHeadDim + kPad)];
    alignas(16) __shared__ T sVt[kHeadDim * (kCols + kPad)];
    alignas(16) __shared__ T sVtlo[kHeadDim * (kCols + kPad)];
    __shared__ int sRow[kCols];
    __shared__ int sAux[kCols];
    __shared__ TokenTime sTime[kCols];

    const DenseBlock blk = dense_block(p, 1);
    const int head = blk.head;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;
    const TemporalCoeffs tc{coeffs[head * 3], coeffs[head * 3 + 1], coeffs[head * 3 + 2]};

    for (int s = blockIdx.y; s < p.num_seqs; s += gridDim.y) {
        const SeqInfo si = seqs[s];
        const int q0 = si.start + blk.tile * kDenseRows;
        if (q0 >= si.end) continue;  // block-uniform
        const int q_end = min(q0 + kDenseRows, si.end);
        const int chunk_base = s * p.max_chunks;
        const int num_chunks = chunk_counts[s];
        const int* ends = chunk_ends + chunk_base;

        TcTile tt;
        tt.completed = chunks_completed(ends, num_chunks, visible_end_of(si, q_end - 1));
        tt.started = min(tt.completed + 1, num_chunks);
        tt.local_lo = window_start(si, q0, p.window);
        tt.local_hi = max(tt.local_lo, min(visible_end_of(si, q_end - 1), si.candidates));
        tt.user = si.behaviors > si.start ? 1 : 0;
        tt.cand_lo = max(q0, si.candidates);

        const int wq = q0 + warp * 16;
        TcRow rw[2];
        TokenTime row_time[2];
        bool any_live = false;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int q = wq + g + 8 * r;
            const int qc = min(q, si.end - 1);
            rw[r].q = q;
            rw[r].live = q < si.end && q >= si.behaviors;
            rw[r].visible_end = visible_end_of(si, qc);
            rw[r].completed = chunks_completed(ends, num_chunks, rw[r].visible_end);
            rw[r].first_local = window_start(si, qc, p.window);
            row_time[r] = token_time(rel_time[qc], weekday0[s]);
            any_live = any_live || rw[r].live;
        }
        const bool warp_live = __any_sync(kFullMask, any_live) != 0;
        RowOperand<T, kHeadDim, true> qf;
        qf.init(q + dense_row<kHeadDim>(p, min(wq + g, si.end - 1), head),
                q + dense_row<kHeadDim>(p, min(wq + g + 8, si.end - 1), head));
        const int wd0 = weekday0[s];

        FragC out[kDimTiles], acc[kDimTiles];
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) clear(out[dt]);
        RowSoftmax sm;
        float branch_lse[3][2];
        const int local_slots = branch_slots<2>(tt, p) + max(0, q_end - tt.cand_lo);

#define SPARSECTR_TC_BRANCH(B, SLOTS)                                                            \
    {                                                                                            \
        tc_branch<T, kHeadDim, B>(p, head, si, tt, SLOTS, chunk_base, qf, rw, row_time, wd0, tc, \
                                  k, v, kbar, vbar, chunk_ends, rel_time, warp_live, sK, sKlo,  \
                                  sVt, sVtlo, sRow, sAux, sTime, acc, sm);                       \
        float gate[2];                                                                           \
        for (int r = 0; r < 2; ++r) {                                                            \
            const int qc = min(rw[r].q, si.end - 1);                                             \
            gate[r] = load_gate<T>(p, gates, (static_cast<size_t>(qc) * p.heads + head) * 3 + B); \
            branch_lse[B][r] = sm.lse(r);                                                        \
        }                                                                                        \
        for (int dt = 0; dt < kDimTiles; ++dt) {                                                 \
            out[dt].c[0] = fmaf(gate[0], acc[dt].c[0], out[dt].c[0]);                            \
            out[dt].c[1] = fmaf(gate[0], acc[dt].c[1], out[dt].c[1]);                            \
            out[dt].c[2] = fmaf(gate[1], acc[dt].c[2], out[dt].c[2]);                            \
            out[dt].c[3] = fmaf(gate[1], acc[dt].c[3], out[dt].c[3]);                            \
        }                                                                                        \
    }
        SPARSECTR_TC_BRANCH(0, branch_slots<0>(tt, p))
        SPARSECTR_TC_BRANCH(1, branch_slots<1>(tt, p))
        SPARSECTR_TC_BRANCH(2, local_slots)
#undef SPARSECTR_TC_BRANCH

#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                if (rw[r].q < si.end)
                    o[dense_row<kHeadDim>(p, rw[r].q, head) + dt * 8 + 2 * t + (i & 1)] =
                        from_float<T>(out[dt].c[i]);
            }
        }
        if (t == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                if (rw[r].q >= si.end) continue;
                float* row_lse = lse + (static_cast<size_t>(rw[r].q) * p.heads + head) * kNumBranches;
#pragma unroll
                for (int b = 0; b < kNumBranches; ++b) row_lse[b] = branch_lse[b][r];
            }
        }
    }
}

#define SPARSECTR_FORWARD_TC(NAME, T, D)                                                         \
    extern "C" __global__ void __launch_bounds__(kDenseThreads, kForwardTcMinBlocks)            \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const float* __restrict__ kbar,                            \
             const float* __restrict__ vbar, const void* __restrict__ gates,                     \
             const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,            \
             const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,                 \
             const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,           \
             T* __restrict__ o, float* __restrict__ lse) {                                       \
        evo_forward_tc<T, D>(p, q, k, v, kbar, vbar, gates, coeffs, rel_time, seqs, weekday0,    \
                             chunk_ends, chunk_counts, o, lse);                                  \
    }
