//! The f64 reference against itself: backward against central finite differences of the forward
//! (sparse and dense), and the local branch against the dense counterpart where they must agree.

mod common;

use proptest::prelude::*;
use sparsectr_attn::workload::{random_tensor, Rng};
use sparsectr_attn::{
    reference, rel_l2_error, AttnConfig, Chunks, Dims, Element, EvoAttention, Gates, Inputs,
    JaggedBatch, RelTemporal, Widened,
};

/// Fourth-order central differences in f64 with h = 1e-5. Their truncation error, ~h^4 f^(5) / 30,
/// stays far below the tolerance even for the temporal coefficients, which multiply features up to
/// the bucket count (39 here) and so raise each derivative of the loss by that factor. Their
/// round-off does not shrink with the gradient: each loss evaluation is off by a few ulps of
/// `sum |O_i R_i|`, divided by h. A gradient much smaller than the loss (one batch had
/// dcoeffs = 3.75e-3 against a loss of ~30, now in reference.proptest-regressions) therefore sits
/// at a noise floor of ~1e-9 absolute that a relative bound alone cannot see past: each entry may
/// also be off by FD_NOISE_ULPS ulps of that scale over h. A wrong gradient is off by far more.
const FD_TOL: f64 = 1e-7;
const FD_STEP: f64 = 1e-5;
const FD_NOISE_ULPS: f64 = 16.0;

/// Which tensor of [`Widened`] a gradient belongs to.
#[derive(Debug, Clone, Copy)]
enum Param {
    Q,
    K,
    V,
    Coeffs,
    Gates,
}

fn param(inp: &mut Widened, p: Param) -> &mut Vec<f64> {
    match p {
        Param::Q => &mut inp.q,
        Param::K => &mut inp.k,
        Param::V => &mut inp.v,
        Param::Coeffs => &mut inp.coeffs,
        Param::Gates => inp.gates.as_mut().expect("gates present"),
    }
}

/// Central differences of `loss` with respect to every element of one tensor.
fn finite_differences(inp: &Widened, p: Param, loss: &dyn Fn(&Widened) -> f64) -> Vec<f64> {
    let mut x = inp.clone();
    let n = param(&mut x, p).len();
    (0..n)
        .map(|i| {
            let orig = param(&mut x, p)[i];
            let mut at = |offset: f64| {
                param(&mut x, p)[i] = orig + offset;
                loss(&x)
            };
            let h1 = at(FD_STEP) - at(-FD_STEP);
            let h2 = at(2.0 * FD_STEP) - at(-2.0 * FD_STEP);
            param(&mut x, p)[i] = orig;
            (8.0 * h1 - h2) / (12.0 * FD_STEP)
        })
        .collect()
}

/// `analytic` against `numeric` within FD_TOL relative, plus the finite differences' round-off
/// floor for a loss whose terms sum to `loss_scale` in absolute value (see FD_NOISE_ULPS).
fn check(
    name: &str,
    analytic: &[f64],
    numeric: &[f64],
    loss_scale: f64,
) -> Result<(), TestCaseError> {
    // A tensor whose true gradient is zero (no visible pairs) must come out exactly zero.
    let numeric_norm = numeric.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff = analytic
        .iter()
        .zip(numeric)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let err = diff / numeric_norm;
    let floor = FD_NOISE_ULPS * f64::EPSILON * loss_scale / FD_STEP * (numeric.len() as f64).sqrt();
    let ok = if numeric_norm < 1e-9 {
        analytic.iter().all(|x| x.abs() < 1e-9)
    } else {
        err.is_finite() && diff <= FD_TOL * numeric_norm + floor
    };
    prop_assert!(
        ok,
        "{}: relative L2 error {:e} > {:e} (difference {:e}, round-off floor {:e})",
        name,
        err,
        FD_TOL,
        diff,
        floor
    );
    Ok(())
}

/// `L = sum O * R` so that `dO = R`.
fn weighted_sum(o: &[f64], r: &[f64]) -> f64 {
    o.iter().zip(r).map(|(a, b)| a * b).sum()
}

/// `sum |O_i R_i|`: the scale of the rounding error of `weighted_sum(o, r)`.
fn loss_scale(o: &[f64], r: &[f64]) -> f64 {
    o.iter().zip(r).map(|(a, b)| (a * b).abs()).sum()
}

#[derive(Debug, Clone)]
struct Case {
    batch: JaggedBatch,
    num_chunks: usize,
    tail_tokens: usize,
    window: usize,
    heads: usize,
    gates: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        common::batch(3, 9, 2),
        1usize..5,
        1usize..4,
        1usize..6,
        1usize..3,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(batch, num_chunks, tail_tokens, window, heads, gates, seed)| Case {
                batch,
                num_chunks,
                tail_tokens,
                window,
                heads,
                gates,
                seed,
            },
        )
}

const D: usize = 32;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn sparse_backward_matches_finite_differences(c in case()) {
        let chunks = Chunks::personalized(&c.batch, c.num_chunks).unwrap();
        let dims = Dims { heads: c.heads, head_dim: D };
        let mut config = AttnConfig::new(c.tail_tokens, c.window);
        // A few buckets so that some pairs saturate Bk.
        config.temporal = RelTemporal { num_time_buckets: 40, utc_offset: 3600 };
        let attn = EvoAttention::new(&c.batch, &chunks, dims, config).unwrap();
        let t = c.batch.num_tokens();
        let inp = common::widened(c.seed, t, c.heads, D, c.gates);
        let r: Vec<f64> = random_tensor(&mut Rng::new(c.seed ^ 1), t * c.heads * D, 1.0);
        let grads = reference::backward_f64(&attn, &inp, &r).unwrap();
        let loss = |x: &Widened| weighted_sum(&reference::forward_f64(&attn, x).unwrap().o, &r);
        let scale = loss_scale(&reference::forward_f64(&attn, &inp).unwrap().o, &r);
        check("dq", &grads.dq, &finite_differences(&inp, Param::Q, &loss), scale)?;
        check("dk", &grads.dk, &finite_differences(&inp, Param::K, &loss), scale)?;
        check("dv", &grads.dv, &finite_differences(&inp, Param::V, &loss), scale)?;
        check("dcoeffs", &grads.dcoeffs, &finite_differences(&inp, Param::Coeffs, &loss), scale)?;
        // dgates is checked against explicit gates; absent gates mean ones.
        let mut gated = inp.clone();
        let ones = vec![1.0; t * c.heads * 3];
        gated.gates.get_or_insert(ones);
        let dgates_fd = finite_differences(&gated, Param::Gates, &loss);
        check("dgates", &grads.dgates, &dgates_fd, scale)?;
    }

    #[test]
    fn dense_backward_matches_finite_differences(c in case()) {
        let chunks = Chunks::personalized(&c.batch, c.num_chunks).unwrap();
        let dims = Dims { heads: c.heads, head_dim: D };
        let attn = EvoAttention::new(&c.batch, &chunks, dims, AttnConfig::new(1, 1)).unwrap();
        let t = c.batch.num_tokens();
        let inp = common::widened(c.seed, t, c.heads, D, false);
        let r: Vec<f64> = random_tensor(&mut Rng::new(c.seed ^ 2), t * c.heads * D, 1.0);
        let grads = reference::dense_backward_f64(&attn, &inp, &r).unwrap();
        let loss = |x: &Widened| weighted_sum(&reference::dense_forward_f64(&attn, x).unwrap().o, &r);
        let scale = loss_scale(&reference::dense_forward_f64(&attn, &inp).unwrap().o, &r);
        check("dq", &grads.dq, &finite_differences(&inp, Param::Q, &loss), scale)?;
        check("dk", &grads.dk, &finite_differences(&inp, Param::K, &loss), scale)?;
        check("dv", &grads.dv, &finite_differences(&inp, Param::V, &loss), scale)?;
        check("dcoeffs", &grads.dcoeffs, &finite_differences(&inp, Param::Coeffs, &loss), scale)?;
    }

    /// With gates (0, 0, 1) and `w >= n` the sparse output is the local branch, which then sees
    /// the user token and every behavior up to the query: exactly the dense counterpart on
    /// behavior rows (and on candidate rows too once `w > n`).
    #[test]
    fn local_branch_equals_dense_when_window_covers_everything(
        batch in common::batch(4, 12, 3),
        extra in 0usize..3,
        heads in 1usize..3,
        seed in any::<u64>(),
    ) {
        let max_n = batch.seqs().map(|s| s.num_behaviors()).max().unwrap_or(0);
        let window = max_n.max(1) + extra;
        let chunks = Chunks::personalized(&batch, 3).unwrap();
        let dims = Dims { heads, head_dim: D };
        let attn = EvoAttention::new(&batch, &chunks, dims, AttnConfig::new(2, window)).unwrap();
        let t = batch.num_tokens();
        let mut inp = common::widened(seed, t, heads, D, false);
        inp.gates = Some((0..t * heads).flat_map(|_| [0.0, 0.0, 1.0]).collect());
        let sparse = reference::forward_f64(&attn, &inp).unwrap();
        let dense = reference::dense_forward_f64(&attn, &inp).unwrap();
        let mut compared = 0;
        for span in batch.seqs() {
            let rows: Vec<usize> = if window > span.num_behaviors() {
                span.behaviors.clone().chain(span.candidates.clone()).collect()
            } else {
                span.behaviors.clone().collect()
            };
            for q in rows {
                for h in 0..heads {
                    let qh = q * heads + h;
                    let o = &sparse.o[qh * D..(qh + 1) * D];
                    let want = &dense.o[qh * D..(qh + 1) * D];
                    let err = rel_l2_error(o, want);
                    prop_assert!(err <= 1e-12, "O row {} head {}: {:e}", q, h, err);
                    let lse = sparse.lse[qh * 3 + 2];
                    prop_assert!((lse - dense.lse[qh]).abs() <= 1e-12 * (1.0 + lse.abs()));
                    compared += 1;
                }
            }
        }
        prop_assert_eq!(compared, heads * batch.num_behaviors()
            + batch.seqs().filter(|s| window > s.num_behaviors()).map(|s| heads * s.candidates.len()).sum::<usize>());
    }
}

/// The generic entry points widen f32, f16 and bf16 exactly: each gives the f64 result of its
/// rounded inputs. The expected inputs are widened here, element by element through f32 (exact
/// for all three), not by the crate's own conversion; gates in the input dtype and in f32.
fn check_generic_widening<T: Element>(seed: u64, to_f32: fn(T) -> f32) {
    let mut rng = Rng::new(seed);
    let batch = sparsectr_attn::workload::generate_batch(&mut rng, 3, 20, 2, true).unwrap();
    let chunks = Chunks::personalized(&batch, 4).unwrap();
    let dims = Dims {
        heads: 2,
        head_dim: 64,
    };
    let attn = EvoAttention::new(&batch, &chunks, dims, AttnConfig::new(2, 5)).unwrap();
    let n = batch.num_tokens() * 2 * 64;
    let gates_n = batch.num_tokens() * 6;
    let q: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let k: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let v: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let g_native: Vec<T> = random_tensor(&mut rng, gates_n, 1.0);
    let g_f32: Vec<f32> = random_tensor(&mut rng, gates_n, 1.0);
    let coeffs = [0.1f32, 0.2, 0.3, -0.1, -0.2, -0.3];
    let by_hand = |x: &[T]| -> Vec<f64> { x.iter().map(|&e| f64::from(to_f32(e))).collect() };
    let gate_cases = [
        (Some(Gates::Native(&g_native[..])), Some(by_hand(&g_native))),
        (
            Some(Gates::F32(&g_f32[..])),
            Some(g_f32.iter().map(|&e| f64::from(e)).collect()),
        ),
        (None, None),
    ];
    for (gates, want_gates) in gate_cases {
        let inputs = Inputs {
            q: &q,
            k: &k,
            v: &v,
            coeffs: &coeffs,
            gates,
        };
        let want = Widened {
            q: by_hand(&q),
            k: by_hand(&k),
            v: by_hand(&v),
            coeffs: coeffs.iter().map(|&c| f64::from(c)).collect(),
            gates: want_gates,
        };
        assert_eq!(inputs.widen(&attn).unwrap(), want, "{:?}", T::DTYPE);
        let a = reference::forward(&attn, &inputs).unwrap();
        let b = reference::forward_f64(&attn, &want).unwrap();
        assert_eq!(a, b, "{:?}", T::DTYPE);
        assert!(a.o.iter().all(|x| x.is_finite()));
        assert!(a.o.iter().any(|&x| x != 0.0));
    }
}

#[test]
fn generic_inputs_widen_exactly() {
    check_generic_widening::<f32>(77, |x| x);
    check_generic_widening::<half::f16>(78, half::f16::to_f32);
    check_generic_widening::<half::bf16>(79, half::bf16::to_f32);
}

/// `EvoAttention::queries` (which the GPU backward iterates per key) is exactly the transpose
/// of `EvoAttention::keys`, in every branch.
#[test]
fn queries_of_a_key_are_the_transpose_of_keys() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(256));
    runner
        .run(
            // A window may be any positive usize: usize::MAX once overflowed j + w.
            &(
                common::batch(4, 30, 3),
                1usize..6,
                1usize..4,
                prop_oneof![1usize..12, Just(usize::MAX)],
            ),
            |(batch, p, m, w)| {
                let chunks = Chunks::personalized(&batch, p).unwrap();
                let dims = Dims {
                    heads: 1,
                    head_dim: D,
                };
                let attn = EvoAttention::new(&batch, &chunks, dims, AttnConfig::new(m, w)).unwrap();
                let mut keys = Vec::new();
                for (seq, span) in batch.seqs().enumerate() {
                    let mut all_keys: Vec<sparsectr_attn::Key> =
                        span.tokens().map(sparsectr_attn::Key::Token).collect();
                    all_keys.extend(chunks.of_seq(seq).map(sparsectr_attn::Key::Summary));
                    for branch in sparsectr_attn::Branch::ALL {
                        for &key in &all_keys {
                            let mut want = Vec::new();
                            for q in span.tokens() {
                                attn.keys(seq, q, branch, &mut keys);
                                if keys.contains(&key) {
                                    want.push(q);
                                }
                            }
                            let got: Vec<usize> = attn
                                .queries(seq, key, branch)
                                .into_iter()
                                .flatten()
                                .collect();
                            prop_assert_eq!(got, want, "{:?} in {:?}", key, branch);
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}
