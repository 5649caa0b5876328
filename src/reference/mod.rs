//! The f64 CPU reference: plain loops that read like SPEC.md and define the function every kernel
//! must match.
//!
//! Cost is `O(T * H * (P + m*P + w) * D)`: each query visits its key set per branch (see
//! [`EvoAttention::keys`]); no `T x T` mask exists anywhere.
//!
//! Inputs of any [`Element`](crate::Element) type are widened to f64 first ([`Widened`]); the
//! `*_f64` functions take widened inputs directly so that finite-difference checks can perturb
//! them.

mod dense;
mod sparse;

pub use dense::{
    dense_backward, dense_backward_f64, dense_forward, dense_forward_f64, DenseForward,
};
pub use sparse::{backward, backward_f64, forward, forward_f64, Forward};

use crate::attention::{EvoAttention, Key, Widened};

/// Gradients of a loss with respect to the inputs (f64). Shapes follow the inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// `[T, H, D]`.
    pub dq: Vec<f64>,
    /// `[T, H, D]`.
    pub dk: Vec<f64>,
    /// `[T, H, D]`.
    pub dv: Vec<f64>,
    /// `[H, 3]`.
    pub dcoeffs: Vec<f64>,
    /// `[T, H, 3]` (gradient of the gates, or of implicit all-one gates when none were given).
    /// Empty for the dense counterpart, which has no gates.
    pub dgates: Vec<f64>,
}

/// Widened inputs plus the chunk summaries `Kbar`, `Vbar` (`[C, H, D]`, means over members).
struct Operands<'x> {
    attn: &'x EvoAttention<'x>,
    inp: &'x Widened,
    kbar: Vec<f64>,
    vbar: Vec<f64>,
}

impl<'x> Operands<'x> {
    fn new(attn: &'x EvoAttention<'x>, inp: &'x Widened) -> Self {
        let chunks = attn.chunks();
        let hd = attn.dims().heads * attn.dims().head_dim;
        let mut kbar = vec![0.0; chunks.num_chunks() * hd];
        let mut vbar = vec![0.0; chunks.num_chunks() * hd];
        for c in 0..chunks.num_chunks() {
            let span = chunks.span(c);
            let inv = 1.0 / span.len() as f64;
            for j in span {
                for x in 0..hd {
                    kbar[c * hd + x] += inp.k[j * hd + x] * inv;
                    vbar[c * hd + x] += inp.v[j * hd + x] * inv;
                }
            }
        }
        Operands {
            attn,
            inp,
            kbar,
            vbar,
        }
    }

    fn row(&self, index: usize, h: usize) -> std::ops::Range<usize> {
        let d = self.attn.dims().head_dim;
        let start = (index * self.attn.dims().heads + h) * d;
        start..start + d
    }

    fn q(&self, t: usize, h: usize) -> &[f64] {
        &self.inp.q[self.row(t, h)]
    }

    /// `(K, V)` rows of a key for head `h`.
    fn kv(&self, key: Key, h: usize) -> (&[f64], &[f64]) {
        match key {
            Key::Token(j) => (&self.inp.k[self.row(j, h)], &self.inp.v[self.row(j, h)]),
            Key::Summary(c) => (&self.kbar[self.row(c, h)], &self.vbar[self.row(c, h)]),
        }
    }

    fn coeffs(&self, h: usize) -> [f64; 3] {
        let c = &self.inp.coeffs[h * 3..h * 3 + 3];
        [c[0], c[1], c[2]]
    }

    /// Logits `z_j = scale <Q_q, K_j> + bias_h(q, j)` of query `q`, head `h`, over `set`,
    /// written into `z`.
    fn logits(&self, q: usize, h: usize, set: &KeySet, z: &mut Vec<f64>) {
        let s = self.coeffs(h);
        let qrow = self.q(q, h);
        z.clear();
        for (&key, f) in set.keys.iter().zip(&set.feats) {
            let (krow, _) = self.kv(key, h);
            z.push(self.attn.scale() * dot(qrow, krow) + s[0] * f[0] + s[1] * f[1] + s[2] * f[2]);
        }
    }

    /// One softmax over `set`: writes `O = sum_j softmax(z)_j V_j` into `o` and returns
    /// `LSE = log sum_j exp z_j`. An empty key set gives `O = 0`, `LSE = -inf`. `z` is scratch.
    fn attend(&self, q: usize, h: usize, set: &KeySet, z: &mut Vec<f64>, o: &mut [f64]) -> f64 {
        o.fill(0.0);
        if set.keys.is_empty() {
            return f64::NEG_INFINITY;
        }
        self.logits(q, h, set, z);
        let lse = log_sum_exp(z);
        for (&key, &zj) in set.keys.iter().zip(z.iter()) {
            let p = (zj - lse).exp();
            let (_, vrow) = self.kv(key, h);
            axpy(p, vrow, o);
        }
        lse
    }

    /// Backward of [`attend`](Self::attend) for upstream gradient `d_o` of its output `o`:
    /// accumulates into `grads` (`dkbar`/`dvbar` for summary keys).
    #[allow(clippy::too_many_arguments)]
    fn attend_backward(
        &self,
        q: usize,
        h: usize,
        set: &KeySet,
        z: &mut Vec<f64>,
        d_o: &[f64],
        o: &[f64],
        lse: f64,
        grads: &mut Sinks,
    ) {
        if set.keys.is_empty() {
            return;
        }
        let scale = self.attn.scale();
        self.logits(q, h, set, z);
        let delta = dot(d_o, o);
        let qrow = self.q(q, h).to_vec();
        let q_range = self.row(q, h);
        for ((&key, &zj), f) in set.keys.iter().zip(z.iter()).zip(&set.feats) {
            let p = (zj - lse).exp();
            let (krow, vrow) = self.kv(key, h);
            let dz = p * (dot(d_o, vrow) - delta);
            axpy(scale * dz, krow, &mut grads.dq[q_range.clone()]);
            let (dk, dv) = grads.key_rows(key, self.row(key_index(key), h));
            axpy(scale * dz, &qrow, dk);
            axpy(p, d_o, dv);
            for (x, fx) in f.iter().enumerate() {
                grads.dcoeffs[h * 3 + x] += dz * fx;
            }
        }
    }
}

/// The keys one query sees in one branch, with the bias features of each pair: they do not
/// depend on the head, so they are computed once for all heads.
#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<Key>,
    feats: Vec<[f64; 3]>,
}

impl KeySet {
    /// Fills `feats` for the keys already in `keys`, as seen from query `q` of sequence `seq`.
    fn compute_features(&mut self, attn: &EvoAttention<'_>, seq: usize, q: usize) {
        let temporal = attn.config().temporal;
        let t_q = attn.query_time(seq, q);
        self.feats.clear();
        self.feats.extend(
            self.keys
                .iter()
                .map(|&key| temporal.features(t_q, attn.key_time(seq, key))),
        );
    }
}

fn key_index(key: Key) -> usize {
    match key {
        Key::Token(j) | Key::Summary(j) => j,
    }
}

/// Gradient accumulators, summaries kept apart until they are spread over their members.
struct Sinks {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dkbar: Vec<f64>,
    dvbar: Vec<f64>,
    dcoeffs: Vec<f64>,
}

impl Sinks {
    fn new(ops: &Operands<'_>) -> Self {
        let zeros = |n: usize| vec![0.0; n];
        Sinks {
            dq: zeros(ops.inp.q.len()),
            dk: zeros(ops.inp.k.len()),
            dv: zeros(ops.inp.v.len()),
            dkbar: zeros(ops.kbar.len()),
            dvbar: zeros(ops.vbar.len()),
            dcoeffs: zeros(ops.inp.coeffs.len()),
        }
    }

    fn key_rows(&mut self, key: Key, range: std::ops::Range<usize>) -> (&mut [f64], &mut [f64]) {
        match key {
            Key::Token(_) => (&mut self.dk[range.clone()], &mut self.dv[range]),
            Key::Summary(_) => (&mut self.dkbar[range.clone()], &mut self.dvbar[range]),
        }
    }

    /// A summary is a mean, so its gradient reaches each member divided by the chunk size.
    fn spread_summaries(&mut self, attn: &EvoAttention<'_>) -> (Vec<f64>, Vec<f64>) {
        let chunks = attn.chunks();
        let hd = attn.dims().heads * attn.dims().head_dim;
        for c in 0..chunks.num_chunks() {
            let span = chunks.span(c);
            let inv = 1.0 / span.len() as f64;
            for j in span {
                for x in 0..hd {
                    self.dk[j * hd + x] += self.dkbar[c * hd + x] * inv;
                    self.dv[j * hd + x] += self.dvbar[c * hd + x] * inv;
                }
            }
        }
        (std::mem::take(&mut self.dk), std::mem::take(&mut self.dv))
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(alpha: f64, x: &[f64], y: &mut [f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

fn log_sum_exp(z: &[f64]) -> f64 {
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + z.iter().map(|&x| (x - max).exp()).sum::<f64>().ln()
}
