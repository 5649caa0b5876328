// Blocks per SM as a register budget: a kernel's __launch_bounds__ minimum asks ptxas to fit that
// many blocks' registers on an SM, but shared memory may allow fewer. A minimum above what shared
// memory allows buys no warps and only takes registers from ptxas: NVRTC 13.0 spilled 12 B in
// the forward at D = 64 on sm_120 (three blocks' registers, two blocks' shared memory) and 12 B
// in the summary backward at D = 32 on sm_86 and sm_89 (four and three).
#pragma once

// Shared memory per SM of the architecture being compiled (CUDA C++ Programming Guide, technical
// specifications per compute capability): 100 KB on sm_86, sm_89 and sm_12x, 164 KB on sm_80
// and sm_87, 228 KB on sm_90 and sm_10x. The host build (the CPU emulation) takes the largest.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 890 || __CUDA_ARCH__ >= 1200)
constexpr int kSmemPerSm = 100 * 1024;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kSmemPerSm = 164 * 1024;
#else
constexpr int kSmemPerSm = 228 * 1024;
#endif

// sm_100 and sm_103 (B200, B300): where ptxas fits fewer registers than on sm_90 for the same
// budget (NVRTC 13.0), so some kernels ask for fewer blocks there to keep their no-spill rule.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000 && __CUDA_ARCH__ < 1100
constexpr bool kArchSm10x = true;
#else
constexpr bool kArchSm10x = false;
#endif

// sm_80 to sm_89 (A100, A10, L4, L40): likewise, where some kernels spill at the budget that
// fits them on sm_90.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool kArchBeforeSm90 = true;
#else
constexpr bool kArchBeforeSm90 = false;
#endif

// Shared memory the driver reserves for every resident block (sm_80 and later).
constexpr int kSmemReservedPerBlock = 1024;

// `wanted` blocks per SM, or as many as shared memory holds at `smem_bytes` of static shared
// memory a block where that is fewer (at least one).
__host__ __device__ constexpr int min_blocks_per_sm(int wanted, int smem_bytes) {
    const int fit = kSmemPerSm / (smem_bytes + kSmemReservedPerBlock);
    return wanted < fit ? wanted : fit > 1 ? fit : 1;
}
