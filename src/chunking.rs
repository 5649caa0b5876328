//! Personalized time-aware chunking (SPEC section 2) and caller-supplied chunk boundaries.
//!
//! Each user's behaviors are cut after that user's own `P - 1` largest positive time gaps, so the
//! threshold is personal. Ties go to the earlier gap; simultaneous behaviors (gap 0) are never
//! separated.

use std::ops::Range;

use crate::batch::JaggedBatch;
use crate::error::{Error, Result};

/// The chunks of every sequence of a batch: consecutive runs of behaviors, in time order.
///
/// Chunk ids are global over the batch; the chunks of sequence `u` are
/// `chunk_offsets[u]..chunk_offsets[u + 1]`. Spans are absolute token indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunks {
    chunk_offsets: Vec<usize>,
    starts: Vec<usize>,
    ends: Vec<usize>,
}

impl Chunks {
    /// Personalized time-aware chunking with at most `num_chunks` (`P >= 1`) chunks per sequence.
    ///
    /// Runs in `O(n)` per sequence of `n` behaviors (selection, not sorting, of the largest gaps).
    pub fn personalized(batch: &JaggedBatch, num_chunks: usize) -> Result<Chunks> {
        if num_chunks == 0 {
            return Err(Error::Zero {
                field: "num_chunks",
            });
        }
        let ts = batch.timestamps();
        let num_seqs = batch.num_seqs();
        let mut chunks = Chunks {
            chunk_offsets: Vec::with_capacity(num_seqs + 1),
            starts: Vec::new(),
            ends: Vec::new(),
        };
        chunks.chunk_offsets.push(0);
        // (gap, position of the behavior before the gap) of every positive gap; reused.
        let mut gaps: Vec<(i64, usize)> = Vec::new();
        let mut cuts: Vec<usize> = Vec::new();
        for seq in batch.seqs() {
            let b = seq.behaviors;
            gaps.clear();
            cuts.clear();
            gaps.extend(
                (b.start..b.end.saturating_sub(1))
                    .map(|i| (ts[i + 1] - ts[i], i))
                    .filter(|&(gap, _)| gap > 0),
            );
            let max_cuts = num_chunks - 1;
            if gaps.len() > max_cuts {
                if max_cuts > 0 {
                    // Larger gap first; among equal gaps the earlier one wins.
                    gaps.select_nth_unstable_by(max_cuts - 1, |a, b| {
                        b.0.cmp(&a.0).then(a.1.cmp(&b.1))
                    });
                }
                gaps.truncate(max_cuts);
            }
            cuts.extend(gaps.iter().map(|&(_, i)| i));
            cuts.sort_unstable();
            if !b.is_empty() {
                let mut start = b.start;
                for &i in &cuts {
                    chunks.starts.push(start);
                    chunks.ends.push(i + 1);
                    start = i + 1;
                }
                chunks.starts.push(start);
                chunks.ends.push(b.end);
            }
            chunks.chunk_offsets.push(chunks.starts.len());
        }
        Ok(chunks)
    }

    /// Chunks from caller-supplied boundaries, validated to partition each sequence's behaviors.
    ///
    /// - `chunk_offsets`: `[B + 1]`, the chunks of sequence `u` are
    ///   `chunk_offsets[u]..chunk_offsets[u + 1]`;
    /// - `chunk_lengths`: `[chunk_offsets[B]]`, behaviors per chunk in time order, each `>= 1`,
    ///   summing to the sequence's number of behaviors.
    pub fn from_lengths(
        batch: &JaggedBatch,
        chunk_offsets: &[usize],
        chunk_lengths: &[usize],
    ) -> Result<Chunks> {
        let num_seqs = batch.num_seqs();
        if chunk_offsets.len() != num_seqs + 1 {
            return Err(Error::Length {
                field: "chunk_offsets",
                len: chunk_offsets.len(),
                expected: num_seqs + 1,
            });
        }
        if chunk_offsets[0] != 0 {
            return Err(Error::ChunkBoundaries {
                field: "chunk_offsets",
                seq: 0,
                index: 0,
                value: chunk_offsets[0],
                reason: "must start at 0",
            });
        }
        for seq in 0..num_seqs {
            if chunk_offsets[seq + 1] < chunk_offsets[seq] {
                return Err(Error::ChunkBoundaries {
                    field: "chunk_offsets",
                    seq,
                    index: seq + 1,
                    value: chunk_offsets[seq + 1],
                    reason: "decreasing",
                });
            }
        }
        if chunk_offsets[num_seqs] != chunk_lengths.len() {
            return Err(Error::Length {
                field: "chunk_lengths",
                len: chunk_lengths.len(),
                expected: chunk_offsets[num_seqs],
            });
        }
        let mut starts = Vec::with_capacity(chunk_lengths.len());
        let mut ends = Vec::with_capacity(chunk_lengths.len());
        for (seq, span) in batch.seqs().enumerate() {
            let mut pos = span.behaviors.start;
            let ids = chunk_offsets[seq]..chunk_offsets[seq + 1];
            for (index, &len) in ids.clone().zip(&chunk_lengths[ids]) {
                if len == 0 {
                    return Err(Error::ChunkBoundaries {
                        field: "chunk_lengths",
                        seq,
                        index,
                        value: len,
                        reason: "a chunk must hold at least one behavior",
                    });
                }
                let end = pos.saturating_add(len);
                if end > span.behaviors.end {
                    return Err(Error::ChunkBoundaries {
                        field: "chunk_lengths",
                        seq,
                        index,
                        value: len,
                        reason: "chunks run past the sequence's behaviors",
                    });
                }
                starts.push(pos);
                ends.push(end);
                pos = end;
            }
            if pos != span.behaviors.end {
                return Err(Error::ChunkBoundaries {
                    field: "chunk_offsets",
                    seq,
                    index: seq + 1,
                    value: chunk_offsets[seq + 1],
                    reason: "chunks leave behaviors of the sequence uncovered",
                });
            }
        }
        Ok(Chunks {
            chunk_offsets: chunk_offsets.to_vec(),
            starts,
            ends,
        })
    }

    /// Checks that these chunks partition the behaviors of `batch` (they were built for it).
    pub fn check_matches(&self, batch: &JaggedBatch) -> Result<()> {
        if self.num_seqs() != batch.num_seqs() {
            return Err(Error::Length {
                field: "chunks.chunk_offsets",
                len: self.chunk_offsets.len(),
                expected: batch.num_seqs() + 1,
            });
        }
        for (seq, span) in batch.seqs().enumerate() {
            let ids = self.of_seq(seq);
            let mut pos = span.behaviors.start;
            let mut ok = true;
            for c in ids {
                ok &= self.starts[c] == pos && self.ends[c] > pos;
                pos = self.ends[c];
            }
            if !ok || pos != span.behaviors.end {
                let covered = self
                    .of_seq(seq)
                    .map(|c| self.ends[c] - self.starts[c])
                    .sum();
                return Err(Error::ChunksMismatch {
                    seq,
                    chunked_behaviors: covered,
                    batch_behaviors: span.num_behaviors(),
                });
            }
        }
        Ok(())
    }

    /// Number of sequences the chunks were built for.
    pub fn num_seqs(&self) -> usize {
        self.chunk_offsets.len() - 1
    }

    /// Total number of chunks over the batch.
    pub fn num_chunks(&self) -> usize {
        self.starts.len()
    }

    /// `[B + 1]`: the chunks of sequence `u` are `chunk_offsets[u]..chunk_offsets[u + 1]`.
    pub fn chunk_offsets(&self) -> &[usize] {
        &self.chunk_offsets
    }

    /// Global ids of the chunks of sequence `seq`, in time order.
    pub fn of_seq(&self, seq: usize) -> Range<usize> {
        self.chunk_offsets[seq]..self.chunk_offsets[seq + 1]
    }

    /// Absolute token span `[s_k, e_k + 1)` of chunk `c`.
    pub fn span(&self, c: usize) -> Range<usize> {
        self.starts[c]..self.ends[c]
    }

    /// The tail tokens of chunk `c`: its last `min(m, |C|)` behaviors.
    pub fn tail(&self, c: usize, tail_tokens: usize) -> Range<usize> {
        self.ends[c].saturating_sub(tail_tokens).max(self.starts[c])..self.ends[c]
    }

    /// The last behavior of chunk `c`: its timestamp is the summary's.
    pub fn last(&self, c: usize) -> usize {
        self.ends[c] - 1
    }
}
