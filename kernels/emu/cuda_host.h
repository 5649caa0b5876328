// CUDA on the CPU: just enough of the CUDA C++ dialect for the kernels in kernels/ to compile as
// host C++20 (g++ -std=c++20 -pthread) and run, one OS thread per CUDA thread.
//
// - Qualifiers are defined away; `__shared__` becomes `static`: the blocks of a launch run one
//   after another, so one copy per kernel is one copy per block, poisoned before each (below).
// - `threadIdx`, `blockIdx`, `blockDim`, `gridDim` are thread-local.
// - Warp collectives (`__syncwarp`, `__shfl_sync`, `__shfl_xor_sync`, `__shfl_up_sync`,
//   `__shfl_down_sync`, `__ballot_sync`, `__any_sync`, `__all_sync`) exchange
//   values through a per-warp slot array and a barrier of the warp's 32 lanes; `__syncthreads` is
//   a barrier of the whole block, and `__syncthreads_and` one that also ANDs a predicate. As on a
//   GPU, every lane must reach the same collectives: a lane that reaches a different kind of
//   collective, a collective reached after a lane of the warp exited, or a partial mask stops the
//   run with a message (all are undefined behavior or a hang on a GPU). A watchdog stops a run
//   that makes no progress for EMU_WATCHDOG_SECONDS (default 20) and prints where every thread
//   waits: a deadlock of the emulation is a deadlock of the kernel.
// - `__ldg` of a 16-byte vector checks 16-byte alignment, as the hardware requires.
// - The device's approximate math (ex2, rcp and lg2 `.approx`, `__sincosf`, `expf`, `logf`,
//   `sincospif`) returns the exact value moved by the function's whole documented error bound,
//   so tolerances are tested against the device's worst case, not the C library's best
//   (`EMU_EXACT_MATH=name,..` turns models off to find which one an error comes from).
// - `emu::launch(kernel, grid, block, args...)` (or `EMU_LAUNCH`, which also names the kernel in
//   messages, or `emu::launch_named(name, kernel, ...)`) runs every block's threads:
//   blockDim std::jthreads per launch, thread `tid` of each block on thread `tid`, blocks one after
//   another (each block starts when every thread has finished the one before). It checks the
//   arguments against the kernel's parameter types (pointee types exactly, `const void*` takes any
//   pointer). Blocks run in grid order, or last to first with `EMU_BLOCK_ORDER=reverse`: a GPU
//   runs them in no set order, so a kernel whose blocks read what another block of the same
//   launch writes, or write the same element differently, gives other results the other way
//   round (the kernel emulation test compares the two runs' outputs bit for bit).
//
// Sanitizers work on top: -fsanitize=address,undefined finds out-of-bounds accesses of the
// kernels, -fsanitize=thread races between CUDA threads (a missing __syncwarp or __syncthreads
// is a data race it reports). Not emulated: timing, occupancy, shared-memory size limits, the
// GPU's memory model beyond the collectives' acquire/release. `cp.async` is deferred: poison at
// issue, the copy at the issuing thread's wait (see cp_async_issue).
//
// Shared memory is poisoned before every block: a GPU's starts with whatever the SM's previous
// block left, so a kernel that reads a shared word it did not write in this block is wrong there
// whatever it happens to read, and compute-sanitizer's initcheck covers global memory only. Every
// byte is 0xff (NaN in every float type, -1 as an integer) before even blocks and 0x7f (3.4e38 as
// an f32 or bf16, NaN as an f16, a huge index) before odd ones. `__shared__` variables are
// `static`s of their kernel's function; the driver links with -fdata-sections and emu_shared.ld,
// which gathers those of the kernel namespaces (`k_*`) into one range. `EMU_SHARED_POISON=0`
// turns the poison off; `emu::shared_poison_range()` says whether a build has the range.
//
// Kernel sources include nothing from here; compile with `-include` or include this first.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cstdarg>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <memory>
#include <map>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <tuple>
#include <unistd.h>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __CUDA_ARCH__
#error "cuda_host.h is for host compiles only"
#endif

// ---- Qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static

// ---- Built-in vector types and indices --------------------------------------------------------
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct uint3 {
    unsigned x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// ---- 16-bit float conversions (used by kernels/common/dtype.cuh without __CUDA_ARCH__) ---------
inline float host_half_to_float(unsigned short h) {
    const unsigned sign = (h & 0x8000u) << 16;
    const unsigned exp = (h >> 10) & 0x1fu;
    const unsigned man = h & 0x3ffu;
    unsigned bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);  // inf, NaN (payload kept, quiet or not)
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        // Subnormal: value man * 2^-24, exact in f32.
        float f = static_cast<float>(man) * 0x1p-24f;
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Round to nearest, ties to even; NaN becomes the canonical NaN 0x7fff (as PTX cvt does).
inline unsigned short host_float_to_half_rn(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    const unsigned sign = (x >> 16) & 0x8000u;
    const unsigned abs = x & 0x7fffffffu;
    if (abs > 0x7f800000u) return 0x7fffu;
    if (abs >= 0x47800000u) {  // >= 65536: inf (and everything that rounds to it below)
        return static_cast<unsigned short>(sign | 0x7c00u);
    }
    if (abs >= 0x38800000u) {  // normal half range, >= 2^-14
        // Rebias the exponent, then round the 13 dropped mantissa bits to nearest even; a carry
        // out of the mantissa bumps the exponent, up to inf, which is the right answer.
        const unsigned rebiased = abs - 0x38000000u;  // exponent - 112
        const unsigned rounded = rebiased + 0xfffu + ((rebiased >> 13) & 1u);
        return static_cast<unsigned short>(sign | (rounded >> 13));
    }
    if (abs < 0x33000000u) return static_cast<unsigned short>(sign);  // < 2^-25: to zero
    // Subnormal half: value = abs_mantissa * 2^(e - 150); result units are 2^-24.
    const unsigned e = abs >> 23;
    const unsigned mant = (abs & 0x7fffffu) | 0x800000u;
    const unsigned shift = 126u - e;  // e in [102, 112]: shift in [14, 24]
    const unsigned q = mant >> shift;
    const unsigned rem = mant & ((1u << shift) - 1u);
    const unsigned half = 1u << (shift - 1u);
    const unsigned r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<unsigned short>(sign | r);
}

inline unsigned short host_float_to_bf16_rn(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    const unsigned rounded = x + 0x7fffu + ((x >> 16) & 1u);
    return static_cast<unsigned short>(rounded >> 16);
}

// ---- Intrinsics -------------------------------------------------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
    return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline float __uint_as_float(unsigned x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline unsigned __float_as_uint(float x) {
    unsigned u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline int __float_as_int(float x) {
    int i;
    std::memcpy(&i, &x, 4);
    return i;
}
// u32 to f32 rounding toward zero: the bits below the top 24 are dropped first, so the
// conversion that follows is exact.
inline float __uint2float_rz(unsigned x) {
    if (x >= (1u << 24)) {
        const int drop = 31 - __builtin_clz(x) - 23;
        x &= ~((1u << drop) - 1u);
    }
    return static_cast<float>(x);
}
// ---- Device math at its documented error --------------------------------------------------
// The device's approximate functions are not the C library's: the special-function unit's ex2,
// rcp, lg2, sin and cos, and the CUDA math library's expf, logf and sincospif each have an error
// bound (CUDA C++ Programming Guide, "Mathematical Functions" and "Intrinsic Functions"). Exact
// values here would test the kernels against a better device than the real one, so every call
// returns the exact value moved by its function's whole bound, in a direction drawn from a hash
// of the argument: repeatable from run to run (the deterministic mode's bitwise checks hold) and
// varying from element to element. Arguments where the device is exact (integers for ex2, powers
// of two for rcp and lg2, 0 for expf, the quarter turns of sincospif) stay exact, since callers
// may rely on exp(0) = 1; the .ftz forms flush results below 2^-126 to zero, as the device does.
namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// EMU_EXACT_MATH=name,.. (ex2, rcp, lg2, expf, logf, sinpi, sincos, or all) turns the named
// models off, to find which approximation an error comes from.
inline bool exact_math(const char* name) {
    static const std::string list = [] {
        const char* s = std::getenv("EMU_EXACT_MATH");
        return "," + std::string(s != nullptr ? s : "") + ",";
    }();
    return list.find(",all,") != std::string::npos || list.find("," + std::string(name) + ",") != std::string::npos;
}

// The same answers, looked up once: the models run on every emulated exponential.
struct ExactMath {
    bool ex2, rcp, lg2, expf, logf, sinpi, sincos;
};
inline const ExactMath& exact_models() {
    static const ExactMath e{exact_math("ex2"),  exact_math("rcp"),   exact_math("lg2"),   exact_math("expf"),
                             exact_math("logf"), exact_math("sinpi"), exact_math("sincos")};
    return e;
}

// +1 or -1 from the argument's bits and a per-function salt (a 32-bit finalizer from MurmurHash3).
inline double error_sign(float x, unsigned salt) {
    unsigned h;
    std::memcpy(&h, &x, 4);
    h ^= salt;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return (h & 1u) != 0 ? 1.0 : -1.0;
}

// The f32 nearest to `exact + ulps * sign` units in the last place of f32 at |exact|, within
// ulps + 1/2 of those units of `exact` (one step back where rounding into the next binade, whose
// unit is twice as large, went further).
inline float moved_by_ulps(double exact, double ulps, double sign) {
    if (exact == 0.0 || !std::isfinite(exact)) return static_cast<float>(exact);
    int e;
    std::frexp(exact, &e);  // |exact| in [2^(e-1), 2^e): f32's unit there is 2^(e-24)
    const double unit = std::ldexp(1.0, e - 24);
    float r = static_cast<float>(exact + sign * ulps * unit);
    if (std::fabs(static_cast<double>(r) - exact) > (ulps + 0.5) * unit)
        r = std::nextafter(r, static_cast<float>(exact));
    return r;
}

inline float flush_subnormal(float x) { return std::fabs(x) < 0x1p-126f ? std::copysign(0.0f, x) : x; }

inline bool is_power_of_two(float x) {
    int e;
    return x > 0.0f && std::frexp(x, &e) == 0.5f;
}

// ex2.approx.ftz.f32: 2 ulp (the bound of exp2f, which compiles to it).
inline float sfu_ex2(float x) {
    const double exact = std::exp2(static_cast<double>(x));
    if (std::isnan(x) || std::isinf(x) || x == std::nearbyint(x) || exact_models().ex2)
        return flush_subnormal(static_cast<float>(exact));
    return flush_subnormal(moved_by_ulps(exact, 1.5, error_sign(x, 0x2e58u)));
}

// rcp.approx.ftz.f32: 1 ulp.
inline float sfu_rcp(float x) {
    const float in = flush_subnormal(x);
    const double exact = 1.0 / static_cast<double>(in);
    if (in == 0.0f || std::isinf(in) || is_power_of_two(std::fabs(in)) || exact_models().rcp)
        return flush_subnormal(static_cast<float>(exact));
    return flush_subnormal(moved_by_ulps(exact, 0.5, error_sign(x, 0x1ec9u)));
}

// lg2.approx.ftz.f32: 2^-22 absolute on [0.5, 2], 2 ulp elsewhere (the bound of __log2f).
inline float sfu_lg2(float x) {
    const float in = flush_subnormal(x);
    const double exact = std::log2(static_cast<double>(in));
    if (!(in > 0.0f) || std::isinf(in) || is_power_of_two(in) || exact_models().lg2) return static_cast<float>(exact);
    const double sign = error_sign(x, 0x7a11u);
    if (in >= 0.5f && in <= 2.0f) return static_cast<float>(exact + sign * 0x1p-22);
    return moved_by_ulps(exact, 1.5, sign);
}

// expf: 2 ulp; logf: 1 ulp (the CUDA math library, full range).
inline float device_expf(float x) {
    const double exact = std::exp(static_cast<double>(x));
    if (std::isnan(x) || std::isinf(x) || x == 0.0f || exact_models().expf) return static_cast<float>(exact);
    return moved_by_ulps(exact, 1.5, error_sign(x, 0x3b07u));
}
inline float device_logf(float x) {
    const double exact = std::log(static_cast<double>(x));
    if (!(x > 0.0f) || std::isinf(x) || x == 1.0f || exact_models().logf) return static_cast<float>(exact);
    return moved_by_ulps(exact, 0.5, error_sign(x, 0x5d3fu));
}

}  // namespace emu

// The kernels call the C names, so the models take them over as macros for everything after
// this header: the kernel sources, and the standard headers run_kernels.cpp includes, which do
// not name them (a use there would not compile, not silently change).
#define expf(x) emu::device_expf(x)
#define logf(x) emu::device_logf(x)

// IEEE reciprocal, round to nearest: what __frcp_rn computes (exact here and on the device).
inline float __frcp_rn(float x) { return 1.0f / x; }
// sin(pi x) and cos(pi x) together, each within 1 ulp (sincospif), for the arguments the kernels
// pass (0 <= x < 2).
inline void sincospif(float x, float* s, float* c) {
    const double r = static_cast<double>(x) - 2.0 * std::nearbyint(0.5 * static_cast<double>(x));
    const double ulps = emu::exact_models().sinpi ? 0.0 : 0.5;
    *s = (r == 0.0 || std::fabs(r) == 1.0) ? std::copysign(0.0f, x)
                                           : emu::moved_by_ulps(std::sin(M_PI * r), ulps, emu::error_sign(x, 0x51d1u));
    *c = std::fabs(r) == 0.5 ? 0.0f : emu::moved_by_ulps(std::cos(M_PI * r), ulps, emu::error_sign(x, 0xc05du));
}
// sin(pi x) within 1 ulp (sinpif): the sine of sincospif.
inline float sinpif(float x) {
    float s, c;
    sincospif(x, &s, &c);
    return s;
}
// The special-function unit's sine and cosine: within 2^-21.41 and 2^-21.19 absolute on
// [-pi, pi] (the bounds of __sinf and __cosf) and unbounded beyond, so an argument outside
// that range is an error of the caller.
inline void __sincosf(float x, float* s, float* c) {
    if (!(std::fabs(x) <= static_cast<float>(M_PI)))
        emu::fail("__sincosf(%.9g): outside [-pi, pi], where its error is unbounded", static_cast<double>(x));
    const double xd = static_cast<double>(x);
    if (x == 0.0f) {
        *s = x;
        *c = 1.0f;
        return;
    }
    const bool exact = emu::exact_models().sincos;
    *s = static_cast<float>(std::sin(xd) + (exact ? 0.0 : emu::error_sign(x, 0x5155u) * std::exp2(-21.41)));
    *c = static_cast<float>(std::cos(xd) + (exact ? 0.0 : emu::error_sign(x, 0xc0c0u) * std::exp2(-21.19)));
}

namespace emu {
[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
}

// Read-only cached loads: plain loads; 16-byte vectors must be 16-byte aligned.
inline uint4 __ldg(const uint4* p) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0)
        emu::fail("__ldg(uint4*) at %p: not 16-byte aligned (a misaligned address fault on a GPU)",
                  static_cast<const void*>(p));
    uint4 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

// Atomics (shared or global memory): real atomics, the threads of a block run concurrently.
inline unsigned atomicAdd(unsigned* address, unsigned val) {
    return std::atomic_ref<unsigned>(*address).fetch_add(val, std::memory_order_relaxed);
}
inline int atomicAdd(int* address, int val) {
    return std::atomic_ref<int>(*address).fetch_add(val, std::memory_order_relaxed);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
    return std::atomic_ref<unsigned long long>(*address).fetch_add(val, std::memory_order_relaxed);
}
inline float atomicAdd(float* address, float val) {
    return std::atomic_ref<float>(*address).fetch_add(val, std::memory_order_relaxed);
}

// ---- The emulated block ----------------------------------------------------------------------
namespace emu {

constexpr unsigned kFull = 0xffffffffu;

// What a thread is doing, for the collective checks and the watchdog's report.
enum Op : int {
    kRunning = 0,
    kSyncWarp,
    kShflIdx,
    kShflXor,
    kBallot,
    kShflUp,
    kShflDown,
    kVote,
    kSyncThreads,
    kSyncThreadsAnd,
    kMma,
    kExited,
};

inline const char* op_name(int op) {
    switch (op) {
        case kRunning: return "running";
        case kSyncWarp: return "__syncwarp";
        case kShflIdx: return "__shfl_sync";
        case kShflXor: return "__shfl_xor_sync";
        case kBallot: return "__ballot_sync";
        case kShflUp: return "__shfl_up_sync";
        case kShflDown: return "__shfl_down_sync";
        case kVote: return "__any_sync/__all_sync";
        case kSyncThreads: return "__syncthreads";
        case kSyncThreadsAnd: return "__syncthreads_and";
        case kMma: return "mma.sync";
        case kExited: return "exited";
        default: return "?";
    }
}

// A reusable barrier of `count` threads that also carries one 64-bit value per participant.
// Double-buffered by generation parity: a thread may write round g+1 while a slower one still
// reads round g, but not round g+2 before every thread has arrived at round g+1.
struct Exchange {
    int count = 0;
    std::atomic<int> arrived{0};
    std::atomic<int> exited{0};
    std::atomic<unsigned> generation{0};
    std::vector<std::uint64_t> slots[2];
    std::vector<int> ops[2];
    std::vector<unsigned> masks[2];
    std::vector<int> args[2];

    void init(int n) {
        count = n;
        for (int b = 0; b < 2; ++b) {
            slots[b].assign(n, 0);
            ops[b].assign(n, kRunning);
            masks[b].assign(n, 0);
            args[b].assign(n, 0);
        }
    }
};

struct BlockState;

// Per-thread context.
struct ThreadCtx {
    BlockState* block = nullptr;
    int tid = 0;       // linear thread index in the block
    int warp = 0;
    int lane = 0;
    unsigned warp_gen = 0;   // exchanges this thread completed in its warp
    unsigned block_gen = 0;  // __syncthreads this thread completed
    // cp.async copies issued and not yet waited for (see cp_async_issue).
    struct AsyncCopy {
        void* dst;
        const void* src;
        std::size_t bytes;
        bool valid;
    };
    std::vector<AsyncCopy> async_copies;
    int modelled = 0;  // ModelledScopes alive: the bank model has this thread's accesses already
};
inline thread_local ThreadCtx tctx;

struct SmemAccess;  // below, with the bank model

struct BlockState {
    const char* kernel = "";
    dim3 block_idx;
    int num_threads = 0;
    std::vector<std::unique_ptr<Exchange>> warps;
    Exchange block;
    std::unique_ptr<std::atomic<int>[]> where;  // per thread: an Op
    std::vector<std::vector<SmemAccess>> smem_log;  // per thread (EMU_BANKS)
};

// Progress of the whole emulation: the watchdog fires when it stops moving.
inline std::atomic<unsigned long long> g_progress{0};
inline std::atomic<BlockState*> g_current{nullptr};
inline std::mutex g_fail_mutex;

[[noreturn]] inline void vfail(const char* fmt, va_list ap) {
    std::lock_guard<std::mutex> lock(g_fail_mutex);
    std::fflush(stdout);
    std::fprintf(stderr, "EMULATION ERROR: ");
    std::vfprintf(stderr, fmt, ap);
    std::fprintf(stderr, "\n");
    BlockState* b = g_current.load();
    if (b != nullptr && tctx.block == b) {
        std::fprintf(stderr, "  in %s, block (%u, %u, %u), thread %d (warp %d, lane %d)\n",
                     b->kernel, b->block_idx.x, b->block_idx.y, b->block_idx.z, tctx.tid,
                     tctx.warp, tctx.lane);
    } else if (b != nullptr) {
        std::fprintf(stderr, "  in %s, block (%u, %u, %u)\n", b->kernel, b->block_idx.x,
                     b->block_idx.y, b->block_idx.z);
    }
    std::fflush(stderr);
    std::_Exit(3);
}

[[noreturn]] inline void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(fmt, ap);
    va_end(ap);
}

// Every thread of `ex` contributes `value` with operation `op`; returns after all have.
// Then slots[parity] holds everybody's values until the next-but-one round.
inline int exchange(Exchange& ex, unsigned& my_gen, int my_index, int op, unsigned mask,
                    int arg, std::uint64_t value, std::atomic<int>& where) {
    const int parity = static_cast<int>(my_gen & 1u);
    ex.slots[parity][my_index] = value;
    ex.ops[parity][my_index] = op;
    ex.masks[parity][my_index] = mask;
    ex.args[parity][my_index] = arg;
    where.store(op, std::memory_order_relaxed);
    // seq_cst, as the exiting thread's increment of `exited` and load of `arrived`: of an
    // arrival and an exit that race, at least one side sees the other.
    const int before = ex.arrived.fetch_add(1, std::memory_order_seq_cst);
    // An exit counts against this collective only while the collective is incomplete: once the
    // last thread arrived (perhaps while this one was descheduled right here), the others may
    // leave it, finish the kernel and exit before this thread looks. Their exit happens after
    // the generation moved on, so this load then sees it moved (seq_cst on `exited` orders it).
    if (ex.exited.load(std::memory_order_seq_cst) != 0 &&
        ex.generation.load(std::memory_order_acquire) == my_gen)
        fail("%s reached while %d of the %d threads it needs have exited (with a full mask every "
             "thread must take part)",
             op_name(op), ex.exited.load(), ex.count);
    if (before + 1 == ex.count) {
        // Last to arrive: check that everybody is in the same kind of collective.
        for (int i = 0; i < ex.count; ++i) {
            if (ex.ops[parity][i] != op || ex.masks[parity][i] != mask || ex.args[parity][i] != arg)
                fail("divergent collectives: thread %d of the group is in %s (mask %08x, width "
                     "%d), thread %d in %s (mask %08x, width %d)",
                     my_index, op_name(op), mask, arg, i, op_name(ex.ops[parity][i]),
                     ex.masks[parity][i], ex.args[parity][i]);
        }
        ex.arrived.store(0, std::memory_order_relaxed);
        ex.generation.store(my_gen + 1, std::memory_order_release);
        ex.generation.notify_all();
    } else {
        unsigned g = ex.generation.load(std::memory_order_acquire);
        while (g == my_gen) {
            ex.generation.wait(g, std::memory_order_acquire);
            g = ex.generation.load(std::memory_order_acquire);
        }
    }
    where.store(kRunning, std::memory_order_relaxed);
    g_progress.fetch_add(1, std::memory_order_relaxed);
    ++my_gen;
    return parity;
}

inline void check_mask(const char* what, unsigned mask) {
    if (mask != kFull)
        fail("%s with mask %08x: the emulation (and these kernels) use full-warp masks only", what,
             mask);
}

template <typename T>
inline std::uint64_t to_bits(T v) {
    static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                  "shuffles move 32- or 64-bit values");
    std::uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(std::uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

inline Exchange& my_warp() {
    if (tctx.block == nullptr) fail("warp collective outside a kernel launch");
    return *tctx.block->warps[tctx.warp];
}

inline std::atomic<int>& my_where() { return tctx.block->where[tctx.tid]; }

// ---- A model of shared-memory bank conflicts (EMU_BANKS=FILE) ---------------------------------
// Shared memory serves a warp's access in wavefronts: 32 banks of 4 bytes, one word per bank per
// wavefront, the same word to any number of lanes at once. The helpers that kernels use for
// their tiles (cp_async's stores, ldmatrix, load_pair, store_pair; kernels/common) report each
// lane's shared address with the caller's source location; after every block, the accesses of a
// warp are grouped into instructions (the k-th call of a site, in one template instantiation of
// its function, by each lane of the warp: a site that lanes skip unevenly is misgrouped) and each
// instruction's wavefronts are counted as the hardware splits it: 16-byte accesses (cp.async 16,
// ldmatrix rows) by quarter warps (8 lanes: one 8x8 matrix of ldmatrix), 8-byte ones by half
// warps, narrower ones whole. A phase takes as many wavefronts as the most distinct words that
// any bank holds; its ideal is its distinct words over 32. The sum over instructions, per kernel
// and call site, is written to FILE as the process exits.
//
// A model, not a measurement: plain `a[i] = x` accesses are seen only in a driver built with
// EMU_PLAIN_ACCESSES (below), and then with the host compile's widths; the order in which warps
// issue is not modelled; the GPU's own count is ncu's l1tex__data_pipe_lsu_wavefronts_mem_shared.
// What it answers without a GPU is whether a tile layout or a thread mapping conflicts, per site.
using Site = std::source_location;
enum SmemOp : unsigned char { kSmemLoad, kSmemStore };

struct SmemAccess {
    const char* file;
    const char* function;  // the caller's, template arguments and all: one site per instantiation
    unsigned line, column;
    unsigned offset;  // bytes from the start of the `__shared__` range (emu_shared.ld)
    unsigned char bytes;
    SmemOp op;
};

// The kernels' `__shared__` variables: emu_shared.ld defines both ends (weak: without the
// linker script they are null, and neither the poison nor this model sees shared memory).
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

inline std::size_t shared_range_bytes() {
    if (__start_emu_shared == nullptr || __stop_emu_shared == nullptr) return 0;
    return static_cast<std::size_t>(__stop_emu_shared - __start_emu_shared);
}

inline const char* banks_file() {
    static const char* f = [] {
        const char* e = std::getenv("EMU_BANKS");
        return e != nullptr && *e != '\0' ? e : nullptr;
    }();
    return f;
}

// Records one lane's access of `bytes` at `p` when it is in shared memory and EMU_BANKS is set.
inline void smem_access(const void* p, unsigned bytes, SmemOp op, const Site& site) {
    if (bytes != 4 && bytes != 8 && bytes != 16)
        fail("bank model: a %u-byte access at %s:%u (the model takes 4, 8 or 16)", bytes, site.file_name(),
             site.line());
    if (banks_file() == nullptr || tctx.block == nullptr || __start_emu_shared == nullptr) return;
    const char* at = static_cast<const char*>(p);
    if (at < __start_emu_shared || at >= __stop_emu_shared) return;
    tctx.block->smem_log[tctx.tid].push_back(
        SmemAccess{site.file_name(), site.function_name(), site.line(), site.column(),
                   static_cast<unsigned>(at - __start_emu_shared), static_cast<unsigned char>(bytes), op});
}

// Held by a helper that reported its access (smem_access) while it makes it: the plain-access
// model (below) then leaves the host code's own loads and stores out (ldmatrix's host form, for
// one, reads 2-byte elements of other lanes' rows).
struct ModelledScope {
    ModelledScope() { ++tctx.modelled; }
    ~ModelledScope() { --tctx.modelled; }
    ModelledScope(const ModelledScope&) = delete;
    ModelledScope& operator=(const ModelledScope&) = delete;
};

#ifdef EMU_PLAIN_ACCESSES
// Plain accesses (`a[i] = x`), which no helper reports: the driver is built with GCC's
// kernel-address instrumentation and a call for every load and store (-fsanitize=kernel-address
// --param=asan-instrumentation-with-call-threshold=0), whose hooks (below, after the namespace)
// come here. Those in shared memory are logged under the instruction's address (file ==
// nullptr, function == the address); the report names their source lines through addr2line.
// The widths are the host compile's: where it splits or merges what the device does in one
// access, the model sees the host's.
extern "C" char __executable_start[];
__attribute__((no_sanitize_address)) inline void plain_access(std::uintptr_t a, std::size_t bytes, SmemOp op,
                                                              const void* pc) {
    const char* at = reinterpret_cast<const char*>(a);
    if (__start_emu_shared == nullptr || at < __start_emu_shared || at >= __stop_emu_shared) return;
    if (banks_file() == nullptr || tctx.block == nullptr || tctx.modelled != 0) return;
    // Wider than one access (a block copy): as the 16-byte accesses it would take on a GPU.
    for (std::size_t done = 0; done < bytes; done += 16)
        tctx.block->smem_log[tctx.tid].push_back(
            SmemAccess{nullptr, static_cast<const char*>(pc), 0, 0,
                       static_cast<unsigned>(at + done - __start_emu_shared),
                       static_cast<unsigned char>(std::min<std::size_t>(16, bytes - done)), op});
}
#endif

struct BankSite {
    std::string kernel, file;
    unsigned line, column;
    int op, bytes;
    std::uintptr_t pc = 0;  // a plain access: its instruction, from the start of the executable
    auto operator<=>(const BankSite&) const = default;
};
struct BankCount {
    unsigned long long instructions = 0, wavefronts = 0, ideal = 0;
};

struct BankReport {
    std::mutex mutex;
    std::map<BankSite, BankCount> sites;
    ~BankReport() {
        // Written even with no site, so that a reader can tell "nothing conflicted" from "nothing
        // was recorded" (the second line says how many shared bytes the model could see).
        const char* path = banks_file();
        if (path == nullptr) return;
        std::FILE* f = std::fopen(path, "w");
        if (f == nullptr) {
            std::fprintf(stderr, "EMU_BANKS=%s: cannot write the report\n", path);
            return;
        }
        std::fprintf(f, "kernel\tsite\top\tbytes\tinstructions\twavefronts\tideal\n");
        std::fprintf(f, "# shared bytes %zu\n", shared_range_bytes());
        std::map<std::tuple<std::string, std::string, int, int>, BankCount> rows;
        const std::map<std::uintptr_t, std::string> lines = plain_sites();
        for (const auto& [k, c] : sites) {
            std::string site;
            if (k.pc == 0) {
                site = k.file + ":" + std::to_string(k.line) + ":" + std::to_string(k.column);
            } else {
                const auto it = lines.find(k.pc);
                if (it == lines.end() || it->second.empty()) continue;  // the emulation's own code
                site = it->second;
            }
            BankCount& r = rows[{k.kernel, site, k.op, k.bytes}];
            r.instructions += c.instructions;
            r.wavefronts += c.wavefronts;
            r.ideal += c.ideal;
        }
        for (const auto& [k, c] : rows)
            std::fprintf(f, "%s\t%s\t%s\t%d\t%llu\t%llu\t%llu\n", std::get<0>(k).c_str(), std::get<1>(k).c_str(),
                         std::get<2>(k) == kSmemLoad ? "load" : "store", std::get<3>(k), c.instructions,
                         c.wavefronts, c.ideal);
        std::fclose(f);
    }

    // The source lines of the plain accesses' instructions, by addr2line: "file:line (plain)" and
    // the lines it was inlined into, up to the kernel's own file; "" for the emulation's own code
    // (kernels/emu/), whose accesses stand for a kernel line's that is logged besides.
    std::map<std::uintptr_t, std::string> plain_sites() const {
        std::map<std::uintptr_t, std::string> out;
        for (const auto& [k, c] : sites)
            if (k.pc != 0) out[k.pc];
        if (out.empty()) return out;
        char exe[4096];
        const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (n <= 0) fail("bank model: cannot find the driver's own executable for addr2line");
        exe[n] = '\0';
        char list[] = "/tmp/emu-banks-XXXXXX";
        const int fd = mkstemp(list);
        if (fd < 0) fail("bank model: cannot write addr2line's input");
        std::string text;
        for (const auto& [pc, _] : out) text += "0x" + to_hex(pc) + "\n";
        const bool wrote = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
        close(fd);
        const std::string cmd = std::string("addr2line -i -a -e '") + exe + "' < " + list;
        std::FILE* p = wrote ? popen(cmd.c_str(), "r") : nullptr;
        if (p == nullptr) fail("bank model: cannot run %s", cmd.c_str());
        // addr2line -a -i: each address, then its innermost line and the lines it was inlined into.
        std::string* cur = nullptr;
        bool emulation = false;
        char line[8192];
        while (std::fgets(line, sizeof line, p) != nullptr) {
            std::string l(line);
            while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
            if (l.rfind("0x", 0) == 0) {
                const auto it = out.find(std::stoull(l, nullptr, 16));
                cur = it == out.end() ? nullptr : &it->second;
                emulation = false;
                continue;
            }
            if (cur == nullptr || emulation) continue;
            if (const auto d = l.find(" (discriminator"); d != std::string::npos) l.resize(d);
            if (const auto k = l.find("kernels/"); k != std::string::npos) l = l.substr(k);
            if (cur->empty()) {
                if (l.rfind("kernels/emu/", 0) == 0 || l.rfind("kernels/", 0) != 0) {
                    emulation = true;  // "" stays
                    continue;
                }
                *cur = l + " (plain)";
            } else if (cur->find(" from ") == std::string::npos) {
                *cur += " from " + l;
            } else {
                *cur += " < " + l;
            }
        }
        pclose(p);
        unlink(list);
        return out;
    }

    static std::string to_hex(std::uintptr_t v) {
        char b[32];
        std::snprintf(b, sizeof b, "%lx", static_cast<unsigned long>(v));
        return b;
    }
};
inline BankReport g_banks;

// Wavefronts (and the ideal) of one warp instruction: lanes[l] = offset, or -1 where lane l took
// no part. A lane's access covers the 4-byte words from its first byte to its last (a 2-byte
// store touches one word, as a bank serves words).
inline void count_wavefronts(const std::array<long long, 32>& lanes, unsigned bytes, BankCount& c) {
    const int per_phase = bytes >= 16 ? 8 : bytes >= 8 ? 16 : 32;
    ++c.instructions;
    for (int phase = 0; phase < 32 / per_phase; ++phase) {
        unsigned words[32 * 5];
        int n = 0;
        for (int l = phase * per_phase; l < (phase + 1) * per_phase; ++l) {
            if (lanes[l] < 0) continue;
            const auto first = static_cast<unsigned>(lanes[l]);
            for (unsigned w = first / 4; w <= (first + bytes - 1) / 4; ++w) words[n++] = w;
        }
        if (n == 0) continue;
        std::sort(words, words + n);
        n = static_cast<int>(std::unique(words, words + n) - words);
        int per_bank[32] = {};
        int most = 0;
        for (int i = 0; i < n; ++i) most = std::max(most, ++per_bank[words[i] % 32]);
        c.wavefronts += static_cast<unsigned long long>(most);
        c.ideal += static_cast<unsigned long long>((n + 31) / 32);
    }
}

// Runs between blocks (no CUDA thread runs): counts the finished block's accesses and clears them.
inline void tally_block(BlockState& b) {
    if (banks_file() == nullptr) return;
    // Sites by the addresses of their names (as integers: the order of unrelated pointers is
    // unspecified); one name per site in this one translation unit.
    struct Key {
        std::uintptr_t file, function;
        unsigned line, column;
        SmemOp op;
        unsigned char bytes;
        unsigned seq;
        auto operator<=>(const Key&) const = default;
    };
    std::map<BankSite, BankCount> local;
    const int warps = static_cast<int>(b.warps.size());
    for (int w = 0; w < warps; ++w) {
        std::map<Key, std::array<long long, 32>> instructions;
        for (int lane = 0; lane < 32; ++lane) {
            std::vector<SmemAccess>& log = b.smem_log[w * 32 + lane];
            std::map<std::tuple<std::uintptr_t, std::uintptr_t, unsigned, unsigned>, unsigned> seq;
            for (const SmemAccess& a : log) {
                const auto file = reinterpret_cast<std::uintptr_t>(a.file);
                const auto function = reinterpret_cast<std::uintptr_t>(a.function);
                const unsigned k = seq[{file, function, a.line, a.column}]++;
                auto [it, fresh] = instructions.try_emplace(Key{file, function, a.line, a.column, a.op, a.bytes, k});
                if (fresh) it->second.fill(-1);
                it->second[lane] = a.offset;
            }
            log.clear();
        }
        for (const auto& [k, lanes] : instructions) {
            BankSite site{b.kernel, "", k.line, k.column, k.op, k.bytes};
            if (k.file != 0) site.file = reinterpret_cast<const char*>(k.file);
#ifdef EMU_PLAIN_ACCESSES
            else site.pc = k.function - reinterpret_cast<std::uintptr_t>(__executable_start);
#endif
            count_wavefronts(lanes, k.bytes, local[site]);
        }
    }
    std::lock_guard<std::mutex> lock(g_banks.mutex);
    for (const auto& [k, c] : local) {
        BankCount& t = g_banks.sites[k];
        t.instructions += c.instructions;
        t.wavefronts += c.wavefronts;
        t.ideal += c.ideal;
    }
}

// cp.async: on a GPU the bytes land in shared memory at some moment before the issuing
// thread's wait, so until then the destination holds neither its old contents nor the new. The
// emulation writes a poison at issue (all ones: NaN in bf16, f16 and f32, -1 as an int) and
// copies at the wait (16 bytes, or 4 or 8 as `.ca` copies allow). A read before the wait then
// sees NaN instead of a copy that happened to be done; a read by another thread with no barrier
// after the wait, or an issue over data other threads still read, is a race for
// -fsanitize=thread.
inline void cp_async_issue(void* dst, const void* src, bool valid, std::size_t bytes) {
    if (tctx.block == nullptr) fail("cp.async outside a kernel launch");
    if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async of %zu bytes: PTX allows 4, 8 or 16", bytes);
    if (reinterpret_cast<unsigned long long>(dst) % bytes != 0 ||
        reinterpret_cast<unsigned long long>(src) % bytes != 0)
        fail("cp.async of %zu bytes from %p to %p: not %zu-byte aligned", bytes, src, dst, bytes);
    std::memset(dst, 0xff, bytes);
    tctx.async_copies.push_back(ThreadCtx::AsyncCopy{dst, src, bytes, valid});
}

inline void cp_async_wait() {
    for (const ThreadCtx::AsyncCopy& c : tctx.async_copies) {
        if (c.valid) {
            std::memcpy(c.dst, c.src, c.bytes);
        } else {
            std::memset(c.dst, 0, c.bytes);
        }
    }
    tctx.async_copies.clear();
}

}  // namespace emu

#ifdef EMU_PLAIN_ACCESSES
// The instrumentation's entry points (GCC's kernel-address ABI, recovering variants): every load
// and store of `n` bytes calls one with its address; the shared ones go to the bank model.
extern "C" {
#define EMU_HOOK(kind, n, op)                                                                       \
    __attribute__((no_sanitize_address)) void __asan_##kind##n##_noabort(std::uintptr_t a) {       \
        emu::plain_access(a, n, op, __builtin_return_address(0));                                  \
    }
EMU_HOOK(load, 1, emu::kSmemLoad) EMU_HOOK(load, 2, emu::kSmemLoad) EMU_HOOK(load, 4, emu::kSmemLoad)
EMU_HOOK(load, 8, emu::kSmemLoad) EMU_HOOK(load, 16, emu::kSmemLoad)
EMU_HOOK(store, 1, emu::kSmemStore) EMU_HOOK(store, 2, emu::kSmemStore) EMU_HOOK(store, 4, emu::kSmemStore)
EMU_HOOK(store, 8, emu::kSmemStore) EMU_HOOK(store, 16, emu::kSmemStore)
#undef EMU_HOOK
__attribute__((no_sanitize_address)) void __asan_loadN_noabort(std::uintptr_t a, std::size_t n) {
    emu::plain_access(a, n, emu::kSmemLoad, __builtin_return_address(0));
}
__attribute__((no_sanitize_address)) void __asan_storeN_noabort(std::uintptr_t a, std::size_t n) {
    emu::plain_access(a, n, emu::kSmemStore, __builtin_return_address(0));
}
// The rest of the instrumentation's interface, which has nothing to do here.
void __asan_handle_no_return() {}
void __asan_before_dynamic_init(const char*) {}
void __asan_after_dynamic_init() {}
}
#endif

inline void __syncwarp(unsigned mask = emu::kFull) {
    emu::check_mask("__syncwarp", mask);
    emu::exchange(emu::my_warp(), emu::tctx.warp_gen, emu::tctx.lane, emu::kSyncWarp, mask, 0, 0,
                  emu::my_where());
}

inline void __syncthreads() {
    emu::ThreadCtx& t = emu::tctx;
    if (t.block == nullptr) emu::fail("__syncthreads outside a kernel launch");
    emu::exchange(t.block->block, t.block_gen, t.tid, emu::kSyncThreads, emu::kFull, 0, 0,
                  emu::my_where());
}

// A barrier (a kind of its own: the hardware's bar.red may not meet a bar.sync) that also returns
// whether every thread's predicate was non-zero.
inline int __syncthreads_and(int predicate) {
    emu::ThreadCtx& t = emu::tctx;
    if (t.block == nullptr) emu::fail("__syncthreads_and outside a kernel launch");
    emu::Exchange& b = t.block->block;
    const int parity = emu::exchange(b, t.block_gen, t.tid, emu::kSyncThreadsAnd, emu::kFull, 0,
                                     predicate != 0 ? 1u : 0u, emu::my_where());
    for (int i = 0; i < b.count; ++i)
        if (b.slots[parity][i] == 0) return 0;
    return 1;
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    emu::check_mask("__shfl_sync", mask);
    emu::Exchange& w = emu::my_warp();
    const int lane = emu::tctx.lane;
    const int parity = emu::exchange(w, emu::tctx.warp_gen, lane, emu::kShflIdx, mask, width,
                                     emu::to_bits(var), emu::my_where());
    const int base = (lane / width) * width;
    const int src = base + (src_lane % width + width) % width;
    return emu::from_bits<T>(w.slots[parity][src]);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    emu::check_mask("__shfl_xor_sync", mask);
    emu::Exchange& w = emu::my_warp();
    const int lane = emu::tctx.lane;
    const int parity = emu::exchange(w, emu::tctx.warp_gen, lane, emu::kShflXor, mask, width,
                                     emu::to_bits(var), emu::my_where());
    const int src = lane ^ lane_mask;
    // A lane of a later group of `width` lanes gives back the caller's own value.
    if (src >= (lane / width + 1) * width || src >= warpSize) return var;
    return emu::from_bits<T>(w.slots[parity][src]);
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    emu::check_mask("__shfl_up_sync", mask);
    emu::Exchange& w = emu::my_warp();
    const int lane = emu::tctx.lane;
    const int parity = emu::exchange(w, emu::tctx.warp_gen, lane, emu::kShflUp, mask, width,
                                     emu::to_bits(var), emu::my_where());
    const int src = lane - static_cast<int>(delta);
    if (src < (lane / width) * width) return var;  // below the group: unchanged
    return emu::from_bits<T>(w.slots[parity][src]);
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    emu::check_mask("__shfl_down_sync", mask);
    emu::Exchange& w = emu::my_warp();
    const int lane = emu::tctx.lane;
    const int parity = emu::exchange(w, emu::tctx.warp_gen, lane, emu::kShflDown, mask, width,
                                     emu::to_bits(var), emu::my_where());
    const int src = lane + static_cast<int>(delta);
    if (src >= (lane / width + 1) * width) return var;  // past the group: unchanged
    return emu::from_bits<T>(w.slots[parity][src]);
}

inline int __any_sync(unsigned mask, int predicate) {
    emu::check_mask("__any_sync", mask);
    emu::Exchange& w = emu::my_warp();
    const int parity = emu::exchange(w, emu::tctx.warp_gen, emu::tctx.lane, emu::kVote, mask, 0,
                                     predicate != 0 ? 1u : 0u, emu::my_where());
    for (int i = 0; i < warpSize; ++i)
        if (w.slots[parity][i] != 0) return 1;
    return 0;
}

inline int __all_sync(unsigned mask, int predicate) {
    emu::check_mask("__all_sync", mask);
    emu::Exchange& w = emu::my_warp();
    const int parity = emu::exchange(w, emu::tctx.warp_gen, emu::tctx.lane, emu::kVote, mask, 1,
                                     predicate != 0 ? 1u : 0u, emu::my_where());
    for (int i = 0; i < warpSize; ++i)
        if (w.slots[parity][i] == 0) return 0;
    return 1;
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
    emu::check_mask("__ballot_sync", mask);
    emu::Exchange& w = emu::my_warp();
    const int parity = emu::exchange(w, emu::tctx.warp_gen, emu::tctx.lane, emu::kBallot, mask, 0,
                                     predicate != 0 ? 1u : 0u, emu::my_where());
    unsigned ballot = 0;
    for (int i = 0; i < warpSize; ++i)
        if (w.slots[parity][i] != 0) ballot |= 1u << i;
    return ballot;
}

// ---- Tensor-core MMA (kernels/common/mma.cuh) ---------------------------------------------------
namespace emu {

// One lane's operands of mma.sync.m16n8k16, widened to f32 (exact for f16 and bf16).
struct MmaOperands {
    float a[8];  // A[g + 8 (i & 1)][2t + 8 (i >> 1) + e] at [2i + e]
    float b[4];  // B[2t + 8j + e][g] at [2j + e]
};
inline thread_local MmaOperands t_mma;

// D = A B + C for the warp, as `mma.sync.aligned.m16n8k16.row.col.f32` with 16-bit inputs: every
// lane publishes its fragments, then computes its four accumulators from everybody's. Products of
// 16-bit values are exact in f32; the sum runs in k order. A second rendezvous keeps each lane's
// operands alive until the whole warp has read them.
inline void mma_m16n8k16(const float (&a)[8], const float (&b)[4], float (&c)[4]) {
    std::memcpy(t_mma.a, a, sizeof a);
    std::memcpy(t_mma.b, b, sizeof b);
    Exchange& w = my_warp();
    const int lane = tctx.lane;
    const int parity = exchange(w, tctx.warp_gen, lane, kMma, kFull, 0,
                                to_bits(static_cast<const MmaOperands*>(&t_mma)), my_where());
    const MmaOperands* ops[32];
    for (int i = 0; i < 32; ++i) ops[i] = from_bits<const MmaOperands*>(w.slots[parity][i]);
    const int g = lane >> 2, t = lane & 3;
    auto A = [&](int row, int k) {
        const int holder = ((row & 7) << 2) | ((k & 7) >> 1);
        const int reg = (row >> 3) + 2 * (k >> 3);
        return ops[holder]->a[2 * reg + (k & 1)];
    };
    auto B = [&](int k, int n) {
        const int holder = (n << 2) | ((k & 7) >> 1);
        return ops[holder]->b[2 * (k >> 3) + (k & 1)];
    };
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float acc = 0.f;
        for (int k = 0; k < 16; ++k) acc = std::fma(A(row, k), B(k, col), acc);
        out[i] = acc + c[i];
    }
    exchange(w, tctx.warp_gen, lane, kMma, kFull, 1, 0, my_where());
    for (int i = 0; i < 4; ++i) c[i] = out[i];
}

}  // namespace emu

// ---- Launch -----------------------------------------------------------------------------------
namespace emu {

// Seconds without progress before the watchdog reports a hang (env EMU_WATCHDOG_SECONDS).
inline double watchdog_seconds() {
    const char* s = std::getenv("EMU_WATCHDOG_SECONDS");
    double v = s != nullptr ? std::atof(s) : 0.0;
    return v > 0.0 ? v : 20.0;
}

inline void report_hang(BlockState* b, double seconds) {
    std::lock_guard<std::mutex> lock(g_fail_mutex);
    std::fflush(stdout);
    std::fprintf(stderr,
                 "EMULATION ERROR: no progress for %.0f s in %s, block (%u, %u, %u): a deadlock "
                 "(threads waiting in collectives that cannot complete) or a thread that never "
                 "reaches its next collective\n",
                 seconds, b->kernel, b->block_idx.x, b->block_idx.y, b->block_idx.z);
    const int warps = static_cast<int>(b->warps.size());
    for (int w = 0; w < warps; ++w) {
        std::fprintf(stderr, "  warp %d:", w);
        int last = -1, run = 0;
        auto flush = [&](int lane_end) {
            if (last < 0) return;
            if (run == 1) std::fprintf(stderr, " lane %d %s;", lane_end - 1, op_name(last));
            else std::fprintf(stderr, " lanes %d-%d %s;", lane_end - run, lane_end - 1, op_name(last));
        };
        for (int l = 0; l < warpSize; ++l) {
            const int op = b->where[w * warpSize + l].load();
            if (op != last) {
                flush(l);
                last = op;
                run = 0;
            }
            ++run;
        }
        flush(warpSize);
        std::fprintf(stderr, "\n");
    }
    std::fflush(stderr);
    std::_Exit(4);
}

// One watchdog for the process, started by the first launch.
inline void start_watchdog() {
    static std::once_flag once;
    std::call_once(once, [] {
        std::thread([] {
            const double limit = watchdog_seconds();
            unsigned long long last = g_progress.load();
            auto since = std::chrono::steady_clock::now();
            for (;;) {
                std::this_thread::sleep_for(std::chrono::milliseconds(200));
                const unsigned long long now = g_progress.load();
                BlockState* b = g_current.load();
                if (now != last || b == nullptr) {
                    last = now;
                    since = std::chrono::steady_clock::now();
                    continue;
                }
                const double idle =
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
                if (idle > limit) report_hang(b, idle);
            }
        }).detach();
    });
}

// Kernel argument checking: a pointer argument must point to the parameter's pointee type (const
// may be added); `const void*` takes any pointer; scalars and structs must match exactly.
template <typename P, typename A>
constexpr bool arg_matches() {
    using PD = std::decay_t<P>;
    using AD = std::decay_t<A>;
    if constexpr (std::is_pointer_v<PD>) {
        using PT = std::remove_pointer_t<PD>;
        if constexpr (std::is_same_v<AD, std::nullptr_t>) return true;
        else if constexpr (!std::is_pointer_v<AD>) return false;
        else if constexpr (std::is_void_v<PT>) return std::is_const_v<PT> || !std::is_const_v<std::remove_pointer_t<AD>>;
        else return std::is_same_v<std::remove_cv_t<PT>, std::remove_cv_t<std::remove_pointer_t<AD>>> &&
                    (std::is_const_v<PT> || !std::is_const_v<std::remove_pointer_t<AD>>);
    } else {
        return std::is_same_v<PD, AD>;
    }
}

// Bytes of `__shared__` variables that poison_shared covers (0: the driver was linked without
// emu_shared.ld, or EMU_SHARED_POISON=0).
// Whether blocks run last to first (EMU_BLOCK_ORDER=reverse; anything but "reverse" or
// "forward" stops the run, so that a misspelling does not quietly test one order twice).
inline bool blocks_reversed() {
    static const bool reversed = [] {
        const char* s = std::getenv("EMU_BLOCK_ORDER");
        if (s == nullptr || *s == '\0' || std::strcmp(s, "forward") == 0) return false;
        if (std::strcmp(s, "reverse") == 0) return true;
        fail("EMU_BLOCK_ORDER=%s: expected forward or reverse", s);
    }();
    return reversed;
}

inline std::size_t shared_poison_range() {
    static const bool off = [] {
        const char* s = std::getenv("EMU_SHARED_POISON");
        return s != nullptr && std::strcmp(s, "0") == 0;
    }();
    return off ? 0 : shared_range_bytes();
}

// Fills every `__shared__` variable with the poison of block number `block` (see the top of this
// file). The launcher calls it before each block, while no thread of the launch runs. Word stores
// through a volatile pointer, outside the sanitizers: ASan's redzones between the variables are in
// the range, and to TSan the poison is not an access of any CUDA thread.
__attribute__((no_sanitize("address", "thread"))) inline void poison_shared(unsigned long long block) {
    const std::size_t bytes = shared_poison_range();
    const std::uint64_t word = block % 2 == 0 ? ~std::uint64_t{0} : 0x7f7f7f7f7f7f7f7full;
    volatile std::uint64_t* p = reinterpret_cast<volatile std::uint64_t*>(__start_emu_shared);
    for (std::size_t i = 0; i < bytes / sizeof(word); ++i) p[i] = word;
}

// Counts launches and threads, for the summary line.
struct LaunchStats {
    std::atomic<unsigned long long> launches{0}, blocks{0}, threads{0};
};
inline LaunchStats g_stats;

template <typename... P, typename... A>
void launch_named(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
    static_assert((arg_matches<P, A>() && ...),
                  "kernel argument types do not match the kernel's parameters");
    start_watchdog();
    const int threads = static_cast<int>(block.x * block.y * block.z);
    if (threads <= 0 || threads > 1024) fail("%s: %d threads per block", name, threads);
    if (threads % warpSize != 0)
        fail("%s: %d threads per block: the emulation runs whole warps only", name, threads);
    if (grid.x == 0 || grid.y == 0 || grid.z == 0)
        fail("%s: empty grid (%u, %u, %u): cuLaunchKernel rejects it", name, grid.x, grid.y, grid.z);
    if (grid.y > 65535 || grid.z > 65535)
        fail("%s: grid (%u, %u, %u) too large", name, grid.x, grid.y, grid.z);
    // Parameters are copies, as on a GPU.
    const std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(args)...);
    g_stats.launches.fetch_add(1);

    // One OS thread per CUDA thread of a block, for the whole launch: thread `tid` runs thread
    // `tid` of every block, blocks in order; no thread starts block b + 1 before every thread has
    // finished block b.
    const unsigned long long num_blocks =
        static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
    BlockState st;
    st.kernel = name;
    st.num_threads = threads;
    const int warps = threads / warpSize;
    for (int w = 0; w < warps; ++w) {
        st.warps.push_back(std::make_unique<Exchange>());
        st.warps.back()->init(warpSize);
    }
    st.block.init(threads);
    st.where = std::make_unique<std::atomic<int>[]>(threads);
    st.smem_log.resize(static_cast<std::size_t>(threads));
    for (int i = 0; i < threads; ++i) st.where[i].store(kRunning);
    unsigned long long current = 0;
    // The b-th block to run (the poison alternates by this count, not by the block's index).
    const bool reversed = blocks_reversed();
    auto block_of = [grid, reversed, num_blocks](unsigned long long b) {
        if (reversed) b = num_blocks - 1 - b;
        return dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (static_cast<unsigned long long>(grid.x) * grid.y)));
    };
    st.block_idx = block_of(0);
    // Runs once per block, after its last thread exited and before any thread goes on.
    auto next_block = [&]() noexcept {
        tally_block(st);
        for (auto& w : st.warps) w->exited.store(0);
        st.block.exited.store(0);
        for (int i = 0; i < threads; ++i) st.where[i].store(kRunning);
        ++current;
        st.block_idx = block_of(current < num_blocks ? current : 0);
        if (current < num_blocks) poison_shared(current);
        g_stats.blocks.fetch_add(1);
        g_progress.fetch_add(1, std::memory_order_relaxed);
    };
    std::barrier between_blocks(threads, next_block);
    poison_shared(0);
    g_current.store(&st);
    {
        std::vector<std::jthread> pool;
        pool.reserve(threads);
        for (int tid = 0; tid < threads; ++tid) {
            pool.emplace_back([&, tid] {
                tctx = ThreadCtx{};
                tctx.block = &st;
                tctx.tid = tid;
                tctx.warp = tid / warpSize;
                tctx.lane = tid % warpSize;
                threadIdx = uint3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
                blockDim = block;
                gridDim = grid;
                Exchange& w = *st.warps[tctx.warp];
                for (unsigned long long b = 0; b < num_blocks; ++b) {
                    const dim3 bi = block_of(b);
                    blockIdx = uint3{bi.x, bi.y, bi.z};
                    std::apply(kernel, params);
                    // On a GPU the copies would land at some point; a kernel that never waits
                    // for them read nothing it copied, or read it too early.
                    if (!tctx.async_copies.empty())
                        fail("thread exited with %zu cp.async copies it never waited for",
                             tctx.async_copies.size());
                    // Exited: a collective that still counts on this thread is a bug.
                    st.where[tid].store(kExited);
                    w.exited.fetch_add(1, std::memory_order_seq_cst);
                    st.block.exited.fetch_add(1, std::memory_order_seq_cst);
                    if (w.arrived.load(std::memory_order_seq_cst) != 0)
                        fail("thread exited while %d lanes of its warp wait in a warp collective "
                             "for it",
                             w.arrived.load());
                    if (st.block.arrived.load(std::memory_order_seq_cst) != 0)
                        fail("thread exited while %d threads of its block wait in "
                             "__syncthreads(_and) for it",
                             st.block.arrived.load());
                    g_progress.fetch_add(1, std::memory_order_relaxed);
                    between_blocks.arrive_and_wait();
                }
                tctx = ThreadCtx{};
            });
        }
    }  // jthreads join here
    g_current.store(nullptr);
    g_stats.threads.fetch_add(static_cast<unsigned long long>(threads) * num_blocks);
}

// The same without a name for messages.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
    launch_named("kernel", kernel, grid, block, std::forward<A>(args)...);
}

}  // namespace emu

// Launches with the kernel's name (as written) in messages.
#define EMU_LAUNCH(kernel, grid, block, ...) \
    ::emu::launch_named(#kernel, kernel, grid, block, __VA_ARGS__)
