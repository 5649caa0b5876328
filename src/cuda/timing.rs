//! CUDA-event timing and device facts for benchmarks (BENCH.md: events around the region,
//! warm-up first, median of repetitions).

use cudarc::driver::sys::CUevent_flags;

use super::device::{driver, GpuDevice};
use crate::error::{Error, Result};

impl GpuDevice {
    /// The driver's CUDA version as `(major, minor)`, e.g. `(13, 0)`.
    pub fn driver_version(&self) -> Result<(i32, i32)> {
        let mut v = 0i32;
        // SAFETY: the driver library is loaded (GpuDevice exists) and `v` is a valid out-pointer.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(driver("cuDriverGetVersion"))?;
        Ok((v / 1000, (v % 1000) / 10))
    }

    /// Milliseconds of GPU time `region` enqueues on this device's stream, measured with events:
    /// `warmup` untimed calls, then the median of `reps` timed ones. `region` gets the repetition
    /// index (to rotate inputs so repetitions do not measure the L2 cache).
    pub fn time_median_ms(
        &self,
        warmup: usize,
        reps: usize,
        mut region: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        if reps == 0 {
            return Err(Error::Zero { field: "reps" });
        }
        let ctx = self.stream.context();
        let event = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver("cuEventCreate"))
        };
        for i in 0..warmup {
            region(i)?;
        }
        let mut times = Vec::with_capacity(reps);
        for i in 0..reps {
            let (start, end) = (event()?, event()?);
            start
                .record(&self.stream)
                .map_err(driver("cuEventRecord"))?;
            region(warmup + i)?;
            end.record(&self.stream).map_err(driver("cuEventRecord"))?;
            end.synchronize().map_err(driver("cuEventSynchronize"))?;
            times.push(
                start
                    .elapsed_ms(&end)
                    .map_err(driver("cuEventElapsedTime"))? as f64,
            );
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// Device-to-device copy bandwidth in bytes per second (bytes read plus bytes written), the
    /// yardstick of BENCH.md: median of `reps` copies of `bytes` bytes.
    pub fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let src = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(driver("cuMemAlloc"))?;
        let mut dst = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(driver("cuMemAlloc"))?;
        let ms = self.time_median_ms(3, reps, |_| {
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(driver("cuMemcpyDtoD"))
        })?;
        Ok(2.0 * bytes as f64 / (ms * 1e-3))
    }
}

/// Bytes in use in the device's stream-ordered memory pool, where every allocation of this crate
/// and of cudarc comes from when the GPU supports memory pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// In use now.
    pub current: u64,
    /// The most in use at once since [`GpuDevice::reset_pool_peak`] (at least `current`).
    pub peak: u64,
}

impl GpuDevice {
    fn mem_pool(&self) -> Result<cudarc::driver::sys::CUmemoryPool> {
        let ctx = self.stream.context();
        if !ctx.has_async_alloc() {
            // Allocations then bypass the pool and the pool's counters would read 0.
            return Err(Error::Cuda {
                call: "cuDeviceGetMemPool",
                detail: "this GPU has no stream-ordered memory pools".into(),
            });
        }
        let mut pool = std::ptr::null_mut();
        // SAFETY: the device handle is valid for the context's lifetime; `pool` is an
        // out-pointer.
        unsafe { cudarc::driver::sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .map_err(driver("cuDeviceGetMemPool"))?;
        Ok(pool)
    }

    fn pool_attribute(
        &self,
        pool: cudarc::driver::sys::CUmemoryPool,
        attr: cudarc::driver::sys::CUmemPool_attribute,
    ) -> Result<u64> {
        let mut value = 0u64;
        // SAFETY: `pool` is the device's live pool; the used-memory attributes are cuuint64_t.
        unsafe {
            cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast())
        }
        .result()
        .map_err(driver("cuMemPoolGetAttribute"))?;
        Ok(value)
    }

    /// Bytes in use in the memory pool, now and at the most since the last
    /// [`reset_pool_peak`](Self::reset_pool_peak), after the stream has drained (so that
    /// stream-ordered frees have happened). An error where the GPU has no memory pools.
    pub fn pool_usage(&self) -> Result<PoolUsage> {
        use cudarc::driver::sys::CUmemPool_attribute::*;
        self.stream
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))?;
        let pool = self.mem_pool()?;
        let current = self.pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        let high = self.pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
        // A reset sets the mark to 0, not to what is in use; it rises at the next allocation.
        Ok(PoolUsage {
            current,
            peak: high.max(current),
        })
    }

    /// Starts a new peak measurement of [`pool_usage`](Self::pool_usage).
    pub fn reset_pool_peak(&self) -> Result<()> {
        use cudarc::driver::sys::CUmemPool_attribute::*;
        self.stream
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))?;
        let pool = self.mem_pool()?;
        let mut zero = 0u64;
        // SAFETY: `pool` is the device's live pool; the driver only accepts 0 for this
        // attribute, passed as a cuuint64_t.
        unsafe {
            cudarc::driver::sys::cuMemPoolSetAttribute(
                pool,
                CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        }
        .result()
        .map_err(driver("cuMemPoolSetAttribute"))
    }

    /// Milliseconds of GPU time of `iters` back-to-back calls of `region`, between one pair of
    /// events (what criterion's `iter_custom` wants: the total, not a median). `region` gets the
    /// call index.
    pub fn time_total_ms(
        &self,
        iters: usize,
        mut region: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        let ctx = self.stream.context();
        let event = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver("cuEventCreate"))
        };
        let (start, end) = (event()?, event()?);
        start
            .record(&self.stream)
            .map_err(driver("cuEventRecord"))?;
        for i in 0..iters {
            region(i)?;
        }
        end.record(&self.stream).map_err(driver("cuEventRecord"))?;
        end.synchronize().map_err(driver("cuEventSynchronize"))?;
        Ok(start
            .elapsed_ms(&end)
            .map_err(driver("cuEventElapsedTime"))? as f64)
    }
}
