// Backward of the chunk summaries: one warp per (chunk slot, head) gathers dKbar and dVbar over
// the queries that see the chunk in the global branch: behaviors from the chunk's last one on,
// and every candidate. Results stay f32; the key kernel spreads them over the members.
//
// @instantiate SPARSECTR_BACKWARD_SUMMARY dtype head_dim

#include "common/dtype.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/query.cuh"
#include "attn/key_gather.cuh"

constexpr int kBwdSummaryWarps = 4;
constexpr int kBwdSummaryThreads = kBwdSummaryWarps * kWarpSize;
constexpr int kBwdSummaryMinBlocks = 4;

template <typename T, int kHeadDim>
__device__ void backward_summary(const EvoParams& p, const QueryTensors<T>& qt,
                                 const float* __restrict__ kbar, const float* __restrict__ vbar,
                                 const float* __restrict__ coeffs, const SeqInfo* __restrict__ seqs,
                                 const int* __restrict__ weekday0, const int* __restrict__ chunk_ends,
                                 const int* __restrict__ chunk_counts, float* __restrict__ dkbar,
                                 float* __restrict__ dvbar) {
    constexpr int kPerLane = kHeadDim / kWarpSize;
    __shared__ float sK[kBwdSummaryWarps][kHeadDim];  // (warp, kHeadDim): scale * Kbar
    __shared__ float sV[kBwdSummaryWarps][kHeadDim];  // (warp, kHeadDim): Vbar
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int head = blockIdx.y;
    const int num_slots = p.num_seqs * p.max_chunks;
    const int slot = min(static_cast<int>(blockIdx.x) * kBwdSummaryWarps + warp, num_slots - 1);
    const int s = slot / p.max_chunks;
    const int k = slot - s * p.max_chunks;
    // Slots past the end or past the sequence's chunks gather nothing and store nothing.
    const bool active = static_cast<int>(blockIdx.x) * kBwdSummaryWarps + warp < num_slots &&
                        k < chunk_counts[s];
    const SeqInfo seq = seqs[s];
    const int last = active ? chunk_ends[slot] - 1 : 0;
    const size_t row = (static_cast<size_t>(slot) * p.heads + head) * kHeadDim;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        sK[warp][lane + i * kWarpSize] = active ? kbar[row + lane + i * kWarpSize] * p.scale : 0.f;
        sV[warp][lane + i * kWarpSize] = active ? vbar[row + lane + i * kWarpSize] : 0.f;
    }
    __syncwarp();
    const KeyContext kc{&p, head, sK[warp], sV[warp], true, active ? qt.rel_time[last] : 0u, weekday0[s],
                        TemporalCoeffs{coeffs[head * 3], coeffs[head * 3 + 1], coeffs[head * 3 + 2]}};
    float rDK[kPerLane], rDV[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) rDK[i] = rDV[i] = 0.f;
    const QueryRange behaviors{last, active ? seq.candidates : last};
    const QueryRange candidates{seq.candidates, active ? seq.end : seq.candidates};
    gather_key_grad<T, kHeadDim>(kc, qt, 0, behaviors, candidates, rDK, rDV);
    if (!active) return;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        dkbar[row + lane + i * kWarpSize] = rDK[i];
        dvbar[row + lane + i * kWarpSize] = rDV[i];
    }
}

#define SPARSECTR_BACKWARD_SUMMARY(NAME, T, D)                                                   \
    extern "C" __global__ void __launch_bounds__(kBwdSummaryThreads, kBwdSummaryMinBlocks)       \
        NAME(const EvoParams p, const T* __restrict__ q, const float* __restrict__ kbar,         \
             const float* __restrict__ vbar, const void* __restrict__ gates,                     \
             const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,            \
             const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,                 \
             const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,           \
             const T* __restrict__ d_o, const float* __restrict__ lse,                           \
             const float* __restrict__ dgates, float* __restrict__ dkbar,                        \
             float* __restrict__ dvbar) {                                                        \
        const QueryTensors<T> qt{q, d_o, lse, dgates, gates, rel_time};                          \
        backward_summary<T, D>(p, qt, kbar, vbar, coeffs, seqs, weekday0, chunk_ends,            \
                               chunk_counts, dkbar, dvbar);                                      \
    }
