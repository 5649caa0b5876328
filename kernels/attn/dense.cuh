// What the dense kernels share (SPEC section 5): tile shapes, which (query, key) pairs are
// visible, the bias of a pair, and the copies of key/query tiles into shared memory.
//
// Tiles never straddle sequences: a block works on rows [start + tile * 64, ...) of one sequence
// (dense_block). Rows past the sequence's end are loaded clamped (or as zeros) and never stored.
#pragma once

#include "../common/async_copy.cuh"
#include "../common/dtype.cuh"
#include "../common/mma.cuh"
#include "../common/params.cuh"
#include "../common/warp.cuh"
#include "temporal.cuh"

constexpr int kDenseWarps = 4;
constexpr int kDenseThreads = kDenseWarps * kWarpSize;
constexpr int kDenseRows = 16 * kDenseWarps;  // rows of a block: 16 per warp, one MMA tile high

// Elements of padding per shared-memory row: 16 bytes keep rows 16-byte aligned for vector
// stores and put the 8 rows of an ldmatrix matrix (or a 16-bit fragment load) on different banks.
// f32 rows take 32: the f32 fragments are 8-byte loads, served by half warps, whose 4 rows must
// start 8 banks apart (with 16 bytes, 4 apart, two rows overlapped: 2-way conflicts on every
// fragment load of the f32 dense kernels, under the CPU emulation's bank model).
template <typename T>
struct SmemPad {
    static constexpr int kValue = sizeof(T) == 4 ? 8 : 16 / static_cast<int>(sizeof(T));
};

// Columns (keys, or queries for the key kernel) per inner tile, chosen so that every kernel's
// static shared memory stays under 48 KB; the sizes are in the kernels' comments.
template <typename T, int kHeadDim>
struct DenseCols {
    static constexpr int kForward = (sizeof(T) == 4 && kHeadDim == 128) ? 32 : 64;
    static constexpr int kQuery = sizeof(T) == 2 ? (kHeadDim == 128 ? 32 : 64) : (kHeadDim == 32 ? 32 : 16);
    // The key kernel holds dK and dV: at 16-bit D = 128 a 32-query tile spilled (sm_80).
    static constexpr int kKey = (sizeof(T) == 2 && kHeadDim == 128) ? 16 : kQuery;
};

// Whether a warp keeps its 16 rows of an A operand in registers for the whole block, or reloads
// them from global memory (L1) at each use: the 16-bit D = 128 and the f32 backward kernels
// spilled otherwise (255 registers, NVRTC 13.0).
template <typename T, int kHeadDim>
struct DenseResident {
    static constexpr bool kValue = sizeof(T) == 2 && kHeadDim <= 64;
};

// Dense visibility inside one sequence: the user token and behaviors up to the query; a
// candidate sees every behavior and itself, never another candidate; the user token sees itself.
__device__ __forceinline__ bool dense_visible(const SeqInfo& s, int q, int k) {
    return q < s.end && k <= q && (k < s.candidates || k == q);
}

// A token has a time unless it is the user token.
__device__ __forceinline__ bool dense_timed(const SeqInfo& s, int x) { return x >= s.behaviors; }

// Parts of the head dimension that the backward kernels split their gradient accumulators into
// (one block per part, each recomputing the tile's P and dS): f32 D = 128 needs 4 to stay under
// 255 registers without spilling. Mirrored by `dense_parts` in src/cuda/dense.rs.
template <typename T, int kHeadDim>
struct DenseParts {
    static constexpr int kValue = (sizeof(T) == 4 && kHeadDim == 128) ? 4 : 1;
};

// The block's work: grid x indexes the batch's tile list (pairs (sequence, tile), heaviest tiles
// first, built by upload_batch), grid y is head * parts + part. Only real tiles are launched, so
// skewed sequence lengths cost no idle blocks.
struct DenseBlock {
    int seq, tile, head, part;
};

__device__ __forceinline__ DenseBlock dense_block(const EvoParams& p, int parts,
                                                  const int* __restrict__ tiles) {
    (void)p;
    const int item = static_cast<int>(blockIdx.x), y = static_cast<int>(blockIdx.y);
    DenseBlock b;
    b.seq = tiles[2 * item];
    b.tile = tiles[2 * item + 1];
    b.head = y / parts;
    b.part = y % parts;
    return b;
}

// Element offset of row `token`, `head` in a [T, H, D] tensor.
template <int kHeadDim>
__device__ __forceinline__ size_t dense_row(const EvoParams& p, int token, int head) {
    return (static_cast<size_t>(token) * p.heads + head) * kHeadDim;
}

// Row of the user-token partials (backward_query_tc.cu writes them, backward_user_reduce.cu adds
// them up) for tile `tile` of sequence s starting at token `start`: s + start / 64 + tile.
// Unique, since a sequence of n tokens has at most ceil(n / 64) tiles and its successor starts n
// tokens later; the rows number fewer than B + ceil(T / 64) (src/cuda/backward.rs:
// user_partial_rows).
__device__ __forceinline__ size_t user_partial_row(int s, int start, int tile) {
    return static_cast<size_t>(s) + static_cast<size_t>(start / kDenseRows) + static_cast<size_t>(tile);
}

// Copies rows [first, first + kRows) of a [T, H, D] tensor into shared memory as rows
// (sRow[kRows][kHeadDim + pad], unless null) and transposed (sCol[kHeadDim][kRows + pad], unless
// null: an operand whose k runs over rows is then read as pairs). Rows at or past `end` become
// zeros: masked keys must not bring NaN into P V.
template <typename T, int kHeadDim, int kRows>
__device__ __forceinline__ void tile_tensor(const EvoParams& p, const T* __restrict__ g, int first,
                                            int end, int head, T* sRow, T* sCol) {
    constexpr int kVec = VecWidth<T>::kValue;
    constexpr int kRowStride = kHeadDim + SmemPad<T>::kValue;
    constexpr int kColStride = kRows + SmemPad<T>::kValue;
    constexpr int kPerRow = kHeadDim / kVec;
    for (int i = threadIdx.x; i < kRows * kPerRow; i += kDenseThreads) {
        const int r = i / kPerRow, c = i % kPerRow;
        uint4 raw = {0u, 0u, 0u, 0u};
        if (first + r < end)
            raw = __ldg(reinterpret_cast<const uint4*>(g + dense_row<kHeadDim>(p, first + r, head)) + c);
        if (sRow != nullptr) *reinterpret_cast<uint4*>(sRow + r * kRowStride + c * kVec) = raw;
        if (sCol != nullptr) {
            // Rotated by c, so that the lanes of a warp (consecutive c) write different rows of
            // sCol at once: in element order they all hit one bank (4- to 16-way conflicts).
#pragma unroll
            for (int e0 = 0; e0 < kVec; ++e0) {
                const int e = (e0 + c) % kVec;
                sCol[(c * kVec + e) * kColStride + r] = vec_elem<T>(raw, e);
            }
        }
    }
}

// As tile_tensor, rows only, by cp.async (the caller waits: cp_async_wait_all, then a barrier).
template <typename T, int kHeadDim, int kRows>
__device__ __forceinline__ void tile_rows_async(const EvoParams& p, const T* __restrict__ g, int first,
                                                int end, int head, T* sRow) {
    constexpr int kVec = VecWidth<T>::kValue;
    constexpr int kRowStride = kHeadDim + SmemPad<T>::kValue;
    constexpr int kPerRow = kHeadDim / kVec;
    static_assert(kDenseThreads % kPerRow == 0, "a thread copies pieces of one column");
    // A thread copies piece c of rows r0, r0 + kRowStep, ... The loop over threadIdx.x + i
    // kDenseThreads took 25 instructions per 16-byte copy on sm_90 (a division and its loop
    // control per piece), twice a query tile on the key side (Q and dO), about a sixth of its
    // walk. Each address is still made from the row (a row pointer carried through the unrolled
    // copies held more registers, and spilled at D = 32 and at D = 128 on sm_80).
    constexpr int kRowStep = kDenseThreads / kPerRow;
    constexpr int kSteps = (kRows + kRowStep - 1) / kRowStep;
    int r0 = threadIdx.x / kPerRow;
    const int c = threadIdx.x % kPerRow;
    if constexpr (kPerRow == 4) {
        // 16-bit rows at D = 32 are 5 chunks of 16 bytes apart (4 and the padding), so the two
        // rows of a quarter warp (the 8 lanes a 16-byte wavefront serves) overlapped in one bank
        // group when adjacent: 2-way conflicts. Rows 4 apart start 20 = 4 (mod 8) chunks apart
        // and fill the 8 groups: lanes 4i to 4i + 3 take row (i / 2) + 4 (i % 2) of the warp's 8.
        // (In shifts and masks of the thread index, which ptxas rematerializes: as divisions of
        // the lane it held them, and the tails kernel at D = 32 spilled 8 B on sm_90.)
        const unsigned tid = threadIdx.x;
        r0 = static_cast<int>(((tid >> 2) & ~7u) | ((tid >> 3) & 3u) | (tid & 4u));
    }
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
        const int r = r0 + j * kRowStep;
        if (kRows % kRowStep != 0 && r >= kRows) break;
        // Rows at or past `end` copy zeros from a mapped address, the first row's.
        const bool inside = first + r < end;
        cp_async<16>(sRow + r * kRowStride + c * kVec,
                     g + dense_row<kHeadDim>(p, inside ? first + r : first, head) + c * kVec, inside);
    }
}

// A warp's 16 rows of a [T, H, D] tensor as MMA A operands over the head dimension: held in
// registers when `kResident`, else reloaded from global memory at each use.
template <typename T, int kHeadDim, bool kResident>
struct RowOperand {
    const T* top;     // row g (clamped into the sequence), element 0 of the head
    const T* bottom;  // row g + 8
    FragA<T> frag[kResident ? kHeadDim / 16 : 1];

    __device__ __forceinline__ void init(const T* top_row, const T* bottom_row) {
        top = top_row;
        bottom = bottom_row;
        if (kResident) {
#pragma unroll
            for (int kk = 0; kk < kHeadDim / 16; ++kk) frag[kk] = load_a(top + kk * 16, bottom + kk * 16);
        }
    }

    __device__ __forceinline__ FragA<T> get(int kk) const {
        if (kResident) return frag[kResident ? kk : 0];
        return load_a(top + kk * 16, bottom + kk * 16);
    }
};

// Lane l's row address for ldmatrix reads of B fragments from a row-major shared tile
// sRows[..][kHeadDim + pad] (B[k][n] = sRows[n][k]): matrix l / 8 is columns 8 (l / 8) on of
// rows 0-7, so .x2 reads one k-step (matrices 0, 1) and .x4 two.
template <typename T, int kHeadDim>
__device__ __forceinline__ const T* ldsm_rows(const T* sRows) {
    constexpr int kStride = kHeadDim + SmemPad<T>::kValue;
    const int lane = threadIdx.x % kWarpSize;
    return sRows + (lane & 7) * kStride + (lane >> 3) * 8;
}

// B fragment reads from such a tile (rows_times_tile): load_b's two 32-bit loads each, one
// ldmatrix .x2 each, or one .x4 for two k-steps.
enum : int { kLoadB = 0, kLdsmX2 = 2, kLdsmX4 = 4 };

// acc[n] += A B for a warp's 16 rows `a` (k over the head dimension) against the kCols rows of a
// row-major shared tile sRows[kCols][kHeadDim + pad]: B[k][n] = sRows[n][k], as Q K^T. The B
// fragments come by ldmatrix (16-bit types) in kReads of kLdsmX4 or kLdsmX2, by load_b in
// kLoadB: the key-side walk's 16-query sub-tile made 32 32-bit loads for its 32 MMAs, and .x4
// makes 8 (sm_90, D = 64: its inner loop 312 -> 299 SASS instructions, the forward's 281-346
// from 293-350). .x4 holds the registers of two k-steps at once: where that spilled (the query
// backward and the tails kernel at D = 64) a kernel takes .x2 or load_b.
template <typename T, int kHeadDim, int kCols, int kReads = kLdsmX4, bool kResident>
__device__ __forceinline__ void rows_times_tile(FragC (&acc)[kCols / 8],
                                                const RowOperand<T, kHeadDim, kResident>& a,
                                                const T* sRows) {
    constexpr int kStride = kHeadDim + SmemPad<T>::kValue;
    constexpr int kSteps = kHeadDim / 16;
    const int lane = threadIdx.x % kWarpSize;
    if constexpr (sizeof(T) == 2 && kReads != kLoadB) {
        // Lane l's row: matrix l / 8 is columns 8 (l / 8) on of rows 0-7, so .x2 reads one
        // k-step (matrices 0, 1) and .x4 two.
        const T* mine = sRows + (lane & 7) * kStride + (lane >> 3) * 8;
        static_assert(kReads == kLdsmX2 || kSteps % 2 == 0, ".x4 reads k-steps in pairs");
#pragma unroll
        for (int n = 0; n < kCols / 8; ++n) {
#pragma unroll
            for (int kk = 0; kk < kSteps; kk += kReads / 2) {
                unsigned r[4];
                if constexpr (kReads == kLdsmX4) {
                    ldmatrix<4, false>(r, mine, n * 8 * kStride + kk * 16);
                } else {
                    unsigned r2[2];
                    ldmatrix<2, false>(r2, mine, n * 8 * kStride + kk * 16);
                    r[0] = r2[0];
                    r[1] = r2[1];
                }
                mma(acc[n], a.get(kk), FragB<T>{{MmaPair<T>{r[0]}, MmaPair<T>{r[1]}}});
                if constexpr (kReads == kLdsmX4)
                    mma(acc[n], a.get(kk + 1), FragB<T>{{MmaPair<T>{r[2]}, MmaPair<T>{r[3]}}});
            }
        }
    } else {
        const int g = lane >> 2;
#pragma unroll
        for (int n = 0; n < kCols / 8; ++n) {
#pragma unroll
            for (int kk = 0; kk < kSteps; ++kk)
                mma(acc[n], a.get(kk), load_b(sRows + (n * 8 + g) * kStride + kk * 16));
        }
    }
}

// The phase and weekend terms of the RelTemporal bias on tensor cores: for a row's coefficients
// (RowBias cos, sin, weekend) against a column token's features (kc, ks, kw), three FFMAs a pair
// (24 a 16-column sub-tile in each lane) become one bf16 m16n8k8 MMA per 8 columns and a
// ldmatrix: x = x_hi + x_lo for the rows (A, registers) and y = y_hi + y_lo for the columns (B,
// eight bf16 in each column token's padding of a shared row tile), three products of four:
//   A row:    (C_hi, C_hi, C_lo, S_hi, S_hi, S_lo, W_hi, W_lo)
//   B column: (kc_hi, kc_lo, kc_hi, ks_hi, ks_lo, ks_hi, kw, kw)
// with C, S, W the coefficients over scale2, so that the MMAs start the accumulator that the raw
// scores then add to, and scale2 times it plus RowBias::bucket_term is the logit. Each term is
// within about 2^-15 of its value (the dropped x_lo y_lo and the parts' roundings): in base-2
// logit units 2e-5 of |s2| or |s3|, far below the 16-bit dtypes' tolerances (f32 runs the SIMT
// kernels, which keep RowBias's FFMAs). bf16 for both parts keeps f32's range, where f16 would
// overflow at |s2| / scale near 2^16.
//
// A column token's eight features, for its row's padding (zeros for an untimed token).
__device__ __forceinline__ uint4 bias_column_features(const TokenTime& x) {
    const float ch = to_float(from_float<bf16_t>(x.c)), sh = to_float(from_float<bf16_t>(x.s));
    return uint4{make_pair<bf16_t>(ch, x.c - ch).bits, make_pair<bf16_t>(ch, sh).bits,
                 make_pair<bf16_t>(x.s - sh, sh).bits, make_pair<bf16_t>(x.weekend, x.weekend).bits};
}

// This lane's A register for one of its rows (g or g + 8): lane t holds columns 2t and 2t + 1.
__device__ __forceinline__ unsigned bias_row_pair(const RowBias& rb, float inv_scale2, int t) {
    const float cc = rb.cos * inv_scale2, ss = rb.sin * inv_scale2, ww = rb.weekend * inv_scale2;
    const float ch = to_float(from_float<bf16_t>(cc)), sh = to_float(from_float<bf16_t>(ss)),
                wh = to_float(from_float<bf16_t>(ww));
    const float first = t == 0 ? ch : t == 1 ? cc - ch : t == 2 ? sh : wh;     // column 2t
    const float second = t == 0 ? ch : t == 1 ? sh : t == 2 ? ss - sh : ww - wh;  // 2t + 1
    return make_pair<bf16_t>(first, second).bits;
}

// acc[n] += the bias terms of the warp's rows (a: bias_row_pair of rows g and g + 8) against
// columns 8n to 8n + 7 of a row-major shared tile sRows[..][kHeadDim + pad] whose padding holds
// bias_column_features. One ldmatrix per 16 or 32 columns (lane l gives column l's padding).
template <typename T, int kHeadDim, int kTiles>
__device__ __forceinline__ void add_bias_features(FragC (&acc)[kTiles], const unsigned (&a)[2], const T* sRows) {
    constexpr int kStride = kHeadDim + SmemPad<T>::kValue;
    static_assert(SmemPad<T>::kValue * sizeof(T) == 16, "a row's padding holds the eight features");
    static_assert(kTiles % 2 == 0, "columns in 16s");
    constexpr int kPer = kTiles % 4 == 0 ? 4 : 2;  // n-tiles per ldmatrix
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
#pragma unroll
    for (int n0 = 0; n0 < kTiles; n0 += kPer) {
        unsigned r[kPer];
        ldmatrix<kPer, false>(r, reinterpret_cast<const bf16_t*>(sRows),
                              (n0 * 8 + lane % (8 * kPer)) * kStride + kHeadDim);
#pragma unroll
        for (int i = 0; i < kPer; ++i)
            mma_k8(acc[n0 + i], MmaPair<bf16_t>{a[0]}, MmaPair<bf16_t>{a[1]}, MmaPair<bf16_t>{r[i]});
    }
}

// As rows_times_tile, for a warp's 16 rows held in f32 in global memory (rows[0]: row g,
// rows[1]: row g + 8, element 0 of the head; chunk summaries): each A piece is split into a
// 16-bit high part and the 16-bit rest and both are multiplied, which keeps A to about 2^-16
// relative (bf16) where rounding it once would leave 2^-9, and needs no register-resident copy.
template <typename T, int kHeadDim, int kCols>
__device__ __forceinline__ void rows_times_tile_f32(FragC (&acc)[kCols / 8], const float* const (&rows)[2],
                                                    const T* sRows) {
    constexpr int kStride = kHeadDim + SmemPad<T>::kValue;
    const int lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;
    // Not unrolled: ptxas hoisted every piece's loads and split (64 registers at D = 64) and
    // spilled the accumulators (NVRTC 13.0).
#pragma unroll 1
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        FragA<T> hi, lo;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            // The FragA layout: r[i] holds row g + 8 (i & 1), columns 2t + 8 (i >> 1) and the next.
            const float* at = rows[i & 1] + kk * 16 + 2 * t + 8 * (i >> 1);
            const float x0 = __ldg(at), x1 = __ldg(at + 1);
            const T h0 = from_float<T>(x0), h1 = from_float<T>(x1);
            hi.r[i] = pair_of<T>(h0, h1);
            lo.r[i] = make_pair<T>(x0 - to_float(h0), x1 - to_float(h1));
        }
#pragma unroll
        for (int n = 0; n < kCols / 8; ++n) {
            const FragB<T> b = load_b(sRows + (n * 8 + g) * kStride + kk * 16);
            mma(acc[n], hi, b);
            mma(acc[n], lo, b);
        }
    }
}

// acc[dt] += P C for P a warp's 16 rows over kCols columns, held as MMA accumulators, and C
// rows dim0 + 8 dt .. of a transposed shared tile sCols[..][kCols + pad]: C[k][n] =
// sCols[dim0 + n][k], as P V.
template <typename T, int kCols, int kDimTiles>
__device__ __forceinline__ void probs_times_tile(FragC (&acc)[kDimTiles], const FragC (&p)[kCols / 8],
                                                 const T* sCols, int dim0) {
    constexpr int kStride = kCols + SmemPad<T>::kValue;
    const int g = (threadIdx.x % kWarpSize) >> 2;
#pragma unroll
    for (int kk = 0; kk < kCols / 16; ++kk) {
        const FragA<T> pa = a_from_c<T>(p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt)
            mma(acc[dt], pa, load_b(sCols + (dim0 + dt * 8 + g) * kStride + kk * 16));
    }
}

// As probs_times_tile, but C comes from a row-major shared tile sRows[kCols][kHeadDim + pad]
// (C[k][n] = sRows[k][dim0 + n], as K in dQ = dS K), so the gather needs no transposed copy:
// ldmatrix .trans reads two dimension tiles' B fragments at once. 16-bit types only.
template <typename T, int kHeadDim, int kCols, int kDimTiles>
__device__ __forceinline__ void probs_times_rows(FragC (&acc)[kDimTiles], const FragC (&p)[kCols / 8],
                                                 const T* sRows, int dim0) {
    static_assert(kDimTiles % 2 == 0, "dimension tiles are read in pairs");
    constexpr int kStride = kHeadDim + SmemPad<T>::kValue;
    const int lane = threadIdx.x % kWarpSize;
    // Matrix lane / 8: slots 8 * (its bit 0) on, dimension tile (its bit 1) of the pair.
    const T* mine = sRows + (((lane >> 3) & 1) * 8 + (lane & 7)) * kStride + dim0 + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < kCols / 16; ++kk) {
        const FragA<T> pa = a_from_c<T>(p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int dt = 0; dt < kDimTiles; dt += 2) {
            unsigned r[4];
            ldmatrix<4, true>(r, mine, kk * 16 * kStride + dt * 8);
            const FragB<T> b0{{MmaPair<T>{r[0]}, MmaPair<T>{r[1]}}};
            const FragB<T> b1{{MmaPair<T>{r[2]}, MmaPair<T>{r[3]}}};
            mma(acc[dt], pa, b0);
            mma(acc[dt + 1], pa, b1);
        }
    }
}

// acc += A C for one 16-wide k-step: A a fragment in hand (16 x 16), C the 16 rows of sRows
// [16][kHeadDim + pad] read as probs_times_rows reads them. 16-bit types only. (probs_times_rows
// is not written on it: its tuned kernels sit at their register caps, and it stays as it is.)
template <typename T, int kHeadDim, int kDimTiles>
__device__ __forceinline__ void frag_times_rows(FragC (&acc)[kDimTiles], const FragA<T>& a, const T* sRows) {
    static_assert(kDimTiles % 2 == 0, "dimension tiles are read in pairs");
    constexpr int kStride = kHeadDim + SmemPad<T>::kValue;
    const int lane = threadIdx.x % kWarpSize;
    const T* mine = sRows + (((lane >> 3) & 1) * 8 + (lane & 7)) * kStride + (lane >> 4) * 8;
#pragma unroll
    for (int dt = 0; dt < kDimTiles; dt += 2) {
        unsigned r[4];
        ldmatrix<4, true>(r, mine, dt * 8);
        const FragB<T> b0{{MmaPair<T>{r[0]}, MmaPair<T>{r[1]}}};
        const FragB<T> b1{{MmaPair<T>{r[2]}, MmaPair<T>{r[3]}}};
        mma(acc[dt], a, b0);
        mma(acc[dt + 1], a, b1);
    }
}

// Per-sequence temporal context of a pair's bias.
struct DenseTime {
    const unsigned* __restrict__ rel_time;
    int weekday0;
    int num_time_buckets;
    TemporalCoeffs coeffs;
};
