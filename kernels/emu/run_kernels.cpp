// Runs this crate's CUDA kernels on the CPU (through cuda_host.h) on a folder written by
// `examples/export_batch.rs` (or tests/kernel_emulation.rs), and compares every result with the
// folder's f64 reference: GPU chunking (cut sets exactly), pooling, forward (O, LSE) and, when the
// folder has gradients, the backward kernels (dQ, dK, dV, dgates, dcoeffs), within SPEC section 8
// (relative L2: f32 1e-5, f16 3e-3, bf16 1e-2; NaN never passes; a zero reference needs an exact
// zero). Every output and every scratch buffer a kernel claims to fill is poisoned with NaN first.
//
// The kernels are the sources build.rs generates (kernels/*.cu with their headers inlined and the
// `// @instantiate` lines expanded), i.e. the code NVRTC compiles (there one instantiation at a
// time); each goes in a namespace of its own so that one translation unit holds them all and
// every launch is type-checked:
//
//   cd kernels/emu && OUT=$(ls -td ../../target/release/build/sparsectr-attn-*/out | head -1)
//   g++ -O2 -std=c++20 -pthread -fno-strict-aliasing -fdata-sections -Wl,-T,emu_shared.ld \
//       -iquote "$OUT" -o /tmp/run_kernels run_kernels.cpp
//   /tmp/run_kernels DIR [--chunks gpu|host] [--repeat-backward] [--chunking-only]
//   /tmp/run_kernels --self-test   (the emulated collectives and cp.async against their definitions)
//   /tmp/run_kernels --self-test-early-exit   (must stop with exit code 3: a lane exits too soon)
//
// `cargo test --release --test kernel_emulation` does all of this (tests/kernel_emulation.rs).
//
// Inputs are prepared the way src/cuda/{batch,forward,backward}.rs prepare them: u32 times relative
// to a local midnight per sequence with its weekday0, SeqInfo per sequence, chunk ends with a stride
// of max_chunks, the clamped m and w, the same grids, blocks and argument order. `--chunks gpu`
// (the default for personalized chunks) uses the chunking kernel's output (stride min(P, max n),
// as `GpuDevice::chunk`); `--chunks host` uploads the folder's chunks (stride: the most chunks of
// any sequence, as `GpuDevice::upload_chunks`); supplied (non-personalized) chunks always go the
// host way. `--repeat-backward` runs the backward twice and requires the same bits (the kernels
// promise run-to-run determinism; the emulation's thread interleavings differ between runs).
// `--chunking-only` stops after the chunking kernel (for long sequences, cheap to chunk).
//
// Exit status: 0 all good, 1 a mismatch (each printed), 2 bad usage or folder, 3/4 an emulation
// error (divergent collectives, a deadlock: printed by cuda_host.h).

#include "cuda_host.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cinttypes>
#include <fstream>
#include <map>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#if !__has_include("forward.cu")
#error "pass -iquote <OUT_DIR of the sparsectr-attn build script> (it holds the generated kernels)"
#endif

namespace k_chunking {
#include "chunking.cu"
}
namespace k_pooling {
#include "pooling.cu"
}
namespace k_forward {
#include "forward.cu"
}
namespace k_forward_tc {
#include "forward_tc.cu"
}
namespace k_bwd_query_tc {
#include "backward_query_tc.cu"
}
namespace k_bwd_query {
#include "backward_query.cu"
}
namespace k_bwd_summary {
#include "backward_summary.cu"
}
namespace k_bwd_summary_tc {
#include "backward_summary_tc.cu"
}
namespace k_bwd_key {
#include "backward_key.cu"
}
namespace k_bwd_tails_tc {
#include "backward_tails_tc.cu"
}
namespace k_bwd_key_tc {
#include "backward_key_tc.cu"
}
namespace k_bwd_user_reduce {
#include "backward_user_reduce.cu"
}
namespace k_coeffs {
#include "coeffs_reduce.cu"
}
namespace k_dense_fwd {
#include "dense_forward.cu"
}
namespace k_dense_bq {
#include "dense_backward_query.cu"
}
namespace k_dense_bk {
#include "dense_backward_key.cu"
}

// ---- A self-test of the emulated collectives (`--self-test`) ----------------------------------
// `k_` like the kernels' namespaces, so that its `__shared__` variables are poisoned too
// (emu_shared.ld).
namespace k_selftest {

constexpr int kThreads = 64, kBlocks = 2, kOutputs = 13;

__global__ void collectives(int* out) {
    const unsigned full = 0xffffffffu;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int x = 100 * static_cast<int>(blockIdx.x) + 10 * warp + lane;
    int* o = out + (static_cast<size_t>(blockIdx.x) * kThreads + tid) * kOutputs;
    o[0] = __shfl_sync(full, x, (lane + 3) % 32);
    o[1] = __shfl_xor_sync(full, x, 5);
    o[2] = __shfl_up_sync(full, x, 2);
    o[3] = __shfl_down_sync(full, x, 2);
    o[4] = static_cast<int>(__ballot_sync(full, lane % 3 == 0));
    o[5] = __any_sync(full, lane == 7) + 2 * __all_sync(full, lane < 32) + 4 * __all_sync(full, lane != 4);
    o[6] = __shfl_sync(full, x, 3, 8);
    o[7] = __shfl_xor_sync(full, x, 8, 8);
    o[8] = __shfl_down_sync(full, x, 1, 16);
    __shared__ int s[kThreads];
    __shared__ unsigned count;
    s[tid] = x;
    if (tid == 0) count = 0;
    __syncthreads();
    o[9] = s[kThreads - 1 - tid];
    atomicAdd(&count, 1u);
    __syncwarp();
    __syncthreads();
    o[10] = static_cast<int>(count);
    o[11] = static_cast<int>(blockDim.x * gridDim.x);
    o[12] = __clz(1) + 100 * __ffs(0x50) + 10000 * __popc(0xf0f0u);
}

// time_bucket (attn/temporal.cuh) reads the bucket off a truncating u32-to-f32 conversion; SPEC
// section 4 defines it by the top set bit of x = dt + 1 and the bit below. Every dt below 2^16,
// and around each power of two and each half-octave up to dt = i32::MAX (x = 2^31).
int run_time_buckets() {
    auto spec = [](unsigned dt) {
        const unsigned x = dt + 1u;
        int e = 0;
        while ((x >> e) > 1u) ++e;
        const int r = e >= 1 ? static_cast<int>((x >> (e - 1)) & 1u) : 0;
        return 2 * e + r;
    };
    std::vector<unsigned> dts;
    for (unsigned dt = 0; dt < (1u << 16); ++dt) dts.push_back(dt);
    for (int e = 1; e <= 31; ++e) {
        const long long top = 1ll << e, half = top >> 1;
        for (long long base : {top, top + half}) {
            for (long long d = -3; d <= 3; ++d) {
                const long long x = base + d;
                if (x >= 1 && x <= (1ll << 31)) dts.push_back(static_cast<unsigned>(x - 1));
            }
        }
    }
    int bad = 0;
    for (unsigned dt : dts) {
        const int got = k_forward::time_bucket(dt), want = spec(dt);
        if (got != want && bad++ < 10) std::printf("self-test: time_bucket(%u) = %d, want %d\n", dt, got, want);
        // Past 63 nothing clamps; up to 2^24, the host's bound.
        for (int nb : {1, 2, 7, 63, 64, 65, 1000, 1 << 24}) {
            const float clamped = k_forward::clamped_bucket(dt, nb);
            if (clamped != static_cast<float>(std::min(want, nb)) && bad++ < 10)
                std::printf("self-test: clamped_bucket(%u, %d) = %g, want %d\n", dt, nb, clamped, std::min(want, nb));
        }
    }
    return bad;
}

// cp.async as the emulation defers it (cuda_host.h): all ones until the issuing thread's wait,
// then the copy (or zeros where the copy is not valid), visible to others after a barrier; the
// same for a 4-byte copy.
__global__ void async_copies(const unsigned* src, unsigned* out) {
    alignas(16) __shared__ unsigned s[kThreads * 4];
    __shared__ unsigned s4[kThreads];
    const int tid = threadIdx.x;
    k_forward_tc::cp_async<16>(s + 4 * tid, src + 4 * tid, tid % 2 == 0);
    k_forward_tc::cp_async<4>(s4 + tid, src + 3 * tid, tid % 3 != 0);
    out[5 * tid] = s[4 * tid + 1];
    out[5 * tid + 3] = s4[tid];
    k_forward_tc::cp_async_wait_all();
    out[5 * tid + 1] = s[4 * tid + 1];
    out[5 * tid + 4] = s4[tid];
    __syncthreads();
    out[5 * tid + 2] = s[4 * ((tid + 1) % kThreads) + 2];
}

int run_async_copies() {
    alignas(16) static unsigned src[kThreads * 4];
    for (int i = 0; i < kThreads * 4; ++i) src[i] = 1000u + static_cast<unsigned>(i);
    std::vector<unsigned> out(kThreads * 5, 7u);
    EMU_LAUNCH(async_copies, dim3(1), dim3(kThreads), src, out.data());
    int bad = 0;
    for (int tid = 0; tid < kThreads; ++tid) {
        const int next = (tid + 1) % kThreads;
        const unsigned want[5] = {0xffffffffu, tid % 2 == 0 ? src[4 * tid + 1] : 0u,
                                  next % 2 == 0 ? src[4 * next + 2] : 0u, 0xffffffffu,
                                  tid % 3 != 0 ? src[3 * tid] : 0u};
        for (int i = 0; i < 5; ++i)
            if (out[5 * tid + i] != want[i] && bad++ < 10)
                std::printf("self-test: cp.async thread %d output %d: got %u, want %u\n", tid, i,
                            out[5 * tid + i], want[i]);
    }
    return bad;
}

// The bank model (cuda_host.h, EMU_BANKS) on patterns whose wavefronts are known.
int run_bank_model() {
    struct Case {
        const char* what;
        unsigned bytes;
        std::array<long long, 32> lanes;
        unsigned long long wavefronts, ideal;
    };
    auto each = [](auto offset) {
        std::array<long long, 32> a;
        for (int l = 0; l < 32; ++l) a[l] = offset(l);
        return a;
    };
    const Case cases[] = {
        // ldmatrix .x4 of rows 144 B apart (64 elements + 8 of padding): conflict-free.
        {"ldmatrix rows 144 B apart", 16, each([](int l) { return (l % 8) * 144LL + (l / 8) * 16; }), 4, 4},
        // ... and 128 B apart (no padding): the 8 rows of a matrix in one bank group, 8-way.
        {"ldmatrix rows 128 B apart", 16, each([](int l) { return (l % 8) * 128LL + (l / 8) * 16; }), 32, 4},
        // Two adjacent lanes per 144-byte row, adjacent 16-byte chunks: 2-way in each quarter.
        {"16-byte pairs of adjacent lanes", 16, each([](int l) { return (l / 2) * 144LL + (l % 2) * 16; }), 8, 4},
        // The same chunks with a row's two lanes 8 apart (gather_slot in tc_slots.cuh).
        {"16-byte pairs 8 lanes apart", 16,
         each([](int l) { return ((l / 16) * 8 + l % 8) * 144LL + (l / 8 % 2) * 16; }), 4, 4},
        {"4-byte words 8 B apart", 4, each([](int l) { return l * 8LL; }), 2, 1},
        {"one word to every lane", 4, each([](int) { return 64LL; }), 1, 1},
        {"8-byte words in a row", 8, each([](int l) { return l * 8LL; }), 2, 2},
        {"lanes 0-7 only, 16 B", 16, each([](int l) { return l < 8 ? l * 16LL : -1LL; }), 1, 1},
    };
    int bad = 0;
    for (const Case& c : cases) {
        emu::BankCount got;
        emu::count_wavefronts(c.lanes, c.bytes, got);
        if (got.instructions != 1 || got.wavefronts != c.wavefronts || got.ideal != c.ideal) {
            ++bad;
            std::printf("self-test: bank model, %s: %llu wavefronts (ideal %llu), want %llu (%llu)\n",
                        c.what, got.wavefronts, got.ideal, c.wavefronts, c.ideal);
        }
    }
    return bad;
}

// Shared memory as a GPU leaves it to the next block, poisoned (cuda_host.h): every byte of a
// `__shared__` array is 0xff when a block starts with an even index and 0x7f with an odd one,
// whatever the block before wrote. A template's arrays and a plain function's go to different
// sections before linking (emu_shared.ld gathers both), so there is one of each.
template <typename T, int kWords>
__global__ void shared_at_start(unsigned* out) {
    __shared__ T words[kWords];
    const int tid = threadIdx.x;
    out[blockIdx.x * kThreads + tid] = static_cast<unsigned>(words[tid % kWords]);
    __syncthreads();
    if (tid < kWords) words[tid] = T{0};  // what the next block must not see
}

__global__ void shared_at_start_plain(unsigned* out) {
    __shared__ unsigned word;
    const int tid = threadIdx.x;
    out[blockIdx.x * kThreads + tid] = word;
    __syncthreads();
    if (tid == 0) word = 0u;
}

// Each block's place in the launch's run order. Blocks run one after another, so the counter
// needs no atomic.
__global__ void record_block_order(unsigned* order, unsigned* count) {
    if (threadIdx.x == 0) order[blockIdx.x] = (*count)++;
}

// Blocks run in grid order, or last to first under EMU_BLOCK_ORDER=reverse.
int run_block_order() {
    constexpr unsigned kLaunchBlocks = 5;
    std::vector<unsigned> order(kLaunchBlocks, ~0u);
    unsigned count = 0;
    EMU_LAUNCH(record_block_order, dim3(kLaunchBlocks), dim3(kThreads), order.data(), &count);
    int bad = 0;
    for (unsigned b = 0; b < kLaunchBlocks; ++b) {
        const unsigned want = emu::blocks_reversed() ? kLaunchBlocks - 1 - b : b;
        if (order[b] != want && bad++ < 10)
            std::printf("self-test: block %u ran %u-th, want %u-th (EMU_BLOCK_ORDER %s)\n", b, order[b],
                        want, emu::blocks_reversed() ? "reverse" : "forward");
    }
    return bad;
}

int run_shared_poison() {
    const std::size_t range = emu::shared_poison_range();
    const char* off = std::getenv("EMU_SHARED_POISON");
    if (off != nullptr && std::strcmp(off, "0") == 0) return 0;
    if (range == 0) {
        std::printf("self-test: no __shared__ range to poison (link with -fdata-sections and emu_shared.ld)\n");
        return 1;
    }
    constexpr int kLaunchBlocks = 4;
    std::vector<unsigned> tmpl(kLaunchBlocks * kThreads, 1u), plain(kLaunchBlocks * kThreads, 1u);
    EMU_LAUNCH((shared_at_start<unsigned long long, 16>), dim3(kLaunchBlocks), dim3(kThreads), tmpl.data());
    EMU_LAUNCH(shared_at_start_plain, dim3(kLaunchBlocks), dim3(kThreads), plain.data());
    int bad = 0;
    for (int b = 0; b < kLaunchBlocks; ++b) {
        // The poison alternates with the order in which blocks run (EMU_BLOCK_ORDER).
        const int nth = emu::blocks_reversed() ? kLaunchBlocks - 1 - b : b;
        const unsigned want = nth % 2 == 0 ? 0xffffffffu : 0x7f7f7f7fu;
        for (int tid = 0; tid < kThreads; ++tid) {
            const int i = b * kThreads + tid;
            if (tmpl[i] != want && bad++ < 10)
                std::printf("self-test: a template kernel's shared word, block %d thread %d at start: "
                            "got %#x, want %#x\n", b, tid, tmpl[i], want);
            if (plain[i] != want && bad++ < 10)
                std::printf("self-test: a plain kernel's shared word, block %d thread %d at start: "
                            "got %#x, want %#x\n", b, tid, plain[i], want);
        }
    }
    return bad;
}

// Expected values from the CUDA programming guide's definitions.
// The device math models of cuda_host.h: each within its documented bound of the exact value
// over a sweep of arguments, and (unless EMU_EXACT_MATH turns it off) off by more than half of
// it somewhere, so that a model quietly made exact fails here; exact where the device is.
int run_math_models() {
    int bad = 0;
    auto ulps = [](float got, double exact) {
        int e;
        std::frexp(exact, &e);
        return std::fabs(static_cast<double>(got) - exact) / std::ldexp(1.0, e - 24);
    };
    struct Seen {
        const char* name;
        double bound, worst = 0;
    };
    auto check = [&](Seen& s, double err, double at) {
        if (!(err <= s.bound) && bad++ < 10)
            std::printf("self-test: %s(%.9g) off by %.3g, above its bound %.3g\n", s.name, at, err, s.bound);
        s.worst = std::max(s.worst, err);
    };
    Seen ex2{"ex2", 2}, rcp{"rcp", 1}, lg2_near{"lg2", 0x1p-22 + 0x1p-25}, lg2_far{"lg2", 2},
        ex{"expf", 2}, lg{"logf", 1}, sin_pi{"sinpi", 1}, cos_pi{"sinpi", 1},
        sin_sfu{"sincos", std::exp2(-21.41) + 0x1p-25}, cos_sfu{"sincos", std::exp2(-21.19) + 0x1p-24};
    for (int i = 0; i < 4000; ++i) {
        const float x = -20.f + 0.01013f * static_cast<float>(i);  // rarely an integer
        check(ex2, ulps(emu::sfu_ex2(x), std::exp2(static_cast<double>(x))), x);
        check(ex, ulps(expf(x), std::exp(static_cast<double>(x))), x);
        const float y = std::ldexp(1.f + 0.000977f * static_cast<float>(i % 1000), i / 1000 - 2);
        check(rcp, ulps(emu::sfu_rcp(y), 1.0 / y), y);
        const double l2 = std::log2(static_cast<double>(y));
        if (y >= 0.5f && y <= 2.f) check(lg2_near, std::fabs(emu::sfu_lg2(y) - l2), y);
        else check(lg2_far, ulps(emu::sfu_lg2(y), l2), y);
        if (y != 1.f) check(lg, ulps(logf(y), std::log(static_cast<double>(y))), y);
        const float a = -3.14159f + 0.0015707f * static_cast<float>(i);  // [-pi, pi)
        float s, c;
        __sincosf(a, &s, &c);
        check(sin_sfu, std::fabs(s - std::sin(static_cast<double>(a))), a);
        check(cos_sfu, std::fabs(c - std::cos(static_cast<double>(a))), a);
        const float u = 0.0004999f * static_cast<float>(i);  // [0, 2)
        sincospif(u, &s, &c);
        if (s != 0.f) check(sin_pi, ulps(s, std::sin(M_PI * u)), u);
        if (c != 0.f) check(cos_pi, ulps(c, std::cos(M_PI * u)), u);
    }
    for (Seen* s : {&ex2, &rcp, &lg2_near, &lg2_far, &ex, &lg, &sin_pi, &cos_pi, &sin_sfu, &cos_sfu})
        if (!emu::exact_math(s->name) && !(s->worst > 0.5 * s->bound) && bad++ < 10)
            std::printf("self-test: %s never off by more than %.3g (bound %.3g): the model is not applied\n",
                        s->name, s->worst, s->bound);
    // Where the device is exact, or flushes.
    const bool exact_points = emu::sfu_ex2(0.f) == 1.f && emu::sfu_ex2(3.f) == 8.f &&
                              emu::sfu_ex2(-INFINITY) == 0.f && emu::sfu_ex2(-130.5f) == 0.f &&
                              emu::sfu_rcp(4.f) == 0.25f && emu::sfu_lg2(0.5f) == -1.f &&
                              expf(0.f) == 1.f && logf(1.f) == 0.f;
    if (!exact_points && bad++ < 10) std::printf("self-test: a math model moved a value the device computes exactly\n");
    return bad;
}

int run() {
    std::vector<int> out(static_cast<size_t>(kBlocks) * kThreads * kOutputs, -1);
    EMU_LAUNCH(collectives, dim3(kBlocks), dim3(kThreads), out.data());
    int bad = 0;
    for (int b = 0; b < kBlocks; ++b)
        for (int tid = 0; tid < kThreads; ++tid) {
            const int lane = tid % 32, warp = tid / 32;
            auto val = [&](int l) { return 100 * b + 10 * warp + l; };
            unsigned ballot = 0;
            for (int l = 0; l < 32; ++l) ballot |= (l % 3 == 0 ? 1u : 0u) << l;
            const int want[kOutputs] = {
                val((lane + 3) % 32),
                val(lane ^ 5),
                lane >= 2 ? val(lane - 2) : val(lane),
                lane + 2 < 32 ? val(lane + 2) : val(lane),
                static_cast<int>(ballot),
                1 + 2 + 0,
                val(lane / 8 * 8 + 3),
                // An earlier group of 8 is readable, a later one gives the caller's own value.
                (lane ^ 8) < lane ? val(lane ^ 8) : val(lane),
                lane % 16 + 1 < 16 ? val(lane + 1) : val(lane),
                100 * b + 10 * ((kThreads - 1 - tid) / 32) + (kThreads - 1 - tid) % 32,
                kThreads,
                kThreads * kBlocks,
                31 + 100 * 5 + 10000 * 8,
            };
            for (int i = 0; i < kOutputs; ++i) {
                const int got = out[(static_cast<size_t>(b) * kThreads + tid) * kOutputs + i];
                if (got != want[i] && bad++ < 10)
                    std::printf("self-test: block %d thread %d output %d: got %d, want %d\n", b, tid,
                                i, got, want[i]);
            }
        }
    bad += run_async_copies();
    bad += run_time_buckets();
    bad += run_math_models();
    bad += run_shared_poison();
    bad += run_block_order();
    bad += run_bank_model();
    std::printf("%s self-test of the emulated collectives, cp.async, time buckets, math models, "
                "shared-memory poison, block order and bank model\n",
                bad == 0 ? "OK" : "FAILED");
    return bad == 0 ? 0 : 1;
}

// A lane that returns before a full-mask shuffle its warp then reaches: undefined behavior (or
// a hang) on a GPU, which the emulation must stop on (exit code 3), whichever of the lane's exit
// and the others' arrival comes first. `--self-test-early-exit` runs it; the caller checks.
__global__ void early_exit(int* out) {
    const int lane = threadIdx.x % 32;
    if (lane == 31) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, lane, 1);
}

int run_early_exit() {
    std::vector<int> out(kThreads, 0);
    emu::launch_named("early_exit", early_exit, dim3(kBlocks), dim3(kThreads), out.data());
    std::printf("the early exit was not caught\n");
    return 1;
}

}  // namespace k_selftest

namespace {

// ---- Storage types per module (each module has its own, identical, half_t and bf16_t) ----------
enum class DType { F32, F16, BF16 };

const char* dtype_name(DType d) {
    return d == DType::F32 ? "f32" : d == DType::F16 ? "f16" : "bf16";
}

double tolerance(DType d) {
    return d == DType::F32 ? 1e-5 : d == DType::F16 ? 3e-3 : 1e-2;
}

template <DType D, typename F32, typename F16, typename BF16>
using Pick = std::conditional_t<D == DType::F32, F32, std::conditional_t<D == DType::F16, F16, BF16>>;

template <DType D>
struct Elem {
    using pooling = Pick<D, float, k_pooling::half_t, k_pooling::bf16_t>;
    using forward = Pick<D, float, k_forward::half_t, k_forward::bf16_t>;
    using forward_tc = Pick<D, float, k_forward_tc::half_t, k_forward_tc::bf16_t>;
    using bwd_query_tc = Pick<D, float, k_bwd_query_tc::half_t, k_bwd_query_tc::bf16_t>;
    using bwd_query = Pick<D, float, k_bwd_query::half_t, k_bwd_query::bf16_t>;
    using bwd_summary = Pick<D, float, k_bwd_summary::half_t, k_bwd_summary::bf16_t>;
    using bwd_summary_tc = Pick<D, float, k_bwd_summary_tc::half_t, k_bwd_summary_tc::bf16_t>;
    using bwd_key = Pick<D, float, k_bwd_key::half_t, k_bwd_key::bf16_t>;
    using bwd_tails_tc = Pick<D, float, k_bwd_tails_tc::half_t, k_bwd_tails_tc::bf16_t>;
    using bwd_key_tc = Pick<D, float, k_bwd_key_tc::half_t, k_bwd_key_tc::bf16_t>;
    using bwd_user_reduce = Pick<D, float, k_bwd_user_reduce::half_t, k_bwd_user_reduce::bf16_t>;
    using dense_fwd = Pick<D, float, k_dense_fwd::half_t, k_dense_fwd::bf16_t>;
    using dense_bq = Pick<D, float, k_dense_bq::half_t, k_dense_bq::bf16_t>;
    using dense_bk = Pick<D, float, k_dense_bk::half_t, k_dense_bk::bf16_t>;
};

// The instantiations of build.rs (DTYPES x HEAD_DIMS), by (dtype, head dim).
template <DType D, int HD>
struct Kernels;
#define EMU_KERNELS(DT, dn, HD)                                                         \
    template <>                                                                         \
    struct Kernels<DType::DT, HD> {                                                     \
        static constexpr auto pooling = k_pooling::evo_pooling_##dn;                    \
        static constexpr auto forward = k_forward::evo_forward_##dn##_d##HD;            \
        static constexpr auto bwd_query = k_bwd_query::evo_backward_query_##dn##_d##HD; \
        static constexpr auto bwd_summary =                                             \
            k_bwd_summary::evo_backward_summary_##dn##_d##HD;                           \
        static constexpr auto bwd_key = k_bwd_key::evo_backward_key_##dn##_d##HD;       \
        static constexpr const char* pooling_name = "evo_pooling_" #dn;                 \
        static constexpr const char* forward_name = "evo_forward_" #dn "_d" #HD;        \
        static constexpr const char* bwd_query_name = "evo_backward_query_" #dn "_d" #HD; \
        static constexpr const char* bwd_summary_name =                                 \
            "evo_backward_summary_" #dn "_d" #HD;                                       \
        static constexpr const char* bwd_key_name = "evo_backward_key_" #dn "_d" #HD;   \
        static constexpr auto dense_fwd = k_dense_fwd::evo_dense_forward_##dn##_d##HD;  \
        static constexpr auto dense_bq = k_dense_bq::evo_dense_backward_query_##dn##_d##HD; \
        static constexpr auto dense_bk = k_dense_bk::evo_dense_backward_key_##dn##_d##HD; \
        static constexpr const char* dense_fwd_name = "evo_dense_forward_" #dn "_d" #HD; \
        static constexpr const char* dense_bq_name = "evo_dense_backward_query_" #dn "_d" #HD; \
        static constexpr const char* dense_bk_name = "evo_dense_backward_key_" #dn "_d" #HD; \
    };
EMU_KERNELS(F32, f32, 32)
EMU_KERNELS(F32, f32, 64)
EMU_KERNELS(F32, f32, 128)
EMU_KERNELS(F16, f16, 32)
EMU_KERNELS(F16, f16, 64)
EMU_KERNELS(F16, f16, 128)
EMU_KERNELS(BF16, bf16, 32)
EMU_KERNELS(BF16, bf16, 64)
EMU_KERNELS(BF16, bf16, 128)
#undef EMU_KERNELS

// The tensor-core sparse forward: 16-bit dtypes only (build.rs axis dtype16).
template <DType D, int HD>
struct TcKernels;
#define EMU_TC_KERNELS(DT, dn, HD)                                                      \
    template <>                                                                         \
    struct TcKernels<DType::DT, HD> {                                                   \
        static constexpr auto forward = k_forward_tc::evo_forward_tc_##dn##_d##HD;      \
        static constexpr const char* forward_name = "evo_forward_tc_" #dn "_d" #HD;     \
        static constexpr auto bwd_query = k_bwd_query_tc::evo_backward_query_tc_##dn##_d##HD; \
        static constexpr const char* bwd_query_name = "evo_backward_query_tc_" #dn "_d" #HD; \
        static constexpr auto bwd_summary = k_bwd_summary_tc::evo_backward_summary_tc_##dn##_d##HD; \
        static constexpr const char* bwd_summary_name = "evo_backward_summary_tc_" #dn "_d" #HD; \
        static constexpr auto bwd_tails = k_bwd_tails_tc::evo_backward_tails_tc_##dn##_d##HD; \
        static constexpr const char* bwd_tails_name = "evo_backward_tails_tc_" #dn "_d" #HD; \
        static constexpr auto bwd_key = k_bwd_key_tc::evo_backward_key_tc_##dn##_d##HD; \
        static constexpr const char* bwd_key_name = "evo_backward_key_tc_" #dn "_d" #HD; \
        static constexpr auto bwd_user = k_bwd_user_reduce::evo_backward_user_reduce_##dn##_d##HD; \
        static constexpr const char* bwd_user_name = "evo_backward_user_reduce_" #dn "_d" #HD; \
    };
EMU_TC_KERNELS(F16, f16, 32)
EMU_TC_KERNELS(F16, f16, 64)
EMU_TC_KERNELS(F16, f16, 128)
EMU_TC_KERNELS(BF16, bf16, 32)
EMU_TC_KERNELS(BF16, bf16, 64)
EMU_TC_KERNELS(BF16, bf16, 128)
#undef EMU_TC_KERNELS

// Launch constants of src/cuda (CHUNK_THREADS, FORWARD_THREADS, ...), checked against the kernels'.
constexpr unsigned kChunkThreads = 256, kPoolThreads = 256, kForwardThreads = 128,
                   kForwardWarps = 4, kBwdWarps = 4, kBwdThreads = 128, kReduceThreads = 256;
static_assert(kChunkThreads == k_chunking::kChunkThreads);
static_assert(kPoolThreads == k_pooling::kPoolThreads);
static_assert(kForwardThreads == k_forward::kForwardThreads && kForwardWarps == k_forward::kForwardWarps);
static_assert(kBwdWarps == k_bwd_query::kBwdQueryWarps && kBwdThreads == k_bwd_query::kBwdQueryThreads);
static_assert(kBwdWarps == k_bwd_summary::kBwdSummaryWarps && kBwdThreads == k_bwd_summary::kBwdSummaryThreads);
static_assert(kBwdWarps == k_bwd_key::kBwdKeyWarps && kBwdThreads == k_bwd_key::kBwdKeyThreads);
static_assert(kReduceThreads == k_coeffs::kReduceThreads);
// src/cuda/backward.rs: USER_REDUCE_THREADS.
constexpr unsigned kUserReduceThreads = 128;
static_assert(kUserReduceThreads == k_bwd_user_reduce::kUserReduceThreads);
// src/cuda/dense.rs: DENSE_THREADS, DENSE_ROWS.
constexpr unsigned kDenseThreads = 128, kDenseRows = 64;
static_assert(kDenseThreads == k_dense_fwd::kDenseThreads && kDenseRows == k_dense_fwd::kDenseRows);

// All modules' EvoParams and SeqInfo are the same struct; the chunking module's serves the host.
using EvoParams = k_chunking::EvoParams;
using SeqInfo = k_chunking::SeqInfo;

template <typename To>
To cast_params(const EvoParams& p) {
    static_assert(sizeof(To) == sizeof(EvoParams));
    To out;
    std::memcpy(&out, &p, sizeof out);
    return out;
}

// ---- "Device" buffers: exact sizes (at least one element, as src/cuda/batch.rs::upload), 256-byte
// aligned like cuMemAlloc, so that AddressSanitizer sees any out-of-bounds access. ----------------
struct Buf {
    void* ptr = nullptr;
    size_t bytes = 0;
    Buf() = default;
    explicit Buf(size_t n) : bytes(n) { ptr = ::operator new(n, std::align_val_t(256)); }
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    Buf(Buf&& o) noexcept : ptr(o.ptr), bytes(o.bytes) { o.ptr = nullptr; o.bytes = 0; }
    Buf& operator=(Buf&& o) noexcept {
        std::swap(ptr, o.ptr);
        std::swap(bytes, o.bytes);
        return *this;
    }
    ~Buf() {
        if (ptr != nullptr) ::operator delete(ptr, std::align_val_t(256));
    }
    template <typename T>
    T* as() const {
        return static_cast<T*>(ptr);
    }
};

template <typename T>
Buf upload(const std::vector<T>& v) {
    Buf b(std::max<size_t>(v.size(), 1) * sizeof(T));
    std::memset(b.ptr, 0, b.bytes);
    if (!v.empty()) std::memcpy(b.ptr, v.data(), v.size() * sizeof(T));
    return b;
}

template <typename T>
Buf zeros(size_t n) {
    Buf b(std::max<size_t>(n, 1) * sizeof(T));
    std::memset(b.ptr, 0, b.bytes);
    return b;
}

// n elements of T, every bit pattern 0xff: NaN for f32, f16 and bf16.
template <typename T>
Buf poisoned(size_t n) {
    Buf b(std::max<size_t>(n, 1) * sizeof(T));
    std::memset(b.ptr, 0xff, b.bytes);
    return b;
}

// ---- Element conversions (the kernels' own, so host and kernel agree bit for bit) -------------
template <DType D>
struct Conv;
template <>
struct Conv<DType::F32> {
    static float widen(const void* p, size_t i) { return static_cast<const float*>(p)[i]; }
    static void store(void* p, size_t i, float x) { static_cast<float*>(p)[i] = x; }
    static constexpr size_t size = 4;
};
template <>
struct Conv<DType::F16> {
    static float widen(const void* p, size_t i) {
        return host_half_to_float(static_cast<const unsigned short*>(p)[i]);
    }
    static void store(void* p, size_t i, float x) {
        static_cast<unsigned short*>(p)[i] = host_float_to_half_rn(x);
    }
    static constexpr size_t size = 2;
};
template <>
struct Conv<DType::BF16> {
    static float widen(const void* p, size_t i) {
        return __uint_as_float(static_cast<unsigned>(static_cast<const unsigned short*>(p)[i]) << 16);
    }
    static void store(void* p, size_t i, float x) {
        static_cast<unsigned short*>(p)[i] = host_float_to_bf16_rn(x);
    }
    static constexpr size_t size = 2;
};

// A tensor of the storage dtype from f32 values (which the folder holds widened, exactly).
template <DType D>
Buf to_device(const std::vector<float>& v, bool* inexact) {
    Buf b(std::max<size_t>(v.size(), 1) * Conv<D>::size);
    std::memset(b.ptr, 0, b.bytes);
    for (size_t i = 0; i < v.size(); ++i) {
        Conv<D>::store(b.ptr, i, v[i]);
        if (Conv<D>::widen(b.ptr, i) != v[i] && !(std::isnan(v[i]))) *inexact = true;
    }
    return b;
}

template <DType D>
std::vector<double> widen(const Buf& b, size_t n) {
    std::vector<double> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = Conv<D>::widen(b.ptr, i);
    return out;
}

std::vector<double> widen_f32(const Buf& b, size_t n) {
    std::vector<double> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = b.as<float>()[i];
    return out;
}

// ---- The folder ------------------------------------------------------------------------------
struct Meta {
    std::map<std::string, std::string> kv;

    bool has(const std::string& k) const { return kv.count(k) != 0; }
    std::string str(const std::string& k, const std::string& def = "") const {
        auto it = kv.find(k);
        return it == kv.end() ? def : it->second;
    }
    long long i64(const std::string& k) const {
        auto it = kv.find(k);
        if (it == kv.end()) throw std::runtime_error("meta.json: missing " + k);
        return std::stoll(it->second);
    }
    double f64(const std::string& k) const {
        auto it = kv.find(k);
        if (it == kv.end()) throw std::runtime_error("meta.json: missing " + k);
        return std::stod(it->second);
    }
    bool flag(const std::string& k) const { return str(k) == "true"; }
};

// A flat JSON object of strings, numbers and booleans (what export_batch writes).
Meta parse_meta(const std::string& text) {
    Meta m;
    size_t i = 0;
    auto skip = [&] {
        while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
    };
    auto string = [&] {
        if (text[i] != '"') throw std::runtime_error("meta.json: expected a string");
        std::string s;
        for (++i; i < text.size() && text[i] != '"'; ++i) {
            if (text[i] == '\\' && i + 1 < text.size()) ++i;
            s += text[i];
        }
        ++i;
        return s;
    };
    skip();
    if (text[i++] != '{') throw std::runtime_error("meta.json: expected an object");
    for (;;) {
        skip();
        if (text[i] == '}') break;
        std::string key = string();
        skip();
        if (text[i++] != ':') throw std::runtime_error("meta.json: expected ':'");
        skip();
        std::string value;
        if (text[i] == '"') {
            value = string();
        } else {
            while (i < text.size() && text[i] != ',' && text[i] != '}' &&
                   !std::isspace(static_cast<unsigned char>(text[i])))
                value += text[i++];
        }
        m.kv[key] = value;
        skip();
        if (text[i] == ',') ++i;
    }
    return m;
}

struct Folder {
    std::string dir;
    Meta meta;

    std::string path(const std::string& name) const { return dir + "/" + name; }

    bool exists(const std::string& name) const { return std::ifstream(path(name)).good(); }

    template <typename T>
    std::vector<T> read(const std::string& name, size_t expected) const {
        std::ifstream f(path(name), std::ios::binary);
        if (!f) throw std::runtime_error("cannot open " + path(name));
        std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        if (bytes.size() != expected * sizeof(T))
            throw std::runtime_error(name + ": " + std::to_string(bytes.size()) + " bytes, expected " +
                                     std::to_string(expected * sizeof(T)));
        std::vector<T> v(expected);
        if (expected != 0) std::memcpy(v.data(), bytes.data(), bytes.size());
        return v;
    }

    template <typename T>
    std::vector<T> read_any(const std::string& name) const {
        std::ifstream f(path(name), std::ios::binary);
        if (!f) throw std::runtime_error("cannot open " + path(name));
        std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        if (bytes.size() % sizeof(T) != 0) throw std::runtime_error(name + ": ragged length");
        std::vector<T> v(bytes.size() / sizeof(T));
        if (!v.empty()) std::memcpy(v.data(), bytes.data(), bytes.size());
        return v;
    }
};

// ---- Comparison ------------------------------------------------------------------------------
struct Report {
    int failures = 0;
    std::vector<std::string> errors;  // name=error, for the summary line
    // FNV-1a over the bits of every output compared, in order: a run with the blocks of every
    // launch in reverse order (EMU_BLOCK_ORDER) must give the same digest, as a GPU's results
    // must not depend on the order in which its blocks run.
    std::uint64_t digest = 14695981039346656037ull;

    void absorb(const std::vector<double>& got) {
        for (const double x : got) {
            std::uint64_t bits;
            std::memcpy(&bits, &x, sizeof bits);
            for (int i = 0; i < 8; ++i) {
                digest ^= (bits >> (8 * i)) & 0xffu;
                digest *= 1099511628211ull;
            }
        }
    }

    void fail(const std::string& msg) {
        ++failures;
        std::printf("  MISMATCH %s\n", msg.c_str());
        std::fflush(stdout);
    }
};

// Relative L2 error; NaN anywhere fails; a zero reference needs an exactly zero result.
double compare(Report& r, const std::string& name, const std::vector<double>& got,
               const std::vector<double>& want, double tol) {
    r.absorb(got);
    if (got.size() != want.size()) {
        r.fail(name + ": length " + std::to_string(got.size()) + " vs " + std::to_string(want.size()));
        return NAN;
    }
    double num = 0, den = 0;
    size_t nan_at = SIZE_MAX, worst = 0;
    double worst_abs = -1;
    for (size_t i = 0; i < got.size(); ++i) {
        if (std::isnan(got[i]) || std::isnan(want[i])) {
            if (nan_at == SIZE_MAX) nan_at = i;
            continue;
        }
        const double d = got[i] - want[i];
        num += d * d;
        den += want[i] * want[i];
        if (std::fabs(d) > worst_abs) {
            worst_abs = std::fabs(d);
            worst = i;
        }
    }
    char buf[512];
    if (nan_at != SIZE_MAX) {
        size_t count = 0;
        for (size_t i = 0; i < got.size(); ++i) count += std::isnan(got[i]) || std::isnan(want[i]);
        std::snprintf(buf, sizeof buf, "%s: %zu NaN (first at index %zu: got %g, reference %g)",
                      name.c_str(), count, nan_at, got[nan_at], want[nan_at]);
        r.fail(buf);
        r.errors.push_back(name + "=NaN");
        return NAN;
    }
    if (den == 0.0) {
        if (num != 0.0) {
            std::snprintf(buf, sizeof buf, "%s: the reference is zero, the kernel's is not (|x| = %g, "
                          "largest at %zu: %g)", name.c_str(), std::sqrt(num), worst, got[worst]);
            r.fail(buf);
            r.errors.push_back(name + "=nonzero");
            return INFINITY;
        }
        r.errors.push_back(name + "=0");
        return 0.0;
    }
    const double err = std::sqrt(num / den);
    std::snprintf(buf, sizeof buf, "%s=%.2e", name.c_str(), err);
    r.errors.push_back(buf);
    if (!(err <= tol)) {
        std::snprintf(buf, sizeof buf,
                      "%s: relative L2 error %.3e > %.0e (largest difference at index %zu: got %.6g, "
                      "reference %.6g)",
                      name.c_str(), err, tol, worst, got[worst], want[worst]);
        r.fail(buf);
    }
    return err;
}

// Per entry, |x - reference| / max(1, |reference|) at most this, for every dtype, for the
// per-row scalars that one lost (or gained) key moves: each LSE entry of the forwards, and each
// dgates entry of the backward (dgates_b = sum_j P_j dP'_j of the row's recomputed P). The
// relative L2 over a whole output cannot see one such row: its LSE moves by -log(1 - p) >= p for
// a key of weight p, its dgates by about p times the key's dP'. Rounding moves them by about
// 1e-5 (summaries split in two 16-bit parts) or far less.
constexpr double kEntryTol = 1e-3;

// Adds `name`_entry (the worst entry) to the report's errors, and fails above kEntryTol.
void compare_entries(Report& r, const std::string& name, const std::vector<double>& got,
                     const std::vector<double>& want) {
    double worst = 0;
    size_t worst_at = 0;
    for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
        const double e = std::fabs(got[i] - want[i]) / std::max(1.0, std::fabs(want[i]));
        if (!(e <= worst)) {  // NaN is the worst there is
            worst = e;
            worst_at = i;
        }
    }
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s_entry=%.2e", name.c_str(), worst);
    r.errors.push_back(buf);
    if (!(worst <= kEntryTol)) {
        std::snprintf(buf, sizeof buf,
                      "%s: entry %zu is off by %.3e of max(1, |reference|) > %.0e (got %.6g, "
                      "reference %.6g): a key lost or gained?",
                      name.c_str(), worst_at, worst, kEntryTol, got[worst_at], want[worst_at]);
        r.fail(buf);
    }
}

// Per (token, head) row of a [T, H, D] gradient: ||x_r - ref_r|| / max(||ref_r||, rms row norm)
// at most kRowTol[dtype]. The relative L2 over a whole tensor cannot see a few rows gone wrong
// (one key tile's dK/dV dropped, or added twice), as the random cases did not see set 1's dK go
// missing (session 14); each row must hold on its own. The rms floor keeps rows whose reference
// is near zero from failing on rounding. The bounds are about twice the worst rows seen over 20
// runs of every case kind (dQ in bf16 on peaked logits: 4.6e-2; f16 3.4e-3; f32 1.0e-5), and far
// below a dropped key tile (0.4-0.9). Adds `name`_row (the worst row) to the report's errors.
double row_tolerance(DType d) {
    return d == DType::F32 ? 1e-4 : d == DType::F16 ? 3e-2 : 1e-1;
}

void compare_rows(Report& r, const std::string& name, const std::vector<double>& got,
                  const std::vector<double>& want, size_t row_len, int heads, double tol) {
    const size_t n = std::min(got.size(), want.size()) / row_len;
    if (n == 0) return;
    double den = 0;
    for (size_t i = 0; i < n * row_len; ++i) den += want[i] * want[i];
    const double rms = std::sqrt(den / static_cast<double>(n));
    double worst = 0;
    size_t worst_at = 0;
    for (size_t row = 0; row < n; ++row) {
        double d2 = 0, w2 = 0;
        for (size_t i = row * row_len; i < (row + 1) * row_len; ++i) {
            d2 += (got[i] - want[i]) * (got[i] - want[i]);
            w2 += want[i] * want[i];
        }
        const double floor = std::max(std::sqrt(w2), rms);
        const double e = floor > 0 ? std::sqrt(d2) / floor : (d2 == 0 ? 0.0 : INFINITY);
        if (!(e <= worst)) {  // NaN is the worst there is
            worst = e;
            worst_at = row;
        }
    }
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s_row=%.2e", name.c_str(), worst);
    r.errors.push_back(buf);
    if (!(worst <= tol)) {
        std::snprintf(buf, sizeof buf,
                      "%s: token %zu, head %zu is off by %.3e of max(its norm, the rms row norm) > %.0e",
                      name.c_str(), worst_at / heads, worst_at % heads, worst, tol);
        r.fail(buf);
    }
}

// LSE: -inf exactly where the reference has -inf (empty key set), relative L2 over the rest, and
// each finite entry within kEntryTol. Adds `name` and `name`_entry to the report's errors.
void compare_lse(Report& r, const std::string& name, const std::vector<double>& got,
                 const std::vector<double>& want, double tol, int heads) {
    std::vector<double> g, w;
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const bool want_inf = std::isinf(want[i]) && want[i] < 0;
        const bool got_inf = std::isinf(got[i]) && got[i] < 0;
        if (want_inf != got_inf) {
            if (bad++ == 0) first = i;
            continue;
        }
        if (!want_inf) {
            g.push_back(got[i]);
            w.push_back(want[i]);
        }
    }
    if (bad != 0) {
        char buf[256];
        std::snprintf(buf, sizeof buf,
                      "%s: %zu entries disagree on -inf (empty key set), first: token %zu, head "
                      "%zu, branch %zu: got %g, reference %g",
                      name.c_str(), bad, first / 3 / heads, first / 3 % heads, first % 3, got[first], want[first]);
        r.fail(buf);
    }
    compare(r, name, g, w, tol);
    compare_entries(r, name, g, w);
}

// ---- One run ---------------------------------------------------------------------------------
struct Options {
    std::string chunks = "auto";  // gpu | host | auto
    bool repeat_backward = false;
    bool chunking_only = false;
};

struct Layout {
    int B = 0, T = 0;
    bool user = false;
    std::vector<SeqInfo> seqs;
    std::vector<int> weekday0;
    std::vector<unsigned> rel_time;
    int max_behaviors = 0;
};

// GpuDevice::upload_batch.
Layout prepare_layout(const std::vector<int64_t>& offsets, const std::vector<int64_t>& ncand,
                      bool user, const std::vector<int64_t>& ts, long long utc_offset) {
    Layout l;
    l.B = static_cast<int>(ncand.size());
    l.T = static_cast<int>(ts.size());
    l.user = user;
    l.rel_time.assign(l.T, 0u);
    const __int128 off = utc_offset, day = 86400;
    for (int s = 0; s < l.B; ++s) {
        const int start = static_cast<int>(offsets[s]), end = static_cast<int>(offsets[s + 1]);
        const int behaviors = start + (user ? 1 : 0);
        const int candidates = end - static_cast<int>(ncand[s]);
        l.seqs.push_back(SeqInfo{start, behaviors, candidates, end});
        l.max_behaviors = std::max(l.max_behaviors, candidates - behaviors);
        if (behaviors == end) {
            l.weekday0.push_back(0);
            continue;
        }
        int64_t t_min = INT64_MAX;
        for (int t = behaviors; t < end; ++t) t_min = std::min(t_min, ts[t]);
        const __int128 x = static_cast<__int128>(t_min) + off;
        __int128 day0 = x / day;
        if (x % day != 0 && x < 0) --day0;  // div_euclid
        const __int128 base = day0 * day - off;
        __int128 wd = (day0 + 4) % 7;
        if (wd < 0) wd += 7;
        l.weekday0.push_back(static_cast<int>(wd));
        for (int t = behaviors; t < end; ++t)
            l.rel_time[t] = static_cast<unsigned>(static_cast<unsigned __int128>(ts[t] - base));
    }
    return l;
}

// GpuDevice::upload_batch's tile list for the tiled kernels: (sequence, tile of 64 tokens)
// pairs, later tiles first, then by sequence.
std::vector<int> tile_list(const Layout& lay) {
    std::vector<std::pair<int, int>> t;  // (tile, sequence)
    for (int s = 0; s < lay.B; ++s) {
        const int n = lay.seqs[s].end - lay.seqs[s].start;
        for (int tile = 0; tile * static_cast<int>(kDenseRows) < n; ++tile) t.emplace_back(tile, s);
    }
    std::sort(t.begin(), t.end(), [](const auto& a, const auto& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    std::vector<int> out;
    for (const auto& [tile, seq] : t) {
        out.push_back(seq);
        out.push_back(tile);
    }
    return out;
}

// Outputs of one backward run.
struct Out {
    Buf dq, dk, dv, dgates, dcoeffs;
};

// The stored pairs of the local window and their deltas (LocalPairs::Stored).
struct Pairs {
    Buf rows, delta;
};

struct Timer {
    std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
    double seconds() const {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
};

template <DType DT, int HD>
int run(const Folder& f, const Options& opt) {
    using TP = typename Elem<DT>::pooling;
    using TF = typename Elem<DT>::forward;
    using TQ = typename Elem<DT>::bwd_query;
    using TS = typename Elem<DT>::bwd_summary;
    using TK = typename Elem<DT>::bwd_key;
    using K = Kernels<DT, HD>;
    const Meta& m = f.meta;
    Report rep;
    const double tol = tolerance(DT);
    Timer total;

    const int B = static_cast<int>(m.i64("num_seqs"));
    const int T = static_cast<int>(m.i64("num_tokens"));
    const int H = static_cast<int>(m.i64("heads"));
    const int P = static_cast<int>(m.i64("num_chunks"));
    const long long tail_tokens = m.i64("tail_tokens"), window = m.i64("window");
    const int NB = static_cast<int>(m.i64("num_time_buckets"));
    const long long utc_offset = m.i64("utc_offset");
    const float scale = static_cast<float>(m.f64("scale"));
    const bool user = m.flag("has_user_token");
    const std::string gates_mode = m.str("gates_mode", "native");
    const bool personalized = m.str("chunks", "personalized") == "personalized";
    const bool grads = m.flag("grads");
    const size_t rows = static_cast<size_t>(T) * H * HD, branch_rows = static_cast<size_t>(T) * H * 3;

    const auto offsets = f.read<int64_t>("seq_offsets", B + 1);
    const auto ncand = f.read<int64_t>("num_candidates", B);
    const auto ts = f.read<int64_t>("timestamps", T);
    const auto chunk_offsets = f.read<int64_t>("chunk_offsets", B + 1);
    const auto chunk_lengths = f.read_any<int64_t>("chunk_lengths");
    const auto q = f.read<float>("q", rows), k = f.read<float>("k", rows), v = f.read<float>("v", rows);
    const auto gates = f.read<float>("gates", branch_rows);
    const auto coeffs = f.read<float>("coeffs", static_cast<size_t>(H) * 3);
    const auto o_ref = f.read<float>("o", rows);
    const auto lse_ref = f.read<float>("lse", branch_rows);
    // Each branch's O_b before gating, [T, H, 3, D]: the forwards write them when asked.
    const bool have_ob_ref = f.exists("o_branch");
    const auto ob_ref = have_ob_ref ? f.read<float>("o_branch", 3 * rows) : std::vector<float>();

    std::string chunk_source = opt.chunks == "auto" ? (personalized ? "gpu" : "host") : opt.chunks;
    if (chunk_source == "gpu" && !personalized) {
        std::printf("  (supplied chunks: uploading them, as upload_chunks does)\n");
        chunk_source = "host";
    }
    std::printf("case %s: B=%d T=%d H=%d D=%d %s P=%d m=%lld w=%lld NB=%d utc_offset=%lld gates=%s "
                "chunks=%s%s\n",
                f.dir.c_str(), B, T, H, HD, dtype_name(DT), P, tail_tokens, window, NB, utc_offset,
                gates_mode.c_str(), personalized ? "personalized" : "supplied",
                chunk_source == "gpu" ? " (from the chunking kernel)" : " (uploaded)");

    const Layout lay = prepare_layout(offsets, ncand, user, ts, utc_offset);
    const Buf seqs_d = upload(lay.seqs), rel_d = upload(lay.rel_time), wd0_d = upload(lay.weekday0);
    const std::vector<int> tiles_h = tile_list(lay);
    const Buf tiles_d = upload(tiles_h);
    const unsigned num_tiles = static_cast<unsigned>(tiles_h.size() / 2);

    // The folder's chunks, as absolute exclusive ends per sequence.
    std::vector<std::vector<int>> ref_ends(B);
    {
        size_t c = 0;
        for (int s = 0; s < B; ++s) {
            int at = lay.seqs[s].behaviors;
            for (int64_t i = chunk_offsets[s]; i < chunk_offsets[s + 1]; ++i, ++c) {
                at += static_cast<int>(chunk_lengths.at(c));
                ref_ends[s].push_back(at);
            }
        }
    }

    // ---- GpuDevice::chunk: the chunking kernel --------------------------------------------
    const int gpu_stride = std::min(P, std::max(lay.max_behaviors, 1));
    Buf gpu_ends = zeros<int>(static_cast<size_t>(B) * gpu_stride), gpu_counts = zeros<int>(B);
    if (B > 0) {
        EvoParams cp{};
        cp.num_seqs = B;
        cp.num_tokens = T;
        cp.max_chunks = gpu_stride;
        EMU_LAUNCH(k_chunking::evo_chunking, dim3(B), dim3(kChunkThreads), cp,
                   rel_d.as<const unsigned>(), seqs_d.as<const SeqInfo>(), gpu_ends.as<int>(),
                   gpu_counts.as<int>());
    }
    if (personalized) {
        int wrong = 0, total_chunks = 0;
        for (int s = 0; s < B; ++s) {
            const int count = gpu_counts.as<int>()[s];
            std::vector<int> got;
            if (count < 0 || count > gpu_stride) {
                got.push_back(-1);
            } else {
                for (int c = 0; c < count; ++c) got.push_back(gpu_ends.as<int>()[s * gpu_stride + c]);
            }
            total_chunks += static_cast<int>(ref_ends[s].size());
            if (got != ref_ends[s]) {
                if (wrong++ < 5) {
                    std::string g, w;
                    for (int e : got) g += " " + std::to_string(e);
                    for (int e : ref_ends[s]) w += " " + std::to_string(e);
                    rep.fail("chunking: sequence " + std::to_string(s) + ": kernel ends [" + g +
                             " ], reference [" + w + " ]");
                }
            }
        }
        std::printf("  chunking: %s (%d sequences, %d chunks, stride %d)\n",
                    wrong == 0 ? "cut sets equal" : "CUT SETS DIFFER", B, total_chunks, gpu_stride);
    }

    // ---- The chunks the attention kernels get ---------------------------------------------
    int stride;
    Buf ends_d, counts_d;
    if (chunk_source == "gpu") {
        stride = gpu_stride;
        ends_d = std::move(gpu_ends);
        counts_d = std::move(gpu_counts);
    } else {  // GpuDevice::upload_chunks
        stride = 1;
        for (int s = 0; s < B; ++s) stride = std::max(stride, static_cast<int>(ref_ends[s].size()));
        std::vector<int> ends(static_cast<size_t>(B) * stride, 0), counts(B, 0);
        for (int s = 0; s < B; ++s) {
            counts[s] = static_cast<int>(ref_ends[s].size());
            for (size_t c = 0; c < ref_ends[s].size(); ++c) ends[s * stride + c] = ref_ends[s][c];
        }
        ends_d = upload(ends);
        counts_d = upload(counts);
    }
    std::vector<int> counts_h(B), ends_h(static_cast<size_t>(B) * stride);
    if (B > 0) std::memcpy(counts_h.data(), counts_d.ptr, B * sizeof(int));
    if (B > 0) std::memcpy(ends_h.data(), ends_d.ptr, ends_h.size() * sizeof(int));

    // ---- launch_params --------------------------------------------------------------------
    EvoParams p{};
    p.num_seqs = B;
    p.num_tokens = T;
    p.heads = H;
    p.max_chunks = stride;
    p.tail_tokens = static_cast<int>(std::min<long long>(tail_tokens, std::max(lay.max_behaviors, 1)));
    p.window = static_cast<int>(std::min<long long>(window, lay.max_behaviors + 1));
    p.num_time_buckets = NB;
    p.gates_mode = gates_mode == "native" ? k_chunking::kGatesNative
                   : gates_mode == "f32"  ? k_chunking::kGatesF32
                                          : k_chunking::kGatesNone;
    p.scale = scale;
    p.head_dim = HD;

    bool inexact = false;
    const Buf q_d = to_device<DT>(q, &inexact), k_d = to_device<DT>(k, &inexact),
              v_d = to_device<DT>(v, &inexact);
    const Buf coeffs_d = upload(coeffs);
    Buf gates_d;
    const void* gates_ptr = nullptr;
    if (p.gates_mode == k_chunking::kGatesNative) {
        gates_d = to_device<DT>(gates, &inexact);
        gates_ptr = gates_d.ptr;
    } else if (p.gates_mode == k_chunking::kGatesF32) {
        gates_d = upload(gates);
        gates_ptr = gates_d.ptr;
    }
    if (inexact) std::printf("  note: some inputs were not exactly representable in %s\n", dtype_name(DT));

    if (opt.chunking_only) {
        std::printf("  (--chunking-only: no attention kernels)\n");
    } else if (T == 0) {
        // forward_into and backward_into launch nothing (dcoeffs is memset to zero).
        std::printf("  no tokens: nothing to launch\n");
    } else {
        const size_t slots = static_cast<size_t>(B) * stride;
        const size_t summary_rows = slots * H * HD;

        // ---- pool: unused slots stay NaN (the host zeroes them; no kernel may read them) ----
        Buf kbar = poisoned<float>(summary_rows), vbar = poisoned<float>(summary_rows);
        {
            Timer t;
            emu::launch_named(K::pooling_name, K::pooling, dim3(static_cast<unsigned>(slots)),
                              dim3(kPoolThreads), cast_params<k_pooling::EvoParams>(p),
                              k_d.as<const TP>(), v_d.as<const TP>(),
                              seqs_d.as<const k_pooling::SeqInfo>(), ends_d.as<const int>(),
                              counts_d.as<const int>(), kbar.as<float>(), vbar.as<float>());
            // Reference: f64 means of the (stored) members over the used slots.
            std::vector<double> got_k, got_v, want_k, want_v;
            const auto kw = widen<DT>(k_d, rows), vw = widen<DT>(v_d, rows);
            const auto kb = widen_f32(kbar, summary_rows), vb = widen_f32(vbar, summary_rows);
            const size_t width = static_cast<size_t>(H) * HD;
            for (int s = 0; s < B; ++s)
                for (int c = 0; c < counts_h[s]; ++c) {
                    const size_t slot = static_cast<size_t>(s) * stride + c;
                    const int start = c == 0 ? lay.seqs[s].behaviors : ends_h[slot - 1];
                    const int end = ends_h[slot];
                    for (size_t e = 0; e < width; ++e) {
                        double sk = 0, sv = 0;
                        for (int j = start; j < end; ++j) {
                            sk += kw[j * width + e];
                            sv += vw[j * width + e];
                        }
                        want_k.push_back(sk / (end - start));
                        want_v.push_back(sv / (end - start));
                        got_k.push_back(kb[slot * width + e]);
                        got_v.push_back(vb[slot * width + e]);
                    }
                }
            compare(rep, "kbar", got_k, want_k, tol);
            compare(rep, "vbar", got_v, want_v, tol);
            std::printf("  pooling:  %s %s (%.2f s)\n", rep.errors[rep.errors.size() - 2].c_str(),
                        rep.errors.back().c_str(), t.seconds());
        }

        // ---- forward ---------------------------------------------------------------------
        Buf o = poisoned<TF>(rows), lse = poisoned<float>(branch_rows), ob = poisoned<TF>(3 * rows);
        // The forward's O_b, compared where the folder has the reference's.
        auto compare_ob = [&](const char* name, const std::vector<double>& got) {
            if (!have_ob_ref) return;
            compare(rep, name, got, std::vector<double>(ob_ref.begin(), ob_ref.end()), tol);
            std::printf("  %s\n", rep.errors.back().c_str());
        };
        {
            Timer t;
            const dim3 grid((T + kForwardWarps - 1) / kForwardWarps, H);
            emu::launch_named(K::forward_name, K::forward, grid, dim3(kForwardThreads),
                              cast_params<k_forward::EvoParams>(p), q_d.as<const TF>(),
                              k_d.as<const TF>(), v_d.as<const TF>(), kbar.as<const float>(),
                              vbar.as<const float>(), gates_ptr, coeffs_d.as<const float>(),
                              rel_d.as<const unsigned>(), seqs_d.as<const k_forward::SeqInfo>(),
                              wd0_d.as<const int>(), ends_d.as<const int>(),
                              counts_d.as<const int>(), o.as<TF>(), lse.as<float>(), ob.as<TF>());
            const std::vector<double> o_want(o_ref.begin(), o_ref.end());
            const std::vector<double> lse_want(lse_ref.begin(), lse_ref.end());
            compare(rep, "o", widen<DT>(o, rows), o_want, tol);
            compare_lse(rep, "lse", widen_f32(lse, branch_rows), lse_want, tol, H);
            std::printf("  forward:  %s %s %s (%.2f s)\n", rep.errors[rep.errors.size() - 3].c_str(),
                        rep.errors[rep.errors.size() - 2].c_str(), rep.errors.back().c_str(),
                        t.seconds());
            compare_ob("o_branch", widen<DT>(ob, 3 * rows));
        }

        // ---- the tensor-core forward (what forward_into runs for 16-bit inputs): its LSE then
        // feeds the backward, as in backward_host ---------------------------------------------
        if constexpr (DT != DType::F32) {
            using TT = typename Elem<DT>::forward_tc;
            using KT = TcKernels<DT, HD>;
            Timer t;
            Buf o_tc = poisoned<TT>(rows), lse_tc = poisoned<float>(branch_rows), ob_tc = poisoned<TT>(3 * rows);
            emu::launch_named(KT::forward_name, KT::forward, dim3(num_tiles, H),
                              dim3(kDenseThreads), cast_params<k_forward_tc::EvoParams>(p),
                              q_d.as<const TT>(), k_d.as<const TT>(), v_d.as<const TT>(),
                              kbar.as<const float>(), vbar.as<const float>(), gates_ptr,
                              coeffs_d.as<const float>(), rel_d.as<const unsigned>(),
                              seqs_d.as<const k_forward_tc::SeqInfo>(), wd0_d.as<const int>(),
                              ends_d.as<const int>(), counts_d.as<const int>(), o_tc.as<TT>(),
                              lse_tc.as<float>(), tiles_d.as<const int>(), ob_tc.as<TT>());
            const std::vector<double> o_want(o_ref.begin(), o_ref.end());
            const std::vector<double> lse_want(lse_ref.begin(), lse_ref.end());
            compare(rep, "tc_o", widen<DT>(o_tc, rows), o_want, tol);
            compare_lse(rep, "tc_lse", widen_f32(lse_tc, branch_rows), lse_want, tol, H);
            std::printf("  forward (tensor cores): %s %s %s (%.2f s)\n",
                        rep.errors[rep.errors.size() - 3].c_str(),
                        rep.errors[rep.errors.size() - 2].c_str(), rep.errors.back().c_str(),
                        t.seconds());
            compare_ob("tc_o_branch", widen<DT>(ob_tc, 3 * rows));
            lse = std::move(lse_tc);
            ob = std::move(ob_tc);
        }

        // ---- backward (GpuDevice::backward_into) -----------------------------------------
        if (grads) {
            const auto d_o = f.read<float>("d_o", rows);
            const Buf d_o_d = to_device<DT>(d_o, &inexact);
            // The query side alone, into out.dq, out.dgates and partial: the tensor-core kernel
            // reads dgates from the forward's O_b when `saved` (backward_into given them).
            // The tensor-core query kernel's partials of the user tokens' dK and dV, one row per
            // 64-query tile (src/cuda/backward.rs: user_partial_rows); rows of sequences without
            // a user token are never written, nor read.
            const size_t user_rows = (static_cast<size_t>(B) + (static_cast<size_t>(T) + 63) / 64) * H * 2 * HD;
            // Stored pairs (LocalPairs::Stored, attn/stored_pairs.cuh): [T, H, 2, R] in the input
            // dtype and delta [T, H] f32, poisoned, so that a pair the key side reads and the
            // query kernel did not write turns dK or dV into NaN.
            const size_t pair_len = static_cast<size_t>(((p.window - 1 + 7) & ~7) + 8);
            const size_t pair_elems = static_cast<size_t>(T) * H * 2 * pair_len;
            auto query_side = [&](bool saved, Out& out, Buf& partial, Buf& user_partial, Pairs* pairs) {
                const dim3 token_grid((T + kBwdWarps - 1) / kBwdWarps, H), block(kBwdThreads);
                if constexpr (DT == DType::F32) {
                    emu::launch_named(
                        K::bwd_query_name, K::bwd_query, token_grid, block,
                        cast_params<k_bwd_query::EvoParams>(p), q_d.as<const TQ>(), k_d.as<const TQ>(),
                        v_d.as<const TQ>(), kbar.as<const float>(), vbar.as<const float>(), gates_ptr,
                        coeffs_d.as<const float>(), rel_d.as<const unsigned>(),
                        seqs_d.as<const k_bwd_query::SeqInfo>(), wd0_d.as<const int>(),
                        ends_d.as<const int>(), counts_d.as<const int>(), d_o_d.as<const TQ>(),
                        lse.as<const float>(), out.dq.as<TQ>(), out.dgates.as<float>(),
                        partial.as<float>());
                    (void)saved;  // the warp kernel always makes its own first pass
                    (void)user_partial;
                    (void)pairs;
                } else {
                    // backward_into's default for 16-bit inputs: the tensor-core query side.
                    using TB = typename Elem<DT>::bwd_query_tc;
                    using KT = TcKernels<DT, HD>;
                    emu::launch_named(
                        KT::bwd_query_name, KT::bwd_query, dim3(num_tiles, H * (HD == 128 ? 2 : 1)),
                        dim3(kDenseThreads),
                        cast_params<k_bwd_query_tc::EvoParams>(p), q_d.as<const TB>(), k_d.as<const TB>(),
                        v_d.as<const TB>(), kbar.as<const float>(), vbar.as<const float>(), gates_ptr,
                        coeffs_d.as<const float>(), rel_d.as<const unsigned>(),
                        seqs_d.as<const k_bwd_query_tc::SeqInfo>(), wd0_d.as<const int>(),
                        ends_d.as<const int>(), counts_d.as<const int>(), d_o_d.as<const TB>(),
                        lse.as<const float>(), out.dq.as<TB>(), out.dgates.as<float>(),
                        partial.as<float>(), tiles_d.as<const int>(),
                        saved ? ob.as<const TB>() : nullptr, user_partial.as<float>(),
                        pairs ? pairs->rows.as<TB>() : nullptr, pairs ? pairs->delta.as<float>() : nullptr);
                }
            };
            auto reduce_coeffs = [&](const Buf& partial, Out& out) {
                EMU_LAUNCH(k_coeffs::evo_coeffs_reduce, dim3(H), dim3(kReduceThreads),
                           cast_params<k_coeffs::EvoParams>(p), partial.as<const float>(),
                           out.dcoeffs.as<float>());
            };
            auto backward = [&](bool stored) {
                Out out{poisoned<TQ>(rows), poisoned<TK>(rows), poisoned<TK>(rows),
                        poisoned<float>(branch_rows), poisoned<float>(static_cast<size_t>(H) * 3)};
                Buf dkbar = poisoned<float>(summary_rows), dvbar = poisoned<float>(summary_rows);
                Buf partial = poisoned<float>(branch_rows);
                Buf user_partial = poisoned<float>(DT == DType::F32 ? 1 : user_rows);
                Pairs pairs{stored ? poisoned<TQ>(pair_elems) : Buf(1),
                            stored ? poisoned<float>(static_cast<size_t>(T) * H) : Buf(1)};
                const dim3 token_grid((T + kBwdWarps - 1) / kBwdWarps, H), block(kBwdThreads);
                query_side(true, out, partial, user_partial, stored ? &pairs : nullptr);
                if constexpr (DT == DType::F32) {
                    const dim3 summary_grid(
                        (static_cast<unsigned>(slots) + kBwdWarps - 1) / kBwdWarps, H);
                    emu::launch_named(
                        K::bwd_summary_name, K::bwd_summary, summary_grid, block,
                        cast_params<k_bwd_summary::EvoParams>(p), q_d.as<const TS>(),
                        kbar.as<const float>(), vbar.as<const float>(), gates_ptr, coeffs_d.as<const float>(),
                        rel_d.as<const unsigned>(), seqs_d.as<const k_bwd_summary::SeqInfo>(),
                        wd0_d.as<const int>(), ends_d.as<const int>(), counts_d.as<const int>(),
                        d_o_d.as<const TS>(), lse.as<const float>(), out.dgates.as<const float>(),
                        dkbar.as<float>(), dvbar.as<float>());
                } else {
                    // backward_into's default for 16-bit inputs: chunk summaries as MMA rows.
                    using KT = TcKernels<DT, HD>;
                    using TSC = typename Elem<DT>::bwd_summary_tc;
                    const unsigned groups = static_cast<unsigned>((p.max_chunks + kDenseRows - 1) / kDenseRows);
                    if (groups > 0 && B > 0)
                        emu::launch_named(
                            KT::bwd_summary_name, KT::bwd_summary, dim3(B * groups, H), dim3(kDenseThreads),
                            cast_params<k_bwd_summary_tc::EvoParams>(p), q_d.as<const TSC>(),
                            kbar.as<const float>(), vbar.as<const float>(), gates_ptr,
                            coeffs_d.as<const float>(), rel_d.as<const unsigned>(),
                            seqs_d.as<const k_bwd_summary_tc::SeqInfo>(), wd0_d.as<const int>(),
                            ends_d.as<const int>(), counts_d.as<const int>(), d_o_d.as<const TSC>(),
                            lse.as<const float>(), out.dgates.as<const float>(), dkbar.as<float>(),
                            dvbar.as<float>());
                }
                if constexpr (DT == DType::F32) {
                    emu::launch_named(
                        K::bwd_key_name, K::bwd_key, token_grid, block,
                        cast_params<k_bwd_key::EvoParams>(p), q_d.as<const TK>(), k_d.as<const TK>(),
                        v_d.as<const TK>(), gates_ptr, coeffs_d.as<const float>(),
                        rel_d.as<const unsigned>(), seqs_d.as<const k_bwd_key::SeqInfo>(),
                        wd0_d.as<const int>(), ends_d.as<const int>(), counts_d.as<const int>(),
                        d_o_d.as<const TK>(), lse.as<const float>(), out.dgates.as<const float>(),
                        dkbar.as<const float>(), dvbar.as<const float>(), out.dk.as<TK>(),
                        out.dv.as<TK>());
                } else {
                    // backward_into's default for 16-bit inputs: the tensor-core key side
                    // (GpuDevice::backward_key_tc). Tail slots nobody writes stay NaN.
                    using KT = TcKernels<DT, HD>;
                    using TT = typename Elem<DT>::bwd_tails_tc;
                    using TKC = typename Elem<DT>::bwd_key_tc;
                    using TU = typename Elem<DT>::bwd_user_reduce;
                    const size_t tail_slots = static_cast<size_t>(p.max_chunks) * p.tail_tokens;
                    const size_t tail_rows = static_cast<size_t>(B) * tail_slots * H * HD;
                    Buf tail_dk = poisoned<float>(tail_rows), tail_dv = poisoned<float>(tail_rows);
                    const unsigned groups = static_cast<unsigned>((tail_slots + kDenseRows - 1) / kDenseRows);
                    if (groups > 0 && B > 0)
                        emu::launch_named(
                            KT::bwd_tails_name, KT::bwd_tails, dim3(B * groups, H), dim3(kDenseThreads),
                            cast_params<k_bwd_tails_tc::EvoParams>(p), q_d.as<const TT>(),
                            k_d.as<const TT>(), v_d.as<const TT>(), gates_ptr, coeffs_d.as<const float>(),
                            rel_d.as<const unsigned>(), seqs_d.as<const k_bwd_tails_tc::SeqInfo>(),
                            wd0_d.as<const int>(), ends_d.as<const int>(), counts_d.as<const int>(),
                            d_o_d.as<const TT>(), lse.as<const float>(), out.dgates.as<const float>(),
                            tail_dk.as<float>(), tail_dv.as<float>());
                    emu::launch_named(
                        KT::bwd_key_name, KT::bwd_key, dim3(num_tiles, H), dim3(kDenseThreads),
                        cast_params<k_bwd_key_tc::EvoParams>(p), q_d.as<const TKC>(),
                        k_d.as<const TKC>(), v_d.as<const TKC>(), gates_ptr, coeffs_d.as<const float>(),
                        rel_d.as<const unsigned>(), seqs_d.as<const k_bwd_key_tc::SeqInfo>(),
                        wd0_d.as<const int>(), ends_d.as<const int>(), counts_d.as<const int>(),
                        d_o_d.as<const TKC>(), lse.as<const float>(), out.dgates.as<const float>(),
                        dkbar.as<const float>(), dvbar.as<const float>(), tail_dk.as<const float>(),
                        tail_dv.as<const float>(), out.dk.as<TKC>(), out.dv.as<TKC>(),
                        tiles_d.as<const int>(), stored ? pairs.rows.as<const TKC>() : nullptr,
                        stored ? pairs.delta.as<const float>() : nullptr);
                    if (B > 0)
                        emu::launch_named(
                            KT::bwd_user_name, KT::bwd_user,
                            dim3(static_cast<unsigned>(B), H), dim3(kUserReduceThreads),
                            cast_params<k_bwd_user_reduce::EvoParams>(p),
                            seqs_d.as<const k_bwd_user_reduce::SeqInfo>(),
                            user_partial.as<const float>(), out.dk.as<TU>(), out.dv.as<TU>());
                }
                reduce_coeffs(partial, out);
                return out;
            };
            Timer t;
            Out out = backward(false);
            const double secs = t.seconds();
            const size_t first = rep.errors.size();
            auto ref = [&](const char* name, size_t n) {
                const auto x = f.read<float>(name, n);
                return std::vector<double>(x.begin(), x.end());
            };
            for (const char* name : {"dq", "dk", "dv"}) {
                const auto want = ref(name, rows);
                const auto got = widen<DT>(name[1] == 'q' ? out.dq : name[1] == 'k' ? out.dk : out.dv, rows);
                compare(rep, name, got, want, tol);
                compare_rows(rep, name, got, want, HD, H, row_tolerance(DT));
            }
            const auto dgates_got = widen_f32(out.dgates, branch_rows);
            const auto dgates_want = ref("dgates", branch_rows);
            compare(rep, "dgates", dgates_got, dgates_want, tol);
            compare_entries(rep, "dgates", dgates_got, dgates_want);
            compare(rep, "dcoeffs", widen_f32(out.dcoeffs, static_cast<size_t>(H) * 3),
                    ref("dcoeffs", static_cast<size_t>(H) * 3), tol);
            std::string line;
            for (size_t i = first; i < rep.errors.size(); ++i) line += rep.errors[i] + " ";
            std::printf("  backward: %s(%.2f s)\n", line.c_str(), secs);
            if constexpr (DT != DType::F32) {
                // The query side without saved branch outputs (its own first pass for dgates).
                Timer t2;
                Out two{poisoned<TQ>(rows), Buf(1), Buf(1), poisoned<float>(branch_rows),
                        poisoned<float>(static_cast<size_t>(H) * 3)};
                Buf partial = poisoned<float>(branch_rows);
                Buf user_partial = poisoned<float>(user_rows);
                query_side(false, two, partial, user_partial, nullptr);
                reduce_coeffs(partial, two);
                const size_t at = rep.errors.size();
                compare(rep, "two_pass_dq", widen<DT>(two.dq, rows), ref("dq", rows), tol);
                const auto two_dgates = widen_f32(two.dgates, branch_rows);
                compare(rep, "two_pass_dgates", two_dgates, dgates_want, tol);
                compare_entries(rep, "two_pass_dgates", two_dgates, dgates_want);
                compare(rep, "two_pass_dcoeffs", widen_f32(two.dcoeffs, static_cast<size_t>(H) * 3),
                        ref("dcoeffs", static_cast<size_t>(H) * 3), tol);
                // The same sums up to rounding once the saved run corrects dcoeffs for D~ (about
                // 1e-6 apart in these cases); uncorrected they were 7e-3 apart, within SPEC's
                // bf16 bound, so this bound is what holds the correction.
                compare(rep, "saved_vs_two_pass_dcoeffs", widen_f32(out.dcoeffs, static_cast<size_t>(H) * 3),
                        widen_f32(two.dcoeffs, static_cast<size_t>(H) * 3), 1e-4);
                line.clear();
                for (size_t i = at; i < rep.errors.size(); ++i) line += rep.errors[i] + " ";
                std::printf("  query side, two passes: %s(%.2f s)\n", line.c_str(), t2.seconds());
            }
            if constexpr (DT != DType::F32) {
                // The key side from stored pairs (LocalPairs::Stored): dK and dV against the
                // reference; the query kernel's other outputs must keep their bits (its stores
                // change none of its sums).
                Timer t3;
                Out st = backward(true);
                const size_t at = rep.errors.size();
                for (const char* name : {"dk", "dv"}) {
                    const auto want = ref(name, rows);
                    const auto got = widen<DT>(name[1] == 'k' ? st.dk : st.dv, rows);
                    compare(rep, (std::string("stored_") + name).c_str(), got, want, tol);
                    compare_rows(rep, (std::string("stored_") + name).c_str(), got, want, HD, H, row_tolerance(DT));
                }
                const std::pair<const char*, std::pair<const Buf*, const Buf*>> same_bits[] = {
                    {"dq", {&out.dq, &st.dq}}, {"dgates", {&out.dgates, &st.dgates}},
                    {"dcoeffs", {&out.dcoeffs, &st.dcoeffs}}};
                for (const auto& [name, bufs] : same_bits)
                    if (std::memcmp(bufs.first->ptr, bufs.second->ptr, bufs.first->bytes) != 0)
                        rep.fail(std::string("stored pairs: ") + name + " differs from the recomputing run's bits");
                line.clear();
                for (size_t i = at; i < rep.errors.size(); ++i) line += rep.errors[i] + " ";
                std::printf("  key side from stored pairs: %s(%.2f s)\n", line.c_str(), t3.seconds());
                if (opt.repeat_backward) {
                    Out again = backward(true);
                    const bool same = std::memcmp(st.dk.ptr, again.dk.ptr, st.dk.bytes) == 0 &&
                                      std::memcmp(st.dv.ptr, again.dv.ptr, st.dv.bytes) == 0;
                    if (!same) rep.fail("stored pairs: a second run gave different dK or dV bits");
                    std::printf("  stored pairs again: %s\n", same ? "bitwise identical" : "DIFFERENT BITS");
                }
            }
            if (opt.repeat_backward) {
                Out again = backward(false);
                const std::pair<const char*, std::pair<const Buf*, const Buf*>> pairs[] = {
                    {"dq", {&out.dq, &again.dq}},         {"dk", {&out.dk, &again.dk}},
                    {"dv", {&out.dv, &again.dv}},         {"dgates", {&out.dgates, &again.dgates}},
                    {"dcoeffs", {&out.dcoeffs, &again.dcoeffs}}};
                bool same = true;
                for (const auto& [name, bufs] : pairs) {
                    if (std::memcmp(bufs.first->ptr, bufs.second->ptr, bufs.first->bytes) != 0) {
                        rep.fail(std::string(name) + ": a second backward run gave different bits");
                        same = false;
                    }
                }
                std::printf("  backward again: %s\n", same ? "bitwise identical" : "DIFFERENT BITS");
            }
        }
    }

    // ---- The dense counterpart (GpuDevice::dense_forward_into, dense_backward_into) ----------
    if (m.flag("dense") && T > 0 && !opt.chunking_only) {
        using TDF = typename Elem<DT>::dense_fwd;
        using TDQ = typename Elem<DT>::dense_bq;
        using TDK = typename Elem<DT>::dense_bk;
        EvoParams dp{};
        dp.num_seqs = B;
        dp.num_tokens = T;
        dp.heads = H;
        dp.num_time_buckets = NB;
        dp.scale = scale;
        dp.head_dim = HD;
        const size_t dense_rows = static_cast<size_t>(T) * H;
        auto ref = [&](const char* name, size_t n) {
            const auto x = f.read<float>(name, n);
            return std::vector<double>(x.begin(), x.end());
        };
        Buf o = poisoned<TDF>(rows), lse = poisoned<float>(dense_rows);
        Timer t;
        emu::launch_named(K::dense_fwd_name, K::dense_fwd, dim3(num_tiles, H), dim3(kDenseThreads),
                          cast_params<k_dense_fwd::EvoParams>(dp), q_d.as<const TDF>(),
                          k_d.as<const TDF>(), v_d.as<const TDF>(), coeffs_d.as<const float>(),
                          rel_d.as<const unsigned>(), seqs_d.as<const k_dense_fwd::SeqInfo>(),
                          wd0_d.as<const int>(), o.as<TDF>(), lse.as<float>(),
                          tiles_d.as<const int>());
        const size_t first = rep.errors.size();
        compare(rep, "dense_o", widen<DT>(o, rows), ref("dense_o", rows), tol);
        compare(rep, "dense_lse", widen_f32(lse, dense_rows), ref("dense_lse", dense_rows), tol);
        if (grads) {
            const auto d_o = f.read<float>("d_o", rows);
            const Buf d_o_d = to_device<DT>(d_o, &inexact);
            // f32 at D = 128 splits the backward's accumulators over four blocks (DenseParts).
            const unsigned parts = (DT == DType::F32 && HD == 128) ? 4 : 1;
            auto backward = [&]() {
                Out out{poisoned<TDQ>(rows), poisoned<TDK>(rows), poisoned<TDK>(rows), Buf(),
                        poisoned<float>(static_cast<size_t>(H) * 3)};
                Buf delta = poisoned<float>(dense_rows), partial = poisoned<float>(branch_rows);
                const dim3 grid(num_tiles, H * parts), block(kDenseThreads);
                emu::launch_named(K::dense_bq_name, K::dense_bq, grid, block,
                                  cast_params<k_dense_bq::EvoParams>(dp), q_d.as<const TDQ>(),
                                  k_d.as<const TDQ>(), v_d.as<const TDQ>(), o.as<const TDQ>(),
                                  d_o_d.as<const TDQ>(), lse.as<const float>(),
                                  coeffs_d.as<const float>(), rel_d.as<const unsigned>(),
                                  seqs_d.as<const k_dense_bq::SeqInfo>(), wd0_d.as<const int>(),
                                  out.dq.as<TDQ>(), delta.as<float>(), partial.as<float>(),
                                  tiles_d.as<const int>());
                emu::launch_named(K::dense_bk_name, K::dense_bk, grid, block,
                                  cast_params<k_dense_bk::EvoParams>(dp), q_d.as<const TDK>(),
                                  k_d.as<const TDK>(), v_d.as<const TDK>(), d_o_d.as<const TDK>(),
                                  lse.as<const float>(), delta.as<const float>(),
                                  coeffs_d.as<const float>(), rel_d.as<const unsigned>(),
                                  seqs_d.as<const k_dense_bk::SeqInfo>(), wd0_d.as<const int>(),
                                  out.dk.as<TDK>(), out.dv.as<TDK>(), tiles_d.as<const int>());
                EMU_LAUNCH(k_coeffs::evo_coeffs_reduce, dim3(H), dim3(kReduceThreads),
                           cast_params<k_coeffs::EvoParams>(dp), partial.as<const float>(),
                           out.dcoeffs.as<float>());
                return out;
            };
            Out out = backward();
            compare(rep, "dense_dq", widen<DT>(out.dq, rows), ref("dense_dq", rows), tol);
            compare(rep, "dense_dk", widen<DT>(out.dk, rows), ref("dense_dk", rows), tol);
            compare(rep, "dense_dv", widen<DT>(out.dv, rows), ref("dense_dv", rows), tol);
            compare(rep, "dense_dcoeffs", widen_f32(out.dcoeffs, static_cast<size_t>(H) * 3),
                    ref("dense_dcoeffs", static_cast<size_t>(H) * 3), tol);
            if (opt.repeat_backward) {
                Out again = backward();
                bool same = true;
                for (auto [a, b] : {std::pair{&out.dq, &again.dq}, std::pair{&out.dk, &again.dk},
                                    std::pair{&out.dv, &again.dv},
                                    std::pair{&out.dcoeffs, &again.dcoeffs}}) {
                    if (std::memcmp(a->ptr, b->ptr, a->bytes) != 0) same = false;
                }
                if (!same) rep.fail("dense backward: a second run gave different bits");
                std::printf("  dense backward again: %s\n", same ? "bitwise identical" : "DIFFERENT BITS");
            }
        }
        std::string line;
        for (size_t i = first; i < rep.errors.size(); ++i) line += rep.errors[i] + " ";
        std::printf("  dense:    %s(%.2f s)\n", line.c_str(), t.seconds());
    }
    if (T == 0 && grads && !opt.chunking_only) {
        // backward_into memsets dcoeffs to zero: the reference must agree.
        const auto dc = f.read<float>("dcoeffs", static_cast<size_t>(H) * 3);
        std::vector<double> want(dc.begin(), dc.end()), got(want.size(), 0.0);
        compare(rep, "dcoeffs", got, want, tol);
    }

    std::string summary;
    for (const auto& e : rep.errors) summary += " " + e;
    std::printf("DIGEST %016llx\n", static_cast<unsigned long long>(rep.digest));
    std::printf("%s %s D=%d:%s (%.1f s; %llu launches, %llu blocks, %llu threads, %llu collective "
                "arrivals)\n",
                rep.failures == 0 ? "OK" : "FAILED", dtype_name(DT), HD, summary.c_str(),
                total.seconds(), emu::g_stats.launches.load(), emu::g_stats.blocks.load(),
                emu::g_stats.threads.load(), emu::g_progress.load());
    return rep.failures == 0 ? 0 : 1;
}

template <DType DT>
int run_dim(const Folder& f, const Options& opt, int hd) {
    switch (hd) {
        case 32: return run<DT, 32>(f, opt);
        case 64: return run<DT, 64>(f, opt);
        case 128: return run<DT, 128>(f, opt);
        default:
            std::fprintf(stderr, "head_dim %d: no kernel instantiation\n", hd);
            return 2;
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 2 && std::string(argv[1]) == "--self-test") return k_selftest::run();
    if (argc == 2 && std::string(argv[1]) == "--self-test-early-exit") return k_selftest::run_early_exit();
    if (argc < 2) {
        std::fprintf(stderr,
                     "usage: %s DIR [--chunks gpu|host] [--repeat-backward] [--chunking-only]\n"
                     "       %s --self-test | --self-test-early-exit\n",
                     argv[0], argv[0]);
        return 2;
    }
    try {
        Folder f;
        f.dir = argv[1];
        Options opt;
        for (int i = 2; i < argc; ++i) {
            const std::string a = argv[i];
            if (a == "--chunks" && i + 1 < argc) {
                opt.chunks = argv[++i];
                if (opt.chunks != "gpu" && opt.chunks != "host") throw std::runtime_error("--chunks gpu|host");
            } else if (a == "--repeat-backward") {
                opt.repeat_backward = true;
            } else if (a == "--chunking-only") {
                opt.chunking_only = true;
            } else {
                throw std::runtime_error("unknown argument " + a);
            }
        }
        std::ifstream mf(f.path("meta.json"));
        if (!mf) throw std::runtime_error("cannot open " + f.path("meta.json"));
        std::stringstream ss;
        ss << mf.rdbuf();
        f.meta = parse_meta(ss.str());
        const std::string dt = f.meta.str("dtype");
        const int hd = static_cast<int>(f.meta.i64("head_dim"));
        if (dt == "f32") return run_dim<DType::F32>(f, opt, hd);
        if (dt == "f16") return run_dim<DType::F16>(f, opt, hd);
        if (dt == "bf16") return run_dim<DType::BF16>(f, opt, hd);
        throw std::runtime_error("dtype " + dt + ": expected f32, f16 or bf16");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 2;
    }
}
