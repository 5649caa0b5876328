//! SPEC section 9: the example of the paper's Figure 1, checked cell by cell, plus RelTemporal
//! values worked out by hand.

use sparsectr_attn::temporal::{is_weekend, time_bucket};
use sparsectr_attn::{
    reference, AttnConfig, Branch, Chunks, Dims, EvoAttention, JaggedBatch, Key, RelTemporal,
    Widened,
};

const DAY: i64 = 86_400;
/// Fri 2023-11-10 23:00:00 UTC.
const B1: i64 = 1_699_657_200;

/// Tokens: u = 0, b1..b8 = 1..8, c1 = 9, c2 = 10.
fn figure1_batch() -> JaggedBatch {
    let b = [
        B1,
        B1 + 2,
        B1 + 2 + DAY,
        B1 + 2 + DAY + 3,
        B1 + 2 + DAY + 13,
        B1 + 2 + DAY + 813,
        B1 + 2 + DAY + 873,
        B1 + 2 + DAY + 913,
    ];
    let request = b[7] + 120;
    let mut ts = vec![0];
    ts.extend(b);
    ts.extend([request, request]);
    JaggedBatch::new(vec![0, 11], vec![2], true, ts).unwrap()
}

fn tok(ids: &[usize]) -> Vec<Key> {
    ids.iter().map(|&j| Key::Token(j)).collect()
}

fn sums(ids: &[usize]) -> Vec<Key> {
    ids.iter().map(|&c| Key::Summary(c)).collect()
}

#[test]
fn chunks_and_tails_match_figure_1() {
    let batch = figure1_batch();
    let chunks = Chunks::personalized(&batch, 3).unwrap();
    assert_eq!(chunks.num_chunks(), 3);
    assert_eq!(chunks.span(0), 1..3, "C1 = {{b1, b2}}");
    assert_eq!(chunks.span(1), 3..6, "C2 = {{b3, b4, b5}}");
    assert_eq!(chunks.span(2), 6..9, "C3 = {{b6, b7, b8}}");
    let tails: Vec<_> = (0..3).map(|c| chunks.tail(c, 1)).collect();
    assert_eq!(tails, vec![2..3, 5..6, 8..9], "tails b2, b5, b8");
    // m larger than a chunk takes the whole chunk.
    assert_eq!(chunks.tail(0, 5), 1..3);
}

#[test]
fn key_sets_match_figure_1_row_by_row() {
    let batch = figure1_batch();
    let chunks = Chunks::personalized(&batch, 3).unwrap();
    let dims = Dims {
        heads: 1,
        head_dim: 32,
    };
    let attn = EvoAttention::new(&batch, &chunks, dims, AttnConfig::new(1, 3)).unwrap();
    // (query, global, transition, local) as in SPEC section 9.
    type Row = (usize, Vec<Key>, Vec<Key>, Vec<Key>);
    #[rustfmt::skip]
    let rows: Vec<Row> = vec![
        (0, vec![], vec![], vec![]),
        (1, vec![], vec![], tok(&[0, 1])),
        (2, sums(&[0]), tok(&[2]), tok(&[0, 1, 2])),
        (3, sums(&[0]), tok(&[2]), tok(&[0, 1, 2, 3])),
        (4, sums(&[0]), tok(&[2]), tok(&[0, 2, 3, 4])),
        (5, sums(&[0, 1]), tok(&[2, 5]), tok(&[0, 3, 4, 5])),
        (6, sums(&[0, 1]), tok(&[2, 5]), tok(&[0, 4, 5, 6])),
        (7, sums(&[0, 1]), tok(&[2, 5]), tok(&[0, 5, 6, 7])),
        (8, sums(&[0, 1, 2]), tok(&[2, 5, 8]), tok(&[0, 6, 7, 8])),
        (9, sums(&[0, 1, 2]), tok(&[2, 5, 8]), tok(&[0, 7, 8, 9])),
        (10, sums(&[0, 1, 2]), tok(&[2, 5, 8]), tok(&[0, 7, 8, 10])),
    ];
    let mut got = Vec::new();
    for (q, global, transition, local) in rows {
        for (branch, want) in [
            (Branch::Global, global),
            (Branch::Transition, transition),
            (Branch::Local, local),
        ] {
            attn.keys(0, q, branch, &mut got);
            assert_eq!(got, want, "query token {q}, branch {branch:?}");
        }
    }
}

#[test]
fn weekday_groups_match_figure_1() {
    let ts = figure1_batch().timestamps().to_vec();
    for (token, &t) in ts.iter().enumerate().skip(1) {
        let weekend = token >= 3; // b3.. and the candidates fall on Saturday
        assert_eq!(is_weekend(t, 0), weekend, "token {token} at {t}");
    }
    // Shifting the clock by +1 h moves b1 (Fri 23:00) into Saturday.
    assert!(is_weekend(B1, 3600));
    // Before 1970 the day index is floored: 1969-12-31 (Wed) 23:59:59 is a weekday,
    // 1969-12-28 (Sun) is a weekend.
    assert!(!is_weekend(-1, 0));
    assert!(is_weekend(-4 * DAY + 10, 0));
}

#[test]
fn buckets_match_spec_examples() {
    let expected = [(0u64, 0u32), (1, 2), (2, 3), (3, 4), (5, 5), (6, 5), (7, 6)];
    for (dt, bucket) in expected {
        assert_eq!(time_bucket(dt), bucket, "bucket({dt})");
    }
    assert_eq!(
        time_bucket(365 * DAY as u64),
        49,
        "one year is about bucket 49"
    );
    assert_eq!(time_bucket(DAY as u64), 32);
    assert_eq!(time_bucket(900), 19);
    assert_eq!(time_bucket(120), 13);
}

#[test]
fn bias_values_worked_by_hand() {
    let batch = figure1_batch();
    let chunks = Chunks::personalized(&batch, 3).unwrap();
    let dims = Dims {
        heads: 1,
        head_dim: 32,
    };
    let attn = EvoAttention::new(&batch, &chunks, dims, AttnConfig::new(1, 3)).unwrap();
    let tm = RelTemporal::default();
    let s = [0.7, -1.3, 2.1];
    let pi = std::f64::consts::PI;
    let bias = |q: usize, key: Key| tm.bias(s, attn.query_time(0, q), attn.key_time(0, key));
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + b.abs());
    // b3 -> summary C1 (time of b2): one day exactly (bucket 32), whole day (Hr 0),
    // Saturday vs Friday (Wk -1).
    let want = 0.7 * (-32.0 / 64.0) - 2.1;
    assert!(close(bias(3, Key::Summary(0)), want));
    // b8 -> b5: 900 s (bucket 19), same day type.
    let want = 0.7 * (-19.0 / 64.0) - 1.3 * -(pi * 900.0 / 86_400.0).sin().powi(2);
    assert!(close(bias(8, Key::Token(5)), want));
    // c1 -> summary C3 (time of b8): 120 s.
    let want = 0.7 * (-13.0 / 64.0) - 1.3 * -(pi * 120.0 / 86_400.0).sin().powi(2);
    assert!(close(bias(9, Key::Summary(2)), want));
    // b2 -> b1: 2 s, both Friday.
    let want = 0.7 * (-3.0 / 64.0) - 1.3 * -(pi * 2.0 / 86_400.0).sin().powi(2);
    assert!(close(bias(2, Key::Token(1)), want));
    // Any query -> the user token, and a candidate -> itself: no bias at all.
    assert_eq!(bias(9, Key::Token(0)), 0.0);
    assert_eq!(bias(9, Key::Token(9)), 0.0);
    // Half a day is the hour-of-day minimum; NB = 4 saturates a one-day gap.
    assert!(close(tm.features(Some(0), Some(DAY / 2))[1], -1.0));
    let short = RelTemporal {
        num_time_buckets: 4,
        utc_offset: 0,
    };
    assert_eq!(short.features(Some(0), Some(DAY))[0], -1.0);
}

/// The local branch of b1 sees the user token and b1 itself, both with zero bias: its output is a
/// two-way softmax that is easy to write out independently.
#[test]
fn forward_of_first_behavior_written_out() {
    let batch = figure1_batch();
    let chunks = Chunks::personalized(&batch, 3).unwrap();
    let (h, d) = (2, 32);
    let dims = Dims {
        heads: h,
        head_dim: d,
    };
    let attn = EvoAttention::new(&batch, &chunks, dims, AttnConfig::new(1, 3)).unwrap();
    let n = batch.num_tokens() * h * d;
    let mut rng = sparsectr_attn::workload::Rng::new(9);
    let mut draw = || (0..n).map(|_| rng.normal()).collect::<Vec<f64>>();
    let inp = Widened {
        q: draw(),
        k: draw(),
        v: draw(),
        coeffs: vec![0.3, 0.2, 0.9, -0.4, 1.1, 0.5],
        gates: Some(
            (0..batch.num_tokens() * h * 3)
                .map(|i| 0.5 + (i % 5) as f64 / 7.0)
                .collect(),
        ),
    };
    let out = reference::forward_f64(&attn, &inp).unwrap();
    let row = |x: &[f64], t: usize, hh: usize| x[(t * h + hh) * d..(t * h + hh + 1) * d].to_vec();
    let scale = 1.0 / (d as f64).sqrt();
    for head in 0..h {
        let q = row(&inp.q, 1, head);
        let z: Vec<f64> = [0usize, 1]
            .iter()
            .map(|&j| {
                scale
                    * q.iter()
                        .zip(row(&inp.k, j, head))
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
            })
            .collect();
        let lse = (z[0].exp() + z[1].exp()).ln();
        let (p0, p1) = ((z[0] - lse).exp(), (z[1] - lse).exp());
        let (v0, v1) = (row(&inp.v, 0, head), row(&inp.v, 1, head));
        let gate = inp.gates.as_ref().unwrap()[(h + head) * 3 + 2];
        let o = row(&out.o, 1, head);
        for x in 0..d {
            let want = gate * (p0 * v0[x] + p1 * v1[x]);
            assert!((o[x] - want).abs() < 1e-12, "head {head} dim {x}");
        }
        let lse_row = &out.lse[(h + head) * 3..(h + head) * 3 + 3];
        assert_eq!(lse_row[..2], [f64::NEG_INFINITY; 2]);
        assert!((lse_row[2] - lse).abs() < 1e-12);
    }
    // The user token's output is exactly zero.
    assert!(row(&out.o, 0, 0).iter().all(|&x| x == 0.0));
}
