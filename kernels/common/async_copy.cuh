// Global-to-shared copies that bypass registers (PTX `cp.async`, sm_80+): a thread issues all of
// its pieces of a tile at once and waits once, so a gather costs one memory latency instead of
// one per dependent load, and holds no registers while in flight. Host compiles (the CPU
// emulation, kernels/emu/cuda_host.h) poison the destination at issue and copy at the wait, with
// the hardware's alignment rule checked.
#pragma once

// Copies 16 bytes from `src` to `dst` (both 16-byte aligned), or writes 16 zero bytes where
// `valid` is false (then `src` is not read, but must still be a mapped address). Visible to the
// block after cp_async_wait_all() and a barrier.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef __CUDA_ARCH__
    unsigned smem;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(smem) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
#else
    emu::cp_async_issue(dst, src, valid);
#endif
}

// Copies 4 bytes (both 4-byte aligned), or writes zeros where `valid` is false, like cp_async16.
// Through L1 (`.ca`: `.cg` takes only 16-byte copies).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
#ifdef __CUDA_ARCH__
    unsigned smem;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(smem) : "l"(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem), "l"(src),
                 "r"(valid ? 4 : 0)
                 : "memory");
#else
    emu::cp_async_issue(dst, src, valid, 4);
#endif
}

// Waits for every cp_async16 this thread issued.
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_all;" ::: "memory");
#else
    emu::cp_async_wait();
#endif
}
