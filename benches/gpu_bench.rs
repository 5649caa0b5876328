//! The GPU benchmark of BENCH.md, this crate's half: for each selected workload and length, the
//! BENCH.md batch (`B = tokens / n` users of `[0.75 n, n]` behaviors, a user token, candidates),
//! bf16, timed with CUDA events (median of `--reps` after warm-up, two input sets alternated so
//! repetitions do not find their inputs in L2), everything twice (two identical runs: their
//! spread is reported):
//!
//! - `sparse-ours`: GPU chunking; forward (pooling included); forward + backward, fast and
//!   deterministic; end to end (chunking + forward + backward);
//! - `dense-ours`: the dense counterpart's forward and forward + backward;
//! - a device-to-device copy, the bandwidth yardstick.
//!
//! Peak device memory of each system and pass, measured: the high-water mark of the device's
//! stream-ordered memory pool (where every allocation of this crate comes from) over a run that
//! uploads the system's inputs, allocates its outputs and runs it once, minus what was in use
//! before. This first run is also the warm-up that loads (and NVRTC-compiles) the kernels.
//!
//! ```text
//! cargo bench --bench gpu_bench -- [--workload ctr-small,ctr-base,ctr-wide] [--len 1024,4096,16384]
//!     [--tokens 1048576] [--reps 20] [--dense-reps N] [--systems sparse,dense]
//!     [--export DIR] [--out FILE.jsonl]
//! ```
//!
//! Appends one JSON object per workload and length to `--out` (default
//! `benches/results/raw/<gpu>.jsonl`) as soon as it is measured, so that a run cut short keeps
//! what it finished and runs on several device calls add up; `benches/report.py` merges them.
//! With `--export DIR` it also writes `DIR/<workload>-n<len>/` in the format of
//! `examples/export_batch.rs` (the batch, its CPU chunks, input set 1 and this crate's GPU forward
//! output for it) for `benches/torch_baselines.py` to check against and time on the same tokens.
//! The GPU, driver, CUDA version and commit (`SPARSECTR_COMMIT`) go into every object. Without a
//! GPU it prints SKIPPED and exits 0.

#[allow(dead_code)] // the folder writer, not the example's `main`
#[path = "../examples/export_batch.rs"]
mod export_batch;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cudarc::driver::CudaSlice;
use half::bf16;
use sparsectr_attn::cuda::BackwardMode::{self, Fast};
use sparsectr_attn::cuda::{
    DenseGrads, DenseOutputs, DeviceBatch, DeviceChunks, DeviceGates, DeviceGrads, DeviceInputs,
    DeviceOutputs, GpuDevice, LocalPairs, Saved, SparseKernels,
};
use sparsectr_attn::workload::{Rng, Workload, WORKLOADS};
use sparsectr_attn::{Chunks, Error, Gates, Inputs, JaggedBatch, Result, NUM_BRANCHES};

use export_batch::{write_folder, Export, Output};

const LENS: [usize; 3] = [1024, 4096, 16384];
/// Untimed calls before each timed series. Kernel loading and compilation happen earlier, in
/// the memory pass, so these only settle clocks and the allocator.
const WARMUP: usize = 2;
/// Bytes of each device-to-device copy of the bandwidth yardstick: far beyond L2.
const COPY_BYTES: usize = 1 << 30;

struct Args {
    workloads: Vec<Workload>,
    lens: Vec<usize>,
    tokens: usize,
    reps: usize,
    dense_reps: Option<usize>,
    sparse: bool,
    dense: bool,
    export: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn list<T>(
    value: &str,
    flag: &str,
    item: impl Fn(&str) -> std::result::Result<T, String>,
) -> std::result::Result<Vec<T>, String> {
    value
        .split(',')
        .map(|s| item(s.trim()).map_err(|e| format!("{flag}: {e}")))
        .collect()
}

fn parse() -> std::result::Result<Args, String> {
    let mut a = Args {
        workloads: WORKLOADS.to_vec(),
        lens: LENS.to_vec(),
        tokens: 1 << 20,
        reps: 20,
        dense_reps: None,
        sparse: true,
        dense: true,
        export: None,
        out: None,
    };
    let number = |s: &str| s.parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bench" => {} // passed by `cargo bench`
            "--workload" => {
                a.workloads = list(&value()?, "--workload", |name| {
                    Workload::by_name(name).ok_or_else(|| {
                        let names: Vec<_> = WORKLOADS.iter().map(|w| w.name).collect();
                        format!("unknown workload {name:?}; one of {names:?}")
                    })
                })?
            }
            "--len" => a.lens = list(&value()?, "--len", number)?,
            "--tokens" => a.tokens = number(&value()?)?,
            "--reps" => a.reps = number(&value()?)?,
            "--dense-reps" => a.dense_reps = Some(number(&value()?)?),
            "--systems" => {
                let names = list(&value()?, "--systems", |s| match s {
                    "sparse" | "dense" => Ok(s.to_string()),
                    other => Err(format!("unknown system {other:?}: sparse or dense")),
                })?;
                a.sparse = names.iter().any(|s| s == "sparse");
                a.dense = names.iter().any(|s| s == "dense");
            }
            "--export" => a.export = Some(PathBuf::from(value()?)),
            "--out" => a.out = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.reps == 0 || a.dense_reps == Some(0) {
        return Err("--reps and --dense-reps must be at least 1".into());
    }
    Ok(a)
}

/// `built-in`, or the folder the feature `dev-kernel-dir` reads kernels from and its COMMIT note.
fn kernel_dir_note() -> String {
    match std::env::var("SPARSECTR_KERNEL_DIR") {
        Ok(dir) if cfg!(feature = "dev-kernel-dir") && !dir.is_empty() => {
            let note = std::fs::read_to_string(Path::new(&dir).join("COMMIT")).unwrap_or_default();
            format!("{dir}: {}", note.trim())
        }
        _ => "built-in".into(),
    }
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let gpu = match GpuDevice::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("SKIPPED gpu_bench: no GPU ({e})");
            return;
        }
    };
    if let Err(e) = run_all(&gpu, &args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn io_error(call: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::Cuda {
        call,
        detail: e.to_string(),
    }
}

fn cuda_error(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda {
        call,
        detail: format!("{e:?}"),
    }
}

/// The GPU's name as a file stem: `NVIDIA H100 80GB HBM3` -> `nvidia-h100-80gb-hbm3`.
fn file_stem(name: &str) -> String {
    let mut stem = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            stem.push(c.to_ascii_lowercase());
        } else if !stem.ends_with('-') {
            stem.push('-');
        }
    }
    stem.trim_matches('-').to_string()
}

fn run_all(gpu: &GpuDevice, args: &Args) -> Result<()> {
    let name = gpu.name()?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!("benches/results/raw/{}.jsonl", file_stem(&name)))
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(io_error("create_dir_all"))?;
    }
    for &wl in &args.workloads {
        for &len in &args.lens {
            let started = Instant::now();
            let json = bench_cell(gpu, args, wl, len)?;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&out)
                .map_err(io_error("open results"))?;
            writeln!(file, "{json}").map_err(io_error("write results"))?;
            println!(
                "{} n={len}: done in {:.1} s, appended to {}",
                wl.name,
                started.elapsed().as_secs_f64(),
                out.display()
            );
        }
    }
    Ok(())
}

/// `len` bf16 values uniform in [-1, 1), four from each 64-bit draw, filled by all cores (the
/// ctr-wide tensors hold about 2^30).
fn random_bf16(seed: u64, len: usize) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; len];
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let chunk = len.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for quad in part.chunks_mut(4) {
                    let bits = rng.next_u64();
                    for (j, x) in quad.iter_mut().enumerate() {
                        let u = ((bits >> (16 * j)) & 0xFFFF) as f32 / 65536.0;
                        *x = bf16::from_f32(2.0 * u - 1.0);
                    }
                }
            });
        }
    });
    out
}

/// One input set on the host: Q, K, V `[T, H, D]`, gates `[T, H, 3]` in (0.5, 1.5), upstream
/// gradient `[T, H, D]`.
struct HostSet {
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
    gates: Vec<bf16>,
    d_o: Vec<bf16>,
}

impl HostSet {
    fn new(seed: u64, rows: usize, branch_rows: usize) -> Self {
        let gates = random_bf16(seed + 4, branch_rows)
            .into_iter()
            .map(|g| bf16::from_f32(1.0 + 0.5 * g.to_f32()))
            .collect();
        HostSet {
            q: random_bf16(seed + 1, rows),
            k: random_bf16(seed + 2, rows),
            v: random_bf16(seed + 3, rows),
            gates,
            d_o: random_bf16(seed + 5, rows),
        }
    }
}

/// One input set on the device; gates and the upstream gradient only where a system reads them
/// (so that the memory pass counts exactly what each system reads).
struct DeviceSet {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    gates: Option<CudaSlice<bf16>>,
    d_o: Option<CudaSlice<bf16>>,
}

impl DeviceSet {
    fn upload(gpu: &GpuDevice, h: &HostSet, gates: bool, d_o: bool) -> Result<Self> {
        let up = |x: &[bf16]| {
            gpu.stream()
                .clone_htod(x)
                .map_err(cuda_error("cuMemcpyHtoD"))
        };
        Ok(DeviceSet {
            q: up(&h.q)?,
            k: up(&h.k)?,
            v: up(&h.v)?,
            gates: gates.then(|| up(&h.gates)).transpose()?,
            d_o: d_o.then(|| up(&h.d_o)).transpose()?,
        })
    }

    fn inputs<'a>(&'a self, coeffs: &'a CudaSlice<f32>) -> DeviceInputs<'a, bf16> {
        DeviceInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            coeffs,
            gates: self.gates.as_ref().map(DeviceGates::Native),
        }
    }

    fn d_o(&self) -> Result<&CudaSlice<bf16>> {
        self.d_o.as_ref().ok_or(Error::Zero { field: "d_o" })
    }
}

/// Forward outputs: O `[T, H, D]` and LSE (`[T, H, 3]` sparse, `[T, H]` dense).
struct FwdBuffers {
    o: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    /// `[T, H, 3, D]` (sparse only): each branch's output, saved for the backward.
    branch_out: Option<CudaSlice<bf16>>,
}

impl FwdBuffers {
    fn new(gpu: &GpuDevice, rows: usize, lse_rows: usize, branches: bool) -> Result<Self> {
        let s = gpu.stream();
        let e = cuda_error("cuMemAlloc");
        Ok(FwdBuffers {
            o: s.alloc_zeros(rows).map_err(&e)?,
            lse: s.alloc_zeros(lse_rows).map_err(&e)?,
            branch_out: if branches {
                Some(s.alloc_zeros(3 * rows).map_err(&e)?)
            } else {
                None
            },
        })
    }
}

/// Gradients: dQ, dK, dV `[T, H, D]`, dcoeffs `[H, 3]`, dgates `[T, H, 3]` (sparse only).
struct GradBuffers {
    dq: CudaSlice<bf16>,
    dk: CudaSlice<bf16>,
    dv: CudaSlice<bf16>,
    dcoeffs: CudaSlice<f32>,
    dgates: Option<CudaSlice<f32>>,
}

impl GradBuffers {
    fn new(gpu: &GpuDevice, rows: usize, heads: usize, dgates: Option<usize>) -> Result<Self> {
        let s = gpu.stream();
        let e = cuda_error("cuMemAlloc");
        Ok(GradBuffers {
            dq: s.alloc_zeros(rows).map_err(&e)?,
            dk: s.alloc_zeros(rows).map_err(&e)?,
            dv: s.alloc_zeros(rows).map_err(&e)?,
            dcoeffs: s.alloc_zeros(heads * NUM_BRANCHES).map_err(&e)?,
            dgates: dgates
                .map(|len| s.alloc_zeros(len).map_err(&e))
                .transpose()?,
        })
    }
}

/// What one call of the benchmark sees.
struct Cell<'a> {
    gpu: &'a GpuDevice,
    wl: Workload,
    batch: JaggedBatch,
    coeffs_host: Vec<f32>,
}

impl Cell<'_> {
    fn rows(&self) -> usize {
        self.batch.num_tokens() * self.wl.heads * self.wl.head_dim
    }

    fn branch_rows(&self) -> usize {
        self.batch.num_tokens() * self.wl.heads * NUM_BRANCHES
    }

    fn dense_lse_rows(&self) -> usize {
        self.batch.num_tokens() * self.wl.heads
    }

    /// The sparse forward; `save` also writes the branch outputs the backward reads (training).
    fn sparse_forward(
        &self,
        d_batch: &DeviceBatch,
        chunks: &DeviceChunks,
        set: &DeviceSet,
        coeffs: &CudaSlice<f32>,
        fwd: &mut FwdBuffers,
        save: Saved,
    ) -> Result<()> {
        let branch_out = match save {
            Saved::BranchOutputs => Some(fwd.branch_out.as_mut().ok_or(Error::Zero {
                field: "branch_out",
            })?),
            Saved::LseOnly => None,
        };
        let out = DeviceOutputs {
            o: &mut fwd.o,
            lse: &mut fwd.lse,
            branch_out,
        };
        let inputs = set.inputs(coeffs);
        let (dims, config) = (self.wl.dims(), self.wl.config());
        self.gpu
            .forward_into(d_batch, chunks, dims, &config, &inputs, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn sparse_forward_backward(
        &self,
        d_batch: &DeviceBatch,
        chunks: &DeviceChunks,
        set: &DeviceSet,
        coeffs: &CudaSlice<f32>,
        (fwd, grad): (&mut FwdBuffers, &mut GradBuffers),
        mode: BackwardMode,
        save: Saved,
    ) -> Result<()> {
        self.sparse_forward(d_batch, chunks, set, coeffs, fwd, save)?;
        let dgates = grad
            .dgates
            .as_mut()
            .ok_or(Error::Zero { field: "dgates" })?;
        let grads = DeviceGrads {
            dq: &mut grad.dq,
            dk: &mut grad.dk,
            dv: &mut grad.dv,
            dcoeffs: &mut grad.dcoeffs,
            dgates,
        };
        let inputs = set.inputs(coeffs);
        let (dims, config) = (self.wl.dims(), self.wl.config());
        self.gpu.backward_into(
            d_batch,
            chunks,
            dims,
            &config,
            &inputs,
            &fwd.lse,
            match save {
                Saved::BranchOutputs => fwd.branch_out.as_ref(),
                Saved::LseOnly => None,
            },
            set.d_o()?,
            mode,
            grads,
        )
    }

    /// The dense counterpart's forward (gates ignored: it has none), then optionally its
    /// backward.
    fn dense(
        &self,
        d_batch: &DeviceBatch,
        set: &DeviceSet,
        coeffs: &CudaSlice<f32>,
        (fwd, grad): (&mut FwdBuffers, Option<&mut GradBuffers>),
    ) -> Result<()> {
        let (dims, config) = (self.wl.dims(), self.wl.config());
        let inputs = set.inputs(coeffs);
        let out = DenseOutputs {
            o: &mut fwd.o,
            lse: &mut fwd.lse,
        };
        self.gpu
            .dense_forward_into(d_batch, dims, &config, &inputs, out)?;
        let Some(grad) = grad else {
            return Ok(());
        };
        let grads = DenseGrads {
            dq: &mut grad.dq,
            dk: &mut grad.dk,
            dv: &mut grad.dv,
            dcoeffs: &mut grad.dcoeffs,
        };
        let (o, lse) = (&fwd.o, &fwd.lse);
        self.gpu.dense_backward_into(
            d_batch,
            dims,
            &config,
            &inputs,
            o,
            lse,
            set.d_o()?,
            Fast,
            grads,
        )
    }

    /// Everything dense reads, uploaded from the host: batch, Q, K, V, coeffs (no chunks, no
    /// gates).
    fn dense_peak(&self, host: &HostSet, backward: bool) -> Result<Option<u64>> {
        self.peak_bytes(|| {
            let gpu = self.gpu;
            let d_batch = gpu.upload_batch(&self.batch, &self.wl.config().temporal)?;
            let set = DeviceSet::upload(gpu, host, false, backward)?;
            let coeffs = upload_f32(gpu, &self.coeffs_host)?;
            let mut fwd = FwdBuffers::new(gpu, self.rows(), self.dense_lse_rows(), false)?;
            let mut grad = backward
                .then(|| GradBuffers::new(gpu, self.rows(), self.wl.heads, None))
                .transpose()?;
            self.dense(&d_batch, &set, &coeffs, (&mut fwd, grad.as_mut()))
        })
    }

    /// Peak pool bytes of `run`, which must upload what it reads and allocate what it writes.
    fn peak_bytes(&self, run: impl FnOnce() -> Result<()>) -> Result<Option<u64>> {
        let before = match self.gpu.pool_usage() {
            Ok(u) => u.current,
            Err(e) => {
                println!("  peak memory not measured: {e}");
                run()?;
                return Ok(None);
            }
        };
        self.gpu.reset_pool_peak()?;
        run()?;
        let after = self.gpu.pool_usage()?;
        Ok(Some(after.peak.saturating_sub(before)))
    }

    /// Everything sparse reads, uploaded from the host: batch, chunks, one input set, coeffs.
    fn sparse_peak(&self, host: &HostSet, backward: bool) -> Result<Option<u64>> {
        self.peak_bytes(|| {
            let gpu = self.gpu;
            let d_batch = gpu.upload_batch(&self.batch, &self.wl.config().temporal)?;
            let chunks = gpu.chunk(&d_batch, self.wl.num_chunks)?;
            let set = DeviceSet::upload(gpu, host, true, backward)?;
            let coeffs = upload_f32(gpu, &self.coeffs_host)?;
            // The forward alone as inference runs it; with the backward as training does,
            // saving the branch outputs.
            let mut fwd = FwdBuffers::new(gpu, self.rows(), self.branch_rows(), backward)?;
            if backward {
                let dgates = Some(self.branch_rows());
                let mut grad = GradBuffers::new(gpu, self.rows(), self.wl.heads, dgates)?;
                let bufs = (&mut fwd, &mut grad);
                let saved = Saved::BranchOutputs;
                self.sparse_forward_backward(&d_batch, &chunks, &set, &coeffs, bufs, Fast, saved)
            } else {
                self.sparse_forward(&d_batch, &chunks, &set, &coeffs, &mut fwd, Saved::LseOnly)
            }
        })
    }
}

fn upload_f32(gpu: &GpuDevice, x: &[f32]) -> Result<CudaSlice<f32>> {
    gpu.stream()
        .clone_htod(x)
        .map_err(cuda_error("cuMemcpyHtoD"))
}

/// One timed quantity: a system, a pass, the medians of the two runs, its peak memory.
struct Row {
    system: &'static str,
    pass: &'static str,
    reps: usize,
    ms: [f64; 2],
    peak_bytes: Option<u64>,
}

fn bench_cell(gpu: &GpuDevice, args: &Args, wl: Workload, len: usize) -> Result<String> {
    let setup = Instant::now();
    let batch = wl.batch(len as u64, len, args.tokens)?;
    let t = batch.num_tokens();
    println!(
        "{} n={len}: B={} T={t}, H={} D={} P={} m={} w={}",
        wl.name,
        batch.num_seqs(),
        wl.heads,
        wl.head_dim,
        wl.num_chunks,
        wl.tail_tokens,
        wl.window
    );
    let mut coeff_rng = Rng::new(0xC0EF);
    let coeffs_host: Vec<f32> = (0..wl.heads * 3)
        .map(|_| (0.5 * (2.0 * coeff_rng.uniform() - 1.0)) as f32)
        .collect();
    let cell = Cell {
        gpu,
        wl,
        batch,
        coeffs_host,
    };
    let (rows, branch_rows) = (cell.rows(), cell.branch_rows());
    let hosts = [
        HostSet::new(10, rows, branch_rows),
        HostSet::new(20, rows, branch_rows),
    ];
    let host_s = setup.elapsed().as_secs_f64();

    // Memory pass, before anything else is allocated; also the first (compiling) call.
    let mut peaks: Vec<(&str, &str, Option<u64>)> = Vec::new();
    if args.sparse {
        peaks.push(("sparse-ours", "fwd", cell.sparse_peak(&hosts[0], false)?));
        peaks.push(("sparse-ours", "fwd_bwd", cell.sparse_peak(&hosts[0], true)?));
        gpu.set_local_pairs(LocalPairs::Stored);
        let stored = cell.sparse_peak(&hosts[0], true);
        gpu.set_local_pairs(LocalPairs::Recompute);
        peaks.push(("sparse-ours", "fwd_bwd_stored", stored?));
    }
    if args.dense {
        peaks.push(("dense-ours", "fwd", cell.dense_peak(&hosts[0], false)?));
        peaks.push(("dense-ours", "fwd_bwd", cell.dense_peak(&hosts[0], true)?));
    }
    // The deterministic backward and the end-to-end pass allocate what the fast pass does (the
    // memory pass chunks inside its run); chunking alone is not measured.
    let peak_of = |system: &str, pass: &str| {
        let measured = match pass {
            "fwd" => "fwd",
            "fwd_bwd" | "fwd_bwd_det" | "e2e_fwd_bwd" => "fwd_bwd",
            "fwd_bwd_stored" => "fwd_bwd_stored",
            _ => return None,
        };
        peaks
            .iter()
            .find(|p| p.0 == system && p.1 == measured)
            .and_then(|p| p.2)
    };

    let d_batch = gpu.upload_batch(&cell.batch, &wl.config().temporal)?;
    let chunks = gpu.chunk(&d_batch, wl.num_chunks)?;
    let sets = [
        DeviceSet::upload(gpu, &hosts[0], true, true)?,
        DeviceSet::upload(gpu, &hosts[1], true, true)?,
    ];
    let coeffs = upload_f32(gpu, &cell.coeffs_host)?;
    let mut sparse_fwd = FwdBuffers::new(gpu, rows, branch_rows, true)?;
    let mut sparse_grad = GradBuffers::new(gpu, rows, wl.heads, Some(branch_rows))?;
    let mut dense_fwd = FwdBuffers::new(gpu, rows, cell.dense_lse_rows(), false)?;
    let mut dense_grad = GradBuffers::new(gpu, rows, wl.heads, None)?;

    if let Some(dir) = &args.export {
        let dir = dir.join(format!("{}-n{len}", wl.name));
        export(&cell, &d_batch, &chunks, &sets[0], &hosts[0], &coeffs, &dir)?;
        println!("  exported to {}", dir.display());
    }

    let reps = args.reps;
    let dense_reps = args.dense_reps.unwrap_or(reps);
    let mut rows_out: Vec<Row> = Vec::new();
    let mut copy = [0.0; 2];
    for (run, copy_bw) in copy.iter_mut().enumerate() {
        let mut timed = Vec::new();
        if args.sparse {
            let c = &cell;
            let (f, g) = (&mut sparse_fwd, &mut sparse_grad);
            timed.push((
                "sparse-ours",
                "chunking",
                reps,
                gpu.time_median_ms(WARMUP, reps, |_| {
                    gpu.chunk(&d_batch, wl.num_chunks).map(drop)
                })?,
            ));
            // The forward as inference runs it (no branch outputs), and as training does.
            for (pass, save) in [
                ("fwd", Saved::LseOnly),
                ("fwd_saving", Saved::BranchOutputs),
            ] {
                let ms = gpu.time_median_ms(WARMUP, reps, |i| {
                    c.sparse_forward(&d_batch, &chunks, &sets[i % 2], &coeffs, f, save)
                })?;
                timed.push(("sparse-ours", pass, reps, ms));
            }
            // The warp-per-query kernel that bf16 ran before the tensor-core one, for the
            // comparison of the two on the same GPU.
            gpu.set_sparse_kernels(SparseKernels::Warp);
            let warp_ms = gpu.time_median_ms(WARMUP, reps, |i| {
                c.sparse_forward(&d_batch, &chunks, &sets[i % 2], &coeffs, f, Saved::LseOnly)
            });
            gpu.set_sparse_kernels(SparseKernels::Auto);
            timed.push(("sparse-ours", "fwd_warp", reps, warp_ms?));
            // fwd_bwd_two_pass: without saved branch outputs, the query backward makes its own
            // first pass for dgates (what every backward did before they were saved).
            // fwd_bwd_stored: the key side reading the local pairs the query kernel stored
            // (LocalPairs::Stored), beside fwd_bwd's recomputing key side in the same run.
            let recompute = LocalPairs::Recompute;
            for (pass, mode, save, pairs) in [
                ("fwd_bwd", Fast, Saved::BranchOutputs, recompute),
                (
                    "fwd_bwd_stored",
                    Fast,
                    Saved::BranchOutputs,
                    LocalPairs::Stored,
                ),
                (
                    "fwd_bwd_det",
                    BackwardMode::Deterministic,
                    Saved::BranchOutputs,
                    recompute,
                ),
                ("fwd_bwd_two_pass", Fast, Saved::LseOnly, recompute),
            ] {
                gpu.set_local_pairs(pairs);
                let ms = gpu.time_median_ms(WARMUP, reps, |i| {
                    let bufs = (&mut *f, &mut *g);
                    c.sparse_forward_backward(
                        &d_batch,
                        &chunks,
                        &sets[i % 2],
                        &coeffs,
                        bufs,
                        mode,
                        save,
                    )
                });
                gpu.set_local_pairs(recompute);
                timed.push(("sparse-ours", pass, reps, ms?));
            }
            timed.push((
                "sparse-ours",
                "e2e_fwd_bwd",
                reps,
                gpu.time_median_ms(WARMUP, reps, |i| {
                    let fresh = gpu.chunk(&d_batch, wl.num_chunks)?;
                    let bufs = (&mut *f, &mut *g);
                    let saved = Saved::BranchOutputs;
                    c.sparse_forward_backward(
                        &d_batch,
                        &fresh,
                        &sets[i % 2],
                        &coeffs,
                        bufs,
                        Fast,
                        saved,
                    )
                })?,
            ));
        }
        if args.dense {
            let c = &cell;
            let (f, g) = (&mut dense_fwd, &mut dense_grad);
            for (pass, backward) in [("fwd", false), ("fwd_bwd", true)] {
                let ms = gpu.time_median_ms(WARMUP, dense_reps, |i| {
                    let grad = backward.then_some(&mut *g);
                    c.dense(&d_batch, &sets[i % 2], &coeffs, (&mut *f, grad))
                })?;
                timed.push(("dense-ours", pass, dense_reps, ms));
            }
        }
        *copy_bw = gpu.copy_bandwidth(COPY_BYTES, reps)?;
        for (system, pass, reps, ms) in timed {
            match rows_out
                .iter_mut()
                .find(|r| r.system == system && r.pass == pass)
            {
                Some(r) => r.ms[run] = ms,
                None => rows_out.push(Row {
                    system,
                    pass,
                    reps,
                    ms: [ms, f64::NAN],
                    peak_bytes: peak_of(system, pass),
                }),
            }
        }
        println!("  run {} of 2 done", run + 1);
    }

    // The fewest bytes the sparse forward must move (BENCH.md): Q, K, V, gates and timestamps
    // read once, O and LSE written once.
    let elem = std::mem::size_of::<bf16>();
    let min_bytes_sparse = (4 * rows + branch_rows) * elem + 8 * t + 4 * branch_rows;
    // The dense forward has no gates and one LSE per (token, head).
    let min_bytes_dense = 4 * rows * elem + 8 * t + 4 * t * wl.heads;

    let name = gpu.name()?;
    let (dmaj, dmin) = gpu.driver_version()?;
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "unknown".into());
    let mut json = String::new();
    write!(
        json,
        "{{\"source\":\"gpu_bench\",\"gpu\":{name:?},\"gpu_stem\":{:?},\"arch\":{:?},\
         \"driver_cuda\":\"{dmaj}.{dmin}\",\"nvidia_driver\":{:?},\"commit\":{:?},\
         \"kernel_dir\":{:?},\
         \"workload\":{:?},\"heads\":{},\"head_dim\":{},\"num_chunks\":{},\"tail_tokens\":{},\
         \"window\":{},\"candidates\":{},\"len\":{len},\"num_seqs\":{},\"num_tokens\":{t},\
         \"dtype\":\"bf16\",\"warmup\":{WARMUP},\"host_setup_s\":{host_s:.3},\
         \"min_bytes_sparse_fwd\":{min_bytes_sparse},\"min_bytes_dense_fwd\":{min_bytes_dense},\
         \"copy_bytes\":{COPY_BYTES},\"copy_bytes_per_s\":[{},{}],\"rows\":[",
        file_stem(&name),
        gpu.arch(),
        env("SPARSECTR_NVIDIA_DRIVER"),
        env("SPARSECTR_COMMIT"),
        // Which kernels ran: the build's own, or (feature `dev-kernel-dir`) a folder of earlier
        // ones (scripts/kernel-sources.sh), with that folder's COMMIT note.
        kernel_dir_note(),
        wl.name,
        wl.heads,
        wl.head_dim,
        wl.num_chunks,
        wl.tail_tokens,
        wl.window,
        wl.candidates,
        cell.batch.num_seqs(),
        copy[0],
        copy[1],
    )
    .expect("writing to a String");
    for (i, r) in rows_out.iter().enumerate() {
        let peak = r.peak_bytes.map_or("null".to_string(), |b| b.to_string());
        write!(
            json,
            "{}{{\"system\":{:?},\"pass\":{:?},\"reps\":{},\"ms\":[{},{}],\"peak_bytes\":{peak}}}",
            if i == 0 { "" } else { "," },
            r.system,
            r.pass,
            r.reps,
            r.ms[0],
            r.ms[1]
        )
        .expect("writing to a String");
        println!(
            "  {:<12} {:<12} {:>10.3} ms {:>10.3} ms  peak {}",
            r.system,
            r.pass,
            r.ms[0],
            r.ms[1],
            r.peak_bytes.map_or("not measured".into(), |b| format!(
                "{:.2} GiB",
                b as f64 / (1u64 << 30) as f64
            ))
        );
    }
    json.push_str("]}");
    Ok(json)
}

/// Writes the folder `torch_baselines.py` reads: the batch, its CPU chunks, input set 1 and the
/// GPU forward output for it computed with the GPU's own chunks, so the PyTorch check also
/// catches a GPU chunking that differs from the CPU's.
fn export(
    cell: &Cell<'_>,
    d_batch: &DeviceBatch,
    chunks: &DeviceChunks,
    set: &DeviceSet,
    host: &HostSet,
    coeffs: &CudaSlice<f32>,
    dir: &Path,
) -> Result<()> {
    let gpu = cell.gpu;
    let wl = cell.wl;
    let (o, lse) = gpu.forward(
        d_batch,
        chunks,
        wl.dims(),
        &wl.config(),
        &set.inputs(coeffs),
    )?;
    let o = gpu
        .stream()
        .clone_dtoh(&o)
        .map_err(cuda_error("cuMemcpyDtoH"))?;
    let lse = gpu
        .stream()
        .clone_dtoh(&lse)
        .map_err(cuda_error("cuMemcpyDtoH"))?;
    let host_chunks = Chunks::personalized(&cell.batch, wl.num_chunks)?;
    let output = Output {
        o: o.iter().map(|x| x.to_f32()).collect(),
        lse,
        o_branch: None,
        source: format!("gpu {}", gpu.name()?),
    };
    let e = Export {
        name: wl.name,
        batch: &cell.batch,
        chunks: &host_chunks,
        personalized: true,
        num_chunks: wl.num_chunks,
        dims: wl.dims(),
        config: wl.config(),
        inputs: Inputs {
            q: &host.q,
            k: &host.k,
            v: &host.v,
            coeffs: &cell.coeffs_host,
            gates: Some(Gates::Native(&host.gates)),
        },
        d_o: None,
        dense: false,
    };
    write_folder(dir, &e, Some(output)).map_err(|detail| Error::Cuda {
        call: "export",
        detail,
    })?;
    Ok(())
}
