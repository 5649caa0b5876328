//! The backward on the GPU (SPEC section 6): dQ, dK, dV through summaries, tails and window,
//! dcoeffs and dgates, from `dO` and the forward's per-branch LSE.
//!
//! After pooling: the query kernel (dQ, dgates, per-query dcoeff partials; for 16-bit inputs,
//! given the forward's per-branch outputs, it centres each branch's `dz` on `<dO, O_b>` of them
//! and skips a first pass over every pair), the summary kernel
//! (dKbar, dVbar), the key side (dK, dV), and a fixed-order reduction of the dcoeff partials.
//! The key side for 16-bit inputs runs on tensor cores in three kernels: the tail tokens'
//! transition-branch gradients into an f32 buffer, then each 64-token tile's local-window
//! gradients plus that buffer and the chunk's summary gradient / |C|, and one block per
//! (sequence, head) that adds up, in tile order, the user token's dK and dV from the partials
//! the query kernel left per 64-query tile (every query sees the user token, and the query
//! kernel has its P and dz in hand); for f32 one warp kernel gathers each token's uses. No
//! kernel scatters with atomics, so every mode gives the same bits from run to run. Under
//! [`LocalPairs::Stored`] the query kernel also stores each behavior's local-window pairs (gate P
//! and dz) and the key side reads them instead of computing them a second time.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::batch::{upload, zeros, DeviceBatch, DeviceChunks, TILE_ROWS};
use super::dense::{dense_grid, reduce_coeffs};
use super::device::{driver, GpuDevice};
use super::forward::{
    check_inputs, launch_params, push_gates, push_layout, DeviceInputs, GpuElement,
};
use super::kernels::Entry;
use super::params::EvoParams;
use crate::attention::{check_len, AttnConfig, Dims, EvoAttention, Inputs};
use crate::batch::JaggedBatch;
use crate::chunking::Chunks;
use crate::error::{Error, Result};

/// Warps (one (token, head) or (chunk, head) each) per block of the backward kernels.
const BWD_WARPS: u32 = 4;
const BWD_THREADS: u32 = BWD_WARPS * 32;
/// backward_user_reduce.cu's kUserReduceThreads: one block per (sequence, head).
const USER_REDUCE_THREADS: u32 = 128;
/// Threads per block of the tensor-core key kernels (`kDenseThreads`), and tail slots or chunk
/// slots per block of the tails and summary kernels (`kDenseRows`).
const TILE_THREADS: u32 = 128;
const TAIL_ROWS: usize = 64;

/// Blocks per tile of the tensor-core query kernel, each taking part of dQ's dimensions
/// (`BwdTcParts` in backward_query_tc.cu).
fn backward_query_parts(head_dim: usize) -> usize {
    if head_dim == 128 {
        2
    } else {
        1
    }
}

/// The key side's kernels (dK, dV), looked up before the backward launches anything.
enum KeySide {
    /// f32, or `SparseKernels::Warp`: one warp per (token, head).
    Warp(CudaFunction),
    /// bf16 and f16: tails, local windows and user tokens (`GpuDevice::backward_key_tc`).
    TensorCore {
        tails: CudaFunction,
        local: CudaFunction,
        user: CudaFunction,
    },
}

/// The f32 scratch of the tensor-core key side: the tails kernel's dK and dV of every tail slot
/// (`2 * B * P * m * H * D`) and its grid x (0: no tail slot, no launch), and the query kernel's
/// partials of the user tokens' dK and dV (`(B + ceil(T / 64)) * H * 2 * D`,
/// [`user_partial_rows`]).
struct KeyScratch {
    tail_dk: CudaSlice<f32>,
    tail_dv: CudaSlice<f32>,
    tail_blocks: u32,
    user: CudaSlice<f32>,
}

/// The stored pairs of [`LocalPairs::Stored`] (attn/stored_pairs.cuh): `[T, H, 2, R]` in the
/// input dtype and `[T, H]` f32 deltas.
struct StoredPairs<T> {
    rows: CudaSlice<T>,
    delta: CudaSlice<f32>,
}

/// Keys per stored row: the window's `w - 1` earlier keys rounded up to 8, and 8.
fn pair_row_len(window: usize) -> usize {
    (window.max(1) - 1).div_ceil(8) * 8 + 8
}

/// Elements of the stored pairs' rows and deltas.
fn stored_pairs_len(num_tokens: usize, dims: Dims, window: usize) -> Result<(usize, usize)> {
    let too_large = Error::OutOfRange {
        field: "num_tokens",
        value: num_tokens.to_string(),
        expected: "T * H * 2 * R stored pairs to fit in usize (LocalPairs::Stored)",
    };
    let deltas = num_tokens
        .checked_mul(dims.heads)
        .ok_or(too_large.clone())?;
    let rows = deltas
        .checked_mul(2 * pair_row_len(window))
        .ok_or(too_large)?;
    Ok((rows, deltas))
}

/// Allocates the stored pairs, uninitialized: the query kernel writes every entry the key side
/// reads (each behavior's whole row and its delta) before it, on the same stream, and nothing
/// else reads them. Zeroing 2.3 KB a token would cost a memset as long as the reads it serves.
fn stored_pairs<T: GpuElement>(
    stream: &Arc<CudaStream>,
    num_tokens: usize,
    dims: Dims,
    window: usize,
) -> Result<StoredPairs<T>> {
    let (rows, deltas) = stored_pairs_len(num_tokens, dims, window)?;
    // SAFETY: device memory that no host code reads; the kernels read only entries written
    // earlier on this stream (see above). Lengths are at least 1 (T > 0 here).
    let (rows, delta) = unsafe {
        (
            stream.alloc::<T>(rows.max(1)),
            stream.alloc::<f32>(deltas.max(1)),
        )
    };
    Ok(StoredPairs {
        rows: rows.map_err(driver("cuMemAlloc(stored pairs)"))?,
        delta: delta.map_err(driver("cuMemAlloc(stored pair deltas)"))?,
    })
}

/// Rows of the user-token partials: the query kernel writes tile `i` of sequence `s` (starting
/// at token `start`) to row `s + start / 64 + i` (`user_partial_row` in attn/dense.cuh),
/// below `B + ceil(T / 64)`: a sequence of `n` tokens has `ceil(n / 64)` tiles, and the next one
/// starts `n` tokens later.
fn user_partial_rows(num_seqs: usize, num_tokens: usize) -> usize {
    num_seqs + num_tokens.div_ceil(TILE_ROWS)
}

/// Sizes and allocates the [`KeyScratch`], so that a call too large for it fails before its
/// first launch.
fn key_scratch(
    stream: &Arc<CudaStream>,
    batch: &DeviceBatch,
    chunks: &DeviceChunks,
    dims: Dims,
    params: &EvoParams,
) -> Result<KeyScratch> {
    let sizes = key_scratch_sizes(batch, chunks, dims, params)?;
    Ok(KeyScratch {
        tail_dk: zeros::<f32>(stream, sizes.tail_rows)?,
        tail_dv: zeros::<f32>(stream, sizes.tail_rows)?,
        tail_blocks: sizes.tail_blocks,
        user: zeros::<f32>(stream, sizes.user_rows)?,
    })
}

/// Elements of [`KeyScratch`]'s buffers and the tails kernel's blocks.
struct KeyScratchSizes {
    tail_rows: usize,
    tail_blocks: u32,
    user_rows: usize,
}

fn key_scratch_sizes(
    batch: &DeviceBatch,
    chunks: &DeviceChunks,
    dims: Dims,
    params: &EvoParams,
) -> Result<KeyScratchSizes> {
    // P * m < 2^31 (launch_params); the scratch must still fit in usize.
    let slots = chunks.max_chunks * params.tail_tokens as usize;
    let too_large = |expected| Error::OutOfRange {
        field: "tail_tokens",
        value: params.tail_tokens.to_string(),
        expected,
    };
    let tail_rows = chunks
        .num_seqs
        .checked_mul(slots)
        .and_then(|n| n.checked_mul(dims.heads * dims.head_dim))
        .ok_or_else(|| too_large("B * P * m * H * D to fit in usize"))?;
    // One block per 64 slots of a sequence; the kernel reads blockIdx.x as an int.
    let blocks = chunks
        .num_seqs
        .checked_mul(slots.div_ceil(TAIL_ROWS))
        .filter(|&b| b <= i32::MAX as usize)
        .ok_or_else(|| too_large("B * ceil(P * m / 64) at most i32::MAX tail blocks"))?;
    // The row index stays far inside the kernels' size_t (B + T / 64 < 2^31 by GPU_MAX_TOKENS);
    // only the element count can overflow, on a 32-bit host.
    let user_rows = user_partial_rows(batch.num_seqs, batch.num_tokens)
        .checked_mul(2 * dims.heads * dims.head_dim)
        .ok_or(Error::OutOfRange {
            field: "num_tokens",
            value: batch.num_tokens.to_string(),
            expected: "(B + ceil(T / 64)) * H * 2 * D to fit in usize",
        })?;
    Ok(KeyScratchSizes {
        tail_rows,
        tail_blocks: blocks as u32,
        user_rows,
    })
}

/// The warp kernels' grid over `rows` rows (tokens or summary slots) and the heads: a warp per
/// (row, head). `rows` < 2^31 (GPU_MAX_TOKENS, GPU_MAX_CHUNK_SLOTS).
fn warp_grid(rows: usize, dims: Dims) -> (u32, u32, u32) {
    ((rows as u32).div_ceil(BWD_WARPS), dims.heads as u32, 1)
}

/// Every kernel of one backward call and the grids that depend only on the layout, resolved
/// and checked before anything is launched (or, in `backward_host`, before its forward), so
/// that a missing variant or a grid past the device's limits is an error, not half a backward.
struct BackwardPlan {
    key_side: KeySide,
    query: (CudaFunction, LaunchConfig),
    summary: (CudaFunction, LaunchConfig),
    reduce: CudaFunction,
}

/// How the backward may order its floating-point sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackwardMode {
    /// The fastest kernels available.
    #[default]
    Fast,
    /// Bitwise identical results from run to run.
    Deterministic,
}

/// What [`GpuDevice::backward_host`] keeps from its own forward for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Saved {
    /// The per-branch LSE and each branch's output `O_b` (`3 * T * H * D` more elements): the
    /// tensor-core query kernel (16-bit inputs) centres each branch's `dz` on `<dO, O_b>` of
    /// them instead of making a first pass over every pair for it (it still adds up the exact
    /// `dgates` in its one pass).
    #[default]
    BranchOutputs,
    /// The per-branch LSE only: the query kernel recomputes `<dO, O_b>` in a first pass.
    LseOnly,
}

/// How the tensor-core key side (bf16 and f16) gets the local window's pairs: each behavior's
/// `gate P` and `dz` for the behaviors in its window, which the query kernel also computes (for
/// dQ). Chosen per [`GpuDevice`] with [`GpuDevice::set_local_pairs`]; both give dK and dV within
/// SPEC section 8's tolerances, and every other output the same bits. f32 (the warp kernels)
/// ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalPairs {
    /// The key side computes them again from Q, K, V, dO and the saved LSE: no scratch.
    #[default]
    Recompute = 0,
    /// The query kernel stores them and the key side reads them (no logits, bias, exp or mask
    /// on that side, and half its MMAs): scratch of `2 * T * H * R` elements of the input dtype,
    /// `R = 8 * ceil((w - 1) / 8) + 8` (72 at w = 64), and `T * H` f32 per call. At ctr-base
    /// (H = 8, w = 64) that is 2.3 KB a token.
    Stored = 1,
}

/// Caller buffers the backward writes, every element of them.
#[derive(Debug)]
pub struct DeviceGrads<'a, T> {
    /// `[T, H, D]`.
    pub dq: &'a mut CudaSlice<T>,
    /// `[T, H, D]`.
    pub dk: &'a mut CudaSlice<T>,
    /// `[T, H, D]`.
    pub dv: &'a mut CudaSlice<T>,
    /// `[H, 3]` f32.
    pub dcoeffs: &'a mut CudaSlice<f32>,
    /// `[T, H, 3]` f32: `<dO, O_b>`, the gradient of the gates (of implicit ones when absent).
    pub dgates: &'a mut CudaSlice<f32>,
}

/// Gradients on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostGradients<T> {
    /// `[T, H, D]`.
    pub dq: Vec<T>,
    /// `[T, H, D]`.
    pub dk: Vec<T>,
    /// `[T, H, D]`.
    pub dv: Vec<T>,
    /// `[H, 3]`.
    pub dcoeffs: Vec<f32>,
    /// `[T, H, 3]`.
    pub dgates: Vec<f32>,
}

impl GpuDevice {
    /// Sparse EvoAttention backward into caller buffers, from `d_o` (`[T, H, D]`), the
    /// forward's `lse` (`[T, H, 3]`) and optionally its `branch_out` (`[T, H, 3, D]`, see
    /// [`DeviceOutputs::branch_out`](super::DeviceOutputs::branch_out)): with them the
    /// tensor-core query kernel (16-bit inputs) centres each branch's `dz` on `<dO, O_b>` of the
    /// saved `O_b` and skips a pass over every pair. It still adds up the exact `dgates` and
    /// corrects dcoeffs by the difference, so only dQ keeps the saved `O_b`'s rounding to the
    /// input dtype, as FlashAttention's dQ keeps its saved output's. The warp kernels (f32) do
    /// not read them. Scratch beyond the outputs, allocated per call:
    /// summaries `2 * B * P * H * D` f32, their gradients `2 * B * P * H * D` f32,
    /// `3 * T * H` f32 dcoeff partials and, for 16-bit inputs, the tail tokens' gradients
    /// `2 * B * P * m * H * D` f32 (m clamped to the longest sequence's behaviors) and the user
    /// tokens' partial gradients `2 * (B + ceil(T / 64)) * H * D` f32 (one per 64 queries), and
    /// under [`LocalPairs::Stored`] the stored pairs (`2 * T * H * R` elements of `T` and
    /// `T * H` f32, see there). Nothing is `T x T`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        chunks: &DeviceChunks,
        dims: Dims,
        config: &AttnConfig,
        inputs: &DeviceInputs<'_, T>,
        lse: &CudaSlice<f32>,
        branch_out: Option<&CudaSlice<T>>,
        d_o: &CudaSlice<T>,
        mode: BackwardMode,
        grads: DeviceGrads<'_, T>,
    ) -> Result<()> {
        // Both modes run the same atomic-free kernels today; see the module docs.
        let _ = mode;
        let mut params = launch_params(batch, chunks, dims, config)?;
        let t = batch.num_tokens;
        let rows = dims.tensor_len(t)?;
        let branch_rows = dims.branch_len(t)?;
        params.gates_mode = check_inputs(inputs, dims, t)? as i32;
        for (field, len) in [
            ("d_o", d_o.len()),
            ("dq", grads.dq.len()),
            ("dk", grads.dk.len()),
            ("dv", grads.dv.len()),
        ] {
            check_len(field, len, rows)?;
        }
        check_len("dcoeffs", grads.dcoeffs.len(), dims.branch_len(1)?)?;
        check_len("lse", lse.len(), branch_rows)?;
        if let Some(b) = branch_out {
            check_len("branch_out", b.len(), dims.branch_out_len(t)?)?;
        }
        check_len("dgates", grads.dgates.len(), branch_rows)?;
        let mut buffers = inputs.contexts();
        buffers.extend([
            ("batch", batch.context()),
            ("chunks", chunks.context()),
            ("lse", lse.context()),
            ("d_o", d_o.context()),
            ("dq", grads.dq.context()),
            ("dk", grads.dk.context()),
            ("dv", grads.dv.context()),
            ("dcoeffs", grads.dcoeffs.context()),
            ("dgates", grads.dgates.context()),
        ]);
        if let Some(b) = branch_out {
            buffers.push(("branch_out", b.context()));
        }
        self.check_contexts(&buffers)?;
        let stream = &self.stream;
        if t == 0 {
            // No pair exists: dcoeffs is zero.
            stream
                .memset_zeros(grads.dcoeffs)
                .map_err(driver("cuMemsetD8(dcoeffs)"))?;
            return Ok(());
        }
        let null = 0u64;
        let BackwardPlan {
            key_side,
            query: (func, query_cfg),
            summary: (summary_fn, summary_cfg),
            reduce,
        } = self.backward_plan::<T>(batch, chunks, dims, &params)?;
        // Every buffer of the call is allocated before its first launch (the pooling, which
        // allocates its own outputs first), so that a failed allocation returns with no kernel
        // of this call queued.
        let mut key_scratch = match key_side {
            KeySide::TensorCore { .. } => Some(key_scratch(stream, batch, chunks, dims, &params)?),
            KeySide::Warp(_) => None,
        };
        let mut pairs = match (&key_side, self.local_pairs()) {
            (KeySide::TensorCore { .. }, LocalPairs::Stored) => {
                // The kernels' window (clamped to the longest sequence), which sizes each row.
                Some(stored_pairs::<T>(stream, t, dims, params.window as usize)?)
            }
            _ => None,
        };
        let summary_rows = chunks
            .num_seqs
            .checked_mul(chunks.max_chunks)
            .and_then(|n| n.checked_mul(dims.heads * dims.head_dim))
            .ok_or(Error::OutOfRange {
                field: "max_chunks",
                value: chunks.max_chunks.to_string(),
                expected: "B * P * H * D to fit in usize",
            })?;
        let mut dkbar = zeros::<f32>(stream, summary_rows)?;
        let mut dvbar = zeros::<f32>(stream, summary_rows)?;
        let mut partial = zeros::<f32>(stream, branch_rows)?;
        let (kbar, vbar) = self.pool(batch, chunks, dims, &params, inputs.k, inputs.v)?;

        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&params)
            .arg(inputs.q)
            .arg(inputs.k)
            .arg(inputs.v)
            .arg(&kbar)
            .arg(&vbar);
        push_gates(&mut launch, &inputs.gates, &null);
        push_layout(&mut launch, inputs.coeffs, batch, chunks);
        launch
            .arg(d_o)
            .arg(lse)
            .arg(&mut *grads.dq)
            .arg(&mut *grads.dgates)
            .arg(&mut partial);
        if let Some(scratch) = key_scratch.as_mut() {
            launch.arg(&batch.tiles);
            match branch_out {
                Some(b) => launch.arg(b),
                None => launch.arg(&null),
            };
            launch.arg(&mut scratch.user);
            match pairs.as_mut() {
                Some(p) => launch.arg(&mut p.rows).arg(&mut p.delta),
                None => launch.arg(&null).arg(&null),
            };
        }
        // SAFETY: argument types and order match SPARSECTR_BACKWARD_QUERY, or
        // SPARSECTR_BACKWARD_QUERY_TC (the same parameters, the tile list, branch_out, null or
        // 3 T H D elements, the user partials, user_partial_rows * H * 2 * D f32, and the stored
        // pairs, null or T H 2 R elements and T H f32); lengths checked above.
        unsafe { launch.launch(query_cfg) }
            .map_err(driver("cuLaunchKernel(evo_backward_query)"))?;

        let mut launch = stream.launch_builder(&summary_fn);
        launch.arg(&params).arg(inputs.q).arg(&kbar).arg(&vbar);
        push_gates(&mut launch, &inputs.gates, &null);
        push_layout(&mut launch, inputs.coeffs, batch, chunks);
        launch
            .arg(d_o)
            .arg(lse)
            .arg(&*grads.dgates)
            .arg(&mut dkbar)
            .arg(&mut dvbar);
        // SAFETY: argument types and order match SPARSECTR_BACKWARD_SUMMARY and
        // SPARSECTR_BACKWARD_SUMMARY_TC (the same parameters); dkbar and dvbar hold B * P * H * D
        // f32, the slots either grid indexes.
        unsafe { launch.launch(summary_cfg) }
            .map_err(driver("cuLaunchKernel(evo_backward_summary)"))?;

        if let (KeySide::TensorCore { tails, local, user }, Some(scratch)) =
            (&key_side, key_scratch.as_mut())
        {
            self.backward_key_tc(
                [tails, local, user],
                scratch,
                pairs.as_ref(),
                batch,
                chunks,
                dims,
                &params,
                inputs,
                lse,
                d_o,
                &*grads.dgates,
                &dkbar,
                &dvbar,
                grads.dk,
                grads.dv,
            )?;
        } else if let KeySide::Warp(func) = &key_side {
            let mut launch = stream.launch_builder(func);
            launch
                .arg(&params)
                .arg(inputs.q)
                .arg(inputs.k)
                .arg(inputs.v);
            push_gates(&mut launch, &inputs.gates, &null);
            push_layout(&mut launch, inputs.coeffs, batch, chunks);
            launch
                .arg(d_o)
                .arg(lse)
                .arg(&*grads.dgates)
                .arg(&dkbar)
                .arg(&dvbar)
                .arg(&mut *grads.dk)
                .arg(&mut *grads.dv);
            let cfg = LaunchConfig {
                grid_dim: warp_grid(t, dims),
                block_dim: (BWD_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument types and order match SPARSECTR_BACKWARD_KEY; lengths checked
            // above.
            unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(evo_backward_key)"))?;
        }

        reduce_coeffs(self, &reduce, &params, &partial, grads.dcoeffs, dims)
    }

    /// The kernels and grids of a backward over this layout ([`BackwardPlan`]).
    fn backward_plan<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        chunks: &DeviceChunks,
        dims: Dims,
        params: &EvoParams,
    ) -> Result<BackwardPlan> {
        let dtype = Some(T::DTYPE);
        let dim = Some(dims.head_dim);
        // The query side on tensor cores for 16-bit inputs (see SparseKernels); both versions
        // take the same arguments and write the same outputs.
        let tiled = !self.sparse_uses_warp_kernels(T::DTYPE);
        let key_side = if tiled {
            KeySide::TensorCore {
                tails: self.function(Entry::BackwardTailsTc, dtype, dim)?,
                local: self.function(Entry::BackwardKeyTc, dtype, dim)?,
                user: self.function(Entry::BackwardUserReduce, dtype, dim)?,
            }
        } else {
            KeySide::Warp(self.function(Entry::BackwardKey, dtype, dim)?)
        };
        let (func, query_cfg) = if !tiled {
            let cfg = LaunchConfig {
                grid_dim: warp_grid(batch.num_tokens, dims),
                block_dim: (BWD_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            (self.function(Entry::BackwardQuery, dtype, dim)?, cfg)
        } else {
            let cfg = dense_grid(batch, dims, backward_query_parts(dims.head_dim))?;
            (self.function(Entry::BackwardQueryTc, dtype, dim)?, cfg)
        };
        // The chunk summaries' gradients: one warp per (slot, head), or for 16-bit inputs 64
        // slots of a sequence per block as MMA rows (backward_summary_tc.cu).
        let slots = chunks.num_seqs * chunks.max_chunks;
        let (summary_fn, summary_cfg) = if tiled {
            let groups = chunks.num_seqs * chunks.max_chunks.div_ceil(TAIL_ROWS);
            let blocks = u32::try_from(groups).map_err(|_| Error::OutOfRange {
                field: "max_chunks",
                value: chunks.max_chunks.to_string(),
                expected: "B * ceil(P / 64) below 2^32 summary blocks",
            })?;
            let cfg = LaunchConfig {
                grid_dim: (blocks, dims.heads as u32, 1),
                block_dim: (TILE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            (self.function(Entry::BackwardSummaryTc, dtype, dim)?, cfg)
        } else {
            let cfg = LaunchConfig {
                grid_dim: warp_grid(slots, dims),
                block_dim: (BWD_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            (self.function(Entry::BackwardSummary, dtype, dim)?, cfg)
        };
        if tiled {
            key_scratch_sizes(batch, chunks, dims, params)?;
            if self.local_pairs() == LocalPairs::Stored {
                stored_pairs_len(batch.num_tokens, dims, params.window as usize)?;
            }
        }
        Ok(BackwardPlan {
            key_side,
            query: (func, query_cfg),
            summary: (summary_fn, summary_cfg),
            reduce: self.function(Entry::CoeffsReduce, None, None)?,
        })
    }

    /// The key side on tensor cores (16-bit inputs): the tails kernel writes each tail token's
    /// transition-branch dK and dV in f32 to `scratch` (see [`KeyScratch`]), the local-window
    /// kernel adds them and the summary share to the token's local gradient, and one block per
    /// (sequence, head) adds up the user token's from the query kernel's partials.
    #[allow(clippy::too_many_arguments)]
    fn backward_key_tc<T: GpuElement>(
        &self,
        [tails_fn, key_fn, user_fn]: [&CudaFunction; 3],
        scratch: &mut KeyScratch,
        pairs: Option<&StoredPairs<T>>,
        batch: &DeviceBatch,
        chunks: &DeviceChunks,
        dims: Dims,
        params: &EvoParams,
        inputs: &DeviceInputs<'_, T>,
        lse: &CudaSlice<f32>,
        d_o: &CudaSlice<T>,
        dgates: &CudaSlice<f32>,
        dkbar: &CudaSlice<f32>,
        dvbar: &CudaSlice<f32>,
        dk: &mut CudaSlice<T>,
        dv: &mut CudaSlice<T>,
    ) -> Result<()> {
        let stream = &self.stream;
        let null = 0u64;
        if scratch.tail_blocks > 0 {
            let mut launch = stream.launch_builder(tails_fn);
            launch.arg(params).arg(inputs.q).arg(inputs.k).arg(inputs.v);
            push_gates(&mut launch, &inputs.gates, &null);
            push_layout(&mut launch, inputs.coeffs, batch, chunks);
            launch
                .arg(d_o)
                .arg(lse)
                .arg(dgates)
                .arg(&mut scratch.tail_dk)
                .arg(&mut scratch.tail_dv);
            let cfg = LaunchConfig {
                grid_dim: (scratch.tail_blocks, dims.heads as u32, 1),
                block_dim: (TILE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument types and order match SPARSECTR_BACKWARD_TAILS_TC; tail_dk and
            // tail_dv hold B * P * m * H * D f32, the slots the kernel indexes.
            unsafe { launch.launch(cfg) }
                .map_err(driver("cuLaunchKernel(evo_backward_tails_tc)"))?;
        }

        let mut launch = stream.launch_builder(key_fn);
        launch.arg(params).arg(inputs.q).arg(inputs.k).arg(inputs.v);
        push_gates(&mut launch, &inputs.gates, &null);
        push_layout(&mut launch, inputs.coeffs, batch, chunks);
        launch
            .arg(d_o)
            .arg(lse)
            .arg(dgates)
            .arg(dkbar)
            .arg(dvbar)
            .arg(&scratch.tail_dk)
            .arg(&scratch.tail_dv)
            .arg(&mut *dk)
            .arg(&mut *dv)
            .arg(&batch.tiles);
        match pairs {
            Some(p) => launch.arg(&p.rows).arg(&p.delta),
            None => launch.arg(&null).arg(&null),
        };
        let cfg = dense_grid(batch, dims, 1)?;
        // SAFETY: argument types and order match SPARSECTR_BACKWARD_KEY_TC; the tile list is
        // the batch's own; the stored pairs null or written by the query kernel before (T H 2 R
        // and T H elements); lengths checked by backward_into.
        unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(evo_backward_key_tc)"))?;

        let mut launch = stream.launch_builder(user_fn);
        launch
            .arg(params)
            .arg(&batch.seqs)
            .arg(&scratch.user)
            .arg(&mut *dk)
            .arg(&mut *dv);
        let cfg = LaunchConfig {
            grid_dim: (batch.num_seqs as u32, dims.heads as u32, 1),
            block_dim: (USER_REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match SPARSECTR_BACKWARD_USER_REDUCE; it reads the
        // partial rows the query kernel wrote for sequences with a user token (user_partial_rows)
        // and writes those tokens' rows only, which backward_key_tc leaves.
        unsafe { launch.launch(cfg) }
            .map_err(driver("cuLaunchKernel(evo_backward_user_reduce)"))?;
        Ok(())
    }

    /// Convenience: host slices in, host vectors out. Runs the GPU forward for the LSE (and the
    /// branch outputs, as `saved` says), then [`backward_into`](Self::backward_into).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_host<T: GpuElement>(
        &self,
        batch: &JaggedBatch,
        chunks: &Chunks,
        dims: Dims,
        config: &AttnConfig,
        inputs: &Inputs<'_, T>,
        d_o: &[T],
        mode: BackwardMode,
        saved: Saved,
    ) -> Result<HostGradients<T>> {
        let attn = EvoAttention::new(batch, chunks, dims, *config)?;
        inputs.validate(&attn)?;
        let t = batch.num_tokens();
        check_len("d_o", d_o.len(), dims.tensor_len(t)?)?;
        if t == 0 {
            // No pair exists: every gradient is empty or zero.
            return Ok(HostGradients {
                dq: Vec::new(),
                dk: Vec::new(),
                dv: Vec::new(),
                dcoeffs: vec![0.0; dims.branch_len(1)?],
                dgates: Vec::new(),
            });
        }
        let up = self.upload_call(batch, chunks, config, inputs)?;
        // The backward's own limits (its grids, its scratch), before the forward runs.
        let params = launch_params(&up.batch, &up.chunks, dims, config)?;
        self.backward_plan::<T>(&up.batch, &up.chunks, dims, &params)?;
        let stream = &self.stream;
        let d_o = upload(stream, d_o)?;
        let d_inputs = up.inputs();
        let (lse, branch_out) = match saved {
            Saved::BranchOutputs => {
                let (_, lse, b) =
                    self.forward_for_backward(&up.batch, &up.chunks, dims, config, &d_inputs)?;
                (lse, Some(b))
            }
            Saved::LseOnly => {
                let (_, lse) = self.forward(&up.batch, &up.chunks, dims, config, &d_inputs)?;
                (lse, None)
            }
        };
        let rows = dims.tensor_len(t)?;
        let mut dq = zeros::<T>(stream, rows)?;
        let mut dk = zeros::<T>(stream, rows)?;
        let mut dv = zeros::<T>(stream, rows)?;
        let mut dcoeffs = zeros::<f32>(stream, dims.branch_len(1)?)?;
        let mut dgates = zeros::<f32>(stream, dims.branch_len(t)?)?;
        let grads = DeviceGrads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
            dcoeffs: &mut dcoeffs,
            dgates: &mut dgates,
        };
        self.backward_into(
            &up.batch,
            &up.chunks,
            dims,
            config,
            &d_inputs,
            &lse,
            branch_out.as_ref(),
            &d_o,
            mode,
            grads,
        )?;
        let down = |what: &'static str| driver(what);
        Ok(HostGradients {
            dq: stream.clone_dtoh(&dq).map_err(down("cuMemcpyDtoH(dq)"))?,
            dk: stream.clone_dtoh(&dk).map_err(down("cuMemcpyDtoH(dk)"))?,
            dv: stream.clone_dtoh(&dv).map_err(down("cuMemcpyDtoH(dv)"))?,
            dcoeffs: stream
                .clone_dtoh(&dcoeffs)
                .map_err(down("cuMemcpyDtoH(dcoeffs)"))?,
            dgates: stream
                .clone_dtoh(&dgates)
                .map_err(down("cuMemcpyDtoH(dgates)"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels' row of tile `i` of sequence `s` (`user_partial_row` in attn/dense.cuh) is
    /// unique and inside the scratch, over every layout of short and
    /// long sequences, empty ones and tile-aligned starts included.
    #[test]
    fn user_partial_rows_are_unique_and_inside() {
        let mut rng = crate::workload::Rng::new(28);
        for case in 0..2000 {
            let num_seqs = rng.range(1, 12) as usize;
            let lens: Vec<usize> = (0..num_seqs)
                .map(|_| match rng.range(0, 3) {
                    0 => 0,
                    1 => 64 * rng.range(1, 3) as usize,
                    _ => rng.range(1, 200) as usize,
                })
                .collect();
            let num_tokens: usize = lens.iter().sum();
            let rows = user_partial_rows(num_seqs, num_tokens);
            let mut seen = vec![false; rows];
            let mut start = 0;
            for (s, &n) in lens.iter().enumerate() {
                for tile in 0..n.div_ceil(TILE_ROWS) {
                    let row = s + start / TILE_ROWS + tile;
                    assert!(
                        row < rows,
                        "case {case}: row {row} of {rows}, lengths {lens:?}"
                    );
                    assert!(!seen[row], "case {case}: row {row} twice, lengths {lens:?}");
                    seen[row] = true;
                }
                start += n;
            }
        }
    }

    /// The stored rows (attn/stored_pairs.cuh, mirrored here): query q's row of R keys from
    /// `q8 - W` holds its whole window `[q - w + 1, q]`, and starts a multiple of 8 keys from
    /// the sequence's start, so the key side's 64-key tiles meet it in whole 16-byte pieces.
    #[test]
    fn stored_rows_hold_each_window_in_whole_pieces() {
        assert_eq!(pair_row_len(64), 72);
        assert_eq!(pair_row_len(1), 8);
        assert_eq!(pair_row_len(9), 16);
        assert_eq!(pair_row_len(10), 24);
        assert_eq!(pair_row_len(128), 136);
        let mut rng = crate::workload::Rng::new(29);
        for _ in 0..5000 {
            let w = rng.range(1, 300) as usize;
            let start = rng.range(0, 1000) as usize;
            let q = start + rng.range(0, 2000) as usize;
            let len = pair_row_len(w);
            let span = len - 8;
            let first = (start + ((q - start) & !7)) as i64 - span as i64;
            assert!(
                first <= q as i64 + 1 - w as i64,
                "w {w} q {q}: window starts before the row"
            );
            assert!(
                (q as i64) < first + len as i64,
                "w {w} q {q}: the query is past its row"
            );
            assert_eq!(
                (first - start as i64).rem_euclid(8),
                0,
                "w {w} q {q}: row not on a piece"
            );
        }
        let dims = Dims {
            heads: 8,
            head_dim: 64,
        };
        assert_eq!(stored_pairs_len(3, dims, 64).unwrap(), (3 * 8 * 2 * 72, 24));
        match stored_pairs_len(usize::MAX / 4, dims, 64) {
            Err(Error::OutOfRange { field, .. }) => assert_eq!(field, "num_tokens"),
            other => panic!("expected an OutOfRange error, got {other:?}"),
        }
    }
}
