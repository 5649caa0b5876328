// Dense counterpart backward, key side: a block takes 64 keys of one sequence and head (16 per
// warp, as MMA rows) and walks every later query of the sequence in tiles of kCols, recomputing
// P^T = exp(z - LSE) and dP^T = V dO^T to accumulate dV = P^T dO and dK = scale dS^T Q in
// registers. Needs the LSE of the forward and the Delta = <dO, O> that
// dense_backward_query.cu writes. Each dK, dV element has one writer: no atomics.
//
// Shared memory: Q and dO tiles [kCols][D + pad], their transposes [D][kCols + pad], and per
// query LSE, Delta and time: at most 42.4 KB.
//
// @instantiate SPARSECTR_DENSE_BACKWARD_KEY dtype head_dim

#include "common/dtype.cuh"
#include "common/mma.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/softmax.cuh"
#include "attn/dense.cuh"

// Three blocks per SM only at D = 32: the 168-register cap spilled 16-bit D = 64 (NVRTC 13.0).
template <int kHeadDim>
constexpr int kDenseKeyMinBlocks = kHeadDim <= 32 ? 3 : 2;

template <typename T, int kHeadDim>
__device__ void dense_backward_key(const EvoParams& p, const T* __restrict__ q,
                                   const T* __restrict__ k, const T* __restrict__ v,
                                   const T* __restrict__ d_o, const float* __restrict__ lse,
                                   const float* __restrict__ delta, const float* __restrict__ coeffs,
                                   const unsigned* __restrict__ rel_time,
                                   const SeqInfo* __restrict__ seqs,
                                   const int* __restrict__ weekday0, T* __restrict__ dk,
                                   T* __restrict__ dv, const int* __restrict__ tiles) {
    constexpr int kCols = DenseCols<T, kHeadDim>::kKey;
    constexpr bool kResident = DenseResident<T, kHeadDim>::kValue;
    constexpr int kPad = SmemPad<T>::kValue;
    constexpr int kRowStride = kHeadDim + kPad;
    constexpr int kColStride = kCols + kPad;
    constexpr int kParts = DenseParts<T, kHeadDim>::kValue;
    constexpr int kDimTiles = kHeadDim / 8 / kParts;  // of this block's part of dK and dV
    constexpr int kQueryTiles = kCols / 8;
    alignas(16) __shared__ T sQ[kCols * kRowStride];
    alignas(16) __shared__ T sQt[kHeadDim * kColStride];
    alignas(16) __shared__ T sdO[kCols * kRowStride];
    alignas(16) __shared__ T sdOt[kHeadDim * kColStride];
    __shared__ float sLse[kCols];
    __shared__ float sDelta[kCols];
    __shared__ TokenTime sTime[kCols];
    // The block's keys' times: in registers they pushed 16-bit D = 128 past 255 (spilled 12 B).
    __shared__ TokenTime sKeyTime[kDenseRows];

    const DenseBlock blk = dense_block(p, kParts, tiles);
    const int dim0 = blk.part * (kHeadDim / kParts);  // first dimension of this block's dK, dV
    const int head = blk.head;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;
    const TemporalCoeffs tc{coeffs[head * 3], coeffs[head * 3 + 1], coeffs[head * 3 + 2]};

    {
        const int s = blk.seq;
        const SeqInfo si = seqs[s];
        const int k0 = si.start + blk.tile * kDenseRows;
        if (k0 >= si.end) return;  // block-uniform; the tile list holds none
        const int wk = k0 + warp * 16;
        const int keys[2] = {wk + g, wk + g + 8};
        const int clamped[2] = {min(keys[0], si.end - 1), min(keys[1], si.end - 1)};
        const size_t at[2] = {dense_row<kHeadDim>(p, clamped[0], head),
                              dense_row<kHeadDim>(p, clamped[1], head)};
        RowOperand<T, kHeadDim, kResident> kf, vf;
        kf.init(k + at[0], k + at[1]);
        vf.init(v + at[0], v + at[1]);
        const int wd0 = weekday0[s];
        if (threadIdx.x < kDenseRows)
            sKeyTime[threadIdx.x] = token_time(rel_time[min(k0 + static_cast<int>(threadIdx.x), si.end - 1)], wd0);
        const int key_slot[2] = {warp * 16 + g, warp * 16 + g + 8};  // into sKeyTime
        const float inv_buckets = __frcp_rn(static_cast<float>(p.num_time_buckets));

        FragC dk_acc[kDimTiles], dv_acc[kDimTiles];
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) {
            clear(dk_acc[dt]);
            clear(dv_acc[dt]);
        }

        for (int qt = k0; qt < si.end; qt += kCols) {
            __syncthreads();
            tile_tensor<T, kHeadDim, kCols>(p, q, qt, si.end, head, sQ, sQt);
            tile_tensor<T, kHeadDim, kCols>(p, d_o, qt, si.end, head, sdO, sdOt);
            const int tid = threadIdx.x;
            if (tid < kCols) {
                const bool in = qt + tid < si.end;
                const size_t row = static_cast<size_t>(qt + tid) * p.heads + head;
                sLse[tid] = in ? lse[row] : 0.f;
                sDelta[tid] = in ? delta[row] : 0.f;
                sTime[tid] = token_time(in ? rel_time[qt + tid] : 0u, wd0);
            }
            __syncthreads();
            // Warp-uniform: every query of the tile comes before every key of this warp.
            if (qt + kCols - 1 < wk || wk >= si.end) continue;

            FragC pt[kQueryTiles], dst[kQueryTiles];  // P^T, then dP^T and dS^T
#pragma unroll
            for (int n = 0; n < kQueryTiles; ++n) {
                clear(pt[n]);
                clear(dst[n]);
            }
            // load_b: ldmatrix spilled this kernel at D = 32 (NVRTC 13.0, sm_80 and sm_90).
            rows_times_tile<T, kHeadDim, kCols, kLoadB>(pt, kf, sQ);
            rows_times_tile<T, kHeadDim, kCols, kLoadB>(dst, vf, sdO);
#pragma unroll
            for (int n = 0; n < kQueryTiles; ++n) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int r = i >> 1, col = n * 8 + 2 * t + (i & 1), query = qt + col;
                    float pr = 0.f, ds = 0.f;
                    if (dense_visible(si, query, keys[r])) {
                        float z = pt[n].c[i] * p.scale;
                        if (dense_timed(si, query) && dense_timed(si, keys[r]))
                            z += tc.bias(pair_features(sTime[col], sKeyTime[key_slot[r]],
                                                       p.num_time_buckets, inv_buckets));
                        pr = expf(z - sLse[col]);
                        ds = pr * (dst[n].c[i] - sDelta[col]);
                    }
                    pt[n].c[i] = pr;
                    dst[n].c[i] = ds;
                }
            }
            probs_times_tile<T, kCols>(dv_acc, pt, sdOt, dim0);
            probs_times_tile<T, kCols>(dk_acc, dst, sQt, dim0);
        }

#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                if (keys[r] < si.end) {
                    const size_t idx = dense_row<kHeadDim>(p, keys[r], head) + dim0 + dt * 8 + 2 * t + (i & 1);
                    dk[idx] = from_float<T>(dk_acc[dt].c[i] * p.scale);
                    dv[idx] = from_float<T>(dv_acc[dt].c[i]);
                }
            }
        }
    }
}

#define SPARSECTR_DENSE_BACKWARD_KEY(NAME, T, D)                                                 \
    extern "C" __global__ void __launch_bounds__(kDenseThreads, kDenseKeyMinBlocks<D>)           \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const T* __restrict__ d_o, const float* __restrict__ lse,  \
             const float* __restrict__ delta, const float* __restrict__ coeffs,                  \
             const unsigned* __restrict__ rel_time, const SeqInfo* __restrict__ seqs,            \
             const int* __restrict__ weekday0, T* __restrict__ dk, T* __restrict__ dv,           \
             const int* __restrict__ tiles) {                                                    \
        dense_backward_key<T, D>(p, q, k, v, d_o, lse, delta, coeffs, rel_time, seqs, weekday0,  \
                                 dk, dv, tiles);                                                        \
    }
