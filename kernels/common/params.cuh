// The scalars of every launch, mirrored by `EvoParams` in src/cuda/params.rs. Buffers travel as
// separate kernel arguments so that cudarc tracks their reads and writes.
#pragma once

struct EvoParams {
    int num_seqs;
    int num_tokens;
    int heads;
    int max_chunks;        // P: stride of the per-sequence chunk arrays
    int tail_tokens;       // m
    int window;            // w
    int num_time_buckets;  // NB
    int gates_mode;        // kGatesNone, kGatesNative, kGatesF32
    float scale;
    int head_dim;
    int reserved[2];
};
static_assert(sizeof(EvoParams) == 48, "EvoParams must match src/cuda/params.rs");

// Values of EvoParams::gates_mode, mirrored by `GatesMode` in src/cuda/params.rs.
enum GatesMode : int { kGatesNone = 0, kGatesNative = 1, kGatesF32 = 2 };

enum : int { kNumBranches = 3 };

// Where one sequence sits in the packed batch (absolute token indices), as uploaded by the host.
struct SeqInfo {
    int start;       // first token (the user token when there is one)
    int behaviors;   // first behavior
    int candidates;  // first candidate
    int end;         // one past the last token
};
static_assert(sizeof(SeqInfo) == 16, "SeqInfo must match src/cuda/batch.rs");
