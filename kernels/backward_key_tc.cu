// Backward, key side on tensor cores (bf16, f16): dK and dV of behavior and candidate tokens. A
// block takes 64 consecutive tokens of one sequence and head (the dense tile list) and walks only
// the queries of their local windows (SPEC section 4: a behavior j is seen by the behaviors
// [j, j + w) and, when j + w > the first candidate, by every candidate; a candidate by itself):
//
//   1. the behaviors [k0, k0 + 64 + w - 1), cut at the first candidate;
//   2. the candidates, where a row is seen by them.
//
// With stored pairs (`pairs` not null: LocalPairs::Stored in src/cuda/backward.rs) the
// behaviors' walk reads each query's gate P and dz~ of the block's keys, stored by the query
// kernel, instead of computing them (stored_walk): two MMAs of four per sub-tile, and no bias,
// exp or mask. The candidates' walk always computes its pairs (a few tiles a sequence, and the
// query kernel stores only behaviors' rows).
//
// Each walk takes its 64-query tiles in 16-query sub-tiles (kKeyTcSub), and a warp skips those
// outside its keys' windows: a warp's 16 behaviors are seen by 16 + w - 1 of the 64 + w - 1
// queries walked. The 8-column-tile fragments of a whole 64-query tile also held the kernel at
// 254-255 registers; with 16-query sub-tiles D = 64 fits 168 and D = 32 128 (NVRTC 13.0).
//
// Then each row adds its other uses, all computed before: the transition branch from the tails
// kernel's f32 buffer (backward_tails_tc.cu) when the token is a tail, and its chunk's summary
// gradient / |C| (backward_summary.cu). Each dK, dV element is rounded once, by its one writer.
// The user token is left to backward_user_reduce.cu (over the query kernel's partials): one
// row seen by every query is no MMA tile.
//
// Grid: (tiles, H), block kDenseThreads.
//
// @instantiate SPARSECTR_BACKWARD_KEY_TC dtype16 head_dim

#include "common/dtype.cuh"
#include "common/mma.cuh"
#include "common/occupancy.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/query.cuh"
#include "attn/dense.cuh"
#include "attn/key_tile.cuh"
#include "attn/stored_pairs.cuh"

// The behaviors' walk from stored pairs (attn/stored_pairs.cuh): per stage of kCols queries,
// their Q and dO rows, and their rows of gate P and dz~ over the block's 64 keys, in 16-byte
// pieces of 8 keys ([query][key], 72 keys a row: 144 B, an odd number of 16-byte chunks, so
// ldmatrix .trans reads the A fragments (gate P)^T and dz~^T without bank conflicts). Two stages
// in the KeyTile's Q and dO arrays (kHalf elements each: a stage's Q and gate P rows in one,
// dO and dz~ rows in the other), and each query's delta in its LSE array (2 kCols floats, at
// least a stage pair of kCols here: KeyTile's tiles are as wide or wider). 32 queries a stage only
// at D = 64, where two stages fit in KeyTile's own: at D = 32 they made every key block 8 KB
// larger (25.6 to 33.8 KB, the default recompute walk's too), which held sm_86, sm_89 and sm_12x
// (100 KB an SM) to 2 blocks where 3 fit before (NVRTC 13.0's ptxas report).
template <typename T, int kHeadDim>
struct StoredStage {
    static constexpr int kCols = kHeadDim == 64 ? 32 : 16;
    static constexpr int kRowStride = kHeadDim + SmemPad<T>::kValue;
    static constexpr int kPairStride = kDenseRows + 8;
    // In each array, per stage: kCols token rows, then kCols pair rows.
    static constexpr int kPairs = kCols * kRowStride;
    static constexpr int kStage = kPairs + kCols * kPairStride;
    static constexpr int kHalf = 2 * kStage;
};

// Four blocks per SM at D = 32 (128 registers) and three at D = 64 (168), no spills (NVRTC 13.0);
// two at D = 128 (over 250 registers: the dK and dV accumulators of 16 rows). Fewer where those
// spilled 4-16 B: three at D = 32 before sm_90, two at D = 64 on sm_10x; and where shared memory
// holds fewer, that many. D = 32 and 64 fit these since the K and V fragments are loaded just
// before the walks that multiply by them (backward_key_tc's load_rows): loaded at the kernel's
// start, they were live through the set-up and the stored walk, and the budgets spilled 4-32 B
// (so three and two blocks before).
// The bias's phase and weekend terms by add_bias_features (kBiasMma) up to D = 64: at D = 128,
// where the kernel takes 255 registers, it spilled 4 B on sm_86 and sm_89 (NVRTC 13.0).
template <typename T, int kHeadDim>
using KeyTcTile = KeyTile<T, kHeadDim, false, kLdsmX4, DenseCols<T, kHeadDim>::kKey, StoredStage<T, kHeadDim>::kHalf,
                          kHeadDim <= 64>;
template <typename T, int kHeadDim>
constexpr int kKeyTcMinBlocks =
    min_blocks_per_sm(kHeadDim == 32 ? (kArchBeforeSm90 ? 3 : 4) : kHeadDim == 64 && !kArchSm10x ? 3 : 2,
                      KeyTcTile<T, kHeadDim>::kSmemBytes);

// Queries per MMA sub-tile of the local walk (KeyTile::walk): a warp skips the sub-tiles of a
// query tile outside its keys' windows.
constexpr int kKeyTcSub = 16;

// Whether the behaviors' walk leaves the per-pair mask out of the sub-tiles every row of a warp
// sees whole (3 of a warp's 5 at w = 64; KeyTile::walk): not at D = 128, where it spilled 12 B
// at 255 registers on sm_80 (NVRTC 13.0). Its queries are all behaviors, so none is earlier than
// a key it sees, and its bias always takes dt + 1 as one add (kGapLater). The candidates' walk
// (a few tiles at a sequence's end, where candidates may have been requested before the keys)
// keeps |dt| and every mask.
template <int kHeadDim>
constexpr bool kKeyTcSplitFull = kHeadDim <= 64;

struct LocalRows {
    int key[2];  // the lane's rows g and g + 8; -1 for the user token and past the sequence
    int candidates, window, end;

    // Which queries of a walk's [lo, hi) see the lane's rows: one interval each, since the
    // candidates follow the behaviors. A behavior j is seen by [j, j + w) cut at the first
    // candidate, and by every candidate when j + w passes it, which makes [j, end); a candidate
    // by itself. A pair then costs one unsigned compare.
    struct Seen {
        int from[2];
        unsigned count[2];
        __device__ __forceinline__ bool operator()(int query, int r) const {
            return static_cast<unsigned>(query - from[r]) < count[r];
        }
        // Row r's queries as an interval [lo_of(r), hi_of(r)) (empty where the row is none).
        __device__ __forceinline__ int lo_of(int r) const { return from[r]; }
        __device__ __forceinline__ int hi_of(int r) const { return from[r] + static_cast<int>(count[r]); }
    };
    __device__ __forceinline__ Seen seen(int lo, int hi) const {
        Seen s;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int j = key[r];
            const int last = j < 0 ? j : j >= candidates ? j + 1 : j + window > candidates ? end : j + window;
            const int first = max(j, lo), stop = min(last, hi);
            s.from[r] = first;
            s.count[r] = stop > first ? static_cast<unsigned>(stop - first) : 0u;
        }
        return s;
    }
};

// The behaviors' walk over queries [lo, hi) (behaviors) from stored pairs: dV += (gate P)^T dO
// and dK += dz^T Q with dz = dz~ + gate P delta, into kt's sums. A warp skips the 16-query
// sub-tiles outside [warp_first, warp_last], as KeyTile::walk. No bias, exp or mask: the query
// kernel stored zeros for the pairs a query does not see.
template <typename T, int kHeadDim, typename KT>
__device__ __forceinline__ void stored_walk(KT& kt, const EvoParams& p, const SeqInfo& si, int k0,
                                            int head, int lo, int hi, int warp_first, int warp_last,
                                            const T* __restrict__ q, const T* __restrict__ d_o,
                                            const T* __restrict__ pairs,
                                            const float* __restrict__ pair_delta) {
    using S = StoredStage<T, kHeadDim>;
    static_assert(2 * KT::kCols >= 2 * S::kCols && KT::kStages >= S::kHalf, "the stages fit");
    const PairRows pr = PairRows::of(p.window);
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int t = lane & 3;
    // Stage i's copies: Q and dO rows, the pair rows' pieces (8 a query and plane), and delta.
    auto issue = [&](int qt, int i) {
        T* const sq = kt.sQ + i * S::kStage;
        T* const sdo = kt.sdO + i * S::kStage;
        tile_rows_async<T, kHeadDim, S::kCols>(p, q, qt, hi, head, sq);
        tile_rows_async<T, kHeadDim, S::kCols>(p, d_o, qt, hi, head, sdo);
        // A thread copies one piece of one plane, of every 8th query: 8 queries on, the row
        // starts 8 keys later (so the piece sits 8 entries earlier in it) and 8 H rows further.
        // Not unrolled: unrolled, the D = 128 kernel spilled 4 B on sm_80 (NVRTC 13.0).
        constexpr int kStep = kDenseThreads / 16;
        static_assert(kStep == 8 && S::kCols % kStep == 0, "8 queries a pass");
        const int piece = threadIdx.x & 7, plane = (threadIdx.x >> 3) & 1, row0 = threadIdx.x >> 4;
        T* dst = (plane ? sdo : sq) + S::kPairs + row0 * S::kPairStride + 8 * piece;
        int query = qt + row0;
        int e = k0 + 8 * piece - pr.first(si, query);
        size_t at = pr.row(query, p.heads, head) + plane * pr.len;
        const size_t step = pr.row(kStep, p.heads, 0);
#pragma unroll 1
        for (int row = row0; row < S::kCols; row += kStep) {
            const bool valid = query < hi && e >= 0 && e <= pr.span;
            cp_async<16>(dst, pairs + (valid ? at + e : 0), valid);
            dst += kStep * S::kPairStride;
            query += kStep;
            e -= kStep;
            at += step;
        }
        if (threadIdx.x < S::kCols) {
            const int query = qt + threadIdx.x;
            const bool inside = query < hi;
            cp_async<4>(kt.sLse + i * S::kCols + threadIdx.x,
                        pair_delta + (inside ? static_cast<size_t>(query) * p.heads + head : 0), inside);
        }
    };
    __syncthreads();  // the caller's use of the arrays is done
    if (lo < hi) {
        issue(lo, 0);
        cp_async_wait_all();
        __syncthreads();
    }
    // Lane l gives row l % 8 of matrix l / 8: queries + 8 (bit 4), keys + 8 (bit 3).
    const int a_at = (((lane >> 4) & 1) * 8 + (lane & 7)) * S::kPairStride + warp * 16 + ((lane >> 3) & 1) * 8;
    int i = 0;
#pragma unroll 1
    for (int qt = lo; qt < hi; qt += S::kCols, i ^= 1) {
        const bool more = qt + S::kCols < hi;  // block-uniform
        if (more) issue(qt + S::kCols, i ^ 1);
        const T* const sq = kt.sQ + i * S::kStage;
        const T* const sdo = kt.sdO + i * S::kStage;
#pragma unroll 1
        for (int sub = 0; sub < S::kCols; sub += 16) {
            const int qs = qt + sub;
            if (qs + 15 < warp_first || qs > warp_last || qs >= hi) continue;  // warp-uniform
            unsigned gp[4], dz[4];
            ldmatrix<4, true>(gp, sq + S::kPairs + sub * S::kPairStride, a_at);
            ldmatrix<4, true>(dz, sdo + S::kPairs + sub * S::kPairStride, a_at);
            // A's columns (queries) 2t, 2t + 1 in r[0], r[1]; 2t + 8, 2t + 9 in r[2], r[3].
            const float* const delta = kt.sLse + i * S::kCols + sub + 2 * t;
            FragA<T> a_gp, a_dz;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float d0 = delta[(k >> 1) * 8], d1 = delta[(k >> 1) * 8 + 1];
                a_gp.r[k] = MmaPair<T>{gp[k]};
                const MmaPair<T> z{dz[k]};
                a_dz.r[k] = make_pair<T>(fmaf(pair_lo(a_gp.r[k]), d0, pair_lo(z)),
                                         fmaf(pair_hi(a_gp.r[k]), d1, pair_hi(z)));
            }
            frag_times_rows<T, kHeadDim>(kt.dv, a_gp, sdo + sub * S::kRowStride);
            frag_times_rows<T, kHeadDim>(kt.dk, a_dz, sq + sub * S::kRowStride);
        }
        if (more) {
            cp_async_wait_all();
            __syncthreads();
        }
    }
}

template <typename T, int kHeadDim>
__device__ void backward_key_tc(const EvoParams& p, const T* __restrict__ q, const T* __restrict__ k,
                                const T* __restrict__ v, const void* __restrict__ gates,
                                const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,
                                const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
                                const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,
                                const T* __restrict__ d_o, const float* __restrict__ lse,
                                const float* __restrict__ dgates, const float* __restrict__ dkbar,
                                const float* __restrict__ dvbar, const float* __restrict__ tail_dk,
                                const float* __restrict__ tail_dv, T* __restrict__ dk,
                                T* __restrict__ dv, const int* __restrict__ tiles,
                                const T* __restrict__ pairs, const float* __restrict__ pair_delta) {
    using KT = KeyTcTile<T, kHeadDim>;
    KT kt;
    SPARSECTR_KEY_TILE_SMEM(kt, T, kHeadDim);
    const DenseBlock blk = dense_block(p, 1, tiles);
    const int s = blk.seq, head = blk.head;
    const SeqInfo si = seqs[s];
    const int k0 = si.start + blk.tile * kDenseRows;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;
    const int w = p.window;

    LocalRows rows;
    rows.candidates = si.candidates;
    rows.window = w;
    rows.end = si.end;
    const int wk = k0 + warp * 16;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = wk + g + 8 * r;
        rows.key[r] = j >= si.behaviors && j < si.end ? j : -1;
    }
    const int wd0 = weekday0[s];
    if (threadIdx.x < kDenseRows)
        sKeyTime_[threadIdx.x] = token_time_fast(rel_time[min(k0 + static_cast<int>(threadIdx.x), si.end - 1)], wd0);
    // The K and V fragments of the lane's rows, loaded just before each walk that multiplies by
    // them (the stored walk does not): live from the kernel's start, or their rows' addresses
    // kept through the behaviors' walk, they spilled at kKeyTcMinBlocks' budgets.
    auto load_rows = [&]() {
        const int clamped[2] = {min(max(wk + g, si.behaviors), si.end - 1),
                                min(max(wk + g + 8, si.behaviors), si.end - 1)};
        const size_t at[2] = {dense_row<kHeadDim>(p, clamped[0], head), dense_row<kHeadDim>(p, clamped[1], head)};
        kt.kf.init(k + at[0], k + at[1]);
        kt.vf.init(v + at[0], v + at[1]);
    };
    kt.begin(p, typename KT::Inputs{q, d_o, lse, dgates, gates, rel_time}, coeffs, head, wd0, 2);

    // Block-uniform ranges. The block's behaviors are [b_lo, b_hi]; the warp's [wb_lo, wb_hi].
    const int b_lo = max(k0, si.behaviors), b_hi = min(k0 + kDenseRows, si.candidates) - 1;
    const int wb_lo = max(wk, si.behaviors), wb_hi = min(wk + 16, si.candidates) - 1;
    const bool warp_behaviors = wb_lo <= wb_hi;
    // 1. Behaviors: from the stored pairs where the query kernel wrote them (block-uniform).
    if (b_lo <= b_hi && pairs != nullptr)
        stored_walk<T, kHeadDim>(kt, p, si, k0, head, b_lo, min(b_hi + w, si.candidates),
                                 warp_behaviors ? wb_lo : kNoKey, wb_hi + w - 1, q, d_o, pairs, pair_delta);
    else if (b_lo <= b_hi) {
        load_rows();
        kt.template walk<kKeyTcSub, kKeyTcSplitFull<kHeadDim>, kGapLater>(
            rows, b_lo, min(b_hi + w, si.candidates), warp_behaviors ? wb_lo : kNoKey, wb_hi + w - 1);
    }
    // 2. Candidates: all of them when a behavior of the block is within w of the first, else
    // only the block's own.
    const bool block_seen_by_all = b_lo <= b_hi && b_hi + w > si.candidates;
    const int c_lo = block_seen_by_all ? si.candidates : max(k0, si.candidates);
    const int c_hi = block_seen_by_all ? si.end : min(k0 + kDenseRows, si.end);
    if (c_lo < c_hi && si.candidates < si.end) {
        const bool warp_seen_by_all = warp_behaviors && wb_hi + w > si.candidates;
        const int wc_lo = max(wk, si.candidates), wc_hi = min(wk + 16, si.end) - 1;
        const int first = warp_seen_by_all ? 0 : (wc_lo <= wc_hi ? wc_lo : kNoKey);
        const int last = warp_seen_by_all ? kNoKey : wc_hi;
        load_rows();
        kt.template walk<kKeyTcSub, false, kGapAbs>(rows, c_lo, c_hi, first, last);
    }

    // Each row's other uses: its chunk (the chunks ending at or before it), tail slot, summary.
    const int base = s * p.max_chunks;
    const int num_chunks = chunk_counts[s];
    const int slots = p.max_chunks * p.tail_tokens;
    size_t summary_at[2], tail_at[2];
    float inv[2];
    bool tail[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = rows.key[r];
        tail[r] = false;
        inv[r] = 0.f;
        summary_at[r] = tail_at[r] = 0;
        if (j < 0 || j >= si.candidates || num_chunks == 0) continue;
        int lo = 0, hi = num_chunks;  // first chunk whose end is past j
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (chunk_ends[base + mid] <= j) lo = mid + 1;
            else hi = mid;
        }
        const int c = min(lo, num_chunks - 1);
        const int start = c == 0 ? si.behaviors : chunk_ends[base + c - 1];
        const int end = chunk_ends[base + c];
        inv[r] = 1.f / static_cast<float>(end - start);
        summary_at[r] = (static_cast<size_t>(base + c) * p.heads + head) * kHeadDim;
        const int first_tail = max(start, end - p.tail_tokens);
        tail[r] = j >= first_tail;
        const int slot = c * p.tail_tokens + (j - first_tail);
        tail_at[r] = (static_cast<size_t>(s) * slots + slot) * p.heads * kHeadDim + static_cast<size_t>(head) * kHeadDim;
    }
#pragma unroll
    for (int dt = 0; dt < KT::kDimTiles; ++dt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = i >> 1, j = rows.key[r];
            if (j < 0) continue;
            const int d = dt * 8 + 2 * t + (i & 1);
            float gk = kt.dk[dt].c[i] * p.scale, gv = kt.dv[dt].c[i];
            if (tail[r]) {
                gk += tail_dk[tail_at[r] + d];
                gv += tail_dv[tail_at[r] + d];
            }
            if (j < si.candidates && num_chunks > 0) {
                gk = fmaf(dkbar[summary_at[r] + d], inv[r], gk);
                gv = fmaf(dvbar[summary_at[r] + d], inv[r], gv);
            }
            const size_t idx = dense_row<kHeadDim>(p, j, head) + d;
            dk[idx] = from_float<T>(gk);
            dv[idx] = from_float<T>(gv);
        }
    }
}

#define SPARSECTR_BACKWARD_KEY_TC(NAME, T, D)                                                    \
    extern "C" __global__ void __launch_bounds__(kDenseThreads, kKeyTcMinBlocks<T, D>)           \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const void* __restrict__ gates,                            \
             const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,            \
             const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,                 \
             const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,           \
             const T* __restrict__ d_o, const float* __restrict__ lse,                           \
             const float* __restrict__ dgates, const float* __restrict__ dkbar,                  \
             const float* __restrict__ dvbar, const float* __restrict__ tail_dk,                 \
             const float* __restrict__ tail_dv, T* __restrict__ dk, T* __restrict__ dv,          \
             const int* __restrict__ tiles, const T* __restrict__ pairs,                         \
             const float* __restrict__ pair_delta) {                                             \
        backward_key_tc<T, D>(p, q, k, v, gates, coeffs, rel_time, seqs, weekday0, chunk_ends,   \
                              chunk_counts, d_o, lse, dgates, dkbar, dvbar, tail_dk, tail_dv,    \
                              dk, dv, tiles, pairs, pair_delta);                                 \
    }
