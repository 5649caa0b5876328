// Backward, key side: the gradient of one key row (a token's K/V or a chunk summary's) in one
// branch, gathered over the queries that see it (`EvoAttention::queries` in src/attention.rs):
// two ranges of query tokens, behaviors then candidates. Lanes take 32 queries at a time for the
// logits, then lanes take head dimensions to accumulate scale dz Q and g p dO. Fixed order, no
// atomics: the same bits every run.
#pragma once

#include "../common/dtype.cuh"
#include "../common/params.cuh"
#include "../common/warp.cuh"
#include "temporal.cuh"
#include "pair_grad.cuh"
#include "query.cuh"

// Query-side tensors a key's gradient reads.
template <typename T>
struct QueryTensors {
    const T* __restrict__ q;
    const T* __restrict__ d_o;
    const float* __restrict__ lse;
    const float* __restrict__ dgates;
    const void* __restrict__ gates;
    const unsigned* __restrict__ rel_time;
};

// The key being differentiated: scale * K and V in shared memory, its time, its head.
struct KeyContext {
    const EvoParams* p;
    int head;
    const float* sK;  // (kHeadDim): scale * K
    const float* sV;  // (kHeadDim): V
    bool timed;       // false for the user token
    unsigned time;
    int weekday0;
    TemporalCoeffs coeffs;
};

// A half-open range of query tokens.
struct QueryRange {
    int begin, end;
    __device__ __forceinline__ int size() const { return max(end - begin, 0); }
};

template <typename T, int kHeadDim>
__device__ __forceinline__ void gather_key_grad(const KeyContext& kc, const QueryTensors<T>& qt,
                                                int branch, QueryRange r1, QueryRange r2,
                                                float (&rDK)[kHeadDim / kWarpSize],
                                                float (&rDV)[kHeadDim / kWarpSize]) {
    constexpr int kPerLane = kHeadDim / kWarpSize;
    const EvoParams& p = *kc.p;
    const int lane = threadIdx.x % kWarpSize;
    const int n1 = r1.size();
    const int n = n1 + r2.size();
    for (int base = 0; base < n; base += kWarpSize) {
        const int i = base + lane;
        const bool valid = i < n;
        const int q = valid ? (i < n1 ? r1.begin + i : r2.begin + (i - n1)) : -1;
        PairGrad g{0.f, 0.f};
        if (valid) {
            const size_t at = (static_cast<size_t>(q) * p.heads + kc.head) * kHeadDim;
            const size_t b_at = (static_cast<size_t>(q) * p.heads + kc.head) * kNumBranches + branch;
            float z = dot_row<T, kHeadDim>(qt.q + at, kc.sK);
            if (kc.timed)
                z += kc.coeffs.bias(temporal_features(qt.rel_time[q], kc.time, kc.weekday0, p.num_time_buckets));
            const float u = dot_row<T, kHeadDim>(qt.d_o + at, kc.sV);
            g = pair_grad(z, qt.lse[b_at], load_gate<T>(p, qt.gates, b_at), u, qt.dgates[b_at]);
        }
        unsigned lanes = __ballot_sync(kFullMask, valid);
        while (lanes != 0u) {
            const int j = __ffs(lanes) - 1;
            lanes &= lanes - 1u;
            const int qj = __shfl_sync(kFullMask, q, j);
            const float dz = __shfl_sync(kFullMask, g.dz, j) * p.scale;
            const float gp = __shfl_sync(kFullMask, g.gp, j);
            const size_t at = (static_cast<size_t>(qj) * p.heads + kc.head) * kHeadDim;
#pragma unroll
            for (int d = 0; d < kPerLane; ++d) {
                rDK[d] = fmaf(dz, to_float(qt.q[at + lane + d * kWarpSize]), rDK[d]);
                rDV[d] = fmaf(gp, to_float(qt.d_o[at + lane + d * kWarpSize]), rDV[d]);
            }
        }
    }
}
