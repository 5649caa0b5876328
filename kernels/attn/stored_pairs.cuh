// The local window's pairs, stored by the query backward for the key side (`LocalPairs::Stored`
// in src/cuda/backward.rs). Both kernels compute the same (query, key) pairs of the local branch:
// the query kernel for dQ, the key side for dK and dV, each with its own logits, bias, exp, mask
// and dO V^T MMA. With stored pairs the query kernel (backward_query_tc.cu) writes, for every
// behavior query q and head, gate_b P and dz~ = gate_b P (dP' - D~) of each key of a row, and
// delta = D~ - dgates_b once per (q, head); the key side (backward_key_tc.cu) rebuilds the exact
// dz = dz~ + gate_b P delta (D~ is what the query kernel centred on before it knew dgates_b: the
// saved O_b's <dO, O_b>) and keeps only its dV and dK MMAs for the behaviors' walk.
//
// A row covers the keys [q8 - W, q8 + 8): q8 is q rounded down to a multiple of 8 counted from
// its sequence's start, W = w - 1 rounded up to 8, so R = W + 8 keys hold q's window [q - w + 1,
// q]. The key side's 64-key tiles start at multiples of 64 from the sequence's start, so a tile
// meets every row in whole 16-byte pieces of 8 keys (cp.async 16, zero-filled where the row does
// not reach). The query kernel writes every entry of a behavior's row: the pairs it sees, and
// zero for the rest (keys before its window or the sequence's behaviors, after the query, past
// the sequence), so the key side needs no mask. Layout [T, H, 2, R] in the input dtype (gate P's
// row, then dz~'s) and delta [T, H] f32; only behaviors' rows are written or read.
#pragma once

#include "../common/params.cuh"

struct PairRows {
    int span;  // W
    int len;   // R

    __device__ __forceinline__ static PairRows of(int window) {
        const int span = (window - 1 + 7) & ~7;
        return PairRows{span, span + 8};
    }
    // The first key of query q's row.
    __device__ __forceinline__ int first(const SeqInfo& si, int q) const {
        return si.start + ((q - si.start) & ~7) - span;
    }
    // Element offset of query q's row of gate P (dz~'s follows at + len).
    __device__ __forceinline__ size_t row(int q, int heads, int head) const {
        return (static_cast<size_t>(q) * heads + head) * 2 * static_cast<size_t>(len);
    }
};
