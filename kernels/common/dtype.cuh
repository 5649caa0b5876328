// Storage types and conversions. 16-bit types are raw bits converted with PTX `cvt`, so the
// kernels need no toolkit header (cuda_fp16.h / cuda_bf16.h) and NVRTC needs no include path.
// Host compiles (the CPU emulation in kernels/emu/, no __CUDA_ARCH__) take the host_* conversions
// of kernels/emu/cuda_host.h instead of the PTX; the device code is the same either way.
#pragma once

struct half_t {
    unsigned short bits;
};
struct bf16_t {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(half_t x) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#else
    return host_half_to_float(x.bits);  // host emulation (kernels/emu/cuda_host.h): exact
#endif
}

__device__ __forceinline__ float to_float(bf16_t x) {
    return __uint_as_float(static_cast<unsigned>(x.bits) << 16);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);

template <>
__device__ __forceinline__ float from_float<float>(float x) {
    return x;
}

template <>
__device__ __forceinline__ half_t from_float<half_t>(float x) {
    half_t h;
#ifdef __CUDA_ARCH__
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
#else
    h.bits = host_float_to_half_rn(x);  // host emulation: round to nearest even
#endif
    return h;
}

template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
    bf16_t h;
#ifdef __CUDA_ARCH__
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
#else
    h.bits = host_float_to_bf16_rn(x);  // host emulation: round to nearest even
#endif
    return h;
}

// Elements of T per 16-byte vector load.
template <typename T>
struct VecWidth {
    static constexpr int kValue = 16 / sizeof(T);
};

// Dot product of a row of `kHeadDim` elements of T (16-byte aligned) with an f32 vector in shared
// memory that every lane of the warp reads at the same address (a broadcast, no bank conflicts).
template <typename T, int kHeadDim>
__device__ __forceinline__ float dot_row(const T* __restrict__ gRow, const float* sVec) {
    constexpr int kVec = VecWidth<T>::kValue;
    static_assert(kHeadDim % kVec == 0, "rows are read in 16-byte pieces");
    const uint4* gRow4 = reinterpret_cast<const uint4*>(gRow);
    float acc = 0.f;
#pragma unroll 4
    for (int i = 0; i < kHeadDim / kVec; ++i) {
        uint4 raw = __ldg(gRow4 + i);
        const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc = fmaf(to_float(elems[e]), sVec[i * kVec + e], acc);
    }
    return acc;
}

// Element e (0 <= e < 16 / sizeof(T), any e at run time) of a 16-byte vector, without indexing a
// local array (which would put it in local memory).
template <typename T>
__device__ __forceinline__ T vec_elem(const uint4& v, int e) {
    const int word = e >> 1;
    const unsigned w = word == 0 ? v.x : (word == 1 ? v.y : (word == 2 ? v.z : v.w));
    T x;
    x.bits = static_cast<unsigned short>((w >> ((e & 1) * 16)) & 0xffffu);
    return x;
}
template <>
__device__ __forceinline__ float vec_elem<float>(const uint4& v, int e) {
    const unsigned w = e == 0 ? v.x : (e == 1 ? v.y : (e == 2 ? v.z : v.w));
    return __uint_as_float(w);
}
