// Backward, key side, the user token of each sequence (16-bit inputs, beside backward_key_tc.cu):
// its dK and dV are sums over every query of the sequence, each of which sees it in its local
// window. The tensor-core query kernel leaves one partial per 64-query tile and head
// (backward_query_tc.cu: user_partial_tile; rows by attn/dense.cuh: user_partial_row); one block
// per (sequence, head) adds its sequence's partials in tile order, so the result is the same bits
// every run. The user token is in no chunk and no tail, so these are its whole gradients.
// Sequences without one write nothing.
//
// Grid: (B, H), block kUserReduceThreads.
//
// @instantiate SPARSECTR_BACKWARD_USER_REDUCE dtype16 head_dim

#include "common/dtype.cuh"
#include "common/params.cuh"
#include "attn/dense.cuh"

constexpr int kUserReduceThreads = 128;

template <typename T, int kHeadDim>
__device__ void backward_user_reduce(const EvoParams& p, const SeqInfo* __restrict__ seqs,
                                     const float* __restrict__ user_partial, T* __restrict__ dk,
                                     T* __restrict__ dv) {
    const int head = static_cast<int>(blockIdx.y);
    const int s = static_cast<int>(blockIdx.x);
    const SeqInfo seq = seqs[s];
    if (seq.behaviors == seq.start) return;  // no user token
    const int tiles = (seq.end - seq.start + kDenseRows - 1) / kDenseRows;
    const size_t row = (static_cast<size_t>(seq.start) * p.heads + head) * kHeadDim;
    for (int x = threadIdx.x; x < 2 * kHeadDim; x += kUserReduceThreads) {
        const int which = x / kHeadDim, d = x % kHeadDim;  // 0: dK / scale, 1: dV
        float sum = 0.f;
        for (int i = 0; i < tiles; ++i)
            sum += user_partial[((user_partial_row(s, seq.start, i) * p.heads + head) * 2 + which) * kHeadDim + d];
        if (which == 0) dk[row + d] = from_float<T>(sum * p.scale);
        else dv[row + d] = from_float<T>(sum);
    }
}

#define SPARSECTR_BACKWARD_USER_REDUCE(NAME, T, D)                                               \
    extern "C" __global__ void __launch_bounds__(kUserReduceThreads)                             \
        NAME(const EvoParams p, const SeqInfo* __restrict__ seqs,                                \
             const float* __restrict__ user_partial, T* __restrict__ dk, T* __restrict__ dv) {   \
        backward_user_reduce<T, D>(p, seqs, user_partial, dk, dv);                               \
    }
