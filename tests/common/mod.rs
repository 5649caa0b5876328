//! Strategies for awkward jagged batches, shared by the property tests.
#![allow(dead_code)] // each test binary uses its own subset

pub mod gpu;

use proptest::prelude::*;
use sparsectr_attn::workload::{random_tensor, Rng};
use sparsectr_attn::{JaggedBatch, Widened, NUM_BRANCHES};

/// One sequence before packing: behavior gaps, candidate count, and offsets of the candidates'
/// request time after the last behavior (negative: before it, which SPEC allows, so candidates
/// see keys later than themselves).
#[derive(Debug, Clone)]
pub struct SeqPlan {
    pub gaps: Vec<i64>,
    pub num_behaviors: usize,
    pub num_candidates: usize,
    pub request_delay: i64,
    pub start: i64,
}

/// Gaps drawn so that ties and simultaneous behaviors are common: zero, a few repeated small
/// values, hours and days, and any value up to a week.
pub fn gap() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => Just(0i64),
        2 => Just(5i64),
        2 => Just(60i64),
        1 => Just(86_400i64),
        1 => Just(3 * 3600i64),
        3 => 0i64..604_800,
    ]
}

/// A sequence of `0..=max_behaviors` behaviors and `0..=max_candidates` candidates, starting
/// anywhere in 1970..2100 (negative Unix times included, to exercise floor division).
pub fn seq_plan(max_behaviors: usize, max_candidates: usize) -> impl Strategy<Value = SeqPlan> {
    (
        0..=max_behaviors,
        0..=max_candidates,
        proptest::collection::vec(gap(), max_behaviors),
        -200_000i64..200_000,
        -100_000_000i64..4_000_000_000,
    )
        .prop_map(|(n, k, gaps, request_delay, start)| SeqPlan {
            gaps,
            num_behaviors: n,
            num_candidates: k,
            request_delay,
            start,
        })
}

/// Packs sequence plans into a batch.
pub fn pack(plans: &[SeqPlan], has_user_token: bool) -> JaggedBatch {
    let mut offsets = vec![0usize];
    let mut ts = Vec::new();
    for p in plans {
        if has_user_token {
            ts.push(i64::MIN); // ignored; an absurd value makes misuse visible
        }
        let mut t = p.start;
        for i in 0..p.num_behaviors {
            if i > 0 {
                t += p.gaps[i - 1];
            }
            ts.push(t);
        }
        let request = t + p.request_delay;
        ts.extend(std::iter::repeat_n(request, p.num_candidates));
        offsets.push(ts.len());
    }
    let cands = plans.iter().map(|p| p.num_candidates).collect();
    JaggedBatch::new(offsets, cands, has_user_token, ts).expect("strategy builds valid batches")
}

/// A random valid batch of `0..=max_seqs` sequences.
pub fn batch(
    max_seqs: usize,
    max_behaviors: usize,
    max_candidates: usize,
) -> impl Strategy<Value = JaggedBatch> {
    (
        proptest::collection::vec(seq_plan(max_behaviors, max_candidates), 0..=max_seqs),
        any::<bool>(),
    )
        .prop_map(|(plans, user)| pack(&plans, user))
}

/// [`batch`] with at least one token: for the GPU property tests, where an empty batch launches
/// nothing and would only use up a case (the empty batch has a test of its own).
pub fn nonempty_batch(
    max_seqs: usize,
    max_behaviors: usize,
    max_candidates: usize,
) -> impl Strategy<Value = JaggedBatch> {
    batch(max_seqs, max_behaviors, max_candidates).prop_filter("a token", |b| b.num_tokens() > 0)
}

/// Random f64 inputs for `t` tokens (never zeros): Q, K, V ~ N(0, 1), coefficients ~ N(0, 1),
/// gates uniform in [-0.5, 1.5] when asked for.
pub fn widened(seed: u64, t: usize, heads: usize, d: usize, gates: bool) -> Widened {
    let mut rng = Rng::new(seed);
    let n = t * heads * d;
    Widened {
        q: random_tensor(&mut rng, n, 1.0),
        k: random_tensor(&mut rng, n, 1.0),
        v: random_tensor(&mut rng, n, 1.0),
        coeffs: random_tensor(&mut rng, heads * 3, 1.0),
        gates: gates.then(|| {
            (0..t * heads * NUM_BRANCHES)
                .map(|_| rng.uniform() * 2.0 - 0.5)
                .collect()
        }),
    }
}
