// Backward, query side: one warp per (query, head). For each branch it visits the query's keys
// twice (the forward's key iterators): first to get dgates_b = <dO, O_b> = sum_j p_j <dO, V_j>
// from the saved LSE (no O_b is stored), then for dQ and the query's share of dcoeffs. Nothing
// is scattered: each warp writes only its own rows, so the result is the same bits every run.
//
// @instantiate SPARSECTR_BACKWARD_QUERY dtype head_dim

#include "common/dtype.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/branches.cuh"
#include "attn/query.cuh"
#include "attn/softmax.cuh"
#include "attn/pair_grad.cuh"

constexpr int kBwdQueryWarps = 4;
constexpr int kBwdQueryThreads = kBwdQueryWarps * kWarpSize;
// As in the forward: without a min-blocks hint ptxas capped registers low and spilled.
constexpr int kBwdQueryMinBlocks = 4;

// Per-lane sums of dz * features over the pairs this lane visited.
struct CoeffPartial {
    float bucket, hour, weekend;
};

// One branch: returns dgates_b; adds the branch's dQ into rDQ and dz * features into `partial`.
template <typename T, int kHeadDim, typename Branch>
__device__ __forceinline__ float branch_backward(const QueryContext<T>& ctx, const float* sDO,
                                                 float gate, float lse_b,
                                                 float (&rDQ)[kHeadDim / kWarpSize],
                                                 CoeffPartial& partial) {
    constexpr int kPerLane = kHeadDim / kWarpSize;
    const QueryInfo& qi = ctx.qi;
    const EvoParams& p = *ctx.p;
    const KeyTensors<T>& kt = ctx.kt;
    const int lane = threadIdx.x % kWarpSize;
    const int num_slots = Branch::num_slots(qi, p);

    // Pass 1: dgates_b = sum_j p_j <dO, V_j>, and the softmax mean of the features,
    // fbar = sum_j p_j f_j.
    float dgates_lane = 0.f;
    TemporalFeatures fbar{0.f, 0.f, 0.f};
    for (int base = 0; base < num_slots; base += kWarpSize) {
        const int s = base + lane;
        const KeySlot key = s < num_slots ? Branch::slot(qi, p, s, kt.chunk_ends, kt.rel_time) : masked_slot();
        if (key.row >= 0) {
            const size_t at = (static_cast<size_t>(key.row) * p.heads + ctx.head) * kHeadDim;
            float z = dot_key<T, kHeadDim>(kt, key.summary, at, ctx.sQ);
            TemporalFeatures f{0.f, 0.f, 0.f};
            if (key.timed) {
                f = temporal_features(ctx.tq, key.time, ctx.weekday0, p.num_time_buckets);
                z += ctx.coeffs.bias(f);
            }
            const float u = dot_value<T, kHeadDim>(kt, key.summary, at, sDO);
            const float pj = expf(z - lse_b);
            dgates_lane = fmaf(pj, u, dgates_lane);
            fbar.bucket = fmaf(pj, f.bucket, fbar.bucket);
            fbar.hour = fmaf(pj, f.hour, fbar.hour);
            fbar.weekend = fmaf(pj, f.weekend, fbar.weekend);
        }
    }
    const float dgates_b = warp_sum(dgates_lane);
    fbar.bucket = warp_sum(fbar.bucket);
    fbar.hour = warp_sum(fbar.hour);
    fbar.weekend = warp_sum(fbar.weekend);

    // Pass 2: dz per key, then dQ += scale dz K_j (lanes over dims) and dz * features.
    for (int base = 0; base < num_slots; base += kWarpSize) {
        const int s = base + lane;
        const KeySlot key = s < num_slots ? Branch::slot(qi, p, s, kt.chunk_ends, kt.rel_time) : masked_slot();
        float dz = 0.f;
        if (key.row >= 0) {
            const size_t at = (static_cast<size_t>(key.row) * p.heads + ctx.head) * kHeadDim;
            float z = dot_key<T, kHeadDim>(kt, key.summary, at, ctx.sQ);
            TemporalFeatures f{0.f, 0.f, 0.f};
            if (key.timed) {
                f = temporal_features(ctx.tq, key.time, ctx.weekday0, p.num_time_buckets);
                z += ctx.coeffs.bias(f);
            }
            const float u = dot_value<T, kHeadDim>(kt, key.summary, at, sDO);
            dz = pair_grad(z, lse_b, gate, u, dgates_b).dz;
            // The dz of one softmax sum to zero, so sum_j dz_j f_j = sum_j dz_j (f_j - fbar)
            // exactly. Centred, keys that share their features (ties, a day apart) add nothing
            // instead of large terms whose f32 rounding outlives their cancellation.
            partial.bucket = fmaf(dz, f.bucket - fbar.bucket, partial.bucket);
            partial.hour = fmaf(dz, f.hour - fbar.hour, partial.hour);
            partial.weekend = fmaf(dz, f.weekend - fbar.weekend, partial.weekend);
        }
        unsigned valid = __ballot_sync(kFullMask, key.row >= 0);
        while (valid != 0u) {
            const int j = __ffs(valid) - 1;
            valid &= valid - 1u;
            const int row = __shfl_sync(kFullMask, key.row, j);
            const float dzj = __shfl_sync(kFullMask, dz, j) * p.scale;
            const bool summary = __shfl_sync(kFullMask, static_cast<int>(key.summary), j) != 0;
            const size_t at = (static_cast<size_t>(row) * p.heads + ctx.head) * kHeadDim + lane;
#pragma unroll
            for (int i = 0; i < kPerLane; ++i)
                rDQ[i] = fmaf(dzj, key_elem(kt, summary, at + i * kWarpSize), rDQ[i]);
        }
    }
    return dgates_b;
}

template <typename T, int kHeadDim>
__device__ void backward_query(const EvoParams& p, const T* __restrict__ q, const KeyTensors<T>& kt,
                               const void* __restrict__ gates, const float* __restrict__ coeffs,
                               const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
                               const int* __restrict__ chunk_counts, const T* __restrict__ d_o,
                               const float* __restrict__ lse, T* __restrict__ dq,
                               float* __restrict__ dgates, float* __restrict__ coeff_partial) {
    static_assert(kHeadDim % kWarpSize == 0, "lanes split the head dimension evenly");
    constexpr int kPerLane = kHeadDim / kWarpSize;
    __shared__ float sQ[kBwdQueryWarps][kHeadDim];   // (warp, kHeadDim): scale * Q
    __shared__ float sDO[kBwdQueryWarps][kHeadDim];  // (warp, kHeadDim): dO

    const TokenWarp tw = token_warp<kBwdQueryWarps, kHeadDim>(p);
    const int warp = tw.warp, lane = tw.lane;
    int s;
    const QueryInfo qi = make_query_info(p, seqs, kt.chunk_ends, chunk_counts, tw.token, &s);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        sQ[warp][lane + i * kWarpSize] = to_float(q[tw.row + lane + i * kWarpSize]) * p.scale;
        sDO[warp][lane + i * kWarpSize] = to_float(d_o[tw.row + lane + i * kWarpSize]);
    }
    __syncwarp();

    const QueryContext<T> ctx{qi, &p, tw.head, kt, sQ[warp], kt.rel_time[tw.token], weekday0[s],
                              TemporalCoeffs{coeffs[tw.head * 3], coeffs[tw.head * 3 + 1], coeffs[tw.head * 3 + 2]}};
    float rDQ[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) rDQ[i] = 0.f;
    CoeffPartial partial{0.f, 0.f, 0.f};
    const float dg0 = branch_backward<T, kHeadDim, GlobalKeys>(
        ctx, sDO[warp], load_gate<T>(p, gates, tw.lse_row + 0), lse[tw.lse_row + 0], rDQ, partial);
    const float dg1 = branch_backward<T, kHeadDim, TransitionKeys>(
        ctx, sDO[warp], load_gate<T>(p, gates, tw.lse_row + 1), lse[tw.lse_row + 1], rDQ, partial);
    const float dg2 = branch_backward<T, kHeadDim, LocalKeys>(
        ctx, sDO[warp], load_gate<T>(p, gates, tw.lse_row + 2), lse[tw.lse_row + 2], rDQ, partial);
    const float pb = warp_sum(partial.bucket);
    const float ph = warp_sum(partial.hour);
    const float pw = warp_sum(partial.weekend);

    if (!tw.active) return;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dq[tw.row + lane + i * kWarpSize] = from_float<T>(rDQ[i]);
    if (lane < kNumBranches) {
        dgates[tw.lse_row + lane] = lane == 0 ? dg0 : (lane == 1 ? dg1 : dg2);
        // Head-major so that the reduction over tokens reads one contiguous run per head.
        const size_t at = (static_cast<size_t>(tw.head) * p.num_tokens + tw.token) * 3 + lane;
        coeff_partial[at] = lane == 0 ? pb : (lane == 1 ? ph : pw);
    }
}

#define SPARSECTR_BACKWARD_QUERY(NAME, T, D)                                                     \
    extern "C" __global__ void __launch_bounds__(kBwdQueryThreads, kBwdQueryMinBlocks)           \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const float* __restrict__ kbar,                            \
             const float* __restrict__ vbar,                                                     \
             const void* __restrict__ gates, const float* __restrict__ coeffs,                   \
             const unsigned* __restrict__ rel_time, const SeqInfo* __restrict__ seqs,            \
             const int* __restrict__ weekday0, const int* __restrict__ chunk_ends,               \
             const int* __restrict__ chunk_counts, const T* __restrict__ d_o,                    \
             const float* __restrict__ lse, T* __restrict__ dq, float* __restrict__ dgates,      \
             float* __restrict__ coeff_partial) {                                                \
        const KeyTensors<T> kt{k, v, kbar, vbar, chunk_ends, rel_time};                          \
        backward_query<T, D>(p, q, kt, gates, coeffs, seqs, weekday0, chunk_counts, d_o, lse,    \
                             dq, dgates, coeff_partial);                                         \
    }
