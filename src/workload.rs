//! Realistic synthetic workloads (`BENCH.md`), shared by the example, tests and benches.
//!
//! Each user's behaviors come in sessions: gaps of seconds to minutes inside a session (some of
//! them zero: simultaneous behaviors), hours to days between sessions, a history spanning a week to
//! a year that crosses weekdays and weekends. Lengths are jagged, uniform in `[0.75 n, n]`;
//! candidates carry the request time. Everything is deterministic from a seed.

use crate::attention::{AttnConfig, Dims};
use crate::batch::JaggedBatch;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::temporal::DAY;

/// A small deterministic generator (xoshiro256**, seeded through splitmix64). Hand-written so that
/// a seed gives the same workload whatever the versions of other crates.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose stream depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// 64 uniform bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `[lo, hi]` (inclusive); `lo` if `hi < lo`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        match (hi - lo).checked_add(1) {
            Some(span) => lo + self.next_u64() % span,
            None => self.next_u64(), // [0, u64::MAX]: every value
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Exponential with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform()).ln()
    }

    /// Log-uniform in `[lo, hi]`.
    pub fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + self.uniform() * (hi.ln() - lo.ln())).exp()
    }
}

/// One row of the workload table in `BENCH.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Name as in BENCH.md.
    pub name: &'static str,
    /// `H`.
    pub heads: usize,
    /// `D`.
    pub head_dim: usize,
    /// `P`.
    pub num_chunks: usize,
    /// `m`.
    pub tail_tokens: usize,
    /// `w`.
    pub window: usize,
    /// Candidates per user.
    pub candidates: usize,
}

/// `ctr-small`: H 4, D 32, P 16, m 1, w 32, 16 candidates.
pub const CTR_SMALL: Workload = Workload {
    name: "ctr-small",
    heads: 4,
    head_dim: 32,
    num_chunks: 16,
    tail_tokens: 1,
    window: 32,
    candidates: 16,
};

/// `ctr-base`: H 8, D 64, P 32, m 2, w 64, 32 candidates.
pub const CTR_BASE: Workload = Workload {
    name: "ctr-base",
    heads: 8,
    head_dim: 64,
    num_chunks: 32,
    tail_tokens: 2,
    window: 64,
    candidates: 32,
};

/// `ctr-wide`: H 8, D 128, P 32, m 2, w 128, 32 candidates.
pub const CTR_WIDE: Workload = Workload {
    name: "ctr-wide",
    heads: 8,
    head_dim: 128,
    num_chunks: 32,
    tail_tokens: 2,
    window: 128,
    candidates: 32,
};

/// The workloads of BENCH.md.
pub const WORKLOADS: [Workload; 3] = [CTR_SMALL, CTR_BASE, CTR_WIDE];

impl Workload {
    /// Looks a workload up by its BENCH.md name.
    pub fn by_name(name: &str) -> Option<Workload> {
        WORKLOADS.into_iter().find(|w| w.name == name)
    }

    /// Heads and head dimension.
    pub fn dims(&self) -> Dims {
        Dims {
            heads: self.heads,
            head_dim: self.head_dim,
        }
    }

    /// `m`, `w` and default bias parameters.
    pub fn config(&self) -> AttnConfig {
        AttnConfig::new(self.tail_tokens, self.window)
    }

    /// A batch of about `total_tokens` tokens: `B = max(1, total_tokens / n)` users (BENCH.md),
    /// each with `[0.75 n, n]` behaviors, a user token and this workload's candidates.
    pub fn batch(&self, seed: u64, behaviors: usize, total_tokens: usize) -> Result<JaggedBatch> {
        let num_seqs = (total_tokens / behaviors.max(1)).max(1);
        generate_batch(
            &mut Rng::new(seed),
            num_seqs,
            behaviors,
            self.candidates,
            true,
        )
    }
}

/// Around 2026-06-01: histories end near this time.
const NOW: i64 = 1_780_272_000;

/// A realistic history of `n` behavior timestamps ending before `request_time`.
pub fn user_history(rng: &mut Rng, n: usize, request_time: i64) -> Vec<i64> {
    if n == 0 {
        return Vec::new();
    }
    // Sessions of geometric length (mean 12), seconds-to-minutes gaps inside them.
    let mut in_session_gaps = Vec::with_capacity(n);
    let mut between: Vec<(usize, f64)> = Vec::new();
    for i in 1..n {
        if rng.chance(1.0 / 12.0) {
            between.push((i, rng.log_uniform(3600.0, 7.0 * DAY as f64)));
            in_session_gaps.push(0.0);
        } else if rng.chance(0.1) {
            in_session_gaps.push(0.0); // simultaneous behaviors
        } else {
            in_session_gaps.push(rng.exponential(40.0).round());
        }
    }
    // Squeeze the between-session gaps so the history spans at most its budget (a week to a year).
    let budget = rng.log_uniform(7.0 * DAY as f64, 365.0 * DAY as f64);
    let total: f64 = between.iter().map(|b| b.1).sum();
    let squeeze = if total > budget { budget / total } else { 1.0 };
    for &(i, gap) in &between {
        in_session_gaps[i - 1] += (gap * squeeze).round().max(1.0);
    }
    let mut t = vec![0i64; n];
    for i in 1..n {
        t[i] = t[i - 1] + in_session_gaps[i - 1] as i64;
    }
    let until_request = rng.exponential(2.0 * 3600.0).round() as i64 + 1;
    let shift = request_time - until_request - t[n - 1];
    t.iter().map(|x| x + shift).collect()
}

/// A jagged batch of `num_seqs` users with `[0.75 n, n]` behaviors each and `candidates`
/// candidates at the request time. At most `i32::MAX` tokens in all:
/// `num_seqs * (1 + behaviors + candidates)` above that is an [`Error::OutOfRange`] (the GPU
/// path takes at most [`GPU_MAX_TOKENS`](crate::cuda::GPU_MAX_TOKENS), `2^30 - 64`).
pub fn generate_batch(
    rng: &mut Rng,
    num_seqs: usize,
    behaviors: usize,
    candidates: usize,
    has_user_token: bool,
) -> Result<JaggedBatch> {
    let most = behaviors
        .checked_add(candidates)
        .and_then(|n| n.checked_add(1))
        .and_then(|n| n.checked_mul(num_seqs));
    if most.is_none_or(|n| n > i32::MAX as usize) {
        return Err(Error::OutOfRange {
            field: "behaviors",
            value: format!("{behaviors} (with {num_seqs} sequences, {candidates} candidates each)"),
            expected: "num_seqs * (1 + behaviors + candidates) at most i32::MAX tokens",
        });
    }
    let mut offsets = vec![0usize];
    let mut timestamps = Vec::new();
    let lo = (3 * behaviors).div_ceil(4) as u64;
    for _ in 0..num_seqs {
        let n = rng.range(lo, behaviors as u64) as usize;
        let request_time = NOW + rng.range(0, 30 * DAY as u64) as i64;
        if has_user_token {
            timestamps.push(request_time); // ignored by the attention
        }
        timestamps.extend(user_history(rng, n, request_time));
        timestamps.extend(std::iter::repeat_n(request_time, candidates));
        offsets.push(timestamps.len());
    }
    JaggedBatch::new(
        offsets,
        vec![candidates; num_seqs],
        has_user_token,
        timestamps,
    )
}

/// `len` values drawn from `N(0, std^2)` and rounded to `T`.
pub fn random_tensor<T: Element>(rng: &mut Rng, len: usize, std: f64) -> Vec<T> {
    (0..len).map(|_| T::from_f64(std * rng.normal())).collect()
}

/// `len` values uniform in `[lo, hi)`, rounded to `T`.
pub fn uniform_tensor<T: Element>(rng: &mut Rng, len: usize, lo: f64, hi: f64) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f64(lo + (hi - lo) * rng.uniform()))
        .collect()
}
