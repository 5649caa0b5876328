//! The jagged batch layout of SPEC section 1, validated once on construction.
//!
//! ```text
//! sequence u = [ user token (optional) | behaviors b_1 .. b_n (oldest first) | candidates c_1 .. c_k ]
//! ```

use std::ops::Range;

use crate::error::{Error, Result};

/// Where the tokens of one sequence sit in the packed batch (absolute token indices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSpan {
    /// The user token, if the batch has them.
    pub user: Option<usize>,
    /// The behaviors `b_1 .. b_n`, oldest first.
    pub behaviors: Range<usize>,
    /// The candidates `c_1 .. c_k`.
    pub candidates: Range<usize>,
}

impl SeqSpan {
    /// All tokens of the sequence.
    pub fn tokens(&self) -> Range<usize> {
        self.user.unwrap_or(self.behaviors.start)..self.candidates.end
    }

    /// Number of behaviors `n`.
    pub fn num_behaviors(&self) -> usize {
        self.behaviors.len()
    }
}

/// A validated jagged batch: `B` sequences packed back to back into `T` tokens.
///
/// Construction checks everything SPEC section 7 lists for the layout, so every other part of the
/// crate trusts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JaggedBatch {
    seq_offsets: Vec<usize>,
    num_candidates: Vec<usize>,
    has_user_token: bool,
    timestamps: Vec<i64>,
}

impl JaggedBatch {
    /// Validates and builds a batch.
    ///
    /// - `seq_offsets`: `[B + 1]`, starts at 0, non-decreasing, ends at `T`.
    /// - `num_candidates`: `[B]`, candidates at the end of each sequence.
    /// - `has_user_token`: every sequence starts with a user token, or none does.
    /// - `timestamps`: `[T]` Unix seconds; behaviors non-decreasing within a sequence; the
    ///   behaviors and candidates of one sequence span at most `i32::MAX` seconds. The user
    ///   token's timestamp is ignored.
    pub fn new(
        seq_offsets: Vec<usize>,
        num_candidates: Vec<usize>,
        has_user_token: bool,
        timestamps: Vec<i64>,
    ) -> Result<Self> {
        let num_tokens = timestamps.len();
        let Some(&first) = seq_offsets.first() else {
            return Err(Error::SeqOffsetsEmpty);
        };
        if first != 0 {
            return Err(Error::SeqOffsetsStart { value: first });
        }
        for (index, w) in seq_offsets.windows(2).enumerate() {
            if w[1] < w[0] {
                return Err(Error::SeqOffsetsDecreasing {
                    index: index + 1,
                    value: w[1],
                    previous: w[0],
                });
            }
        }
        let last = *seq_offsets.last().unwrap_or(&0);
        if last != num_tokens {
            return Err(Error::SeqOffsetsEnd {
                value: last,
                num_tokens,
            });
        }
        let num_seqs = seq_offsets.len() - 1;
        if num_candidates.len() != num_seqs {
            return Err(Error::Length {
                field: "num_candidates",
                len: num_candidates.len(),
                expected: num_seqs,
            });
        }
        let batch = JaggedBatch {
            seq_offsets,
            num_candidates,
            has_user_token,
            timestamps,
        };
        for seq in 0..num_seqs {
            batch.validate_seq(seq)?;
        }
        Ok(batch)
    }

    fn validate_seq(&self, seq: usize) -> Result<()> {
        let (start, end) = (self.seq_offsets[seq], self.seq_offsets[seq + 1]);
        let len = end - start;
        let k = self.num_candidates[seq];
        let fixed = k.checked_add(usize::from(self.has_user_token));
        if fixed.is_none_or(|fixed| fixed > len) {
            return Err(Error::TooManyCandidates {
                seq,
                num_candidates: k,
                seq_len: len,
                has_user_token: self.has_user_token,
            });
        }
        let span = self.seq(seq);
        let ts = &self.timestamps;
        for index in span.behaviors.start + 1..span.behaviors.end {
            if ts[index] < ts[index - 1] {
                return Err(Error::DecreasingTimestamp {
                    seq,
                    index,
                    value: ts[index],
                    previous: ts[index - 1],
                });
            }
        }
        let timed = span.behaviors.start..span.candidates.end;
        if let (Some(lo), Some(hi)) = (ts[timed.clone()].iter().min(), ts[timed].iter().max()) {
            let width = *hi as i128 - *lo as i128;
            if width > i32::MAX as i128 {
                return Err(Error::TimeSpanTooLarge { seq, span: width });
            }
        }
        Ok(())
    }

    /// Number of sequences `B`.
    pub fn num_seqs(&self) -> usize {
        self.seq_offsets.len() - 1
    }

    /// Number of tokens `T`.
    pub fn num_tokens(&self) -> usize {
        self.timestamps.len()
    }

    /// `[B + 1]` sequence offsets.
    pub fn seq_offsets(&self) -> &[usize] {
        &self.seq_offsets
    }

    /// `[B]` candidates per sequence.
    pub fn num_candidates(&self) -> &[usize] {
        &self.num_candidates
    }

    /// Whether every sequence starts with a user token.
    pub fn has_user_token(&self) -> bool {
        self.has_user_token
    }

    /// `[T]` Unix seconds.
    pub fn timestamps(&self) -> &[i64] {
        &self.timestamps
    }

    /// Where sequence `seq` (`< B`) sits in the packed batch.
    pub fn seq(&self, seq: usize) -> SeqSpan {
        let (start, end) = (self.seq_offsets[seq], self.seq_offsets[seq + 1]);
        let user = self.has_user_token.then_some(start);
        let b_start = start + usize::from(self.has_user_token);
        let c_start = end - self.num_candidates[seq];
        SeqSpan {
            user,
            behaviors: b_start..c_start,
            candidates: c_start..end,
        }
    }

    /// Iterates the spans of all sequences in order.
    pub fn seqs(&self) -> impl ExactSizeIterator<Item = SeqSpan> + '_ {
        (0..self.num_seqs()).map(|s| self.seq(s))
    }

    /// Total number of behaviors over all sequences.
    pub fn num_behaviors(&self) -> usize {
        self.seqs().map(|s| s.num_behaviors()).sum()
    }
}

/// A padded `[B, L]` batch, the layout most data loaders produce, and its conversion to a
/// [`JaggedBatch`] by dropping the pads.
///
/// Valid positions of each row (where `mask` is true) keep their order; they must read
/// `[user token | behaviors | candidates]` once the pads are gone. Pads may sit anywhere (left,
/// right or between tokens).
#[derive(Debug, Clone)]
pub struct Padded {
    /// Row indices `(b, l)` of the kept tokens, in packed order: the packed token `t` came from
    /// padded position `kept[t]` (`b * L + l`).
    kept: Vec<usize>,
    padded_len: usize,
}

impl Padded {
    /// Builds the jagged batch from a padded one.
    ///
    /// - `mask`: `[B, L]`, true where a token is real.
    /// - `max_len`: `L`.
    /// - `num_candidates`: `[B]`, counted among the real tokens of each row.
    /// - `timestamps`: `[B, L]`; entries under pads are ignored.
    pub fn to_jagged(
        mask: &[bool],
        max_len: usize,
        num_candidates: &[usize],
        has_user_token: bool,
        timestamps: &[i64],
    ) -> Result<(JaggedBatch, Padded)> {
        let num_seqs = num_candidates.len();
        let expected = num_seqs.checked_mul(max_len).ok_or(Error::Padded {
            field: "max_len",
            index: 0,
            value: max_len,
            reason: "B * L overflows",
        })?;
        for (field, len) in [("mask", mask.len()), ("timestamps", timestamps.len())] {
            if len != expected {
                return Err(Error::Length {
                    field,
                    len,
                    expected,
                });
            }
        }
        let mut seq_offsets = Vec::with_capacity(num_seqs + 1);
        seq_offsets.push(0);
        let mut kept = Vec::new();
        for row in 0..num_seqs {
            for l in 0..max_len {
                if mask[row * max_len + l] {
                    kept.push(row * max_len + l);
                }
            }
            seq_offsets.push(kept.len());
        }
        let packed_ts = kept.iter().map(|&p| timestamps[p]).collect();
        let batch = JaggedBatch::new(
            seq_offsets,
            num_candidates.to_vec(),
            has_user_token,
            packed_ts,
        )?;
        Ok((
            batch,
            Padded {
                kept,
                padded_len: expected,
            },
        ))
    }

    /// Packs a padded tensor `[B, L, row]` into the jagged `[T, row]`.
    pub fn pack<T: Copy>(&self, padded: &[T], row: usize) -> Result<Vec<T>> {
        let expected = row_len(self.padded_len, row)?;
        row_len(self.kept.len(), row)?;
        if padded.len() != expected {
            return Err(Error::Length {
                field: "padded",
                len: padded.len(),
                expected,
            });
        }
        let mut out = Vec::with_capacity(self.kept.len() * row);
        for &p in &self.kept {
            out.extend_from_slice(&padded[p * row..(p + 1) * row]);
        }
        Ok(out)
    }

    /// Scatters a jagged `[T, row]` tensor back to `[B, L, row]`, writing `fill` under pads.
    pub fn unpack<T: Copy>(&self, packed: &[T], row: usize, fill: T) -> Result<Vec<T>> {
        let expected = row_len(self.kept.len(), row)?;
        row_len(self.padded_len, row)?;
        if packed.len() != expected {
            return Err(Error::Length {
                field: "packed",
                len: packed.len(),
                expected,
            });
        }
        let mut out = vec![fill; self.padded_len * row];
        for (t, &p) in self.kept.iter().enumerate() {
            out[p * row..(p + 1) * row].copy_from_slice(&packed[t * row..(t + 1) * row]);
        }
        Ok(out)
    }
}

/// `rows * row`, or an error naming `row` if it overflows.
fn row_len(rows: usize, row: usize) -> Result<usize> {
    rows.checked_mul(row).ok_or(Error::Padded {
        field: "row",
        index: 0,
        value: row,
        reason: "rows * row overflows usize",
    })
}
