//! The CUDA path of the candle ops (feature `candle-cuda`): this crate's kernels on candle's own
//! stream, reading and writing candle's device buffers. Nothing goes through the host: Q, K and V
//! are split out of `[T, 3, H, D]`, and the gradients stacked back, by candle's `copy2d` kernel.
//!
//! Per process, one [`GpuDevice`] per candle stream (it holds the loaded kernel modules); per
//! [`EvoLayout`], one upload of the batch and its chunks per stream. The forward keeps its LSE in
//! the op value, which candle hands back to the backward; a backward that finds none (an op
//! value whose forward ran elsewhere) recomputes it with the forward.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{DType as CDType, Layout, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream};

use super::{err, CandleDType, EvoLayout};
use crate::attention::{Dims, NUM_BRANCHES};
use crate::cuda::{
    BackwardMode, DenseGrads, DenseOutputs, DeviceBatch, DeviceChunks, DeviceGates, DeviceGrads,
    DeviceInputs, DeviceOutputs, GpuDevice, GpuElement,
};

/// An element type that both this crate's kernels and candle's CUDA storage hold.
pub(super) trait CudaElement: GpuElement + CandleDType + CudaDType {}
impl<T: GpuElement + CandleDType + CudaDType> CudaElement for T {}

type CResult<T> = candle_core::Result<T>;

fn stream_key(stream: &Arc<CudaStream>) -> usize {
    Arc::as_ptr(stream) as usize
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("sparsectr-attn: a lock was poisoned by an earlier panic".into())
}

/// This crate's device handle on candle's stream, made once per stream and kept for the process
/// (the map holds the stream, so no other stream can reuse its address as a key).
fn gpu_for(dev: &CudaDevice) -> CResult<Arc<GpuDevice>> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<GpuDevice>>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let key = stream_key(&stream);
    let mut gpus = GPUS
        .get_or_init(Default::default)
        .lock()
        .map_err(poisoned)?;
    if let Some(gpu) = gpus.get(&key) {
        return Ok(gpu.clone());
    }
    let gpu = Arc::new(GpuDevice::from_stream(stream).map_err(err)?);
    gpus.insert(key, gpu.clone());
    Ok(gpu)
}

/// [`super::load_kernels`] on candle's CUDA device: the kernels load into the handle that the
/// ops on this device's stream use.
pub(super) fn load_kernels(
    dev: &CudaDevice,
    dtype: crate::DType,
    head_dim: usize,
) -> CResult<usize> {
    gpu_for(dev)?.load_kernels(dtype, head_dim).map_err(err)
}

/// [`super::loaded_kernels`] on candle's CUDA device.
pub(super) fn loaded_kernels(dev: &CudaDevice) -> CResult<Vec<&'static str>> {
    Ok(gpu_for(dev)?.loaded_kernels())
}

/// [`super::set_local_pairs`] on candle's CUDA device: the handle of this device's stream.
pub(super) fn set_local_pairs(dev: &CudaDevice, pairs: crate::cuda::LocalPairs) -> CResult<()> {
    gpu_for(dev)?.set_local_pairs(pairs);
    Ok(())
}

/// A layout's batch and chunks on one stream.
#[derive(Debug)]
pub(super) struct GpuLayout {
    batch: DeviceBatch,
    chunks: DeviceChunks,
}

/// One upload per stream, keyed by the stream's address (the buffers hold their stream, so keys
/// stay unique).
type UploadsByStream = Vec<(usize, Arc<GpuLayout>)>;

/// The uploads of one [`EvoLayout`] (its clones share them).
#[derive(Debug, Clone, Default)]
pub(super) struct GpuLayouts(Arc<Mutex<UploadsByStream>>);

impl EvoLayout {
    /// The batch and chunks on `gpu`'s stream, uploaded at the first call.
    fn on(&self, gpu: &GpuDevice) -> CResult<Arc<GpuLayout>> {
        let key = stream_key(gpu.stream());
        let mut uploads = self.gpu.0.lock().map_err(poisoned)?;
        if let Some((_, up)) = uploads.iter().find(|(k, _)| *k == key) {
            return Ok(up.clone());
        }
        let up = Arc::new(GpuLayout {
            batch: gpu
                .upload_batch(&self.batch, &self.config.temporal)
                .map_err(err)?,
            chunks: gpu.upload_chunks(&self.batch, &self.chunks).map_err(err)?,
        });
        uploads.push((key, up.clone()));
        Ok(up)
    }
}

/// What the forward keeps for the backward: its f32 LSE (`[T, H, 3]` sparse, `[T, H]` dense)
/// and, sparse, each branch's output `O_b` (`[T, H, 3, D]` of the op's dtype, boxed because the
/// stash is not generic over it), which spares the backward a pass over every pair.
#[derive(Debug, Default)]
pub(super) struct LseStash(Mutex<Option<Stashed>>);

#[derive(Debug)]
struct Stashed {
    lse: CudaSlice<f32>,
    branch_out: Option<BranchOut>,
}

/// A `CudaSlice<T>` of the op's dtype.
struct BranchOut(Box<dyn std::any::Any + Send>);

impl std::fmt::Debug for BranchOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BranchOut")
    }
}

impl BranchOut {
    fn of<T: CudaElement>(&self) -> Option<&CudaSlice<T>> {
        self.0.downcast_ref::<CudaSlice<T>>()
    }
}

/// A CUDA storage of `len` zeros of `T` (zeros, so that no path can ever read garbage).
fn zeros<T: CudaElement>(dev: &CudaDevice, len: usize) -> CResult<CudaStorage> {
    Ok(CudaStorage::wrap_cuda_slice(
        dev.alloc_zeros::<T>(len)?,
        dev.clone(),
    ))
}

/// Storage for a tensor of no elements. A CUDA allocation of zero bytes is an error
/// (`cuMemAlloc(0)` is `CUDA_ERROR_INVALID_VALUE`), so it holds one element the shape never
/// reaches; a zero-token batch reaches the op only as a view (`narrow`) of a larger tensor.
fn empty_storage<T: CudaElement>(dev: &CudaDevice) -> CResult<CudaStorage> {
    zeros::<T>(dev, 1)
}

/// Zeros shaped like `t`, which has no elements (see `empty_storage`).
fn empty_like(t: &Tensor) -> CResult<Tensor> {
    Tensor::zeros(1, t.dtype(), t.device())?
        .narrow(0, 0, 0)?
        .reshape(t.shape())
}

/// The elements of `s` under the contiguous layout `l` as one whole buffer, as the kernels take
/// them: `s` itself when `l` covers all of it, else a copy made on the device into `copy` (a
/// view with an offset, e.g. from `narrow`).
fn whole<'a>(
    what: &str,
    s: &'a CudaStorage,
    l: &Layout,
    copy: &'a mut Option<CudaStorage>,
) -> CResult<&'a CudaStorage> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("sparsectr-attn: {what} must be contiguous");
    };
    let len = match &s.slice {
        CudaStorageSlice::F32(x) => x.len(),
        CudaStorageSlice::F16(x) => x.len(),
        CudaStorageSlice::BF16(x) => x.len(),
        _ => candle_core::bail!("sparsectr-attn: {what} has dtype {:?}", s.dtype()),
    };
    if start == 0 && end == len {
        return Ok(s);
    }
    let mut dst = match s.dtype() {
        CDType::F32 => zeros::<f32>(&s.device, end - start)?,
        CDType::F16 => zeros::<half::f16>(&s.device, end - start)?,
        CDType::BF16 => zeros::<half::bf16>(&s.device, end - start)?,
        d => candle_core::bail!("sparsectr-attn: {what} has dtype {d:?}"),
    };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(copy.insert(dst))
}

/// The CUDA storage under a tensor's read guard.
fn on_gpu<'a>(what: &str, s: &'a Storage) -> CResult<&'a CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("sparsectr-attn: {what} is not on the GPU that the op ran on"),
    }
}

/// Q, K and V (`[T, H, D]` each, `row = H * D`) out of `[T, 3, H, D]` under the contiguous `l`.
fn split_qkv<T: CudaElement>(
    s: &CudaStorage,
    l: &Layout,
    t: usize,
    row: usize,
) -> CResult<[CudaStorage; 3]> {
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("sparsectr-attn: qkv must be contiguous");
    };
    let part = |i: usize| -> CResult<CudaStorage> {
        let mut dst = zeros::<T>(&s.device, t * row)?;
        s.copy2d(&mut dst, t, row, 3 * row, row, start + i * row, 0)?;
        Ok(dst)
    };
    Ok([part(0)?, part(1)?, part(2)?])
}

/// `[T, 3, H, D]` from dQ, dK, dV (`[T, H, D]` each, `row = H * D`).
fn stack_qkv<T: CudaElement>(
    dev: &CudaDevice,
    parts: [CudaSlice<T>; 3],
    t: usize,
    row: usize,
) -> CResult<CudaStorage> {
    let mut dst = zeros::<T>(dev, 3 * t * row)?;
    for (i, part) in parts.into_iter().enumerate() {
        let src = CudaStorage::wrap_cuda_slice(part, dev.clone());
        src.copy2d(&mut dst, t, row, row, 3 * row, 0, i * row)?;
    }
    Ok(dst)
}

/// A new tensor over a CUDA storage, outside the graph (as candle's own gradients are).
fn tensor(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
}

/// Runs `f` on the kernels' view of the op's inputs: Q, K, V split out of `qkv` (the dtype of
/// `T`), `coeffs` (f32) and `gates` (f32 or `T`; `None` for the dense op).
fn with_inputs<T: CudaElement, R>(
    dims: Dims,
    t: usize,
    qkv: (&CudaStorage, &Layout),
    coeffs: (&CudaStorage, &Layout),
    gates: Option<(&CudaStorage, &Layout)>,
    f: impl FnOnce(&DeviceInputs<'_, T>) -> CResult<R>,
) -> CResult<R> {
    let row = dims.heads * dims.head_dim;
    let [q, k, v] = split_qkv::<T>(qkv.0, qkv.1, t, row)?;
    let (mut coeffs_copy, mut gates_copy) = (None, None);
    let coeffs = whole("coeffs", coeffs.0, coeffs.1, &mut coeffs_copy)?;
    let gates = match gates {
        None => None,
        Some((s, l)) => {
            let g = whole("gates", s, l, &mut gates_copy)?;
            Some(match g.dtype() {
                CDType::F32 => DeviceGates::F32(g.as_cuda_slice::<f32>()?),
                d if d == T::DTYPE_CANDLE => DeviceGates::Native(g.as_cuda_slice::<T>()?),
                d => candle_core::bail!(
                    "gates dtype {d:?} is neither f32 nor the dtype of qkv ({:?})",
                    T::DTYPE_CANDLE
                ),
            })
        }
    };
    f(&DeviceInputs {
        q: q.as_cuda_slice::<T>()?,
        k: k.as_cuda_slice::<T>()?,
        v: v.as_cuda_slice::<T>()?,
        coeffs: coeffs.as_cuda_slice::<f32>()?,
        gates,
    })
}

/// `[T, H, D]` for the op's output.
fn out_shape(layout: &EvoLayout) -> Shape {
    Shape::from((layout.num_tokens(), layout.dims.heads, layout.dims.head_dim))
}

/// Sparse forward: `O` `[T, H, D]`; the LSE and the branch outputs go to `stash`, where there
/// is one (none: no backward can follow, and the forward writes no branch outputs).
pub(super) fn evo_forward<T: CudaElement>(
    layout: &EvoLayout,
    stash: Option<&LseStash>,
    qkv: (&CudaStorage, &Layout),
    coeffs: (&CudaStorage, &Layout),
    gates: (&CudaStorage, &Layout),
) -> CResult<(CudaStorage, Shape)> {
    let (dims, t, shape) = (layout.dims, layout.num_tokens(), out_shape(layout));
    let dev = &qkv.0.device;
    if t == 0 {
        return Ok((empty_storage::<T>(dev)?, shape));
    }
    let gpu = gpu_for(dev)?;
    let up = layout.on(&gpu)?;
    let mut o = dev.alloc_zeros::<T>(shape.elem_count())?;
    let mut lse = dev.alloc_zeros::<f32>(t * dims.heads * NUM_BRANCHES)?;
    let mut branch_out = match stash {
        Some(_) => Some(dev.alloc_zeros::<T>(3 * shape.elem_count())?),
        None => None,
    };
    with_inputs::<T, _>(dims, t, qkv, coeffs, Some(gates), |inputs| {
        let out = DeviceOutputs {
            o: &mut o,
            lse: &mut lse,
            branch_out: branch_out.as_mut(),
        };
        gpu.forward_into(&up.batch, &up.chunks, dims, &layout.config, inputs, out)
            .map_err(err)
    })?;
    if let Some(stash) = stash {
        *stash.0.lock().map_err(poisoned)? = Some(Stashed {
            lse,
            branch_out: branch_out.map(|b| BranchOut(Box::new(b))),
        });
    }
    Ok((CudaStorage::wrap_cuda_slice(o, dev.clone()), shape))
}

/// Sparse backward: gradients of `(qkv, coeffs, gates)` with the dtypes and shapes of the CPU
/// path (`[T, 3, H, D]` of T, `[H, 3]` f32, gates' shape and dtype).
pub(super) fn evo_backward<T: CudaElement>(
    layout: &EvoLayout,
    stash: &LseStash,
    qkv: &Tensor,
    coeffs: &Tensor,
    gates: &Tensor,
    grad: &Tensor,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let (dims, t) = (layout.dims, layout.num_tokens());
    if t == 0 {
        return Ok((empty_like(qkv)?, coeffs.zeros_like()?, empty_like(gates)?));
    }
    let d_o = grad.to_dtype(T::DTYPE_CANDLE)?.contiguous()?;
    let (qkv_s, qkv_l) = qkv.storage_and_layout();
    let (coeffs_s, coeffs_l) = coeffs.storage_and_layout();
    let (gates_s, gates_l) = gates.storage_and_layout();
    let (d_o_s, d_o_l) = d_o.storage_and_layout();
    let qkv_s = on_gpu("qkv", &qkv_s)?;
    let dev = &qkv_s.device;
    let gpu = gpu_for(dev)?;
    let up = layout.on(&gpu)?;
    let mut d_o_copy = None;
    let d_o_s = whole(
        "the gradient of O",
        on_gpu("grad", &d_o_s)?,
        d_o_l,
        &mut d_o_copy,
    )?;
    let mut stash = stash.0.lock().map_err(poisoned)?;
    let rows = t * dims.heads * dims.head_dim;
    let branch_rows = t * dims.heads * NUM_BRANCHES;
    let gates_in = (on_gpu("gates", &gates_s)?, gates_l);
    let (dq, dk, dv, dcoeffs, dgates) = with_inputs::<T, _>(
        dims,
        t,
        (qkv_s, qkv_l),
        (on_gpu("coeffs", &coeffs_s)?, coeffs_l),
        Some(gates_in),
        |inputs| {
            let saved = match stash.take() {
                Some(saved) => saved,
                None => {
                    let mut o = dev.alloc_zeros::<T>(rows)?;
                    let mut lse = dev.alloc_zeros::<f32>(branch_rows)?;
                    let mut branch_out = dev.alloc_zeros::<T>(3 * rows)?;
                    let out = DeviceOutputs {
                        o: &mut o,
                        lse: &mut lse,
                        branch_out: Some(&mut branch_out),
                    };
                    gpu.forward_into(&up.batch, &up.chunks, dims, &layout.config, inputs, out)
                        .map_err(err)?;
                    Stashed {
                        lse,
                        branch_out: Some(BranchOut(Box::new(branch_out))),
                    }
                }
            };
            let mut dq = dev.alloc_zeros::<T>(rows)?;
            let mut dk = dev.alloc_zeros::<T>(rows)?;
            let mut dv = dev.alloc_zeros::<T>(rows)?;
            let mut dcoeffs = dev.alloc_zeros::<f32>(dims.heads * NUM_BRANCHES)?;
            let mut dgates = dev.alloc_zeros::<f32>(branch_rows)?;
            let grads = DeviceGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
                dcoeffs: &mut dcoeffs,
                dgates: &mut dgates,
            };
            let d_o = d_o_s.as_cuda_slice::<T>()?;
            let (batch, chunks, config) = (&up.batch, &up.chunks, &layout.config);
            gpu.backward_into(
                batch,
                chunks,
                dims,
                config,
                inputs,
                &saved.lse,
                saved.branch_out.as_ref().and_then(BranchOut::of::<T>),
                d_o,
                BackwardMode::default(),
                grads,
            )
            .map_err(err)?;
            // Kept for another backward through the same graph.
            *stash = Some(saved);
            Ok((dq, dk, dv, dcoeffs, dgates))
        },
    )?;
    let row = dims.heads * dims.head_dim;
    let dqkv = tensor(stack_qkv(dev, [dq, dk, dv], t, row)?, qkv.shape());
    let dcoeffs = tensor(
        CudaStorage::wrap_cuda_slice(dcoeffs, dev.clone()),
        coeffs.shape(),
    );
    let dgates = tensor(
        CudaStorage::wrap_cuda_slice(dgates, dev.clone()),
        gates.shape(),
    )
    .to_dtype(gates.dtype())?;
    Ok((dqkv, dcoeffs, dgates))
}

/// Dense forward: `O` `[T, H, D]`; the `[T, H]` LSE goes to `stash`, where there is one.
pub(super) fn dense_forward<T: CudaElement>(
    layout: &EvoLayout,
    stash: Option<&LseStash>,
    qkv: (&CudaStorage, &Layout),
    coeffs: (&CudaStorage, &Layout),
) -> CResult<(CudaStorage, Shape)> {
    let (dims, t, shape) = (layout.dims, layout.num_tokens(), out_shape(layout));
    let dev = &qkv.0.device;
    if t == 0 {
        return Ok((empty_storage::<T>(dev)?, shape));
    }
    let gpu = gpu_for(dev)?;
    let up = layout.on(&gpu)?;
    let mut o = dev.alloc_zeros::<T>(shape.elem_count())?;
    let mut lse = dev.alloc_zeros::<f32>(t * dims.heads)?;
    with_inputs::<T, _>(dims, t, qkv, coeffs, None, |inputs| {
        let out = DenseOutputs {
            o: &mut o,
            lse: &mut lse,
        };
        gpu.dense_forward_into(&up.batch, dims, &layout.config, inputs, out)
            .map_err(err)
    })?;
    if let Some(stash) = stash {
        *stash.0.lock().map_err(poisoned)? = Some(Stashed {
            lse,
            branch_out: None,
        });
    }
    Ok((CudaStorage::wrap_cuda_slice(o, dev.clone()), shape))
}

/// Dense backward: gradients of `(qkv, coeffs)` from the forward's output `o` and `grad`.
pub(super) fn dense_backward<T: CudaElement>(
    layout: &EvoLayout,
    stash: &LseStash,
    qkv: &Tensor,
    coeffs: &Tensor,
    o: &Tensor,
    grad: &Tensor,
) -> CResult<(Tensor, Tensor)> {
    let (dims, t) = (layout.dims, layout.num_tokens());
    if t == 0 {
        return Ok((empty_like(qkv)?, coeffs.zeros_like()?));
    }
    let d_o = grad.to_dtype(T::DTYPE_CANDLE)?.contiguous()?;
    let o = o.to_dtype(T::DTYPE_CANDLE)?.contiguous()?;
    let (qkv_s, qkv_l) = qkv.storage_and_layout();
    let (coeffs_s, coeffs_l) = coeffs.storage_and_layout();
    let (d_o_s, d_o_l) = d_o.storage_and_layout();
    let (o_s, o_l) = o.storage_and_layout();
    let qkv_s = on_gpu("qkv", &qkv_s)?;
    let dev = &qkv_s.device;
    let gpu = gpu_for(dev)?;
    let up = layout.on(&gpu)?;
    let (mut d_o_copy, mut o_copy) = (None, None);
    let d_o_s = whole(
        "the gradient of O",
        on_gpu("grad", &d_o_s)?,
        d_o_l,
        &mut d_o_copy,
    )?;
    let o_s = whole("O", on_gpu("O", &o_s)?, o_l, &mut o_copy)?;
    let mut stash = stash.0.lock().map_err(poisoned)?;
    let rows = t * dims.heads * dims.head_dim;
    let (dq, dk, dv, dcoeffs) = with_inputs::<T, _>(
        dims,
        t,
        (qkv_s, qkv_l),
        (on_gpu("coeffs", &coeffs_s)?, coeffs_l),
        None,
        |inputs| {
            let lse = match stash.take() {
                Some(saved) => saved.lse,
                None => {
                    let mut o = dev.alloc_zeros::<T>(rows)?;
                    let mut lse = dev.alloc_zeros::<f32>(t * dims.heads)?;
                    let out = DenseOutputs {
                        o: &mut o,
                        lse: &mut lse,
                    };
                    gpu.dense_forward_into(&up.batch, dims, &layout.config, inputs, out)
                        .map_err(err)?;
                    lse
                }
            };
            let mut dq = dev.alloc_zeros::<T>(rows)?;
            let mut dk = dev.alloc_zeros::<T>(rows)?;
            let mut dv = dev.alloc_zeros::<T>(rows)?;
            let mut dcoeffs = dev.alloc_zeros::<f32>(dims.heads * NUM_BRANCHES)?;
            let grads = DenseGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
                dcoeffs: &mut dcoeffs,
            };
            gpu.dense_backward_into(
                &up.batch,
                dims,
                &layout.config,
                inputs,
                o_s.as_cuda_slice::<T>()?,
                &lse,
                d_o_s.as_cuda_slice::<T>()?,
                BackwardMode::default(),
                grads,
            )
            .map_err(err)?;
            *stash = Some(Stashed {
                lse,
                branch_out: None,
            });
            Ok((dq, dk, dv, dcoeffs))
        },
    )?;
    let row = dims.heads * dims.head_dim;
    let dqkv = tensor(stack_qkv(dev, [dq, dk, dv], t, row)?, qkv.shape());
    let dcoeffs = tensor(
        CudaStorage::wrap_cuda_slice(dcoeffs, dev.clone()),
        coeffs.shape(),
    );
    Ok((dqkv, dcoeffs))
}
