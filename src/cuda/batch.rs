//! A validated batch and its chunks on the GPU.
//!
//! Timestamps go up as u32 seconds relative to a per-sequence base: the local (`utc_offset`)
//! midnight at or before the sequence's first timed token. Differences then fit a u32 (the span
//! is at most `i32::MAX`), the hour-of-day phase is `dt mod 86400`, and a token's weekday is
//! `(t / 86400 + weekday0) mod 7`, so the kernels need no 64-bit division per pair.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use super::device::{driver, GpuDevice};
use super::kernels::Entry;
use super::params::{EvoParams, SeqInfo};
use crate::batch::JaggedBatch;
use crate::chunking::Chunks;
use crate::error::{Error, Result};
use crate::temporal::{RelTemporal, DAY};

/// Rows (tokens) of a tile of the tiled kernels (`kDenseRows` in kernels/attn/dense.cuh).
pub(crate) const TILE_ROWS: usize = 64;

/// Flattens (tile, sequence) pairs into the kernels' list of (sequence, tile), heaviest first:
/// a later tile of a sequence sees more keys (all of them, in the dense kernels), so long
/// sequences' last tiles start first and short ones fill in behind them.
fn tile_list(mut tiles: Vec<(i32, i32)>) -> Vec<i32> {
    tiles.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    tiles.iter().flat_map(|&(tile, seq)| [seq, tile]).collect()
}

/// Threads per block of the chunking kernel (`kChunkThreads` in chunking.cu).
const CHUNK_THREADS: u32 = 256;

/// What chunks must agree with to be used with a batch: where its behaviors are. Kept on both
/// sides and compared exactly before any launch, so chunks of another batch never reach a kernel.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LayoutKey {
    seq_offsets: Vec<usize>,
    num_candidates: Vec<usize>,
    has_user_token: bool,
}

impl LayoutKey {
    fn of(batch: &JaggedBatch) -> Arc<LayoutKey> {
        Arc::new(LayoutKey {
            seq_offsets: batch.seq_offsets().to_vec(),
            num_candidates: batch.num_candidates().to_vec(),
            has_user_token: batch.has_user_token(),
        })
    }
}

/// A [`JaggedBatch`] uploaded for one `utc_offset`.
#[derive(Debug)]
pub struct DeviceBatch {
    pub(crate) layout: Arc<LayoutKey>,
    pub(crate) num_seqs: usize,
    pub(crate) num_tokens: usize,
    pub(crate) utc_offset: i64,
    pub(crate) max_behaviors: usize,
    /// The tiled kernels' work list: pairs (sequence, tile of 64 tokens), heaviest tiles (last
    /// in their sequence) first; `num_tiles` pairs.
    pub(crate) tiles: CudaSlice<i32>,
    pub(crate) num_tiles: usize,
    pub(crate) seqs: CudaSlice<SeqInfo>,
    pub(crate) rel_time: CudaSlice<u32>,
    pub(crate) weekday0: CudaSlice<i32>,
}

impl DeviceBatch {
    /// The context (GPU) its buffers live in.
    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        self.rel_time.context()
    }

    /// Number of sequences `B`.
    pub fn num_seqs(&self) -> usize {
        self.num_seqs
    }

    /// Number of tokens `T`.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// The UTC offset the times were prepared for; attention calls must use the same.
    pub fn utc_offset(&self) -> i64 {
        self.utc_offset
    }
}

/// The chunks of every sequence of a [`DeviceBatch`]: for sequence `u`, `counts[u]` chunks whose
/// exclusive ends (absolute token indices) are `ends[u * max_chunks ..]`.
#[derive(Debug)]
pub struct DeviceChunks {
    pub(crate) layout: Arc<LayoutKey>,
    pub(crate) num_seqs: usize,
    pub(crate) max_chunks: usize,
    pub(crate) ends: CudaSlice<i32>,
    pub(crate) counts: CudaSlice<i32>,
}

impl DeviceChunks {
    /// The context (GPU) its buffers live in.
    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        self.ends.context()
    }

    /// The stride of the per-sequence chunk arrays: no sequence has more chunks.
    pub fn max_chunks(&self) -> usize {
        self.max_chunks
    }
}

/// The most tokens a batch may have on the GPU path, `2^30 - 64`. The kernels hold token
/// indices in an int and add to them a local window (at most the longest sequence plus one
/// token) or a 64-row tile (`j + w`, `k0 + 64`), and the tile list holds two ints per tile
/// (`tiles[2 * i]`): this bound keeps every such value below `i32::MAX`. Q, K and V of 2^30
/// tokens take `2^31 H D` bytes each in 16 bits, beyond the memory of any GPU today.
pub const GPU_MAX_TOKENS: usize = (1 << 30) - 64;

/// The most chunk slots `B * P` on the GPU path: the summary kernel's warps index
/// `block * 4 + warp` past the last slot, which this keeps below `i32::MAX`.
pub const GPU_MAX_CHUNK_SLOTS: usize = (i32::MAX - 64) as usize;

/// `num_tokens` as the kernels take it, or an error that names it.
fn gpu_num_tokens(num_tokens: usize) -> Result<i32> {
    if num_tokens > GPU_MAX_TOKENS {
        return Err(Error::OutOfRange {
            field: "num_tokens",
            value: num_tokens.to_string(),
            expected: "at most 2^30 - 64 tokens on the GPU path (the kernels' int indices)",
        });
    }
    Ok(num_tokens as i32)
}

/// `B * P` chunk slots as the kernels take them, or an error that names `field` and `value`.
fn gpu_chunk_slots(
    num_seqs: usize,
    max_chunks: usize,
    field: &'static str,
    value: impl FnOnce() -> String,
) -> Result<usize> {
    num_seqs
        .checked_mul(max_chunks)
        .filter(|&s| s <= GPU_MAX_CHUNK_SLOTS)
        .ok_or_else(|| Error::OutOfRange {
            field,
            value: value(),
            expected: "B * P at most i32::MAX - 64 chunk slots on the GPU path",
        })
}

fn to_i32(field: &'static str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::OutOfRange {
        field,
        value: value.to_string(),
        expected: "at most i32::MAX on the GPU path",
    })
}

/// Copies a host slice to a new device buffer. An empty slice gets one zeroed element instead:
/// `cuMemAlloc(0)` fails on contexts without stream-ordered allocation. Callers track logical
/// lengths beside such buffers.
pub(crate) fn upload<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    data: &[T],
) -> Result<CudaSlice<T>> {
    if data.is_empty() {
        return zeros(stream, 1);
    }
    stream.clone_htod(data).map_err(driver("cuMemcpyHtoD"))
}

/// A zeroed output buffer of exactly `len` elements: cudarc's empty buffer when `len` is 0 (on a
/// context that refuses zero-byte allocations, an `Error::Cuda` naming `what`).
pub(crate) fn output<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
    what: &'static str,
) -> Result<CudaSlice<T>> {
    if len == 0 {
        stream.null().map_err(driver(what))
    } else {
        stream.alloc_zeros(len).map_err(driver(what))
    }
}

/// A zeroed device buffer made on the device; at least one element (see [`upload`]).
pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>> {
    stream.alloc_zeros(len.max(1)).map_err(driver("cuMemAlloc"))
}

impl GpuDevice {
    /// Uploads a validated batch, preparing its times for `temporal.utc_offset`.
    pub fn upload_batch(&self, batch: &JaggedBatch, temporal: &RelTemporal) -> Result<DeviceBatch> {
        temporal.validate()?;
        let num_tokens = batch.num_tokens();
        gpu_num_tokens(num_tokens)?;
        // Empty sequences take no tokens, so this bound is not implied by the one above.
        to_i32("num_seqs", batch.num_seqs())?;
        let ts = batch.timestamps();
        let off = temporal.utc_offset as i128;
        let mut seqs = Vec::with_capacity(batch.num_seqs());
        let mut weekday0 = Vec::with_capacity(batch.num_seqs());
        let mut rel_time = vec![0u32; num_tokens];
        let mut max_behaviors = 0;
        let mut tiles = Vec::new();
        for span in batch.seqs() {
            // Indices fit i32 because num_tokens does.
            seqs.push(SeqInfo {
                start: span.tokens().start as i32,
                behaviors: span.behaviors.start as i32,
                candidates: span.candidates.start as i32,
                end: span.candidates.end as i32,
            });
            max_behaviors = max_behaviors.max(span.num_behaviors());
            for tile in 0..span.tokens().len().div_ceil(TILE_ROWS) {
                tiles.push((tile as i32, seqs.len() as i32 - 1));
            }
            let timed = span.behaviors.start..span.candidates.end;
            let Some(&t_min) = ts[timed.clone()].iter().min() else {
                weekday0.push(0);
                continue;
            };
            let day0 = (t_min as i128 + off).div_euclid(DAY as i128);
            let base = day0 * DAY as i128 - off;
            weekday0.push((day0 + 4).rem_euclid(7) as i32);
            for t in timed {
                // < span + one day <= i32::MAX + 86400: fits a u32 (JaggedBatch checked the span).
                rel_time[t] = (ts[t] as i128 - base) as u32;
            }
        }
        Ok(DeviceBatch {
            layout: LayoutKey::of(batch),
            num_seqs: batch.num_seqs(),
            num_tokens,
            utc_offset: temporal.utc_offset,
            max_behaviors,
            num_tiles: tiles.len(),
            tiles: upload(&self.stream, &tile_list(tiles))?,
            seqs: upload(&self.stream, &seqs)?,
            rel_time: upload(&self.stream, &rel_time)?,
            weekday0: upload(&self.stream, &weekday0)?,
        })
    }

    /// Personalized time-aware chunking on the GPU (SPEC section 2): the same cuts as
    /// [`Chunks::personalized`], with no host round trip.
    pub fn chunk(&self, batch: &DeviceBatch, num_chunks: usize) -> Result<DeviceChunks> {
        if num_chunks == 0 {
            return Err(Error::Zero {
                field: "num_chunks",
            });
        }
        self.check_contexts(&[("batch", batch.context())])?;
        // A sequence never has more chunks than behaviors.
        let max_chunks = num_chunks.min(batch.max_behaviors.max(1));
        let slots = gpu_chunk_slots(batch.num_seqs, max_chunks, "num_chunks", || {
            num_chunks.to_string()
        })?;
        let mut ends = zeros(&self.stream, slots)?;
        let mut counts = zeros(&self.stream, batch.num_seqs)?;
        if batch.num_seqs > 0 {
            let params = EvoParams {
                num_seqs: batch.num_seqs as i32,
                num_tokens: batch.num_tokens as i32,
                max_chunks: max_chunks as i32,
                ..EvoParams::default()
            };
            let func = self.function(Entry::Chunking, None, None)?;
            let cfg = LaunchConfig {
                grid_dim: (batch.num_seqs as u32, 1, 1),
                block_dim: (CHUNK_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = self.stream.launch_builder(&func);
            launch
                .arg(&params)
                .arg(&batch.rel_time)
                .arg(&batch.seqs)
                .arg(&mut ends)
                .arg(&mut counts);
            // SAFETY: argument types and order match SPARSECTR_CHUNKING in chunking.cu; `ends`
            // holds B * max_chunks slots, `counts` B, and the batch arrays were built together.
            unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(evo_chunking)"))?;
        }
        Ok(DeviceChunks {
            layout: batch.layout.clone(),
            num_seqs: batch.num_seqs,
            max_chunks,
            ends,
            counts,
        })
    }

    /// Uploads chunks computed on the host or supplied by the caller.
    pub fn upload_chunks(&self, batch: &JaggedBatch, chunks: &Chunks) -> Result<DeviceChunks> {
        chunks.check_matches(batch)?;
        gpu_num_tokens(batch.num_tokens())?;
        let num_seqs = batch.num_seqs();
        let max_chunks = (0..num_seqs)
            .map(|s| chunks.of_seq(s).len())
            .max()
            .unwrap_or(0)
            .max(1);
        let slots = gpu_chunk_slots(num_seqs, max_chunks, "chunks", || {
            format!("{max_chunks} chunks in the longest of {num_seqs} sequences")
        })?;
        let mut ends = vec![0i32; slots];
        let mut counts = vec![0i32; num_seqs];
        for (s, count) in counts.iter_mut().enumerate() {
            let ids = chunks.of_seq(s);
            *count = ids.len() as i32;
            for (k, c) in ids.enumerate() {
                ends[s * max_chunks + k] = chunks.span(c).end as i32;
            }
        }
        Ok(DeviceChunks {
            layout: LayoutKey::of(batch),
            num_seqs,
            max_chunks,
            ends: upload(&self.stream, &ends)?,
            counts: upload(&self.stream, &counts)?,
        })
    }

    /// Copies device chunks back to the host (validated against `batch`).
    pub fn download_chunks(&self, batch: &JaggedBatch, chunks: &DeviceChunks) -> Result<Chunks> {
        if *chunks.layout != *LayoutKey::of(batch) {
            return Err(Error::DeviceMismatch {
                field: "chunks",
                value: format!("chunks of a {}-sequence batch", chunks.num_seqs),
                expected: "chunks built for this batch".into(),
            });
        }
        self.check_contexts(&[("chunks", chunks.context())])?;
        let ends = self
            .stream
            .clone_dtoh(&chunks.ends)
            .map_err(driver("cuMemcpyDtoH"))?;
        let counts = self
            .stream
            .clone_dtoh(&chunks.counts)
            .map_err(driver("cuMemcpyDtoH"))?;
        let mut offsets = vec![0usize];
        let mut lengths = Vec::new();
        for (s, span) in batch.seqs().enumerate() {
            let mut start = span.behaviors.start as i64;
            let count = counts.get(s).copied().unwrap_or(0).max(0) as usize;
            for k in 0..count.min(chunks.max_chunks) {
                let end = ends[s * chunks.max_chunks + k] as i64;
                // A bad end shows up as a partition error from `from_lengths`.
                lengths.push((end - start).max(0) as usize);
                start = end;
            }
            offsets.push(lengths.len());
        }
        Chunks::from_lengths(batch, &offsets, &lengths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (sequence, tile) once, later tiles first, then by sequence.
    #[test]
    fn tile_list_covers_every_tile_heaviest_first() {
        let lens = [0usize, 1, 64, 65, 300, 128];
        let mut pairs = Vec::new();
        for (s, &n) in lens.iter().enumerate() {
            for t in 0..n.div_ceil(TILE_ROWS) {
                pairs.push((t as i32, s as i32));
            }
        }
        let want: usize = lens.iter().map(|n| n.div_ceil(TILE_ROWS)).sum();
        let list = tile_list(pairs);
        assert_eq!(list.len(), 2 * want);
        let items: Vec<(i32, i32)> = list.chunks(2).map(|p| (p[0], p[1])).collect();
        for w in items.windows(2) {
            let ((s0, t0), (s1, t1)) = (w[0], w[1]);
            assert!(
                t0 > t1 || (t0 == t1 && s0 < s1),
                "{:?} before {:?}",
                w[0],
                w[1]
            );
        }
        for (s, &n) in lens.iter().enumerate() {
            let mut tiles: Vec<i32> = items
                .iter()
                .filter(|p| p.0 == s as i32)
                .map(|p| p.1)
                .collect();
            tiles.sort();
            let expect: Vec<i32> = (0..n.div_ceil(TILE_ROWS) as i32).collect();
            assert_eq!(tiles, expect, "sequence {s}");
        }
    }

    #[test]
    fn token_bound_leaves_the_kernels_int_headroom() {
        // The largest sums the kernels form: a token index plus the clamped window (at most the
        // longest sequence plus one) plus a 64-row tile, and the tile list's 2 * tile + 1 (< 2 t).
        let t = GPU_MAX_TOKENS as i64;
        assert!((t - 1) + (t + 1) + TILE_ROWS as i64 <= i32::MAX as i64);
        assert!(2 * t < i32::MAX as i64);
        assert_eq!(
            gpu_num_tokens(GPU_MAX_TOKENS).unwrap(),
            GPU_MAX_TOKENS as i32
        );
        for n in [GPU_MAX_TOKENS + 1, i32::MAX as usize, usize::MAX] {
            match gpu_num_tokens(n) {
                Err(Error::OutOfRange { field, value, .. }) => {
                    assert_eq!(field, "num_tokens");
                    assert_eq!(value, n.to_string());
                }
                other => panic!("num_tokens = {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn chunk_slots_leave_the_summary_warps_headroom() {
        // One block of 4 warps past the last slot stays below i32::MAX.
        assert!(GPU_MAX_CHUNK_SLOTS as i64 + 4 <= i32::MAX as i64);
        let ok = gpu_chunk_slots(1, GPU_MAX_CHUNK_SLOTS, "num_chunks", || "x".into());
        assert_eq!(ok.unwrap(), GPU_MAX_CHUNK_SLOTS);
        assert_eq!(
            gpu_chunk_slots(0, usize::MAX, "num_chunks", String::new).unwrap(),
            0
        );
        for (b, p) in [(1, GPU_MAX_CHUNK_SLOTS + 1), (2, 1 << 30), (usize::MAX, 2)] {
            match gpu_chunk_slots(b, p, "num_chunks", || p.to_string()) {
                Err(Error::OutOfRange { field, value, .. }) => {
                    assert_eq!(field, "num_chunks");
                    assert_eq!(value, p.to_string());
                }
                other => panic!("B = {b}, P = {p}: {other:?}"),
            }
        }
    }
}
