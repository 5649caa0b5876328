//! The dense counterpart on the GPU (SPEC section 5): one causal softmax over the user token and
//! every earlier behavior (candidates: all behaviors and themselves), with the same in-kernel
//! RelTemporal bias and no gates. It is the full-attention model SparseCTR replaces, as this
//! crate's own tiled kernels (FlashAttention-2 style, tensor cores for bf16/f16), so that quality
//! and speed can be compared on the same batches.
//!
//! ```no_run
//! use sparsectr_attn::cuda::GpuDevice;
//! use sparsectr_attn::{workload, Inputs};
//!
//! let gpu = GpuDevice::new(0)?;
//! let wl = workload::CTR_SMALL;
//! let batch = wl.batch(1, 256, 4096)?;
//! let n = batch.num_tokens() * wl.heads * wl.head_dim;
//! let mut rng = workload::Rng::new(2);
//! let q: Vec<f32> = workload::random_tensor(&mut rng, n, 1.0);
//! let coeffs = vec![0.1f32; wl.heads * 3];
//! let inputs = Inputs { q: &q, k: &q, v: &q, coeffs: &coeffs, gates: None };
//! let out = gpu.dense_forward_host(&batch, wl.dims(), &wl.config(), &inputs)?;
//! assert_eq!(out.lse.len(), batch.num_tokens() * wl.heads);
//! # Ok::<(), sparsectr_attn::Error>(())
//! ```

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::backward::{BackwardMode, HostGradients};
use super::batch::{output, upload, zeros, DeviceBatch};
use super::device::{driver, GpuDevice};
use super::forward::{batch_params, check_tensors, DeviceInputs, GpuElement};
use super::kernels::Entry;
use super::params::EvoParams;
use crate::attention::{check_len, AttnConfig, Dims, EvoAttention, Inputs};
use crate::batch::JaggedBatch;
use crate::chunking::Chunks;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Threads per block of the tiled kernels (`kDenseThreads`).
const DENSE_THREADS: u32 = 128;
/// Threads per block of the dcoeffs reduction (`kReduceThreads`).
const REDUCE_THREADS: u32 = 256;
/// The largest grid y.
const MAX_GRID_Y: usize = 65535;

/// Caller buffers of the dense forward, every element of which is written.
#[derive(Debug)]
pub struct DenseOutputs<'a, T> {
    /// `[T, H, D]` in the input dtype.
    pub o: &'a mut CudaSlice<T>,
    /// `[T, H]` f32 log-sum-exp of each row's softmax.
    pub lse: &'a mut CudaSlice<f32>,
}

/// Caller buffers of the dense backward, every element of which is written.
#[derive(Debug)]
pub struct DenseGrads<'a, T> {
    /// `[T, H, D]`.
    pub dq: &'a mut CudaSlice<T>,
    /// `[T, H, D]`.
    pub dk: &'a mut CudaSlice<T>,
    /// `[T, H, D]`.
    pub dv: &'a mut CudaSlice<T>,
    /// `[H, 3]` f32.
    pub dcoeffs: &'a mut CudaSlice<f32>,
}

/// Dense forward outputs on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostDenseForward<T> {
    /// `[T, H, D]` in the input dtype.
    pub o: Vec<T>,
    /// `[T, H]`.
    pub lse: Vec<f32>,
}

/// The dense backward's kernels and grid, resolved and checked before anything is launched (or,
/// in `dense_backward_host`, before its forward): a missing variant or a grid past the device's
/// limits is an error, not dQ written and dK, dV and dcoeffs not.
struct DenseBackwardPlan {
    cfg: LaunchConfig,
    query: CudaFunction,
    key: CudaFunction,
    reduce: CudaFunction,
}

/// Parts of the head dimension a dense backward kernel splits its accumulators into
/// (`DenseParts` in kernels/attn/dense.cuh): f32 at D = 128 would spill otherwise.
fn dense_parts(dtype: DType, head_dim: usize) -> usize {
    if dtype == DType::F32 && head_dim == 128 {
        4
    } else {
        1
    }
}

/// The grid of the tiled kernels (dense, and the tensor-core sparse kernels): the batch's tile
/// list in x, (head, part) in y.
pub(crate) fn dense_grid(batch: &DeviceBatch, dims: Dims, parts: usize) -> Result<LaunchConfig> {
    let y = dims
        .heads
        .checked_mul(parts)
        .filter(|&y| y <= MAX_GRID_Y)
        .ok_or(Error::OutOfRange {
            field: "heads",
            value: dims.heads.to_string(),
            expected: "H * (blocks per tile) at most 65535 (grid y of the tiled kernels)",
        })?;
    let x = u32::try_from(batch.num_tiles)
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or(Error::OutOfRange {
            field: "num_tokens",
            value: batch.num_tokens.to_string(),
            expected: "at most i32::MAX tiles of 64 tokens",
        })?;
    Ok(LaunchConfig {
        grid_dim: (x, y as u32, 1),
        block_dim: (DENSE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl GpuDevice {
    /// The launch scalars of a dense call, once its batch, config and Q, K, V and coeffs are
    /// checked.
    fn dense_params<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        dims: Dims,
        config: &AttnConfig,
        inputs: &DeviceInputs<'_, T>,
    ) -> Result<EvoParams> {
        let params = batch_params(batch, dims, config)?;
        check_tensors(inputs, dims, batch.num_tokens)?;
        let mut buffers = inputs.contexts();
        buffers.push(("batch", batch.context()));
        self.check_contexts(&buffers)?;
        Ok(params)
    }

    /// Dense forward into caller buffers. `inputs.gates` is ignored (the dense counterpart has
    /// none); `config` gives the scale and the temporal settings (its `tail_tokens` and `window`
    /// are unused). Allocates nothing.
    pub fn dense_forward_into<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        dims: Dims,
        config: &AttnConfig,
        inputs: &DeviceInputs<'_, T>,
        out: DenseOutputs<'_, T>,
    ) -> Result<()> {
        let DenseOutputs { o, lse } = out;
        let params = self.dense_params(batch, dims, config, inputs)?;
        let t = batch.num_tokens;
        self.check_contexts(&[("o", o.context()), ("lse", lse.context())])?;
        check_len("o", o.len(), dims.tensor_len(t)?)?;
        check_len("lse", lse.len(), row_len(dims, t)?)?;
        if t == 0 {
            return Ok(());
        }
        let cfg = dense_grid(batch, dims, 1)?;
        let func = self.function(Entry::DenseForward, Some(T::DTYPE), Some(dims.head_dim))?;
        let mut launch = self.stream.launch_builder(&func);
        launch
            .arg(&params)
            .arg(inputs.q)
            .arg(inputs.k)
            .arg(inputs.v)
            .arg(inputs.coeffs)
            .arg(&batch.rel_time)
            .arg(&batch.seqs)
            .arg(&batch.weekday0)
            .arg(o)
            .arg(lse)
            .arg(&batch.tiles);
        // SAFETY: argument types and order match SPARSECTR_DENSE_FORWARD; q, k, v, o hold
        // T * H * D elements, lse T * H, coeffs H * 3; the batch buffers are this batch's.
        unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(evo_dense_forward)"))?;
        Ok(())
    }

    /// Dense forward, allocating the outputs. An empty batch (`T = 0`) is validated like any
    /// other and gives buffers of length 0, as [`forward`](Self::forward) does.
    pub fn dense_forward<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        dims: Dims,
        config: &AttnConfig,
        inputs: &DeviceInputs<'_, T>,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        // Checked before allocating, as in `forward`: a bad call names its field even where an
        // empty output cannot be allocated.
        self.dense_params(batch, dims, config, inputs)?;
        // Outputs of exactly their lengths (empty for T = 0, which the dense backward takes).
        let (t, stream) = (batch.num_tokens, &self.stream);
        let mut o = output::<T>(stream, dims.tensor_len(t)?, "cuMemAlloc(o)")?;
        let mut lse = output::<f32>(stream, row_len(dims, t)?, "cuMemAlloc(lse)")?;
        let out = DenseOutputs {
            o: &mut o,
            lse: &mut lse,
        };
        self.dense_forward_into(batch, dims, config, inputs, out)?;
        Ok((o, lse))
    }

    /// Dense backward into caller buffers, from `d_o` and the forward's `o` and `lse`. Scratch
    /// allocated per call beyond the outputs: `T * H` f32 row terms `<dO, O>` and `3 * T * H` f32
    /// dcoeff partials; nothing is `T x T`. No kernel uses atomics, so both modes give the same
    /// bits from run to run.
    #[allow(clippy::too_many_arguments)]
    pub fn dense_backward_into<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        dims: Dims,
        config: &AttnConfig,
        inputs: &DeviceInputs<'_, T>,
        o: &CudaSlice<T>,
        lse: &CudaSlice<f32>,
        d_o: &CudaSlice<T>,
        mode: BackwardMode,
        grads: DenseGrads<'_, T>,
    ) -> Result<()> {
        // One set of atomic-free kernels serves both modes.
        let _ = mode;
        let params = batch_params(batch, dims, config)?;
        let t = batch.num_tokens;
        check_tensors(inputs, dims, t)?;
        let rows = dims.tensor_len(t)?;
        for (field, len) in [
            ("o", o.len()),
            ("d_o", d_o.len()),
            ("dq", grads.dq.len()),
            ("dk", grads.dk.len()),
            ("dv", grads.dv.len()),
        ] {
            check_len(field, len, rows)?;
        }
        check_len("dcoeffs", grads.dcoeffs.len(), dims.branch_len(1)?)?;
        check_len("lse", lse.len(), row_len(dims, t)?)?;
        let mut buffers = inputs.contexts();
        buffers.extend([
            ("batch", batch.context()),
            ("o", o.context()),
            ("lse", lse.context()),
            ("d_o", d_o.context()),
            ("dq", grads.dq.context()),
            ("dk", grads.dk.context()),
            ("dv", grads.dv.context()),
            ("dcoeffs", grads.dcoeffs.context()),
        ]);
        self.check_contexts(&buffers)?;
        let stream = &self.stream;
        if t == 0 {
            stream
                .memset_zeros(grads.dcoeffs)
                .map_err(driver("cuMemsetD8(dcoeffs)"))?;
            return Ok(());
        }
        let plan = self.dense_backward_plan::<T>(batch, dims)?;
        let cfg = plan.cfg;
        let mut delta = zeros::<f32>(stream, row_len(dims, t)?)?;
        let mut partial = zeros::<f32>(stream, dims.branch_len(t)?)?;

        let mut launch = stream.launch_builder(&plan.query);
        launch
            .arg(&params)
            .arg(inputs.q)
            .arg(inputs.k)
            .arg(inputs.v)
            .arg(o)
            .arg(d_o)
            .arg(lse)
            .arg(inputs.coeffs)
            .arg(&batch.rel_time)
            .arg(&batch.seqs)
            .arg(&batch.weekday0)
            .arg(&mut *grads.dq)
            .arg(&mut delta)
            .arg(&mut partial)
            .arg(&batch.tiles);
        // SAFETY: argument types and order match SPARSECTR_DENSE_BACKWARD_QUERY; tensors hold
        // T * H * D, lse and delta T * H, partial H * T * 3 f32 (lengths checked above).
        unsafe { launch.launch(cfg) }
            .map_err(driver("cuLaunchKernel(evo_dense_backward_query)"))?;

        let mut launch = stream.launch_builder(&plan.key);
        launch
            .arg(&params)
            .arg(inputs.q)
            .arg(inputs.k)
            .arg(inputs.v)
            .arg(d_o)
            .arg(lse)
            .arg(&delta)
            .arg(inputs.coeffs)
            .arg(&batch.rel_time)
            .arg(&batch.seqs)
            .arg(&batch.weekday0)
            .arg(&mut *grads.dk)
            .arg(&mut *grads.dv)
            .arg(&batch.tiles);
        // SAFETY: argument types and order match SPARSECTR_DENSE_BACKWARD_KEY; lengths as above.
        unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(evo_dense_backward_key)"))?;

        reduce_coeffs(self, &plan.reduce, &params, &partial, grads.dcoeffs, dims)
    }

    /// The dense backward's kernels and grid ([`DenseBackwardPlan`]).
    fn dense_backward_plan<T: GpuElement>(
        &self,
        batch: &DeviceBatch,
        dims: Dims,
    ) -> Result<DenseBackwardPlan> {
        let (dtype, dim) = (Some(T::DTYPE), Some(dims.head_dim));
        Ok(DenseBackwardPlan {
            cfg: dense_grid(batch, dims, dense_parts(T::DTYPE, dims.head_dim))?,
            query: self.function(Entry::DenseBackwardQuery, dtype, dim)?,
            key: self.function(Entry::DenseBackwardKey, dtype, dim)?,
            reduce: self.function(Entry::CoeffsReduce, None, None)?,
        })
    }

    /// Convenience: host slices in, host forward out. Validates like the reference.
    pub fn dense_forward_host<T: GpuElement>(
        &self,
        batch: &JaggedBatch,
        dims: Dims,
        config: &AttnConfig,
        inputs: &Inputs<'_, T>,
    ) -> Result<HostDenseForward<T>> {
        let chunks = validate_host(batch, dims, config, inputs)?;
        let t = batch.num_tokens();
        if t == 0 {
            return Ok(HostDenseForward {
                o: Vec::new(),
                lse: Vec::new(),
            });
        }
        let up = self.upload_call(batch, &chunks, config, inputs)?;
        let (o, lse) = self.dense_forward(&up.batch, dims, config, &up.inputs())?;
        Ok(HostDenseForward {
            o: self
                .stream
                .clone_dtoh(&o)
                .map_err(driver("cuMemcpyDtoH(o)"))?,
            lse: self
                .stream
                .clone_dtoh(&lse)
                .map_err(driver("cuMemcpyDtoH(lse)"))?,
        })
    }

    /// Convenience: host slices in, host gradients out (`dgates` empty). Runs the GPU dense
    /// forward for O and LSE, then [`dense_backward_into`](Self::dense_backward_into).
    pub fn dense_backward_host<T: GpuElement>(
        &self,
        batch: &JaggedBatch,
        dims: Dims,
        config: &AttnConfig,
        inputs: &Inputs<'_, T>,
        d_o: &[T],
    ) -> Result<HostGradients<T>> {
        let chunks = validate_host(batch, dims, config, inputs)?;
        let t = batch.num_tokens();
        check_len("d_o", d_o.len(), dims.tensor_len(t)?)?;
        if t == 0 {
            return Ok(HostGradients {
                dq: Vec::new(),
                dk: Vec::new(),
                dv: Vec::new(),
                dcoeffs: vec![0.0; dims.branch_len(1)?],
                dgates: Vec::new(),
            });
        }
        let up = self.upload_call(batch, &chunks, config, inputs)?;
        // The backward's own limits (its grid at D = 128 in f32), before the forward runs.
        self.dense_backward_plan::<T>(&up.batch, dims)?;
        let stream = &self.stream;
        let d_o = upload(stream, d_o)?;
        let d_inputs = up.inputs();
        let (o, lse) = self.dense_forward(&up.batch, dims, config, &d_inputs)?;
        let rows = dims.tensor_len(t)?;
        let mut dq = zeros::<T>(stream, rows)?;
        let mut dk = zeros::<T>(stream, rows)?;
        let mut dv = zeros::<T>(stream, rows)?;
        let mut dcoeffs = zeros::<f32>(stream, dims.branch_len(1)?)?;
        let grads = DenseGrads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
            dcoeffs: &mut dcoeffs,
        };
        self.dense_backward_into(
            &up.batch,
            dims,
            config,
            &d_inputs,
            &o,
            &lse,
            &d_o,
            BackwardMode::Deterministic,
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
            dgates: Vec::new(),
        })
    }
}

/// `T * H`: the length of the dense LSE.
fn row_len(dims: Dims, tokens: usize) -> Result<usize> {
    tokens.checked_mul(dims.heads).ok_or(Error::OutOfRange {
        field: "heads",
        value: dims.heads.to_string(),
        expected: "T * H to fit in usize",
    })
}

/// Validates a host call like the reference does; the dense path needs no real chunks, so one
/// chunk per sequence stands in for the upload.
fn validate_host<T: GpuElement>(
    batch: &JaggedBatch,
    dims: Dims,
    config: &AttnConfig,
    inputs: &Inputs<'_, T>,
) -> Result<Chunks> {
    let chunks = Chunks::personalized(batch, 1)?;
    let attn = EvoAttention::new(batch, &chunks, dims, *config)?;
    inputs.validate(&attn)?;
    Ok(chunks)
}

/// dcoeffs from the per-(head, token) partials, in a fixed order, by `func` (the
/// `CoeffsReduce` entry, resolved by the caller before its first launch).
pub(super) fn reduce_coeffs(
    gpu: &GpuDevice,
    func: &CudaFunction,
    params: &EvoParams,
    partial: &CudaSlice<f32>,
    dcoeffs: &mut CudaSlice<f32>,
    dims: Dims,
) -> Result<()> {
    let mut launch = gpu.stream.launch_builder(func);
    launch.arg(params).arg(partial).arg(dcoeffs);
    let cfg = LaunchConfig {
        grid_dim: (dims.heads as u32, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches SPARSECTR_COEFFS_REDUCE; partial holds H * T * 3 f32, dcoeffs H * 3.
    unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(evo_coeffs_reduce)"))?;
    Ok(())
}
