//! EvoAttention and its dense counterpart as differentiable candle ops (feature `candle`).
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::{Device, Tensor, Var};
//! use sparsectr_attn::candle_op::{evo_attention, EvoLayout};
//! use sparsectr_attn::{workload, AttnConfig, Chunks, Dims};
//!
//! let batch = workload::generate_batch(&mut workload::Rng::new(1), 2, 20, 2, true)?;
//! let chunks = Chunks::personalized(&batch, 4)?;
//! let dims = Dims { heads: 2, head_dim: 32 };
//! // Built once per batch, shared by every layer.
//! let layout = Arc::new(EvoLayout::new(batch, chunks, dims, AttnConfig::new(1, 8))?);
//! let t = layout.num_tokens();
//! let dev = Device::Cpu;
//! let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (t, 3, 2, 32), &dev)?)?;
//! let coeffs = Var::from_tensor(&Tensor::full(0.1f32, (2, 3), &dev)?)?;
//! let gates = Tensor::ones((t, 2, 3), candle_core::DType::F32, &dev)?;
//! let o = evo_attention(qkv.as_tensor(), coeffs.as_tensor(), &gates, &layout)?; // [T, H, D]
//! let grads = o.sqr()?.sum_all()?.backward()?;
//! assert_eq!(grads.get(&qkv).unwrap().dims(), &[t, 3, 2, 32]);
//! assert!(grads.get(&coeffs).is_some());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! On CPU tensors both ops compute through the f64 reference ([`crate::reference`]). With the
//! feature `candle-cuda` (candle's `cuda`, which builds with nvcc: see
//! `scripts/candle-cuda-env.sh`), CUDA tensors compute through this crate's kernels on candle's
//! own stream, without host copies; without it, CUDA tensors cannot exist.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType as CDType, Layout, Shape, Tensor, WithDType,
};
use half::{bf16, f16};

use crate::attention::{AttnConfig, Dims, EvoAttention, Gates, Inputs};
use crate::batch::JaggedBatch;
use crate::chunking::Chunks;
use crate::dtype::Element;
use crate::reference;

#[cfg(feature = "candle-cuda")]
mod gpu;
#[cfg(feature = "candle-cuda")]
use gpu::{GpuLayouts, LseStash};
/// Without `candle-cuda` there are no device uploads or forward LSEs to keep.
#[cfg(not(feature = "candle-cuda"))]
type GpuLayouts = ();
#[cfg(not(feature = "candle-cuda"))]
type LseStash = ();

/// A batch, its chunks and the attention parameters, validated together once per batch and
/// shared by every layer that attends over it.
#[derive(Debug, Clone)]
pub struct EvoLayout {
    batch: JaggedBatch,
    chunks: Chunks,
    dims: Dims,
    config: AttnConfig,
    /// The batch and chunks uploaded once per GPU stream (`candle-cuda`).
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    gpu: GpuLayouts,
}

impl EvoLayout {
    /// Validates that the parts fit (see [`EvoAttention::new`]).
    pub fn new(
        batch: JaggedBatch,
        chunks: Chunks,
        dims: Dims,
        config: AttnConfig,
    ) -> crate::Result<Self> {
        EvoAttention::new(&batch, &chunks, dims, config)?;
        Ok(EvoLayout {
            batch,
            chunks,
            dims,
            config,
            gpu: GpuLayouts::default(),
        })
    }

    /// The validated attention description.
    pub fn attention(&self) -> EvoAttention<'_> {
        EvoAttention::new(&self.batch, &self.chunks, self.dims, self.config)
            .expect("validated in EvoLayout::new")
    }

    /// Number of tokens `T`.
    pub fn num_tokens(&self) -> usize {
        self.batch.num_tokens()
    }

    /// The batch.
    pub fn batch(&self) -> &JaggedBatch {
        &self.batch
    }

    /// Heads and head dimension.
    pub fn dims(&self) -> Dims {
        self.dims
    }
}

fn err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

fn check_dims(what: &str, t: &Tensor, want: &[usize]) -> candle_core::Result<()> {
    if t.dims() != want {
        candle_core::bail!("{what} has shape {:?}, expected {want:?}", t.dims());
    }
    Ok(())
}

/// Sparse EvoAttention: `qkv` `[T, 3, H, D]` (f32, f16 or bf16; Q, K, V stacked), `coeffs`
/// `[H, 3]` f32, `gates` `[T, H, 3]` (the dtype of `qkv`, or f32). Returns `O` `[T, H, D]`.
/// Differentiable with respect to all three inputs.
///
/// On CUDA tensors, a call with an input that candle tracks (a `Var`, or computed from one)
/// keeps for its backward, as long as the output lives: the forward's LSE (f32 `[T, H, 3]`)
/// and each branch's output (`[T, H, 3, D]` of the dtype, three times `O`), which spare the
/// backward a pass over every pair. A call on untracked tensors (inference) keeps nothing and
/// writes no branch outputs.
pub fn evo_attention(
    qkv: &Tensor,
    coeffs: &Tensor,
    gates: &Tensor,
    layout: &Arc<EvoLayout>,
) -> candle_core::Result<Tensor> {
    let Dims { heads, head_dim } = layout.dims;
    let t = layout.num_tokens();
    check_dims("qkv", qkv, &[t, 3, heads, head_dim])?;
    check_dims("coeffs", coeffs, &[heads, 3])?;
    check_dims("gates", gates, &[t, heads, 3])?;
    qkv.contiguous()?.apply_op3(
        &coeffs.contiguous()?,
        &gates.contiguous()?,
        EvoOp {
            layout: layout.clone(),
            lse: LseStash::default(),
            for_backward: qkv.track_op() || coeffs.track_op() || gates.track_op(),
        },
    )
}

/// Compiles and loads ahead of time every kernel that [`evo_attention`] and [`dense_attention`]
/// (forward and backward) run on `device` for `dtype` (f32, f16 or bf16) and `head_dim`, in
/// parallel: otherwise each compiles at its first use (with NVRTC, where nvcc did not build the
/// crate), one after another inside the first training step. Returns how many it loaded, 0
/// when all were loaded already. On a CPU device there is nothing to load: `Ok(0)`.
///
/// A head dim the kernels do not take, a dtype other than f32, f16 and bf16, and a device this
/// build has no kernels for (CUDA without the feature `candle-cuda`, Metal) are errors.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// let dev = candle_core::Device::Cpu;
/// assert_eq!(sparsectr_attn::candle_op::load_kernels(&dev, candle_core::DType::BF16, 64)?, 0);
/// # Ok(())
/// # }
/// ```
pub fn load_kernels(
    device: &candle_core::Device,
    dtype: CDType,
    head_dim: usize,
) -> candle_core::Result<usize> {
    let kernel_dtype = match dtype {
        CDType::F32 => crate::DType::F32,
        CDType::F16 => crate::DType::F16,
        CDType::BF16 => crate::DType::BF16,
        d => candle_core::bail!("sparsectr-attn: no kernels for dtype {d:?} (f32, f16 or bf16)"),
    };
    if !crate::SUPPORTED_HEAD_DIMS.contains(&head_dim) {
        return Err(err(crate::Error::UnsupportedHeadDim {
            value: head_dim,
            supported: crate::SUPPORTED_HEAD_DIMS,
        }));
    }
    match device {
        candle_core::Device::Cpu => Ok(0),
        #[cfg(feature = "candle-cuda")]
        candle_core::Device::Cuda(dev) => gpu::load_kernels(dev, kernel_dtype, head_dim),
        d => {
            // Checked above all the same, so that a bad dtype is named on every build.
            let _ = kernel_dtype;
            Err(no_kernels(d))
        }
    }
}

/// The error of a device this build has no kernels for.
fn no_kernels(device: &candle_core::Device) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "sparsectr-attn: no kernels for device {:?} in this build (CUDA needs the feature \
         candle-cuda)",
        device.location()
    ))
}

/// How the backward of [`evo_attention`] on `device` gets the local window's pairs on its
/// tensor-core key side (bf16, f16): see [`LocalPairs`](crate::cuda::LocalPairs), whose
/// `Stored` trades scratch memory for the key side's work. Nothing to set on a CPU device.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use sparsectr_attn::cuda::LocalPairs;
/// sparsectr_attn::candle_op::set_local_pairs(&candle_core::Device::Cpu, LocalPairs::Stored)?;
/// # Ok(())
/// # }
/// ```
pub fn set_local_pairs(
    device: &candle_core::Device,
    pairs: crate::cuda::LocalPairs,
) -> candle_core::Result<()> {
    match device {
        candle_core::Device::Cpu => {
            let _ = pairs;
            Ok(())
        }
        #[cfg(feature = "candle-cuda")]
        candle_core::Device::Cuda(dev) => gpu::set_local_pairs(dev, pairs),
        d => Err(no_kernels(d)),
    }
}

/// What the ops on `device` have loaded so far, sorted (see [`GpuDevice::loaded_kernels`]): one
/// handle per candle stream holds them. Empty on a CPU device.
///
/// [`GpuDevice::loaded_kernels`]: crate::cuda::GpuDevice::loaded_kernels
pub fn loaded_kernels(device: &candle_core::Device) -> candle_core::Result<Vec<&'static str>> {
    match device {
        candle_core::Device::Cpu => Ok(Vec::new()),
        #[cfg(feature = "candle-cuda")]
        candle_core::Device::Cuda(dev) => gpu::loaded_kernels(dev),
        d => Err(no_kernels(d)),
    }
}

/// The dense counterpart (SPEC section 5, no gates): `qkv` `[T, 3, H, D]`, `coeffs` `[H, 3]`
/// f32. Returns `O` `[T, H, D]`; differentiable with respect to both inputs.
pub fn dense_attention(
    qkv: &Tensor,
    coeffs: &Tensor,
    layout: &Arc<EvoLayout>,
) -> candle_core::Result<Tensor> {
    let Dims { heads, head_dim } = layout.dims;
    check_dims("qkv", qkv, &[layout.num_tokens(), 3, heads, head_dim])?;
    check_dims("coeffs", coeffs, &[heads, 3])?;
    qkv.contiguous()?.apply_op2(
        &coeffs.contiguous()?,
        DenseOp {
            layout: layout.clone(),
            lse: LseStash::default(),
            for_backward: qkv.track_op() || coeffs.track_op(),
        },
    )
}

/// The contiguous elements of a CPU storage under `layout`.
fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("sparsectr-attn ops need contiguous inputs");
    };
    Ok(&s.as_slice::<T>()?[start..end])
}

/// Splits `[T, 3, H, D]` into three `[T, H, D]`.
fn split_qkv<T: Copy>(qkv: &[T], row: usize) -> [Vec<T>; 3] {
    let mut out: [Vec<T>; 3] = Default::default();
    for (i, chunk) in qkv.chunks_exact(row).enumerate() {
        out[i % 3].extend_from_slice(chunk);
    }
    out
}

/// Interleaves three `[T, H, D]` f64 gradients into `[T, 3, H, D]` of `T`.
fn join_qkv<T: Element>(parts: [&[f64]; 3], row: usize) -> Vec<T> {
    let tokens = parts[0].len() / row.max(1);
    let mut out = Vec::with_capacity(3 * parts[0].len());
    for t in 0..tokens {
        for p in parts {
            out.extend(p[t * row..(t + 1) * row].iter().map(|&x| T::from_f64(x)));
        }
    }
    out
}

fn to_dtype<T: Element>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&v| T::from_f64(v)).collect()
}

struct EvoOp {
    layout: Arc<EvoLayout>,
    /// The CUDA forward's LSE, for the backward.
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    lse: LseStash,
    /// Whether candle records the op for a backward (some input is tracked). Where it does
    /// not, no backward can reach the op, and the CUDA forward keeps nothing for one.
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    for_backward: bool,
}

impl EvoOp {
    fn forward<T: Element + WithDType>(
        &self,
        qkv: &[T],
        coeffs: &[f32],
        gates: Gates<'_, T>,
    ) -> candle_core::Result<Vec<T>> {
        let attn = self.layout.attention();
        let [q, k, v] = split_qkv(qkv, self.layout.dims.heads * self.layout.dims.head_dim);
        let inputs = Inputs {
            q: &q,
            k: &k,
            v: &v,
            coeffs,
            gates: Some(gates),
        };
        Ok(to_dtype(
            &reference::forward(&attn, &inputs).map_err(err)?.o,
        ))
    }

    /// Gradients of `(qkv, coeffs, gates)` as tensors on the inputs' device.
    fn backward<T: CandleDType>(
        &self,
        qkv: &Tensor,
        coeffs: &Tensor,
        gates: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let attn = self.layout.attention();
        let row = self.layout.dims.heads * self.layout.dims.head_dim;
        let qkv_host: Vec<T> = qkv.flatten_all()?.to_vec1()?;
        let coeffs_host: Vec<f32> = coeffs.flatten_all()?.to_vec1()?;
        let d_o: Vec<T> = grad.to_dtype(T::DTYPE_CANDLE)?.flatten_all()?.to_vec1()?;
        let [q, k, v] = split_qkv(&qkv_host, row);
        let (g_native, g_f32): (Vec<T>, Vec<f32>) = if gates.dtype() == CDType::F32 {
            (Vec::new(), gates.flatten_all()?.to_vec1()?)
        } else {
            (gates.flatten_all()?.to_vec1()?, Vec::new())
        };
        let gates_ref = if gates.dtype() == CDType::F32 {
            Gates::F32(&g_f32)
        } else {
            Gates::Native(&g_native)
        };
        let inputs = Inputs {
            q: &q,
            k: &k,
            v: &v,
            coeffs: &coeffs_host,
            gates: Some(gates_ref),
        };
        let g = reference::backward(&attn, &inputs, &d_o).map_err(err)?;
        let dev = qkv.device();
        let dqkv = Tensor::from_vec(join_qkv::<T>([&g.dq, &g.dk, &g.dv], row), qkv.shape(), dev)?;
        let dcoeffs = Tensor::from_vec(to_dtype::<f32>(&g.dcoeffs), coeffs.shape(), dev)?;
        let dgates =
            Tensor::from_vec(g.dgates.clone(), gates.shape(), dev)?.to_dtype(gates.dtype())?;
        Ok((dqkv, dcoeffs, dgates))
    }
}

/// Candle's dtype of an element type.
trait CandleDType: Element + WithDType {
    const DTYPE_CANDLE: CDType;
}
impl CandleDType for f32 {
    const DTYPE_CANDLE: CDType = CDType::F32;
}
impl CandleDType for f16 {
    const DTYPE_CANDLE: CDType = CDType::F16;
}
impl CandleDType for bf16 {
    const DTYPE_CANDLE: CDType = CDType::BF16;
}

/// Runs `$body` with `$T` bound to the element type of `$dtype` (f32, f16, bf16), or fails.
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            CDType::F32 => {
                type $T = f32;
                $body
            }
            CDType::F16 => {
                type $T = f16;
                $body
            }
            CDType::BF16 => {
                type $T = bf16;
                $body
            }
            other => {
                candle_core::bail!("sparsectr-attn: qkv dtype {other:?} is not f32, f16 or bf16")
            }
        }
    };
}

impl CustomOp3 for EvoOp {
    fn name(&self) -> &'static str {
        "sparsectr-evo-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims { heads, head_dim } = self.layout.dims;
        let shape = Shape::from((self.layout.num_tokens(), heads, head_dim));
        let coeffs = cpu_slice::<f32>(s2, l2)?;
        let o = with_dtype!(s1.dtype(), T => {
            let qkv = cpu_slice::<T>(s1, l1)?;
            let o = match s3.dtype() {
                CDType::F32 => self.forward(qkv, coeffs, Gates::F32(cpu_slice::<f32>(s3, l3)?))?,
                d if d == s1.dtype() => self.forward(qkv, coeffs, Gates::Native(cpu_slice::<T>(s3, l3)?))?,
                d => candle_core::bail!("gates dtype {d:?} is neither f32 nor the dtype of qkv"),
            };
            T::to_cpu_storage_owned(o)
        });
        Ok((o, shape))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        with_dtype!(s1.dtype(), T => {
            let stash = self.for_backward.then_some(&self.lse);
            gpu::evo_forward::<T>(&self.layout, stash, (s1, l1), (s2, l2), (s3, l3))
        })
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        coeffs: &Tensor,
        gates: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dqkv, dcoeffs, dgates) = with_dtype!(qkv.dtype(), T => {
            #[cfg(feature = "candle-cuda")]
            if qkv.device().is_cuda() {
                let g = gpu::evo_backward::<T>(&self.layout, &self.lse, qkv, coeffs, gates, grad)?;
                return Ok((Some(g.0), Some(g.1), Some(g.2)));
            }
            self.backward::<T>(qkv, coeffs, gates, grad)?
        });
        Ok((Some(dqkv), Some(dcoeffs), Some(dgates)))
    }
}

struct DenseOp {
    layout: Arc<EvoLayout>,
    /// The CUDA forward's LSE, for the backward.
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    lse: LseStash,
    /// As [`EvoOp::for_backward`].
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    for_backward: bool,
}

impl DenseOp {
    fn inputs<'a, T>(split: &'a [Vec<T>; 3], coeffs: &'a [f32]) -> Inputs<'a, T> {
        Inputs {
            q: &split[0],
            k: &split[1],
            v: &split[2],
            coeffs,
            gates: None,
        }
    }
}

impl CustomOp2 for DenseOp {
    fn name(&self) -> &'static str {
        "sparsectr-dense-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims { heads, head_dim } = self.layout.dims;
        let shape = Shape::from((self.layout.num_tokens(), heads, head_dim));
        let coeffs = cpu_slice::<f32>(s2, l2)?;
        let attn = self.layout.attention();
        let o = with_dtype!(s1.dtype(), T => {
            let split = split_qkv(cpu_slice::<T>(s1, l1)?, heads * head_dim);
            let fwd = reference::dense_forward(&attn, &Self::inputs(&split, coeffs)).map_err(err)?;
            T::to_cpu_storage_owned(to_dtype::<T>(&fwd.o))
        });
        Ok((o, shape))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        with_dtype!(s1.dtype(), T => {
            let stash = self.for_backward.then_some(&self.lse);
            gpu::dense_forward::<T>(&self.layout, stash, (s1, l1), (s2, l2))
        })
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        coeffs: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if qkv.device().is_cuda() {
            let (dqkv, dcoeffs) = with_dtype!(qkv.dtype(), T => {
                gpu::dense_backward::<T>(&self.layout, &self.lse, qkv, coeffs, res, grad)?
            });
            return Ok((Some(dqkv), Some(dcoeffs)));
        }
        let _ = res; // the CPU path recomputes what it needs
        let attn = self.layout.attention();
        let row = self.layout.dims.heads * self.layout.dims.head_dim;
        let coeffs_host: Vec<f32> = coeffs.flatten_all()?.to_vec1()?;
        let (dqkv, dcoeffs) = with_dtype!(qkv.dtype(), T => {
            let split = split_qkv(&qkv.flatten_all()?.to_vec1::<T>()?, row);
            let d_o: Vec<T> = grad.to_dtype(T::DTYPE_CANDLE)?.flatten_all()?.to_vec1()?;
            let g = reference::dense_backward(&attn, &Self::inputs(&split, &coeffs_host), &d_o)
                .map_err(err)?;
            (
                Tensor::from_vec(join_qkv::<T>([&g.dq, &g.dk, &g.dv], row), qkv.shape(), qkv.device())?,
                Tensor::from_vec(to_dtype::<f32>(&g.dcoeffs), coeffs.shape(), coeffs.device())?,
            )
        });
        Ok((Some(dqkv), Some(dcoeffs)))
    }
}
