//! Criterion benches of the GPU kernels at moderate sizes, for tracking changes from commit to
//! commit (the BENCH.md comparison at full size is `gpu_bench` and `scripts/bench-gpu.sh`):
//! sparse forward, sparse forward + backward, dense forward, dense forward + backward, bf16, on
//! ctr-small and ctr-base. GPU time comes from CUDA events around each batch of iterations
//! (`iter_custom`), not from the host clock; two input sets alternate so that consecutive
//! iterations do not find their inputs in L2.
//!
//! ```text
//! cargo bench --bench criterion_gpu [-- FILTER]
//! ```
//!
//! Without a GPU it prints SKIPPED and exits 0.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use cudarc::driver::CudaSlice;
use half::bf16;
use sparsectr_attn::cuda::{
    BackwardMode, DenseGrads, DenseOutputs, DeviceBatch, DeviceChunks, DeviceGates, DeviceGrads,
    DeviceInputs, DeviceOutputs, GpuDevice,
};
use sparsectr_attn::workload::{self, Rng, Workload, CTR_BASE, CTR_SMALL};
use sparsectr_attn::{Error, Result, NUM_BRANCHES};

/// Workloads and lengths: large enough to fill an H100 (2^17 tokens), small enough for criterion's
/// default sampling to finish in seconds per benchmark.
const CASES: [(Workload, usize); 3] = [(CTR_SMALL, 1024), (CTR_BASE, 1024), (CTR_BASE, 4096)];
const TOKENS: usize = 1 << 17;

fn main() {
    let gpu = match GpuDevice::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("SKIPPED criterion_gpu: no GPU ({e})");
            return;
        }
    };
    let mut c = Criterion::default().configure_from_args();
    for (wl, n) in CASES {
        if let Err(e) = bench_case(&mut c, &gpu, wl, n) {
            eprintln!("error: {} n={n}: {e}", wl.name);
            std::process::exit(1);
        }
    }
    c.final_summary();
}

fn cuda(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda {
        call,
        detail: format!("{e:?}"),
    }
}

struct Set {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    gates: CudaSlice<bf16>,
    d_o: CudaSlice<bf16>,
}

/// Everything one case needs on the device, allocated once.
struct Case {
    wl: Workload,
    batch: DeviceBatch,
    chunks: DeviceChunks,
    sets: [Set; 2],
    coeffs: CudaSlice<f32>,
    o: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    /// `[T, H, 3, D]`: the branch outputs the backward reads (training's forward saves them).
    branch_out: CudaSlice<bf16>,
    /// `[T, H]`: the dense LSE.
    dense_lse: CudaSlice<f32>,
    dq: CudaSlice<bf16>,
    dk: CudaSlice<bf16>,
    dv: CudaSlice<bf16>,
    dcoeffs: CudaSlice<f32>,
    dgates: CudaSlice<f32>,
}

impl Case {
    fn new(gpu: &GpuDevice, wl: Workload, n: usize) -> Result<(Self, usize)> {
        let host = wl.batch(7, n, TOKENS)?;
        let t = host.num_tokens();
        let rows = t * wl.heads * wl.head_dim;
        let branch_rows = t * wl.heads * NUM_BRANCHES;
        let s = gpu.stream();
        let mut rng = Rng::new(11);
        let mut random = |len: usize| -> Result<CudaSlice<bf16>> {
            let x: Vec<bf16> = workload::random_tensor(&mut rng, len, 1.0);
            s.clone_htod(&x).map_err(cuda("cuMemcpyHtoD"))
        };
        let mut set = || -> Result<Set> {
            Ok(Set {
                q: random(rows)?,
                k: random(rows)?,
                v: random(rows)?,
                gates: random(branch_rows)?,
                d_o: random(rows)?,
            })
        };
        let sets = [set()?, set()?];
        let batch = gpu.upload_batch(&host, &wl.config().temporal)?;
        let chunks = gpu.chunk(&batch, wl.num_chunks)?;
        let zeros_bf16 = |len| s.alloc_zeros::<bf16>(len).map_err(cuda("cuMemAlloc"));
        let zeros_f32 = |len| s.alloc_zeros::<f32>(len).map_err(cuda("cuMemAlloc"));
        let case = Case {
            wl,
            batch,
            chunks,
            sets,
            coeffs: s
                .clone_htod(&[0.3f32, -0.2, 0.1].repeat(wl.heads))
                .map_err(cuda("cuMemcpyHtoD"))?,
            o: zeros_bf16(rows)?,
            lse: zeros_f32(branch_rows)?,
            branch_out: zeros_bf16(3 * rows)?,
            dense_lse: zeros_f32(t * wl.heads)?,
            dq: zeros_bf16(rows)?,
            dk: zeros_bf16(rows)?,
            dv: zeros_bf16(rows)?,
            dcoeffs: zeros_f32(wl.heads * 3)?,
            dgates: zeros_f32(branch_rows)?,
        };
        Ok((case, t))
    }

    fn sparse(&mut self, gpu: &GpuDevice, i: usize, backward: bool) -> Result<()> {
        let set = &self.sets[i % 2];
        let inputs = DeviceInputs {
            q: &set.q,
            k: &set.k,
            v: &set.v,
            coeffs: &self.coeffs,
            gates: Some(DeviceGates::Native(&set.gates)),
        };
        let (dims, config) = (self.wl.dims(), self.wl.config());
        // The forward alone as inference runs it; before a backward, as training runs it.
        let out = DeviceOutputs {
            o: &mut self.o,
            lse: &mut self.lse,
            branch_out: backward.then_some(&mut self.branch_out),
        };
        gpu.forward_into(&self.batch, &self.chunks, dims, &config, &inputs, out)?;
        if !backward {
            return Ok(());
        }
        let grads = DeviceGrads {
            dq: &mut self.dq,
            dk: &mut self.dk,
            dv: &mut self.dv,
            dcoeffs: &mut self.dcoeffs,
            dgates: &mut self.dgates,
        };
        gpu.backward_into(
            &self.batch,
            &self.chunks,
            dims,
            &config,
            &inputs,
            &self.lse,
            Some(&self.branch_out),
            &set.d_o,
            BackwardMode::Fast,
            grads,
        )
    }
}

impl Case {
    fn dense(&mut self, gpu: &GpuDevice, i: usize, backward: bool) -> Result<()> {
        let set = &self.sets[i % 2];
        let inputs = DeviceInputs {
            q: &set.q,
            k: &set.k,
            v: &set.v,
            coeffs: &self.coeffs,
            gates: None,
        };
        let (dims, config) = (self.wl.dims(), self.wl.config());
        let out = DenseOutputs {
            o: &mut self.o,
            lse: &mut self.dense_lse,
        };
        gpu.dense_forward_into(&self.batch, dims, &config, &inputs, out)?;
        if !backward {
            return Ok(());
        }
        let grads = DenseGrads {
            dq: &mut self.dq,
            dk: &mut self.dk,
            dv: &mut self.dv,
            dcoeffs: &mut self.dcoeffs,
        };
        gpu.dense_backward_into(
            &self.batch,
            dims,
            &config,
            &inputs,
            &self.o,
            &self.dense_lse,
            &set.d_o,
            BackwardMode::Fast,
            grads,
        )
    }
}

/// Criterion's total for `iters` calls, from CUDA events; a failing call aborts the bench
/// (criterion's closure cannot return an error).
fn gpu_time(gpu: &GpuDevice, iters: u64, region: impl FnMut(usize) -> Result<()>) -> Duration {
    match gpu.time_total_ms(iters as usize, region) {
        Ok(ms) => Duration::from_secs_f64(ms * 1e-3),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn bench_case(c: &mut Criterion, gpu: &GpuDevice, wl: Workload, n: usize) -> Result<()> {
    let (mut case, t) = Case::new(gpu, wl, n)?;
    // The first call compiles (NVRTC) and loads the kernels; keep it out of criterion's warm-up.
    case.sparse(gpu, 0, true)?;
    case.dense(gpu, 0, true)?;
    let id = format!("{}/n={n}/T={t}", wl.name);
    let groups = [
        ("sparse_fwd", false, false),
        ("sparse_fwd_bwd", false, true),
        ("dense_fwd", true, false),
        ("dense_fwd_bwd", true, true),
    ];
    for (group, dense, backward) in groups {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(t as u64));
        if dense {
            // Dense at n = 4096 costs tens of ms a call: fewer samples keep a group short.
            g.sample_size(10);
        }
        g.bench_function(BenchmarkId::from_parameter(&id), |b| {
            b.iter_custom(|iters| {
                gpu_time(gpu, iters, |i| {
                    if dense {
                        case.dense(gpu, i, backward)
                    } else {
                        case.sparse(gpu, i, backward)
                    }
                })
            })
        });
        g.finish();
    }
    Ok(())
}
