// Warp-wide reductions.
#pragma once

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x on the special-function unit, one instruction; -inf gives 0. exp2f compiles to the same
// ex2.approx (its bound is 2 ulp, CUDA C++ Programming Guide) plus a scaling for subnormal
// results, which .ftz flushes to zero instead: they are below any probability the kernels keep.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu::sfu_ex2(x);  // host emulation (kernels/emu/cuda_host.h): at its bound
#endif
}

// 1 / x and log2 x on the special-function unit, one instruction each, for the once-per-row
// normalization and LSE of the tiled softmax (tile_softmax.cuh): IEEE 1 / x (__frcp_rn) and logf
// took about 20 and 40 instructions per row with their slow-path branches, three branches a
// tile. rcp.approx is within 1 ulp; lg2.approx within 2^-22 absolute near 1 and 2 ulp beyond
// (CUDA C++ Programming Guide, __log2f), far below any tolerance of SPEC section 8.
__device__ __forceinline__ float fast_rcp(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu::sfu_rcp(x);
#endif
}

__device__ __forceinline__ float fast_log2(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu::sfu_lg2(x);
#endif
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
    return x;
}

__device__ __forceinline__ int warp_sum(int x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
    return x;
}

// The sequence holding token `t < T`: the last `s` with `seqs[s].start <= t`. That is never an
// empty sequence: an empty one is followed by a sequence with the same start (or is last, with
// start T > t).
template <typename SeqInfoT>
__device__ __forceinline__ int find_seq(const SeqInfoT* __restrict__ seqs, int num_seqs, int t) {
    int lo = 0, hi = num_seqs - 1;
    while (lo < hi) {
        // lo + hi + 1 would pass i32::MAX past 2^30 sequences (empty ones cost no tokens).
        int mid = lo + ((hi - lo + 1) >> 1);
        if (seqs[mid].start <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}
