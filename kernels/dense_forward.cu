// Dense counterpart forward (SPEC section 5), FlashAttention-2 style: a block takes 64 queries of
// one sequence and one head (16 rows per warp, the rows of one MMA tile), walks the sequence's
// keys up to its last query in tiles of kCols, and keeps one online softmax per row. S = Q K^T and
// O += P V run on tensor cores for bf16/f16 (kernels/common/mma.cuh); the mask (causal, candidate
// isolation) and the RelTemporal bias are applied per element in registers. Nothing T x T exists.
//
// Shared memory: K tile [kCols][D + pad] and V^T tile [D][kCols + pad]: at most 37.5 KB
// (16-bit D = 128 with 64 keys; f32 D = 128 takes 32 keys).
//
// @instantiate SPARSECTR_DENSE_FORWARD dtype head_dim

#include "common/dtype.cuh"
#include "common/mma.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/softmax.cuh"
#include "attn/dense.cuh"
#include "attn/tile_softmax.cuh"

constexpr int kDenseForwardMinBlocks = 2;

template <typename T, int kHeadDim>
__device__ void dense_forward(const EvoParams& p, const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const float* __restrict__ coeffs,
                              const unsigned* __restrict__ rel_time, const SeqInfo* __restrict__ seqs,
                              const int* __restrict__ weekday0, T* __restrict__ o,
                              float* __restrict__ lse, const int* __restrict__ tiles) {
    constexpr int kCols = DenseCols<T, kHeadDim>::kForward;
    constexpr int kPad = SmemPad<T>::kValue;
    constexpr int kKStride = kHeadDim + kPad;
    constexpr int kVStride = kCols + kPad;
    constexpr int kDimTiles = kHeadDim / 8;
    constexpr int kKeyTiles = kCols / 8;
    alignas(16) __shared__ T sK[kCols * kKStride];
    alignas(16) __shared__ T sVt[kHeadDim * kVStride];
    __shared__ TokenTime sKeyTime[kCols];

    const DenseBlock blk = dense_block(p, 1, tiles);
    const int head = blk.head;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;
    const TemporalCoeffs tc{coeffs[head * 3], coeffs[head * 3 + 1], coeffs[head * 3 + 2]};

    {
        const int s = blk.seq;
        const SeqInfo si = seqs[s];
        const int q0 = si.start + blk.tile * kDenseRows;
        if (q0 >= si.end) return;  // block-uniform; the tile list holds none
        const int q_end = min(q0 + kDenseRows, si.end);
        const int wq = q0 + warp * 16;
        const int rows[2] = {wq + g, wq + g + 8};
        const int ra = min(rows[0], si.end - 1), rb = min(rows[1], si.end - 1);
        RowOperand<T, kHeadDim, true> qf;
        qf.init(q + dense_row<kHeadDim>(p, ra, head), q + dense_row<kHeadDim>(p, rb, head));
        const int wd0 = weekday0[s];
        // Logits in base 2 (RowSoftmax): scale and bias times log2 e.
        const RowBias bias_of[2] = {
            RowBias::make(token_time(rel_time[ra], wd0), tc, p.num_time_buckets, kLog2e),
            RowBias::make(token_time(rel_time[rb], wd0), tc, p.num_time_buckets, kLog2e)};
        const float scale2 = p.scale * kLog2e;

        FragC acc[kDimTiles];
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) clear(acc[dt]);
        RowSoftmax sm;
        sm.init();

        for (int kt = si.start; kt < q_end; kt += kCols) {
            __syncthreads();  // the previous tile's readers are done
            tile_tensor<T, kHeadDim, kCols>(p, k, kt, q_end, head, sK, nullptr);
            tile_tensor<T, kHeadDim, kCols>(p, v, kt, q_end, head, nullptr, sVt);
            const int tid = threadIdx.x;
            if (tid < kCols) sKeyTime[tid] = token_time(kt + tid < q_end ? rel_time[kt + tid] : 0u, wd0);
            __syncthreads();
            // Warp-uniform: every key of the tile comes after every row of this warp.
            if (kt > wq + 15 || wq >= si.end) continue;

            FragC sc[kKeyTiles];
#pragma unroll
            for (int n = 0; n < kKeyTiles; ++n) clear(sc[n]);
            rows_times_tile<T, kHeadDim, kCols>(sc, qf, sK);
#pragma unroll
            for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    // Computed for every element and masked after (see forward_tc.cu).
                    const int r = i >> 1, col = n * 8 + 2 * t + (i & 1), key = kt + col;
                    float bias = bias_of[r](sKeyTime[col], p.num_time_buckets);
                    if (!dense_timed(si, rows[r]) || !dense_timed(si, key)) bias = 0.f;
                    const float z = fmaf(sc[n].c[i], scale2, bias);
                    sc[n].c[i] = dense_visible(si, rows[r], key) ? z : neg_inf();
                }
            }
            float corr[2];
            if (sm.update(sc, corr)) scale_rows(acc, corr);
            probs_times_tile<T, kCols>(acc, sc, sVt, 0);
        }

        float inv[2];
        sm.finish(inv);
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                if (rows[r] < si.end)
                    o[dense_row<kHeadDim>(p, rows[r], head) + dt * 8 + 2 * t + (i & 1)] =
                        from_float<T>(acc[dt].c[i] * inv[r]);
            }
        }
        if (t == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
                if (rows[r] < si.end)
                    lse[static_cast<size_t>(rows[r]) * p.heads + head] = sm.lse(r);
        }
    }
}

#define SPARSECTR_DENSE_FORWARD(NAME, T, D)                                                      \
    extern "C" __global__ void __launch_bounds__(kDenseThreads, kDenseForwardMinBlocks)         \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const float* __restrict__ coeffs,                          \
             const unsigned* __restrict__ rel_time, const SeqInfo* __restrict__ seqs,            \
             const int* __restrict__ weekday0, T* __restrict__ o, float* __restrict__ lse,       \
             const int* __restrict__ tiles) {                                                    \
        dense_forward<T, D>(p, q, k, v, coeffs, rel_time, seqs, weekday0, o, lse, tiles);               \
    }
