//! Bad input (SPEC section 7): every public entry point rejects each kind of bad input with its
//! own `Error` variant, naming the field, index and value at fault; it never panics and never
//! returns `Ok`.
//!
//! Layout of this file:
//! 1. fixtures and assertion helpers;
//! 2. one section per input: `seq_offsets`, `num_candidates`, timestamps, tensors, parameters,
//!    caller-supplied chunks, chunks of another batch, padded batches, `Display`;
//! 3. overflow and malformed-argument cases that once panicked (regression tests);
//! 4. property tests: random valid batches with exactly one corruption each (every corruption
//!    knows the exact error it must produce), benign perturbations that must stay `Ok`, and garbage
//!    fed to `JaggedBatch::new` checked against an independent validity oracle.
//!
//! A panic fails the test that hit it (proptest then shrinks it to a minimal case), so "never
//! panics" needs no machinery of its own; `catch_unwind` is used only in the regression tests of
//! section 3, to turn an overflow panic into a readable failure.

use std::panic::{catch_unwind, AssertUnwindSafe};

use proptest::collection::vec;
use proptest::prelude::*;
use sparsectr_attn::{
    reference, AttnConfig, Chunks, Dims, Error, EvoAttention, Gates, Inputs, JaggedBatch, Padded,
    RelTemporal, Result, Widened, SUPPORTED_HEAD_DIMS,
};

// ---------------------------------------------------------------------------------------------
// 1. Fixtures and assertion helpers
// ---------------------------------------------------------------------------------------------

/// A realistic Unix time (2023-11-14): values this large catch accidental i32 arithmetic.
const T0: i64 = 1_700_000_000;

/// The largest time span a sequence may have, in seconds.
const MAX_SPAN: i64 = i32::MAX as i64;

/// The raw, unvalidated arguments of [`JaggedBatch::new`]; tests break one field and build.
#[derive(Debug, Clone)]
struct Raw {
    offsets: Vec<usize>,
    num_candidates: Vec<usize>,
    has_user_token: bool,
    timestamps: Vec<i64>,
}

impl Raw {
    fn build(self) -> Result<JaggedBatch> {
        JaggedBatch::new(
            self.offsets,
            self.num_candidates,
            self.has_user_token,
            self.timestamps,
        )
    }
}

/// The hand-written fixture: two sequences with user tokens.
///
/// ```text
/// token:  0 | 1  2  3  4 | 5  6 || 7 | 8  9 | 10
///         u | b  b  b  b | c  c || u | b  b | c
/// ```
///
/// The user tokens carry time 0 (ignored), seq 0 has a tie (tokens 2, 3) and its candidates are
/// earlier than its last behavior; all of that is valid.
fn raw() -> Raw {
    Raw {
        offsets: vec![0, 7, 11],
        num_candidates: vec![2, 1],
        has_user_token: true,
        timestamps: vec![
            0,
            T0,
            T0 + 5,
            T0 + 5,
            T0 + 90,
            T0 + 60,
            T0 + 60,
            0,
            T0 + 10,
            T0 + 3600,
            T0 + 4000,
        ],
    }
}

/// Builds the fixture with one edit applied.
fn batch_with(edit: impl FnOnce(&mut Raw)) -> Result<JaggedBatch> {
    let mut r = raw();
    edit(&mut r);
    r.build()
}

/// The valid fixture batch.
fn fixture() -> JaggedBatch {
    batch_with(|_| {}).expect("the fixture is valid")
}

/// Heads and head dim of the fixture's tensors.
const DIMS: Dims = Dims {
    heads: 2,
    head_dim: 32,
};

/// Builds the fixture's attention with `dims` and `config` (chunks: personalized, `P = 2`) and
/// keeps only the verdict, since the attention borrows locals. `AttnConfig::validate`, the same
/// check without a batch, must give the same verdict.
fn new_attn(dims: Dims, config: AttnConfig) -> Result<()> {
    let batch = fixture();
    let chunks = Chunks::personalized(&batch, 2).expect("valid P");
    let via_new = EvoAttention::new(&batch, &chunks, dims, config).map(drop);
    assert_eq!(
        config.validate(dims).map(drop),
        via_new,
        "AttnConfig::validate and EvoAttention::new disagree"
    );
    via_new
}

/// The fixture's default config, with one edit applied.
fn config_with(edit: impl FnOnce(&mut AttnConfig)) -> AttnConfig {
    let mut config = AttnConfig::new(1, 3);
    edit(&mut config);
    config
}

/// Asserts that Display names the field `Error::field()` reports; every input error this file
/// provokes goes through it.
fn assert_names_field(err: &Error) {
    let text = err.to_string();
    assert!(
        text.contains(err.field()),
        "Display of {err:?} does not name its field {:?}: {text:?}",
        err.field()
    );
}

/// Asserts that `$result` is an `Err` matching `$pattern` (plus optional guard, whose bindings
/// are by value), that its Display names its field, and evaluates to the error.
macro_rules! assert_err {
    ($result:expr, $pattern:pat $(if $guard:expr)? $(,)?) => {
        match $result {
            Ok(_) => panic!("expected Err({}), got Ok", stringify!($pattern)),
            Err(err) => {
                let err: Error = err;
                assert!(
                    matches!(err.clone(), $pattern $(if $guard)?),
                    "expected {}, got {err:?}",
                    stringify!($pattern $(if $guard)?)
                );
                assert_names_field(&err);
                err
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// 2a. seq_offsets
// ---------------------------------------------------------------------------------------------

#[test]
fn seq_offsets_empty() {
    assert_err!(
        JaggedBatch::new(vec![], vec![], false, vec![]),
        Error::SeqOffsetsEmpty
    );
    // Emptiness is reported first even when the other fields are non-empty.
    assert_err!(batch_with(|r| r.offsets.clear()), Error::SeqOffsetsEmpty);
}

#[test]
fn seq_offsets_not_starting_at_zero() {
    assert_err!(
        batch_with(|r| r.offsets[0] = 1),
        Error::SeqOffsetsStart { value: 1 }
    );
    // B = 0 with a non-zero single offset.
    assert_err!(
        JaggedBatch::new(vec![3], vec![], false, vec![1, 2, 3]),
        Error::SeqOffsetsStart { value: 3 }
    );
    assert_err!(
        JaggedBatch::new(vec![usize::MAX], vec![], false, vec![]),
        Error::SeqOffsetsStart { value: usize::MAX }
    );
}

#[test]
fn seq_offsets_decreasing() {
    // [0, 12, 11]: the drop is at index 2.
    assert_err!(
        batch_with(|r| r.offsets[1] = 12),
        Error::SeqOffsetsDecreasing {
            index: 2,
            value: 11,
            previous: 12
        }
    );
    // The first drop is reported, not a later one.
    assert_err!(
        JaggedBatch::new(vec![0, 4, 2, 5, 1, 6], vec![0; 5], false, vec![0; 6]),
        Error::SeqOffsetsDecreasing {
            index: 2,
            value: 2,
            previous: 4
        }
    );
    // Equal neighbours are an empty sequence, not a drop.
    assert!(JaggedBatch::new(vec![0, 2, 2, 3], vec![0; 3], false, vec![0; 3]).is_ok());
}

#[test]
fn seq_offsets_not_ending_at_num_tokens() {
    assert_err!(
        batch_with(|r| r.timestamps.push(T0)),
        Error::SeqOffsetsEnd {
            value: 11,
            num_tokens: 12
        }
    );
    assert_err!(
        batch_with(|r| {
            r.timestamps.pop();
        }),
        Error::SeqOffsetsEnd {
            value: 11,
            num_tokens: 10
        }
    );
    // B = 0 but tokens present.
    assert_err!(
        JaggedBatch::new(vec![0], vec![], false, vec![T0]),
        Error::SeqOffsetsEnd {
            value: 0,
            num_tokens: 1
        }
    );
}

#[test]
fn empty_batch_is_valid() {
    let batch = JaggedBatch::new(vec![0], vec![], true, vec![]).expect("B = 0 is valid");
    assert_eq!((batch.num_seqs(), batch.num_tokens()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// 2b. num_candidates
// ---------------------------------------------------------------------------------------------

#[test]
fn num_candidates_wrong_length() {
    assert_err!(
        batch_with(|r| r.num_candidates.push(0)),
        Error::Length {
            field: "num_candidates",
            len: 3,
            expected: 2
        }
    );
    assert_err!(
        batch_with(|r| {
            r.num_candidates.pop();
        }),
        Error::Length {
            field: "num_candidates",
            len: 1,
            expected: 2
        }
    );
    assert_err!(
        JaggedBatch::new(vec![0], vec![0], false, vec![]),
        Error::Length {
            field: "num_candidates",
            len: 1,
            expected: 0
        }
    );
}

#[test]
fn candidates_larger_than_the_sequence_without_user_token() {
    let no_user = |k: usize| JaggedBatch::new(vec![0, 3], vec![k], false, vec![T0; 3]);
    assert!(no_user(3).is_ok(), "k = len (no behaviors) is valid");
    assert_err!(
        no_user(4),
        Error::TooManyCandidates {
            seq: 0,
            num_candidates: 4,
            seq_len: 3,
            has_user_token: false
        }
    );
    // k + 1 must not overflow on the way to the comparison.
    assert_err!(
        no_user(usize::MAX),
        Error::TooManyCandidates {
            seq: 0,
            num_candidates: usize::MAX,
            seq_len: 3,
            has_user_token: false
        }
    );
}

#[test]
fn candidates_larger_than_the_sequence_with_user_token() {
    // seq 1 has 4 tokens: with its user token, at most 3 candidates fit.
    assert!(batch_with(|r| r.num_candidates[1] = 3).is_ok());
    assert_err!(
        batch_with(|r| r.num_candidates[1] = 4),
        Error::TooManyCandidates {
            seq: 1,
            num_candidates: 4,
            seq_len: 4,
            has_user_token: true
        }
    );
    assert_err!(
        batch_with(|r| r.num_candidates[1] = usize::MAX),
        Error::TooManyCandidates {
            seq: 1,
            num_candidates: usize::MAX,
            seq_len: 4,
            has_user_token: true
        }
    );
}

#[test]
fn user_token_in_an_empty_sequence() {
    // seq 1 is empty, so it cannot start with a user token even with no candidates.
    assert_err!(
        JaggedBatch::new(vec![0, 2, 2], vec![0, 0], true, vec![0, T0]),
        Error::TooManyCandidates {
            seq: 1,
            num_candidates: 0,
            seq_len: 0,
            has_user_token: true
        }
    );
    // Without user tokens, an empty sequence is fine.
    assert!(JaggedBatch::new(vec![0, 2, 2], vec![0, 0], false, vec![T0, T0]).is_ok());
}

// ---------------------------------------------------------------------------------------------
// 2c. timestamps
// ---------------------------------------------------------------------------------------------

#[test]
fn decreasing_behavior_timestamps() {
    // Token 9 (seq 1's second behavior) goes back before token 8.
    assert_err!(
        batch_with(|r| r.timestamps[9] = T0 + 9),
        Error::DecreasingTimestamp {
            seq: 1,
            index: 9,
            value,
            previous
        } if value == T0 + 9 && previous == T0 + 10
    );
    // Seq 0: the first drop is reported (token 3 after the tie 2).
    assert_err!(
        batch_with(|r| {
            r.timestamps[3] = T0 + 4;
            r.timestamps[4] = T0 + 1;
        }),
        Error::DecreasingTimestamp {
            seq: 0,
            index: 3,
            value,
            previous
        } if value == T0 + 4 && previous == T0 + 5
    );
    // A drop of one second at the extremes of i64 is still found.
    assert_err!(
        JaggedBatch::new(vec![0, 2], vec![0], false, vec![i64::MIN + 1, i64::MIN]),
        Error::DecreasingTimestamp {
            seq: 0,
            index: 1,
            value: i64::MIN,
            previous
        } if previous == i64::MIN + 1
    );
}

#[test]
fn candidate_and_user_token_timestamps_may_decrease() {
    // Candidates carry the request time, in any order and before or after the behaviors.
    assert!(batch_with(|r| {
        r.timestamps[5] = T0 + 1000;
        r.timestamps[6] = T0 - 1000;
    })
    .is_ok());
    // A candidate earlier than every behavior.
    assert!(batch_with(|r| r.timestamps[10] = T0 - 50).is_ok());
    // The user token's time is ignored: any i64, even far outside the allowed span.
    assert!(batch_with(|r| {
        r.timestamps[0] = i64::MAX;
        r.timestamps[7] = i64::MIN;
    })
    .is_ok());
}

#[test]
fn time_span_too_large_among_behaviors() {
    let two = |a: i64, b: i64| JaggedBatch::new(vec![0, 2], vec![0], false, vec![a, b]);
    assert!(
        two(T0, T0 + MAX_SPAN).is_ok(),
        "exactly i32::MAX is allowed"
    );
    assert!(two(-T0, -T0 + MAX_SPAN).is_ok());
    assert_err!(
        two(T0, T0 + MAX_SPAN + 1),
        Error::TimeSpanTooLarge { seq: 0, span } if span == MAX_SPAN as i128 + 1
    );
    // The widest span i64 allows: computed without overflow.
    assert_err!(
        two(i64::MIN, i64::MAX),
        Error::TimeSpanTooLarge { seq: 0, span } if span == u64::MAX as i128
    );
}

#[test]
fn time_span_too_large_because_of_a_candidate() {
    // Seq 1 behaviors at T0+10, T0+3600; the candidate (token 10) stretches the span.
    assert!(batch_with(|r| r.timestamps[10] = T0 + 10 + MAX_SPAN).is_ok());
    assert_err!(
        batch_with(|r| r.timestamps[10] = T0 + 11 + MAX_SPAN),
        Error::TimeSpanTooLarge { seq: 1, span } if span == MAX_SPAN as i128 + 1
    );
    // A candidate far in the past counts as well.
    assert!(batch_with(|r| r.timestamps[10] = T0 + 3600 - MAX_SPAN).is_ok());
    assert_err!(
        batch_with(|r| r.timestamps[10] = T0 + 3599 - MAX_SPAN),
        Error::TimeSpanTooLarge { seq: 1, span } if span == MAX_SPAN as i128 + 1
    );
    // Only candidates, no behaviors: their spread alone is checked.
    assert_err!(
        JaggedBatch::new(vec![0, 2], vec![2], false, vec![0, MAX_SPAN + 1]),
        Error::TimeSpanTooLarge { seq: 0, span } if span == MAX_SPAN as i128 + 1
    );
}

#[test]
fn time_span_is_per_sequence() {
    // Two sequences a century apart are each fine; only the span within a sequence counts.
    let raw = Raw {
        offsets: vec![0, 2, 4],
        num_candidates: vec![1, 1],
        has_user_token: false,
        timestamps: vec![0, 10, 100 * 365 * 86_400, 100 * 365 * 86_400 + 10],
    };
    assert!(raw.build().is_ok());
}

// ---------------------------------------------------------------------------------------------
// 2d. Tensors: q, k, v, coeffs, gates, d_o
// ---------------------------------------------------------------------------------------------

/// Valid f32 tensors for the fixture (`T = 11`) and [`DIMS`]; a test breaks one of them.
#[derive(Debug, Clone)]
struct Tensors {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    coeffs: Vec<f32>,
    gates: Vec<f32>,
    d_o: Vec<f32>,
}

impl Tensors {
    fn valid(num_tokens: usize, dims: Dims) -> Self {
        let n = num_tokens * dims.heads * dims.head_dim;
        // Non-zero, non-aligned values, so that no length bug hides behind zeros.
        let pattern = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i + seed) * 7919) % 97) as f32 / 97.0 - 0.45)
                .collect()
        };
        Tensors {
            q: pattern(n, 1),
            k: pattern(n, 2),
            v: pattern(n, 3),
            coeffs: pattern(dims.heads * 3, 4),
            gates: pattern(num_tokens * dims.heads * 3, 5),
            d_o: pattern(n, 6),
        }
    }

    fn fixture() -> Self {
        Tensors::valid(11, DIMS)
    }

    fn inputs(&self, native_gates: bool) -> Inputs<'_, f32> {
        let gates = if native_gates {
            Gates::Native(&self.gates)
        } else {
            Gates::F32(&self.gates)
        };
        Inputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            coeffs: &self.coeffs,
            gates: Some(gates),
        }
    }

    /// The same tensors widened by hand, bypassing `Inputs::widen`'s own validation.
    fn widened(&self) -> Widened {
        let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        Widened {
            q: wide(&self.q),
            k: wide(&self.k),
            v: wide(&self.v),
            coeffs: wide(&self.coeffs),
            gates: Some(wide(&self.gates)),
        }
    }
}

/// Runs every entry point that takes tensors on the fixture and returns each one's verdict by
/// name: `Inputs::{validate, widen}` (gates native and f32), `Widened::validate`, and the sparse
/// and dense reference forward and backward in both their generic and f64 forms.
fn tensor_entry_points(t: &Tensors) -> Vec<(&'static str, Result<()>)> {
    let batch = fixture();
    let chunks = Chunks::personalized(&batch, 2).expect("valid P");
    let attn = EvoAttention::new(&batch, &chunks, DIMS, AttnConfig::new(1, 3)).expect("valid");
    let (native, f32_gates, wide) = (t.inputs(true), t.inputs(false), t.widened());
    let d_o_wide: Vec<f64> = t.d_o.iter().map(|&v| v as f64).collect();
    vec![
        ("Inputs::validate (native gates)", native.validate(&attn)),
        ("Inputs::validate (f32 gates)", f32_gates.validate(&attn)),
        ("Inputs::widen", f32_gates.widen(&attn).map(drop)),
        ("Widened::validate", wide.validate(&attn)),
        (
            "reference::forward",
            reference::forward(&attn, &native).map(drop),
        ),
        (
            "reference::forward_f64",
            reference::forward_f64(&attn, &wide).map(drop),
        ),
        (
            "reference::backward",
            reference::backward(&attn, &f32_gates, &t.d_o).map(drop),
        ),
        (
            "reference::backward_f64",
            reference::backward_f64(&attn, &wide, &d_o_wide).map(drop),
        ),
        (
            "reference::dense_forward",
            reference::dense_forward(&attn, &native).map(drop),
        ),
        (
            "reference::dense_forward_f64",
            reference::dense_forward_f64(&attn, &wide).map(drop),
        ),
        (
            "reference::dense_backward",
            reference::dense_backward(&attn, &native, &t.d_o).map(drop),
        ),
        (
            "reference::dense_backward_f64",
            reference::dense_backward_f64(&attn, &wide, &d_o_wide).map(drop),
        ),
    ]
}

/// Asserts that every entry point in `results` failed with exactly `expected`.
fn assert_all_fail_with(results: Vec<(&'static str, Result<()>)>, expected: &Error) {
    for (name, result) in results {
        match result {
            Ok(()) => panic!("{name}: expected {expected:?}, got Ok"),
            Err(err) => {
                assert_eq!(&err, expected, "{name}");
                assert_names_field(&err);
            }
        }
    }
}

#[test]
fn valid_tensors_pass_every_entry_point() {
    // Guards the tests below: each must fail because of its one broken tensor only.
    for (name, result) in tensor_entry_points(&Tensors::fixture()) {
        assert_eq!(result, Ok(()), "{name}");
    }
}

#[test]
fn qkv_wrong_length() {
    let expected_len = 11 * 2 * 32;
    type Pick = fn(&mut Tensors) -> &mut Vec<f32>;
    let picks: [(&str, Pick); 3] = [
        ("q", |t| &mut t.q),
        ("k", |t| &mut t.k),
        ("v", |t| &mut t.v),
    ];
    for (field, pick) in picks {
        for len in [0, 1, expected_len - 1, expected_len + 1, 11 * 2 * 64] {
            let mut t = Tensors::fixture();
            pick(&mut t).resize(len, 0.25);
            let expected = Error::Length {
                field,
                len,
                expected: expected_len,
            };
            assert_all_fail_with(tensor_entry_points(&t), &expected);
        }
    }
}

#[test]
fn coeffs_wrong_length() {
    // [H, 3] = 6; [3] (one head's worth) and [H * 3 + 1] both fail.
    for len in [0, 3, 5, 7, 12] {
        let mut t = Tensors::fixture();
        t.coeffs.resize(len, 0.5);
        let expected = Error::Length {
            field: "coeffs",
            len,
            expected: 6,
        };
        assert_all_fail_with(tensor_entry_points(&t), &expected);
    }
}

#[test]
fn gates_wrong_length() {
    // [T, H, 3] = 66; [T, H] (one gate per head) is a plausible mistake.
    for len in [0, 22, 65, 67, 11 * 2 * 32] {
        let mut t = Tensors::fixture();
        t.gates.resize(len, 1.0);
        let expected = Error::Length {
            field: "gates",
            len,
            expected: 66,
        };
        assert_all_fail_with(tensor_entry_points(&t), &expected);
    }
}

#[test]
fn d_o_wrong_length() {
    for len in [0, 703, 705] {
        let mut t = Tensors::fixture();
        t.d_o.resize(len, 0.1);
        let expected = Error::Length {
            field: "d_o",
            len,
            expected: 704,
        };
        // Only the backward passes take d_o; the others must still succeed.
        let (backward, others): (Vec<_>, Vec<_>) = tensor_entry_points(&t)
            .into_iter()
            .partition(|(name, _)| name.contains("backward"));
        assert_eq!(backward.len(), 4);
        assert_all_fail_with(backward, &expected);
        for (name, result) in others {
            assert_eq!(result, Ok(()), "{name}");
        }
    }
}

#[test]
fn non_finite_coeffs() {
    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut t = Tensors::fixture();
        t.coeffs[4] = value;
        // The reported value is the bad coefficient itself, then its index.
        let shown = format!("{} at index 4", value as f64);
        for (name, result) in tensor_entry_points(&t) {
            eprintln!("entry point: {name}"); // shown only if the assertion below fails
            assert_err!(
                result,
                Error::OutOfRange { field: "coeffs", value: text, .. } if text == shown
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2e. Parameters: H, D, P, m, w, NB, utc_offset, scale
// ---------------------------------------------------------------------------------------------

#[test]
fn unsupported_head_dims() {
    for head_dim in [0, 1, 16, 31, 33, 48, 96, 256, usize::MAX] {
        let dims = Dims { heads: 2, head_dim };
        let check = |result: Result<()>| {
            assert_err!(
                result,
                Error::UnsupportedHeadDim { value, supported }
                    if value == head_dim && supported == SUPPORTED_HEAD_DIMS
            )
        };
        check(dims.validate());
        check(new_attn(dims, AttnConfig::new(1, 3)));
    }
    // SPEC: 32, 64 and 128 at least.
    for head_dim in [32, 64, 128] {
        let dims = Dims { heads: 2, head_dim };
        assert_eq!(new_attn(dims, AttnConfig::new(1, 3)), Ok(()));
    }
}

#[test]
fn zero_heads() {
    let dims = Dims {
        heads: 0,
        head_dim: 32,
    };
    assert_err!(dims.validate(), Error::Zero { field: "heads" });
    assert_err!(
        new_attn(dims, AttnConfig::new(1, 3)),
        Error::Zero { field: "heads" }
    );
}

#[test]
fn zero_num_chunks() {
    assert_err!(
        Chunks::personalized(&fixture(), 0),
        Error::Zero {
            field: "num_chunks"
        }
    );
    // Also when there is nothing to chunk.
    let empty = JaggedBatch::new(vec![0], vec![], false, vec![]).expect("valid");
    assert_err!(
        Chunks::personalized(&empty, 0),
        Error::Zero {
            field: "num_chunks"
        }
    );
}

#[test]
fn zero_tail_tokens_window_and_time_buckets() {
    assert_err!(
        new_attn(DIMS, config_with(|c| c.tail_tokens = 0)),
        Error::Zero {
            field: "tail_tokens"
        }
    );
    assert_err!(
        new_attn(DIMS, config_with(|c| c.window = 0)),
        Error::Zero { field: "window" }
    );
    let no_buckets = |c: &mut AttnConfig| c.temporal.num_time_buckets = 0;
    assert_err!(
        new_attn(DIMS, config_with(no_buckets)),
        Error::Zero {
            field: "num_time_buckets"
        }
    );
    let temporal = RelTemporal {
        num_time_buckets: 0,
        utc_offset: 0,
    };
    assert_err!(
        temporal.validate(),
        Error::Zero {
            field: "num_time_buckets"
        }
    );
}

#[test]
fn utc_offset_beyond_a_day() {
    for utc_offset in [86_401, -86_401, i64::MAX, i64::MIN + 1, i64::MIN] {
        let check = |result: Result<()>| {
            assert_err!(
                result,
                Error::OutOfRange { field: "utc_offset", value, .. }
                    if value == utc_offset.to_string()
            )
        };
        let temporal = RelTemporal {
            num_time_buckets: 64,
            utc_offset,
        };
        check(temporal.validate());
        check(new_attn(DIMS, config_with(|c| c.temporal = temporal)));
    }
    for utc_offset in [-86_400, 0, 86_400] {
        let config = config_with(|c| c.temporal.utc_offset = utc_offset);
        assert_eq!(new_attn(DIMS, config), Ok(()), "utc_offset {utc_offset}");
    }
}

#[test]
fn bad_scale() {
    for scale in [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        -1.0,
        f32::MIN,
    ] {
        assert_err!(
            new_attn(DIMS, config_with(|c| c.scale = Some(scale))),
            Error::OutOfRange { field: "scale", value, .. } if value == scale.to_string()
        );
    }
    // Tiny and huge finite positive scales are allowed.
    for scale in [f32::MIN_POSITIVE, 1e-30, 1.0, f32::MAX] {
        let config = config_with(|c| c.scale = Some(scale));
        assert_eq!(new_attn(DIMS, config), Ok(()), "scale {scale}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2f. Caller-supplied chunk boundaries (Chunks::from_lengths)
// ---------------------------------------------------------------------------------------------
//
// The fixture has 4 behaviors (tokens 1..5) in seq 0 and 2 (tokens 8..10) in seq 1; a valid
// partition is chunk_offsets [0, 2, 3], chunk_lengths [1, 3 | 2].

/// `Chunks::from_lengths` on the fixture.
fn chunks_from(chunk_offsets: &[usize], chunk_lengths: &[usize]) -> Result<Chunks> {
    Chunks::from_lengths(&fixture(), chunk_offsets, chunk_lengths)
}

#[test]
fn valid_supplied_chunks() {
    let chunks = chunks_from(&[0, 2, 3], &[1, 3, 2]).expect("a partition");
    assert_eq!(chunks.span(1), 2..5);
    assert_eq!(chunks.span(2), 8..10);
}

#[test]
fn zero_length_chunk() {
    assert_err!(
        chunks_from(&[0, 3, 4], &[1, 0, 3, 2]),
        Error::ChunkBoundaries {
            field: "chunk_lengths",
            seq: 0,
            index: 1,
            value: 0,
            ..
        }
    );
    // In seq 1, where the chunk ids are global: id 3.
    assert_err!(
        chunks_from(&[0, 2, 4], &[1, 3, 2, 0]),
        Error::ChunkBoundaries {
            field: "chunk_lengths",
            seq: 1,
            index: 3,
            value: 0,
            ..
        }
    );
}

#[test]
fn chunks_overrun_the_behaviors() {
    // Seq 0: 2 + 3 > 4 behaviors; reported at the chunk that crosses the end.
    assert_err!(
        chunks_from(&[0, 2, 3], &[2, 3, 2]),
        Error::ChunkBoundaries {
            field: "chunk_lengths",
            seq: 0,
            index: 1,
            value: 3,
            ..
        }
    );
    // Seq 1 alone overruns (into its candidate).
    assert_err!(
        chunks_from(&[0, 2, 3], &[1, 3, 3]),
        Error::ChunkBoundaries {
            field: "chunk_lengths",
            seq: 1,
            index: 2,
            value: 3,
            ..
        }
    );
    // A length near usize::MAX must not wrap around to look valid.
    assert_err!(
        chunks_from(&[0, 2, 3], &[1, usize::MAX, 2]),
        Error::ChunkBoundaries {
            field: "chunk_lengths",
            seq: 0,
            index: 1,
            value: usize::MAX,
            ..
        }
    );
    // A chunk in a sequence with no behaviors overruns at once.
    let no_behaviors = JaggedBatch::new(vec![0, 2], vec![2], false, vec![T0; 2]).expect("valid");
    assert_err!(
        Chunks::from_lengths(&no_behaviors, &[0, 1], &[1]),
        Error::ChunkBoundaries {
            field: "chunk_lengths",
            seq: 0,
            index: 0,
            value: 1,
            ..
        }
    );
}

#[test]
fn chunks_leave_behaviors_uncovered() {
    // Seq 0 covers 3 of its 4 behaviors.
    assert_err!(
        chunks_from(&[0, 2, 3], &[1, 2, 2]),
        Error::ChunkBoundaries {
            field: "chunk_offsets",
            seq: 0,
            index: 1,
            value: 2,
            ..
        }
    );
    // Seq 1 gets no chunk at all.
    assert_err!(
        chunks_from(&[0, 2, 2], &[1, 3]),
        Error::ChunkBoundaries {
            field: "chunk_offsets",
            seq: 1,
            index: 2,
            value: 2,
            ..
        }
    );
}

#[test]
fn chunk_offsets_wrong_length() {
    for offsets in [&[][..], &[0][..], &[0, 3][..], &[0, 2, 3, 3][..]] {
        assert_err!(
            chunks_from(offsets, &[1, 3, 2]),
            Error::Length { field: "chunk_offsets", len, expected: 3 } if len == offsets.len()
        );
    }
}

#[test]
fn chunk_offsets_decreasing() {
    assert_err!(
        chunks_from(&[0, 3, 2], &[1, 3]),
        Error::ChunkBoundaries {
            field: "chunk_offsets",
            seq: 1,
            index: 2,
            value: 2,
            ..
        }
    );
}

#[test]
fn chunk_offsets_not_starting_at_zero() {
    assert_err!(
        chunks_from(&[1, 3, 4], &[9, 1, 3, 2]),
        Error::ChunkBoundaries {
            field: "chunk_offsets",
            seq: 0,
            index: 0,
            value: 1,
            ..
        }
    );
}

#[test]
fn chunk_lengths_wrong_length() {
    for lengths in [&[][..], &[1, 3][..], &[1, 3, 2, 1][..]] {
        assert_err!(
            chunks_from(&[0, 2, 3], lengths),
            Error::Length { field: "chunk_lengths", len, expected: 3 } if len == lengths.len()
        );
    }
    // A huge last offset is a length mismatch, not an out-of-bounds read.
    assert_err!(
        chunks_from(&[0, 2, usize::MAX], &[1, 3, 2]),
        Error::Length {
            field: "chunk_lengths",
            len: 3,
            expected: usize::MAX
        }
    );
}

// ---------------------------------------------------------------------------------------------
// 2g. Chunks built for another batch
// ---------------------------------------------------------------------------------------------

/// `EvoAttention::new` on the fixture with chunks computed on `other`.
fn attn_with_chunks_of(other: Result<JaggedBatch>) -> Result<()> {
    let other = other.expect("the other batch is valid");
    let chunks = Chunks::personalized(&other, 4).expect("valid P");
    EvoAttention::new(&fixture(), &chunks, DIMS, AttnConfig::new(1, 3)).map(drop)
}

#[test]
fn chunks_of_a_batch_with_another_number_of_sequences() {
    let three = JaggedBatch::new(vec![0, 1, 2, 3], vec![0; 3], false, vec![T0; 3]);
    assert_err!(
        attn_with_chunks_of(three),
        Error::Length {
            field: "chunks.chunk_offsets",
            len: 4,
            expected: 3
        }
    );
    let none = JaggedBatch::new(vec![0], vec![], false, vec![]);
    assert_err!(
        attn_with_chunks_of(none),
        Error::Length {
            field: "chunks.chunk_offsets",
            len: 1,
            expected: 3
        }
    );
}

#[test]
fn chunks_of_a_batch_with_other_behavior_counts() {
    // Seq 1 without its candidate: 3 behaviors where the fixture has 2.
    assert_err!(
        attn_with_chunks_of(batch_with(|r| r.num_candidates[1] = 0)),
        Error::ChunksMismatch {
            seq: 1,
            chunked_behaviors: 3,
            batch_behaviors: 2
        }
    );
    // Seq 0 with no behaviors at all (all candidates).
    assert_err!(
        attn_with_chunks_of(batch_with(|r| r.num_candidates[0] = 6)),
        Error::ChunksMismatch {
            seq: 0,
            chunked_behaviors: 0,
            batch_behaviors: 4
        }
    );
}

#[test]
fn chunks_of_a_batch_with_shifted_positions() {
    // Same B and the same behavior counts, but no user tokens: every chunk sits one token early.
    // The counts agree, so the message reads "cover 4 behaviors but the batch has 4": it is the
    // positions that differ, which the variant cannot say.
    let shifted = JaggedBatch::new(
        vec![0, 6, 9],
        vec![2, 1],
        false,
        vec![T0, T0 + 5, T0 + 5, T0 + 90, T0, T0, T0, T0, T0],
    );
    assert_err!(
        attn_with_chunks_of(shifted),
        Error::ChunksMismatch {
            seq: 0,
            chunked_behaviors: 4,
            batch_behaviors: 4
        }
    );
}

// ---------------------------------------------------------------------------------------------
// 2h. Padded batches
// ---------------------------------------------------------------------------------------------
//
// Two rows of L = 4: row 0 = [u b b c], row 1 = [u b pad pad].

const PAD_MASK: [bool; 8] = [true, true, true, true, true, true, false, false];
const PAD_TS: [i64; 8] = [0, T0, T0 + 1, T0 + 2, 0, T0, -1, -1];

fn padded() -> (JaggedBatch, Padded) {
    Padded::to_jagged(&PAD_MASK, 4, &[1, 0], true, &PAD_TS).expect("valid padded batch")
}

#[test]
fn padded_mask_or_timestamps_wrong_length() {
    for len in [0, 7, 9] {
        let mask = vec![true; len];
        assert_err!(
            Padded::to_jagged(&mask, 4, &[1, 0], true, &PAD_TS),
            Error::Length { field: "mask", len: l, expected: 8 } if l == len
        );
        let ts = vec![T0; len];
        assert_err!(
            Padded::to_jagged(&PAD_MASK, 4, &[1, 0], true, &ts),
            Error::Length { field: "timestamps", len: l, expected: 8 } if l == len
        );
    }
    // B * L overflowing is its own error, not a wrapped length that could match.
    assert_err!(
        Padded::to_jagged(&[], usize::MAX, &[0, 0], false, &[]),
        Error::Padded {
            field: "max_len",
            value: usize::MAX,
            ..
        }
    );
}

#[test]
fn padded_layout_errors_come_from_the_jagged_checks() {
    // Row 1 has 2 real tokens: user token + 2 candidates do not fit.
    assert_err!(
        Padded::to_jagged(&PAD_MASK, 4, &[1, 2], true, &PAD_TS),
        Error::TooManyCandidates {
            seq: 1,
            num_candidates: 2,
            seq_len: 2,
            has_user_token: true
        }
    );
    // Row 0's second behavior goes back in time; the index is the packed one.
    let mut ts = PAD_TS;
    ts[2] = T0 - 1;
    assert_err!(
        Padded::to_jagged(&PAD_MASK, 4, &[1, 0], true, &ts),
        Error::DecreasingTimestamp { seq: 0, index: 2, value, previous }
            if value == T0 - 1 && previous == T0
    );
}

#[test]
fn pack_and_unpack_wrong_length() {
    let (_batch, padded) = padded();
    let row = 3;
    for len in [0, 8 * row - 1, 8 * row + 1, 6 * row] {
        assert_err!(
            padded.pack(&vec![1.0f32; len], row),
            Error::Length { field: "padded", len: l, expected: 24 } if l == len
        );
    }
    for len in [0, 6 * row - 1, 6 * row + 1, 8 * row] {
        assert_err!(
            padded.unpack(&vec![1.0f32; len], row, 0.0),
            Error::Length { field: "packed", len: l, expected: 18 } if l == len
        );
    }
    // The right lengths round-trip, pads filled.
    let x: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let packed = padded.pack(&x, row).expect("right length");
    let back = padded.unpack(&packed, row, -1.0).expect("right length");
    assert_eq!(&back[..18], &x[..18]);
    assert!(back[18..].iter().all(|&v| v == -1.0));
}

// ---------------------------------------------------------------------------------------------
// 2i. Display names the field
// ---------------------------------------------------------------------------------------------

/// One hand-built instance of every layout, tensor and parameter variant, including ones the
/// tests above reach only through their checks.
fn one_of_each_input_variant() -> Vec<Error> {
    vec![
        Error::SeqOffsetsEmpty,
        Error::SeqOffsetsStart { value: 1 },
        Error::SeqOffsetsDecreasing {
            index: 2,
            value: 1,
            previous: 3,
        },
        Error::SeqOffsetsEnd {
            value: 3,
            num_tokens: 4,
        },
        Error::Length {
            field: "gates",
            len: 1,
            expected: 2,
        },
        Error::Length {
            field: "chunks.chunk_offsets",
            len: 1,
            expected: 2,
        },
        Error::TooManyCandidates {
            seq: 0,
            num_candidates: 3,
            seq_len: 2,
            has_user_token: true,
        },
        Error::DecreasingTimestamp {
            seq: 0,
            index: 2,
            value: 1,
            previous: 2,
        },
        Error::TimeSpanTooLarge {
            seq: 0,
            span: 1 << 40,
        },
        Error::Zero { field: "window" },
        Error::UnsupportedHeadDim {
            value: 16,
            supported: SUPPORTED_HEAD_DIMS,
        },
        Error::OutOfRange {
            field: "scale",
            value: "NaN".into(),
            expected: "a finite positive number",
        },
        Error::ChunkBoundaries {
            field: "chunk_lengths",
            seq: 0,
            index: 1,
            value: 0,
            reason: "empty",
        },
        Error::ChunksMismatch {
            seq: 0,
            chunked_behaviors: 1,
            batch_behaviors: 2,
        },
        Error::Padded {
            field: "max_len",
            index: 0,
            value: usize::MAX,
            reason: "B * L overflows",
        },
        Error::DeviceMismatch {
            field: "batch",
            value: "B = 3".into(),
            expected: "B = 2".into(),
        },
    ]
}

#[test]
fn display_names_the_field_of_every_input_variant() {
    for err in one_of_each_input_variant() {
        assert_names_field(&err);
    }
}

#[test]
fn display_names_the_index_and_value() {
    // Spot checks that the numbers a caller needs are in the text, not only in the variant.
    let text = Error::SeqOffsetsDecreasing {
        index: 7,
        value: 11,
        previous: 13,
    }
    .to_string();
    assert!(
        text.contains("[7]") && text.contains("11") && text.contains("13"),
        "{text}"
    );
    let text = Error::DecreasingTimestamp {
        seq: 4,
        index: 21,
        value: -5,
        previous: 9,
    }
    .to_string();
    assert!(
        text.contains("[21]") && text.contains("-5") && text.contains('4'),
        "{text}"
    );
    let text = Error::ChunkBoundaries {
        field: "chunk_lengths",
        seq: 2,
        index: 5,
        value: 0,
        reason: "empty",
    }
    .to_string();
    assert!(
        text.contains("chunk_lengths[5]") && text.contains("sequence 2"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2j. Device entry points
// ---------------------------------------------------------------------------------------------

#[test]
fn compile_report_with_a_bad_arch_is_an_error() {
    // The architecture is checked before NVRTC is even looked for, so this holds with or
    // without NVRTC on the machine.
    for arch in ["sm_bogus", "sm_", "compute_90", "", "sm_9x"] {
        assert_err!(
            sparsectr_attn::cuda::compile_report(arch),
            Error::OutOfRange { field: "arch", .. }
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Regressions: overflow and malformed arguments that once panicked
// ---------------------------------------------------------------------------------------------

/// Runs `f`, failing the test with `what` if it panics instead of returning.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(_) => panic!("{what} panicked instead of returning an error"),
    }
}

#[test]
fn utc_offset_i64_min_is_rejected() {
    let temporal = RelTemporal {
        num_time_buckets: 64,
        utc_offset: i64::MIN,
    };
    let result = no_panic("RelTemporal::validate", || temporal.validate());
    assert_err!(
        result,
        Error::OutOfRange { field: "utc_offset", value, .. } if value == i64::MIN.to_string()
    );
}

#[test]
#[cfg(target_pointer_width = "64")]
fn huge_heads_is_an_error_not_a_panic() {
    // H = (2^64 + 2) / 3 with T = 3, D = 32: in a release build T*H*D wraps to 64 and H*3 wraps
    // to 2, so the wrapped expected lengths match these tiny tensors and validation passes.
    const HEADS: usize = 6_148_914_691_236_517_206;
    assert_eq!(HEADS as u128 * 3, (1u128 << 64) + 2);
    let batch = JaggedBatch::new(vec![0, 3], vec![3], false, vec![T0; 3]).expect("valid");
    let chunks = Chunks::personalized(&batch, 1).expect("valid P");
    let dims = Dims {
        heads: HEADS,
        head_dim: 32,
    };
    let (x, coeffs) = (vec![0.5f32; 64], vec![0.1f32; 2]);
    let inputs = Inputs {
        q: &x,
        k: &x,
        v: &x,
        coeffs: &coeffs,
        gates: None,
    };
    let result = no_panic("EvoAttention::new + reference::forward", || {
        EvoAttention::new(&batch, &chunks, dims, AttnConfig::new(1, 1))
            .and_then(|attn| reference::forward(&attn, &inputs).map(drop))
    });
    // A head count whose tensors cannot exist.
    assert_err!(
        result,
        Error::OutOfRange { field: "heads", ref value, .. } if value == &HEADS.to_string()
    );
}

#[test]
#[cfg(target_pointer_width = "64")]
fn huge_heads_on_an_empty_batch_is_an_error_not_a_panic() {
    // T = 0 makes every T * H * D length 0, so only H * D itself can overflow (it did, in
    // EvoAttention::new, before Dims::validate bounded H * 3 * D).
    let empty = JaggedBatch::new(vec![0], vec![], false, vec![]).expect("valid");
    let chunks = Chunks::personalized(&empty, 1).expect("valid P");
    let dims = Dims {
        heads: usize::MAX / 16,
        head_dim: 32,
    };
    assert_err!(
        no_panic("Dims::validate", || dims.validate()),
        Error::OutOfRange { field: "heads", value, .. } if value == (usize::MAX / 16).to_string()
    );
    let result = no_panic("EvoAttention::new", || {
        EvoAttention::new(&empty, &chunks, dims, AttnConfig::new(1, 1)).map(drop)
    });
    assert_err!(result, Error::OutOfRange { field: "heads", .. });
}

#[test]
fn generated_batches_too_large_to_exist_are_errors() {
    use sparsectr_attn::workload::{generate_batch, Rng};
    for (seqs, behaviors, candidates) in [
        (1, usize::MAX, 0),
        (1, 0, usize::MAX),
        (usize::MAX, 1, 1),
        (2, i32::MAX as usize / 2, 1),
    ] {
        let result = no_panic("workload::generate_batch", || {
            generate_batch(&mut Rng::new(1), seqs, behaviors, candidates, true)
        });
        assert_err!(
            result,
            Error::OutOfRange {
                field: "behaviors",
                ..
            }
        );
    }
    // The bound is the batch's size, not its parts: a small batch of the same parts is fine.
    let batch = generate_batch(&mut Rng::new(1), 3, 40, 4, true).expect("small batch");
    assert_eq!(batch.num_seqs(), 3);
}

#[test]
fn rng_range_over_every_u64_is_not_a_panic() {
    use sparsectr_attn::workload::Rng;
    let mut rng = Rng::new(7);
    // hi - lo + 1 overflowed here (a division by zero in a release build).
    let draws: Vec<u64> = (0..64)
        .map(|_| no_panic("Rng::range", || rng.range(0, u64::MAX)))
        .collect();
    assert!(draws.iter().any(|&x| x > u64::MAX / 2) && draws.iter().any(|&x| x <= u64::MAX / 2));
    assert_eq!(rng.range(9, 9), 9);
    assert!((0..256).all(|_| (3..=5).contains(&rng.range(3, 5))));
}

#[test]
fn pack_and_unpack_with_a_huge_row_are_errors() {
    let (_batch, padded) = padded();
    // B * L = 8 padded and T = 6 packed positions: 8 * row and 6 * row both wrap to 0 in a
    // release build, so the empty slices pass the length checks.
    let row = 1usize << 63;
    let result = no_panic("Padded::pack", || padded.pack::<f32>(&[], row));
    assert_err!(result, Error::Padded { field: "row", value, .. } if value == row);
    let result = no_panic("Padded::unpack", || padded.unpack::<f32>(&[], row, 0.0));
    assert_err!(result, Error::Padded { field: "row", value, .. } if value == row);
}

#[test]
fn compile_report_with_a_nul_in_arch_is_an_error() {
    let result = no_panic("cuda::compile_report", || {
        sparsectr_attn::cuda::compile_report("sm_90\0")
    });
    assert_err!(
        result,
        Error::OutOfRange { field: "arch", ref value, .. } if value.contains("sm_90\\0")
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Property tests
// ---------------------------------------------------------------------------------------------

/// One generated sequence: behaviors non-decreasing, candidates anywhere near the last behavior.
#[derive(Debug, Clone)]
struct GenSeq {
    user_time: i64,
    behaviors: Vec<i64>,
    candidates: Vec<i64>,
}

/// A generated valid batch.
#[derive(Debug, Clone)]
struct GenBatch {
    has_user_token: bool,
    seqs: Vec<GenSeq>,
}

fn gen_seq() -> impl Strategy<Value = GenSeq> {
    let base = prop_oneof![
        Just(T0),
        Just(0i64),
        -1_000_000_000_000i64..1_000_000_000_000
    ];
    // Ties (gap 0) are frequent on purpose: they are valid and sit next to the error case.
    let gap = prop_oneof![3 => Just(0i64), 3 => 1i64..60, 2 => 60i64..200_000];
    // Spans stay below 8 * 200_000 + 2 * 1_000_000 s, far from i32::MAX.
    (
        any::<i64>(),
        base,
        vec(gap, 0..8),
        vec(-1_000_000i64..1_000_000, 0..4),
    )
        .prop_map(|(user_time, base, gaps, candidate_offsets)| {
            let behaviors: Vec<i64> = gaps
                .iter()
                .scan(base, |t, gap| {
                    *t += gap;
                    Some(*t)
                })
                .collect();
            let anchor = behaviors.last().copied().unwrap_or(base);
            let candidates = candidate_offsets.iter().map(|d| anchor + d).collect();
            GenSeq {
                user_time,
                behaviors,
                candidates,
            }
        })
}

fn gen_batch() -> impl Strategy<Value = GenBatch> {
    (any::<bool>(), vec(gen_seq(), 0..6)).prop_map(|(has_user_token, seqs)| GenBatch {
        has_user_token,
        seqs,
    })
}

impl GenBatch {
    fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    fn user(&self) -> usize {
        usize::from(self.has_user_token)
    }

    fn raw(&self) -> Raw {
        let mut raw = Raw {
            offsets: vec![0],
            num_candidates: Vec::new(),
            has_user_token: self.has_user_token,
            timestamps: Vec::new(),
        };
        for s in &self.seqs {
            if self.has_user_token {
                raw.timestamps.push(s.user_time);
            }
            raw.timestamps.extend(&s.behaviors);
            raw.timestamps.extend(&s.candidates);
            raw.offsets.push(raw.timestamps.len());
            raw.num_candidates.push(s.candidates.len());
        }
        raw
    }

    /// Absolute index of the first token of sequence `s`.
    fn start(&self, s: usize) -> usize {
        self.seqs[..s]
            .iter()
            .map(|q| self.user() + q.behaviors.len() + q.candidates.len())
            .sum()
    }

    fn len(&self, s: usize) -> usize {
        self.user() + self.seqs[s].behaviors.len() + self.seqs[s].candidates.len()
    }

    /// Absolute index of behavior `i` (0-based) of sequence `s`.
    fn behavior(&self, s: usize, i: usize) -> usize {
        self.start(s) + self.user() + i
    }

    /// Absolute index of candidate `j` (0-based) of sequence `s`.
    fn candidate(&self, s: usize, j: usize) -> usize {
        self.behavior(s, self.seqs[s].behaviors.len()) + j
    }

    /// The sequences for which `eligible` holds, one picked by `pick`.
    fn pick_seq(&self, pick: usize, eligible: impl Fn(&GenSeq) -> bool) -> Option<usize> {
        let ids: Vec<usize> = (0..self.num_seqs())
            .filter(|&s| eligible(&self.seqs[s]))
            .collect();
        (!ids.is_empty()).then(|| ids[pick % ids.len()])
    }
}

/// Which timed token a span corruption moves, and which way.
#[derive(Debug, Clone, Copy)]
enum Edge {
    /// The first behavior, far into the past.
    FirstBehaviorDown,
    /// The last behavior, far into the future.
    LastBehaviorUp,
    /// A candidate, far into the future.
    CandidateUp,
    /// A candidate, far into the past.
    CandidateDown,
}

/// One thing wrong with an otherwise valid jagged batch.
#[derive(Debug, Clone)]
enum Corruption {
    EmptyOffsets,
    OffsetsStart {
        by: usize,
    },
    OffsetsDecreasing {
        pick: usize,
        by: usize,
    },
    OffsetsEnd {
        by: usize,
    },
    ExtraToken,
    MissingToken,
    NumCandidatesLength {
        longer: bool,
    },
    TooManyCandidates {
        pick: usize,
        by: usize,
    },
    DecreasingBehavior {
        pick: usize,
        at: usize,
        by: i64,
    },
    SpanTooLarge {
        pick: usize,
        at: usize,
        edge: Edge,
        by: i64,
    },
}

fn corruption() -> impl Strategy<Value = Corruption> {
    let pick = any::<usize>();
    let by = prop_oneof![3 => 1usize..4, 1 => Just(usize::MAX / 2)];
    let edge = prop_oneof![
        Just(Edge::FirstBehaviorDown),
        Just(Edge::LastBehaviorUp),
        Just(Edge::CandidateUp),
        Just(Edge::CandidateDown),
    ];
    prop_oneof![
        Just(Corruption::EmptyOffsets),
        (1usize..100).prop_map(|by| Corruption::OffsetsStart { by }),
        (pick, 1usize..5).prop_map(|(pick, by)| Corruption::OffsetsDecreasing { pick, by }),
        (1usize..5).prop_map(|by| Corruption::OffsetsEnd { by }),
        Just(Corruption::ExtraToken),
        Just(Corruption::MissingToken),
        any::<bool>().prop_map(|longer| Corruption::NumCandidatesLength { longer }),
        (pick, by).prop_map(|(pick, by)| Corruption::TooManyCandidates { pick, by }),
        (pick, pick, 1i64..1000).prop_map(|(pick, at, by)| Corruption::DecreasingBehavior {
            pick,
            at,
            by
        }),
        (
            pick,
            pick,
            edge,
            prop_oneof![1i64..1000, Just(1_000_000_000_000i64)]
        )
            .prop_map(|(pick, at, edge, by)| Corruption::SpanTooLarge {
                pick,
                at,
                edge,
                by
            }),
    ]
}

/// Applies `c` to `gen`, returning the broken arguments and the exact error they must produce,
/// or `None` when the batch has nothing to break that way (e.g. no sequence with 2 behaviors).
fn corrupt(gen: &GenBatch, c: &Corruption) -> Option<(Raw, Error)> {
    let mut raw = gen.raw();
    let b = gen.num_seqs();
    let t = raw.timestamps.len();
    let expected = match *c {
        Corruption::EmptyOffsets => {
            raw.offsets.clear();
            Error::SeqOffsetsEmpty
        }
        Corruption::OffsetsStart { by } => {
            raw.offsets[0] = by;
            Error::SeqOffsetsStart { value: by }
        }
        Corruption::OffsetsDecreasing { pick, by } => {
            // Raise an inner offset above its successor: the drop is right after it.
            if b < 2 {
                return None;
            }
            let i = 1 + pick % (b - 1);
            let next = raw.offsets[i + 1];
            raw.offsets[i] = next + by;
            Error::SeqOffsetsDecreasing {
                index: i + 1,
                value: next,
                previous: next + by,
            }
        }
        Corruption::OffsetsEnd { by } => {
            if b == 0 {
                return None; // the single offset is also the start
            }
            raw.offsets[b] += by;
            Error::SeqOffsetsEnd {
                value: t + by,
                num_tokens: t,
            }
        }
        Corruption::ExtraToken => {
            raw.timestamps.push(T0);
            Error::SeqOffsetsEnd {
                value: t,
                num_tokens: t + 1,
            }
        }
        Corruption::MissingToken => {
            raw.timestamps.pop()?;
            Error::SeqOffsetsEnd {
                value: t,
                num_tokens: t - 1,
            }
        }
        Corruption::NumCandidatesLength { longer } => {
            if longer {
                raw.num_candidates.push(0);
            } else {
                raw.num_candidates.pop()?;
            }
            Error::Length {
                field: "num_candidates",
                len: raw.num_candidates.len(),
                expected: b,
            }
        }
        Corruption::TooManyCandidates { pick, by } => {
            let s = gen.pick_seq(pick, |_| true)?;
            let k = (gen.len(s) - gen.user()).saturating_add(by);
            raw.num_candidates[s] = k;
            Error::TooManyCandidates {
                seq: s,
                num_candidates: k,
                seq_len: gen.len(s),
                has_user_token: gen.has_user_token,
            }
        }
        Corruption::DecreasingBehavior { pick, at, by } => {
            let s = gen.pick_seq(pick, |q| q.behaviors.len() >= 2)?;
            let i = 1 + at % (gen.seqs[s].behaviors.len() - 1);
            let previous = gen.seqs[s].behaviors[i - 1];
            let index = gen.behavior(s, i);
            raw.timestamps[index] = previous - by;
            Error::DecreasingTimestamp {
                seq: s,
                index,
                value: previous - by,
                previous,
            }
        }
        Corruption::SpanTooLarge { pick, at, edge, by } => {
            let needs_behavior = matches!(edge, Edge::FirstBehaviorDown | Edge::LastBehaviorUp);
            let s = gen.pick_seq(pick, |q| {
                let timed = q.behaviors.len() + q.candidates.len();
                let has_token = if needs_behavior {
                    !q.behaviors.is_empty()
                } else {
                    !q.candidates.is_empty()
                };
                timed >= 2 && has_token
            })?;
            let q = &gen.seqs[s];
            let token = match edge {
                Edge::FirstBehaviorDown => gen.behavior(s, 0),
                Edge::LastBehaviorUp => gen.behavior(s, q.behaviors.len() - 1),
                Edge::CandidateUp | Edge::CandidateDown => {
                    gen.candidate(s, at % q.candidates.len())
                }
            };
            // Move the token just past i32::MAX from the other extreme of the remaining timed
            // tokens; behaviors stay non-decreasing since the moved one becomes the extreme.
            let others: Vec<i64> = (gen.behavior(s, 0)..gen.start(s) + gen.len(s))
                .filter(|&i| i != token)
                .map(|i| raw.timestamps[i])
                .collect();
            let (lo, hi) = (*others.iter().min()?, *others.iter().max()?);
            raw.timestamps[token] = match edge {
                Edge::LastBehaviorUp | Edge::CandidateUp => lo + MAX_SPAN + by,
                Edge::FirstBehaviorDown | Edge::CandidateDown => hi - MAX_SPAN - by,
            };
            Error::TimeSpanTooLarge {
                seq: s,
                span: (MAX_SPAN + by) as i128,
            }
        }
    };
    Some((raw, expected))
}

/// One thing wrong with otherwise valid supplied chunk boundaries.
#[derive(Debug, Clone)]
enum ChunkCorruption {
    ZeroLength { pick: usize, at: usize },
    Overrun { pick: usize, by: usize },
    Undercover { pick: usize },
    OffsetsLength { longer: bool },
    OffsetsStart { by: usize },
    OffsetsDecreasing { pick: usize, by: usize },
    LengthsLength { longer: bool },
}

fn chunk_corruption() -> impl Strategy<Value = ChunkCorruption> {
    let pick = any::<usize>();
    prop_oneof![
        (pick, pick).prop_map(|(pick, at)| ChunkCorruption::ZeroLength { pick, at }),
        (pick, prop_oneof![1usize..4, Just(usize::MAX / 2)])
            .prop_map(|(pick, by)| ChunkCorruption::Overrun { pick, by }),
        pick.prop_map(|pick| ChunkCorruption::Undercover { pick }),
        any::<bool>().prop_map(|longer| ChunkCorruption::OffsetsLength { longer }),
        (1usize..10).prop_map(|by| ChunkCorruption::OffsetsStart { by }),
        (pick, 1usize..4).prop_map(|(pick, by)| ChunkCorruption::OffsetsDecreasing { pick, by }),
        any::<bool>().prop_map(|longer| ChunkCorruption::LengthsLength { longer }),
    ]
}

/// Splits `n` behaviors into consecutive chunks, cutting after every position `i` where
/// `cuts >> i` is odd.
fn partition(n: usize, cuts: u64) -> Vec<usize> {
    let mut lengths = Vec::new();
    let mut run = 0;
    for i in 0..n {
        run += 1;
        if i + 1 == n || (i < 64 && (cuts >> i) & 1 == 1) {
            lengths.push(run);
            run = 0;
        }
    }
    lengths
}

/// `[B + 1]` chunk offsets of per-sequence chunk length lists.
fn offsets_of(per_seq: &[Vec<usize>]) -> Vec<usize> {
    let mut offsets = vec![0];
    for lengths in per_seq {
        offsets.push(offsets.last().unwrap() + lengths.len());
    }
    offsets
}

/// Breaks a valid partition (`per_seq`) of `gen`'s behaviors; returns the boundaries and the
/// error they must produce with its free-text `reason` left empty, or `None` if inapplicable.
fn corrupt_chunks(
    gen: &GenBatch,
    mut per_seq: Vec<Vec<usize>>,
    c: &ChunkCorruption,
) -> Option<(Vec<usize>, Vec<usize>, Error)> {
    let b = gen.num_seqs();
    let boundary = |field, seq, index, value| Error::ChunkBoundaries {
        field,
        seq,
        index,
        value,
        reason: "",
    };
    let expected_after_edit = |per_seq: &[Vec<usize>], expected: Error| {
        let offsets = offsets_of(per_seq);
        let lengths = per_seq.concat();
        Some((offsets, lengths, expected))
    };
    match *c {
        ChunkCorruption::ZeroLength { pick, at } => {
            let s = gen.pick_seq(pick, |_| true)?;
            let pos = at % (per_seq[s].len() + 1);
            per_seq[s].insert(pos, 0);
            let index = offsets_of(&per_seq)[s] + pos;
            expected_after_edit(&per_seq, boundary("chunk_lengths", s, index, 0))
        }
        ChunkCorruption::Overrun { pick, by } => {
            let s = gen.pick_seq(pick, |_| true)?;
            match per_seq[s].last_mut() {
                Some(last) => *last += by,
                None => per_seq[s].push(by),
            }
            let index = offsets_of(&per_seq)[s + 1] - 1;
            let value = *per_seq[s].last().unwrap();
            expected_after_edit(&per_seq, boundary("chunk_lengths", s, index, value))
        }
        ChunkCorruption::Undercover { pick } => {
            let s = gen.pick_seq(pick, |q| !q.behaviors.is_empty())?;
            let last = per_seq[s].last_mut().unwrap();
            *last -= 1;
            if *last == 0 {
                per_seq[s].pop();
            }
            let value = offsets_of(&per_seq)[s + 1];
            expected_after_edit(&per_seq, boundary("chunk_offsets", s, s + 1, value))
        }
        ChunkCorruption::OffsetsLength { longer } => {
            let mut offsets = offsets_of(&per_seq);
            if longer {
                offsets.push(*offsets.last().unwrap());
            } else {
                offsets.pop();
            }
            let len = offsets.len();
            let expected = Error::Length {
                field: "chunk_offsets",
                len,
                expected: b + 1,
            };
            Some((offsets, per_seq.concat(), expected))
        }
        ChunkCorruption::OffsetsStart { by } => {
            let mut offsets = offsets_of(&per_seq);
            offsets[0] = by;
            Some((
                offsets,
                per_seq.concat(),
                boundary("chunk_offsets", 0, 0, by),
            ))
        }
        ChunkCorruption::OffsetsDecreasing { pick, by } => {
            if b < 2 {
                return None;
            }
            let i = 1 + pick % (b - 1);
            let mut offsets = offsets_of(&per_seq);
            let next = offsets[i + 1];
            offsets[i] = next + by;
            Some((
                offsets,
                per_seq.concat(),
                boundary("chunk_offsets", i, i + 1, next),
            ))
        }
        ChunkCorruption::LengthsLength { longer } => {
            let offsets = offsets_of(&per_seq);
            let mut lengths = per_seq.concat();
            if longer {
                lengths.push(1);
            } else {
                lengths.pop()?;
            }
            let expected = Error::Length {
                field: "chunk_lengths",
                len: lengths.len(),
                expected: offsets[b],
            };
            Some((offsets, lengths, expected))
        }
    }
}

/// Blanks the free-text reason so that errors compare on field, sequence, index and value.
fn without_reason(err: Error) -> Error {
    match err {
        Error::ChunkBoundaries {
            field,
            seq,
            index,
            value,
            ..
        } => Error::ChunkBoundaries {
            field,
            seq,
            index,
            value,
            reason: "",
        },
        other => other,
    }
}

/// One bad parameter or tensor of an attention call on an otherwise valid batch.
#[derive(Debug, Clone)]
enum ParamCorruption {
    Heads0,
    HeadDim(usize),
    NumChunks0,
    TailTokens0,
    Window0,
    TimeBuckets0,
    UtcOffset(i64),
    Scale(f32),
    /// Tensor `field` (0..5: q, k, v, coeffs, gates) grows or shrinks by `by`.
    TensorLength {
        field: usize,
        longer: bool,
        by: usize,
    },
    /// `coeffs[index % (H * 3)] = value`, non-finite.
    Coeff {
        index: usize,
        value: f32,
    },
}

fn param_corruption() -> impl Strategy<Value = ParamCorruption> {
    let unsupported =
        (0usize..300).prop_filter("unsupported", |d| !SUPPORTED_HEAD_DIMS.contains(d));
    let utc = prop_oneof![86_401i64..=i64::MAX, i64::MIN..-86_400];
    let scale = prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(0.0f32),
        Just(-0.0f32),
        f32::MIN..-0.0f32,
    ];
    let non_finite = prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)];
    prop_oneof![
        Just(ParamCorruption::Heads0),
        unsupported.prop_map(ParamCorruption::HeadDim),
        Just(ParamCorruption::NumChunks0),
        Just(ParamCorruption::TailTokens0),
        Just(ParamCorruption::Window0),
        Just(ParamCorruption::TimeBuckets0),
        utc.prop_map(ParamCorruption::UtcOffset),
        scale.prop_map(ParamCorruption::Scale),
        (0usize..5, any::<bool>(), 1usize..100)
            .prop_map(|(field, longer, by)| ParamCorruption::TensorLength { field, longer, by }),
        (any::<usize>(), non_finite)
            .prop_map(|(index, value)| ParamCorruption::Coeff { index, value }),
    ]
}

/// Runs the attention pipeline on `batch` with `c` applied and returns the first error:
/// chunking, `EvoAttention::new`, `Inputs::validate`, then `reference::forward` (which must agree
/// with `validate`).
fn run_with(batch: &JaggedBatch, num_chunks: usize, c: &ParamCorruption) -> Result<()> {
    let chunks = match c {
        ParamCorruption::NumChunks0 => Chunks::personalized(batch, 0)?,
        _ => Chunks::personalized(batch, num_chunks)?,
    };
    let mut dims = Dims {
        heads: 2,
        head_dim: 32,
    };
    let mut config = AttnConfig::new(2, 3);
    match *c {
        ParamCorruption::Heads0 => dims.heads = 0,
        ParamCorruption::HeadDim(d) => dims.head_dim = d,
        ParamCorruption::TailTokens0 => config.tail_tokens = 0,
        ParamCorruption::Window0 => config.window = 0,
        ParamCorruption::TimeBuckets0 => config.temporal.num_time_buckets = 0,
        ParamCorruption::UtcOffset(u) => config.temporal.utc_offset = u,
        ParamCorruption::Scale(s) => config.scale = Some(s),
        _ => {}
    }
    let attn = EvoAttention::new(batch, &chunks, dims, config);
    let via_new = attn.as_ref().map(drop).map_err(Clone::clone);
    assert_eq!(
        config.validate(dims).map(drop),
        via_new,
        "AttnConfig::validate and EvoAttention::new disagree"
    );
    let attn = attn?;
    let mut t = Tensors::valid(batch.num_tokens(), dims);
    match *c {
        ParamCorruption::TensorLength { field, longer, by } => {
            let tensor = [&mut t.q, &mut t.k, &mut t.v, &mut t.coeffs, &mut t.gates]
                .into_iter()
                .nth(field)
                .unwrap();
            let len = tensor.len();
            let new_len = if longer || len == 0 {
                len + by
            } else {
                len.saturating_sub(by)
            };
            tensor.resize(new_len, 0.5);
        }
        ParamCorruption::Coeff { index, value } => {
            let n = t.coeffs.len();
            t.coeffs[index % n] = value;
        }
        _ => {}
    }
    let inputs = t.inputs(false);
    let validated = inputs.validate(&attn);
    let forward = reference::forward(&attn, &inputs).map(drop);
    assert_eq!(validated, forward, "validate and forward disagree");
    forward
}

/// Whether `err` is exactly what `c` must produce on a batch of `num_tokens` tokens.
fn is_expected_param_error(c: &ParamCorruption, num_tokens: usize, err: &Error) -> bool {
    let tensor_len = |field: usize| match field {
        0..=2 => num_tokens * 2 * 32,
        3 => 6,
        _ => num_tokens * 2 * 3,
    };
    match (c, err) {
        (ParamCorruption::Heads0, Error::Zero { field }) => *field == "heads",
        (ParamCorruption::HeadDim(d), Error::UnsupportedHeadDim { value, supported }) => {
            value == d && *supported == SUPPORTED_HEAD_DIMS
        }
        (ParamCorruption::NumChunks0, Error::Zero { field }) => *field == "num_chunks",
        (ParamCorruption::TailTokens0, Error::Zero { field }) => *field == "tail_tokens",
        (ParamCorruption::Window0, Error::Zero { field }) => *field == "window",
        (ParamCorruption::TimeBuckets0, Error::Zero { field }) => *field == "num_time_buckets",
        (ParamCorruption::UtcOffset(u), Error::OutOfRange { field, value, .. }) => {
            *field == "utc_offset" && *value == u.to_string()
        }
        (ParamCorruption::Scale(s), Error::OutOfRange { field, value, .. }) => {
            *field == "scale" && *value == s.to_string()
        }
        (
            ParamCorruption::TensorLength { field, .. },
            Error::Length {
                field: f, expected, ..
            },
        ) => *f == ["q", "k", "v", "coeffs", "gates"][*field] && *expected == tensor_len(*field),
        (ParamCorruption::Coeff { index, .. }, Error::OutOfRange { field, value, .. }) => {
            *field == "coeffs" && value.ends_with(&format!("at index {}", index % 6))
        }
        _ => false,
    }
}

/// Garbage arguments for `JaggedBatch::new`: mostly near-valid (cumulative offsets, mostly
/// non-decreasing timestamps) so that both verdicts occur, with occasional wild values.
fn garbage() -> impl Strategy<Value = Raw> {
    let lens = vec(0usize..7, 0..6);
    let offset_edit = proptest::option::weighted(
        0.2,
        (any::<usize>(), prop_oneof![0usize..30, Just(usize::MAX)]),
    );
    let candidates = vec(prop_oneof![6 => 0usize..3, 1 => Just(usize::MAX)], 0..7);
    let base = prop_oneof![Just(T0), any::<i64>(), Just(i64::MIN), Just(i64::MAX)];
    // Mostly small forward steps; drops, the span limit and its neighbour, and wild values.
    let step = prop_oneof![
        16 => 0i64..100,
        1 => -100i64..0,
        1 => Just(MAX_SPAN),
        1 => Just(MAX_SPAN + 1),
        1 => any::<i64>(),
    ];
    let ts_len_delta = prop_oneof![4 => Just(0isize), 1 => -2isize..3];
    (
        lens,
        offset_edit,
        any::<bool>(),
        candidates,
        prop::bool::weighted(0.7),
        any::<bool>(),
        base,
        vec(step, 0..40),
        ts_len_delta,
    )
        .prop_map(
            |(lens, offset_edit, drop_offsets, mut k, fit_k, user, base, steps, delta)| {
                let mut offsets: Vec<usize> = std::iter::once(0)
                    .chain(lens.iter().scan(0, |acc, l| {
                        *acc += l;
                        Some(*acc)
                    }))
                    .collect();
                let num_tokens = *offsets.last().unwrap();
                if let Some((at, value)) = offset_edit {
                    let n = offsets.len();
                    offsets[at % n] = value;
                }
                if drop_offsets && lens.is_empty() {
                    offsets.clear();
                }
                if fit_k {
                    k.resize(lens.len(), 0);
                }
                let len = num_tokens.saturating_add_signed(delta);
                let mut timestamps = Vec::with_capacity(len);
                let mut t = base;
                for i in 0..len {
                    timestamps.push(t);
                    t = t.saturating_add(steps.get(i).copied().unwrap_or(1));
                }
                Raw {
                    offsets,
                    num_candidates: k,
                    has_user_token: user,
                    timestamps,
                }
            },
        )
}

/// An independent statement of SPEC section 1's validity, for the garbage test.
fn is_valid(raw: &Raw) -> bool {
    let o = &raw.offsets;
    if o.first() != Some(&0)
        || o.windows(2).any(|w| w[1] < w[0])
        || o.last() != Some(&raw.timestamps.len())
        || raw.num_candidates.len() != o.len() - 1
    {
        return false;
    }
    (0..o.len() - 1).all(|s| {
        let len = o[s + 1] - o[s];
        let user = usize::from(raw.has_user_token);
        let k = raw.num_candidates[s];
        if k as u128 + user as u128 > len as u128 {
            return false;
        }
        let behaviors = &raw.timestamps[o[s] + user..o[s + 1] - k];
        let timed = &raw.timestamps[o[s] + user..o[s + 1]];
        let sorted = behaviors.windows(2).all(|w| w[0] <= w[1]);
        let span = match (timed.iter().min(), timed.iter().max()) {
            (Some(&lo), Some(&hi)) => hi as i128 - lo as i128,
            _ => 0,
        };
        sorted && span <= MAX_SPAN as i128
    })
}

/// Checks the invariants every `Ok` batch guarantees, and that the rest of the pipeline runs on
/// it without error.
fn check_valid_batch(raw: &Raw, batch: &JaggedBatch) -> std::result::Result<(), TestCaseError> {
    let offsets = batch.seq_offsets();
    prop_assert_eq!(offsets, &raw.offsets[..]);
    prop_assert_eq!(offsets[0], 0);
    prop_assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    prop_assert_eq!(*offsets.last().unwrap(), batch.num_tokens());
    prop_assert_eq!(batch.num_candidates().len(), batch.num_seqs());
    let ts = batch.timestamps();
    for (s, span) in batch.seqs().enumerate() {
        prop_assert_eq!(span.tokens(), offsets[s]..offsets[s + 1]);
        prop_assert!(span.behaviors.start <= span.behaviors.end);
        let behaviors = &ts[span.behaviors.clone()];
        prop_assert!(behaviors.windows(2).all(|w| w[0] <= w[1]));
    }
    // A valid batch must be usable: chunking and a forward pass return Ok.
    for num_chunks in [1, 3, usize::MAX] {
        let chunks = Chunks::personalized(batch, num_chunks)?;
        let dims = Dims {
            heads: 1,
            head_dim: 32,
        };
        let config = AttnConfig::new(usize::MAX, usize::MAX);
        let attn = EvoAttention::new(batch, &chunks, dims, config)?;
        let t = Tensors::valid(batch.num_tokens(), dims);
        reference::forward(&attn, &t.inputs(true))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        max_global_rejects: 8192,
        ..ProptestConfig::default()
    })]

    /// A valid batch with one corruption fails with exactly the corruption's error.
    #[test]
    fn one_corruption_gives_its_error(gen in gen_batch(), c in corruption()) {
        prop_assert!(gen.raw().build().is_ok(), "the generator must produce valid batches");
        let applied = corrupt(&gen, &c);
        prop_assume!(applied.is_some());
        let (raw, expected) = applied.unwrap();
        match raw.build() {
            Ok(_) => prop_assert!(false, "expected {:?}, got Ok", expected),
            Err(err) => {
                prop_assert_eq!(&err, &expected);
                assert_names_field(&err);
            }
        }
    }

    /// Valid variations SPEC allows stay valid: candidates in any order and time, any user token
    /// time, and a span of exactly i32::MAX.
    #[test]
    fn benign_perturbations_stay_valid(
        gen in gen_batch(),
        user_times in vec(any::<i64>(), 6),
        reverse_candidates in any::<bool>(),
        stretch in any::<usize>(),
    ) {
        let mut gen = gen;
        for (s, q) in gen.seqs.iter_mut().enumerate() {
            q.user_time = user_times[s];
            if reverse_candidates {
                q.candidates.reverse();
            }
        }
        // Stretch one sequence's span to exactly i32::MAX by moving its last behavior, or its
        // first candidate when it has no behaviors.
        if let Some(s) = gen.pick_seq(stretch, |q| q.behaviors.len() + q.candidates.len() >= 2) {
            let q = &gen.seqs[s];
            let token = if q.behaviors.is_empty() {
                gen.candidate(s, 0)
            } else {
                gen.behavior(s, q.behaviors.len() - 1)
            };
            let mut raw = gen.raw();
            let lo = (gen.behavior(s, 0)..gen.start(s) + gen.len(s))
                .filter(|&i| i != token)
                .map(|i| raw.timestamps[i])
                .min()
                .unwrap();
            raw.timestamps[token] = lo + MAX_SPAN;
            let batch = raw.clone().build();
            prop_assert!(batch.is_ok(), "span exactly i32::MAX: {:?}", batch);
        }
        let raw = gen.raw();
        let batch = raw.clone().build()?;
        prop_assert_eq!(batch.timestamps(), &raw.timestamps[..]);
    }

    /// Supplied chunk boundaries: a valid partition is accepted, one corruption gives exactly its
    /// error.
    #[test]
    fn one_chunk_corruption_gives_its_error(
        gen in gen_batch(),
        cuts in vec(any::<u64>(), 6),
        c in chunk_corruption(),
    ) {
        let batch = gen.raw().build()?;
        let per_seq: Vec<Vec<usize>> = gen
            .seqs
            .iter()
            .zip(&cuts)
            .map(|(q, &cut)| partition(q.behaviors.len(), cut))
            .collect();
        let chunks = Chunks::from_lengths(&batch, &offsets_of(&per_seq), &per_seq.concat())?;
        prop_assert_eq!(chunks.num_chunks(), per_seq.iter().map(Vec::len).sum::<usize>());
        let applied = corrupt_chunks(&gen, per_seq, &c);
        prop_assume!(applied.is_some());
        let (offsets, lengths, expected) = applied.unwrap();
        match Chunks::from_lengths(&batch, &offsets, &lengths) {
            Ok(_) => prop_assert!(false, "expected {:?}, got Ok", expected),
            Err(err) => {
                assert_names_field(&err);
                prop_assert_eq!(without_reason(err), expected);
            }
        }
    }

    /// One bad parameter or tensor on a random batch (B = 0 included) gives its error.
    #[test]
    fn one_param_corruption_gives_its_error(
        gen in gen_batch(),
        num_chunks in 1usize..5,
        c in param_corruption(),
    ) {
        let batch = gen.raw().build()?;
        match run_with(&batch, num_chunks, &c) {
            Ok(()) => prop_assert!(false, "expected an error for {:?}, got Ok", c),
            Err(err) => {
                assert_names_field(&err);
                prop_assert!(
                    is_expected_param_error(&c, batch.num_tokens(), &err),
                    "{:?} gave {:?}", c, err
                );
            }
        }
    }

    /// Garbage never panics `JaggedBatch::new`; it is accepted exactly when SPEC says it is valid,
    /// and what it accepts keeps the layout's invariants and runs through the pipeline.
    #[test]
    fn garbage_never_panics(raw in garbage()) {
        let valid = is_valid(&raw);
        match raw.clone().build() {
            Ok(batch) => {
                prop_assert!(valid, "accepted an invalid batch: {:?}", raw);
                check_valid_batch(&raw, &batch)?;
            }
            Err(err) => {
                prop_assert!(!valid, "rejected a valid batch with {:?}: {:?}", err, raw);
                assert_names_field(&err);
            }
        }
    }
}
