//! What one EvoAttention call computes over: the batch, its chunks, the head shape, the
//! parameters, and which keys each query sees in each branch (SPEC section 3).
//!
//! The key sets are written here once, as iteration over index ranges; the reference uses them
//! directly and the GPU kernels implement the same ranges. Nothing here builds a `T x T` mask.

use std::ops::Range;

use crate::batch::JaggedBatch;
use crate::chunking::Chunks;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::temporal::RelTemporal;

/// Head dimensions the kernels are built for.
pub const SUPPORTED_HEAD_DIMS: &[usize] = &[32, 64, 128];

/// Number of branches; gates and LSE have this many entries per `(token, head)`.
pub const NUM_BRANCHES: usize = 3;

/// The three branches, in the order of the gates and LSE entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Branch {
    /// Chunk summaries: global interests.
    Global = 0,
    /// Tail tokens of chunks: interest transitions.
    Transition = 1,
    /// Sliding window plus the user token: short-term interests.
    Local = 2,
}

impl Branch {
    /// All branches in gate order.
    pub const ALL: [Branch; NUM_BRANCHES] = [Branch::Global, Branch::Transition, Branch::Local];
}

/// One key a query attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// A token of the batch (absolute index).
    Token(usize),
    /// The summary of a chunk (global chunk id): mean of its members' K and V.
    Summary(usize),
}

/// Heads and head dimension of Q, K, V and O (`[T, H, D]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// `H >= 1`.
    pub heads: usize,
    /// `D`, one of [`SUPPORTED_HEAD_DIMS`].
    pub head_dim: usize,
}

impl Dims {
    /// `T * H * D`: the length of Q, K, V and O for `tokens` tokens, or an error if it overflows.
    pub fn tensor_len(&self, tokens: usize) -> Result<usize> {
        self.len_per_token(tokens, self.head_dim)
    }

    /// `T * H * 3`: the length of gates and LSE for `tokens` tokens.
    pub fn branch_len(&self, tokens: usize) -> Result<usize> {
        self.len_per_token(tokens, NUM_BRANCHES)
    }

    /// `T * H * 3 * D`: the length of the per-branch outputs (`O_b` before gating) for `tokens`
    /// tokens.
    pub fn branch_out_len(&self, tokens: usize) -> Result<usize> {
        self.len_per_token(tokens, NUM_BRANCHES.saturating_mul(self.head_dim))
    }

    fn len_per_token(&self, tokens: usize, per_head: usize) -> Result<usize> {
        tokens
            .checked_mul(self.heads)
            .and_then(|x| x.checked_mul(per_head))
            .ok_or(Error::OutOfRange {
                field: "heads",
                value: self.heads.to_string(),
                expected: "T * H * D to fit in usize",
            })
    }

    /// Checks `H >= 1` and `D` supported.
    pub fn validate(&self) -> Result<()> {
        if self.heads == 0 {
            return Err(Error::Zero { field: "heads" });
        }
        if !SUPPORTED_HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::UnsupportedHeadDim {
                value: self.head_dim,
                supported: SUPPORTED_HEAD_DIMS,
            });
        }
        // Per-token lengths (H * D, H * 3, H * 3 * D) then never overflow, whatever T is.
        if self
            .heads
            .checked_mul(NUM_BRANCHES * self.head_dim)
            .is_none()
        {
            return Err(Error::OutOfRange {
                field: "heads",
                value: self.heads.to_string(),
                expected: "H * 3 * D to fit in usize",
            });
        }
        Ok(())
    }
}

/// Parameters of the attention itself (the number of chunks belongs to [`Chunks`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnConfig {
    /// `m >= 1`: tail tokens per chunk in the transition branch.
    pub tail_tokens: usize,
    /// `w >= 1`: local window length.
    pub window: usize,
    /// Bucket count and UTC offset of the bias.
    pub temporal: RelTemporal,
    /// Logit scale; `None` means `1 / sqrt(D)`.
    pub scale: Option<f32>,
}

impl AttnConfig {
    /// `m` tail tokens, window `w`, default bias parameters and scale.
    pub fn new(tail_tokens: usize, window: usize) -> Self {
        AttnConfig {
            tail_tokens,
            window,
            temporal: RelTemporal::default(),
            scale: None,
        }
    }
}

impl AttnConfig {
    /// Checks the parameters against `dims` (`m, w >= 1`, bias parameters, scale finite and
    /// positive) and returns the logit scale in effect.
    pub fn validate(&self, dims: Dims) -> Result<f64> {
        dims.validate()?;
        if self.tail_tokens == 0 {
            return Err(Error::Zero {
                field: "tail_tokens",
            });
        }
        if self.window == 0 {
            return Err(Error::Zero { field: "window" });
        }
        self.temporal.validate()?;
        match self.scale {
            None => Ok(1.0 / (dims.head_dim as f64).sqrt()),
            Some(s) if s.is_finite() && s > 0.0 => Ok(s as f64),
            Some(s) => Err(Error::OutOfRange {
                field: "scale",
                value: s.to_string(),
                expected: "a finite positive number",
            }),
        }
    }
}

/// A validated description of one attention call: batch, chunks, shape and parameters.
#[derive(Debug, Clone, Copy)]
pub struct EvoAttention<'a> {
    batch: &'a JaggedBatch,
    chunks: &'a Chunks,
    dims: Dims,
    config: AttnConfig,
    scale: f64,
}

impl<'a> EvoAttention<'a> {
    /// Validates that everything fits together: `H`, `D`, `m`, `w`, the bias parameters, the
    /// scale, and that `chunks` partition this batch's behaviors.
    pub fn new(
        batch: &'a JaggedBatch,
        chunks: &'a Chunks,
        dims: Dims,
        config: AttnConfig,
    ) -> Result<Self> {
        let scale = config.validate(dims)?;
        // Every tensor of the call must be addressable; then no length below can overflow.
        dims.tensor_len(batch.num_tokens())?;
        dims.branch_len(batch.num_tokens())?;
        chunks
            .num_chunks()
            .checked_mul(dims.heads * dims.head_dim)
            .ok_or(Error::OutOfRange {
                field: "heads",
                value: dims.heads.to_string(),
                expected: "C * H * D to fit in usize",
            })?;
        chunks.check_matches(batch)?;
        Ok(EvoAttention {
            batch,
            chunks,
            dims,
            config,
            scale,
        })
    }

    /// The batch.
    pub fn batch(&self) -> &'a JaggedBatch {
        self.batch
    }

    /// The chunks.
    pub fn chunks(&self) -> &'a Chunks {
        self.chunks
    }

    /// Heads and head dimension.
    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// The parameters as given.
    pub fn config(&self) -> &AttnConfig {
        &self.config
    }

    /// The logit scale in effect.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Timestamp of a query token; `None` for the user token (it has no time).
    pub fn query_time(&self, seq: usize, q: usize) -> Option<i64> {
        (self.batch.seq(seq).user != Some(q)).then(|| self.batch.timestamps()[q])
    }

    /// Timestamp of a key: a token's own, or the chunk's last behavior for a summary; `None` for
    /// the user token.
    pub fn key_time(&self, seq: usize, key: Key) -> Option<i64> {
        let ts = self.batch.timestamps();
        match key {
            Key::Token(j) => (self.batch.seq(seq).user != Some(j)).then(|| ts[j]),
            Key::Summary(c) => Some(ts[self.chunks.last(c)]),
        }
    }

    /// Writes into `out` the keys that query token `q` of sequence `seq` sees in `branch`
    /// (SPEC section 3), in a fixed order. The user token sees nothing.
    pub fn keys(&self, seq: usize, q: usize, branch: Branch, out: &mut Vec<Key>) {
        out.clear();
        let span = self.batch.seq(seq);
        let behaviors = span.behaviors.clone();
        let is_candidate = span.candidates.contains(&q);
        if !is_candidate && !behaviors.contains(&q) {
            return;
        }
        // Behaviors at positions below this bound are in the query's past.
        let visible_end = if is_candidate { behaviors.end } else { q + 1 };
        let chunks = self.chunks;
        match branch {
            Branch::Global => {
                for c in chunks.of_seq(seq) {
                    if chunks.span(c).end > visible_end {
                        break;
                    }
                    out.push(Key::Summary(c));
                }
            }
            Branch::Transition => {
                for c in chunks.of_seq(seq) {
                    let tail = chunks.tail(c, self.config.tail_tokens);
                    if tail.start >= visible_end {
                        break;
                    }
                    out.extend((tail.start..tail.end.min(visible_end)).map(Key::Token));
                }
            }
            Branch::Local => {
                out.extend(span.user.map(Key::Token));
                let w = self.config.window;
                // A candidate stands where the next behavior would: it sees w - 1 behaviors.
                let first = if is_candidate {
                    (behaviors.end + 1).saturating_sub(w)
                } else {
                    (q + 1).saturating_sub(w)
                };
                out.extend((first.max(behaviors.start)..visible_end).map(Key::Token));
                if is_candidate {
                    out.push(Key::Token(q));
                }
            }
        }
    }

    /// The queries whose key set in `branch` contains `key` (the inverse of
    /// [`keys`](Self::keys)), as two ranges of absolute token indices: behaviors, then
    /// candidates. The GPU backward gathers each key's gradient over exactly these queries.
    pub fn queries(&self, seq: usize, key: Key, branch: Branch) -> [Range<usize>; 2] {
        let span = self.batch.seq(seq);
        let (b, c) = (span.behaviors.clone(), span.candidates.clone());
        let none = [0..0, 0..0];
        let w = self.config.window;
        match (branch, key) {
            // A summary is seen from its chunk's last behavior on, and by every candidate.
            (Branch::Global, Key::Summary(k)) => [self.chunks.last(k)..b.end, c],
            (Branch::Transition, Key::Token(j)) if b.contains(&j) => {
                let k = self.chunk_of(seq, j);
                if self.chunks.tail(k, self.config.tail_tokens).contains(&j) {
                    [j..b.end, c]
                } else {
                    none
                }
            }
            (Branch::Local, Key::Token(j)) if span.user == Some(j) => [b, c],
            (Branch::Local, Key::Token(j)) if b.contains(&j) => {
                // Candidates see the last w - 1 behaviors.
                let end = j.saturating_add(w); // w may be any positive usize
                let cands = if end > b.end { c } else { 0..0 };
                [j..end.min(b.end), cands]
            }
            (Branch::Local, Key::Token(j)) if c.contains(&j) => [j..j + 1, 0..0],
            _ => none,
        }
    }

    /// The chunk (global id) holding behavior `j` of sequence `seq`.
    pub fn chunk_of(&self, seq: usize, j: usize) -> usize {
        let ids = self.chunks.of_seq(seq);
        let first = ids.start;
        first + ids.take_while(|&k| self.chunks.span(k).end <= j).count()
    }

    /// Writes into `out` the keys of the dense counterpart (SPEC section 5): the user token and
    /// every behavior up to the query; a candidate sees all behaviors and itself. The user token
    /// as a query sees itself *(decided: causal attention's diagonal)*.
    pub fn dense_keys(&self, seq: usize, q: usize, out: &mut Vec<Key>) {
        out.clear();
        let span = self.batch.seq(seq);
        if span.user == Some(q) {
            out.push(Key::Token(q));
            return;
        }
        out.extend(span.user.map(Key::Token));
        let is_candidate = span.candidates.contains(&q);
        let visible_end = if is_candidate {
            span.behaviors.end
        } else {
            q + 1
        };
        out.extend((span.behaviors.start..visible_end).map(Key::Token));
        if is_candidate {
            out.push(Key::Token(q));
        }
    }
}

/// Per-branch gates `[T, H, 3]`, in the input dtype or f32.
#[derive(Debug, Clone, Copy)]
pub enum Gates<'a, T> {
    /// Same dtype as Q.
    Native(&'a [T]),
    /// f32 gates.
    F32(&'a [f32]),
}

impl<T: Element> Gates<'_, T> {
    fn len(&self) -> usize {
        match self {
            Gates::Native(g) => g.len(),
            Gates::F32(g) => g.len(),
        }
    }

    fn to_f64(self) -> Vec<f64> {
        match self {
            Gates::Native(g) => crate::dtype::to_f64_vec(g),
            Gates::F32(g) => crate::dtype::to_f64_vec(g),
        }
    }
}

/// The tensors of one call, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a, T> {
    /// `[T, H, D]` queries.
    pub q: &'a [T],
    /// `[T, H, D]` keys.
    pub k: &'a [T],
    /// `[T, H, D]` values.
    pub v: &'a [T],
    /// `[H, 3]` f32 RelTemporal coefficients `(s1, s2, s3)` per head.
    pub coeffs: &'a [f32],
    /// `[T, H, 3]` gates; `None` means all ones.
    pub gates: Option<Gates<'a, T>>,
}

/// Checks a tensor's length against its expected shape.
pub(crate) fn check_len(field: &'static str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return Err(Error::Length {
            field,
            len,
            expected,
        });
    }
    Ok(())
}

/// Checks the lengths of `[q, k, v]` (`[T, H, D]`), coeffs (`[H, 3]`) and gates (`[T, H, 3]`).
pub(crate) fn check_shapes(
    attn: &EvoAttention<'_>,
    qkv_lens: [usize; 3],
    coeffs_len: usize,
    gates_len: Option<usize>,
) -> Result<()> {
    // EvoAttention::new checked that these products fit.
    let t = attn.batch().num_tokens();
    let dims = attn.dims();
    for (field, len) in ["q", "k", "v"].into_iter().zip(qkv_lens) {
        check_len(field, len, dims.tensor_len(t)?)?;
    }
    check_len("coeffs", coeffs_len, dims.branch_len(1)?)?;
    if let Some(len) = gates_len {
        check_len("gates", len, dims.branch_len(t)?)?;
    }
    Ok(())
}

/// Checks that every coefficient is finite (a NaN coefficient would poison whole heads).
pub(crate) fn check_coeffs<C: Copy + Into<f64>>(coeffs: &[C]) -> Result<()> {
    if let Some((index, c)) = coeffs
        .iter()
        .map(|&c| c.into())
        .enumerate()
        .find(|(_, c): &(usize, f64)| !c.is_finite())
    {
        return Err(Error::OutOfRange {
            field: "coeffs",
            value: format!("{c} at index {index}"),
            expected: "finite values",
        });
    }
    Ok(())
}

impl<T: Element> Inputs<'_, T> {
    /// Checks every tensor's length against `attn` and that the coefficients are finite.
    pub fn validate(&self, attn: &EvoAttention<'_>) -> Result<()> {
        let lens = [self.q.len(), self.k.len(), self.v.len()];
        check_shapes(attn, lens, self.coeffs.len(), self.gates.map(|g| g.len()))?;
        check_coeffs(self.coeffs)
    }

    /// Validates and widens to f64, the form the reference computes in.
    pub fn widen(&self, attn: &EvoAttention<'_>) -> Result<Widened> {
        self.validate(attn)?;
        Ok(Widened {
            q: crate::dtype::to_f64_vec(self.q),
            k: crate::dtype::to_f64_vec(self.k),
            v: crate::dtype::to_f64_vec(self.v),
            coeffs: crate::dtype::to_f64_vec(self.coeffs),
            gates: self.gates.map(|g| g.to_f64()),
        })
    }
}

/// Inputs widened to f64 (owned). Finite-difference tests perturb these directly.
#[derive(Debug, Clone, PartialEq)]
pub struct Widened {
    /// `[T, H, D]`.
    pub q: Vec<f64>,
    /// `[T, H, D]`.
    pub k: Vec<f64>,
    /// `[T, H, D]`.
    pub v: Vec<f64>,
    /// `[H, 3]`.
    pub coeffs: Vec<f64>,
    /// `[T, H, 3]`, `None` = all ones.
    pub gates: Option<Vec<f64>>,
}

impl Widened {
    /// Checks every tensor's length against `attn` and that the coefficients are finite.
    pub fn validate(&self, attn: &EvoAttention<'_>) -> Result<()> {
        let lens = [self.q.len(), self.k.len(), self.v.len()];
        check_shapes(
            attn,
            lens,
            self.coeffs.len(),
            self.gates.as_ref().map(Vec::len),
        )?;
        check_coeffs(&self.coeffs)
    }
}
