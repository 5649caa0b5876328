// Backward, key side for tokens: one warp per (token, head) gathers dK and dV over every use of
// the token as a key: the local branch (the queries of the next w positions, candidates when it
// is among the last w - 1 behaviors, a candidate itself; the user token for all queries), the
// transition branch when it is a tail token (every later behavior and every candidate), and its
// chunk's summary gradient divided by the chunk size (a summary is a mean of its members).
//
// @instantiate SPARSECTR_BACKWARD_KEY dtype head_dim

#include "common/dtype.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/query.cuh"
#include "attn/key_gather.cuh"

constexpr int kBwdKeyWarps = 4;
constexpr int kBwdKeyThreads = kBwdKeyWarps * kWarpSize;
constexpr int kBwdKeyMinBlocks = 4;

template <typename T, int kHeadDim>
__device__ void backward_key(const EvoParams& p, const QueryTensors<T>& qt, const T* __restrict__ k,
                             const T* __restrict__ v, const float* __restrict__ coeffs,
                             const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
                             const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,
                             const float* __restrict__ dkbar, const float* __restrict__ dvbar,
                             T* __restrict__ dk, T* __restrict__ dv) {
    constexpr int kPerLane = kHeadDim / kWarpSize;
    __shared__ float sK[kBwdKeyWarps][kHeadDim];  // (warp, kHeadDim): scale * K
    __shared__ float sV[kBwdKeyWarps][kHeadDim];  // (warp, kHeadDim): V
    const TokenWarp tw = token_warp<kBwdKeyWarps, kHeadDim>(p);
    const int warp = tw.warp, lane = tw.lane, j = tw.token;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        sK[warp][lane + i * kWarpSize] = to_float(k[tw.row + lane + i * kWarpSize]) * p.scale;
        sV[warp][lane + i * kWarpSize] = to_float(v[tw.row + lane + i * kWarpSize]);
    }
    __syncwarp();

    const int s = find_seq(seqs, p.num_seqs, j);
    const SeqInfo seq = seqs[s];
    const bool user = j < seq.behaviors;
    const bool candidate = j >= seq.candidates;
    const bool behavior = !user && !candidate;
    const KeyContext kc{&p, tw.head, sK[warp], sV[warp], !user, qt.rel_time[j], weekday0[s],
                        TemporalCoeffs{coeffs[tw.head * 3], coeffs[tw.head * 3 + 1], coeffs[tw.head * 3 + 2]}};
    float rDK[kPerLane], rDV[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) rDK[i] = rDV[i] = 0.f;

    // Local branch. Candidates see the last w - 1 behaviors, i.e. behaviors j with j + w > end.
    const QueryRange all_candidates{seq.candidates, seq.end};
    const QueryRange none{0, 0};
    QueryRange local_behaviors, local_candidates;
    if (user) {
        local_behaviors = QueryRange{seq.behaviors, seq.candidates};
        local_candidates = all_candidates;
    } else if (behavior) {
        // j + w may exceed int range only if w were huge; the host clamps w to n + 1.
        local_behaviors = QueryRange{j, min(j + p.window, seq.candidates)};
        local_candidates = j + p.window > seq.candidates ? all_candidates : none;
    } else {
        local_behaviors = QueryRange{j, j + 1};  // a candidate sees itself
        local_candidates = none;
    }
    gather_key_grad<T, kHeadDim>(kc, qt, 2, local_behaviors, local_candidates, rDK, rDV);

    // The behavior's chunk: the lanes count the chunks that end at or before it.
    const int chunk_base = s * p.max_chunks;
    const int num_chunks = chunk_counts[s];
    int before = 0;
    for (int c = lane; c < num_chunks; c += kWarpSize) before += chunk_ends[chunk_base + c] <= j ? 1 : 0;
    const int chunk = min(warp_sum(before), max(num_chunks - 1, 0));
    const int start = chunk == 0 ? seq.behaviors : chunk_ends[chunk_base + chunk - 1];
    const int end = num_chunks > 0 ? chunk_ends[chunk_base + chunk] : seq.behaviors;

    // Transition branch: a tail token is seen by itself, every later behavior and every candidate.
    const bool tail = behavior && j >= max(start, end - p.tail_tokens);
    gather_key_grad<T, kHeadDim>(kc, qt, 1, tail ? QueryRange{j, seq.candidates} : none,
                                 tail ? all_candidates : none, rDK, rDV);

    if (!tw.active) return;
    // Global branch through the summary: d(mean)/d(member) = 1 / |C|.
    if (behavior) {
        const float inv = 1.f / static_cast<float>(end - start);
        const size_t at = (static_cast<size_t>(chunk_base + chunk) * p.heads + tw.head) * kHeadDim;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            rDK[i] = fmaf(dkbar[at + lane + i * kWarpSize], inv, rDK[i]);
            rDV[i] = fmaf(dvbar[at + lane + i * kWarpSize], inv, rDV[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        dk[tw.row + lane + i * kWarpSize] = from_float<T>(rDK[i]);
        dv[tw.row + lane + i * kWarpSize] = from_float<T>(rDV[i]);
    }
}

#define SPARSECTR_BACKWARD_KEY(NAME, T, D)                                                       \
    extern "C" __global__ void __launch_bounds__(kBwdKeyThreads, kBwdKeyMinBlocks)               \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const void* __restrict__ gates,                            \
             const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,            \
             const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,                 \
             const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,           \
             const T* __restrict__ d_o, const float* __restrict__ lse,                           \
             const float* __restrict__ dgates, const float* __restrict__ dkbar,                  \
             const float* __restrict__ dvbar, T* __restrict__ dk, T* __restrict__ dv) {          \
        const QueryTensors<T> qt{q, d_o, lse, dgates, gates, rel_time};                          \
        backward_key<T, D>(p, qt, k, v, coeffs, seqs, weekday0, chunk_ends, chunk_counts,        \
                           dkbar, dvbar, dk, dv);                                                \
    }
