//! The GPU path: runtime probe, kernel table and NVRTC, device handle, batch upload, chunking,
//! pooling, the fused forward and the backward, and the dense counterpart.
//!
//! # Size limits
//!
//! The kernels index in 32-bit ints, so the GPU path takes less than the CPU reference; beyond
//! these a call returns [`Error::OutOfRange`](crate::Error::OutOfRange) naming the field, and
//! no kernel runs:
//! - at most [`GPU_MAX_TOKENS`] (`2^30 - 64`) tokens and `i32::MAX` sequences in a batch;
//! - at most [`GPU_MAX_CHUNK_SLOTS`] (`i32::MAX - 64`) chunk slots `B * P`;
//! - `m * P` at most `i32::MAX - 256` (`m` clamped to the longest sequence's behaviors first);
//! - at most `2^24` time buckets, and at most 65535 heads (fewer for the tiled kernels, which
//!   put several blocks per head in grid y).
//!
//! Tensors of these sizes need hundreds of GiB, beyond any GPU's memory today: the limits exist
//! so that no size reaches a kernel whose int arithmetic it would overflow.
//!
//! ```no_run
//! use sparsectr_attn::cuda::GpuDevice;
//! use sparsectr_attn::{workload, AttnConfig, Chunks, Inputs};
//!
//! let gpu = GpuDevice::new(0)?; // an error value, not a panic, without a driver or GPU
//! let wl = workload::CTR_SMALL;
//! let batch = wl.batch(1, 256, 4096)?;
//! let chunks = Chunks::personalized(&batch, wl.num_chunks)?;
//! let n = batch.num_tokens() * wl.heads * wl.head_dim;
//! let mut rng = workload::Rng::new(2);
//! let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
//!     workload::random_tensor(&mut rng, n, 1.0),
//!     workload::random_tensor(&mut rng, n, 1.0),
//!     workload::random_tensor(&mut rng, n, 1.0),
//! );
//! let coeffs = vec![0.1f32; wl.heads * 3];
//! let inputs = Inputs { q: &q, k: &k, v: &v, coeffs: &coeffs, gates: None };
//! let out = gpu.forward_host(&batch, &chunks, wl.dims(), &wl.config(), &inputs)?;
//! assert_eq!(out.o.len(), n);
//! # Ok::<(), sparsectr_attn::Error>(())
//! ```

mod backward;
mod batch;
mod dense;
mod device;
mod forward;
mod kernels;
mod params;
mod timing;

pub use backward::{BackwardMode, DeviceGrads, HostGradients, LocalPairs, Saved};
pub use batch::{DeviceBatch, DeviceChunks, GPU_MAX_CHUNK_SLOTS, GPU_MAX_TOKENS};
pub use dense::{DenseGrads, DenseOutputs, HostDenseForward};
pub use device::{GpuDevice, SparseKernels};
pub use forward::{DeviceGates, DeviceInputs, DeviceOutputs, GpuElement, HostForward};
pub use kernels::{compile_modules, compile_report, kernel_names, CompiledModule, KernelReport};
pub use timing::PoolUsage;
