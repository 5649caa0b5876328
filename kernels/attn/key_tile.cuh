// Backward, key side on tensor cores: what the tails and the local-window kernels share. A block
// holds 64 key rows of one sequence and head (16 per warp, as MMA rows: row g and g + 8 of a
// warp's tile belong to lane (g, t)) and walks ranges of queries in tiles of kCols, as
// dense_backward_key.cu does, but with one branch's softmax (SPEC section 6, dO_b = gate_b dO):
//
//   P^T = exp(z - LSE_b),  dP'^T = V dO^T,  dz^T = gate_b P^T (dP'^T - dgates_b)
//   dV += (gate_b P)^T dO,  dK += dz^T Q    (times scale at the end)
//
// The key rows are the 16-bit K and V of tokens, or (kF32Rows) the f32 chunk summaries Kbar and
// Vbar, multiplied as a high and a low 16-bit part (rows_times_tile_f32).
//
// Which (query, key) pairs count is the caller's `Rows::seen(lo, hi)`, a test `(query, r)` of the
// queries of a walk's [lo, hi) against the lane's rows r = 0 (g) and 1 (g + 8), made once per
// walk: every branch's rows are seen by one interval of queries each, so a pair costs a compare
// or two; in the behaviors' walk of backward_key_tc (D <= 64) a sub-tile inside all of a warp's
// intervals (its rows' keys all seen by all its queries: 3 of a warp's 5 at w = 64) takes no test
// at all. Every key and query here has a time: the user token never enters a tile. Every pair
// that counts has its query at or after its key in the sequence, so no query is earlier than a
// key it sees, and dt + 1 is one add (RowBias, kRowFirst), wherever the queries are behaviors
// (that walk) or the sequence's candidates were requested no earlier than its last behavior
// (every sequence of BENCH.md's workloads; the prefix walks at D >= 64 test it per block).
//
// A prefix walk (tails, summaries) whose block holds 32 key rows or fewer would leave warps with
// no row idle at every tile's barrier: a sequence's P chunk summaries (32 in ctr-base, 16 in
// ctr-small) or P * m tails (16 in ctr-small) are fewer than the block's 64 rows. There two sets
// of two warps hold the same 32 rows, each takes half of every query tile, and reduce_sets() adds
// set 1's dK and dV to set 0's (one order: deterministic), so twice as many warps work.
//
// Q and dO tiles come by cp.async, two stages of them so that the next tile's copies are in
// flight during this tile's MMAs (the tails and summary walks cover the rest of the sequence,
// tens of tiles), and dV += P^T dO, dK += dz^T Q read them through ldmatrix.trans
// (probs_times_rows), so no transposed copy is made. Shared memory: two stages of Q and dO tiles
// [kCols][D + pad] with per query LSE_b, dgates_b, gate_b and time, and the 64 keys' times.
#pragma once

#include "../common/dtype.cuh"
#include "../common/mma.cuh"
#include "../common/params.cuh"
#include "../common/warp.cuh"
#include "temporal.cuh"
#include "query.cuh"
#include "dense.cuh"

// Larger than any token index: "no bound" for a walk's warp limits.
constexpr int kNoKey = 0x7fffffff;

// How a walk's bias takes dt + 1 (KeyTile::walk): |t_q - t_k| + 1 always; t_q - t_k + 1 always
// (no query of the walk is earlier than a key it sees); or either, per block (KeyTile::later).
constexpr int kGapAbs = 0, kGapLater = 1, kGapPerBlock = 2;

// Rows seen by every query at or after their key token: tail tokens (transition branch) and
// chunk summaries, keyed by their chunk's last behavior (global branch).
struct PrefixRows {
    int key[2];  // the lane's rows g and g + 8; -1 where none

    // Which queries of a walk's [lo, hi) see the lane's rows: [key, hi). Three registers through
    // the walk: the local rows' two intervals (LocalRows::Seen) made the summaries' D = 32 kernel
    // spill 12 B at its 168-register cap on sm_90 (NVRTC 13.0).
    struct Seen {
        int from[2];  // kNoKey where the row is none
        int hi;
        __device__ __forceinline__ bool operator()(int query, int r) const { return (query >= from[r]) & (query < hi); }
    };
    __device__ __forceinline__ Seen seen(int lo, int hi) const {
        (void)lo;
        return Seen{{key[0] >= 0 ? key[0] : kNoKey, key[1] >= 0 ? key[1] : kNoKey}, hi};
    }
    // The warp's smallest key (kNoKey if it has no row): no query before it sees any of its rows.
    __device__ __forceinline__ int warp_first() const {
        int first = min(key[0] >= 0 ? key[0] : kNoKey, key[1] >= 0 ? key[1] : kNoKey);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) first = min(first, __shfl_xor_sync(kFullMask, first, off));
        return first;
    }
};

// Warp sets of a prefix walk over a block with `rows` key rows at most (see the top): each set's
// half of a kCols-query tile must be whole 16-query sub-tiles.
template <int kCols>
__device__ __forceinline__ int walk_sets(int rows) {
    return kCols >= 2 * 16 && rows <= kDenseRows / 2 ? 2 : 1;
}

// The warp's place in a walk of `sets` sets: its rows are those of warp `row_warp` of a
// one-set walk (rows row_warp * 16 + g and + 8 of the block), and it takes the sub-tiles j of
// each query tile with j % sets == set.
struct WalkSet {
    int row_warp, set;
    __device__ __forceinline__ static WalkSet of(int sets) {
        const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
        // A constant where the caller's is (the local walks): the compiler cannot know warp < 4.
        if (sets == 1) return WalkSet{warp, 0};
        const int row_warps = kDenseWarps / sets;
        return WalkSet{warp % row_warps, warp / row_warps};
    }
};

// Queries per tile of a prefix walk: at least 32, so that two warp sets can take 16 each (the
// local walk's 16 at D = 128 would leave the second set of a 32-row block nothing).
template <typename T, int kHeadDim>
struct PrefixCols {
    static constexpr int kValue = DenseCols<T, kHeadDim>::kKey < 32 ? 32 : DenseCols<T, kHeadDim>::kKey;
};

// kReads: how the walk's K Q^T and V dO^T read their B fragments (rows_times_tile); kTileCols:
// queries per tile (the walk's two stages); kMinStages: elements of T that each of the Q and dO
// arrays holds at least (another walk of the kernel uses them: backward_key_tc.cu's stored walk);
// kBiasMma: the bias's phase and weekend terms by add_bias_features (dense.cuh), from features
// that land() writes into the Q rows' padding, instead of three FFMAs a pair.
template <typename T, int kHeadDim, bool kF32Rows = false, int kReads = kLdsmX4,
          int kTileCols = DenseCols<T, kHeadDim>::kKey, int kMinStages = 0, bool kBiasMma = true>
struct KeyTile {
    static constexpr int kCols = kTileCols;
    static constexpr bool kResident = DenseResident<T, kHeadDim>::kValue;
    static constexpr int kPad = SmemPad<T>::kValue;
    static constexpr int kDimTiles = kHeadDim / 8;
    // Queries per sub-tile of a prefix walk: half a tile, so that two warp sets take one each.
    // One instantiation serves one and two sets: two (whole tiles for one set) pushed the tails
    // kernel to 255 registers and spills at D = 64, and to spills at D = 32 (NVRTC 13.0, sm_90).
    static constexpr int kPrefixSub = kCols >= 32 ? kCols / 2 : kCols;
    // The bias of the prefix walks (walk()): in two forms at D >= 64 only. Every sub-tile of
    // theirs is masked (no kSplitFull). More spilled at the 128- and 168-register caps (NVRTC
    // 13.0: summaries at D = 32 and 64, tails at D = 32).
    static constexpr int kPrefixGap = kHeadDim >= 64 ? kGapPerBlock : kGapAbs;

    // What a walk reads.
    struct Inputs {
        const T* __restrict__ q;
        const T* __restrict__ d_o;
        const float* __restrict__ lse;
        const float* __restrict__ dgates;
        const void* __restrict__ gates;
        const unsigned* __restrict__ rel_time;
    };

    // Two stages of the query tiles (stage i from element i * kTile, or i * kCols per query):
    // the walk issues the next tile's copies into one before its MMAs on the other.
    static constexpr int kTile = kCols * (kHeadDim + kPad);
    // Elements of each of the Q and dO arrays: two stages, or kMinStages.
    static constexpr int kStages = 2 * kTile > kMinStages ? 2 * kTile : kMinStages;
    // Bytes of the arrays SPARSECTR_KEY_TILE_SMEM declares (the kernels' register budgets,
    // min_blocks_per_sm, count them).
    static constexpr int kSmemBytes =
        2 * kStages * static_cast<int>(sizeof(T)) +
        2 * kCols * static_cast<int>(3 * sizeof(float) + sizeof(unsigned) + sizeof(TokenTime)) +
        kDenseRows * static_cast<int>(sizeof(TokenTime));
    T* sQ;
    T* sdO;
    float* sLse;      // as in memory (natural log), landed by cp.async
    float* sDg;       // landed by cp.async
    unsigned* sRaw;   // the queries' times, landed by cp.async
    float* sGate;
    TokenTime* sTime;
    const TokenTime* sKeyTime;  // [kDenseRows]: the block's keys' times, filled by the caller
    const EvoParams* p;
    Inputs in;
    int head, weekday0, branch;
    // No candidate of the sequence was requested before its last behavior: then no query is
    // earlier than a key it sees (keys are behaviors, summaries timed by their chunk's last
    // behavior, or candidates seen only by themselves). Block-uniform; set by find_order().
    bool later;
    TemporalCoeffs coeffs;
    RowOperand<T, kHeadDim, kResident> kf, vf;  // token rows (!kF32Rows)
    const float* fk[2];                          // summary rows g and g + 8 (kF32Rows)
    const float* fv[2];
    FragC dk[kDimTiles], dv[kDimTiles];

    // Everything but the rows: the walk's inputs, head, sequence and branch; clears dK and dV.
    __device__ __forceinline__ void begin(const EvoParams& params, const Inputs& inputs,
                                          const float* __restrict__ all_coeffs, int h, int wd0, int b) {
        p = &params;
        in = inputs;
        head = h;
        weekday0 = wd0;
        branch = b;
        later = false;
        coeffs = TemporalCoeffs{all_coeffs[h * 3], all_coeffs[h * 3 + 1], all_coeffs[h * 3 + 2]};
        clear_acc();
    }

    // Sets `later` for sequence si, for walks of kGapPerBlock. Called by every thread. Once per block,
    // not per query tile: a test in every tile's barrier kept two more registers through the walk,
    // which spilled the prefix walks at their caps (NVRTC 13.0).
    __device__ __forceinline__ void find_order(const SeqInfo& si) {
        bool ok = true;
        if (si.candidates > si.behaviors) {
            const unsigned last = in.rel_time[si.candidates - 1];
            for (int c = si.candidates + static_cast<int>(threadIdx.x); c < si.end; c += kDenseThreads)
                ok = ok && in.rel_time[c] >= last;
        }
        later = __syncthreads_and(ok) != 0;
    }

    __device__ __forceinline__ void clear_acc() {
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) {
            clear(dk[dt]);
            clear(dv[dt]);
        }
    }

    // Issues query tile [qt, qt + kCols) of [.., hi) into stage i: Q and dO rows, LSE_b, dgates_b
    // and times by cp.async; returns the gate of this thread's query (threads < kCols), which
    // land() stores.
    __device__ __forceinline__ float issue(int qt, int lo, int hi, int i) const {
        const EvoParams& pp = *p;
        tile_rows_async<T, kHeadDim, kCols>(pp, in.q, qt, hi, head, sQ + i * kTile);
        tile_rows_async<T, kHeadDim, kCols>(pp, in.d_o, qt, hi, head, sdO + i * kTile);
        const int tid = threadIdx.x;
        float gate = 0.f;
        if (tid < kCols) {
            const int query = qt + tid, at = i * kCols + tid;
            const bool inside = query < hi;
            const size_t b_at = (static_cast<size_t>(inside ? query : lo) * pp.heads + head) * kNumBranches + branch;
            cp_async<4>(sLse + at, in.lse + b_at, inside);
            cp_async<4>(sDg + at, in.dgates + b_at, inside);
            cp_async<4>(sRaw + at, in.rel_time + (inside ? query : lo), inside);
            gate = inside ? load_gate<T>(pp, in.gates, b_at) : 0.f;
        }
        return gate;
    }

    // Completes stage i for the block: this thread's copies, its query's time and gate, then a
    // barrier (after which every warp is also done with the other stage).
    __device__ __forceinline__ void land(int i, float gate) const {
        cp_async_wait_all();
        const int tid = threadIdx.x;
        if (tid < kCols) {
            const TokenTime x = token_time_fast(sRaw[i * kCols + tid], weekday0);
            sTime[i * kCols + tid] = x;
            sGate[i * kCols + tid] = gate;
            // The query's bias features in its Q row's padding (add_bias_features, dense.cuh).
            if (kBiasMma)
                *reinterpret_cast<uint4*>(sQ + i * kTile + tid * (kHeadDim + kPad) + kHeadDim) = bias_column_features(x);
        }
        __syncthreads();
    }

    // P^T (gated) and dz^T of one sub-tile in place, from the raw K Q^T in pt and V dO^T in dst.
    // kLater: no query of the sub-tile is earlier than a key it sees (`later`); kMasked: test
    // each pair (the sub-tile is not inside every row's interval of the warp).
    template <bool kLater, bool kMasked, int kSubTiles, typename Seen>
    __device__ __forceinline__ void sub_tile_probs(FragC (&pt)[kSubTiles], FragC (&dst)[kSubTiles],
                                                   const RowBias (&kb)[2], const Seen& seen, int qs,
                                                   const float* tLse, const float* tDg, const float* tGate,
                                                   const TokenTime* tTime) const {
        const EvoParams& pp = *p;
        const int t = threadIdx.x % 4;
        const float scale2 = pp.scale * kLog2e;
#pragma unroll
        for (int n = 0; n < kSubTiles; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                // Computed for every element and masked after: a branch per element costs more
                // than the work it skips.
                const int r = e >> 1, col = n * 8 + 2 * t + (e & 1), query = qs + col;
                // With kBiasMma the phase and weekend terms are in pt already.
                const float bias = kBiasMma ? kb[r].template bucket_term<false, kLater>(tTime[col], pp.num_time_buckets)
                                            : kb[r].template operator()<false, kLater>(tTime[col], pp.num_time_buckets);
                const float z = fmaf(pt[n].c[e], scale2, bias);
                float gp = tGate[col] * fast_exp2(fmaf(tLse[col], -kLog2e, z));
                if (kMasked && !seen(query, r)) gp = 0.f;
                pt[n].c[e] = gp;
                dst[n].c[e] = gp * (dst[n].c[e] - tDg[col]);
            }
        }
    }

    // Queries [lo, hi). A warp skips the tiles entirely before `warp_first` (its smallest key: no
    // query there sees any of its rows) or after `warp_last` (its last visible query), and within
    // a tile the sub-tiles of kSub queries outside them: a local window's walk (backward_key_tc)
    // covers 64 + w - 1 queries of which a warp's 16 keys are seen by 16 + w - 1 (79 of 128 at
    // w = 64), so 16-query sub-tiles skip about a third of its MMAs, where a whole 64-query tile
    // skipped none. The prefix walks (tails, summaries) take half tiles (walk_prefix): every
    // query at or after a key sees it. The tiles are pipelined: tile qt + kCols is in flight
    // during tile qt's MMAs. With `sets` warp sets (walk_sets), kSub * sets must divide kCols; the
    // sums are partial until reduce_sets().
    //
    // kSplitFull: the sub-tiles inside every row's interval of the warp go unmasked. kGap: how the
    // bias takes dt + 1 (kGapAbs, kGapLater where no query is earlier than a key it sees, or
    // kGapPerBlock: either, as `later` says).
    template <int kSub = kCols, bool kSplitFull = false, int kGap = kGapAbs, typename Rows>
    __device__ __forceinline__ void walk(const Rows& rows, int lo, int hi, int warp_first, int warp_last,
                                         int sets = 1) {
        // With kGapPerBlock the form is chosen for the whole walk (two copies of it): chosen per
        // query tile, its test and flag through the walk spilled the prefix walks at their caps
        // (NVRTC 13.0).
        if constexpr (kGap == kGapLater) {
            walk_form<kSub, true, kSplitFull>(rows, lo, hi, warp_first, warp_last, sets);
        } else if constexpr (kGap == kGapPerBlock) {
            if (later)
                walk_form<kSub, true, kSplitFull>(rows, lo, hi, warp_first, warp_last, sets);
            else
                walk_form<kSub, false, kSplitFull>(rows, lo, hi, warp_first, warp_last, sets);
        } else {
            walk_form<kSub, false, kSplitFull>(rows, lo, hi, warp_first, warp_last, sets);
        }
    }

    // walk() with the bias's form fixed (kLater) and, with kSplitFull, the sub-tiles inside every
    // row's interval of the warp unmasked.
    template <int kSub, bool kLater, bool kSplitFull, typename Rows>
    __device__ __forceinline__ void walk_form(const Rows& rows, int lo, int hi, int warp_first, int warp_last,
                                              int sets) {
        static_assert(kCols % kSub == 0 && kSub % 16 == 0, "sub-tiles of whole MMA k-steps");
        constexpr int kSubTiles = kSub / 8;
        const EvoParams& pp = *p;
        const int lane = threadIdx.x % kWarpSize;
        const int g = lane >> 2;
        const WalkSet ws = WalkSet::of(sets);
        const int key_slot[2] = {ws.row_warp * 16 + g, ws.row_warp * 16 + g + 8};
        // Logits in base 2 against LSE * log2 e: one ex2 per pair instead of expf's eight
        // instructions. The bias is symmetric in query and key (dt = |tq - tk|, and Hr, Wk), so
        // each of the lane's two keys folds it once, as a query row does in the forward.
        __syncthreads();  // the caller's sKeyTime is written, and an earlier walk is done
        const RowBias kb[2] = {RowBias::make(sKeyTime[key_slot[0]], coeffs, pp.num_time_buckets, kLog2e),
                               RowBias::make(sKeyTime[key_slot[1]], coeffs, pp.num_time_buckets, kLog2e)};
        const float inv_scale2 = __frcp_rn(pp.scale * kLog2e);
        unsigned ka[2] = {0u, 0u};
        if (kBiasMma) ka[0] = bias_row_pair(kb[0], inv_scale2, lane & 3), ka[1] = bias_row_pair(kb[1], inv_scale2, lane & 3);
        // Testing the branch's rule per pair compiled to two branches and a convergence barrier
        // each, about 15 of the local walk's 443 SASS instructions per pair (sm_90, D = 64).
        const typename Rows::Seen seen = rows.seen(lo, hi);
        // The queries that see every row of the warp: the intersection [full_lo, full_hi) of its
        // rows' intervals (Rows::Seen::lo_of, hi_of). Empty without kSplitFull.
        int full_lo = kNoKey, full_hi = 0;
        if constexpr (kSplitFull) {
            full_lo = max(seen.lo_of(0), seen.lo_of(1));
            full_hi = min(seen.hi_of(0), seen.hi_of(1));
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                full_lo = max(full_lo, __shfl_xor_sync(kFullMask, full_lo, off));
                full_hi = min(full_hi, __shfl_xor_sync(kFullMask, full_hi, off));
            }
        }
        if (lo < hi) land(0, issue(lo, lo, hi, 0));
        int i = 0;
#pragma unroll 1
        for (int qt = lo; qt < hi; qt += kCols, i ^= 1) {
            const bool more = qt + kCols < hi;  // block-uniform
            const float next_gate = more ? issue(qt + kCols, lo, hi, i ^ 1) : 0.f;
#pragma unroll 1
            for (int sub = ws.set * kSub; sub < kCols; sub += sets * kSub) {
                const int qs = qt + sub;
                // Warp-uniform.
                if (qs + kSub - 1 < warp_first || qs > warp_last || qs >= hi) continue;
                const T* tQ = sQ + i * kTile + sub * (kHeadDim + kPad);
                const T* tdO = sdO + i * kTile + sub * (kHeadDim + kPad);
                const float* tLse = sLse + i * kCols + sub;
                const float* tDg = sDg + i * kCols + sub;
                const float* tGate = sGate + i * kCols + sub;
                const TokenTime* tTime = sTime + i * kCols + sub;
                FragC pt[kSubTiles], dst[kSubTiles];  // P^T, then dP'^T and dz^T
#pragma unroll
                for (int n = 0; n < kSubTiles; ++n) {
                    clear(pt[n]);
                    clear(dst[n]);
                }
                if (kBiasMma) add_bias_features<T, kHeadDim, kSubTiles>(pt, ka, tQ);
                if (kF32Rows) {
                    rows_times_tile_f32<T, kHeadDim, kSub>(pt, fk, tQ);
                    rows_times_tile_f32<T, kHeadDim, kSub>(dst, fv, tdO);
                } else {
                    rows_times_tile<T, kHeadDim, kSub, kReads>(pt, kf, tQ);
                    rows_times_tile<T, kHeadDim, kSub, kReads>(dst, vf, tdO);
                }
                if (kSplitFull && qs >= full_lo && qs + kSub <= full_hi)  // warp-uniform
                    sub_tile_probs<kLater, false>(pt, dst, kb, seen, qs, tLse, tDg, tGate, tTime);
                else
                    sub_tile_probs<kLater, true>(pt, dst, kb, seen, qs, tLse, tDg, tGate, tTime);
                probs_times_rows<T, kHeadDim, kSub>(dv, pt, tdO, 0);
                probs_times_rows<T, kHeadDim, kSub>(dk, dst, tQ, 0);
            }
            if (more) land(i ^ 1, next_gate);
        }
    }

    // A prefix walk of queries [lo, hi) (tails, summaries: PrefixRows) in `sets` warp sets
    // (walk_sets), dK and dV whole in set 0 on return.
    template <typename Rows>
    __device__ __forceinline__ void walk_prefix(const Rows& rows, int lo, int hi, int sets, const SeqInfo& si) {
        if (kPrefixGap == kGapPerBlock) find_order(si);
        walk<kPrefixSub, false, kPrefixGap>(rows, lo, hi, rows.warp_first(), kNoKey, sets);
        reduce_sets(sets);
    }

    // After a walk of `sets` sets: set 1's dK and dV are added to set 0's through the query
    // tiles' shared memory, which the walk no longer reads. Only set 0's sums are whole after it.
    // Called by every thread.
    __device__ __forceinline__ void reduce_sets(int sets) {
        if (sets == 1) return;  // block-uniform
        // A warp's accumulators, lane-interleaved so that a store or load of one is conflict-free.
        constexpr int kPerWarp = kDimTiles * 4 * kWarpSize;
        static_assert(kCols < 32 || 2 * kPerWarp * sizeof(float) <= 2 * kTile * sizeof(T),
                      "two warps' sums fit a stage pair of Q (dK) and of dO (dV)");
        float* const part_dk = reinterpret_cast<float*>(sQ);
        float* const part_dv = reinterpret_cast<float*>(sdO);
        const WalkSet ws = WalkSet::of(sets);
        const int at = ws.row_warp * kPerWarp + threadIdx.x % kWarpSize;
        __syncthreads();  // every warp is done with the query tiles
        if (ws.set == 1) {
#pragma unroll
            for (int dt = 0; dt < kDimTiles; ++dt) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    part_dk[at + (dt * 4 + i) * kWarpSize] = dk[dt].c[i];
                    part_dv[at + (dt * 4 + i) * kWarpSize] = dv[dt].c[i];
                }
            }
        }
        __syncthreads();
        if (ws.set == 0) {
#pragma unroll
            for (int dt = 0; dt < kDimTiles; ++dt) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    dk[dt].c[i] += part_dk[at + (dt * 4 + i) * kWarpSize];
                    dv[dt].c[i] += part_dv[at + (dt * 4 + i) * kWarpSize];
                }
            }
        }
    }
};

// Declares the shared tiles of a KeyTile walk and points `kt` at them (a macro: `__shared__`
// arrays must be declared in the kernel's own scope). KeyTile::kSmemBytes counts them.
#define SPARSECTR_KEY_TILE_SMEM(kt, T, D)                                                         \
    constexpr int kKtCols_ = decltype(kt)::kCols;                                               \
    alignas(16) __shared__ T sQ_[decltype(kt)::kStages];                                        \
    alignas(16) __shared__ T sdO_[decltype(kt)::kStages];                                       \
    __shared__ float sLse_[2 * kKtCols_];                                                       \
    __shared__ float sDg_[2 * kKtCols_];                                                        \
    __shared__ unsigned sRaw_[2 * kKtCols_];                                                    \
    __shared__ float sGate_[2 * kKtCols_];                                                      \
    __shared__ TokenTime sTime_[2 * kKtCols_];                                                  \
    __shared__ TokenTime sKeyTime_[kDenseRows];                                                 \
    static_assert(sizeof(sQ_) + sizeof(sdO_) + sizeof(sLse_) + sizeof(sDg_) + sizeof(sRaw_) +    \
                          sizeof(sGate_) + sizeof(sTime_) + sizeof(sKeyTime_) ==                \
                      decltype(kt)::kSmemBytes,                                                 \
                  "KeyTile::kSmemBytes must count the tiles");                                  \
    kt.sQ = sQ_;                                                                                \
    kt.sdO = sdO_;                                                                              \
    kt.sLse = sLse_;                                                                            \
    kt.sDg = sDg_;                                                                              \
    kt.sRaw = sRaw_;                                                                            \
    kt.sGate = sGate_;                                                                          \
    kt.sTime = sTime_;                                                                          \
    kt.sKeyTime = sKeyTime_
