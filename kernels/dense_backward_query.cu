// Dense counterpart backward, query side: for a block of 64 queries of one sequence and head,
// Delta = <dO, O> per row (kept for the key kernel), then over the visible keys
// P = exp(z - LSE), dP = dO V^T, dS = P (dP - Delta), dQ = scale dS K, and each row's share of
// dcoeffs (sum of dS times the pair's three temporal features, with the exact Delta) as a
// per-(head, token) partial that coeffs_reduce.cu adds in a fixed order. No atomics: every output
// element has one writer.
//
// Shared memory: K and V tiles [kCols][D + pad] and K^T [D][kCols + pad]: at most 29.2 KB.
//
// @instantiate SPARSECTR_DENSE_BACKWARD_QUERY dtype head_dim

#include "common/dtype.cuh"
#include "common/mma.cuh"
#include "common/params.cuh"
#include "common/warp.cuh"
#include "attn/temporal.cuh"
#include "attn/softmax.cuh"
#include "attn/dense.cuh"

// Three blocks per SM only at D = 32: the 168-register cap spilled 16-bit D = 64 (NVRTC 13.0).
template <int kHeadDim>
constexpr int kDenseQueryMinBlocks = kHeadDim <= 32 ? 3 : 2;

// <dO, O> of row `row`: the four lanes of a group take a quarter of the head dimension each.
template <typename T, int kHeadDim>
__device__ __forceinline__ float row_delta(const T* __restrict__ d_o, const T* __restrict__ o,
                                           size_t at) {
    constexpr int kQuarter = kHeadDim / 4;
    const int t = threadIdx.x % 4;
    float acc = 0.f;
#pragma unroll 8
    for (int e = 0; e < kQuarter; ++e) {
        const size_t i = at + t * kQuarter + e;
        acc = fmaf(to_float(d_o[i]), to_float(o[i]), acc);
    }
    acc += __shfl_xor_sync(kFullMask, acc, 1);
    acc += __shfl_xor_sync(kFullMask, acc, 2);
    return acc;
}

template <typename T, int kHeadDim>
__device__ void dense_backward_query(const EvoParams& p, const T* __restrict__ q,
                                     const T* __restrict__ k, const T* __restrict__ v,
                                     const T* __restrict__ o, const T* __restrict__ d_o,
                                     const float* __restrict__ lse, const float* __restrict__ coeffs,
                                     const unsigned* __restrict__ rel_time,
                                     const SeqInfo* __restrict__ seqs,
                                     const int* __restrict__ weekday0, T* __restrict__ dq,
                                     float* __restrict__ delta, float* __restrict__ partial,
                                     const int* __restrict__ tiles) {
    constexpr int kCols = DenseCols<T, kHeadDim>::kQuery;
    constexpr bool kResident = DenseResident<T, kHeadDim>::kValue;
    constexpr int kPad = SmemPad<T>::kValue;
    constexpr int kRowStride = kHeadDim + kPad;
    constexpr int kColStride = kCols + kPad;
    constexpr int kParts = DenseParts<T, kHeadDim>::kValue;
    constexpr int kDimTiles = kHeadDim / 8 / kParts;  // of this block's part of dQ
    constexpr int kKeyTiles = kCols / 8;
    alignas(16) __shared__ T sK[kCols * kRowStride];
    alignas(16) __shared__ T sV[kCols * kRowStride];
    alignas(16) __shared__ T sKt[kHeadDim * kColStride];
    __shared__ TokenTime sKeyTime[kCols];

    const DenseBlock blk = dense_block(p, kParts, tiles);
    const int dim0 = blk.part * (kHeadDim / kParts);  // first dimension of this block's dQ
    const int head = blk.head;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;
    const TemporalCoeffs tc{coeffs[head * 3], coeffs[head * 3 + 1], coeffs[head * 3 + 2]};

    {
        const int s = blk.seq;
        const SeqInfo si = seqs[s];
        const int q0 = si.start + blk.tile * kDenseRows;
        if (q0 >= si.end) return;  // block-uniform; the tile list holds none
        const int q_end = min(q0 + kDenseRows, si.end);
        const int wq = q0 + warp * 16;
        const int rows[2] = {wq + g, wq + g + 8};
        const int clamped[2] = {min(rows[0], si.end - 1), min(rows[1], si.end - 1)};
        const size_t at[2] = {dense_row<kHeadDim>(p, clamped[0], head),
                              dense_row<kHeadDim>(p, clamped[1], head)};
        RowOperand<T, kHeadDim, kResident> qf, dof;
        qf.init(q + at[0], q + at[1]);
        dof.init(d_o + at[0], d_o + at[1]);
        const int wd0 = weekday0[s];
        const float inv_buckets = __frcp_rn(static_cast<float>(p.num_time_buckets));
        float row_d[2], row_lse[2];
        TokenTime row_time[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_d[r] = row_delta<T, kHeadDim>(d_o, o, at[r]);
            row_lse[r] = lse[static_cast<size_t>(clamped[r]) * p.heads + head];
            row_time[r] = token_time(rel_time[clamped[r]], wd0);
            if (t == 0 && blk.part == 0 && rows[r] < si.end) delta[static_cast<size_t>(rows[r]) * p.heads + head] = row_d[r];
        }

        FragC acc[kDimTiles];
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) clear(acc[dt]);
        // dcoeffs_row = sum_k P (dP - Delta) f = sum P dP f - Delta * sum P f, with the exact
        // Delta = sum P dP of this pass: Delta from the stored (rounded) O would move a bf16 row's
        // share by about 2^-9 |dO| |O|, which the cancelling sum turned into 1e-2 relative errors.
        // For the same reason P is normalized by its own sum S here: the stored LSE is rounded to
        // f32 (an ulp of a logit of 50 is 4e-6) and its log2 approximate, which scales every P
        // of the row alike, and the two cancelling terms scale as S and S^2. Uncorrected, peaked
        // f32 rows came to 1.4e-5 of dcoeffs against SPEC's 1e-5 (emulation at the device's
        // documented math error; 9.2e-6 with exact math).
        float pdpf[2][3] = {{0.f, 0.f, 0.f}, {0.f, 0.f, 0.f}};  // sum P dP f
        float pf[2][3] = {{0.f, 0.f, 0.f}, {0.f, 0.f, 0.f}};    // sum P f
        float pdp_sum[2] = {0.f, 0.f};                          // sum P dP
        float p_sum[2] = {0.f, 0.f};                            // S = sum P

        for (int kt = si.start; kt < q_end; kt += kCols) {
            __syncthreads();
            tile_tensor<T, kHeadDim, kCols>(p, k, kt, q_end, head, sK, sKt);
            tile_tensor<T, kHeadDim, kCols>(p, v, kt, q_end, head, sV, nullptr);
            const int tid = threadIdx.x;
            if (tid < kCols) sKeyTime[tid] = token_time(kt + tid < q_end ? rel_time[kt + tid] : 0u, wd0);
            __syncthreads();
            if (kt > wq + 15 || wq >= si.end) continue;  // warp-uniform

            FragC sc[kKeyTiles], dp[kKeyTiles];
#pragma unroll
            for (int n = 0; n < kKeyTiles; ++n) {
                clear(sc[n]);
                clear(dp[n]);
            }
            // load_b: ldmatrix spilled this kernel at D = 32 (NVRTC 13.0, sm_80 and sm_90).
            rows_times_tile<T, kHeadDim, kCols, kLoadB>(sc, qf, sK);
            rows_times_tile<T, kHeadDim, kCols, kLoadB>(dp, dof, sV);
#pragma unroll
            for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int r = i >> 1, col = n * 8 + 2 * t + (i & 1), key = kt + col;
                    float ds = 0.f;
                    if (dense_visible(si, rows[r], key)) {
                        float z = sc[n].c[i] * p.scale;
                        const bool timed = dense_timed(si, rows[r]) && dense_timed(si, key);
                        TemporalFeatures f{0.f, 0.f, 0.f};
                        if (timed) {
                            f = pair_features(row_time[r], sKeyTime[col], p.num_time_buckets, inv_buckets);
                            z += tc.bias(f);
                        }
                        const float pr = expf(z - row_lse[r]);
                        const float pdp = pr * dp[n].c[i];
                        ds = pr * (dp[n].c[i] - row_d[r]);
                        pdp_sum[r] += pdp;
                        p_sum[r] += pr;
                        const float fx[3] = {f.bucket, f.hour, f.weekend};
#pragma unroll
                        for (int x = 0; x < 3; ++x) {
                            pdpf[r][x] = fmaf(pdp, fx[x], pdpf[r][x]);
                            pf[r][x] = fmaf(pr, fx[x], pf[r][x]);
                        }
                    }
                    sc[n].c[i] = ds;
                }
            }
            probs_times_tile<T, kCols>(acc, sc, sKt, dim0);
        }

#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                if (rows[r] < si.end)
                    dq[dense_row<kHeadDim>(p, rows[r], head) + dim0 + dt * 8 + 2 * t + (i & 1)] =
                        from_float<T>(acc[dt].c[i] * p.scale);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            pdp_sum[r] += __shfl_xor_sync(kFullMask, pdp_sum[r], 1);
            pdp_sum[r] += __shfl_xor_sync(kFullMask, pdp_sum[r], 2);
            p_sum[r] += __shfl_xor_sync(kFullMask, p_sum[r], 1);
            p_sum[r] += __shfl_xor_sync(kFullMask, p_sum[r], 2);
#pragma unroll
            for (int x = 0; x < 3; ++x) {
                pdpf[r][x] += __shfl_xor_sync(kFullMask, pdpf[r][x], 1);
                pdpf[r][x] += __shfl_xor_sync(kFullMask, pdpf[r][x], 2);
                pf[r][x] += __shfl_xor_sync(kFullMask, pf[r][x], 1);
                pf[r][x] += __shfl_xor_sync(kFullMask, pf[r][x], 2);
            }
            if (t == 0 && blk.part == 0 && rows[r] < si.end) {
                float* out = partial + (static_cast<size_t>(head) * p.num_tokens + rows[r]) * 3;
                // With P / S: (sum P dP f - (sum P dP / S) sum P f) / S. A row sees at least
                // itself, so S > 0; the test keeps a row with none at 0, not NaN.
                const float inv = p_sum[r] > 0.f ? 1.f / p_sum[r] : 0.f;
                const float d = pdp_sum[r] * inv;
#pragma unroll
                for (int x = 0; x < 3; ++x) out[x] = inv * fmaf(-d, pf[r][x], pdpf[r][x]);
            }
        }
    }
}

#define SPARSECTR_DENSE_BACKWARD_QUERY(NAME, T, D)                                               \
    extern "C" __global__ void __launch_bounds__(kDenseThreads, kDenseQueryMinBlocks<D>)         \
        NAME(const EvoParams p, const T* __restrict__ q, const T* __restrict__ k,                \
             const T* __restrict__ v, const T* __restrict__ o, const T* __restrict__ d_o,        \
             const float* __restrict__ lse, const float* __restrict__ coeffs,                    \
             const unsigned* __restrict__ rel_time, const SeqInfo* __restrict__ seqs,            \
             const int* __restrict__ weekday0, T* __restrict__ dq, float* __restrict__ delta,    \
             float* __restrict__ partial, const int* __restrict__ tiles) {                       \
        dense_backward_query<T, D>(p, q, k, v, o, d_o, lse, coeffs, rel_time, seqs, weekday0,    \
                                   dq, delta, partial, tiles);                                          \
    }
