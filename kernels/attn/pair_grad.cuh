// The backward of one (query, key) pair of one branch (SPEC section 6), shared by the
// query-centric kernel (lanes over keys) and the key-centric kernels (lanes over queries):
//
//   p  = exp(z - LSE_b(q))
//   u  = <dO(q), V_j>
//   dz = g_b(q) * p * (u - dgates_b(q))        [dgates_b = <dO, O_b>, so g_b * dgates_b = Dl_b]
//
// then dQ += scale dz K_j, dK_j += scale dz Q, dV_j += g_b p dO, dcoeffs += dz (Bk, Hr, Wk).
#pragma once

#include "../common/dtype.cuh"
#include "../common/params.cuh"
#include "temporal.cuh"

struct PairGrad {
    float dz;     // dL/dz
    float gp;     // g_b * p: the weight of dO in dV_j
};

// `logit` is scale * <Q, K> + bias; `u` is <dO, V_j> (without the gate).
__device__ __forceinline__ PairGrad pair_grad(float logit, float lse_b, float gate, float u,
                                              float dgates_b) {
    const float prob = expf(logit - lse_b);
    return PairGrad{gate * prob * (u - dgates_b), gate * prob};
}
