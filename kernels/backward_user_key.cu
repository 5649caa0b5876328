// Backward, key side, the user token of each sequence (16-bit inputs, beside backward_key_tc.cu):
// one block per (sequence, head) gathers its dK and dV over every query of the local branch, all
// behaviors then all candidates, with backward_key.cu's warp gather. A row that every query sees
// would cost the tensor-core kernel a walk over the whole sequence for one useful row. The user
// token is in no chunk and no tail. Sequences without one write nothing.
//
// The block's kUserKeyWarps warps take consecutive slices of the sequence's queries and their
// sums are added in warp order, so the result is the same on every run. One warp per (sequence,
// head) walked whole sequences alone: 2048 warps at ctr-base n = 4096 (1.65 ms in ncu, 22%
// achieved occupancy) and a quarter of that at n = 16384, each 4 times longer.
//
// Grid: (B, H), block kUserKeyWarps * 32.
//
// @instantiate SPARSECTR_BACKWARD_USER_KEY dtype16 head_dim

#include "common/dtype.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/query.cuh"
#include "attn/key_gather.cuh"

constexpr int kUserKeyWarps = 16;
constexpr int kUserKeyThreads = kUserKeyWarps * kWarpSize;
// NVRTC 13.0 (sm_90) then uses 64 registers at D = 64 (two blocks per SM) and 68 at D = 128; a
// minimum of two blocks made D = 32 spill 8-12 B.
constexpr int kUserKeyMinBlocks = 1;

template <typename T, int kHeadDim>
__device__ void backward_user_key(const EvoParams& p, const QueryTensors<T>& qt, const T* __restrict__ k,
                                  const T* __restrict__ v, const float* __restrict__ coeffs,
                                  const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
                                  T* __restrict__ dk, T* __restrict__ dv) {
    constexpr int kPerLane = kHeadDim / kWarpSize;
    __shared__ float sK[kHeadDim];  // scale * K of the user token
    __shared__ float sV[kHeadDim];
    __shared__ float sDK[kUserKeyWarps][kHeadDim];  // each warp's sums, added in warp order
    __shared__ float sDV[kUserKeyWarps][kHeadDim];
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int head = static_cast<int>(blockIdx.y);
    const int s = static_cast<int>(blockIdx.x);
    const SeqInfo seq = seqs[s];
    // A sequence with no user token gathers over no query and stores nothing (no early return:
    // the block's barriers come after).
    const bool active = seq.behaviors > seq.start;
    const int j = min(seq.start, p.num_tokens - 1);
    const size_t row = (static_cast<size_t>(j) * p.heads + head) * kHeadDim;
    for (int d = threadIdx.x; d < kHeadDim; d += kUserKeyThreads) {
        sK[d] = to_float(k[row + d]) * p.scale;
        sV[d] = to_float(v[row + d]);
    }
    __syncthreads();
    const KeyContext kc{&p, head, sK, sV, false, qt.rel_time[j], weekday0[s],
                        TemporalCoeffs{coeffs[head * 3], coeffs[head * 3 + 1], coeffs[head * 3 + 2]}};
    // This warp's slice [a, b) of the queries, behaviors [behaviors, candidates) then candidates
    // [candidates, end): whole groups of 32 but the last.
    const int n1 = active ? seq.candidates - seq.behaviors : 0;
    const int n = active ? seq.end - seq.behaviors : 0;
    const int per_warp = (n + kUserKeyWarps * kWarpSize - 1) / (kUserKeyWarps * kWarpSize) * kWarpSize;
    const int a = min(warp * per_warp, n), b = min(a + per_warp, n);
    const QueryRange beh{seq.behaviors + min(a, n1), seq.behaviors + min(b, n1)};
    const QueryRange cand{seq.candidates + max(a - n1, 0), seq.candidates + max(b - n1, 0)};
    float rDK[kPerLane], rDV[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) rDK[i] = rDV[i] = 0.f;
    gather_key_grad<T, kHeadDim>(kc, qt, 2, beh, cand, rDK, rDV);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        sDK[warp][lane + i * kWarpSize] = rDK[i];
        sDV[warp][lane + i * kWarpSize] = rDV[i];
    }
    __syncthreads();
    if (!active) return;
    for (int d = threadIdx.x; d < 2 * kHeadDim; d += kUserKeyThreads) {
        const float(*part)[kHeadDim] = d < kHeadDim ? sDK : sDV;
        const int e = d % kHeadDim;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kUserKeyWarps; ++w) sum += part[w][e];
        (d < kHeadDim ? dk : dv)[row + e] = from_float<T>(sum);
    }
}

#define SPARSECTR_BACKWARD_USER_KEY(NAME, T, D)                                                  \
    extern "C" __global__ void __launch_bounds__(kUserKeyThreads, kUserKeyMinBlocks)                                \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const void* __restrict__ gates,                            \
             const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,            \
             const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,                 \
             const T* __restrict__ d_o, const float* __restrict__ lse,                           \
             const float* __restrict__ dgates, T* __restrict__ dk, T* __restrict__ dv) {         \
        const QueryTensors<T> qt{q, d_o, lse, dgates, gates, rel_time};                          \
        backward_user_key<T, D>(p, qt, k, v, coeffs, seqs, weekday0, dk, dv);                    \
    }
