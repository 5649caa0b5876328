// What would dQ of the local branch cost if the key side added it by atomics, as FlashAttention
// does? (benches/results/nvidia-h100-80gb-hbm3-notes.md, session 40: the estimate hangs on the
// L2's f32 reduction rate, which no run had measured.) This times f32 `red.global.add` into a
// [T, H, D] buffer the shape of ctr-base's dQ (H = 8, D = 64, T = 2^20 by default: 2.1 GB), one
// warp adding a 16-row x 64-column tile of one head at a time, each tile R times, against a plain
// store of the same tiles and a device copy, in one run.
//
//   nvcc -O3 -arch=sm_90 -o red-rate scripts/red-rate.cu && ./red-rate [tokens]
//   (scripts/gpu-run.sh STEPS=red does this on a GPU host)
//
// Patterns, per warp and tile (the instructions a key-side warp would issue):
//   store    st.global.v4.f32, two 256-byte rows a warp instruction (the floor: writing dQ once)
//   red.v4   red.global.v4.f32.add, the same addresses (sm_90; dQ staged through shared memory)
//   red.f32  red.global.add.f32, one 128-byte half row a warp instruction
//   red.frag red.global.v2.f32.add in the m16n8 C fragment layout (lane (g, t): rows g and g + 8,
//            columns 8n + 2t, 2t + 1): dQ straight from the MMA's accumulators, 8 rows x 32 bytes
//            a warp instruction
// and two orders of the R additions to a tile: `spread` (the R passes over the buffer one after
// another: a tile's adds far apart in time, as different key blocks would make them) and `close`
// (a tile's R adds by neighbouring warps: contention on the same lines).
//
// Every element must end equal to R (each add is 1.0f, exact in f32): the run checks a sample and
// says FAIL otherwise. Times are medians of 5 after a warm-up, CUDA events, the buffer zeroed
// before each repetition (not timed).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kHeads = 8;
constexpr int kHeadDim = 64;
constexpr int kRows = 16;
constexpr int kWarpsPerBlock = 8;

enum Pattern { kStore, kRedV4, kRedF32, kRedFrag };
const char* const kPatternNames[] = {"store", "red.v4", "red.f32", "red.frag"};

__device__ __forceinline__ void red_v4(float* a, float x) {
    asm volatile("red.global.v4.f32.add [%0], {%1, %1, %1, %1};" ::"l"(a), "f"(x) : "memory");
}

__device__ __forceinline__ void red_v2(float* a, float x) {
    asm volatile("red.global.v2.f32.add [%0], {%1, %1};" ::"l"(a), "f"(x) : "memory");
}

__device__ __forceinline__ void red_f32(float* a, float x) {
    asm volatile("red.global.add.f32 [%0], %1;" ::"l"(a), "f"(x) : "memory");
}

// Warp task w of tiles * kHeads * reps: which tile and head it adds to.
template <Pattern kPattern>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) add_tiles(float* dq, long long tiles, int reps,
                                                                  bool close) {
    const int lane = threadIdx.x % 32;
    const long long tasks = tiles * kHeads * reps;
    const long long warps = static_cast<long long>(gridDim.x) * kWarpsPerBlock;
    const float one = 1.0f;
    for (long long w = blockIdx.x * static_cast<long long>(kWarpsPerBlock) + threadIdx.x / 32; w < tasks;
         w += warps) {
        const long long tile_head = close ? w / reps : w % (tiles * kHeads);
        const long long tile = tile_head / kHeads;
        const int head = static_cast<int>(tile_head % kHeads);
        // Element (r, c) of the tile: dq[((tile * 16 + r) * H + head) * D + c].
        float* base = dq + (tile * kRows * kHeads + head) * kHeadDim;
        auto at = [&](int r, int c) { return base + static_cast<long long>(r) * kHeads * kHeadDim + c; };
        if constexpr (kPattern == kStore || kPattern == kRedV4) {
            const int r0 = lane / 16, c = 4 * (lane % 16);
#pragma unroll
            for (int i = 0; i < kRows / 2; ++i) {
                float* a = at(r0 + 2 * i, c);
                if constexpr (kPattern == kStore)
                    *reinterpret_cast<float4*>(a) = make_float4(one, one, one, one);
                else
                    red_v4(a, one);
            }
        } else if constexpr (kPattern == kRedF32) {
#pragma unroll 8
            for (int i = 0; i < kRows * 2; ++i) red_f32(at(i / 2, 32 * (i % 2) + lane), one);
        } else {
            const int g = lane / 4, t = lane % 4;
#pragma unroll
            for (int n = 0; n < kHeadDim / 8; ++n) {
                red_v2(at(g, 8 * n + 2 * t), one);
                red_v2(at(g + 8, 8 * n + 2 * t), one);
            }
        }
    }
}

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
        std::exit(1);
    }
}

float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
    const long long tokens = argc > 1 ? std::atoll(argv[1]) : (1LL << 20);
    if (tokens <= 0 || tokens % kRows != 0) {
        std::fprintf(stderr, "tokens must be a positive multiple of %d\n", kRows);
        return 1;
    }
    const long long tiles = tokens / kRows;
    const long long elems = tokens * kHeads * kHeadDim;
    const double bytes = static_cast<double>(elems) * sizeof(float);
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    int driver = 0;
    cudaDriverGetVersion(&driver);
    std::printf("device %s, %d SMs, driver API %d; dQ [%lld, %d, %d] f32: %.3f GB\n", prop.name,
                prop.multiProcessorCount, driver, tokens, kHeads, kHeadDim, bytes / 1e9);

    float *dq = nullptr, *copy = nullptr;
    check(cudaMalloc(&dq, elems * sizeof(float)), "cudaMalloc dq");
    check(cudaMalloc(&copy, elems * sizeof(float)), "cudaMalloc copy");
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);

    // Device copy, as BENCH.md's bandwidth reference (read + write counted).
    {
        check(cudaMemset(copy, 0, elems * sizeof(float)), "cudaMemset");
        std::vector<float> ms;
        for (int rep = 0; rep < 6; ++rep) {
            cudaEventRecord(start);
            cudaMemcpy(dq, copy, elems * sizeof(float), cudaMemcpyDeviceToDevice);
            cudaEventRecord(stop);
            check(cudaEventSynchronize(stop), "copy");
            float t = 0;
            cudaEventElapsedTime(&t, start, stop);
            if (rep > 0) ms.push_back(t);
        }
        const float m = median(ms);
        std::printf("copy      %8.3f ms  %7.1f GB/s (read + write)\n", m, 2 * bytes / m / 1e6);
    }

    int blocks_per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, add_tiles<kRedV4>, kWarpsPerBlock * 32, 0);
    const int grid = prop.multiProcessorCount * std::max(blocks_per_sm, 1);
    std::vector<float> host(1 << 20);
    bool all_ok = true;
    std::printf("%-9s %-6s %2s %9s %10s %14s %s\n", "pattern", "order", "R", "ms", "GB/s", "ms per dQ add",
                "check");
    for (int p = kStore; p <= kRedFrag; ++p) {
        for (int reps : {1, 2, 5}) {
            for (int close = 0; close < 2; ++close) {
                if ((p == kStore && reps > 1) || (reps == 1 && close)) continue;
                std::vector<float> ms;
                for (int rep = 0; rep < 6; ++rep) {
                    check(cudaMemset(dq, 0, elems * sizeof(float)), "cudaMemset");
                    cudaEventRecord(start);
                    switch (p) {
                        case kStore: add_tiles<kStore><<<grid, kWarpsPerBlock * 32>>>(dq, tiles, reps, close); break;
                        case kRedV4: add_tiles<kRedV4><<<grid, kWarpsPerBlock * 32>>>(dq, tiles, reps, close); break;
                        case kRedF32: add_tiles<kRedF32><<<grid, kWarpsPerBlock * 32>>>(dq, tiles, reps, close); break;
                        default: add_tiles<kRedFrag><<<grid, kWarpsPerBlock * 32>>>(dq, tiles, reps, close); break;
                    }
                    cudaEventRecord(stop);
                    check(cudaEventSynchronize(stop), kPatternNames[p]);
                    float t = 0;
                    cudaEventElapsedTime(&t, start, stop);
                    if (rep > 0) ms.push_back(t);
                }
                // Every element of a strided sample must be R (1 for the store).
                const long long stride = std::max(1LL, elems / static_cast<long long>(host.size()));
                check(cudaMemcpy2D(host.data(), sizeof(float), dq, stride * sizeof(float), sizeof(float),
                                   std::min<long long>(host.size(), elems / stride), cudaMemcpyDeviceToHost),
                      "cudaMemcpy2D");
                const float want = p == kStore ? 1.0f : static_cast<float>(reps);
                long long bad = 0;
                for (long long i = 0; i < std::min<long long>(host.size(), elems / stride); ++i)
                    bad += host[i] != want;
                all_ok = all_ok && bad == 0;
                const float m = median(ms);
                const double added = bytes * (p == kStore ? 1 : reps);
                std::printf("%-9s %-6s %2d %9.3f %10.1f %14.3f %s\n", kPatternNames[p], close ? "close" : "spread",
                            reps, m, added / m / 1e6, m / (p == kStore ? 1 : reps),
                            bad == 0 ? "ok" : "FAIL");
            }
        }
    }
    cudaFree(dq);
    cudaFree(copy);
    std::printf("%s\n", all_ok ? "all sums correct" : "FAIL: some sums wrong");
    return all_ok ? 0 : 1;
}
