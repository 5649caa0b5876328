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

// Rows of K and of V in shared memory (at most kDenseThreads: at least one thread per slot),
// within 48 KB of static shared memory. A gather costs a round of global loads between barriers,
// so the query backward's gathers take as many slots as fit (128 rows hold a whole local window
// of a 64-query tile at w = 64: the user token and 127 behaviors), the forward's two stages half
// each (TcStageRows), and the MMAs walk them in sub-tiles (TcCols, BwdTcCols).
template <int kHeadDim>
struct TcRows {
    static constexpr int kValue = kHeadDim == 128 ? 64 : 128;
};

// Slots per gather of branch kBranch into kRows rows: the summaries (f32) take half, their rows'
// 16-bit high parts in the lower half of the K and V tiles and the low parts in the upper half;
// token rows need no low part, so the other branches gather as many slots as there are rows.
template <int kHeadDim, int kBranch, int kRows = TcRows<kHeadDim>::kValue>
struct TcLoad {
    static constexpr int kValue = kBranch == 0 ? kRows / 2 : kRows;
};

// Rows of each of the forward's two gather stages (TcRows split in half): the next gather's
// copies are in flight while the MMAs walk the other stage.
template <int kHeadDim>
struct TcStageRows {
    static constexpr int kValue = TcRows<kHeadDim>::kValue / 2;
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

// Whether a row sees a summary (kBranch 0) or tail (1) slot; row -1 (a slot past the branch's
// end, or before a chunk's first behavior) is never visible. The local branch's slots are tested
// by number instead (LocalSeen).
template <int kBranch>
__device__ __forceinline__ bool slot_visible(const TcRow& r, int row, int aux) {
    static_assert(kBranch == 0 || kBranch == 1, "local slots: LocalSeen");
    if (kBranch == 0) return row >= 0 && r.live && aux < r.completed;
    return row >= 0 && r.live && row < r.visible_end;
}

// The local slots one row sees, tested by slot number alone: the user token (slot 0, where there
// is one), one interval of behavior slots (its window, up to its visible end), and a candidate's
// own slot. The local branch's slot_visible read each slot's row and kind from shared memory and
// compared them with five of the row's fields; by number, a pair costs three compares
// (forward_tc.cu, backward_query_tc.cu).
struct LocalSeen {
    int lo;      // first behavior slot seen
    unsigned n;  // behavior slots seen: 0 where the row does not attend
    int own;     // a candidate's own slot; -1 otherwise
    int user;    // 1 where it sees slot 0, the user token

    __device__ __forceinline__ static LocalSeen make(const TcTile& tt, const TcRow& r) {
        LocalSeen s;
        s.lo = tt.user + r.first_local - tt.local_lo;
        s.n = r.live && r.visible_end > r.first_local ? static_cast<unsigned>(r.visible_end - r.first_local) : 0u;
        // A candidate is past its own visible end (the first candidate); a live row is a real
        // token, so padding rows past the sequence match no slot, not even one past its end.
        const bool candidate = r.q >= r.visible_end;
        s.own = r.live && candidate ? tt.user + (tt.local_hi - tt.local_lo) + r.q - tt.cand_lo : -1;
        s.user = r.live ? tt.user : 0;
        return s;
    }

    // Slot `base + c` for a sub-tile's `base` (the lane's first column) and a column offset c,
    // with the row's bounds taken relative to base once per sub-tile (at()).
    struct At {
        int lo, own, user;
        unsigned n;
        __device__ __forceinline__ bool operator()(int c) const {
            // The user token is slot 0 and base >= 0, so only column 0 can hold it. (Written as
            // c < user, the test ran on every column: the compiler does not know user <= 1.)
            return (static_cast<unsigned>(c - lo) < n) | (c == own) | (c == 0 && user > 0);
        }
    };
    __device__ __forceinline__ At at(int base) const { return At{lo - base, own - base, user - base, n}; }
};

// The local slots some row of a warp may see: the user token (slot 0, where there is one) and
// [lo, hi), from its earliest window start to its latest visible end, or to its last own
// candidate's slot (a candidate sees itself only, so the candidates of the warps before it fall
// inside too: conservative, the rows still mask per element). A 64-query tile's window spans
// 128 local slots of which each warp's 16 rows see at most 80, so 2 or 3 of its 8 sub-tiles
// hold nothing it sees and are skipped. Kept in shared memory and read once per gather as a bit
// mask of its sub-tiles (sub_tiles): held in registers through the kernel (five of them,
// 5f881f4), it made the D = 64 forward spill on sm_80 at its 168-register cap.
//
// Also kept per warp: the behavior slots [full_lo, full_hi) that every one of its 16 rows sees
// (all live behaviors; empty otherwise), whose sub-tiles need no per-element mask (full_tiles),
// and whether no key any row sees is later than the row (`row_last`: RowBias's one-add dt).
struct LocalSpan {
    int live;  // some row of the warp attends (here too, not in a register through the kernel)
    int user, lo, hi;
    int full_lo, full_hi;
    int row_last;

    // Whether some slot of [s0, s0 + n) is in the span. Warp-uniform.
    __device__ __forceinline__ bool overlaps(int s0, int n) const {
        return (s0 < user) | ((s0 < hi) & (s0 + n > lo));
    }

    // Bit i set where sub-tile [s0 + i n, s0 + (i + 1) n) overlaps the span, i < kSubTiles: one
    // register through a loop over a gather's sub-tiles, where the span's fields took three.
    template <int kSubTiles>
    __device__ __forceinline__ unsigned sub_tiles(int s0, int n) const {
        static_assert(kSubTiles <= 32, "a bit per sub-tile");
        unsigned bits = 0;
#pragma unroll
        for (int i = 0; i < kSubTiles; ++i) bits |= overlaps(s0 + i * n, n) ? 1u << i : 0u;
        return bits;
    }

    // Bit i set where every row of the warp sees every slot of sub-tile i (as sub_tiles).
    template <int kSubTiles>
    __device__ __forceinline__ unsigned full_tiles(int s0, int n) const {
        static_assert(kSubTiles <= 32, "a bit per sub-tile");
        unsigned bits = 0;
#pragma unroll
        for (int i = 0; i < kSubTiles; ++i)
            bits |= (s0 + i * n >= full_lo) & (s0 + (i + 1) * n <= full_hi) ? 1u << i : 0u;
        return bits;
    }
};

// Stores the span of this lane's warp (rows rw, its two of them) into `span`. `row_last`: this
// lane's rows see no key later than themselves (false where unknown). Called by every lane of
// the warp; a __syncwarp (or a barrier) before the span is read.
__device__ __forceinline__ void store_local_span(const TcTile& tt, const TcRow (&rw)[2], bool row_last,
                                                 LocalSpan* span) {
    int lo = 0x7fffffff, hi = 0, full_lo = 0, full_hi = 0x7fffffff;
    const int cand_slot0 = tt.user + (tt.local_hi - tt.local_lo) - tt.cand_lo;  // + q: q's own slot
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // A candidate (past its own visible end) sees its own slot; a behavior, up to itself.
        const bool candidate = rw[r].q >= rw[r].visible_end;
        const int row_lo = tt.user + rw[r].first_local - tt.local_lo;
        const int row_hi = tt.user + rw[r].visible_end - tt.local_lo;
        if (rw[r].live && !candidate) {
            full_lo = max(full_lo, row_lo);
            full_hi = min(full_hi, row_hi);
        } else {
            full_hi = 0;  // a row that does not see its window: no sub-tile is full
        }
        if (!rw[r].live) continue;
        lo = min(lo, row_lo);
        hi = max(hi, candidate ? cand_slot0 + rw[r].q + 1 : row_hi);
    }
    // The four lanes of a group hold the same rows; the eight groups hold different ones.
#pragma unroll
    for (int off = 4; off < kWarpSize; off <<= 1) {
        lo = min(lo, __shfl_xor_sync(kFullMask, lo, off));
        hi = max(hi, __shfl_xor_sync(kFullMask, hi, off));
        full_lo = max(full_lo, __shfl_xor_sync(kFullMask, full_lo, off));
        full_hi = min(full_hi, __shfl_xor_sync(kFullMask, full_hi, off));
    }
    const int live = __any_sync(kFullMask, rw[0].live || rw[1].live);
    const int all_row_last = __all_sync(kFullMask, row_last);
    if (threadIdx.x % kWarpSize == 0)
        *span = LocalSpan{live, tt.user, lo, hi, full_lo, full_hi, all_row_last};
}

// Whether no key that row r sees is later than it: true for a behavior (behaviors are in time
// order and it sees none after itself; its summaries' times are their chunks' last behaviors),
// and for a candidate whose request time is no earlier than the last behavior's (a candidate
// sees behaviors and itself). A row that sees nothing may say either.
__device__ __forceinline__ bool row_is_last(const SeqInfo& si, const TcRow& r, unsigned row_time,
                                            const unsigned* __restrict__ rel_time) {
    if (!r.live || r.q < si.candidates || si.candidates == si.behaviors) return true;
    return row_time >= rel_time[si.candidates - 1];
}

template <int kBranch>
__device__ __forceinline__ int branch_slots(const TcTile& tt, const EvoParams& p) {
    if (kBranch == 0) return tt.completed;
    if (kBranch == 1) return tt.started * p.tail_tokens;
    return tt.user + (tt.local_hi - tt.local_lo);  // + the candidates, added by the caller
}

// Slot s of a branch: returns its row (-1: masked for every query), and sets its aux and the
// token whose time it carries (-1: time 0). Rows are tokens, or summary slots (seq * P + chunk)
// for the global branch. Only the summaries' time and the tails read memory (the chunk ends), so
// a gather can issue the rows of the local branch and the summaries with no load before them.
template <int kBranch>
__device__ __forceinline__ int slot_row(const TcTile& tt, const SeqInfo& si, const EvoParams& p,
                                        int chunk_base, const int* __restrict__ chunk_ends, int s,
                                        int* aux, int* time_token) {
    if (kBranch == 0) {
        const int c = chunk_base + s;
        *aux = s;
        *time_token = chunk_ends[c] - 1;
        return c;
    } else if (kBranch == 1) {
        const int k = s / p.tail_tokens, o = s - k * p.tail_tokens;
        const int end = chunk_ends[chunk_base + k];
        const int start = k == 0 ? si.behaviors : chunk_ends[chunk_base + k - 1];
        const int token = end - p.tail_tokens + o;
        *aux = 0;
        *time_token = token >= start ? token : -1;
        return *time_token;
    } else {
        const int behaviors = tt.local_hi - tt.local_lo;
        if (s < tt.user) {
            *aux = kLocalUser;
            *time_token = -1;
            return si.start;
        }
        const bool behavior = s < tt.user + behaviors;
        *aux = behavior ? kLocalBehavior : kLocalCandidate;
        *time_token = behavior ? tt.local_lo + s - tt.user : tt.cand_lo + s - tt.user - behaviors;
        return *time_token;
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
        row_time[r] = token_time_fast(rel_time[qc], wd0);
    }
}

// Slots of each branch for the tile (the local branch's candidates included).
template <int kBranch>
__device__ __forceinline__ int tile_slots(const TcTile& tt, const EvoParams& p, int q_end) {
    if (kBranch == 2) return branch_slots<2>(tt, p) + max(0, q_end - tt.cand_lo);
    return branch_slots<kBranch>(tt, p);
}

// Shared-memory tiles of one gather of slots: K, V [kRows][D + pad], and per slot its row, aux
// and time. A summary gather (TcLoad: half the rows) puts its low parts in the upper halves.
template <typename T, int kHeadDim, int kRows = TcRows<kHeadDim>::kValue>
struct SlotTiles {
    static constexpr int kStride = kHeadDim + SmemPad<T>::kValue;
    static constexpr int kLoHalf = kRows / 2 * kStride;

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

// Bytes of the arrays SPARSECTR_SLOT_TILES declares (the kernels' register budgets,
// min_blocks_per_sm, count them).
template <typename T, int kHeadDim>
constexpr int kSlotTilesSmemBytes =
    TcRows<kHeadDim>::kValue * (2 * (kHeadDim + SmemPad<T>::kValue) * static_cast<int>(sizeof(T)) +
                                static_cast<int>(2 * sizeof(int) + sizeof(TokenTime) + sizeof(unsigned)));

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
    __shared__ unsigned sRawTime_[kSlotRows_]; /* each slot's time as it lands */              \
    static_assert(sizeof(sK_) + sizeof(sV_) + sizeof(sRow_) + sizeof(sAux_) + sizeof(sTime_) +  \
                          sizeof(sRawTime_) ==                                                  \
                      kSlotTilesSmemBytes<T, D>,                                                \
                  "kSlotTilesSmemBytes must count the tiles");                                  \
    const SlotTiles<T, D> name{sK_, sV_, sRow_, sAux_, sTime_}

// The forward's tiles of TcRows rows as two stages (TcStageRows each), with each slot's raw time
// as its cp.async lands (token_time_fast() of it is taken when the gather lands).
template <typename T, int kHeadDim>
struct StagedSlotTiles {
    static constexpr int kRows = TcStageRows<kHeadDim>::kValue;
    using Stage = SlotTiles<T, kHeadDim, kRows>;

    Stage all;  // both stages, stage 1 from row kRows on
    unsigned* raw_time;

    __device__ __forceinline__ Stage stage(int i) const { return all.from(i * kRows); }
    __device__ __forceinline__ unsigned* raw(int i) const { return raw_time + i * kRows; }
};

#define SPARSECTR_STAGED_SLOT_TILES(name, T, D)                                                  \
    SPARSECTR_SLOT_TILES(name##_all_, T, D);                                                     \
    const StagedSlotTiles<T, D> name {                                                           \
        {name##_all_.k, name##_all_.v, name##_all_.row, name##_all_.aux, name##_all_.time},     \
            sRawTime_                                                                            \
    }

// Threads of the block per slot of a gather of branch kBranch into kRows rows (issue_gather).
template <int kHeadDim, int kBranch, int kRows>
struct TcGatherThreads {
    static constexpr int kLoad = TcLoad<kHeadDim, kBranch, kRows>::kValue;
    static_assert(kDenseThreads % kLoad == 0, "a gather's slots must divide the block");
    static constexpr int kValue = kDenseThreads / kLoad;
};

// The slot of a gather that thread `tid` takes, and its part of that slot (of kPerSlot =
// TcGatherThreads). A slot's threads are 8 lanes apart, so a quarter warp (the 8 lanes that one
// wavefront serves for 16-byte accesses) stores into 8 consecutive rows, which start in 8
// different bank groups (a row is an odd number of 16-byte chunks: SmemPad), in one wavefront.
// With a slot's threads adjacent (tid / kPerSlot), a quarter warp stored adjacent chunks of 2 or
// 4 rows, which overlapped: 2-way conflicts, twice the wavefronts of every cp.async of K and V
// (the CPU emulation's bank model, EMU_BANKS). A warp holds the same slots and parts as before,
// so its global sectors per instruction are the same. With 8 threads a slot (the forward's
// summaries at D = 128), a quarter warp takes one slot's 8 adjacent chunks.
struct GatherSlot {
    int slot, part;
};
template <int kPerSlot>
__device__ __forceinline__ GatherSlot gather_slot(unsigned tid) {
    static_assert(kPerSlot == 1 || kPerSlot == 2 || kPerSlot == 4 || kPerSlot == 8,
                  "a warp holds whole slots");
    if constexpr (kPerSlot == 8) {
        // A quarter warp takes one slot, and the warp slots w, w + 4, w + 8 and w + 12: rows 16
        // banks apart (SlotTiles' stride is 4 banks mod 32), which store_split's order of words
        // completes to 32 banks. With a warp's slots adjacent (tid / 8), they were 4 banks apart
        // and a summary gather's stores at D = 128 took four times their wavefronts.
        static_assert(kDenseThreads == 128, "four warps");
        return {static_cast<int>((tid >> 5) | (((tid >> 3) & 3u) << 2)), static_cast<int>(tid & 7u)};
    } else {
        // Lanes 8i to 8i + 7 of a warp take part i % kPerSlot of 8 consecutive slots: slot
        // 8 (tid / (8 kPerSlot)) + tid % 8. In shifts and masks, which ptxas recomputes where it
        // needs them instead of holding them in registers through the forward's main loop (with
        // the same in divisions and remainders of lanes, it held them, and the bf16 forward at
        // D = 64 spilled 8 to 12 B at sm_90's 168-register cap).
        constexpr unsigned kShift = kPerSlot == 1 ? 0 : kPerSlot == 2 ? 1 : 2;
        return {static_cast<int>(((tid >> kShift) & ~7u) | (tid & 7u)),
                static_cast<int>((tid >> 3) & (kPerSlot - 1u))};
    }
}

// Stores four f32 values (`raw`) as their 16-bit roundings at `hi` and the roundings of what
// those leave at `lo` (8-byte aligned): a summary row's piece in a gather. Two 4-byte stores to
// each, where four 2-byte ones took twice the instructions and, in the warp's layout of slots
// and parts (gather_slot), two or four times the wavefronts: a row is 4 banks (mod 32) after the
// one before it, so the 32 lanes' words fell on half the banks or fewer. Lanes 16 to 31 store
// their two words in the other order, so each store's 32 words take the 32 banks once at 2, 4
// and 8 threads a slot (the CPU emulation's bank model with SPARSECTR_EMU_SANITIZE=plain).
template <typename T>
__device__ __forceinline__ void store_split(T* hi, T* lo, const uint4& raw) {
    unsigned h[2], l[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float a = vec_elem<float>(raw, 2 * i), b = vec_elem<float>(raw, 2 * i + 1);
        const T ah = from_float<T>(a), bh = from_float<T>(b);
        h[i] = static_cast<unsigned>(ah.bits) | (static_cast<unsigned>(bh.bits) << 16);
        l[i] = static_cast<unsigned>(from_float<T>(a - to_float(ah)).bits) |
               (static_cast<unsigned>(from_float<T>(b - to_float(bh)).bits) << 16);
    }
    const bool swap = (threadIdx.x >> 4) & 1u;
    unsigned* hw = reinterpret_cast<unsigned*>(hi);
    unsigned* lw = reinterpret_cast<unsigned*>(lo);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int w = i ^ static_cast<int>(swap);
        hw[w] = swap ? h[i ^ 1] : h[i];
        lw[w] = swap ? l[i ^ 1] : l[i];
    }
}

// Issues one gather, slots [base, base + TcLoad) of a branch into `st`, and returns before the
// copies land, so that the forward computes on its other stage meanwhile (forward_tc.cu).
// TcGatherThreads threads take each slot (gather_slot): part 0 stores its row and aux and copies
// its time (raw) by cp.async, and each works out the row itself (slot_row), once, and copies its
// share of the slot's K and V pieces (at one thread a slot, pieces of its warp's slots instead,
// whole rows at a time); token rows go by cp.async, summary rows (f32, split into
// two 16-bit parts) are loaded and stored at once. Complete with land_gather and a barrier. Called by every
// thread of the block.
template <int kBranch, typename T, int kHeadDim, int kRows>
__device__ __forceinline__ void issue_gather(const TcTile& tt, const SeqInfo& si, const EvoParams& p,
                                             int head, int chunk_base, const int* __restrict__ chunk_ends,
                                             const unsigned* __restrict__ rel_time, const T* __restrict__ k,
                                             const T* __restrict__ v, const float* __restrict__ kbar,
                                             const float* __restrict__ vbar, int base, int num_slots,
                                             const SlotTiles<T, kHeadDim, kRows>& st, unsigned* raw_time) {
    constexpr int kPerSlot = TcGatherThreads<kHeadDim, kBranch, kRows>::kValue;
    constexpr int kStride = kHeadDim + SmemPad<T>::kValue;
    const GatherSlot me = gather_slot<kPerSlot>(threadIdx.x);
    const int r = me.slot, part = me.part;
    int row = -1, aux = 0, time_token = -1;
    if (base + r < num_slots) row = slot_row<kBranch>(tt, si, p, chunk_base, chunk_ends, base + r, &aux, &time_token);
    if (part == 0) {
        st.row[r] = row;
        st.aux[r] = aux;
        cp_async<4>(raw_time + r, rel_time + max(time_token, 0), time_token >= 0);
    }
    // Piece j of a thread is piece j * kPerSlot + part of the row, so the slot's threads read
    // adjacent 16 bytes at each step.
    if constexpr (kBranch == 0) {
        constexpr int kPieces = kHeadDim / 4 / kPerSlot;  // float4 pieces
        const size_t at = (static_cast<size_t>(max(row, 0)) * p.heads + head) * kHeadDim;
        const uint4* krow = reinterpret_cast<const uint4*>(kbar + at);
        const uint4* vrow = reinterpret_cast<const uint4*>(vbar + at);
        constexpr int kUnroll = kPieces <= 4 ? kPieces : 2;  // as for token rows, below
#pragma unroll(kUnroll)
        for (int j = 0; j < kPieces; ++j) {
            const int c = j * kPerSlot + part;
            uint4 kraw = {0u, 0u, 0u, 0u}, vraw = {0u, 0u, 0u, 0u};
            if (row >= 0) {
                kraw = __ldg(krow + c);
                vraw = __ldg(vrow + c);
            }
            const int to = r * kStride + c * 4;
            store_split<T>(st.k + to, st.k_lo() + to, kraw);
            store_split<T>(st.v + to, st.v_lo() + to, vraw);
        }
    } else if constexpr (kPerSlot == 1) {
        // Token rows at one thread a slot (the query backward at D = 32 and 64): taking its own
        // slot's pieces, each lane of a warp's copy read 16 bytes of a different row, 32
        // sectors for 512 bytes, and each sector twice (by two copies: cp.async.cg keeps
        // nothing in L1). So the warp copies its 32 slots' rows whole rows at a time: at copy j,
        // lane l takes 16-byte piece l % kRowPieces of the warp's slot s = j kRowCopies +
        // which(l), whose row lane s worked out (a shuffle). 8 lanes read one row's 128 bytes (at
        // D = 32 two rows' 64): 4 cache lines and 16 sectors a copy. In shared memory, 8 lanes
        // store one row's 128 bytes (banks 0-31 once) or at D = 32 (rows 20 banks apart) two
        // rows 4 apart (16 banks apart). The forward (two threads a slot: 16 rows' 32 bytes, a
        // whole sector each) keeps the layout below: this one spilled 4 B in its D = 64 kernel
        // at the 168-register cap (sm_90, NVRTC 13.0), its gathers being inside its main loop.
        constexpr int kVec = VecWidth<T>::kValue;
        constexpr int kRowPieces = kHeadDim / kVec;
        static_assert(kRowPieces == 4 || kRowPieces == 8 || kRowPieces == 16, "16-byte pieces of a row");
        constexpr int kRowCopies = kWarpSize / kRowPieces;  // rows a copy takes
        const unsigned lane = threadIdx.x % kWarpSize;
        const int piece = static_cast<int>(lane % kRowPieces) * kVec;
        const int which = kRowPieces >= 8 ? static_cast<int>(lane / kRowPieces)
                                          : static_cast<int>((lane >> 3) | (((lane >> 2) & 1u) << 2));
        const int first = r - static_cast<int>(lane);  // gather_slot<1>: slot = threadIdx.x
        // Eight copies a thread (D = 64) unrolled whole computed all their addresses at once and
        // spilled 204 B at the 168-register cap (NVRTC 13.0, the layout below); four unroll
        // without.
        constexpr int kUnroll = kRowPieces <= 4 ? kRowPieces : 2;
#pragma unroll(kUnroll)
        for (int j = 0; j < kRowPieces; ++j) {
            const int s = j * kRowCopies + which;
            const int rj = __shfl_sync(kFullMask, row, s);
            const size_t at = (static_cast<size_t>(max(rj, 0)) * p.heads + head) * kHeadDim + piece;
            const int to = (first + s) * kStride + piece;
            cp_async<16>(st.k + to, k + at, rj >= 0);
            cp_async<16>(st.v + to, v + at, rj >= 0);
        }
    } else {
        // Two or four threads a slot (the forward; the query backward at D = 128): a copy reads
        // 32 or 64 bytes of each of its rows, whole sectors.
        constexpr int kVec = VecWidth<T>::kValue;
        constexpr int kPieces = kHeadDim / kVec / kPerSlot;
        constexpr int kUnroll = kPieces <= 4 ? kPieces : 2;
        const size_t at = (static_cast<size_t>(max(row, 0)) * p.heads + head) * kHeadDim;
#pragma unroll(kUnroll)
        for (int j = 0; j < kPieces; ++j) {
            const int c = (j * kPerSlot + part) * kVec;
            cp_async<16>(st.k + r * kStride + c, k + at + c, row >= 0);
            cp_async<16>(st.v + r * kStride + c, v + at + c, row >= 0);
        }
    }
}

// Lands this thread's part of a gather of branch `branch` issued by issue_gather: waits for its
// copies and turns the raw times it copied into TokenTime, and, where `bias_rows` is given (the
// K or V tile of the gather's stage), writes each slot's bias features (bias_column_features,
// for add_bias_features) into its row's padding: zeros for its first `untimed` slots (the user
// token, which has no time and no bias). A barrier after it makes the stage visible to the block.
template <int kHeadDim, int kRows, typename T>
__device__ __forceinline__ void land_gather(int branch, const unsigned* raw_time, TokenTime* time, int wd0,
                                            T* bias_rows, int untimed) {
    cp_async_wait_all();
    constexpr int kSummary = TcGatherThreads<kHeadDim, 0, kRows>::kValue;
    constexpr int kToken = TcGatherThreads<kHeadDim, 1, kRows>::kValue;
    static_assert(kToken == TcGatherThreads<kHeadDim, 2, kRows>::kValue, "token branches gather alike");
    static_assert(SmemPad<T>::kValue * sizeof(T) == 16, "a row's padding holds the eight features");
    // The thread that issued a slot's time copy (part 0, issue_gather) lands it.
    const GatherSlot me = branch == 0 ? gather_slot<kSummary>(threadIdx.x) : gather_slot<kToken>(threadIdx.x);
    if (me.part == 0) {
        const TokenTime x = token_time_fast(raw_time[me.slot], wd0);
        time[me.slot] = x;
        if (bias_rows != nullptr)
            *reinterpret_cast<uint4*>(bias_rows + me.slot * SlotTiles<T, kHeadDim, kRows>::kStride + kHeadDim) =
                me.slot < untimed ? uint4{0u, 0u, 0u, 0u} : bias_column_features(x);
    }
}

// One gather, slots [base, base + TcLoad<D, kBranch>) of a branch, into `st`, visible to the
// whole block on return: issue_gather and land_gather between barriers, and the slots' dcoeffs
// features. The query backward's (the forward stages its own). Called by every thread of the
// block.
template <int kBranch, typename T, int kHeadDim>
__device__ __forceinline__ void gather_slots(const TcTile& tt, const SeqInfo& si, const EvoParams& p,
                                             int head, int chunk_base, const int* __restrict__ chunk_ends,
                                             const unsigned* __restrict__ rel_time, int wd0,
                                             const T* __restrict__ k, const T* __restrict__ v,
                                             const float* __restrict__ kbar, const float* __restrict__ vbar,
                                             int base, int num_slots, const SlotTiles<T, kHeadDim>& st,
                                             unsigned* raw_time) {
    __syncthreads();  // the previous gather's readers are done
    issue_gather<kBranch>(tt, si, p, head, chunk_base, chunk_ends, rel_time, k, v, kbar, vbar, base,
                          num_slots, st, raw_time);
    // (With the bias features written here, below, rather than by land_gather: there the D = 64
    // kernel spilled 8 B at its 168-register cap, sm_90, NVRTC 13.0.)
    land_gather<kHeadDim, TcRows<kHeadDim>::kValue, T>(kBranch, raw_time, st.time, wd0, nullptr, 0);
    // Each slot's per-key dcoeffs features (kc, ks, kw, 1, then four zeros) as f16 in its K row's
    // padding, where the query backward (the only caller) reads them by ldmatrix as the B
    // fragment of its sum_j P_j (Hr, Wk, 1) MMA (pair_feature_sums); zeros for the user slot,
    // which has no time and no bias. f16 whatever T is: the features lie in [-1, 1], where f16
    // keeps 3 more bits than bf16. Slots past the branch's end get their zero time's features,
    // finite, as their P is 0. The thread that landed a slot's time writes them.
    constexpr int kPerSlot = TcGatherThreads<kHeadDim, kBranch, TcRows<kHeadDim>::kValue>::kValue;
    const GatherSlot me = gather_slot<kPerSlot>(threadIdx.x);
    if (me.part == 0) {
        const TokenTime x = st.time[me.slot];
        uint4 f = {0u, 0u, 0u, 0u};
        if (!(kBranch == 2 && base + me.slot < tt.user)) {
            f.x = make_pair<half_t>(x.c, x.s).bits;
            f.y = make_pair<half_t>(x.weekend, 1.f).bits;
        }
        *reinterpret_cast<uint4*>(st.k + me.slot * SlotTiles<T, kHeadDim>::kStride + kHeadDim) = f;
        // And the bias's phase and weekend features (add_bias_features, dense.cuh) in its V
        // row's padding; zeros for the user slot.
        const bool untimed = kBranch == 2 && base + me.slot < tt.user;
        *reinterpret_cast<uint4*>(st.v + me.slot * SlotTiles<T, kHeadDim>::kStride + kHeadDim) =
            untimed ? uint4{0u, 0u, 0u, 0u} : bias_column_features(x);
    }
    __syncthreads();
}
