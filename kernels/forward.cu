// Fused three-branch EvoAttention forward: for each (query, head), the global, transition and
// local softmaxes with the RelTemporal bias computed in-kernel, gated and summed. One warp per
// (query, head); the warps of a block take consecutive queries of one head so that overlapping
// windows and shared tails/summaries hit L1/L2. Each branch's O_b before gating is also stored
// when `branch_out` is given (as forward_tc.cu does; the warp backward does not read them).
//
// @instantiate SPARSECTR_FORWARD dtype head_dim

#include "common/dtype.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/branches.cuh"
#include "attn/query.cuh"
#include "attn/softmax.cuh"

constexpr int kForwardWarps = 4;
constexpr int kForwardThreads = kForwardWarps * kWarpSize;
// With __launch_bounds__(128) alone, ptxas (NVRTC 13.0, sm_80 and sm_90) capped the forward at
// 56-64 registers and spilled 8-36 B; asking for 4 resident blocks allows 128 and it used 66-80
// with no spills.
constexpr int kForwardMinBlocks = 4;

// Adds gates[b] * O_b to rOut, stores O_b to `branch_out` ([T, H, 3, D]) when given (and the
// warp's token is real), and returns LSE_b.
template <typename T, int kHeadDim, typename Branch>
__device__ __forceinline__ float gated_branch(const QueryContext<T>& ctx, const void* gates,
                                              size_t lse_row, int b, bool active, T* branch_out,
                                              float (&rOut)[kHeadDim / kWarpSize]) {
    float rBranch[kHeadDim / kWarpSize];
    const float lse_b = attend_branch<T, kHeadDim, Branch>(ctx, rBranch);
    const float g = load_gate<T>(*ctx.p, gates, lse_row + b);
    const int lane = threadIdx.x % kWarpSize;
#pragma unroll
    for (int i = 0; i < kHeadDim / kWarpSize; ++i) {
        rOut[i] = fmaf(g, rBranch[i], rOut[i]);
        if (branch_out != nullptr && active)
            branch_out[(lse_row + b) * kHeadDim + lane + i * kWarpSize] = from_float<T>(rBranch[i]);
    }
    return lse_b;
}

template <typename T, int kHeadDim>
__device__ void evo_forward(const EvoParams& p, const T* __restrict__ q, const KeyTensors<T>& kt,
                            const void* __restrict__ gates, const float* __restrict__ coeffs,
                            const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
                            const int* __restrict__ chunk_counts, T* __restrict__ o,
                            float* __restrict__ lse, T* __restrict__ branch_out) {
    static_assert(kHeadDim % kWarpSize == 0, "lanes split the head dimension evenly");
    constexpr int kPerLane = kHeadDim / kWarpSize;
    __shared__ float sQ[kForwardWarps][kHeadDim];  // (warp, kHeadDim): the scaled query

    const TokenWarp tw = token_warp<kForwardWarps, kHeadDim>(p);
    const int warp = tw.warp, lane = tw.lane, head = tw.head, token = tw.token;
    const size_t row = tw.row, lse_row = tw.lse_row;

    int s;
    const QueryInfo qi = make_query_info(p, seqs, kt.chunk_ends, chunk_counts, token, &s);

#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
        sQ[warp][lane + i * kWarpSize] = to_float(q[row + lane + i * kWarpSize]) * p.scale;
    __syncwarp();

    const QueryContext<T> ctx{qi,    &p, head, kt, sQ[warp], kt.rel_time[token], weekday0[s],
                              TemporalCoeffs{coeffs[head * 3], coeffs[head * 3 + 1], coeffs[head * 3 + 2]}};
    float rOut[kPerLane];  // this lane's dims of the gated sum
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) rOut[i] = 0.f;
    const bool active = tw.active;
    const float lse_global = gated_branch<T, kHeadDim, GlobalKeys>(ctx, gates, lse_row, 0, active, branch_out, rOut);
    const float lse_transition =
        gated_branch<T, kHeadDim, TransitionKeys>(ctx, gates, lse_row, 1, active, branch_out, rOut);
    const float lse_local = gated_branch<T, kHeadDim, LocalKeys>(ctx, gates, lse_row, 2, active, branch_out, rOut);

    if (!tw.active) return;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[row + lane + i * kWarpSize] = from_float<T>(rOut[i]);
    if (lane < kNumBranches)
        lse[lse_row + lane] = lane == 0 ? lse_global : (lane == 1 ? lse_transition : lse_local);
}

#define SPARSECTR_FORWARD(NAME, T, D)                                                            \
    extern "C" __global__ void __launch_bounds__(kForwardThreads, kForwardMinBlocks)                                \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const float* __restrict__ kbar,                            \
             const float* __restrict__ vbar,                                                     \
             const void* __restrict__ gates, const float* __restrict__ coeffs,                   \
             const unsigned* __restrict__ rel_time, const SeqInfo* __restrict__ seqs,            \
             const int* __restrict__ weekday0, const int* __restrict__ chunk_ends,               \
             const int* __restrict__ chunk_counts, T* __restrict__ o, float* __restrict__ lse,   \
             T* __restrict__ branch_out) {                                                       \
        const KeyTensors<T> kt{k, v, kbar, vbar, chunk_ends, rel_time};                          \
        evo_forward<T, D>(p, q, kt, gates, coeffs, seqs, weekday0, chunk_counts, o, lse,         \
                          branch_out);                                                           \
    }
