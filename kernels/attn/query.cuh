// Everything a query needs to know before visiting its keys, shared by forward and backward.
#pragma once

#include "../common/dtype.cuh"
#include "../common/params.cuh"
#include "../common/warp.cuh"
#include "branches.cuh"

// Builds the query's view of its sequence and chunks. Warp-collective (all 32 lanes, same
// token): the completed chunks are counted by the lanes together. `*seq_index` gets the sequence.
__device__ __forceinline__ QueryInfo make_query_info(const EvoParams& p,
                                                     const SeqInfo* __restrict__ seqs,
                                                     const int* __restrict__ chunk_ends,
                                                     const int* __restrict__ chunk_counts,
                                                     int token, int* seq_index) {
    const int lane = threadIdx.x % kWarpSize;
    const int s = find_seq(seqs, p.num_seqs, token);
    QueryInfo qi;
    qi.seq = seqs[s];
    qi.token = token;
    qi.candidate = token >= qi.seq.candidates;
    qi.user = token < qi.seq.behaviors;
    qi.visible_end = qi.candidate ? qi.seq.candidates : token + 1;
    qi.chunk_base = s * p.max_chunks;
    qi.num_chunks = chunk_counts[s];
    // Chunks are few (P): each lane tests some, a warp sum counts the completed ones.
    int completed = 0;
    for (int k = lane; k < qi.num_chunks; k += kWarpSize)
        completed += chunk_ends[qi.chunk_base + k] <= qi.visible_end ? 1 : 0;
    qi.completed = warp_sum(completed);
    *seq_index = s;
    return qi;
}

// Gate of branch b for (token, head) at `index = (token * H + head) * 3 + b`: native dtype, f32,
// or 1 when absent.
template <typename T>
__device__ __forceinline__ float load_gate(const EvoParams& p, const void* gates, size_t index) {
    if (p.gates_mode == kGatesNative) return to_float(static_cast<const T*>(gates)[index]);
    if (p.gates_mode == kGatesF32) return static_cast<const float*>(gates)[index];
    return 1.f;
}

// The (token, head) a warp works on. Grid (ceil(T / kWarps), H): 32-bit indices, no 64-bit
// division. Warps past the end work on the last token and store nothing (`active` false), so
// every warp reaches the warp collectives; an early return there made ptxas spill.
struct TokenWarp {
    int warp, lane, head, token;
    bool active;
    size_t row;      // (token * H + head) * D: the token's row of Q, K, V, O
    size_t lse_row;  // (token * H + head) * 3: its entries of gates and LSE
};

template <int kWarps, int kHeadDim>
__device__ __forceinline__ TokenWarp token_warp(const EvoParams& p) {
    TokenWarp tw;
    tw.warp = threadIdx.x / kWarpSize;
    tw.lane = threadIdx.x % kWarpSize;
    tw.head = blockIdx.y;
    const int token = static_cast<int>(blockIdx.x) * kWarps + tw.warp;
    tw.active = token < p.num_tokens;
    tw.token = min(token, p.num_tokens - 1);
    tw.row = (static_cast<size_t>(tw.token) * p.heads + tw.head) * kHeadDim;
    tw.lse_row = (static_cast<size_t>(tw.token) * p.heads + tw.head) * kNumBranches;
    return tw;
}
