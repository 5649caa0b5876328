//! GPU forward benchmark (BENCH.md): time of GPU chunking and of the forward (pooling included)
//! on a BENCH.md workload, and the forward's effective bandwidth (the fewest bytes it must move
//! over its time) as a fraction of a device-to-device copy measured in the same run.
//!
//! ```text
//! cargo bench --bench gpu_forward -- [--workload ctr-base] [--len 4096] [--tokens 1048576]
//!                                     [--reps 20] [--out benches/results]
//! ```
//!
//! Writes `<out>/<gpu>-forward.md` and `.json` with the GPU, driver, CUDA and commit
//! (`SPARSECTR_COMMIT`, else "unknown") at the top. Without a GPU it prints SKIPPED and exits 0.

use std::fmt::Write as _;
use std::time::Instant;

use half::bf16;
use sparsectr_attn::cuda::{DeviceGates, DeviceInputs, DeviceOutputs, GpuDevice};
use sparsectr_attn::workload::{Rng, Workload, CTR_BASE, WORKLOADS};
use sparsectr_attn::{Error, NUM_BRANCHES};

struct Args {
    workload: Workload,
    len: usize,
    tokens: usize,
    reps: usize,
    out: String,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        workload: CTR_BASE,
        len: 4096,
        tokens: 1 << 20,
        reps: 20,
        out: "benches/results".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bench" => {} // passed by `cargo bench`
            "--workload" => {
                let name = value()?;
                a.workload = Workload::by_name(&name).ok_or_else(|| {
                    let names: Vec<_> = WORKLOADS.iter().map(|w| w.name).collect();
                    format!("unknown workload {name:?}; one of {names:?}")
                })?;
            }
            "--len" => a.len = value()?.parse().map_err(|e| format!("--len: {e}"))?,
            "--tokens" => a.tokens = value()?.parse().map_err(|e| format!("--tokens: {e}"))?,
            "--reps" => a.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--out" => a.out = value()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// `len` bf16 values uniform in [-1, 1), filled by all cores (the ctr-base tensors hold 2^29).
fn random_bf16(seed: u64, len: usize) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; len];
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let chunk = len.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
                for x in part {
                    *x = bf16::from_f64(2.0 * rng.uniform() - 1.0);
                }
            });
        }
    });
    out
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
            println!("SKIPPED gpu_forward bench: no GPU ({e})");
            return;
        }
    };
    if let Err(e) = run(&gpu, &args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(gpu: &GpuDevice, args: &Args) -> Result<(), Error> {
    let wl = args.workload;
    let (h, d) = (wl.heads, wl.head_dim);
    let batch = wl.batch(1, args.len, args.tokens)?;
    let t = batch.num_tokens();
    let config = wl.config();
    let stream = gpu.stream();
    let cuda = |e: cudarc::driver::DriverError| Error::Cuda {
        call: "bench",
        detail: format!("{e:?}"),
    };

    let prep = Instant::now();
    let d_batch = gpu.upload_batch(&batch, &config.temporal)?;
    let chunks = gpu.chunk(&d_batch, wl.num_chunks)?;
    // Two input sets, alternated, so consecutive repetitions do not find their inputs in L2.
    let n = t * h * d;
    let mut sets = Vec::new();
    for s in 0..2u64 {
        let up = |seed: u64, len: usize| stream.clone_htod(&random_bf16(seed, len)).map_err(cuda);
        sets.push((
            up(10 * s + 1, n)?,
            up(10 * s + 2, n)?,
            up(10 * s + 3, n)?,
            up(10 * s + 4, t * h * NUM_BRANCHES)?,
        ));
    }
    let coeffs = stream
        .clone_htod(&[0.3f32, 0.2, 0.1].repeat(h))
        .map_err(cuda)?;
    let mut o = stream.alloc_zeros::<bf16>(n).map_err(cuda)?;
    let mut lse = stream
        .alloc_zeros::<f32>(t * h * NUM_BRANCHES)
        .map_err(cuda)?;
    let prep_s = prep.elapsed().as_secs_f64();

    let chunk_ms = gpu.time_median_ms(3, args.reps, |_| {
        gpu.chunk(&d_batch, wl.num_chunks).map(drop)
    })?;
    let mut forward_once = |i: usize| {
        let (q, k, v, g) = &sets[i % 2];
        let inputs = DeviceInputs {
            q,
            k,
            v,
            coeffs: &coeffs,
            gates: Some(DeviceGates::Native(g)),
        };
        let out = DeviceOutputs {
            o: &mut o,
            lse: &mut lse,
        };
        gpu.forward_into(&d_batch, &chunks, wl.dims(), &config, &inputs, out)
    };
    // Two identical runs: their spread is reported beside the figure.
    let fwd_ms_a = gpu.time_median_ms(3, args.reps, &mut forward_once)?;
    let fwd_ms_b = gpu.time_median_ms(3, args.reps, &mut forward_once)?;
    let copy_bw = gpu.copy_bandwidth(1 << 30, args.reps)?;

    // The fewest bytes the forward must move: Q, K, V, gates and timestamps read once, O and
    // LSE written once (BENCH.md).
    let elem = std::mem::size_of::<bf16>();
    let min_bytes = (4 * n + t * h * NUM_BRANCHES) * elem + 8 * t + 4 * t * h * NUM_BRANCHES;
    let fwd_ms = fwd_ms_a.min(fwd_ms_b);
    let eff_bw = min_bytes as f64 / (fwd_ms * 1e-3);
    let fraction = eff_bw / copy_bw;

    let name = gpu.name()?;
    let (dmaj, dmin) = gpu.driver_version()?;
    let commit = std::env::var("SPARSECTR_COMMIT").unwrap_or_else(|_| "unknown".into());
    let header = format!(
        "GPU: {name} ({}), driver CUDA version {dmaj}.{dmin}, kernels compiled by {}, commit {commit}",
        gpu.arch(),
        "NVRTC at first use (or nvcc at build time where present)"
    );
    let mut md = String::new();
    writeln!(md, "# Forward benchmark\n\n{header}\n").unwrap();
    writeln!(
        md,
        "Workload {} (H {h}, D {d}, P {}, m {}, w {}), bf16, n = {}, B = {}, T = {t}, gates \
         present; median of {} repetitions after 3 warm-ups, two input sets alternated.\n",
        wl.name,
        wl.num_chunks,
        wl.tail_tokens,
        wl.window,
        args.len,
        batch.num_seqs(),
        args.reps
    )
    .unwrap();
    writeln!(md, "| quantity | value |\n|---|---|").unwrap();
    writeln!(md, "| GPU chunking (median) | {chunk_ms:.3} ms |").unwrap();
    writeln!(
        md,
        "| forward incl. pooling, run 1 (median) | {fwd_ms_a:.3} ms |"
    )
    .unwrap();
    writeln!(
        md,
        "| forward incl. pooling, run 2 (median) | {fwd_ms_b:.3} ms |"
    )
    .unwrap();
    writeln!(
        md,
        "| minimum bytes of the forward | {:.3} GB |",
        min_bytes as f64 / 1e9
    )
    .unwrap();
    writeln!(md, "| effective bandwidth | {:.1} GB/s |", eff_bw / 1e9).unwrap();
    writeln!(
        md,
        "| device-to-device copy bandwidth | {:.1} GB/s |",
        copy_bw / 1e9
    )
    .unwrap();
    writeln!(
        md,
        "| fraction of copy bandwidth | {:.1}% (target 60%) |",
        100.0 * fraction
    )
    .unwrap();
    let json = format!(
        "{{\"gpu\":{name:?},\"arch\":{:?},\"driver_cuda\":\"{dmaj}.{dmin}\",\"commit\":{commit:?},\
         \"workload\":{:?},\"len\":{},\"num_seqs\":{},\"num_tokens\":{t},\"reps\":{},\
         \"chunking_ms\":{chunk_ms},\"forward_ms\":[{fwd_ms_a},{fwd_ms_b}],\
         \"min_bytes\":{min_bytes},\"copy_bytes_per_s\":{copy_bw},\"fraction_of_copy\":{fraction},\
         \"setup_s\":{prep_s}}}\n",
        gpu.arch(),
        wl.name,
        args.len,
        batch.num_seqs(),
        args.reps
    );
    print!("{md}");
    std::fs::create_dir_all(&args.out).map_err(|e| Error::Cuda {
        call: "create_dir_all",
        detail: e.to_string(),
    })?;
    let stem: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let base = format!("{}/{stem}-forward-{}-n{}", args.out, wl.name, args.len);
    for (ext, text) in [("md", &md), ("json", &json)] {
        std::fs::write(format!("{base}.{ext}"), text).map_err(|e| Error::Cuda {
            call: "write results",
            detail: e.to_string(),
        })?;
    }
    Ok(())
}
