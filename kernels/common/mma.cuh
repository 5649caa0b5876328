// Warp-level D = A B + C on 16x8x16 tiles, in the fragment layout of PTX
// `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}` (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"). Lane = 4 * g + t (g = groupID, t = threadID_in_group):
//
//   A (16 x 16, row major):  r[0] = A[g][2t, 2t+1]      r[1] = A[g+8][2t, 2t+1]
//                            r[2] = A[g][2t+8, 2t+9]    r[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8, k x n):       r[0] = B[2t, 2t+1][g]      r[1] = B[2t+8, 2t+9][g]
//   C, D (16 x 8, f32):      c[0] = C[g][2t]  c[1] = C[g][2t+1]  c[2] = C[g+8][2t]  c[3] = C[g+8][2t+1]
//
// Each r[] is a pair of consecutive elements, the lower index first (the low half of the 32-bit
// register for 16-bit types). bf16 and f16 run on tensor cores. f32 has no tensor-core MMA with f32
// products (tf32 would miss the 1e-5 tolerance), so it runs the same fragment contract on CUDA
// cores, gathering operands with shuffles: slower, but one kernel source serves every dtype.
// Host compiles (the CPU emulation) compute the 16-bit MMA in kernels/emu/cuda_host.h from the
// same layout.
#pragma once

#include "dtype.cuh"
#include "emu_site.cuh"
#include "warp.cuh"

// Two consecutive elements of a fragment.
template <typename T>
struct MmaPair {
    unsigned bits;  // lower-indexed element in the low 16 bits
};
template <>
struct MmaPair<float> {
    float lo, hi;
};

template <typename T>
struct FragA {
    MmaPair<T> r[4];
};
template <typename T>
struct FragB {
    MmaPair<T> r[2];
};
struct FragC {
    float c[4];
};

__device__ __forceinline__ void clear(FragC& f) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f.c[i] = 0.f;
}

// The pair at p[0], p[1] (p 4-byte aligned for 16-bit types: an even element index of a row
// whose stride is even).
template <typename T>
__device__ __forceinline__ MmaPair<T> load_pair(const T* p SPARSECTR_SITE_PARAM) {
#ifndef __CUDA_ARCH__
    emu::smem_access(p, 4, emu::kSmemLoad, site);
    const emu::ModelledScope modelled;
#endif
    return MmaPair<T>{*reinterpret_cast<const unsigned*>(p)};
}
template <>
__device__ __forceinline__ MmaPair<float> load_pair<float>(const float* p SPARSECTR_SITE_DECL) {
#ifndef __CUDA_ARCH__
    emu::smem_access(p, 8, emu::kSmemLoad, site);
    const emu::ModelledScope modelled;
#endif
    return MmaPair<float>{p[0], p[1]};
}

template <typename T>
__device__ __forceinline__ MmaPair<T> make_pair(float lo, float hi);

// Rounds lo, hi to T and stores them at p[0], p[1] (aligned as for load_pair): one 4-byte store
// for 16-bit types where two 2-byte ones touched the same sectors twice.
template <typename T>
__device__ __forceinline__ void store_pair(T* p, float lo, float hi SPARSECTR_SITE_PARAM) {
#ifndef __CUDA_ARCH__
    emu::smem_access(p, 4, emu::kSmemStore, site);
    const emu::ModelledScope modelled;
#endif
    *reinterpret_cast<unsigned*>(p) = make_pair<T>(lo, hi).bits;
}
template <>
__device__ __forceinline__ void store_pair<float>(float* p, float lo, float hi SPARSECTR_SITE_DECL) {
#ifndef __CUDA_ARCH__
    emu::smem_access(p, 8, emu::kSmemStore, site);
    const emu::ModelledScope modelled;
#endif
    p[0] = lo;
    p[1] = hi;
}

template <typename T>
__device__ __forceinline__ MmaPair<T> make_pair(float lo, float hi) {
    return MmaPair<T>{static_cast<unsigned>(from_float<T>(lo).bits) |
                      (static_cast<unsigned>(from_float<T>(hi).bits) << 16)};
}
template <>
__device__ __forceinline__ MmaPair<float> make_pair<float>(float lo, float hi) {
    return MmaPair<float>{lo, hi};
}

template <typename T>
__device__ __forceinline__ float pair_lo(MmaPair<T> x) {
    T e;
    e.bits = static_cast<unsigned short>(x.bits & 0xffffu);
    return to_float(e);
}
template <typename T>
__device__ __forceinline__ float pair_hi(MmaPair<T> x) {
    T e;
    e.bits = static_cast<unsigned short>(x.bits >> 16);
    return to_float(e);
}
template <>
__device__ __forceinline__ float pair_lo<float>(MmaPair<float> x) {
    return x.lo;
}
template <>
__device__ __forceinline__ float pair_hi<float>(MmaPair<float> x) {
    return x.hi;
}

// Two stored elements as a pair (16-bit types only: the f32 path never gathers pairs this way).
template <typename T>
__device__ __forceinline__ MmaPair<T> pair_of(T lo, T hi) {
    return MmaPair<T>{static_cast<unsigned>(lo.bits) | (static_cast<unsigned>(hi.bits) << 16)};
}

// kMatrices (2 or 4) 8x8 matrices of 16-bit elements from shared memory (PTX `ldmatrix .x2`
// and `.x4`, `.trans` where kTrans): lane l gives the address of row l % 8 of matrix l / 8 (8
// consecutive elements, 16-byte aligned; lanes 16-31 are ignored by .x2) and receives
//   r[i] = (M_i[g][2t], M_i[g][2t + 1])      the B fragment half of an operand whose k runs
//                                             along M's rows (K in Q K^T), or with kTrans
//   r[i] = (M_i[2t][g], M_i[2t + 1][g])      one whose k runs down M's rows (V in P V).
// One instruction for what load_b reads in two loads per matrix pair. Host compiles gather the
// same elements through shuffles of the row addresses, so the emulation checks the callers'
// addressing. The row address is `row + offset`, split so that `row` converts to a shared-space
// address once for every offset (a 32-bit register instead of a 64-bit pointer per call). The
// conversion is the compiler's own (__cvta_generic_to_shared), which it folds into the address
// arithmetic that made `row`: as inline asm (cvta.to.shared) it was opaque, and every sub-tile
// rebuilt its rows' 64-bit generic pointers first (sm_90 SASS, bf16, D = 64: the forward's
// sub-tile loops took 11-16 more instructions, the key side's walks 20).
template <int kMatrices, bool kTrans, typename T>
__device__ __forceinline__ void ldmatrix(unsigned (&r)[kMatrices], const T* row, int offset SPARSECTR_SITE_PARAM) {
    static_assert(kMatrices == 4 || kMatrices == 2, "ldmatrix .x2 or .x4 (.trans or not)");
#ifdef __CUDA_ARCH__
    const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(row));
    const unsigned at = smem + offset * static_cast<unsigned>(sizeof(T));
    if constexpr (kMatrices == 4 && kTrans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(at));
    else if constexpr (kMatrices == 4)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(at));
    else if constexpr (kTrans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(at));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(at));
#else
    const emu::ModelledScope modelled;
    row += offset;
    const int lane = threadIdx.x % kWarpSize;
    if (lane < 8 * kMatrices) emu::smem_access(row, 16, emu::kSmemLoad, site);
    if (lane < 8 * kMatrices && reinterpret_cast<unsigned long long>(row) % 16 != 0)
        emu::fail("ldmatrix row address %p: not 16-byte aligned", static_cast<const void*>(row));
    const int g = lane >> 2, t = lane & 3;
    const unsigned long long mine = reinterpret_cast<unsigned long long>(row);
#pragma unroll
    for (int i = 0; i < kMatrices; ++i) {
        if (kTrans) {
            const T* top = reinterpret_cast<const T*>(__shfl_sync(kFullMask, mine, 8 * i + 2 * t));
            const T* next = reinterpret_cast<const T*>(__shfl_sync(kFullMask, mine, 8 * i + 2 * t + 1));
            r[i] = static_cast<unsigned>(top[g].bits) | (static_cast<unsigned>(next[g].bits) << 16);
        } else {
            const T* at = reinterpret_cast<const T*>(__shfl_sync(kFullMask, mine, 8 * i + g));
            r[i] = static_cast<unsigned>(at[2 * t].bits) | (static_cast<unsigned>(at[2 * t + 1].bits) << 16);
        }
    }
#endif
}

// A fragment from row-major storage: `top` points at element [g][k0] of the tile's row g,
// `bottom` at [g + 8][k0] (callers clamp rows past the end), k0 a multiple of 16.
template <typename T>
__device__ __forceinline__ FragA<T> load_a(const T* top, const T* bottom SPARSECTR_SITE_PARAM) {
    const int t = threadIdx.x % 4;
    FragA<T> f;
    f.r[0] = load_pair(top + 2 * t SPARSECTR_SITE_ARG);
    f.r[1] = load_pair(bottom + 2 * t SPARSECTR_SITE_ARG);
    f.r[2] = load_pair(top + 2 * t + 8 SPARSECTR_SITE_ARG);
    f.r[3] = load_pair(bottom + 2 * t + 8 SPARSECTR_SITE_ARG);
    return f;
}

// A B fragment from storage where k runs along a row: `col` points at element [k0] of the row
// that holds column n = g (B[k][g] = col[k - k0]).
template <typename T>
__device__ __forceinline__ FragB<T> load_b(const T* col SPARSECTR_SITE_PARAM) {
    const int t = threadIdx.x % 4;
    FragB<T> f;
    f.r[0] = load_pair(col + 2 * t SPARSECTR_SITE_ARG);
    f.r[1] = load_pair(col + 2 * t + 8 SPARSECTR_SITE_ARG);
    return f;
}

// An A fragment from two C accumulators side by side (columns 0-7 and 8-15 of A): the layouts
// line up, so P of an attention tile becomes the A operand of P V without leaving registers.
template <typename T>
__device__ __forceinline__ FragA<T> a_from_c(const FragC& left, const FragC& right) {
    FragA<T> f;
    f.r[0] = make_pair<T>(left.c[0], left.c[1]);
    f.r[1] = make_pair<T>(left.c[2], left.c[3]);
    f.r[2] = make_pair<T>(right.c[0], right.c[1]);
    f.r[3] = make_pair<T>(right.c[2], right.c[3]);
    return f;
}

// The f32 contract on CUDA cores: lane (g, t) needs rows g and g + 8 of A (held by the four lanes
// of its group) and columns 2t, 2t + 1 of B (held by groups 2t and 2t + 1); four rounds of
// shuffles bring them, one source thread-in-group per round.
__device__ __forceinline__ void mma_simt(FragC& d, const float (&a)[8], const float (&b)[4]) {
    const int lane = threadIdx.x % kWarpSize;
    const int g = lane >> 2, t = lane & 3;
    // Not unrolled: ptxas would hoist all 64 shuffles and spill (NVRTC 13.0, sm_80).
#pragma unroll 1
    for (int src = 0; src < 4; ++src) {
        float av[8], b0[4], b1[4];
#pragma unroll
        for (int i = 0; i < 8; ++i) av[i] = __shfl_sync(kFullMask, a[i], (g << 2) | src);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            b0[j] = __shfl_sync(kFullMask, b[j], ((2 * t) << 2) | src);
            b1[j] = __shfl_sync(kFullMask, b[j], ((2 * t + 1) << 2) | src);
        }
        // av[2i + e] = A[g + 8 (i & 1)][2 src + 8 (i >> 1) + e]; b*[2j + e] = B[2 src + 8j + e][.]
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float top = av[4 * j + e], bottom = av[4 * j + 2 + e];
                d.c[0] = fmaf(top, b0[2 * j + e], d.c[0]);
                d.c[1] = fmaf(top, b1[2 * j + e], d.c[1]);
                d.c[2] = fmaf(bottom, b0[2 * j + e], d.c[2]);
                d.c[3] = fmaf(bottom, b1[2 * j + e], d.c[3]);
            }
        }
    }
}

__device__ __forceinline__ void mma(FragC& d, const FragA<float>& a, const FragB<float>& b) {
    const float av[8] = {a.r[0].lo, a.r[0].hi, a.r[1].lo, a.r[1].hi,
                         a.r[2].lo, a.r[2].hi, a.r[3].lo, a.r[3].hi};
    const float bv[4] = {b.r[0].lo, b.r[0].hi, b.r[1].lo, b.r[1].hi};
    mma_simt(d, av, bv);
}

#ifdef __CUDA_ARCH__
__device__ __forceinline__ void mma(FragC& d, const FragA<bf16_t>& a, const FragB<bf16_t>& b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d.c[0]), "+f"(d.c[1]), "+f"(d.c[2]), "+f"(d.c[3])
        : "r"(a.r[0].bits), "r"(a.r[1].bits), "r"(a.r[2].bits), "r"(a.r[3].bits),
          "r"(b.r[0].bits), "r"(b.r[1].bits));
}

__device__ __forceinline__ void mma(FragC& d, const FragA<half_t>& a, const FragB<half_t>& b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d.c[0]), "+f"(d.c[1]), "+f"(d.c[2]), "+f"(d.c[3])
        : "r"(a.r[0].bits), "r"(a.r[1].bits), "r"(a.r[2].bits), "r"(a.r[3].bits),
          "r"(b.r[0].bits), "r"(b.r[1].bits));
}
#else
// Host emulation: the tensor-core instruction as a warp collective (kernels/emu/cuda_host.h).
template <typename T>
__device__ __forceinline__ void mma(FragC& d, const FragA<T>& a, const FragB<T>& b) {
    const float av[8] = {pair_lo(a.r[0]), pair_hi(a.r[0]), pair_lo(a.r[1]), pair_hi(a.r[1]),
                         pair_lo(a.r[2]), pair_hi(a.r[2]), pair_lo(a.r[3]), pair_hi(a.r[3])};
    const float bv[4] = {pair_lo(b.r[0]), pair_hi(b.r[0]), pair_lo(b.r[1]), pair_hi(b.r[1])};
    emu::mma_m16n8k16(av, bv, d.c);
}
#endif

// D = A B + C on a 16x8x8 bf16 tile (`mma.sync.aligned.m16n8k8`): the first halves of the
// m16n8k16 fragments, a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], b = B[2t, 2t+1][g]. For
// products of eight terms, where m16n8k16 with zeros in k = 8-15 needed zero registers moved
// into its operands (sm_90 SASS).
__device__ __forceinline__ void mma_k8(FragC& d, MmaPair<bf16_t> a0, MmaPair<bf16_t> a1, MmaPair<bf16_t> b) {
#ifdef __CUDA_ARCH__
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%0, %1, %2, %3};"
        : "+f"(d.c[0]), "+f"(d.c[1]), "+f"(d.c[2]), "+f"(d.c[3])
        : "r"(a0.bits), "r"(a1.bits), "r"(b.bits));
#else
    const float av[8] = {pair_lo(a0), pair_hi(a0), pair_lo(a1), pair_hi(a1), 0.f, 0.f, 0.f, 0.f};
    const float bv[4] = {pair_lo(b), pair_hi(b), 0.f, 0.f};
    emu::mma_m16n8k16(av, bv, d.c);
#endif
}
