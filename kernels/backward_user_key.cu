// Backward, key side, the user token of each sequence (16-bit inputs, beside backward_key_tc.cu):
// one warp per (sequence, head) gathers its dK and dV over every query of the local branch, all
// behaviors then all candidates, with backward_key.cu's warp gather. A row that every query sees
// would cost the tensor-core kernel a walk over the whole sequence for one useful row. The user
// token is in no chunk and no tail. Sequences without one write nothing.
//
// Grid: (ceil(B / kUserKeyWarps), H), block kUserKeyWarps * 32.
//
// @instantiate SPARSECTR_BACKWARD_USER_KEY dtype16 head_dim

#include "common/dtype.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/query.cuh"
#include "attn/key_gather.cuh"

constexpr int kUserKeyWarps = 4;
constexpr int kUserKeyThreads = kUserKeyWarps * kWarpSize;
// As backward_key.cu: without a minimum, ptxas (NVRTC 13.0) capped D = 64 at 48 registers and
// spilled.
constexpr int kUserKeyMinBlocks = 4;

template <typename T, int kHeadDim>
__device__ void backward_user_key(const EvoParams& p, const QueryTensors<T>& qt, const T* __restrict__ k,
                                  const T* __restrict__ v, const float* __restrict__ coeffs,
                                  const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
                                  T* __restrict__ dk, T* __restrict__ dv) {
    constexpr int kPerLane = kHeadDim / kWarpSize;
    __shared__ float sK[kUserKeyWarps][kHeadDim];  // (warp, kHeadDim): scale * K
    __shared__ float sV[kUserKeyWarps][kHeadDim];  // (warp, kHeadDim): V
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int head = static_cast<int>(blockIdx.y);
    // Warps past the last sequence, or of a sequence with no user token, gather over no query
    // and store nothing: an early return before the gather's collectives made ptxas spill.
    const int s_raw = static_cast<int>(blockIdx.x) * kUserKeyWarps + warp;
    const int s = min(s_raw, p.num_seqs - 1);
    const SeqInfo seq = seqs[s];
    const bool active = s_raw < p.num_seqs && seq.behaviors > seq.start;
    const int j = min(seq.start, p.num_tokens - 1);
    const size_t row = (static_cast<size_t>(j) * p.heads + head) * kHeadDim;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        sK[warp][lane + i * kWarpSize] = to_float(k[row + lane + i * kWarpSize]) * p.scale;
        sV[warp][lane + i * kWarpSize] = to_float(v[row + lane + i * kWarpSize]);
    }
    __syncwarp();
    const KeyContext kc{&p, head, sK[warp], sV[warp], false, qt.rel_time[j], weekday0[s],
                        TemporalCoeffs{coeffs[head * 3], coeffs[head * 3 + 1], coeffs[head * 3 + 2]}};
    float rDK[kPerLane], rDV[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) rDK[i] = rDV[i] = 0.f;
    const QueryRange none{0, 0};
    gather_key_grad<T, kHeadDim>(kc, qt, 2, active ? QueryRange{seq.behaviors, seq.candidates} : none,
                                 active ? QueryRange{seq.candidates, seq.end} : none, rDK, rDV);
    if (!active) return;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        dk[row + lane + i * kWarpSize] = from_float<T>(rDK[i]);
        dv[row + lane + i * kWarpSize] = from_float<T>(rDV[i]);
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
