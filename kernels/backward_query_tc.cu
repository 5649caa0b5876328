// Backward, query side, on tensor cores (bf16, f16): the twin of backward_query.cu for a block of
// 64 queries of one sequence and head, over the same slots as forward_tc.cu. For each branch b,
// two passes over its slots:
//
//   1. P = exp(z - LSE_b) and dP' = dO V^T give dgates_b = sum_j P_j dP'_j = <dO, O_b>;
//   2. dz_j = gate_b P_j (dP'_j - dgates_b) (SPEC section 6 with dO_b = gate_b dO), then
//      dQ += scale dz K on tensor cores, and the row's share of dcoeffs += dz (Bk, Hr, Wk).
//
// When the forward saved each branch's O_b (`branch_out`, [T, H, 3, D] in T), pass 1 is skipped
// and pass 2 centres dz on D~ = <dO, O_b> of the saved O_b, as FlashAttention's backward takes
// rowsum(dO * O) from its saved output: pass 1 repeats pass 2's logits, exponentials and dO V^T
// MMAs, about 40% of the kernel. D~ is off the row's own sum_j P_j dP'_j by the rounding of O_b
// (and of P in the forward's P V MMA) to T, so pass 2 also adds that sum up (the exact dgates_b,
// written out and read by the key side) and sum_j P_j (Bk, Hr, Wk), and corrects dcoeffs by
// gate_b (D~ - dgates_b) times it: dz_j sums to zero over a softmax only with the exact dgates_b,
// and uncorrected, the rows' small offsets added up to 7e-3 of dcoeffs (bf16, emulation). dQ
// keeps D~'s error, FlashAttention's: 2^-9 of the row's terms in bf16 (a correction would need
// sum_j P_j K_j, 32 more registers at D = 64). Without branch outputs, both passes run, D~ is
// pass 1's sum itself and the correction is zero.
//
// Outputs as the warp kernel's (dQ, dgates [T, H, 3], per-(head, token) dcoeff partials), so the
// summary and key kernels and the reduction run unchanged, and the user token's share of dK and
// dV from this tile's queries: every query's local window holds the user token (slot 0), so this
// kernel already has its P, dP' and each query's Q and dO rows. The block adds them up over its
// 64 queries, `scale^-1 dK_u = sum_q dz_qu Q_q` and `dV_u = sum_q gate P_qu dO_q`, into one
// partial per (sequence tile, head) (user_partial_tile), and backward_user_reduce.cu adds a
// sequence's partials in tile order: a separate pass over every query's Q and dO for one key
// row per sequence read 2 GB at ctr-base n = 4096 (backward_user_key.cu, 1.65 ms in ncu before
// it took 16 warps per sequence). Chunk summaries enter the MMAs as a
// 16-bit high part plus the 16-bit rest. Each output element has one writer: no atomics.
//
// With stored pairs (`pairs` not null, LocalPairs::Stored in src/cuda/backward.rs) part 0 also
// writes each behavior row's local pairs, gate P and dz~ (dz centred on D~), and the row's
// delta = D~ - dgates_b for the key side (attn/stored_pairs.cuh), which then skips its own
// logits, exponentials and dO V^T for them. A copy of the local branch's pass does the stores,
// so the kernel without them runs the same instructions as before.
//
// The kernel is latency bound (ncu on an H100 at bbd2154: 18.6% occupancy, SM 33%, memory 36%).
// So slots are gathered TcLoad at a time with one round of loads between barriers (the copying
// threads work out their slots' rows themselves, and the times land by cp.async with the token
// rows: issue_gather), and the MMAs walk them in sub-tiles of kCols; a branch whose slots fit one
// gather (every branch of ctr-base: 32 summaries, 64 tails, a local window of 128 slots) keeps
// them for its second pass. dQ's MMA reads K from the row tile (probs_times_rows), so no
// transposed copy is made. Not pipelined as the forward is: a local window that needs both
// stages for its two passes would leave none to load the next branch into.
//
// Shared memory: K, V [TcRows][D + pad] (summaries' low parts in their upper halves), with the
// slots' rows and times: at most 40.4 KB (D = 64 with 128 rows; ptxas, NVRTC 13.0).
//
// @instantiate SPARSECTR_BACKWARD_QUERY_TC dtype16 head_dim

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
#include "attn/stored_pairs.cuh"

// Three blocks per SM where ptxas fits them without spills (NVRTC 13.0): D = 32, and D = 64 on
// sm_90 (16 B spilled on sm_80, 4 B on sm_100). As latency bound as the forward (ncu on an H100:
// 76% of cycles with no eligible warp at two blocks). Where shared memory holds fewer blocks (two
// at D = 64 on sm_12x), that many.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kBwdQueryTcSm90 = !kArchSm10x;
#else
constexpr bool kBwdQueryTcSm90 = false;
#endif
// Floats of the shared per-thread sums and values (BwdTcContext::pf), in rows of kDenseThreads
// floats: the sums of the D~ correction (bwd_tc_branch), the features' MMA accumulators as one
// float4 a thread over rows 0-3 and the thread's bucket sums for its two rows as one float2 a
// thread over rows kPfBucket and kPfBucket + 1 (rows 6 and 7 unused); then, in the threads that hold a row's
// first column, the row's gate P of the user slot (kPfUser + r) and its dP', then dz
// (kPfUser + 2 + r). Beside the sums, the user slot's values take no register of their own: at
// the D = 64 kernel's 168-register cap, a shared row array's address through the pair loop
// spilled 16 B on sm_90 (NVRTC 13.0).
constexpr int kPfBucket = 4;
constexpr int kPfUser = 8;
// Then, as [kDenseRows] records of 16 bytes, each block row's stored pairs (attn/
// stored_pairs.cuh): the element index of local slot 0's entry in the row (were slot 0 a
// behavior), and the slots [lo, hi) it stores (empty where the row stores none). Read at each
// store: held in registers through the pair loop, such values spilled 32-80 B on sm_90 at
// D = 64 (NVRTC 13.0).
constexpr int kPfPairs = kPfUser + 4;
constexpr int kBwdQueryPfFloats = (kPfPairs + 2) * kDenseThreads;
static_assert(2 * kDenseThreads * sizeof(float) == kDenseRows * 16, "a record per block row");

template <typename T, int kHeadDim>
constexpr int kBwdQueryTcMinBlocks =
    min_blocks_per_sm(kHeadDim == 32 || (kHeadDim == 64 && kBwdQueryTcSm90) ? 3 : 2,
                      kSlotTilesSmemBytes<T, kHeadDim> +
                          kBwdQueryPfFloats * static_cast<int>(sizeof(float)));

// Slots per MMA sub-tile: wider tiles spilled (NVRTC 13.0) at D >= 64, and at D = 32 once every
// element's logit is computed unconditionally (32 slots: 8 B in f16 on sm_90).
template <int kHeadDim>
struct BwdTcCols {
    static constexpr int kValue = 16;
};

// dO rows stay in registers at D = 32 only, Q rows up to D = 64; beyond, they are reloaded from
// L1 at each use (the 64 dQ accumulators of D = 128 left no room: 276 B spilled).
template <int kHeadDim>
struct BwdTcResidentDo {
    static constexpr bool kValue = kHeadDim == 32;
};
template <int kHeadDim>
struct BwdTcResidentQ {
    static constexpr bool kValue = kHeadDim <= 64;
};

// Blocks that share a tile's rows, each accumulating its part of dQ's dimensions (and
// recomputing the tile's P and dz): D = 128 spilled 272 B with all 128 in one block. Mirrored by
// `backward_query_parts` in src/cuda/backward.rs.
template <int kHeadDim>
struct BwdTcParts {
    static constexpr int kValue = kHeadDim == 128 ? 2 : 1;
};

// How QK^T and dO V^T read their B fragments (rows_times_tile): ldmatrix .x4, one instruction
// for two MMAs where load_b took four. It spilled 32 B at D = 64 under the 168-register cap
// until sessions 35-36 shortened the pair loop; now none (NVRTC 13.0, sm_90), and the sub-tile
// trips of the summaries / tails / local loops go 410 / 346 / 369 -> 366 / 321 / 346 SASS
// instructions (D = 32: 351 / 315 / 336 -> 329 / 304 / 325; D = 128: 507 / 401 / 414 -> 412 /
// 362 / 366).
constexpr int kBwdTcReads = kLdsmX4;

// Whether P's exponential tests its logit for -inf first, which the value does not need (ex2(-inf)
// is 0; the test was there for -inf - -inf, an empty row's logit less its LSE): only at D = 64, where ptxas spilled 48 B without
// the test (sm_90, NVRTC 13.0), though the sub-tile loops were 347 / 295 / 322 -> 332 / 284 /
// 300 SASS instructions. D = 32: 301 / 275 / 301 -> 285 / 260 / 281; D = 128: 383 / 331 / 341
// -> 369 / 318 / 322.
template <int kHeadDim>
constexpr bool kBwdTcTestMasked = kHeadDim == 64;

// Everything one branch's passes read.
template <typename T, int kHeadDim>
struct BwdTcContext {
    const EvoParams* p;
    int head, chunk_base, wd0, q_end;
    SeqInfo si;
    TcTile tt;
    TcRow rw[2];
    TokenTime row_time[2];
    RowBias rb[2];  // logits in base 2: scale and bias times log2 e, against LSE times log2 e
    unsigned bias_a[2];  // the rows' A fragment of add_bias_features
    float scale2;
    bool warp_live;
    const T* k;
    const T* v;
    const float* kbar;
    const float* vbar;
    const int* chunk_ends;
    const unsigned* rel_time;
    unsigned* raw_time;  // shared: the slots' times as their copies land
    float* pf;           // shared kBwdQueryPfFloats: the sum_j P_j (Bk, Hr, Wk) sums, each
                         // thread's rows' user-slot values, and the rows' pair records
    T* pairs;           // stored pairs (kStore)
    float* pair_delta;  // stored pairs' deltas, or null
};

// Block row `row`'s stored-pair record (kPfPairs): {slot 0's element index (low, high), lo, hi}.
// An asm volatile load where compiled for a GPU: a load hoisted out of the pair loop would hold
// its registers there.
__device__ __forceinline__ uint4* pair_record(float* pf, int row) {
    return reinterpret_cast<uint4*>(pf + kPfPairs * kDenseThreads) + row;
}
// Whether this thread's row r (g or g + 8 of its warp) stores pairs.
__device__ __forceinline__ bool stores_pairs(float* pf, int r) {
    const uint4 rec = *pair_record(pf, static_cast<int>(threadIdx.x) / kWarpSize * 16 +
                                           (static_cast<int>(threadIdx.x) % kWarpSize) / 4 + 8 * r);
    return rec.z < rec.w;  // lo < hi (as unsigned: the empty record's lo is 2^30, its hi 0)
}
__device__ __forceinline__ uint4 load_pair_record(float* pf, int row) {
    const uint4* at = pair_record(pf, row);
#ifdef __CUDA_ARCH__
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(static_cast<unsigned>(__cvta_generic_to_shared(at))));
    return v;
#else
    return *at;
#endif
}

// A row's bias constant less its branch's LSE (natural log, from the forward) in base 2, for
// bwd_tile_scores. +inf for a row with no key in the branch (LSE -inf), which no logit of the
// row keeps: they are all masked, -inf.
__device__ __forceinline__ float base_of_branch(const RowBias& rb, float lse) {
    return fmaf(lse, -kLog2e, rb.base);
}

// log2 P (the base-2 logits less the rows' LSE; -inf where masked) into sc and dP' = dO V^T into
// dp for one tile of slots, the branch's slots [first, first + kCols). base_b: the rows' bias
// constant (RowBias::base) less their LSE in base 2, once per row and branch, where subtracting
// the LSE from each logit took an FADD an element (sub-tile trips at D = 64 354 / 302 / 329 ->
// 347 / 295 / 322, sm_90).
template <typename T, int kHeadDim, int kBranch, int kCols>
__device__ __forceinline__ void bwd_tile_scores(const BwdTcContext<T, kHeadDim>& c,
                                                const SlotTiles<T, kHeadDim>& sm, int first,
                                                const RowOperand<T, kHeadDim, BwdTcResidentQ<kHeadDim>::kValue>& qf,
                                                const RowOperand<T, kHeadDim, BwdTcResidentDo<kHeadDim>::kValue>& dof,
                                                const float (&base_b)[2], FragC (&sc)[kCols / 8],
                                                FragC (&dp)[kCols / 8]) {
    constexpr bool kSummary = kBranch == 0;
    RowBias rb[2] = {c.rb[0], c.rb[1]};
    rb[0].base = base_b[0];
    rb[1].base = base_b[1];
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < kCols / 8; ++n) {
        clear(sc[n]);
        clear(dp[n]);
    }
    add_bias_features<T, kHeadDim, kCols / 8>(sc, c.bias_a, sm.v);  // phase and weekend terms
    rows_times_tile<T, kHeadDim, kCols, kBwdTcReads>(sc, qf, sm.k);
    rows_times_tile<T, kHeadDim, kCols, kBwdTcReads>(dp, dof, sm.v);
    if (kSummary) {
        rows_times_tile<T, kHeadDim, kCols, kBwdTcReads>(sc, qf, sm.k_lo());
        rows_times_tile<T, kHeadDim, kCols, kBwdTcReads>(dp, dof, sm.v_lo());
    }
    // The lane's columns are slots first + 2 t + c; local slots are tested by number (LocalSeen).
    const int slot0 = first + 2 * t;
    LocalSeen::At at[2];
    if (kBranch == 2)
        at[0] = LocalSeen::make(c.tt, c.rw[0]).at(slot0), at[1] = LocalSeen::make(c.tt, c.rw[1]).at(slot0);
#pragma unroll
    for (int n = 0; n < kCols / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            // Computed for every element and masked after, as in the forward.
            const int r = i >> 1, cc = n * 8 + (i & 1), col = cc + 2 * t;
            float bias = rb[r].bucket_term(sm.time[col], c.p->num_time_buckets);
            // Local slot 0, the user token where there is one, has no time: only a lane's first
            // column (cc = 0) can be it.
            // Its bias is 0: the LSE's share alone (within an ulp of base_b's rounding).
            if (kBranch == 2 && cc == 0 && slot0 < c.tt.user) bias = base_b[r] - c.rb[r].base;
            const float z = fmaf(sc[n].c[i], c.scale2, bias);
            bool visible;
            if constexpr (kBranch == 2) visible = at[r](cc);
            else visible = slot_visible<kBranch>(c.rw[r], sm.row[col], sm.aux[col]);
            sc[n].c[i] = visible ? z : neg_inf();
        }
    }
}

// kStore's stores of one 8-slot column tile: the lane's slots `slot` and slot + 1 of its rows g
// and g + 8, gate P (from P in C fragment order, and the rows' gates) and dz, where the row
// stores them (its record's [lo, hi): the behavior slots of its row's keys; a masked pair there
// stores its zeros, and the rest of the row is zeroed by store_pair_zeros). Two slots are one
// 4-byte store per plane where the row's entries are 4-byte aligned (block-uniform: rows start 8
// keys apart from the sequence's start, and slot 0 sits local_lo - user keys from it), else
// 2-byte stores.
template <typename T, typename Ctx>
__device__ __forceinline__ void store_pairs(const Ctx& c, int slot, const float (&gate)[2], const FragC& pr,
                                            const FragC& dz) {
    const int len = PairRows::of(c.p->window).len;
    const int row0 = static_cast<int>(threadIdx.x) / kWarpSize * 16 + (static_cast<int>(threadIdx.x) % kWarpSize) / 4;
    // One row at a time: both rows' records in flight held 16 B more than the D = 64 kernel's
    // 168 registers on sm_90 (NVRTC 13.0).
#pragma unroll 1
    for (int r = 0; r < 2; ++r) {
        const uint4 rec = load_pair_record(c.pf, row0 + 8 * r);
        const int lo = static_cast<int>(rec.z), hi = static_cast<int>(rec.w);
        // Slot 0's element index (it may lie before the row and the buffer: a pointer is formed
        // only for slots in [lo, hi)).
        const long long at = static_cast<long long>(static_cast<unsigned long long>(rec.x) |
                                                    (static_cast<unsigned long long>(rec.y) << 32));
        // The row's values by selects: an index by r would put the fragments in local memory.
        const float gr = r ? gate[1] : gate[0];
        const float g0 = gr * (r ? pr.c[2] : pr.c[0]), g1 = gr * (r ? pr.c[3] : pr.c[1]);
        const float z0 = r ? dz.c[2] : dz.c[0], z1 = r ? dz.c[3] : dz.c[1];
        if (slot >= lo && slot + 1 < hi && (at & 1) == 0) {
            T* const e = c.pairs + (at + slot);
            *reinterpret_cast<unsigned*>(e) = make_pair<T>(g0, g1).bits;
            *reinterpret_cast<unsigned*>(e + len) = make_pair<T>(z0, z1).bits;
        } else {
            if (slot >= lo && slot < hi) {
                T* const e = c.pairs + (at + slot);
                e[0] = from_float<T>(g0);
                e[len] = from_float<T>(z0);
            }
            if (slot + 1 >= lo && slot + 1 < hi) {
                T* const e = c.pairs + (at + slot + 1);
                e[0] = from_float<T>(g1);
                e[len] = from_float<T>(z1);
            }
        }
    }
}

// sum_j P_j (kc, ks, kw, 1) of a sub-tile's slots for rows g and g + 8 (the per-key features of
// the D~ correction's sum_j P_j (Bk, Hr, Wk), as CoeffSums keeps them), added to `acc` by one f16
// MMA: A = P of the sub-tile (two C fragments, in [0, 1]), B = the slots' features that
// gather_slots wrote into their K rows' padding, read by one ldmatrix .x2.trans (lane l, 0-15,
// points at slot l's). C column 2t + e of lane t: t = 0 (kc, ks), t = 1 (kw, 1), t = 2, 3 zeros.
// By FMAs, three a pair and the per-thread sums in shared memory, these took about 50
// instructions of each sub-tile loop (sm_90 SASS, D = 64). f16 keeps 11 bits of P and the
// features, enough here: the sums are multiplied by gate (D~ - dgates_b), which the rounding of
// O_b keeps near 2^-9 of the row's terms.
template <typename T, int kHeadDim>
__device__ __forceinline__ void pair_feature_sums(FragC& acc, const FragC (&pr)[2], const T* k_rows) {
    constexpr int kStride = kHeadDim + SmemPad<T>::kValue;
    unsigned r[2];
    ldmatrix<2, true>(r, reinterpret_cast<const half_t*>(k_rows),
                      (static_cast<int>(threadIdx.x) & 15) * kStride + kHeadDim);
    mma(acc, a_from_c<half_t>(pr[0], pr[1]), FragB<half_t>{{MmaPair<half_t>{r[0]}, MmaPair<half_t>{r[1]}}});
}

// One branch: returns this lane's rows' dgates_b in `dgates` (with `have_dgates`, takes D~ from
// there and skips the first pass); adds gate_b-weighted dz K into dq and dz times the features
// into dcoef. kStore (local branch only): also stores the pairs of behavior rows for the key
// side (attn/stored_pairs.cuh); a copy of its own, as a test per pair cost the local branch's
// loop 6% more instructions where nothing is stored (sm_90 SASS, D = 64).
template <typename T, int kHeadDim, int kBranch, bool kStore = false>
__device__ __forceinline__ void bwd_tc_branch(const BwdTcContext<T, kHeadDim>& c,
                                              const SlotTiles<T, kHeadDim>& sm,
                                              const RowOperand<T, kHeadDim, BwdTcResidentQ<kHeadDim>::kValue>& qf,
                                              const RowOperand<T, kHeadDim, BwdTcResidentDo<kHeadDim>::kValue>& dof,
                                              const float (&gate)[2], const float (&base_b)[2],
                                              int dim0, bool have_dgates,
                                              FragC (&dq)[kHeadDim / 8 / BwdTcParts<kHeadDim>::kValue],
                                              CoeffSums (&dcoef)[2], float (&dgates)[2]) {
    constexpr int kCols = BwdTcCols<kHeadDim>::kValue;
    constexpr int kLoad = TcLoad<kHeadDim, kBranch>::kValue;
    // A sub-tile never crosses the end of a gather: a summary gather's low parts follow it.
    static_assert(kLoad % kCols == 0, "sub-tiles must divide the gather");
    constexpr bool kSummary = kBranch == 0;
    const int t = threadIdx.x % 4;
    const int num_slots = tile_slots<kBranch>(c.tt, *c.p, c.q_end);
    float du[2] = {0.f, 0.f};  // this lane's share of sum_j P_j dP'_j per row
    // sum_j P_j (Bk, Hr, Wk) in the last pass, for the D~ correction, in shared memory: the
    // features' MMA accumulators (pair_feature_sums) and this lane's share of the buckets' sums
    // per row, added to once a sub-tile (eight such sums in registers through the loop spilled
    // 36 B at D = 64 on sm_90 under the 168-register cap, NVRTC 13.0).
    float4* const pt_features = reinterpret_cast<float4*>(c.pf) + threadIdx.x;
    float2* const pt_bucket = reinterpret_cast<float2*>(c.pf + kPfBucket * kDenseThreads) + threadIdx.x;
    *pt_features = make_float4(0.f, 0.f, 0.f, 0.f);
    *pt_bucket = make_float2(0.f, 0.f);
    const int first_pass = have_dgates ? 1 : 0;  // block-uniform
    // Not unrolled: two copies of the tile loop pushed ptxas past 255 registers.
#pragma unroll 1
    for (int pass = first_pass; pass < 2; ++pass) {
        for (int base = 0; base < num_slots; base += kLoad) {
            // Block-uniform. When one gather holds every slot, the second pass reuses it.
            if (pass == first_pass || num_slots > kLoad)
                gather_slots<kBranch, T, kHeadDim>(c.tt, c.si, *c.p, c.head, c.chunk_base, c.chunk_ends,
                                                   c.rel_time, c.wd0, c.k, c.v, c.kbar, c.vbar, base,
                                                   num_slots, sm, c.raw_time);
            if (!c.warp_live) continue;  // warp-uniform: none of its rows attends
            // Unlike the forward, no local sub-tile is skipped. The one variant that fitted 168
            // registers at D = 64 (9163296) made ptxas reload the dO rows from L1 in every
            // sub-tile; on an H100 forward + backward ran 3.7% slower with it (L1 at 73%).

#pragma unroll 1
            for (int sub = 0; sub < kLoad && base + sub < num_slots; sub += kCols) {
                const SlotTiles<T, kHeadDim> st = sm.from(sub);
                FragC sc[kCols / 8], dp[kCols / 8];
                bwd_tile_scores<T, kHeadDim, kBranch, kCols>(c, st, base + sub, qf, dof, base_b, sc, dp);
                float pt[2] = {0.f, 0.f};  // this sub-tile's share of pt_bucket
#pragma unroll
                for (int n = 0; n < kCols / 8; ++n) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int r = i >> 1, col = n * 8 + 2 * t + (i & 1);
                        // sc is log2 P, -inf where masked: P = ex2(-inf) = 0 there.
                        const float pr = kBwdTcTestMasked<kHeadDim> && sc[n].c[i] == neg_inf() ? 0.f : fast_exp2(sc[n].c[i]);
                        du[r] = fmaf(pr, dp[n].c[i], du[r]);
                        if (pass == 1) {
                            const float dz = gate[r] * pr * (dp[n].c[i] - dgates[r]);
                            // Masked pairs add dz = 0; the user token has no bias to differentiate
                            // (its features are zeros in pair_feature_sums).
                            const bool untimed = kBranch == 2 && n == 0 && (i & 1) == 0 && base + sub + 2 * t < c.tt.user;
                            dcoef[r].add(untimed ? 0.f : dz, c.row_time[r], st.time[col], c.p->num_time_buckets);
                            const float bk = pair_bucket(c.row_time[r], st.time[col], c.p->num_time_buckets);
                            pt[r] = fmaf(untimed ? 0.f : pr, bk, pt[r]);
                            sc[n].c[i] = dz;
                            // The user slot's gate P and dP' for the user token's dK and dV
                            // (user_partial_tile): its dz needs the exact dgates_b, known only
                            // after this pass.
                            if (untimed) {
                                float* const pf = c.pf + threadIdx.x;
                                pf[(kPfUser + r) * kDenseThreads] = gate[r] * pr;
                                pf[(kPfUser + 2 + r) * kDenseThreads] = dp[n].c[i];
                            }
                            dp[n].c[i] = pr;  // dP' is spent: P, for the features' MMA and the stores
                        }
                    }
                    if (kStore && pass == 1) store_pairs<T>(c, base + sub + n * 8 + 2 * t, gate, dp[n], sc[n]);
                }
                if (pass == 1) {
                    FragC f;
                    const float4 was = *pt_features;
                    f.c[0] = was.x, f.c[1] = was.y, f.c[2] = was.z, f.c[3] = was.w;
                    pair_feature_sums<T, kHeadDim>(f, dp, st.k);
                    *pt_features = make_float4(f.c[0], f.c[1], f.c[2], f.c[3]);
                    const float2 b = *pt_bucket;
                    *pt_bucket = make_float2(b.x + pt[0], b.y + pt[1]);
                    probs_times_rows<T, kHeadDim, kCols>(dq, sc, st.k, dim0);
                    if (kSummary) probs_times_rows<T, kHeadDim, kCols>(dq, sc, st.k_lo(), dim0);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            du[r] += __shfl_xor_sync(kFullMask, du[r], 1);
            du[r] += __shfl_xor_sync(kFullMask, du[r], 2);
            // After pass 2: dz summed gate (dP' - D~) where gate (dP' - dgates_b) was meant.
            if (pass == 1) {
                // This lane's share of the sums (CoeffSums::finish is linear in them, so the four
                // lanes' shares add up as the sums do): its bucket sum, and the MMA's columns
                // 2t, 2t + 1 of row r (pair_feature_sums).
                const float4 f4 = *pt_features;
                const float2 b2 = *pt_bucket;
                const float a = r ? f4.z : f4.x, b = r ? f4.w : f4.y;
                CoeffSums sums;
                sums.bucket = r ? b2.y : b2.x;
                sums.cos = t == 0 ? a : 0.f;
                sums.sin = t == 0 ? b : 0.f;
                sums.weekend = t == 1 ? a : 0.f;
                sums.dz = t == 1 ? b : 0.f;
                dcoef[r].add_scaled(sums, gate[r] * (dgates[r] - du[r]));
                // The stored dz~ was centred on dgates[r]: the key side adds gate P times this.
                if (kStore && t == 0 && stores_pairs(c.pf, r))
                    c.pair_delta[static_cast<size_t>(c.rw[r].q) * c.p->heads + c.head] = dgates[r] - du[r];
            }
            dgates[r] = du[r];
            du[r] = 0.f;
        }
    }
}

// The block's partial of the user token's dK / scale and dV over its queries [q0, q_end): dims
// [dim0, dim0 + D / kParts) of row `tile` of user_partial ([tiles, H, 2, D] f32, dK's then dV's),
// from `coef` (shared [2][kDenseRows]: each row's gate P of the user slot, then its dz; 0 for
// rows that do not see it). One output element a thread, rows in a fixed order: the same bits
// every run. The rows' Q and dO were read by this block already (L1 or L2). Called by every
// thread, after a barrier.
template <typename T, int kHeadDim, int kParts>
__device__ __forceinline__ void user_partial_tile(const EvoParams& p, const T* __restrict__ q,
                                                  const T* __restrict__ d_o, const float* coef, int q0,
                                                  int q_end, int head, int dim0, size_t tile,
                                                  float* __restrict__ user_partial) {
    constexpr int kDims = kHeadDim / kParts;
    const int rows = q_end - q0;
    const size_t stride = static_cast<size_t>(p.heads) * kHeadDim;
    for (int x = threadIdx.x; x < 2 * kDims; x += kDenseThreads) {
        const bool dv = x >= kDims;  // dV from gate P and dO; dK from dz and Q
        const int d = dim0 + x % kDims;
        const T* src = (dv ? d_o : q) + dense_row<kHeadDim>(p, q0, head) + d;
        const float* c = coef + (dv ? 0 : kDenseRows);
        float sum = 0.f;
        if (rows == kDenseRows) {  // every tile but a sequence's last: 64 loads in flight
#pragma unroll
            for (int row = 0; row < kDenseRows; ++row) sum = fmaf(c[row], to_float(src[row * stride]), sum);
        } else {
            for (int row = 0; row < rows; ++row) sum = fmaf(c[row], to_float(src[row * stride]), sum);
        }
        user_partial[((tile * p.heads + head) * 2 + (dv ? 1 : 0)) * kHeadDim + d] = sum;
    }
}

// Zeros of the stored rows (attn/stored_pairs.cuh) of the block's behaviors [lo, hi) where the
// pair loop stores nothing: the keys of a row before the tile's local behaviors [local_lo,
// local_hi) (before its window, or the sequence's behaviors) and after them (past the tile's
// last query). Disjoint from the entries store_pairs writes, so no ordering between them is
// needed. Two threads a row; at most 8 zeros a row where the row starts inside the tile's keys.
template <typename T>
__device__ __forceinline__ void store_pair_zeros(const EvoParams& p, const SeqInfo& si, const TcTile& tt,
                                                 int q0, int lo, int hi, int head, T* __restrict__ pairs) {
    static_assert(kDenseThreads == 2 * kDenseRows, "two threads a row");
    const PairRows pr = PairRows::of(p.window);
    const int q = q0 + static_cast<int>(threadIdx.x) / 2;
    if (q < lo || q >= hi) return;
    const int first = pr.first(si, q);
    const int before = min(max(tt.local_lo - first, 0), pr.len);  // entries [0, before)
    const int after = min(max(tt.local_hi - first, before), pr.len);  // and [after, R)
    const int zeros = before + pr.len - after;
    T* const row = pairs + pr.row(q, p.heads, head);
    const T zero = from_float<T>(0.f);
    for (int k = static_cast<int>(threadIdx.x) % 2; k < zeros; k += 2) {
        const int e = k < before ? k : after + (k - before);
        row[e] = zero;
        row[pr.len + e] = zero;
    }
}

template <typename T, int kHeadDim>
__device__ void evo_backward_query_tc(
    const EvoParams& p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ kbar, const float* __restrict__ vbar, const void* __restrict__ gates,
    const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,
    const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,
    const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,
    const T* __restrict__ d_o, const float* __restrict__ lse, T* __restrict__ dq,
    float* __restrict__ dgates, float* __restrict__ coeff_partial, const int* __restrict__ tiles,
    const T* __restrict__ branch_out, float* __restrict__ user_partial, T* __restrict__ pairs,
    float* __restrict__ pair_delta) {
    constexpr int kParts = BwdTcParts<kHeadDim>::kValue;
    constexpr int kDimTiles = kHeadDim / 8 / kParts;  // of this block's part of dQ
    SPARSECTR_SLOT_TILES(sm, T, kHeadDim);

    const DenseBlock blk = dense_block(p, kParts, tiles);
    const int dim0 = blk.part * (kHeadDim / kParts);  // first dimension of this block's dQ
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;

    BwdTcContext<T, kHeadDim> c;
    c.p = &p;
    c.head = blk.head;
    const TemporalCoeffs tc{coeffs[c.head * 3], coeffs[c.head * 3 + 1], coeffs[c.head * 3 + 2]};
    c.scale2 = p.scale * kLog2e;
    c.k = k;
    c.v = v;
    c.kbar = kbar;
    c.vbar = vbar;
    c.chunk_ends = chunk_ends;
    c.rel_time = rel_time;
    c.raw_time = sRawTime_;
    alignas(16) __shared__ float sPf[kBwdQueryPfFloats];  // 16: the pair records are uint4
    c.pf = sPf;
    // Rows that never see the user slot keep 0 (each thread's own slots).
#pragma unroll
    for (int x = kPfUser; x < kPfUser + 4; ++x) sPf[x * kDenseThreads + threadIdx.x] = 0.f;

    {
        const int s = blk.seq;
        c.si = seqs[s];
        const int q0 = c.si.start + blk.tile * kDenseRows;
        if (q0 >= c.si.end) return;  // block-uniform; the tile list holds none
        c.q_end = min(q0 + kDenseRows, c.si.end);
        c.chunk_base = s * p.max_chunks;
        c.wd0 = weekday0[s];
        const int wq = q0 + warp * 16;
        tc_setup(p, c.si, s, q0, c.q_end, wq, chunk_ends, chunk_counts, rel_time, c.wd0, &c.tt,
                 c.rw, c.row_time);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            c.rb[r] = RowBias::make(c.row_time[r], tc, p.num_time_buckets, kLog2e);
            c.bias_a[r] = bias_row_pair(c.rb[r], __frcp_rn(c.scale2), t);
        }
        // Stored pairs: part 0 writes the rows of behaviors. Local slot s is the key
        // local_lo + s - user, entry key - first of the row; a row stores the slots of the
        // behaviors [local_lo, local_hi) in its keys [first, first + R).
        const PairRows pair_rows = PairRows::of(p.window);
        const bool pairs_here = pairs != nullptr && blk.part == 0;  // block-uniform
        c.pairs = pairs;
        c.pair_delta = pairs_here ? pair_delta : nullptr;
        if (t == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int qr = c.rw[r].q;
                const bool stores = pairs_here && c.rw[r].live && qr < c.si.candidates;
                const int first = pair_rows.first(c.si, qr);
                const int lo_slot = first - c.tt.local_lo + c.tt.user;  // key `first`'s slot
                // Slot 0's element index: negative where it lies before the buffer.
                const long long at = static_cast<long long>(pair_rows.row(qr, p.heads, c.head)) - lo_slot;
                const unsigned long long bits = static_cast<unsigned long long>(at);
                const int lo = max(c.tt.user, lo_slot);
                const int hi = min(c.tt.user + (c.tt.local_hi - c.tt.local_lo), lo_slot + pair_rows.len);
                *pair_record(sPf, warp * 16 + g + 8 * r) =
                    stores ? uint4{static_cast<unsigned>(bits), static_cast<unsigned>(bits >> 32),
                                   static_cast<unsigned>(lo), static_cast<unsigned>(hi)}
                           : uint4{0u, 0u, 1u << 30, 0u};
            }
        }
        __syncwarp();
        c.warp_live = __any_sync(kFullMask, c.rw[0].live || c.rw[1].live) != 0;
        const int clamped[2] = {min(wq + g, c.si.end - 1), min(wq + g + 8, c.si.end - 1)};
        const size_t at[2] = {dense_row<kHeadDim>(p, clamped[0], c.head),
                              dense_row<kHeadDim>(p, clamped[1], c.head)};
        RowOperand<T, kHeadDim, BwdTcResidentQ<kHeadDim>::kValue> qf;
        RowOperand<T, kHeadDim, BwdTcResidentDo<kHeadDim>::kValue> dof;
        qf.init(q + at[0], q + at[1]);
        dof.init(d_o + at[0], d_o + at[1]);

        FragC acc[kDimTiles];
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) clear(acc[dt]);
        CoeffSums dcoef[2];
        float dg[3][2];
        const bool have_dgates = branch_out != nullptr;
        if (have_dgates) {
            // D~_b = <dO, O_b>: each lane takes the columns of its A fragments (2t, 2t + 1,
            // 2t + 8, 2t + 9 of every 16), the four lanes of a row add up.
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const T* dor = d_o + at[r];
                const T* ob = branch_out + at[r] * kNumBranches;  // [T, H, 3, D]
#pragma unroll
                for (int b = 0; b < kNumBranches; ++b) {
                    float sum = 0.f;
#pragma unroll
                    for (int c = 2 * t; c < kHeadDim; c += 8) {
                        const MmaPair<T> x = load_pair<T>(dor + c), y = load_pair<T>(ob + b * kHeadDim + c);
                        sum = fmaf(pair_lo<T>(x), pair_lo<T>(y), sum);
                        sum = fmaf(pair_hi<T>(x), pair_hi<T>(y), sum);
                    }
                    sum += __shfl_xor_sync(kFullMask, sum, 1);
                    sum += __shfl_xor_sync(kFullMask, sum, 2);
                    dg[b][r] = sum;
                }
            }
        }

#define SPARSECTR_BWD_TC_BRANCH(B)                                                               \
    {                                                                                            \
        float gate[2], base_b[2];                                                                \
        for (int r = 0; r < 2; ++r) {                                                            \
            const size_t row = (static_cast<size_t>(clamped[r]) * p.heads + c.head) * 3 + B;    \
            gate[r] = load_gate<T>(p, gates, row);                                               \
            base_b[r] = base_of_branch(c.rb[r], lse[row]);                                       \
        }                                                                                        \
        if (B == 2 && c.pair_delta != nullptr) /* block-uniform */                               \
            bwd_tc_branch<T, kHeadDim, B, B == 2>(c, sm, qf, dof, gate, base_b, dim0, have_dgates, acc, dcoef, dg[B]); \
        else                                                                                     \
            bwd_tc_branch<T, kHeadDim, B>(c, sm, qf, dof, gate, base_b, dim0, have_dgates, acc, dcoef, dg[B]); \
    }
        SPARSECTR_BWD_TC_BRANCH(0)
        SPARSECTR_BWD_TC_BRANCH(1)
        SPARSECTR_BWD_TC_BRANCH(2)
#undef SPARSECTR_BWD_TC_BRANCH

#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1, row = wq + g + 8 * r;
                if (row < c.si.end)
                    dq[dense_row<kHeadDim>(p, row, c.head) + dim0 + dt * 8 + 2 * t + (i & 1)] =
                        from_float<T>(acc[dt].c[i] * p.scale);
            }
        }
        if (pairs != nullptr && blk.part == 0)  // block-uniform
            store_pair_zeros<T>(p, c.si, c.tt, q0, max(q0, c.si.behaviors), min(c.q_end, c.si.candidates), c.head, pairs);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float dco[3];
            dcoef[r].finish(c.row_time[r], p.num_time_buckets, dco);
#pragma unroll
            for (int x = 0; x < 3; ++x) {
                dco[x] += __shfl_xor_sync(kFullMask, dco[x], 1);
                dco[x] += __shfl_xor_sync(kFullMask, dco[x], 2);
            }
            const int row = wq + g + 8 * r;
            if (t == 0 && blk.part == 0 && row < c.si.end) {
                const size_t lse_row = (static_cast<size_t>(row) * p.heads + c.head) * 3;
                // Head-major, as backward_query.cu: the reduction reads one run per head.
                const size_t part = (static_cast<size_t>(c.head) * p.num_tokens + row) * 3;
#pragma unroll
                for (int x = 0; x < 3; ++x) {
                    dgates[lse_row + x] = dg[x][r];
                    coeff_partial[part + x] = dco[x];
                }
            }
        }
        if (c.tt.user) {  // block-uniform: the sequence has a user token
            // The user slot's gate P and exact dz = gate P (dP' - dgates_b), from the lane that
            // holds the row's first column, into [2][kDenseRows] by row at the start of sPf
            // (its dcoeffs sums are read: the barrier orders those reads before these writes).
            float vals[2][2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float* const at = sPf + threadIdx.x + (kPfUser + r) * kDenseThreads;
                vals[r][0] = at[0];
                vals[r][1] = at[0] * (at[2 * kDenseThreads] - dg[2][r]);
            }
            __syncthreads();
            if (t == 0) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = warp * 16 + g + 8 * r;
                    sPf[row] = vals[r][0];
                    sPf[kDenseRows + row] = vals[r][1];
                }
            }
            __syncthreads();
            user_partial_tile<T, kHeadDim, kParts>(p, q, d_o, sPf, q0, c.q_end, c.head, dim0,
                                                   user_partial_row(blk.seq, c.si.start, blk.tile),
                                                   user_partial);
        }
    }
}

#define SPARSECTR_BACKWARD_QUERY_TC(NAME, T, D)                                                  \
    extern "C" __global__ void __launch_bounds__(kDenseThreads, kBwdQueryTcMinBlocks<T, D>)      \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const float* __restrict__ kbar,                            \
             const float* __restrict__ vbar, const void* __restrict__ gates,                     \
             const float* __restrict__ coeffs, const unsigned* __restrict__ rel_time,            \
             const SeqInfo* __restrict__ seqs, const int* __restrict__ weekday0,                 \
             const int* __restrict__ chunk_ends, const int* __restrict__ chunk_counts,           \
             const T* __restrict__ d_o, const float* __restrict__ lse, T* __restrict__ dq,       \
             float* __restrict__ dgates, float* __restrict__ coeff_partial,                      \
             const int* __restrict__ tiles, const T* __restrict__ branch_out,                    \
             float* __restrict__ user_partial, T* __restrict__ pairs,                            \
             float* __restrict__ pair_delta) {                                                   \
        evo_backward_query_tc<T, D>(p, q, k, v, kbar, vbar, gates, coeffs, rel_time, seqs,       \
                                    weekday0, chunk_ends, chunk_counts, d_o, lse, dq, dgates,    \
                                    coeff_partial, tiles, branch_out, user_partial, pairs,       \
                                    pair_delta);                                                 \
    }
