// Backward of the chunk summaries on tensor cores (bf16, f16): the twin of backward_summary.cu. A
// block takes 64 chunk slots of one sequence as MMA rows (Kbar, Vbar in f32, multiplied as a
// high and a low 16-bit part) and walks every query from its first chunk's last behavior to the
// end of the sequence. Chunk c is seen in the global branch by the behaviors from its last one
// on and by every candidate: by every query at or after its last behavior, the shape of a tail
// token in backward_tails_tc.cu. Writes scale * dKbar and dVbar in f32 ([B * P, H, D]) for the
// key kernel to spread over the members; slots past a sequence's chunk count are not written.
//
// Grid: (B * ceil(P / 64), H), block kDenseThreads. Where P <= 32, two warp sets share the
// rows and split the queries (walk_sets). One writer per element: no atomics.
//
// @instantiate SPARSECTR_BACKWARD_SUMMARY_TC dtype16 head_dim

#include "common/dtype.cuh"
#include "common/mma.cuh"
#include "common/occupancy.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/query.cuh"
#include "attn/dense.cuh"
#include "attn/key_tile.cuh"

// Four blocks per SM at D = 32 (126-128 registers), three at D = 64 (166-168), two at D = 128
// (the dK and dV accumulators of 16 rows); no spills on sm_80 or sm_90 with NVRTC 13.0. The
// half-tile walk of two warp sets (key_tile.cuh) holds half the P^T and dz^T fragments of a
// whole tile's: with whole tiles D = 32 took 168 and D = 64 222. Where shared memory holds fewer
// blocks (three at D = 32 and two at D = 64 on sm_86, sm_89, sm_12x), that many.
template <typename T, int kHeadDim>
using SummaryKeyTile = KeyTile<T, kHeadDim, true, kLdsmX4, PrefixCols<T, kHeadDim>::kValue>;
template <typename T, int kHeadDim>
constexpr int kSummaryTcMinBlocks = min_blocks_per_sm(kHeadDim == 32 ? 4 : kHeadDim <= 64 ? 3 : 2,
                                                      SummaryKeyTile<T, kHeadDim>::kSmemBytes);

template <typename T, int kHeadDim>
__device__ void backward_summary_tc(const EvoParams& p, const T* __restrict__ q, const float* __restrict__ kbar,
                                    const float* __restrict__ vbar, const void* __restrict__ gates,
                                    const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,
                                    const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
                                    const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,
                                    const T* __restrict__ d_o, const float* __restrict__ lse,
                                    const float* __restrict__ dgates, float* __restrict__ dkbar,
                                    float* __restrict__ dvbar) {
    using KT = SummaryKeyTile<T, kHeadDim>;
    KT kt;
    SPARSECTR_KEY_TILE_SMEM(kt, T, kHeadDim);
    const int groups = (p.max_chunks + kDenseRows - 1) / kDenseRows;
    const int s = static_cast<int>(blockIdx.x) / groups;
    const int slot0 = (static_cast<int>(blockIdx.x) % groups) * kDenseRows;
    const int head = static_cast<int>(blockIdx.y);
    const SeqInfo si = seqs[s];
    const int num_chunks = chunk_counts[s];
    if (slot0 >= num_chunks) return;  // block-uniform
    const int* ends = chunk_ends + s * p.max_chunks;
    // Chunk ends increase: the block's first chunk has its smallest last behavior.
    const int first = ends[slot0] - 1;

    const int lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;
    // P <= 32 (32 in ctr-base, 16 in ctr-small) fills at most half of the block's rows: two
    // warp sets share them (key_tile.cuh).
    const int sets = walk_sets<KT::kCols>(p.max_chunks);
    const WalkSet ws = WalkSet::of(sets);
    const int chunk[2] = {slot0 + ws.row_warp * 16 + g, slot0 + ws.row_warp * 16 + g + 8};
    PrefixRows rows;
#pragma unroll
    for (int r = 0; r < 2; ++r) rows.key[r] = chunk[r] < num_chunks ? ends[chunk[r]] - 1 : -1;
    const int wd0 = weekday0[s];
    if (threadIdx.x < kDenseRows) {
        const int c = slot0 + static_cast<int>(threadIdx.x);
        sKeyTime_[threadIdx.x] = token_time_fast(rel_time[c < num_chunks ? ends[c] - 1 : first], wd0);
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // Rows past the chunk count read the block's first chunk (valid memory; masked anyway).
        const int c = rows.key[r] >= 0 ? chunk[r] : slot0;
        const size_t at = (static_cast<size_t>(s * p.max_chunks + c) * p.heads + head) * kHeadDim;
        kt.fk[r] = kbar + at;
        kt.fv[r] = vbar + at;
    }
    kt.begin(p, typename KT::Inputs{q, d_o, lse, dgates, gates, rel_time}, coeffs, head, wd0, 0);
    kt.walk_prefix(rows, first, si.end, sets, si);
    if (ws.set > 0) return;  // set 0 holds the sums

#pragma unroll
    for (int dt = 0; dt < KT::kDimTiles; ++dt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = i >> 1;
            if (rows.key[r] < 0) continue;
            const size_t idx = (static_cast<size_t>(s * p.max_chunks + chunk[r]) * p.heads + head) * kHeadDim +
                               dt * 8 + 2 * t + (i & 1);
            dkbar[idx] = kt.dk[dt].c[i] * p.scale;
            dvbar[idx] = kt.dv[dt].c[i];
        }
    }
}

#define SPARSECTR_BACKWARD_SUMMARY_TC(NAME, T, D)                                                \
    extern "C" __global__ void __launch_bounds__(kDenseThreads, kSummaryTcMinBlocks<T, D>)       \
        NAME(const EvoParams p, const T* __restrict__ q, const float* __restrict__ kbar,         \
             const float* __restrict__ vbar, const void* __restrict__ gates,                     \
             const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,            \
             const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,                 \
             const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,           \
             const T* __restrict__ d_o, const float* __restrict__ lse,                           \
             const float* __restrict__ dgates, float* __restrict__ dkbar,                        \
             float* __restrict__ dvbar) {                                                        \
        backward_summary_tc<T, D>(p, q, kbar, vbar, gates, coeffs, rel_time, seqs, weekday0,     \
                                  chunk_ends, chunk_counts, d_o, lse, dgates, dkbar, dvbar);     \
    }
