// Backward, key side, transition branch on tensor cores (bf16, f16): a block gathers 64 tail slots
// of one sequence (slot c * m + i: the i-th of the last m behaviors of chunk c) as MMA rows and
// walks every query from its first tail to the end of the sequence. A tail token is seen by
// itself, every later behavior and every candidate: by every query at or after it. Writes
// scale * dK and dV of each slot in f32 to tail_dk, tail_dv ([B * P * m, H, D], slot-major); the
// local kernel (backward_key_tc.cu) adds them to the token's other uses and rounds once. Slots past
// a chunk's length or a sequence's chunk count are never read; those in a block that has a
// token are written as zeros.
//
// Grid: (B * ceil(P * m / 64), H), block kDenseThreads. Where P m <= 32, two warp sets share the
// rows and split the queries (walk_sets). One writer per element: no atomics.
//
// @instantiate SPARSECTR_BACKWARD_TAILS_TC dtype16 head_dim

#include "common/dtype.cuh"
#include "common/mma.cuh"
#include "common/occupancy.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/query.cuh"
#include "attn/dense.cuh"
#include "attn/key_tile.cuh"

// Four blocks per SM at D = 32 (126-128 registers, no spills on sm_80 or sm_90 with NVRTC 13.0),
// three at D = 64 from sm_90 on but sm_10x (168 registers), two elsewhere at D = 64 and at
// D = 128, which needs about 250 (the dK and dV accumulators of 16 rows). Where shared memory
// holds fewer blocks (three at D = 32 and two at D = 64 on sm_86, sm_89, sm_12x), that many.
// D = 64 spilled 36 B at three until backward_tails_tc walked with `sets` a constant
// (kTailsSetsConst) and left s and slot0 out of the registers it keeps; sm_80 and sm_10x still
// spill 8 B there, and sm_80 4 B at D = 32 with the walk in two copies, so they do not take them.
template <int kHeadDim>
constexpr bool kTailsSetsConst = kHeadDim == 64 && !kArchBeforeSm90 && !kArchSm10x;
// The bias by FFMAs (kBiasMma false): by add_bias_features, its walk's loops were 8% shorter
// but D = 64 spilled 8 B at three blocks on sm_90 (12 B with ldmatrix .x4; NVRTC 13.0).
template <typename T, int kHeadDim>
using TailsKeyTile = KeyTile<T, kHeadDim, false, kLdsmX2, PrefixCols<T, kHeadDim>::kValue, 0, false>;
template <typename T, int kHeadDim>
constexpr int kTailsMinBlocks = min_blocks_per_sm(kHeadDim == 32 ? 4 : kTailsSetsConst<kHeadDim> ? 3 : 2,
                                                  TailsKeyTile<T, kHeadDim>::kSmemBytes);

// The token of tail slot `slot` of sequence `s`, or -1 where the slot holds none.
__device__ __forceinline__ int tail_token(const EvoParams& p, const SeqInfo& si, int s, int slot,
                                          const int* __restrict__ chunk_ends, int num_chunks) {
    const int c = slot / p.tail_tokens, i = slot % p.tail_tokens;
    if (c >= num_chunks) return -1;
    const int base = s * p.max_chunks;
    const int start = c == 0 ? si.behaviors : chunk_ends[base + c - 1];
    const int end = chunk_ends[base + c];
    const int token = max(start, end - p.tail_tokens) + i;
    return token < end ? token : -1;
}

template <typename T, int kHeadDim>
__device__ void backward_tails_tc(const EvoParams& p, const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, const void* __restrict__ gates,
                                  const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,
                                  const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
                                  const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,
                                  const T* __restrict__ d_o, const float* __restrict__ lse,
                                  const float* __restrict__ dgates, float* __restrict__ tail_dk,
                                  float* __restrict__ tail_dv) {
    // ldmatrix .x2: .x4 spilled 48 B at D = 64 on sm_90 (NVRTC 13.0).
    using KT = TailsKeyTile<T, kHeadDim>;
    KT kt;
    SPARSECTR_KEY_TILE_SMEM(kt, T, kHeadDim);
    const int slots = p.max_chunks * p.tail_tokens;
    const int groups = (slots + kDenseRows - 1) / kDenseRows;
    const int s = static_cast<int>(blockIdx.x) / groups;
    const int slot0 = (static_cast<int>(blockIdx.x) % groups) * kDenseRows;
    const int head = static_cast<int>(blockIdx.y);
    const SeqInfo si = seqs[s];
    const int num_chunks = chunk_counts[s];
    // Slots run in token order, and a chunk's first slot always holds a token: the block's first
    // query is its first slot's token, or the next chunk's. Block-uniform.
    int first = tail_token(p, si, s, slot0, chunk_ends, num_chunks);
    if (first < 0) first = tail_token(p, si, s, (slot0 / p.tail_tokens + 1) * p.tail_tokens, chunk_ends, num_chunks);
    if (first < 0 || slot0 / p.tail_tokens >= num_chunks) return;

    const int lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;
    // The sequence and first slot, for the writes after the walk: read back from shared memory
    // there, not kept in registers through it.
    __shared__ int sBlock_[2];
    // The rows and their walk. Where kTailsSetsConst, in one copy per number of warp sets (the
    // lambda is inlined at each call): a constant `sets`, and s and slot0 through shared memory,
    // are what fit three blocks an SM at D = 64 (kTailsMinBlocks).
    auto rows_walk = [&](const int sets) {
        const WalkSet ws = WalkSet::of(sets);
        const int row0 = slot0 + ws.row_warp * 16 + g;  // the lane's rows: row0 and row0 + 8
        PrefixRows rows;
        rows.key[0] = row0 < slots ? tail_token(p, si, s, row0, chunk_ends, num_chunks) : -1;
        rows.key[1] = row0 + 8 < slots ? tail_token(p, si, s, row0 + 8, chunk_ends, num_chunks) : -1;
        const int wd0 = weekday0[s];
        if (threadIdx.x < kDenseRows) {
            const int slot = slot0 + static_cast<int>(threadIdx.x);
            const int key = slot < slots ? tail_token(p, si, s, slot, chunk_ends, num_chunks) : -1;
            sKeyTime_[threadIdx.x] = token_time_fast(rel_time[key >= 0 ? key : first], wd0);
        }
        if (threadIdx.x == 0) {
            sBlock_[0] = s;
            sBlock_[1] = slot0;
        }

        const int clamped[2] = {rows.key[0] >= 0 ? rows.key[0] : first, rows.key[1] >= 0 ? rows.key[1] : first};
        const size_t at[2] = {dense_row<kHeadDim>(p, clamped[0], head), dense_row<kHeadDim>(p, clamped[1], head)};
        kt.kf.init(k + at[0], k + at[1]);
        kt.vf.init(v + at[0], v + at[1]);
        kt.begin(p, typename KT::Inputs{q, d_o, lse, dgates, gates, rel_time}, coeffs, head, wd0, 1);
        kt.walk_prefix(rows, first, si.end, sets, si);
        if (ws.set > 0) return;  // set 0 holds the sums

        // Every slot of the block's rows in the sequence is written: one with no token (past its
        // chunk's length or the chunk count) is seen by no query, so its sums are zeros, and
        // no reader asks for it. Testing rows.key here instead kept it through the walk.
        const int s_out = sBlock_[0], row_out = sBlock_[1] + ws.row_warp * 16 + g;
#pragma unroll
        for (int dt = 0; dt < KT::kDimTiles; ++dt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int slot = row_out + 8 * (i >> 1);
                if (slot >= slots) continue;
                const size_t idx = ((static_cast<size_t>(s_out) * slots + slot) * p.heads + head) * kHeadDim + dt * 8 +
                                   2 * t + (i & 1);
                tail_dk[idx] = kt.dk[dt].c[i] * p.scale;
                tail_dv[idx] = kt.dv[dt].c[i];
            }
        }
    };
    // P m <= 32 (16 in ctr-small) fills at most half of the block's rows: two warp sets share
    // them (key_tile.cuh).
    const int sets = walk_sets<KT::kCols>(slots);
    if (!kTailsSetsConst<kHeadDim>)
        rows_walk(sets);
    else if (sets == 2)
        rows_walk(2);
    else
        rows_walk(1);
}

#define SPARSECTR_BACKWARD_TAILS_TC(NAME, T, D)                                                  \
    extern "C" __global__ void __launch_bounds__(kDenseThreads, kTailsMinBlocks<T, D>)           \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const void* __restrict__ gates,                            \
             const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,            \
             const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,                 \
             const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,           \
             const T* __restrict__ d_o, const float* __restrict__ lse,                           \
             const float* __restrict__ dgates, float* __restrict__ tail_dk,                      \
             float* __restrict__ tail_dv) {                                                      \
        backward_tails_tc<T, D>(p, q, k, v, gates, coeffs, rel_time, seqs, weekday0, chunk_ends, \
                                chunk_counts, d_o, lse, dgates, tail_dk, tail_dv);               \
    }
