// Personalized time-aware chunking on the GPU (SPEC section 2), identical cuts to
// `Chunks::personalized`: one block per sequence cuts after the P - 1 largest positive gaps.
//
// Each gap i gets the unique key (gap << 32) | (2^32 - 1 - i), so "larger key" means "larger
// gap, then earlier gap", exactly the CPU order. A radix select (8 passes of 8 bits) finds the
// (P - 1)-th largest key; every positive gap whose key is at least that is cut. Cuts are
// written in time order by a block-wide scan.
//
// @instantiate SPARSECTR_CHUNKING

#include "common/params.cuh"
#include "common/warp.cuh"

constexpr int kChunkThreads = 256;
constexpr int kChunkWarps = kChunkThreads / kWarpSize;
constexpr int kRadixBins = 256;

__device__ __forceinline__ unsigned long long gap_key(unsigned gap, int i) {
    return (static_cast<unsigned long long>(gap) << 32) | (0xffffffffu - static_cast<unsigned>(i));
}

// Block-wide sum; every thread gets the total.
__device__ int block_sum(int x, int* sScratch) {
    x = warp_sum(x);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    __syncthreads();  // sScratch may still be read from a previous call
    if (lane == 0) sScratch[warp] = x;
    __syncthreads();
    int total = 0;
#pragma unroll
    for (int w = 0; w < kChunkWarps; ++w) total += sScratch[w];
    return total;
}

// Block-wide exclusive scan of one flag per thread: returns this thread's rank among the set
// flags before it, and the block's total in *total.
__device__ int block_rank(bool flag, int* sScratch, int* total) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const unsigned ballot = __ballot_sync(kFullMask, flag);
    const int in_warp = __popc(ballot & ((1u << lane) - 1u));
    __syncthreads();
    if (lane == 0) sScratch[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, all = 0;
#pragma unroll
    for (int w = 0; w < kChunkWarps; ++w) {
        before += w < warp ? sScratch[w] : 0;
        all += sScratch[w];
    }
    *total = all;
    return before + in_warp;
}

__device__ void chunk_sequence(const EvoParams& p, const unsigned* __restrict__ rel_time,
                             const SeqInfo* __restrict__ seqs, int* __restrict__ chunk_ends,
                             int* __restrict__ chunk_counts) {
    __shared__ int sScratch[kChunkWarps];
    __shared__ unsigned sHist[kRadixBins];
    __shared__ unsigned long long sPrefix;
    __shared__ int sRemaining;

    const int s = blockIdx.x;
    const SeqInfo seq = seqs[s];
    const int n = seq.candidates - seq.behaviors;
    int* ends = chunk_ends + static_cast<size_t>(s) * p.max_chunks;
    if (n == 0) {
        if (threadIdx.x == 0) chunk_counts[s] = 0;
        return;
    }
    const int num_gaps = n - 1;
    const unsigned* t = rel_time + seq.behaviors;

    int positive = 0;
    for (int i = threadIdx.x; i < num_gaps; i += kChunkThreads) positive += t[i + 1] > t[i] ? 1 : 0;
    positive = block_sum(positive, sScratch);
    const int want = min(p.max_chunks - 1, positive);

    // Cut gap i iff it is positive and its key is >= threshold.
    unsigned long long threshold;
    if (want == 0) {
        threshold = ~0ull;  // above every key: no cut
    } else if (want == positive) {
        threshold = 0ull;  // every positive gap
    } else {
        if (threadIdx.x == 0) {
            sPrefix = 0ull;
            sRemaining = want;
        }
        for (int shift = 56; shift >= 0; shift -= 8) {
            for (int b = threadIdx.x; b < kRadixBins; b += kChunkThreads) sHist[b] = 0u;
            __syncthreads();
            const unsigned long long high = shift == 56 ? 0ull : (~0ull << (shift + 8));
            const unsigned long long prefix = sPrefix;
            for (int i = threadIdx.x; i < num_gaps; i += kChunkThreads) {
                if (t[i + 1] <= t[i]) continue;
                const unsigned long long key = gap_key(t[i + 1] - t[i], i);
                if ((key & high) == (prefix & high))
                    atomicAdd(&sHist[(key >> shift) & (kRadixBins - 1)], 1u);
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                // Walk bins from the largest: the bin where the running count reaches
                // `remaining` holds the wanted key.
                int remaining = sRemaining;
                int bin = kRadixBins - 1;
                for (; bin > 0; --bin) {
                    if (static_cast<int>(sHist[bin]) >= remaining) break;
                    remaining -= static_cast<int>(sHist[bin]);
                }
                sRemaining = remaining;
                sPrefix = prefix | (static_cast<unsigned long long>(bin) << shift);
            }
            __syncthreads();
        }
        threshold = sPrefix;
    }

    int written = 0;
    for (int base = 0; base < num_gaps; base += kChunkThreads) {
        const int i = base + threadIdx.x;
        const bool cut = i < num_gaps && t[i + 1] > t[i] && gap_key(t[i + 1] - t[i], i) >= threshold;
        int total;
        const int rank = block_rank(cut, sScratch, &total);
        if (cut) ends[written + rank] = seq.behaviors + i + 1;
        written += total;
    }
    if (threadIdx.x == 0) {
        ends[written] = seq.candidates;
        chunk_counts[s] = written + 1;
    }
}

#define SPARSECTR_CHUNKING(NAME)                                                               \
    extern "C" __global__ void __launch_bounds__(kChunkThreads)                                \
        NAME(const EvoParams p, const unsigned* __restrict__ rel_time,                         \
             const SeqInfo* __restrict__ seqs, int* __restrict__ chunk_ends,                   \
             int* __restrict__ chunk_counts) {                                                 \
        chunk_sequence(p, rel_time, seqs, chunk_ends, chunk_counts);                           \
    }
