//! The dense counterpart (SPEC section 5): one softmax over the user token and every behavior up
//! to the query (candidates: all behaviors and themselves), with the same bias and no gates. It is
//! the full-attention model SparseCTR replaces, and the benchmark baseline.

use super::{Gradients, KeySet, Operands, Sinks};
use crate::attention::{check_len, EvoAttention, Inputs, Widened};
use crate::dtype::{to_f64_vec, Element};
use crate::error::Result;

/// Dense reference forward outputs (f64).
#[derive(Debug, Clone, PartialEq)]
pub struct DenseForward {
    /// `[T, H, D]`.
    pub o: Vec<f64>,
    /// `[T, H]`.
    pub lse: Vec<f64>,
}

/// Dense forward on inputs of any element type; `inputs.gates` is ignored.
pub fn dense_forward<T: Element>(
    attn: &EvoAttention<'_>,
    inputs: &Inputs<'_, T>,
) -> Result<DenseForward> {
    dense_forward_f64(attn, &inputs.widen(attn)?)
}

/// Dense forward on widened inputs.
pub fn dense_forward_f64(attn: &EvoAttention<'_>, inp: &Widened) -> Result<DenseForward> {
    inp.validate(attn)?;
    let ops = Operands::new(attn, inp);
    let (heads, d) = (attn.dims().heads, attn.dims().head_dim);
    let t_total = attn.batch().num_tokens();
    let mut out = DenseForward {
        o: vec![0.0; t_total * heads * d],
        lse: vec![0.0; t_total * heads],
    };
    let mut set = KeySet::default();
    let mut z = Vec::new();
    for (seq, span) in attn.batch().seqs().enumerate() {
        for q in span.tokens() {
            attn.dense_keys(seq, q, &mut set.keys);
            set.compute_features(attn, seq, q);
            for h in 0..heads {
                let qh = q * heads + h;
                out.lse[qh] = ops.attend(q, h, &set, &mut z, &mut out.o[qh * d..(qh + 1) * d]);
            }
        }
    }
    Ok(out)
}

/// Dense backward for upstream gradient `d_o` (`[T, H, D]`); `dgates` is empty.
pub fn dense_backward<T: Element, G: Element>(
    attn: &EvoAttention<'_>,
    inputs: &Inputs<'_, T>,
    d_o: &[G],
) -> Result<Gradients> {
    dense_backward_f64(attn, &inputs.widen(attn)?, &to_f64_vec(d_o))
}

/// Dense backward on widened inputs.
pub fn dense_backward_f64(
    attn: &EvoAttention<'_>,
    inp: &Widened,
    d_o: &[f64],
) -> Result<Gradients> {
    inp.validate(attn)?;
    check_len(
        "d_o",
        d_o.len(),
        attn.dims().tensor_len(attn.batch().num_tokens())?,
    )?;
    let fwd = dense_forward_f64(attn, inp)?;
    let ops = Operands::new(attn, inp);
    let (heads, d) = (attn.dims().heads, attn.dims().head_dim);
    let mut sinks = Sinks::new(&ops);
    let mut set = KeySet::default();
    let mut z = Vec::new();
    for (seq, span) in attn.batch().seqs().enumerate() {
        for q in span.tokens() {
            attn.dense_keys(seq, q, &mut set.keys);
            set.compute_features(attn, seq, q);
            for h in 0..heads {
                let qh = q * heads + h;
                let rows = qh * d..(qh + 1) * d;
                let (d_o_row, o_row) = (&d_o[rows.clone()], &fwd.o[rows]);
                let lse = fwd.lse[qh];
                ops.attend_backward(q, h, &set, &mut z, d_o_row, o_row, lse, &mut sinks);
            }
        }
    }
    Ok(Gradients {
        dq: sinks.dq,
        dk: sinks.dk,
        dv: sinks.dv,
        dcoeffs: sinks.dcoeffs,
        dgates: Vec::new(),
    })
}
