//! EvoAttention end to end on a realistic batch: build a BENCH.md workload, chunk it, run the
//! forward and backward, check the outputs, print a summary.
//!
//! ```text
//! cargo run --release --example evoattention -- [--workload ctr-base] [--len 512] [--tokens 4096]
//!                                               [--seed 0] [--dtype bf16] [--no-backward]
//! ```
//!
//! Exit status: 0 when every check passes, 1 when a check fails or the library returns an error,
//! 2 on a bad command line.

use std::fmt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use sparsectr_attn::cuda::{BackwardMode, GpuDevice, GpuElement, LocalPairs, Saved};
use sparsectr_attn::reference::{self, Gradients};
use sparsectr_attn::workload::{self, Rng, Workload, WORKLOADS};
use sparsectr_attn::{
    rel_l2_error, Branch, Chunks, DType, EvoAttention, Gates, Inputs, JaggedBatch, NUM_BRANCHES,
};

/// Defaults: ctr-base at n = 512 and 4096 requested tokens (8 users, about 3,900 tokens) runs
/// the f64 reference forward (0.7 s) and backward (2 s) in about 3 s in release mode on a 2-core
/// machine (the reference is single-threaded).
const DEFAULT_WORKLOAD: Workload = workload::CTR_BASE;
const DEFAULT_LEN: usize = 512;
const DEFAULT_TOKENS: usize = 4096;

const HELP: &str = "\
EvoAttention example: chunk a realistic batch, run forward and backward, check the outputs.

USAGE:
    cargo run --release --example evoattention -- [OPTIONS]

OPTIONS:
    --workload NAME   BENCH.md workload: ctr-small, ctr-base, ctr-wide   [default: ctr-base]
    --len N           behaviors per user, n (lengths are uniform in [0.75 n, n])  [default: 512]
    --tokens N        total tokens requested; users B = max(1, N / n)    [default: 4096]
    --seed S          seed of the batch and the random inputs            [default: 0]
    --dtype D         storage type of Q, K, V, gates and dO: bf16, f16, f32  [default: bf16]
    --no-backward     run the forward only
    --cpu             use the CPU reference even when a GPU is present
    -h, --help        print this help

Forward and backward run on GPU 0 when one answers, otherwise on the f64 CPU reference (whose
cost grows linearly with --tokens). The first line says which.
Exit status: 0 all checks pass, 1 a check failed or the library returned an error, 2 bad flags.";

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Args {
    workload: Workload,
    len: usize,
    tokens: usize,
    seed: u64,
    dtype: DType,
    backward: bool,
    force_cpu: bool,
}

enum Command {
    Run(Args),
    Help,
}

/// Parses `--flag value`, `--flag=value` and bare switches; anything unknown is an error.
fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut args = Args {
        workload: DEFAULT_WORKLOAD,
        len: DEFAULT_LEN,
        tokens: DEFAULT_TOKENS,
        seed: 0,
        dtype: DType::BF16,
        backward: true,
        force_cpu: false,
    };
    while let Some(arg) = argv.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let switch = |inline: Option<String>| match inline {
            Some(_) => Err(format!("{flag} takes no value")),
            None => Ok(()),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => {
                switch(inline.clone())?;
                return Ok(Command::Help);
            }
            "--no-backward" => {
                switch(inline.clone())?;
                args.backward = false;
            }
            "--cpu" => {
                switch(inline.clone())?;
                args.force_cpu = true;
            }
            "--workload" => {
                let name = value()?;
                args.workload = Workload::by_name(&name).ok_or_else(|| {
                    let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
                    format!(
                        "--workload {name:?}: unknown workload; expected one of {}",
                        names.join(", ")
                    )
                })?;
            }
            "--len" => args.len = parse_number(&flag, &value()?)?,
            "--tokens" => args.tokens = parse_number(&flag, &value()?)?,
            "--seed" => args.seed = parse_number(&flag, &value()?)?,
            "--dtype" => {
                let name = value()?;
                args.dtype = match name.as_str() {
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    "f32" => DType::F32,
                    _ => return Err(format!("--dtype {name:?}: expected bf16, f16 or f32")),
                };
            }
            _ if flag.starts_with('-') => return Err(format!("unknown flag {flag}")),
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    check_memory(&args)?;
    Ok(Command::Run(args))
}

/// f64 values the reference holds per element of a `[T, H, D]` tensor during the backward
/// (widened inputs, per-branch outputs, gradients): 13.4 measured at the defaults, rounded up.
const F64_PER_ELEMENT: u128 = 16;
/// Sizes whose estimate exceeds this are refused, rather than aborting on a failed allocation.
const MAX_MEMORY_GIB: u128 = 8;

/// Refuses sizes the f64 reference cannot hold, before anything is allocated.
fn check_memory(args: &Args) -> Result<(), String> {
    let wl = args.workload;
    let users = (args.tokens / args.len.max(1)).max(1) as u128;
    let max_tokens = users * (args.len as u128 + 1 + wl.candidates as u128);
    let bytes = max_tokens * (wl.heads * wl.head_dim) as u128 * F64_PER_ELEMENT * 8;
    if bytes > MAX_MEMORY_GIB << 30 {
        return Err(format!(
            "--len {} --tokens {} with {}: up to {max_tokens} tokens, about {:.1} GiB for the \
             f64 reference; the limit is {MAX_MEMORY_GIB} GiB",
            args.len,
            args.tokens,
            wl.name,
            bytes as f64 / (1u64 << 30) as f64
        ));
    }
    Ok(())
}

fn parse_number<N: std::str::FromStr>(flag: &str, value: &str) -> Result<N, String>
where
    N::Err: fmt::Display,
{
    value
        .parse()
        .map_err(|e| format!("{flag} {value:?}: not a non-negative integer ({e})"))
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// Where the attention runs: the GPU kernels when a GPU answers (and `--cpu` is not given),
/// otherwise the f64 CPU reference. Outputs are widened to the same f64 form so the checks below
/// serve both.
enum Backend {
    /// `reference::forward` / `reference::backward`: f64 loops, one thread.
    CpuReference { why: String },
    /// `GpuDevice::forward_host` / `backward_host` (upload, kernels, copy back).
    Gpu(Box<GpuDevice>),
}

/// Forward outputs in the form the checks read.
struct ForwardOut {
    /// `[T, H, D]`.
    o: Vec<f64>,
    /// `[T, H, 3]`, `-inf` where a branch's key set is empty.
    lse: Vec<f64>,
}

impl Backend {
    fn select(force_cpu: bool) -> Backend {
        if force_cpu {
            return Backend::CpuReference {
                why: "--cpu".into(),
            };
        }
        match GpuDevice::new(0) {
            Ok(gpu) => Backend::Gpu(Box::new(gpu)),
            Err(e) => Backend::CpuReference { why: e.to_string() },
        }
    }

    fn describe(&self) -> String {
        match self {
            Backend::CpuReference { why } => format!("CPU reference (f64); no GPU used: {why}"),
            Backend::Gpu(gpu) => format!(
                "GPU {} ({}): forward and backward kernels",
                gpu.name().unwrap_or_else(|e| e.to_string()),
                gpu.arch()
            ),
        }
    }

    fn forward<T: GpuElement>(
        &self,
        attn: &EvoAttention<'_>,
        inputs: &Inputs<'_, T>,
    ) -> sparsectr_attn::Result<ForwardOut> {
        match self {
            Backend::CpuReference { .. } => {
                let fwd = reference::forward(attn, inputs)?;
                Ok(ForwardOut {
                    o: fwd.o,
                    lse: fwd.lse,
                })
            }
            Backend::Gpu(gpu) => {
                let fwd = gpu.forward_host(
                    attn.batch(),
                    attn.chunks(),
                    attn.dims(),
                    attn.config(),
                    inputs,
                )?;
                Ok(ForwardOut {
                    o: fwd.o.iter().map(|x| x.to_f64()).collect(),
                    lse: fwd.lse.iter().map(|&x| x as f64).collect(),
                })
            }
        }
    }

    /// Gradients for upstream `d_o` (`[T, H, D]`). Both paths recompute what they need of the
    /// forward (the reference its outputs, the GPU its LSE).
    fn backward<T: GpuElement>(
        &self,
        attn: &EvoAttention<'_>,
        inputs: &Inputs<'_, T>,
        d_o: &[T],
    ) -> sparsectr_attn::Result<Gradients> {
        match self {
            Backend::CpuReference { .. } => reference::backward(attn, inputs, d_o),
            Backend::Gpu(gpu) => {
                let g = gpu.backward_host(
                    attn.batch(),
                    attn.chunks(),
                    attn.dims(),
                    attn.config(),
                    inputs,
                    d_o,
                    BackwardMode::Fast,
                    Saved::BranchOutputs,
                )?;
                let wide = |x: &[T]| x.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
                let wide32 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
                Ok(Gradients {
                    dq: wide(&g.dq),
                    dk: wide(&g.dk),
                    dv: wide(&g.dv),
                    dcoeffs: wide32(&g.dcoeffs),
                    dgates: wide32(&g.dgates),
                })
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// One named pass/fail check and what it saw.
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

struct Timings {
    chunking: Duration,
    /// Compiling and loading the GPU kernels (kernels loaded, time); none on the CPU.
    kernels: Option<(usize, Duration)>,
    forward: Duration,
    backward: Option<Duration>,
    /// The same calls once more on the GPU (forward, backward): the first calls also pay for
    /// the process's first allocations and each kernel's first launch.
    again: Option<(Duration, Option<Duration>)>,
}

fn run<T: GpuElement>(args: &Args, backend: &Backend) -> sparsectr_attn::Result<bool> {
    let wl = args.workload;
    let batch = wl.batch(args.seed, args.len, args.tokens)?;

    let start = Instant::now();
    let chunks = Chunks::personalized(&batch, wl.num_chunks)?;
    let chunking = start.elapsed();

    let attn = EvoAttention::new(&batch, &chunks, wl.dims(), wl.config())?;
    let t_total = batch.num_tokens();
    let (heads, d) = (wl.heads, wl.head_dim);
    // A stream apart from the batch's, so that the inputs do not repeat the timestamps' draws.
    let mut rng = Rng::new(args.seed ^ 0x5EED_0F1A_7E57);
    let q: Vec<T> = workload::random_tensor(&mut rng, t_total * heads * d, 1.0);
    let k: Vec<T> = workload::random_tensor(&mut rng, t_total * heads * d, 1.0);
    let v: Vec<T> = workload::random_tensor(&mut rng, t_total * heads * d, 1.0);
    let gates: Vec<T> =
        workload::uniform_tensor(&mut rng, t_total * heads * NUM_BRANCHES, 0.5, 1.5);
    let coeffs: Vec<f32> = workload::random_tensor(&mut rng, heads * 3, 0.3);
    let d_o: Vec<T> = workload::random_tensor(&mut rng, t_total * heads * d, 1.0);
    let inputs = Inputs {
        q: &q,
        k: &k,
        v: &v,
        coeffs: &coeffs,
        gates: Some(Gates::Native(&gates)),
    };

    // Once per process, and apart from the timed calls, which would otherwise include it.
    let kernels = match backend {
        Backend::Gpu(gpu) => {
            let start = Instant::now();
            let n = gpu.load_kernels(T::DTYPE, d)?;
            Some((n, start.elapsed()))
        }
        Backend::CpuReference { .. } => None,
    };

    let start = Instant::now();
    let fwd = backend.forward(&attn, &inputs)?;
    let forward = start.elapsed();

    let (grads, backward) = if args.backward {
        let start = Instant::now();
        let grads = backend.backward(&attn, &inputs, &d_o)?;
        (Some(grads), Some(start.elapsed()))
    } else {
        (None, None)
    };

    let again = match backend {
        Backend::Gpu(_) => {
            let start = Instant::now();
            backend.forward(&attn, &inputs)?;
            let forward = start.elapsed();
            let backward = if args.backward {
                let start = Instant::now();
                backend.backward(&attn, &inputs, &d_o)?;
                Some(start.elapsed())
            } else {
                None
            };
            Some((forward, backward))
        }
        Backend::CpuReference { .. } => None,
    };

    // On a GPU, 16-bit: the backward once more with the key side reading the query kernel's
    // stored local pairs (LocalPairs::Stored), against the default run's gradients.
    let stored = match (backend, grads.as_ref()) {
        (Backend::Gpu(gpu), Some(_)) if T::DTYPE != DType::F32 => {
            gpu.set_local_pairs(LocalPairs::Stored);
            let start = Instant::now();
            let g = backend.backward(&attn, &inputs, &d_o);
            let took = start.elapsed();
            gpu.set_local_pairs(LocalPairs::Recompute);
            Some((g?, took))
        }
        _ => None,
    };

    print_summary(
        args,
        backend,
        &batch,
        &chunks,
        &Timings {
            chunking,
            kernels,
            forward,
            backward,
            again,
        },
    );
    let mut checks = check_outputs(&attn, &fwd, grads.as_ref());
    if let (Some((s, took)), Some(g)) = (&stored, grads.as_ref()) {
        checks.push(check_stored_pairs(s, g, *took, T::DTYPE.tolerance()));
    }
    println!("checks");
    for c in &checks {
        println!(
            "  {} {}: {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    let all_ok = checks.iter().all(|c| c.ok);
    println!(
        "{}",
        if all_ok {
            "all checks passed"
        } else {
            "SOME CHECKS FAILED"
        }
    );
    Ok(all_ok)
}

fn print_summary(
    args: &Args,
    backend: &Backend,
    batch: &JaggedBatch,
    chunks: &Chunks,
    timings: &Timings,
) {
    let wl = args.workload;
    let per_user: Vec<usize> = (0..chunks.num_seqs())
        .map(|u| chunks.of_seq(u).len())
        .collect();
    let lens: Vec<usize> = batch.seqs().map(|s| s.num_behaviors()).collect();
    let min_max = |xs: &[usize]| {
        (
            xs.iter().copied().min().unwrap_or(0),
            xs.iter().copied().max().unwrap_or(0),
        )
    };
    let (c_min, c_max) = min_max(&per_user);
    let (n_min, n_max) = min_max(&lens);
    let c_mean = chunks.num_chunks() as f64 / chunks.num_seqs().max(1) as f64;

    println!("device    {}", backend.describe());
    println!(
        "workload  {} (H {}, D {}, P {}, m {}, w {}, {} candidates/user), n = {}, seed {}",
        wl.name,
        wl.heads,
        wl.head_dim,
        wl.num_chunks,
        wl.tail_tokens,
        wl.window,
        wl.candidates,
        args.len,
        args.seed
    );
    println!("dtype     {} (Q, K, V, gates, dO)", args.dtype.name());
    println!(
        "batch     {} users, {} tokens, {} behaviors (per user {}..={})",
        batch.num_seqs(),
        batch.num_tokens(),
        batch.num_behaviors(),
        n_min,
        n_max
    );
    println!(
        "chunks    {} in all; per user mean {:.2}, min {}, max {}",
        chunks.num_chunks(),
        c_mean,
        c_min,
        c_max
    );
    println!("time      chunking  {}", fmt_duration(timings.chunking));
    if let Some((n, t)) = timings.kernels {
        println!(
            "          kernels   {} (load_kernels: {n} loaded, dense ones too; once per process)",
            fmt_duration(t)
        );
    }
    println!("          forward   {}", fmt_duration(timings.forward));
    match timings.backward {
        Some(t) => println!(
            "          backward  {} (recomputes the forward)",
            fmt_duration(t)
        ),
        None => println!("          backward  skipped (--no-backward)"),
    }
    if let Some((forward, backward)) = timings.again {
        let backward =
            backward.map_or(String::new(), |t| format!(", backward {}", fmt_duration(t)));
        println!(
            "          again     forward {}{backward} (the same calls once more: the first pay for \
             first allocations and launches)",
            fmt_duration(forward)
        );
    }
}

fn fmt_duration(t: Duration) -> String {
    let s = t.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// Which branches of query token `q` have an empty key set, from SPEC section 3 directly (not
/// through `EvoAttention::keys`, so that the two cross-check): the user token sees nothing; a
/// behavior sees no summary before its first chunk is complete and no tail token before the
/// first chunk's tail starts; a candidate sees none of either only when `n = 0`; the local
/// branch of a behavior or candidate always holds the query itself.
fn empty_branches(
    batch: &JaggedBatch,
    chunks: &Chunks,
    m: usize,
    seq: usize,
    q: usize,
) -> [bool; NUM_BRANCHES] {
    let span = batch.seq(seq);
    if span.user == Some(q) {
        return [true; NUM_BRANCHES];
    }
    let first = chunks.of_seq(seq).next();
    let (global, transition) = match first {
        None => (true, true), // n = 0
        Some(_) if span.candidates.contains(&q) => (false, false),
        Some(c) => (q < chunks.last(c), q < chunks.tail(c, m).start),
    };
    let mut empty = [false; NUM_BRANCHES];
    empty[Branch::Global as usize] = global;
    empty[Branch::Transition as usize] = transition;
    empty[Branch::Local as usize] = false;
    empty
}

fn check_outputs(
    attn: &EvoAttention<'_>,
    fwd: &ForwardOut,
    grads: Option<&Gradients>,
) -> Vec<Check> {
    let batch = attn.batch();
    let chunks = attn.chunks();
    let (heads, d) = (attn.dims().heads, attn.dims().head_dim);
    let m = attn.config().tail_tokens;
    let mut checks = Vec::new();

    let bad_o = fwd.o.iter().filter(|x| !x.is_finite()).count();
    checks.push(Check {
        name: "O finite",
        ok: bad_o == 0,
        detail: format!("{bad_o} non-finite of {}", fwd.o.len()),
    });

    // LSE: -inf exactly on the empty (query, head, branch) rows, finite everywhere else.
    let mut empty_queries = [0usize; NUM_BRANCHES];
    let (mut wrong_empty, mut wrong_nonempty) = (0usize, 0usize);
    for (seq, span) in batch.seqs().enumerate() {
        for q in span.tokens() {
            let empty = empty_branches(batch, chunks, m, seq, q);
            for (b, &is_empty) in empty.iter().enumerate() {
                empty_queries[b] += usize::from(is_empty);
                for h in 0..heads {
                    let lse = fwd.lse[(q * heads + h) * NUM_BRANCHES + b];
                    if is_empty && lse != f64::NEG_INFINITY {
                        wrong_empty += 1;
                    }
                    if !is_empty && !lse.is_finite() {
                        wrong_nonempty += 1;
                    }
                }
            }
        }
    }
    checks.push(Check {
        name: "LSE",
        ok: wrong_empty == 0 && wrong_nonempty == 0,
        detail: format!(
            "empty key sets (queries, x{heads} heads): global {}, transition {}, local {} of {}; \
             {wrong_empty} empty rows not -inf, {wrong_nonempty} other rows not finite",
            empty_queries[0],
            empty_queries[1],
            empty_queries[2],
            batch.num_tokens()
        ),
    });

    let users: Vec<usize> = batch.seqs().filter_map(|s| s.user).collect();
    let nonzero_user_rows = users
        .iter()
        .flat_map(|&u| (0..heads).map(move |h| (u * heads + h) * d))
        .filter(|&row| fwd.o[row..row + d].iter().any(|&x| x != 0.0))
        .count();
    checks.push(Check {
        name: "user-token O rows zero",
        ok: nonzero_user_rows == 0,
        detail: format!(
            "{nonzero_user_rows} nonzero of {} (user token, head) rows",
            users.len() * heads
        ),
    });

    if let Some(g) = grads {
        let tensors: [(&str, &[f64]); 5] = [
            ("dQ", &g.dq),
            ("dK", &g.dk),
            ("dV", &g.dv),
            ("dgates", &g.dgates),
            ("dcoeffs", &g.dcoeffs),
        ];
        let bad: Vec<String> = tensors
            .iter()
            .map(|(name, xs)| (name, xs.iter().filter(|x| !x.is_finite()).count()))
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let total: usize = tensors.iter().map(|(_, xs)| xs.len()).sum();
        checks.push(Check {
            name: "gradients finite",
            ok: bad.is_empty(),
            detail: if bad.is_empty() {
                format!("dQ, dK, dV, dgates, dcoeffs: 0 non-finite of {total}")
            } else {
                format!("non-finite: {}", bad.join(", "))
            },
        });
    }
    checks
}

/// The backward with stored local pairs (`s`) against the default one (`g`): dK and dV within
/// the dtype's tolerance (the key side rounds dz once more), everything else the same bits.
fn check_stored_pairs(s: &Gradients, g: &Gradients, took: Duration, tol: f64) -> Check {
    let same = s.dq == g.dq && s.dgates == g.dgates && s.dcoeffs == g.dcoeffs;
    let (dk, dv) = (rel_l2_error(&s.dk, &g.dk), rel_l2_error(&s.dv, &g.dv));
    Check {
        name: "stored local pairs",
        ok: same && dk <= tol && dv <= tol,
        detail: format!(
            "dK {dk:.1e}, dV {dv:.1e} from the default run's (tolerance {tol:e}); dQ, dgates, \
             dcoeffs {}; backward {}",
            if same { "the same bits" } else { "DIFFERENT" },
            fmt_duration(took)
        ),
    }
}

// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("error: {msg}\n(run with --help for the options)");
            return ExitCode::from(2);
        }
    };
    let backend = Backend::select(args.force_cpu);
    let result = match args.dtype {
        DType::BF16 => run::<bf16>(&args, &backend),
        DType::F16 => run::<f16>(&args, &backend),
        DType::F32 => run::<f32>(&args, &backend),
        DType::F64 => {
            eprintln!("error: f64 inputs are not a storage type of this example");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
