// dcoeffs[h] = sum over every (query, key) pair of dz * (Bk, Hr, Wk): the backward query kernel
// leaves one partial per (head, token); one block per head adds them in a fixed order (f64
// accumulators, a fixed tree), so the result is the same bits every run and stays accurate over
// a million tokens.
//
// @instantiate SPARSECTR_COEFFS_REDUCE

#include "common/params.cuh"

constexpr int kReduceThreads = 256;

__device__ void coeffs_reduce(const EvoParams& p, const float* __restrict__ partial,
                              float* __restrict__ dcoeffs) {
    __shared__ double sSum[3][kReduceThreads];
    const int head = blockIdx.x;
    const float* rows = partial + static_cast<size_t>(head) * p.num_tokens * 3;
    double acc[3] = {0.0, 0.0, 0.0};
    for (int t = threadIdx.x; t < p.num_tokens; t += kReduceThreads) {
#pragma unroll
        for (int x = 0; x < 3; ++x) acc[x] += rows[static_cast<size_t>(t) * 3 + x];
    }
#pragma unroll
    for (int x = 0; x < 3; ++x) sSum[x][threadIdx.x] = acc[x];
    __syncthreads();
    for (int stride = kReduceThreads / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
#pragma unroll
            for (int x = 0; x < 3; ++x) sSum[x][threadIdx.x] += sSum[x][threadIdx.x + stride];
        }
        __syncthreads();
    }
    if (threadIdx.x < 3) dcoeffs[head * 3 + threadIdx.x] = static_cast<float>(sSum[threadIdx.x][0]);
}

#define SPARSECTR_COEFFS_REDUCE(NAME)                                                            \
    extern "C" __global__ void __launch_bounds__(kReduceThreads)                                 \
        NAME(const EvoParams p, const float* __restrict__ partial, float* __restrict__ dcoeffs) { \
        coeffs_reduce(p, partial, dcoeffs);                                                      \
    }
