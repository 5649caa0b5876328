//! CPU benches: personalized time-aware chunking at BENCH.md scale, and the f64 reference forward,
//! sparse and dense, at a small size (what a reference check costs).
//!
//! ```text
//! cargo bench --bench chunking
//! ```
//!
//! Target (chunking issue): 2^20 tokens of jagged sequences of about 4096 behaviors, P = 32, in
//! under 50 ms on one core. `Chunks::personalized` is single-threaded, so this measures one core.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use sparsectr_attn::workload::{self, Rng, CTR_BASE, CTR_SMALL};
use sparsectr_attn::{reference, Chunks, EvoAttention, Gates, Inputs, NUM_BRANCHES};

const SEED: u64 = 0x00C4_BEAC;

/// ctr-base at n = 4096, P = 32, on at least 2^20 tokens: BENCH.md's `B = 2^20 / n` gives about
/// 0.88 * 2^20 tokens (lengths are uniform in [0.75 n, n]), so users are added until the batch
/// holds 2^20.
fn chunking(c: &mut Criterion) {
    let n = 4096;
    let per_user = (7 * n) / 8 + 1 + CTR_BASE.candidates; // mean tokens of one user
    let users = (1usize << 20).div_ceil(per_user) + 8;
    let batch = workload::generate_batch(&mut Rng::new(SEED), users, n, CTR_BASE.candidates, true)
        .expect("the workload generator builds a valid batch");
    assert!(
        batch.num_tokens() >= 1 << 20,
        "{} tokens",
        batch.num_tokens()
    );
    let mut group = c.benchmark_group("chunking");
    group.throughput(Throughput::Elements(batch.num_tokens() as u64));
    let id = format!(
        "personalized/{}/n={n}/B={}/T={}/P={}",
        CTR_BASE.name,
        batch.num_seqs(),
        batch.num_tokens(),
        CTR_BASE.num_chunks
    );
    group.bench_function(id, |b| {
        b.iter(|| Chunks::personalized(black_box(&batch), black_box(CTR_BASE.num_chunks)))
    });
    group.finish();
}

/// The f64 reference forwards, sparse and dense, bf16 inputs, ctr-small at n = 256 and 4096
/// requested tokens.
fn reference_forward(c: &mut Criterion) {
    let wl = CTR_SMALL;
    let n = 256;
    let batch = wl
        .batch(SEED, n, 4096)
        .expect("the workload generator builds a valid batch");
    let chunks = Chunks::personalized(&batch, wl.num_chunks).expect("P >= 1");
    let attn = EvoAttention::new(&batch, &chunks, wl.dims(), wl.config())
        .expect("workload parameters are valid");
    let rows = batch.num_tokens() * wl.heads;
    let mut rng = Rng::new(SEED);
    let q: Vec<bf16> = workload::random_tensor(&mut rng, rows * wl.head_dim, 1.0);
    let k: Vec<bf16> = workload::random_tensor(&mut rng, rows * wl.head_dim, 1.0);
    let v: Vec<bf16> = workload::random_tensor(&mut rng, rows * wl.head_dim, 1.0);
    let gates: Vec<bf16> = workload::uniform_tensor(&mut rng, rows * NUM_BRANCHES, 0.5, 1.5);
    let coeffs: Vec<f32> = workload::random_tensor(&mut rng, wl.heads * 3, 0.3);
    let inputs = Inputs {
        q: &q,
        k: &k,
        v: &v,
        coeffs: &coeffs,
        gates: Some(Gates::Native(&gates)),
    };

    let mut group = c.benchmark_group("reference");
    // About 0.1 s (sparse) to 1 s (dense) an iteration: ten samples keep the group short.
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch.num_tokens() as u64));
    let id = |kind: &str| format!("{kind}/{}/bf16/n={n}/T={}", wl.name, batch.num_tokens());
    group.bench_function(id("forward"), |b| {
        b.iter(|| reference::forward(black_box(&attn), black_box(&inputs)))
    });
    group.bench_function(id("dense_forward"), |b| {
        b.iter(|| reference::dense_forward(black_box(&attn), black_box(&inputs)))
    });
    group.finish();
}

criterion_group!(benches, chunking, reference_forward);
criterion_main!(benches);
