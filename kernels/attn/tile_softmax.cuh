// The online softmax of a warp's 16 rows over one tile of keys held as MMA accumulators (rows g
// and g + 8 of each lane, see common/mma.cuh), shared by the tiled kernels.
//
// Logits are in base 2 (scale and bias multiplied by log2 e by the caller, RowBias), so each
// probability is one subtraction and one ex2.approx: expf is eight instructions (range reduction
// around the same ex2), and in the forward's inner loop it was a quarter of the per-key work
// (SASS of evo_forward_tc_bf16_d64, sm_90).
#pragma once

#include "../common/mma.cuh"
#include "../common/warp.cuh"
#include "softmax.cuh"

// Per-row running state of a lane's two rows.
struct RowSoftmax {
    float m[2];  // running max, base 2 (-inf before any visible key)
    float l[2];  // this lane's share of the running sum (the group's four lanes add up at the end)

    __device__ __forceinline__ void init() {
        m[0] = m[1] = neg_inf();
        l[0] = l[1] = 0.f;
    }

    // `sc` holds logits (-inf where masked); turns them into probabilities against the row's
    // reference max, and returns per row the factor by which earlier accumulators must be scaled.
    // The reference moves only when a row's max passes it by more than kRescaleSlack, so most
    // sub-tiles keep it (corr = 1) and the caller skips rescaling the accumulators: returns
    // whether any row of the warp moved (warp-uniform); `corr` is set only when it returns true.
    // Probabilities are then at most 2^kRescaleSlack: in range for f16, bf16 and the f32 sums.
    static constexpr float kRescaleSlack = 8.f;

    template <int kKeyTiles>
    __device__ __forceinline__ bool update(FragC (&sc)[kKeyTiles], float (&corr)[2]) {
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) mx[i >> 1] = fmaxf(mx[i >> 1], sc[n].c[i]);
        }
        // A row's reference moves only if some lane of its group passes it by the slack (or, for
        // an empty row, sees a key: -inf + slack is -inf). One vote tells whether any row of the
        // warp may move; when none may, the group maxima (two shuffle rounds per row, on the
        // sub-tile's critical path) and the rescale factors' ex2 are not needed: the reference
        // stays, exactly as the full path would keep it.
        const bool may_move = mx[0] > m[0] + kRescaleSlack || mx[1] > m[1] + kRescaleSlack;
        bool moved = false;
        if (__any_sync(kFullMask, may_move)) {  // warp-uniform
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // The four lanes of a group hold the same rows.
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 2));
                // Before any visible key, acc and l are zeros: taking the first max needs no
                // scaling.
                const bool empty = m[r] == neg_inf();
                const bool move = !empty && mx[r] > m[r] + kRescaleSlack;
                corr[r] = move ? fast_exp2(m[r] - mx[r]) : 1.f;
                if (empty || move) m[r] = mx[r];
                l[r] *= corr[r];
                moved = moved || move;
            }
            moved = __any_sync(kFullMask, moved) != 0;
        }
        float base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) base[r] = m[r] == neg_inf() ? 0.f : m[r];  // an empty prefix stays empty
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float pr = fast_exp2(sc[n].c[i] - base[i >> 1]);
                l[i >> 1] += pr;
                sc[n].c[i] = pr;
            }
        }
        return moved;
    }

    // Adds up the group's shares of the sums; returns 1 / sum per row (0 for an empty row).
    __device__ __forceinline__ void finish(float (&inv)[2]) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
            l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
            inv[r] = l[r] > 0.f ? fast_rcp(l[r]) : 0.f;
        }
    }

    // LSE of row r after finish(), natural log as SPEC section 5 defines it: -inf for an empty
    // key set.
    __device__ __forceinline__ float lse(int r) const {
        // l >= 1 (the reference max is a max some key reached, so the row's largest key adds
        // 2^(its logit - m) >= 1), so log2 l is small and m, maybe large, is rounded once.
        return l[r] > 0.f ? fmaf(m[r], kLn2, fast_log2(l[r]) * kLn2) : neg_inf();
    }
};

template <int kDimTiles>
__device__ __forceinline__ void scale_rows(FragC (&acc)[kDimTiles], const float (&f)[2]) {
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
        acc[dt].c[0] *= f[0];
        acc[dt].c[1] *= f[0];
        acc[dt].c[2] *= f[1];
        acc[dt].c[3] *= f[1];
    }
}
