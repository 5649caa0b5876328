//! Sparse EvoAttention: three softmaxes per query (global, transition, local), gated and summed.

use super::{Gradients, KeySet, Operands, Sinks};
use crate::attention::{check_len, Branch, EvoAttention, Inputs, Widened, NUM_BRANCHES};
use crate::dtype::{to_f64_vec, Element};
use crate::error::Result;

/// Reference forward outputs (f64).
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// `[T, H, D]`: `O(q) = sum_b gates[q, h, b] * O_b(q)`.
    pub o: Vec<f64>,
    /// `[T, H, 3, D]`: each branch's output `O_b` before gating.
    pub o_branch: Vec<f64>,
    /// `[T, H, 3]`: each branch's log-sum-exp; `-inf` where the branch's key set is empty.
    pub lse: Vec<f64>,
}

/// Forward of sparse EvoAttention on inputs of any element type (computed in f64).
pub fn forward<T: Element>(attn: &EvoAttention<'_>, inputs: &Inputs<'_, T>) -> Result<Forward> {
    forward_f64(attn, &inputs.widen(attn)?)
}

/// Forward on widened inputs.
pub fn forward_f64(attn: &EvoAttention<'_>, inp: &Widened) -> Result<Forward> {
    inp.validate(attn)?;
    let ops = Operands::new(attn, inp);
    let (heads, d) = (attn.dims().heads, attn.dims().head_dim);
    let t_total = attn.batch().num_tokens();
    let mut out = Forward {
        o: vec![0.0; t_total * heads * d],
        o_branch: vec![0.0; t_total * heads * NUM_BRANCHES * d],
        lse: vec![0.0; t_total * heads * NUM_BRANCHES],
    };
    let mut set = KeySet::default();
    let mut z = Vec::new();
    for (seq, span) in attn.batch().seqs().enumerate() {
        for q in span.tokens() {
            for branch in Branch::ALL {
                let b = branch as usize;
                attn.keys(seq, q, branch, &mut set.keys);
                set.compute_features(attn, seq, q);
                for h in 0..heads {
                    let qh = q * heads + h;
                    let ob_range = (qh * NUM_BRANCHES + b) * d..(qh * NUM_BRANCHES + b + 1) * d;
                    let lse = ops.attend(q, h, &set, &mut z, &mut out.o_branch[ob_range.clone()]);
                    out.lse[qh * NUM_BRANCHES + b] = lse;
                    let g = gate(inp, qh, b);
                    for x in 0..d {
                        out.o[qh * d + x] += g * out.o_branch[ob_range.start + x];
                    }
                }
            }
        }
    }
    Ok(out)
}

fn gate(inp: &Widened, qh: usize, b: usize) -> f64 {
    inp.gates.as_ref().map_or(1.0, |g| g[qh * NUM_BRANCHES + b])
}

/// Backward of sparse EvoAttention for upstream gradient `d_o` (`[T, H, D]`) of `O`.
pub fn backward<T: Element, G: Element>(
    attn: &EvoAttention<'_>,
    inputs: &Inputs<'_, T>,
    d_o: &[G],
) -> Result<Gradients> {
    backward_f64(attn, &inputs.widen(attn)?, &to_f64_vec(d_o))
}

/// Backward on widened inputs (SPEC section 6).
pub fn backward_f64(attn: &EvoAttention<'_>, inp: &Widened, d_o: &[f64]) -> Result<Gradients> {
    inp.validate(attn)?;
    check_len(
        "d_o",
        d_o.len(),
        attn.dims().tensor_len(attn.batch().num_tokens())?,
    )?;
    let fwd = forward_f64(attn, inp)?;
    let (heads, d) = (attn.dims().heads, attn.dims().head_dim);
    let ops = Operands::new(attn, inp);
    let mut sinks = Sinks::new(&ops);
    let mut dgates = vec![0.0; fwd.lse.len()];
    let mut set = KeySet::default();
    let mut z = Vec::new();
    let mut d_ob = vec![0.0; d];
    for (seq, span) in attn.batch().seqs().enumerate() {
        for q in span.tokens() {
            for branch in Branch::ALL {
                let b = branch as usize;
                attn.keys(seq, q, branch, &mut set.keys);
                set.compute_features(attn, seq, q);
                for h in 0..heads {
                    let qh = q * heads + h;
                    let d_o_row = &d_o[qh * d..(qh + 1) * d];
                    let ob_start = (qh * NUM_BRANCHES + b) * d;
                    let o_b = &fwd.o_branch[ob_start..ob_start + d];
                    dgates[qh * NUM_BRANCHES + b] = super::dot(d_o_row, o_b);
                    let g = gate(inp, qh, b);
                    for (x, dx) in d_ob.iter_mut().enumerate() {
                        *dx = g * d_o_row[x];
                    }
                    let lse = fwd.lse[qh * NUM_BRANCHES + b];
                    ops.attend_backward(q, h, &set, &mut z, &d_ob, o_b, lse, &mut sinks);
                }
            }
        }
    }
    let (dk, dv) = sinks.spread_summaries(attn);
    Ok(Gradients {
        dq: sinks.dq,
        dk,
        dv,
        dcoeffs: sinks.dcoeffs,
        dgates,
    })
}
