// Global-to-shared copies that bypass registers (PTX `cp.async`, sm_80+): a thread issues all of
// its pieces of a tile at once and waits once, so a gather costs one memory latency instead of
// one per dependent load, and holds no registers while in flight. Host compiles (the CPU
// emulation, kernels/emu/cuda_host.h) poison the destination at issue and copy at the wait, with
// the hardware's alignment rule checked.
#pragma once

#include "emu_site.cuh"

// Copies kBytes (4, 8 or 16) from `src` to `dst` (both kBytes-aligned), or writes kBytes zero
// bytes where `valid` is false (then `src` is not read, but must still be a mapped address).
// Visible to the block after cp_async_wait_all() and a barrier. 16-byte copies bypass L1 (`.cg`);
// smaller ones may only go through it (`.ca`).
template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid SPARSECTR_SITE_PARAM) {
    static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef __CUDA_ARCH__
    // The compiler's conversion, not inline asm: see ldmatrix (mma.cuh).
    const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    if constexpr (kBytes == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(src),
                     "r"(valid ? 16 : 0)
                     : "memory");
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %3, %2;" ::"r"(smem), "l"(src),
                     "r"(valid ? kBytes : 0), "n"(kBytes)
                     : "memory");
    }
#else
    const emu::ModelledScope modelled;
    emu::cp_async_issue(dst, src, valid, kBytes);
    emu::smem_access(dst, kBytes, emu::kSmemStore, site);
#endif
}

// Waits for every cp_async this thread issued.
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_all;" ::: "memory");
#else
    const emu::ModelledScope modelled;  // the copies' stores were modelled at their issue
    emu::cp_async_wait();
#endif
}
