// Which keys a query sees in each branch (SPEC section 3), the CUDA twin of
// `EvoAttention::keys` in src/attention.rs. Each branch numbers its keys with dense "slots" so a
// warp can resolve 32 of them at once; a slot that falls outside the key set resolves to row -1.
#pragma once

#include "../common/params.cuh"

// One key: a row of K/V (a token) or of Kbar/Vbar (a chunk summary), and its time if it has one.
struct KeySlot {
    int row;  // -1: masked
    bool summary;
    bool timed;  // false for the user token, whose bias is 0
    unsigned time;
};

__device__ __forceinline__ KeySlot masked_slot() { return KeySlot{-1, false, false, 0u}; }

// What every branch needs to know about the query.
struct QueryInfo {
    SeqInfo seq;
    int token;
    bool candidate;
    bool user;          // the user token: it sees nothing in any branch
    int visible_end;    // behaviors below this index are in the query's past
    int chunk_base;     // seq * P: first slot of this sequence in the chunk arrays
    int num_chunks;     // chunks of this sequence
    int completed;      // chunks whose last behavior is below visible_end
};

// First behavior of chunk k of the query's sequence.
__device__ __forceinline__ int chunk_start(const QueryInfo& qi, const int* __restrict__ chunk_ends,
                                           int k) {
    return k == 0 ? qi.seq.behaviors : chunk_ends[qi.chunk_base + k - 1];
}

// Global branch: the summaries of completed chunks.
struct GlobalKeys {
    __device__ __forceinline__ static int num_slots(const QueryInfo& qi, const EvoParams&) {
        return qi.user ? 0 : qi.completed;
    }

    __device__ __forceinline__ static KeySlot slot(const QueryInfo& qi, const EvoParams&, int s,
                                   const int* __restrict__ chunk_ends,
                                   const unsigned* __restrict__ rel_time) {
        int c = qi.chunk_base + s;
        return KeySlot{c, true, true, rel_time[chunk_ends[c] - 1]};
    }
};

// Transition branch: the last m behaviors of each chunk that started before the query. Slot
// s = k * m + o is the o-th of the m positions ending at chunk k's end.
struct TransitionKeys {
    __device__ __forceinline__ static int num_slots(const QueryInfo& qi, const EvoParams& p) {
        int started = min(qi.completed + 1, qi.num_chunks);
        return qi.user ? 0 : started * p.tail_tokens;
    }

    __device__ __forceinline__ static KeySlot slot(const QueryInfo& qi, const EvoParams& p, int s,
                                   const int* __restrict__ chunk_ends,
                                   const unsigned* __restrict__ rel_time) {
        int k = s / p.tail_tokens;
        int o = s - k * p.tail_tokens;
        int end = chunk_ends[qi.chunk_base + k];
        int token = end - p.tail_tokens + o;
        if (token < chunk_start(qi, chunk_ends, k) || token >= qi.visible_end) return masked_slot();
        return KeySlot{token, false, true, rel_time[token]};
    }
};

// Local branch: the user token, the window of behaviors, and a candidate itself.
struct LocalKeys {
    __device__ __forceinline__ static int first_behavior(const QueryInfo& qi, const EvoParams& p) {
        // A candidate stands where the next behavior would: it sees w - 1 behaviors.
        int first = qi.candidate ? qi.seq.candidates + 1 - p.window : qi.token + 1 - p.window;
        return max(first, qi.seq.behaviors);
    }

    __device__ __forceinline__ static int num_slots(const QueryInfo& qi, const EvoParams& p) {
        int user = qi.seq.behaviors - qi.seq.start;
        return qi.user ? 0 : user + (qi.visible_end - first_behavior(qi, p)) + (qi.candidate ? 1 : 0);
    }

    __device__ __forceinline__ static KeySlot slot(const QueryInfo& qi, const EvoParams& p, int s,
                                   const int* __restrict__, const unsigned* __restrict__ rel_time) {
        int user = qi.seq.behaviors - qi.seq.start;
        if (s < user) return KeySlot{qi.seq.start, false, false, 0u};
        int token = first_behavior(qi, p) + (s - user);
        if (token >= qi.visible_end) token = qi.token;  // the candidate's own slot
        return KeySlot{token, false, true, rel_time[token]};
    }
};
