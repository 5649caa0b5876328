//! The fused three-branch forward on the GPU: chunk pooling, then one kernel for the global,
//! transition and local softmaxes with the RelTemporal bias in-kernel.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use half::{bf16, f16};

use super::batch::{output, upload, DeviceBatch, DeviceChunks};
use super::dense::dense_grid;
use super::device::{driver, GpuDevice};
use super::kernels::Entry;
use super::params::{EvoParams, GatesMode};
use crate::attention::{check_len, AttnConfig, Dims, EvoAttention, Gates, Inputs, NUM_BRANCHES};
use crate::batch::JaggedBatch;
use crate::chunking::Chunks;
use crate::dtype::Element;
use crate::error::{Error, Result};

/// Threads per block of the forward (`kForwardThreads`) and queries per block (`kForwardWarps`).
const FORWARD_THREADS: u32 = 128;
const FORWARD_WARPS: u32 = 4;
/// Threads per block of the pooling kernel (`kPoolThreads`).
const POOL_THREADS: u32 = 256;

/// An element type the kernels are built for: f32, f16 or bf16.
pub trait GpuElement: Element + DeviceRepr + ValidAsZeroBits + Default {}
impl GpuElement for f32 {}
impl GpuElement for f16 {}
impl GpuElement for bf16 {}

/// Per-branch gates on the device, `[T, H, 3]`.
#[derive(Debug, Clone, Copy)]
pub enum DeviceGates<'a, T> {
    /// Same dtype as Q.
    Native(&'a CudaSlice<T>),
    /// f32 gates.
    F32(&'a CudaSlice<f32>),
}

/// The device tensors of one forward call.
#[derive(Debug, Clone, Copy)]
pub struct DeviceInputs<'a, T> {
    /// `[T, H, D]`.
    pub q: &'a CudaSlice<T>,
    /// `[T, H, D]`.
    pub k: &'a CudaSlice<T>,
    /// `[T, H, D]`.
    pub v: &'a CudaSlice<T>,
    /// `[H, 3]` f32 RelTemporal coefficients; on the device because training updates them there.
    pub coeffs: &'a CudaSlice<f32>,
    /// `[T, H, 3]`; `None` means all ones.
    pub gates: Option<DeviceGates<'a, T>>,
}

impl<T> DeviceInputs<'_, T> {
    /// Each buffer's context by field, for [`GpuDevice::check_contexts`].
    pub(crate) fn contexts(&self) -> Vec<(&'static str, &Arc<CudaContext>)> {
        let mut out = vec![
            ("q", self.q.context()),
            ("k", self.k.context()),
            ("v", self.v.context()),
            ("coeffs", self.coeffs.context()),
        ];
        match &self.gates {
            Some(DeviceGates::Native(g)) => out.push(("gates", g.context())),
            Some(DeviceGates::F32(g)) => out.push(("gates", g.context())),
            None => {}
        }
        out
    }
}

/// Caller buffers the forward writes, every element of them.
#[derive(Debug)]
pub struct DeviceOutputs<'a, T> {
    /// `[T, H, D]` in the input dtype.
    pub o: &'a mut CudaSlice<T>,
    /// `[T, H, 3]` f32 per-branch log-sum-exp, `-inf` where a branch's key set is empty.
    pub lse: &'a mut CudaSlice<f32>,
    /// `[T, H, 3, D]` in the input dtype, optional: each branch's output `O_b` before gating
    /// (zero where its key set is empty), for the backward. Given to
    /// [`backward_into`](GpuDevice::backward_into), they spare its tensor-core query kernel
    /// (16-bit inputs) a pass over every pair, at the cost of three times `o`'s memory.
    pub branch_out: Option<&'a mut CudaSlice<T>>,
}

/// Forward outputs on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostForward<T> {
    /// `[T, H, D]` in the input dtype.
    pub o: Vec<T>,
    /// `[T, H, 3]` per-branch log-sum-exp, `-inf` where a branch's key set is empty.
    pub lse: Vec<f32>,
}

/// What `forward_alloc` returns: O, the LSE and, when asked, the branch outputs.
type Allocated<T> = (CudaSlice<T>, CudaSlice<f32>, Option<CudaSlice<T>>);

/// Pushes the gates argument: the buffer, or a null pointer when there are none (`gates_mode`
/// tells the kernel which).
pub(crate) fn push_gates<'a, T>(
    launch: &mut LaunchArgs<'a>,
    gates: &Option<DeviceGates<'a, T>>,
    null: &'a u64,
) {
    match gates {
        None => launch.arg(null),
        Some(DeviceGates::Native(g)) => launch.arg(*g),
        Some(DeviceGates::F32(g)) => launch.arg(*g),
    };
}

/// Pushes the arguments every attention kernel takes after its gates, in the kernels' order:
/// coeffs, rel_time, seqs, weekday0, chunk_ends, chunk_counts.
pub(crate) fn push_layout<'a>(
    launch: &mut LaunchArgs<'a>,
    coeffs: &'a CudaSlice<f32>,
    batch: &'a DeviceBatch,
    chunks: &'a DeviceChunks,
) {
    launch
        .arg(coeffs)
        .arg(&batch.rel_time)
        .arg(&batch.seqs)
        .arg(&batch.weekday0)
        .arg(&chunks.ends)
        .arg(&chunks.counts);
}

/// The largest `num_time_buckets` the kernels take: NB is exact in f32 (their `1 / NB`), and
/// the clamp's `NB + 254` (attn/temporal.cuh) stays far from i32 overflow. No gap below 2^31
/// reaches bucket 64, so any NB above 63 already gives `Bk = -bucket / NB`.
pub(crate) const GPU_MAX_TIME_BUCKETS: u32 = 1 << 24;

/// `num_time_buckets` as the kernels take it, or an error that names it.
pub(crate) fn gpu_time_buckets(num_time_buckets: u32) -> Result<i32> {
    if num_time_buckets > GPU_MAX_TIME_BUCKETS {
        return Err(Error::OutOfRange {
            field: "num_time_buckets",
            value: num_time_buckets.to_string(),
            expected: "at most 2^24 = 16777216 on the GPU path",
        });
    }
    Ok(num_time_buckets as i32)
}

/// The scalars every attention launch needs (no chunks): the config validated against the
/// batch and dims, with `scale`, `heads`, `num_time_buckets` and the batch sizes filled in.
pub(crate) fn batch_params(
    batch: &DeviceBatch,
    dims: Dims,
    config: &AttnConfig,
) -> Result<EvoParams> {
    let scale = config.validate(dims)?;
    if config.temporal.utc_offset != batch.utc_offset {
        return Err(Error::DeviceMismatch {
            field: "utc_offset",
            value: config.temporal.utc_offset.to_string(),
            expected: format!("the {} the batch was uploaded with", batch.utc_offset),
        });
    }
    if dims.heads > u16::MAX as usize {
        return Err(Error::OutOfRange {
            field: "heads",
            value: dims.heads.to_string(),
            expected: "at most 65535 on the GPU path (grid y)",
        });
    }
    let num_time_buckets = gpu_time_buckets(config.temporal.num_time_buckets)?;
    Ok(EvoParams {
        num_seqs: batch.num_seqs as i32,
        num_tokens: batch.num_tokens as i32,
        heads: dims.heads as i32,
        num_time_buckets,
        gates_mode: GatesMode::None as i32,
        scale: scale as f32,
        head_dim: dims.head_dim as i32,
        ..EvoParams::default()
    })
}

/// Scalars of a launch, validated against the batch, chunks and tensors.
pub(crate) fn launch_params(
    batch: &DeviceBatch,
    chunks: &DeviceChunks,
    dims: Dims,
    config: &AttnConfig,
) -> Result<EvoParams> {
    // Chunks of another batch would send kernels past this batch's tokens.
    if !Arc::ptr_eq(&chunks.layout, &batch.layout) && *chunks.layout != *batch.layout {
        return Err(Error::DeviceMismatch {
            field: "chunks",
            value: format!("chunks of a {}-sequence batch", chunks.num_seqs),
            expected: "chunks built for this batch (same offsets and candidates)".into(),
        });
    }
    let base = batch_params(batch, dims, config)?;
    let tail_tokens = gpu_tail_tokens(config.tail_tokens, batch.max_behaviors, chunks.max_chunks)?;
    let window = config.window.min(batch.max_behaviors + 1);
    Ok(EvoParams {
        max_chunks: chunks.max_chunks as i32,
        tail_tokens: tail_tokens as i32,
        window: window as i32,
        ..base
    })
}

/// Device copies of one host call's batch, chunks and inputs (for the `*_host` conveniences).
pub(crate) struct HostUpload<T> {
    pub batch: DeviceBatch,
    pub chunks: DeviceChunks,
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    coeffs: CudaSlice<f32>,
    gates: Option<OwnedGates<T>>,
}

enum OwnedGates<T> {
    Native(CudaSlice<T>),
    F32(CudaSlice<f32>),
}

impl<T> HostUpload<T> {
    /// The uploaded tensors as the device calls take them.
    pub fn inputs(&self) -> DeviceInputs<'_, T> {
        DeviceInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            coeffs: &self.coeffs,
            gates: self.gates.as_ref().map(|g| match g {
                OwnedGates::Native(g) => DeviceGates::Native(g),
                OwnedGates::F32(g) => DeviceGates::F32(g),
            }),
        }
    }
}

/// The lengths of Q, K, V and coeffs for `t` tokens (all that the dense forward reads).
pub(crate) fn check_tensors<T>(inputs: &DeviceInputs<'_, T>, dims: Dims, t: usize) -> Result<()> {
    let rows = dims.tensor_len(t)?;
    for (field, len) in [
        ("q", inputs.q.len()),
        ("k", inputs.k.len()),
        ("v", inputs.v.len()),
    ] {
        check_len(field, len, rows)?;
    }
    check_len("coeffs", inputs.coeffs.len(), dims.branch_len(1)?)
}

/// The lengths of a sparse forward's inputs for `t` tokens (those of check_tensors and the
/// gates when given), and how the kernel reads the gates.
pub(crate) fn check_inputs<T: GpuElement>(
    inputs: &DeviceInputs<'_, T>,
    dims: Dims,
    t: usize,
) -> Result<GatesMode> {
    check_tensors(inputs, dims, t)?;
    Ok(match inputs.gates {
        None => GatesMode::None,
        Some(DeviceGates::Native(g)) => {
            check_len("gates", g.len(), dims.branch_len(t)?)?;
            GatesMode::Native
        }
        Some(DeviceGates::F32(g)) => {
            check_len("gates", g.len(), dims.branch_len(t)?)?;
            GatesMode::F32
        }
    })
}

impl GpuDevice {
    /// Uploads a validated host call: batch (times prepared for `config`), chunks and inputs.
    pub(crate) fn upload_call<T: GpuElement>(
        &self,
        batch: &JaggedBatch,
        chunks: &Chunks,
        config: &AttnConfig,
        inputs: &Inputs<'_, T>,
    ) -> Result<HostUpload<T>> {
        let stream = &self.stream;
        Ok(HostUpload {
            batch: self.upload_batch(batch, &config.temporal)?,
            chunks: self.upload_chunks(batch, chunks)?,
            q: upload(stream, inputs.q)?,
            k: upload(stream, inputs.k)?,
            v: upload(stream, inputs.v)?,
            coeffs: upload(stream, inputs.coeffs)?,
            gates: match inputs.gates {
                None => None,
                Some(Gates::Native(g)) => Some(OwnedGates::Native(upload(stream, g)?)),
                Some(Gates::F32(g)) => Some(OwnedGates::F32(upload(stream, g)?)),
            },
        })
    }

    /// Chunk summaries `Kbar`, `Vbar` (`[B * P, H, D]` f32 whatever T is: rounding them to bf16
    /// cost the bf16 dcoeffs their tolerance): every slot is zero-initialised, the pooling kernel
    /// fills the slots of real chunks.
    pub(crate) fn pool<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        chunks: &DeviceChunks,
        dims: Dims,
        params: &EvoParams,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let stream = &self.stream;
        let summary_len = (chunks.num_seqs * chunks.max_chunks)
            .checked_mul(dims.heads * dims.head_dim)
            .ok_or(Error::OutOfRange {
                field: "heads",
                value: dims.heads.to_string(),
                expected: "B * P * H * D to fit in usize",
            })?
            .max(1);
        let mut kbar = stream
            .alloc_zeros::<f32>(summary_len)
            .map_err(driver("cuMemAlloc(kbar)"))?;
        let mut vbar = stream
            .alloc_zeros::<f32>(summary_len)
            .map_err(driver("cuMemAlloc(vbar)"))?;
        let pool = self.function(Entry::Pooling, Some(T::DTYPE), None)?;
        let cfg = LaunchConfig {
            grid_dim: ((chunks.num_seqs * chunks.max_chunks) as u32, 1, 1),
            block_dim: (POOL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&pool);
        launch
            .arg(params)
            .arg(k)
            .arg(v)
            .arg(&batch.seqs)
            .arg(&chunks.ends)
            .arg(&chunks.counts)
            .arg(&mut kbar)
            .arg(&mut vbar);
        // SAFETY: argument types and order match SPARSECTR_POOLING; the caller checked that k
        // and v hold T * H * D elements; kbar and vbar hold B * P * H * D; chunks match batch.
        unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(evo_pooling)"))?;
        Ok((kbar, vbar))
    }

    /// The launch scalars of a forward call, once its batch, chunks, config and inputs are
    /// checked (everything but the outputs).
    fn forward_params<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        chunks: &DeviceChunks,
        dims: Dims,
        config: &AttnConfig,
        inputs: &DeviceInputs<'_, T>,
    ) -> Result<EvoParams> {
        let mut params = launch_params(batch, chunks, dims, config)?;
        params.gates_mode = check_inputs(inputs, dims, batch.num_tokens)? as i32;
        let mut buffers = inputs.contexts();
        buffers.extend([("batch", batch.context()), ("chunks", chunks.context())]);
        self.check_contexts(&buffers)?;
        Ok(params)
    }

    /// Sparse EvoAttention forward into caller buffers (`out.o`, `out.lse` and, when given,
    /// `out.branch_out`); every element of them is written. Chunk summaries take
    /// `2 * B * P * H * D` elements of scratch, allocated per call.
    pub fn forward_into<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        chunks: &DeviceChunks,
        dims: Dims,
        config: &AttnConfig,
        inputs: &DeviceInputs<'_, T>,
        out: DeviceOutputs<'_, T>,
    ) -> Result<()> {
        let DeviceOutputs { o, lse, branch_out } = out;
        let params = self.forward_params(batch, chunks, dims, config, inputs)?;
        let t = batch.num_tokens;
        let mut buffers = vec![("o", o.context()), ("lse", lse.context())];
        if let Some(b) = &branch_out {
            buffers.push(("branch_out", b.context()));
        }
        self.check_contexts(&buffers)?;
        check_len("o", o.len(), dims.tensor_len(t)?)?;
        check_len("lse", lse.len(), dims.branch_len(t)?)?;
        if let Some(b) = &branch_out {
            check_len("branch_out", b.len(), dims.branch_out_len(t)?)?;
        }
        if t == 0 {
            return Ok(());
        }
        let stream = &self.stream;

        // 16-bit inputs take the tensor-core kernel (64 queries of a sequence per block) unless
        // told otherwise; f32 keeps the warp-per-query kernel, whose CUDA-core dot products need
        // no MMA emulation.
        let tiled = !self.sparse_uses_warp_kernels(T::DTYPE);
        let (forward, cfg) = if !tiled {
            let cfg = LaunchConfig {
                grid_dim: ((t as u32).div_ceil(FORWARD_WARPS), dims.heads as u32, 1),
                block_dim: (FORWARD_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            (
                self.function(Entry::Forward, Some(T::DTYPE), Some(dims.head_dim))?,
                cfg,
            )
        } else {
            let cfg = dense_grid(batch, dims, 1)?;
            (
                self.function(Entry::ForwardTc, Some(T::DTYPE), Some(dims.head_dim))?,
                cfg,
            )
        };
        let (kbar, vbar) = self.pool(batch, chunks, dims, &params, inputs.k, inputs.v)?;
        let no_gates = 0u64; // a null pointer: the kernel reads no gates
        let mut launch = stream.launch_builder(&forward);
        launch
            .arg(&params)
            .arg(inputs.q)
            .arg(inputs.k)
            .arg(inputs.v)
            .arg(&kbar)
            .arg(&vbar);
        push_gates(&mut launch, &inputs.gates, &no_gates);
        push_layout(&mut launch, inputs.coeffs, batch, chunks);
        launch.arg(o).arg(lse);
        if tiled {
            launch.arg(&batch.tiles);
        }
        // Last, so that kernels from before it was added (the benchmark's `ab` runs of earlier
        // kernel folders) ignore it.
        match branch_out {
            Some(b) => launch.arg(b),
            None => launch.arg(&no_gates),
        };
        // SAFETY: argument types and order match SPARSECTR_FORWARD, or SPARSECTR_FORWARD_TC
        // (the same parameters and the tile list before branch_out); every tensor length was
        // checked against T, H and D above; gates_mode says which gates pointer is valid, and
        // branch_out is a buffer of 3 T H D elements or null.
        unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(evo_forward)"))?;
        Ok(())
    }

    /// Sparse EvoAttention forward, allocating the outputs. An empty batch (`T = 0`) is validated
    /// like any other and gives buffers of length 0 (a context that refuses zero-byte
    /// allocations makes that an [`Error::Cuda`](crate::Error::Cuda)).
    pub fn forward<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        chunks: &DeviceChunks,
        dims: Dims,
        config: &AttnConfig,
        inputs: &DeviceInputs<'_, T>,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        let (o, lse, _) = self.forward_alloc(batch, chunks, dims, config, inputs, false)?;
        Ok((o, lse))
    }

    /// Sparse EvoAttention forward for training, allocating the outputs: `(o, lse,
    /// branch_out)`, where `branch_out` (`[T, H, 3, D]`) holds each branch's output before
    /// gating for [`backward_into`](Self::backward_into).
    pub fn forward_for_backward<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        chunks: &DeviceChunks,
        dims: Dims,
        config: &AttnConfig,
        inputs: &DeviceInputs<'_, T>,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>, CudaSlice<T>)> {
        let (o, lse, b) = self.forward_alloc(batch, chunks, dims, config, inputs, true)?;
        Ok((
            o,
            lse,
            b.ok_or(Error::Zero {
                field: "branch_out",
            })?,
        ))
    }

    /// [`forward_into`](Self::forward_into) into buffers it allocates; the branch outputs when
    /// `branches`.
    fn forward_alloc<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        chunks: &DeviceChunks,
        dims: Dims,
        config: &AttnConfig,
        inputs: &DeviceInputs<'_, T>,
        branches: bool,
    ) -> Result<Allocated<T>> {
        // Checked before allocating, so that a bad call names its field even where an empty
        // output cannot be allocated (T = 0 on a context without stream-ordered allocation).
        self.forward_params(batch, chunks, dims, config, inputs)?;
        // Outputs of exactly their lengths (empty for T = 0).
        let (t, stream) = (batch.num_tokens, &self.stream);
        let mut o = output::<T>(stream, dims.tensor_len(t)?, "cuMemAlloc(o)")?;
        let mut branch_out = if branches {
            Some(output::<T>(
                stream,
                dims.branch_out_len(t)?,
                "cuMemAlloc(branch_out)",
            )?)
        } else {
            None
        };
        let mut lse = output::<f32>(stream, dims.branch_len(t)?, "cuMemAlloc(lse)")?;
        let out = DeviceOutputs {
            o: &mut o,
            lse: &mut lse,
            branch_out: branch_out.as_mut(),
        };
        self.forward_into(batch, chunks, dims, config, inputs, out)?;
        Ok((o, lse, branch_out))
    }

    /// Convenience: host slices in, host vectors out. Validates like the reference, uploads,
    /// chunks with `chunks`, runs [`forward_into`](Self::forward_into) and copies back.
    pub fn forward_host<T: GpuElement>(
        &self,
        batch: &JaggedBatch,
        chunks: &Chunks,
        dims: Dims,
        config: &AttnConfig,
        inputs: &Inputs<'_, T>,
    ) -> Result<HostForward<T>> {
        let attn = EvoAttention::new(batch, chunks, dims, *config)?;
        inputs.validate(&attn)?;
        let t = batch.num_tokens();
        if t == 0 {
            return Ok(HostForward {
                o: Vec::new(),
                lse: Vec::new(),
            });
        }
        let up = self.upload_call(batch, chunks, config, inputs)?;
        let (o, lse) = self.forward(&up.batch, &up.chunks, dims, config, &up.inputs())?;
        let o = self
            .stream
            .clone_dtoh(&o)
            .map_err(driver("cuMemcpyDtoH(o)"))?;
        let lse = self
            .stream
            .clone_dtoh(&lse)
            .map_err(driver("cuMemcpyDtoH(lse)"))?;
        debug_assert_eq!(lse.len(), t * dims.heads * NUM_BRANCHES);
        Ok(HostForward { o, lse })
    }
}

/// The tail tokens per chunk `m` the kernels take: beyond the longest sequence's behaviors, larger
/// values select the same keys, so `m` is clamped to that, which keeps the kernels' int math
/// safe. The kernels walk a query's `m * P` transition slots in an int, one gather at a time (128
/// slots in the tensor-core query backward at D <= 64), so `m * P` keeps a headroom of 256 below
/// `i32::MAX` that no gather step reaches.
fn gpu_tail_tokens(tail_tokens: usize, max_behaviors: usize, max_chunks: usize) -> Result<usize> {
    let clamped = tail_tokens.min(max_behaviors.max(1));
    if clamped.saturating_mul(max_chunks) > (i32::MAX - 256) as usize {
        return Err(Error::OutOfRange {
            field: "tail_tokens",
            value: tail_tokens.to_string(),
            expected: "tail_tokens * P at most i32::MAX - 256 on the GPU path",
        });
    }
    Ok(clamped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_buckets_above_2_pow_24_are_refused_by_name() {
        assert_eq!(gpu_time_buckets(1).unwrap(), 1);
        assert_eq!(gpu_time_buckets(1 << 24).unwrap(), 1 << 24);
        for nb in [(1u32 << 24) + 1, i32::MAX as u32 - 100, u32::MAX] {
            match gpu_time_buckets(nb) {
                Err(Error::OutOfRange { field, value, .. }) => {
                    assert_eq!(field, "num_time_buckets");
                    assert_eq!(value, nb.to_string());
                }
                other => panic!("num_time_buckets = {nb}: {other:?}"),
            }
        }
    }

    #[test]
    fn tail_slots_keep_headroom_below_i32_max() {
        // m is clamped to the longest sequence's behaviors before the bound applies.
        assert_eq!(gpu_tail_tokens(1000, 7, 3).unwrap(), 7);
        assert_eq!(gpu_tail_tokens(0, 0, 3).unwrap(), 0);
        let limit = (i32::MAX - 256) as usize;
        // P * m at the limit passes; one slot more (m * P = limit + 1 with P = 1) is refused.
        assert_eq!(gpu_tail_tokens(limit, usize::MAX, 1).unwrap(), limit);
        // The finding that set the headroom: P * m within 128 of i32::MAX, which a 128-slot
        // gather step walked past in an int (backward_query_tc, D <= 64).
        for (m, p) in [(limit + 1, 1), (46_779, 45_907), (usize::MAX, 2)] {
            match gpu_tail_tokens(m, usize::MAX, p) {
                Err(Error::OutOfRange { field, value, .. }) => {
                    assert_eq!(field, "tail_tokens");
                    assert_eq!(value, m.to_string());
                }
                other => panic!("m = {m}, P = {p}: {other:?}"),
            }
        }
    }
}
