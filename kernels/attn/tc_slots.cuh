// The slots of the tensor-core sparse kernels (forward_tc.cu, backward_query_tc.cu): a block of
// 64 queries of one sequence walks, per branch, the union of its rows' key sets as numbered
// slots, resolved like the warp kernels' slots (branches.cuh) but for the whole tile of queries;
// each row then masks the slots it does not see.
#pragma once

#include "../common/async_copy.cuh"
#include "../common/dtype.cuh"
#include "../common/params.cuh"
#include "../common/warp.cuh"
#include "temporal.cuh"
#include "dense.cuh"

// Slots per MMA sub-tile of the forward: 32 keys at D = 32, 16 at D >= 64, where wider tiles
// kept the rows' S tile, the branch and the gated sums above the register cap (NVRTC 13.0
// spilled 56 B at D = 64 with 32 slots under 64-slot gathers, 96 B at D = 128 with 32, and 4 B
// at D = 32 with 64 once every element's logit is computed unconditionally).
template <int kHeadDim>
struct TcCols {
    static constexpr int kValue = kHeadDim == 32 ? 32 : 16;
};

// Rows of K and of V in shared memory for one gather (at most kDenseThreads: one thread
// resolves each slot), within 48 KB of static shared memory. A gather costs two dependent rounds
// of global loads between barriers (slot resolution, then the rows), so it takes as many slots
// as fit, and the MMAs walk them in sub-tiles (TcCols, BwdTcCols). 128 rows hold a whole local
// window of a 64-query tile at w = 64 (the user token and 127 behaviors).
template <int kHeadDim>
struct TcRows {
    static constexpr int kValue = kHeadDim == 128 ? 64 : 128;
};

// Slots per gather of branch kBranch: the summaries (f32) take half, their rows' 16-bit high
// parts in the lower half of the K and V tiles and the low parts in the upper half; token rows
// need no low part, so the other branches gather as many slots as there are rows.
template <int kHeadDim, int kBranch>
struct TcLoad {
    static constexpr int kValue = kBranch == 0 ? TcRows<kHeadDim>::kValue / 2 : TcRows<kHeadDim>::kValue;
};

// Slot kinds of the local branch.
enum : int { kLocalUser = 0, kLocalBehavior = 1, kLocalCandidate = 2 };

// What a row (query) needs to test slots.
struct TcRow {
    int q;
    bool live;        // a real query that is not the user token (which sees nothing)
    int visible_end;  // behaviors below this are in its past
    int completed;    // chunks whose last behavior is below visible_end
    int first_local;  // first behavior of its window
};

// The tile-wide slot ranges of the three branches.
struct TcTile {
    int completed;  // of the tile's last query
    int started;
    int local_lo, local_hi;  // behaviors [lo, hi) of the local branch
    int user;                // 1 if the sequence has a user token
    int cand_lo;             // first candidate of the tile (tile end if none)
};

// Chunks of the sequence whose exclusive end is at most `end` (chunk ends increase).
__device__ __forceinline__ int chunks_completed(const int* __restrict__ ends, int count, int end) {
    int lo = 0, hi = count;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (ends[mid] <= end) lo = mid + 1; else hi = mid;
    }
    return lo;
}

__device__ __forceinline__ int visible_end_of(const SeqInfo& si, int q) {
    return q >= si.candidates ? si.candidates : q + 1;
}

__device__ __forceinline__ int window_start(const SeqInfo& si, int q, int window) {
    return max(si.behaviors, min(q, si.candidates) + 1 - window);
}

// Row -1 (a slot past the branch's end, or before a chunk's first behavior) is never visible.
template <int kBranch>
__device__ __forceinline__ bool slot_visible(const TcRow& r, int row, int aux) {
    if (row < 0) return false;
    if (kBranch == 0) return r.live && aux < r.completed;
    if (kBranch == 1) return r.live && row < r.visible_end;
    if (aux == kLocalUser) return r.live;
    if (aux == kLocalBehavior) return r.live && row >= r.first_local && row < r.visible_end;
    return row == r.q;  // a candidate sees itself
}

template <int kBranch>
__device__ __forceinline__ int branch_slots(const TcTile& tt, const EvoParams& p) {
    if (kBranch == 0) return tt.completed;
    if (kBranch == 1) return tt.started * p.tail_tokens;
    return tt.user + (tt.local_hi - tt.local_lo);  // + the candidates, added by the caller
}

// Resolves slot s of a branch to (row, aux, time); row -1 is masked for every query. Rows are
// tokens, or summary slots (seq * P + chunk) for the global branch.
template <int kBranch>
__device__ __forceinline__ void resolve_slot(const TcTile& tt, const SeqInfo& si, const EvoParams& p,
                                             int chunk_base, const int* __restrict__ chunk_ends,
                                             const unsigned* __restrict__ rel_time, int s,
                                             int* row, int* aux, unsigned* time) {
    if (kBranch == 0) {
        const int c = chunk_base + s;
        *row = c;
        *aux = s;
        *time = rel_time[chunk_ends[c] - 1];
    } else if (kBranch == 1) {
        const int k = s / p.tail_tokens, o = s - k * p.tail_tokens;
        const int end = chunk_ends[chunk_base + k];
        const int start = k == 0 ? si.behaviors : chunk_ends[chunk_base + k - 1];
        const int token = end - p.tail_tokens + o;
        *aux = 0;
        *row = token >= start ? token : -1;
        *time = token >= start ? rel_time[token] : 0u;
    } else {
        const int behaviors = tt.local_hi - tt.local_lo;
        if (s < tt.user) {
            *row = si.start;
            *aux = kLocalUser;
            *time = 0u;
        } else if (s < tt.user + behaviors) {
            *row = tt.local_lo + s - tt.user;
            *aux = kLocalBehavior;
            *time = rel_time[*row];
        } else {
            *row = tt.cand_lo + s - tt.user - behaviors;
            *aux = kLocalCandidate;
            *time = rel_time[*row];
        }
    }
}

// The tile's slot ranges, and each of this lane's two rows (warp rows wq + g and wq + g + 8),
// for sequence `si` (index `s`) and rows [q0, q_end).
__device__ __forceinline__ void tc_setup(const EvoParams& p, const SeqInfo& si, int s, int q0,
                                         int q_end, int wq, const int* __restrict__ chunk_ends,
                                         const int* __restrict__ chunk_counts,
                                         const unsigned* __restrict__ rel_time, int wd0,
                                         TcTile* tt, TcRow (&rw)[2], TokenTime (&row_time)[2]) {
    const int g = (threadIdx.x % kWarpSize) >> 2;
    const int num_chunks = chunk_counts[s];
    const int* ends = chunk_ends + s * p.max_chunks;
    tt->completed = chunks_completed(ends, num_chunks, visible_end_of(si, q_end - 1));
    tt->started = min(tt->completed + 1, num_chunks);
    tt->local_lo = window_start(si, q0, p.window);
    tt->local_hi = max(tt->local_lo, min(visible_end_of(si, q_end - 1), si.candidates));
    tt->user = si.behaviors > si.start ? 1 : 0;
    tt->cand_lo = max(q0, si.candidates);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int q = wq + g + 8 * r;
        const int qc = min(q, si.end - 1);
        rw[r].q = q;
        rw[r].live = q < si.end && q >= si.behaviors;
        rw[r].visible_end = visible_end_of(si, qc);
        rw[r].completed = chunks_completed(ends, num_chunks, rw[r].visible_end);
        rw[r].first_local = window_start(si, qc, p.window);
        row_time[r] = token_time(rel_time[qc], wd0);
    }
}

// Slots of each branch for the tile (the local branch's candidates included).
template <int kBranch>
__device__ __forceinline__ int tile_slots(const TcTile& tt, const EvoParams& p, int q_end) {
    if (kBranch == 2) return branch_slots<2>(tt, p) + max(0, q_end - tt.cand_lo);
    return branch_slots<kBranch>(tt, p);
}

// Resolves a tile of slots [base, base + kCols) into shared memory (threads < kCols).
template <int kBranch, int kCols>
__device__ __forceinline__ void resolve_tile(const TcTile& tt, const SeqInfo& si, const EvoParams& p,
                                             int chunk_base, const int* __restrict__ chunk_ends,
                                             const unsigned* __restrict__ rel_time, int wd0,
                                             int base, int num_slots, int* sRow, int* sAux,
                                             TokenTime* sTime) {
    const int tid = threadIdx.x;
    if (tid < kCols) {
        int row = -1, aux = 0;
        unsigned time = 0u;
        if (base + tid < num_slots)
            resolve_slot<kBranch>(tt, si, p, chunk_base, chunk_ends, rel_time, base + tid, &row,
                                  &aux, &time);
        sRow[tid] = row;
        sAux[tid] = aux;
        sTime[tid] = token_time(time, wd0);
    }
}

// Copies one tensor's rows for kRows slots into shared memory as rows [kRows][D + pad], masked
// slots as zeros. Token rows go by cp.async (the caller waits: cp_async_wait_all, then a
// barrier); summary rows (f32) are split into a 16-bit high part and the 16-bit rest (`rows_lo`).
template <typename T, int kHeadDim, int kRows, bool kSummary>
__device__ __forceinline__ void gather_rows_async(const EvoParams& p, int head, const T* __restrict__ tok,
                                                  const float* __restrict__ sum, const int* sRow,
                                                  T* rows, T* rows_lo) {
    constexpr int kRowStride = kHeadDim + SmemPad<T>::kValue;
    if (kSummary) {
        constexpr int kPerRow = kHeadDim / 4;  // float4 pieces
        for (int i = threadIdx.x; i < kRows * kPerRow; i += kDenseThreads) {
            const int r = i / kPerRow, c = i % kPerRow;
            const int row = sRow[r];
            uint4 raw = {0u, 0u, 0u, 0u};
            if (row >= 0)
                raw = __ldg(reinterpret_cast<const uint4*>(
                                sum + (static_cast<size_t>(row) * p.heads + head) * kHeadDim) + c);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float x = vec_elem<float>(raw, e);
                const T hi = from_float<T>(x), lo = from_float<T>(x - to_float(hi));
                rows[r * kRowStride + c * 4 + e] = hi;
                rows_lo[r * kRowStride + c * 4 + e] = lo;
            }
        }
    } else {
        constexpr int kVec = VecWidth<T>::kValue;
        constexpr int kPerRow = kHeadDim / kVec;
        // Two copies per iteration: unrolled whole, a 128-row gather computed all its addresses
        // at once and pushed backward_query_tc (f16, D = 64) past its 168-register cap on sm_90.
#pragma unroll 2
        for (int i = threadIdx.x; i < kRows * kPerRow; i += kDenseThreads) {
            const int r = i / kPerRow, c = i % kPerRow;
            const int row = sRow[r];
            const T* src = tok + (static_cast<size_t>(row >= 0 ? row : 0) * p.heads + head) * kHeadDim + c * kVec;
            cp_async16(rows + r * kRowStride + c * kVec, src, row >= 0);
        }
    }
}

// Shared-memory tiles of one gather of slots: K, V [TcRows][D + pad], and per slot its row, aux
// and time. A summary gather (TcLoad: half the rows) puts its low parts in the upper halves.
template <typename T, int kHeadDim>
struct SlotTiles {
    static constexpr int kStride = kHeadDim + SmemPad<T>::kValue;
    static constexpr int kLoHalf = TcRows<kHeadDim>::kValue / 2 * kStride;

    T* k;
    T* v;
    int* row;
    int* aux;
    TokenTime* time;

    // Derived from k and v, so a sub-tile carries five pointers, not seven.
    __device__ __forceinline__ T* k_lo() const { return k + kLoHalf; }
    __device__ __forceinline__ T* v_lo() const { return v + kLoHalf; }

    // The same tiles from slot `first` of the gather on.
    __device__ __forceinline__ SlotTiles from(int first) const {
        const int at = first * kStride;
        return SlotTiles{k + at, v + at, row + first, aux + first, time + first};
    }
};

// Declares the tiles of one gather as `name` (a macro: `__shared__` arrays must be declared in
// the kernel's own scope).
#define SPARSECTR_SLOT_TILES(name, T, D)                                                         \
    constexpr int kSlotRows_ = TcRows<D>::kValue;                                               \
    constexpr int kSlotStride_ = D + SmemPad<T>::kValue;                                        \
    alignas(16) __shared__ T sK_[kSlotRows_ * kSlotStride_];                                    \
    alignas(16) __shared__ T sV_[kSlotRows_ * kSlotStride_];                                    \
    __shared__ int sRow_[kSlotRows_];                                                           \
    __shared__ int sAux_[kSlotRows_];                                                           \
    __shared__ TokenTime sTime_[kSlotRows_];                                                    \
    const SlotTiles<T, D> name{sK_, sV_, sRow_, sAux_, sTime_}

// One gather: slots [base, base + TcLoad<D, kBranch>) of a branch, resolved and their K and V
// rows copied into `st`, visible to the whole block on return. Called by every thread of the
// block.
template <int kBranch, typename T, int kHeadDim>
__device__ __forceinline__ void gather_slots(const TcTile& tt, const SeqInfo& si, const EvoParams& p,
                                             int head, int chunk_base, const int* __restrict__ chunk_ends,
                                             const unsigned* __restrict__ rel_time, int wd0,
                                             const T* __restrict__ k, const T* __restrict__ v,
                                             const float* __restrict__ kbar, const float* __restrict__ vbar,
                                             int base, int num_slots, const SlotTiles<T, kHeadDim>& st) {
    constexpr int kLoad = TcLoad<kHeadDim, kBranch>::kValue;
    constexpr bool kSummary = kBranch == 0;
    __syncthreads();  // the previous gather's readers are done
    resolve_tile<kBranch, kLoad>(tt, si, p, chunk_base, chunk_ends, rel_time, wd0, base, num_slots,
                                 st.row, st.aux, st.time);
    __syncthreads();
    gather_rows_async<T, kHeadDim, kLoad, kSummary>(p, head, k, kbar, st.row, st.k, st.k_lo());
    gather_rows_async<T, kHeadDim, kLoad, kSummary>(p, head, v, vbar, st.row, st.v, st.v_lo());
    cp_async_wait_all();
    __syncthreads();
}
