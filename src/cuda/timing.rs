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
