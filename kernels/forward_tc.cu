// Fused three-branch EvoAttention forward on tensor cores (bf16, f16). A block takes 64 queries
// of one sequence and one head (16 rows per warp, the rows of one MMA tile). For each branch it
// walks the union of its rows' key sets in tiles of kCols "slots", resolved like the warp kernel's
// slots (attn/branches.cuh) but for the whole tile of queries:
//
//   global      the summaries of the chunks the tile's last query has completed
//   transition  the last m positions of every chunk that query has started (slots before a
//               chunk's first behavior are masked)
//   local       the user token, the behaviors from the first query's window start to the last
//               query's visible end, and the tile's candidates (each visible to itself only)
//
// Each row masks the slots it does not see (the local ones by slot number: LocalSeen), adds the
// RelTemporal bias per element, and keeps one online softmax per branch; the gated sum of the
// branches is written once (and, when `branch_out` is given, each branch's O_b before gating,
// [T, H, 3, D], which the query backward then reads <dO, O_b> from instead of making a pass over
// every pair for it). A warp skips the local sub-tiles none of its 16 rows sees (LocalSpan): a
// ctr-base tile's window spans 128 local slots, of which each warp sees at most 80 (5 or 6 of 8
// sub-tiles); and of those, the ones all 16 rows see whole (3 at w = 64 with a user token, 2
// without, past a sequence's first tile) take no per-element mask. Per element the work is the
// bias folded per row (RowBias: the bucket's term, an FMA; dt + 1 one add where no row of the
// warp sees a later key), one FMA for the scale and one ex2 (logits in base 2), computed for
// every element and masked after; the bias's phase and weekend terms are an MMA per 8 slots
// (add_bias_features, from features each slot's K row carries in its padding), which the
// scores then add to. The inner loops went from 540-656 SASS instructions per 16-slot sub-tile
// to 294-364 (sm_90, D = 64, static counts of scripts/sass-loops.py), when the per-element
// bias, expf and branches were most of them, the local one from 392 to 350 by testing slots by
// number, and then (with the one-add dt, the user token's test on column 0 only, and the
// unmasked full sub-tiles) to about 305 on a window's edges and 265 inside it; the tails' and
// summaries' from 280 and 311 to 261 and 297; with the bias MMA (session 38) the longest trips
// of the local, tails' and summaries' loops 319, 279 and 310 -> 297, 257 and 290 in their |dt|
// form, 305, 261 and 297 -> 284, 240 and 275 in their one-add form.
// Chunk summaries are f32: they are split into a 16-bit high part and the 16-bit rest, and both go
// through the MMA, so summaries keep about 16 bits of mantissa (the backward recomputes their
// logits in f32 against this forward's LSE).
//
// The kernel is latency bound (ncu on an H100 at 17bc4ac: 71% of cycles with no eligible warp),
// so its gathers are pipelined: the three branches' gathers form one sequence of rounds, and
// round r + 1 is issued into one of two stages of shared memory (TcStageRows slots each: 64 at
// D <= 64, a local window of w = 64 in two rounds) before the MMAs walk round r's stage, so its
// loads are in flight during the sub-tiles. A round costs one barrier, and its loads need no
// shared-memory round trip first: the copying threads work out their slots' rows themselves
// (slot_row), the slots' times land by cp.async too. Token rows go by cp.async; summary rows
// (f32, split when stored) are loaded at issue, so a second summary round (more than 32 chunks
// at D = 64) overlaps less. P V reads V through ldmatrix.trans from the row tile
// (probs_times_rows), so no transposed copy is made.
//
// Shared memory: two stages of K, V [TcStageRows][D + pad] (summaries' low parts in their upper
// halves), with the slots' rows and times: at most 40.4 KB (D = 64; ptxas, NVRTC 13.0).
//
// @instantiate SPARSECTR_FORWARD_TC dtype16 head_dim

#include "common/dtype.cuh"
#include "common/mma.cuh"
#include "common/occupancy.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/branches.cuh"
#include "attn/softmax.cuh"
#include "attn/query.cuh"
#include "attn/dense.cuh"
#include "attn/tc_slots.cuh"
#include "attn/tile_softmax.cuh"

// The bias's phase and weekend terms by add_bias_features (an MMA per 8 slots), or by RowBias's
// FFMAs where ptxas has no registers to spare for it: sm_80 at D = 64 (three blocks; sm_86 and
// sm_89 hold two), which spilled 4 B in bf16 and 12 B in f16 with it (NVRTC 13.0), and 8 B in
// bf16 with the rows' A fragment reloaded from shared memory at each sub-tile. There the query
// backward's P differs from the forward's by the MMA's roundings (about 2^-15 of |s2| and |s3|,
// add_bias_features).
template <int kHeadDim>
struct TcBiasMma {
    static constexpr bool kValue = !(kArchBeforeSm90 && kSmemPerSm > 100 * 1024 && kHeadDim == 64);
};

// Three blocks per SM (168 registers) where ptxas fits them without spills: this kernel is latency
// bound (ncu on an H100: 71% of cycles with no eligible warp at two blocks), so more warps hide more
// of each tile's loads. At D = 128 the cap spilled (NVRTC 13.0), and so did D = 64 on sm_100
// (4 B in f16 and, since gather_slot's conflict-free gathers, in bf16: reloaded once per local
// sub-tile). Where shared memory holds fewer blocks (two at D = 64 on sm_86, sm_89, sm_12x), that
// many.
template <typename T, int kHeadDim>
constexpr int kForwardTcWantedBlocks = kHeadDim <= 32 || (kHeadDim == 64 && !kArchSm10x) ? 3 : 2;
template <typename T, int kHeadDim>
constexpr int kForwardTcMinBlocks =
    min_blocks_per_sm(kForwardTcWantedBlocks<T, kHeadDim>,
                      kSlotTilesSmemBytes<T, kHeadDim> + kDenseThreads / kWarpSize * static_cast<int>(sizeof(LocalSpan)));

// Q rows stay in registers up to D = 64; at D = 128 the branch and output accumulators leave no
// room (ptxas spilled 144 B), so they are reloaded from L1 at each use.
template <int kHeadDim>
struct TcResidentQ {
    static constexpr bool kValue = kHeadDim <= 64;
};

// The base-2 logits of one sub-tile in place (sc: raw scores in, with the bias's phase and weekend
// terms over scale2 where kBiasMma; -inf where masked out), slots first + sub + 2 t + c of the
// lane's columns. kMasked: test each element's visibility (where some row of the warp may not
// see some slot of the sub-tile); kRowLast: no visible key is later than its row (RowBias).
template <int kBranch, bool kRowLast, bool kMasked, bool kBiasMma, int kKeyTiles, typename Tiles>
__device__ __forceinline__ void tc_logits(FragC (&sc)[kKeyTiles], const EvoParams& p, const TcTile& tt,
                                          const TcRow (&rw)[2], const RowBias (&rb)[2],
                                          const LocalSeen (&ls)[2], const Tiles& st, int slot0) {
    const float scale2 = p.scale * kLog2e;  // logits in base 2 (RowSoftmax)
    LocalSeen::At at[2];
    if (kBranch == 2 && kMasked) at[0] = ls[0].at(slot0), at[1] = ls[1].at(slot0);
    // Slot 0 of the local branch is the user token, which has no time: only column 0 of the
    // sub-tile at slot 0 can hold it.
    const bool user_col = kBranch == 2 && slot0 < tt.user;
    // Every element is computed and masked after: branching per element on its
    // visibility cost a convergence barrier and a recomputed shared address for each.
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = i >> 1, c = n * 8 + (i & 1), col = c + 2 * (threadIdx.x % 4);
            // With TcBiasMma the phase and weekend terms are in sc already (add_bias_features).
            float bias = kBiasMma
                             ? rb[r].template bucket_term<kRowLast>(st.time[col], p.num_time_buckets)
                             : rb[r].template operator()<kRowLast>(st.time[col], p.num_time_buckets);
            if (kBranch == 2 && c == 0 && user_col) bias = 0.f;
            const float z = fmaf(sc[n].c[i], scale2, bias);
            bool visible = true;
            if constexpr (kBranch == 2) {
                if (kMasked) visible = at[r](c);
            } else {
                visible = slot_visible<kBranch>(rw[r], st.row[col], st.aux[col]);
            }
            sc[n].c[i] = visible ? z : neg_inf();
        }
    }
}

// The sub-tiles of one gather (`slots` of them filled, block-uniform) of branch kBranch: adds
// them to the branch's O_b (acc, unnormalized) and softmax state.
template <typename T, int kHeadDim, int kBranch, bool kRowLast, int kRows>
__device__ __forceinline__ void tc_gather_tiles(const EvoParams& p,
                                                const RowOperand<T, kHeadDim, TcResidentQ<kHeadDim>::kValue>& qf,
                                                const TcTile& tt, const TcRow (&rw)[2], const RowBias (&rb)[2],
                                                const unsigned (&ba)[2],  // bias_row_pair of the rows
                                                const LocalSpan* span,  // per warp
                                                const SlotTiles<T, kHeadDim, kRows>& gathered, int first,
                                                int slots, FragC (&acc)[kHeadDim / 8], RowSoftmax& sm) {
    constexpr int kCols = TcCols<kHeadDim>::kValue;
    // A sub-tile never crosses the end of a gather: a summary gather's low parts follow it.
    static_assert(TcLoad<kHeadDim, kBranch, kRows>::kValue % kCols == 0, "sub-tiles must divide the gather");
    constexpr bool kSummary = kBranch == 0;
    constexpr int kKeyTiles = kCols / 8;
    const int t = threadIdx.x % 4;
    // Local sub-tiles no row of the warp sees are skipped: their elements would all be masked.
    // (The other branches' slots are seen by most rows of a tile alike.) Those every row sees
    // whole skip the per-element mask: 3 of a ctr-base warp's 5 or 6 (w = 64, a user token).
    constexpr int kSubTiles = TcLoad<kHeadDim, kBranch, kRows>::kValue / kCols;
    const LocalSpan& ws = span[threadIdx.x / kWarpSize];
    const unsigned seen = kBranch == 2 ? ws.template sub_tiles<kSubTiles>(first, kCols) : 0u;
    const unsigned full = kBranch == 2 ? ws.template full_tiles<kSubTiles>(first, kCols) : 0u;
    // The local slots each row sees, by number (the slots' rows and kinds are not read).
    LocalSeen ls[2];
    if (kBranch == 2) ls[0] = LocalSeen::make(tt, rw[0]), ls[1] = LocalSeen::make(tt, rw[1]);
#pragma unroll 1
    for (int sub = 0; sub < slots; sub += kCols) {
        if (kBranch == 2 && !((seen >> (sub / kCols)) & 1u)) continue;  // warp-uniform
        FragC sc[kKeyTiles];
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) clear(sc[n]);
        const SlotTiles<T, kHeadDim, kRows> st = gathered.from(sub);
        if (TcBiasMma<kHeadDim>::kValue) add_bias_features<T, kHeadDim, kKeyTiles>(sc, ba, st.k);
        rows_times_tile<T, kHeadDim, kCols>(sc, qf, st.k);
        if (kSummary) rows_times_tile<T, kHeadDim, kCols>(sc, qf, st.k_lo());
        const int slot0 = first + sub + 2 * t;
        if (kBranch == 2 && ((full >> (sub / kCols)) & 1u))  // warp-uniform
            tc_logits<kBranch, kRowLast, false, TcBiasMma<kHeadDim>::kValue>(sc, p, tt, rw, rb, ls, st, slot0);
        else
            tc_logits<kBranch, kRowLast, true, TcBiasMma<kHeadDim>::kValue>(sc, p, tt, rw, rb, ls, st, slot0);
        float corr[2];
        if (sm.update(sc, corr)) scale_rows(acc, corr);
        probs_times_rows<T, kHeadDim, kCols>(acc, sc, st.v, 0);
        if (kSummary) probs_times_rows<T, kHeadDim, kCols>(acc, sc, st.v_lo(), 0);
    }
}

template <typename T, int kHeadDim>
__device__ void evo_forward_tc(const EvoParams& p, const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const float* __restrict__ kbar,
                               const float* __restrict__ vbar, const void* __restrict__ gates,
                               const float* __restrict__ coeffs,
                               const unsigned* __restrict__ rel_time,
                               const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
                               const int* __restrict__ chunk_ends,
                               const int* __restrict__ chunk_counts, T* __restrict__ o,
                               float* __restrict__ lse, const int* __restrict__ tiles,
                               T* __restrict__ branch_out) {
    constexpr int kDimTiles = kHeadDim / 8;
    constexpr int kStage = TcStageRows<kHeadDim>::kValue;
    constexpr int kLoad0 = TcLoad<kHeadDim, 0, kStage>::kValue;
    constexpr int kLoad1 = TcLoad<kHeadDim, 1, kStage>::kValue;
    constexpr int kLoad2 = TcLoad<kHeadDim, 2, kStage>::kValue;
    SPARSECTR_STAGED_SLOT_TILES(gathered, T, kHeadDim);

    const DenseBlock blk = dense_block(p, 1, tiles);
    const int head = blk.head;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;
    const TemporalCoeffs tc{coeffs[head * 3], coeffs[head * 3 + 1], coeffs[head * 3 + 2]};

    const int s = blk.seq;
    const SeqInfo si = seqs[s];
    const int q0 = si.start + blk.tile * kDenseRows;
    if (q0 >= si.end) return;  // block-uniform; the tile list holds none
    const int q_end = min(q0 + kDenseRows, si.end);
    const int chunk_base = s * p.max_chunks;
    const int wq = q0 + warp * 16;
    const int wd0 = weekday0[s];
    TcTile tt;
    TcRow rw[2];
    TokenTime row_time[2];
    tc_setup(p, si, s, q0, q_end, wq, chunk_ends, chunk_counts, rel_time, wd0, &tt, rw, row_time);
    const RowBias rb[2] = {RowBias::make(row_time[0], tc, p.num_time_buckets, kLog2e),
                           RowBias::make(row_time[1], tc, p.num_time_buckets, kLog2e)};
    const float inv_scale2 = __frcp_rn(p.scale * kLog2e);
    const unsigned ba[2] = {bias_row_pair(rb[0], inv_scale2, t), bias_row_pair(rb[1], inv_scale2, t)};
    // Whether the warp's rows attend, and its local span: read after land(0)'s barrier.
    __shared__ LocalSpan sSpan[kDenseThreads / kWarpSize];
    store_local_span(tt, rw,
                     row_is_last(si, rw[0], row_time[0].t, rel_time) && row_is_last(si, rw[1], row_time[1].t, rel_time),
                     &sSpan[warp]);
    RowOperand<T, kHeadDim, TcResidentQ<kHeadDim>::kValue> qf;
    qf.init(q + dense_row<kHeadDim>(p, min(wq + g, si.end - 1), head),
            q + dense_row<kHeadDim>(p, min(wq + g + 8, si.end - 1), head));

    // The gathers of all three branches as one sequence of rounds, [0, end0) the summaries,
    // [end0, end1) the tails, [end1, rounds) the local branch: round r + 1 is issued into the
    // other stage before round r's sub-tiles, across branch boundaries too. Block-uniform.
    const int n0 = tile_slots<0>(tt, p, q_end), n1 = tile_slots<1>(tt, p, q_end),
              n2 = tile_slots<2>(tt, p, q_end);
    const int end0 = (n0 + kLoad0 - 1) / kLoad0, end1 = end0 + (n1 + kLoad1 - 1) / kLoad1;
    const int rounds = end1 + (n2 + kLoad2 - 1) / kLoad2;
    // Slots of round r: its branch, its first slot within the branch, and how many it fills.
    auto round_of = [&](int r, int* first) {
        const int branch = r < end0 ? 0 : r < end1 ? 1 : 2;
        *first = branch == 0 ? r * kLoad0 : branch == 1 ? (r - end0) * kLoad1 : (r - end1) * kLoad2;
        return branch;
    };
    auto issue = [&](int r) {
        int first;
        const int branch = round_of(r, &first);
        const int i = r & 1;
        if (branch == 0)
            issue_gather<0>(tt, si, p, head, chunk_base, chunk_ends, rel_time, k, v, kbar, vbar, first,
                            n0, gathered.stage(i), gathered.raw(i));
        else if (branch == 1)
            issue_gather<1>(tt, si, p, head, chunk_base, chunk_ends, rel_time, k, v, kbar, vbar, first,
                            n1, gathered.stage(i), gathered.raw(i));
        else
            issue_gather<2>(tt, si, p, head, chunk_base, chunk_ends, rel_time, k, v, kbar, vbar, first,
                            n2, gathered.stage(i), gathered.raw(i));
    };
    auto land = [&](int r) {
        int first;
        const int i = r & 1;
        const int branch = round_of(r, &first);
        // The slots' bias features in their K rows' padding; none for the user token (local slot 0).
        land_gather<kHeadDim, kStage, T>(branch, gathered.raw(i), gathered.stage(i).time, wd0,
                                         TcBiasMma<kHeadDim>::kValue ? gathered.stage(i).k : nullptr,
                                         branch == 2 && first == 0 ? tt.user : 0);
        __syncthreads();  // the stage is visible, and every warp is done with the other one
    };

    FragC out[kDimTiles], acc[kDimTiles];
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
        clear(out[dt]);
        clear(acc[dt]);
    }
    RowSoftmax sm;
    sm.init();
    // Normalizes branch b's O_b, adds it to the output with the rows' gates, writes its LSE (and
    // O_b itself when asked: the backward then reads <dO, O_b> instead of a pass over every
    // pair) and starts the next branch.
    auto close_branch = [&](int b) {
        float inv[2];
        sm.finish(inv);
        float weight[2];  // gate / sum per row: O_b's normalization folded into the gated sum
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int qc = min(rw[r].q, si.end - 1);
            weight[r] = load_gate<T>(p, gates, (static_cast<size_t>(qc) * p.heads + head) * 3 + b) * inv[r];
            if (t == 0 && rw[r].q < si.end)
                lse[(static_cast<size_t>(rw[r].q) * p.heads + head) * kNumBranches + b] = sm.lse(r);
            if (branch_out != nullptr && rw[r].q < si.end) {
                T* row = branch_out + ((static_cast<size_t>(rw[r].q) * p.heads + head) * kNumBranches + b) * kHeadDim;
#pragma unroll
                for (int dt = 0; dt < kDimTiles; ++dt)
                    store_pair<T>(row + dt * 8 + 2 * t, acc[dt].c[2 * r] * inv[r], acc[dt].c[2 * r + 1] * inv[r]);
            }
        }
        // One FMA per element where normalizing acc first (scale_rows) took a multiply more.
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) {
            out[dt].c[0] = fmaf(weight[0], acc[dt].c[0], out[dt].c[0]);
            out[dt].c[1] = fmaf(weight[0], acc[dt].c[1], out[dt].c[1]);
            out[dt].c[2] = fmaf(weight[1], acc[dt].c[2], out[dt].c[2]);
            out[dt].c[3] = fmaf(weight[1], acc[dt].c[3], out[dt].c[3]);
            clear(acc[dt]);
        }
        sm.init();
    };

    if (rounds > 0) {
        issue(0);
        land(0);
    }
    int open = 0;  // the branch acc and sm hold
#pragma unroll 1
    for (int r = 0; r < rounds; ++r) {
        int first;
        const int branch = round_of(r, &first);
        while (open < branch) close_branch(open++);  // branches with no slots close empty
        if (r + 1 < rounds) issue(r + 1);
        if (sSpan[warp].live) {  // warp-uniform: none of its rows attends otherwise
            const auto st = gathered.stage(r & 1);
            const LocalSpan* span = sSpan;
            // Warp-uniform: a warp with a candidate requested before its last behavior takes
            // the |dt| form of the bias (and only such a warp: none in BENCH.md's workloads).
            const bool row_last = sSpan[warp].row_last;
            if (branch == 0 && row_last)
                tc_gather_tiles<T, kHeadDim, 0, true>(p, qf, tt, rw, rb, ba, span, st, first, min(kLoad0, n0 - first), acc, sm);
            else if (branch == 0)
                tc_gather_tiles<T, kHeadDim, 0, false>(p, qf, tt, rw, rb, ba, span, st, first, min(kLoad0, n0 - first), acc, sm);
            else if (branch == 1 && row_last)
                tc_gather_tiles<T, kHeadDim, 1, true>(p, qf, tt, rw, rb, ba, span, st, first, min(kLoad1, n1 - first), acc, sm);
            else if (branch == 1)
                tc_gather_tiles<T, kHeadDim, 1, false>(p, qf, tt, rw, rb, ba, span, st, first, min(kLoad1, n1 - first), acc, sm);
            else if (row_last)
                tc_gather_tiles<T, kHeadDim, 2, true>(p, qf, tt, rw, rb, ba, span, st, first, min(kLoad2, n2 - first), acc, sm);
            else
                tc_gather_tiles<T, kHeadDim, 2, false>(p, qf, tt, rw, rb, ba, span, st, first, min(kLoad2, n2 - first), acc, sm);
        }
        if (r + 1 < rounds) land(r + 1);
    }
    while (open < kNumBranches) close_branch(open++);

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rw[r].q >= si.end) continue;
        T* row = o + dense_row<kHeadDim>(p, rw[r].q, head);
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) store_pair<T>(row + dt * 8 + 2 * t, out[dt].c[2 * r], out[dt].c[2 * r + 1]);
    }
}

#define SPARSECTR_FORWARD_TC(NAME, T, D)                                                         \
    extern "C" __global__ void __launch_bounds__(kDenseThreads, kForwardTcMinBlocks<T, D>)       \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const float* __restrict__ kbar,                            \
             const float* __restrict__ vbar, const void* __restrict__ gates,                     \
             const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,            \
             const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,                 \
             const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,           \
             T* __restrict__ o, float* __restrict__ lse, const int* __restrict__ tiles,          \
             T* __restrict__ branch_out) {                                                       \
        evo_forward_tc<T, D>(p, q, k, v, kbar, vbar, gates, coeffs, rel_time, seqs, weekday0,    \
                             chunk_ends, chunk_counts, o, lse, tiles, branch_out);               \
    }
