//! The device handle: probing for a driver and a GPU, the stream, and loaded kernel modules.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

use super::backward::LocalPairs;
use super::kernels::{self, Entry, KernelEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Wraps a driver error with the call that failed.
pub(crate) fn driver(call: &'static str) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Cuda {
        call,
        detail: format!("{e:?}"),
    }
}

/// Checks that the CUDA driver library can be loaded; cudarc panics on first use otherwise.
#[cfg(not(feature = "candle-cuda"))]
fn probe_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its candidate names.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::NoCudaDriver)
    }
}

/// With `candle-cuda`, candle links cudarc to libcuda at build time (cudarc's `dynamic-linking`
/// replaces our `fallback-dynamic-loading`): a process without the driver never starts.
#[cfg(feature = "candle-cuda")]
fn probe_driver() -> Result<()> {
    Ok(())
}

/// One GPU, a stream on it, and the kernels loaded so far.
///
/// Kernels are compiled at first use (by NVRTC for this GPU's architecture, once per process,
/// each kernel alone: a process pays for the dtypes and head dims it runs) unless nvcc built them
/// with the crate. Every call is enqueued on [`stream`](Self::stream).
#[derive(Debug)]
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    arch: String,
    /// Loaded modules by module name (an nvcc fatbin) or kernel name (one kernel from NVRTC).
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// A [`SparseKernels`] as u8: which sparse kernels this handle runs.
    sparse_kernels: AtomicU8,
    /// A [`LocalPairs`] as u8: how the tensor-core key side gets the local window's pairs.
    local_pairs: AtomicU8,
}

/// Which kernels the sparse forward and backward run: the tensor-core kernels (forward, query
/// side, summaries, key side) or the warp-per-query and warp-per-key ones, for every pass alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SparseKernels {
    /// Tensor cores for bf16 and f16, the warp-per-query kernels for f32.
    #[default]
    Auto,
    /// One warp per (query, head) on CUDA cores, every dtype.
    Warp,
    /// 64 queries per block on tensor cores; bf16 and f16 only (f32 is a `NoKernel` error).
    TensorCore,
}

impl GpuDevice {
    /// Opens GPU `ordinal` with a stream of its own. A missing driver, a missing GPU or a GPU
    /// older than sm_80 is an error.
    pub fn new(ordinal: usize) -> Result<Self> {
        probe_driver()?;
        let count = CudaContext::device_count().map_err(|e| Error::NoGpu {
            ordinal,
            detail: format!("{e:?}"),
        })?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoGpu {
                ordinal,
                detail: format!("{count} GPU(s) visible"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoGpu {
            ordinal,
            detail: format!("{e:?}"),
        })?;
        let stream = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        Self::from_stream(stream)
    }

    /// Uses a caller's stream (a framework's), so that this crate's kernels order with its work.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("cuDeviceGetAttribute"))?;
        if major < 8 {
            return Err(Error::UnsupportedArch { major, minor });
        }
        Ok(GpuDevice {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            modules: Mutex::new(HashMap::new()),
            sparse_kernels: AtomicU8::new(SparseKernels::Auto as u8),
            local_pairs: AtomicU8::new(LocalPairs::Recompute as u8),
        })
    }

    /// Chooses the sparse kernels of later calls on this handle (default
    /// [`SparseKernels::Auto`]); for comparing the kernels on one GPU.
    pub fn set_sparse_kernels(&self, kernel: SparseKernels) {
        self.sparse_kernels.store(kernel as u8, Ordering::Relaxed);
    }

    /// The sparse kernels this handle runs.
    pub fn sparse_kernels(&self) -> SparseKernels {
        match self.sparse_kernels.load(Ordering::Relaxed) {
            1 => SparseKernels::Warp,
            2 => SparseKernels::TensorCore,
            _ => SparseKernels::Auto,
        }
    }

    /// Chooses how later backward calls on this handle get the local window's pairs on the
    /// tensor-core key side (default [`LocalPairs::Recompute`]): a trade of scratch memory for
    /// the key side's work, for comparing the two on one GPU.
    pub fn set_local_pairs(&self, pairs: LocalPairs) {
        self.local_pairs.store(pairs as u8, Ordering::Relaxed);
    }

    /// How this handle's backward gets the local window's pairs.
    pub fn local_pairs(&self) -> LocalPairs {
        match self.local_pairs.load(Ordering::Relaxed) {
            1 => LocalPairs::Stored,
            _ => LocalPairs::Recompute,
        }
    }

    /// Refuses device buffers that live in another GPU's context: this handle's kernels would
    /// read them at their addresses here (an illegal address, which leaves the context unusable,
    /// or a peer's memory). Handles of one GPU share its primary context and pass. Checked before
    /// any launch of a call.
    pub(crate) fn check_contexts(
        &self,
        buffers: &[(&'static str, &Arc<CudaContext>)],
    ) -> Result<()> {
        let own = self.stream.context();
        for &(field, ctx) in buffers {
            if ctx != own {
                return Err(Error::DeviceMismatch {
                    field,
                    value: format!("a buffer of GPU {}", ctx.ordinal()),
                    expected: format!("buffers of this handle's GPU {}", own.ordinal()),
                });
            }
        }
        Ok(())
    }

    /// The stream every call of this handle is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The GPU's architecture, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The GPU's name as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(driver("cuDeviceGetName"))
    }

    /// The kernel of `entry` for these template arguments, loaded on first use: its module's
    /// fatbin where nvcc built one, else that kernel alone compiled by NVRTC.
    pub(crate) fn function(
        &self,
        entry: Entry,
        dtype: Option<DType>,
        head_dim: Option<usize>,
    ) -> Result<CudaFunction> {
        let k: &KernelEntry = kernels::kernel(entry, dtype, head_dim)?;
        let module = self.module(k)?;
        module
            .load_function(k.function)
            .map_err(driver("cuModuleGetFunction"))
    }

    /// The key of `k`'s module in `modules`: nvcc's fatbin holds the whole module; NVRTC
    /// compiles each kernel alone. (A `SPARSECTR_KERNEL_DIR` source that NVRTC compiles whole is
    /// then loaded once per kernel used: a developer's hook, not worth scanning every source on
    /// every call to tell.)
    fn module_key(&self, k: &'static KernelEntry) -> &'static str {
        match kernels::module_source(k.module) {
            Ok(source) if source.prebuilt.is_some() => source.name,
            _ => k.function,
        }
    }

    fn module(&self, k: &'static KernelEntry) -> Result<Arc<CudaModule>> {
        let source = kernels::module_source(k.module)?;
        let key = self.module_key(k);
        if let Some(m) = self
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Ok(m.clone());
        }
        // Compiled and loaded outside the lock, so that threads needing other kernels compile
        // theirs at the same time; two threads after the same kernel both load it, and the
        // first to finish is kept.
        let image = match source.prebuilt {
            Some(fatbin) => fatbin.to_vec(),
            None => {
                let unit = kernels::Unit::kernel(source, k.function);
                kernels::cached_image(&unit, &self.arch)?.as_ref().clone()
            }
        };
        let module = self
            .ctx
            .load_module(Ptx::from_binary(image))
            .map_err(driver("cuModuleLoadData"))?;
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        Ok(modules.entry(key).or_insert(module).clone())
    }
}

impl GpuDevice {
    /// Compiles and loads, ahead of the first call, every kernel that calls on `dtype` inputs
    /// with `head_dim` run on this handle under its current [`SparseKernels`]: the sparse forward
    /// and backward, the dense counterpart's, and [`chunk`](Self::chunk). Calls compile what they
    /// need at first use anyway (with NVRTC, where nvcc did not build the crate); this moves the
    /// cost ahead, e.g. before a server takes requests, and compiles the kernels in parallel (up
    /// to 8 threads). Returns how many it loaded, 0 when all were loaded already: kernels, or
    /// modules where nvcc built the crate (each holds all the kernels of one entry point).
    ///
    /// A `head_dim` outside [`SUPPORTED_HEAD_DIMS`](crate::SUPPORTED_HEAD_DIMS) is an
    /// [`Error::UnsupportedHeadDim`]; f64, and f32 under [`SparseKernels::TensorCore`], are an
    /// [`Error::NoKernel`], as the calls would be.
    pub fn load_kernels(&self, dtype: DType, head_dim: usize) -> Result<usize> {
        if !crate::SUPPORTED_HEAD_DIMS.contains(&head_dim) {
            return Err(Error::UnsupportedHeadDim {
                value: head_dim,
                supported: crate::SUPPORTED_HEAD_DIMS,
            });
        }
        let wanted = self.kernels_for(dtype, head_dim)?;
        let missing: Vec<&'static KernelEntry> = {
            let modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            wanted
                .into_iter()
                .filter(|k| !modules.contains_key(self.module_key(k)))
                .collect()
        };
        // `module` compiles and loads outside the handle's lock (cudarc binds the context to
        // each thread that loads).
        for r in kernels::parallel_map(&missing, |k| self.module(k)) {
            r?;
        }
        Ok(missing.len())
    }

    /// What this handle has loaded, sorted: kernel names where NVRTC compiled each kernel alone
    /// (`evo_forward_tc_bf16_d64`), module names where nvcc built the crate (`forward_tc`).
    pub fn loaded_kernels(&self) -> Vec<&'static str> {
        let modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&'static str> = modules.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// The kernels that calls on `dtype` with `head_dim` run (see
    /// [`load_kernels`](Self::load_kernels)).
    fn kernels_for(&self, dtype: DType, head_dim: usize) -> Result<Vec<&'static KernelEntry>> {
        let (d, dim) = (Some(dtype), Some(head_dim));
        let mut entries = vec![
            (Entry::Chunking, None, None),
            (Entry::Pooling, d, None),
            (Entry::CoeffsReduce, None, None),
            (Entry::DenseForward, d, dim),
            (Entry::DenseBackwardQuery, d, dim),
            (Entry::DenseBackwardKey, d, dim),
        ];
        if self.sparse_uses_warp_kernels(dtype) {
            entries.extend([
                (Entry::Forward, d, dim),
                (Entry::BackwardQuery, d, dim),
                (Entry::BackwardSummary, d, dim),
                (Entry::BackwardKey, d, dim),
            ]);
        } else {
            entries.extend([
                (Entry::ForwardTc, d, dim),
                (Entry::BackwardQueryTc, d, dim),
                (Entry::BackwardSummaryTc, d, dim),
                (Entry::BackwardTailsTc, d, dim),
                (Entry::BackwardKeyTc, d, dim),
                (Entry::BackwardUserReduce, d, dim),
            ]);
        }
        entries
            .into_iter()
            .map(|(entry, dtype, dim)| kernels::kernel(entry, dtype, dim))
            .collect()
    }

    /// Whether a sparse call on dtype `dtype` runs the warp-per-query kernels (else tensor cores).
    pub(crate) fn sparse_uses_warp_kernels(&self, dtype: DType) -> bool {
        match self.sparse_kernels() {
            SparseKernels::Auto => dtype == DType::F32,
            SparseKernels::Warp => true,
            SparseKernels::TensorCore => false,
        }
    }
}
