//! Properties of personalized time-aware chunking (SPEC section 2).

mod common;

use proptest::prelude::*;
use sparsectr_attn::{Chunks, JaggedBatch};

/// Cut positions (index of the behavior before each cut, absolute) of sequence `seq`.
fn cuts_of(chunks: &Chunks, seq: usize) -> Vec<usize> {
    let ids = chunks.of_seq(seq);
    ids.clone()
        .take(ids.len().saturating_sub(1))
        .map(|c| chunks.last(c))
        .collect()
}

/// The obvious algorithm: sort every positive gap by (size desc, index asc), keep P - 1.
fn oracle_cuts(batch: &JaggedBatch, seq: usize, p: usize) -> Vec<usize> {
    let ts = batch.timestamps();
    let b = batch.seq(seq).behaviors;
    let mut gaps: Vec<(i64, usize)> = (b.start..b.end.saturating_sub(1))
        .map(|i| (ts[i + 1] - ts[i], i))
        .filter(|g| g.0 > 0)
        .collect();
    gaps.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
    let mut cuts: Vec<usize> = gaps.into_iter().take(p - 1).map(|g| g.1).collect();
    cuts.sort();
    cuts
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn chunking_properties(batch in common::batch(5, 40, 3), p in 1usize..12) {
        let chunks = Chunks::personalized(&batch, p).unwrap();
        prop_assert_eq!(chunks.num_seqs(), batch.num_seqs());
        chunks.check_matches(&batch).unwrap();
        let ts = batch.timestamps();
        for (seq, span) in batch.seqs().enumerate() {
            let ids = chunks.of_seq(seq);
            let b = span.behaviors.clone();
            // Partition: consecutive, non-empty, covering exactly the behaviors.
            let mut pos = b.start;
            for c in ids.clone() {
                prop_assert_eq!(chunks.span(c).start, pos);
                prop_assert!(chunks.span(c).end > pos, "empty chunk {}", c);
                pos = chunks.span(c).end;
            }
            prop_assert_eq!(pos, b.end);
            // At most P chunks; none iff no behaviors; one more than the cuts otherwise.
            let positive: Vec<(i64, usize)> = (b.start..b.end.saturating_sub(1))
                .map(|i| (ts[i + 1] - ts[i], i))
                .filter(|g| g.0 > 0)
                .collect();
            let expected = if b.is_empty() { 0 } else { 1 + positive.len().min(p - 1) };
            prop_assert_eq!(ids.len(), expected);
            prop_assert!(ids.len() <= p);
            let cuts = cuts_of(&chunks, seq);
            for &i in &cuts {
                // Simultaneous behaviors are never separated.
                prop_assert!(ts[i + 1] > ts[i], "cut at zero gap after token {}", i);
            }
            // Every cut gap >= every uncut positive gap; at equal gaps the earlier one is cut.
            for &(g, i) in &positive {
                if cuts.contains(&i) {
                    continue;
                }
                for &c in &cuts {
                    let gc = ts[c + 1] - ts[c];
                    prop_assert!(gc > g || (gc == g && c < i),
                        "uncut gap {} after {} beats cut gap {} after {}", g, i, gc, c);
                }
            }
            prop_assert_eq!(cuts, oracle_cuts(&batch, seq, p));
        }
    }

    #[test]
    fn supplied_boundaries_round_trip(batch in common::batch(5, 30, 2), p in 1usize..8) {
        let chunks = Chunks::personalized(&batch, p).unwrap();
        let lengths: Vec<usize> = (0..chunks.num_chunks()).map(|c| chunks.span(c).len()).collect();
        let supplied = Chunks::from_lengths(&batch, chunks.chunk_offsets(), &lengths).unwrap();
        prop_assert_eq!(supplied, chunks);
    }
}

/// Builds one sequence of behaviors (no user token, no candidates) at the given times.
fn one_seq(ts: &[i64]) -> JaggedBatch {
    JaggedBatch::new(vec![0, ts.len()], vec![0], false, ts.to_vec()).unwrap()
}

#[test]
fn empty_and_single_behavior() {
    let empty = JaggedBatch::new(vec![0, 1], vec![0], true, vec![5]).unwrap();
    let c = Chunks::personalized(&empty, 4).unwrap();
    assert_eq!(c.num_chunks(), 0);
    assert_eq!(c.of_seq(0), 0..0);

    let single = one_seq(&[100]);
    let c = Chunks::personalized(&single, 4).unwrap();
    assert_eq!(c.num_chunks(), 1);
    assert_eq!(c.span(0), 0..1);

    let no_seqs = JaggedBatch::new(vec![0], vec![], false, vec![]).unwrap();
    assert_eq!(Chunks::personalized(&no_seqs, 3).unwrap().num_chunks(), 0);
}

#[test]
fn ties_go_to_the_earlier_gap_and_zero_gaps_are_never_cut() {
    // Gaps: 10, 0, 10, 10, 0. Two cuts: the first two gaps of size 10 (after t0 and after t2).
    let batch = one_seq(&[0, 10, 10, 20, 30, 30]);
    let c = Chunks::personalized(&batch, 3).unwrap();
    assert_eq!(cuts_of(&c, 0), vec![0, 2]);
    // P far larger than the number of positive gaps: cut at each of the three, never at a zero.
    let c = Chunks::personalized(&batch, 100).unwrap();
    assert_eq!(cuts_of(&c, 0), vec![0, 2, 3]);
    // All simultaneous: one chunk whatever P.
    let c = Chunks::personalized(&one_seq(&[7, 7, 7, 7]), 5).unwrap();
    assert_eq!(c.num_chunks(), 1);
    // P = 1: never cut.
    assert_eq!(Chunks::personalized(&batch, 1).unwrap().num_chunks(), 1);
}

#[test]
fn thresholds_are_personal() {
    // User 0's largest gap is 100 s, user 1's smallest is 1000 s: each is cut at its own largest.
    let ts = vec![0, 1, 101, 102, 0, 1000, 5000, 6000];
    let batch = JaggedBatch::new(vec![0, 4, 8], vec![0, 0], false, ts).unwrap();
    let c = Chunks::personalized(&batch, 2).unwrap();
    assert_eq!(cuts_of(&c, 0), vec![1]);
    assert_eq!(cuts_of(&c, 1), vec![5]);
}
