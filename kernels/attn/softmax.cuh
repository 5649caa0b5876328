// One branch's attention for one (query, head), computed by one warp with an online softmax:
// lanes take 32 keys at a time for the logits, then lanes take head dimensions for P V.
#pragma once

#include "../common/dtype.cuh"
#include "../common/warp.cuh"
#include "temporal.cuh"
#include "branches.cuh"

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// The tensors a branch reads.
template <typename T>
struct KeyTensors {
    const T* __restrict__ k;
    const T* __restrict__ v;
    const float* __restrict__ kbar;  // chunk summaries are f32 whatever T is (pooling.cu)
    const float* __restrict__ vbar;
    const int* __restrict__ chunk_ends;
    const unsigned* __restrict__ rel_time;
};

// Rows of a key, token (T) or summary (f32), at element offset `at` = (row * H + head) * D.
template <typename T, int kHeadDim>
__device__ __forceinline__ float dot_key(const KeyTensors<T>& kt, bool summary, size_t at,
                                         const float* sVec) {
    return summary ? dot_row<float, kHeadDim>(kt.kbar + at, sVec)
                   : dot_row<T, kHeadDim>(kt.k + at, sVec);
}

template <typename T, int kHeadDim>
__device__ __forceinline__ float dot_value(const KeyTensors<T>& kt, bool summary, size_t at,
                                           const float* sVec) {
    return summary ? dot_row<float, kHeadDim>(kt.vbar + at, sVec)
                   : dot_row<T, kHeadDim>(kt.v + at, sVec);
}

template <typename T>
__device__ __forceinline__ float key_elem(const KeyTensors<T>& kt, bool summary, size_t i) {
    return summary ? kt.kbar[i] : to_float(kt.k[i]);
}

template <typename T>
__device__ __forceinline__ float value_elem(const KeyTensors<T>& kt, bool summary, size_t i) {
    return summary ? kt.vbar[i] : to_float(kt.v[i]);
}

// Computes O_b (into rAcc, this lane's dims lane, lane + 32, ...) and returns LSE_b; an empty key
// set gives O_b = 0 and LSE_b = -inf.
// Everything about one (query, head) that the branches share.
template <typename T>
struct QueryContext {
    QueryInfo qi;
    const EvoParams* p;
    int head;
    KeyTensors<T> kt;
    const float* sQ;  // (kHeadDim): the query times the scale, in shared memory
    unsigned tq;      // the query's relative time
    int weekday0;
    TemporalCoeffs coeffs;
};

template <typename T, int kHeadDim, typename Branch>
__device__ __forceinline__ float attend_branch(const QueryContext<T>& ctx, float (&rAcc)[kHeadDim / kWarpSize]) {
    const QueryInfo& qi = ctx.qi;
    const EvoParams& p = *ctx.p;
    const KeyTensors<T>& kt = ctx.kt;
    const int head = ctx.head;
    constexpr int kPerLane = kHeadDim / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) rAcc[i] = 0.f;
    float running_max = neg_inf(), running_sum = 0.f;
    const int num_slots = Branch::num_slots(qi, p);
    for (int base = 0; base < num_slots; base += kWarpSize) {
        const int s = base + lane;
        KeySlot key = s < num_slots ? Branch::slot(qi, p, s, kt.chunk_ends, kt.rel_time) : masked_slot();
        float z = neg_inf();
        if (key.row >= 0) {
            const size_t at = (static_cast<size_t>(key.row) * p.heads + head) * kHeadDim;
            z = dot_key<T, kHeadDim>(kt, key.summary, at, ctx.sQ);
            if (key.timed)
                z += ctx.coeffs.bias(temporal_features(ctx.tq, key.time, ctx.weekday0, p.num_time_buckets));
        }
        // Branch-free: an empty prefix (new_max = -inf) leaves sum and accumulators at zero.
        const float new_max = fmaxf(running_max, warp_max(z));
        const float prob = key.row >= 0 ? expf(z - new_max) : 0.f;
        const float correction = running_max == neg_inf() ? 0.f : expf(running_max - new_max);
        running_sum = running_sum * correction + warp_sum(prob);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) rAcc[i] *= correction;
        // Visit only the lanes that hold a key; the mask is the same in every lane.
        unsigned valid = __ballot_sync(kFullMask, key.row >= 0);
        while (valid != 0u) {
            const int j = __ffs(valid) - 1;
            valid &= valid - 1u;
            const int row = __shfl_sync(kFullMask, key.row, j);
            const float pj = __shfl_sync(kFullMask, prob, j);
            const bool summary = __shfl_sync(kFullMask, static_cast<int>(key.summary), j) != 0;
            const size_t at = (static_cast<size_t>(row) * p.heads + head) * kHeadDim + lane;
#pragma unroll
            for (int i = 0; i < kPerLane; ++i)
                rAcc[i] = fmaf(pj, value_elem(kt, summary, at + i * kWarpSize), rAcc[i]);
        }
        running_max = new_max;
    }
    if (running_sum == 0.f) return neg_inf();
    const float inv = __frcp_rn(running_sum);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) rAcc[i] *= inv;
    return running_max + logf(running_sum);
}
