//! A SparseCTR model trained end to end on synthetic CTR data, with EvoAttention and then with
//! dense attention on the same data and seed, compared on held-out AUC and log loss.
//!
//! ```text
//! cargo run --release --example sparsectr_train --features candle -- [OPTIONS]
//! ```
//!
//! Exit status: 0 on success, 1 when reading or writing data or training fails, 2 on a bad
//! command line.

use std::fmt;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::Device;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use sparsectr_attn::ctr_data::{self, shuffle, CtrConfig, CtrDataset, Oracle};
use sparsectr_attn::model::{
    auc, evaluate, train_step, AttentionKind, Evaluation, ModelBatch, ModelConfig, SparseCtr,
};
use sparsectr_attn::workload::Rng;

/// Defaults: 2,000 users of 48..64 behaviors and 32 candidates (1,600 train, 400 held out, about
/// 142,000 training tokens per epoch), 3 epochs, 2 layers of 2 heads x 32, 16 requests per step.
/// Measured on the 2-core development machine in release mode, while other processes were
/// loading it: 10 to 20 s per training epoch for either attention, 74 to 108 s for the whole run.
/// Held-out AUC after 3 epochs, seeds 0, 1, 2: EvoAttention 0.674, 0.689, 0.683; dense 0.656,
/// 0.665, 0.683; the true click probabilities give 0.850, 0.858, 0.851. With seed 0, EvoAttention
/// trained for 6 epochs gave AUC 0.641, 0.673, 0.674, 0.680, 0.684, 0.677 while the held-out log
/// loss was lowest after epoch 2 (0.401) and rose to 0.432: the model starts to memorise the
/// 1,600 training users, so 3 epochs is the default.
const HELP_HEAD: &str = "\
Train a SparseCTR model (paper Figure 1) end to end on synthetic CTR data, with EvoAttention
and then with dense attention (same data, same seed), and compare them on held-out data.

USAGE:
    cargo run --release --example sparsectr_train --features candle -- [OPTIONS]

DATA (generated unless --data is given; 20% of the requests are held out):
    --users N          requests, one per user                          [default: 2000]
    --len N            behaviors per user, uniform in [0.75 N, N]      [default: 64]
    --candidates N     candidates per request                          [default: 32]
    --data FILE        read the data set from FILE instead (format below)
    --write-data FILE  write the data set to FILE, then train

MODEL AND TRAINING:
    --attention A      evo, dense or both                              [default: both]
    --epochs N         passes over the training requests               [default: 3]
    --batch N          requests per optimizer step                     [default: 16]
    --layers N         SparseBlocks                                    [default: 2]
    --heads N          attention heads                                 [default: 2]
    --head-dim D       32, 64 or 128 (model width = heads x head-dim)  [default: 32]
    --chunks P         personal time-aware chunks per user             [default: 8]
    --tails M          tail tokens per chunk (transition branch)       [default: 1]
    --window W         local window                                    [default: 16]
    --lr X             AdamW learning rate                             [default: 0.002]
    --seed S           seed of the data, the split, the weights and the batch order  [default: 0]
    --cuda             run on GPU 0 (model and attention kernels; needs a build with
                       --features candle-cuda, see scripts/candle-cuda-env.sh)
    -h, --help         print this help

Runs on the CPU unless --cuda: candle computes the model and the crate's f64 reference computes
the attention (single-threaded), so the time grows with --users x --len. With --cuda, candle and
the crate's kernels run on GPU 0. Exit status: 0 success, 1 a data or
training error, 2 bad flags.

DATA FILE FORMAT
";

#[derive(Debug, Clone)]
struct Args {
    data: CtrConfig,
    data_file: Option<String>,
    write_data: Option<String>,
    attention: Vec<AttentionKind>,
    epochs: usize,
    batch: usize,
    layers: usize,
    heads: usize,
    head_dim: usize,
    chunks: usize,
    tails: usize,
    window: usize,
    lr: f64,
    seed: u64,
    cuda: bool,
}

enum Command {
    Run(Box<Args>),
    Help,
}

/// The flags that take a value (all but `--help`).
const FLAGS: &[&str] = &[
    "--users",
    "--len",
    "--candidates",
    "--data",
    "--write-data",
    "--attention",
    "--epochs",
    "--batch",
    "--layers",
    "--heads",
    "--head-dim",
    "--chunks",
    "--tails",
    "--window",
    "--lr",
    "--seed",
];

/// Parses `--flag value` and `--flag=value`; anything unknown is an error.
fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut a = Args {
        data: CtrConfig {
            candidates: 32,
            ..CtrConfig::default()
        },
        data_file: None,
        write_data: None,
        attention: vec![AttentionKind::Evo, AttentionKind::Dense],
        epochs: 3,
        batch: 16,
        layers: 2,
        heads: 2,
        head_dim: 32,
        chunks: 8,
        tails: 1,
        window: 16,
        lr: 2e-3,
        seed: 0,
        cuda: false,
    };
    let mut generator_flags: Vec<String> = Vec::new();
    while let Some(arg) = argv.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(Command::Help);
        }
        if !flag.starts_with('-') {
            return Err(format!("unexpected argument {arg:?}"));
        }
        if flag == "--cuda" {
            if inline.is_some() {
                return Err("--cuda takes no value".to_string());
            }
            a.cuda = true;
            continue;
        }
        if !FLAGS.contains(&flag.as_str()) {
            return Err(format!("unknown flag {flag}"));
        }
        let value = match inline {
            Some(v) => v,
            None => argv.next().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        match flag.as_str() {
            "--users" | "--len" | "--candidates" => {
                generator_flags.push(flag.clone());
                let n = positive(&flag, &value)?;
                match flag.as_str() {
                    "--users" => a.data.users = n,
                    "--len" => a.data.max_behaviors = n,
                    _ => a.data.candidates = n,
                }
            }
            "--data" => a.data_file = Some(value),
            "--write-data" => a.write_data = Some(value),
            "--attention" => {
                a.attention = match value.as_str() {
                    "evo" => vec![AttentionKind::Evo],
                    "dense" => vec![AttentionKind::Dense],
                    "both" => vec![AttentionKind::Evo, AttentionKind::Dense],
                    _ => {
                        return Err(format!(
                            "--attention {value:?}: expected evo, dense or both"
                        ))
                    }
                }
            }
            "--epochs" => a.epochs = positive(&flag, &value)?,
            "--batch" => a.batch = positive(&flag, &value)?,
            "--layers" => a.layers = positive(&flag, &value)?,
            "--heads" => a.heads = positive(&flag, &value)?,
            "--head-dim" => {
                a.head_dim = number(&flag, &value)?;
                if !sparsectr_attn::SUPPORTED_HEAD_DIMS.contains(&a.head_dim) {
                    return Err(format!("--head-dim {value}: expected 32, 64 or 128"));
                }
            }
            "--chunks" => a.chunks = positive(&flag, &value)?,
            "--tails" => a.tails = positive(&flag, &value)?,
            "--window" => a.window = positive(&flag, &value)?,
            "--lr" => {
                a.lr = number(&flag, &value)?;
                if !(a.lr.is_finite() && a.lr > 0.0) {
                    return Err(format!("--lr {value}: expected a positive number"));
                }
            }
            "--seed" => a.seed = number(&flag, &value)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.data_file.is_some() && !generator_flags.is_empty() {
        return Err(format!(
            "{} only shape generated data; they cannot be used with --data",
            generator_flags.join(", ")
        ));
    }
    a.data.seed = a.seed;
    Ok(Command::Run(Box::new(a)))
}

fn number<N: std::str::FromStr>(flag: &str, value: &str) -> Result<N, String>
where
    N::Err: fmt::Display,
{
    value.parse().map_err(|e| format!("{flag} {value:?}: {e}"))
}

fn positive(flag: &str, value: &str) -> Result<usize, String> {
    match number::<usize>(flag, value)? {
        0 => Err(format!("{flag} must be at least 1")),
        n => Ok(n),
    }
}

// ---------------------------------------------------------------------------------------------
// Peak memory
// ---------------------------------------------------------------------------------------------

/// Resets the peak resident set size of this process (Linux: writing 5 to clear_refs).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size since the last reset, in KiB (VmHWM), if the system reports it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------------

/// What one attention kind achieved.
struct Outcome {
    kind: AttentionKind,
    eval: Evaluation,
    seconds_per_epoch: f64,
    tokens_per_second: f64,
    peak_rss_kib: Option<u64>,
}

fn model_config(args: &Args, data: &CtrDataset, kind: AttentionKind) -> ModelConfig {
    ModelConfig {
        num_items: data.num_items,
        num_categories: data.num_categories,
        profile_sizes: data.profile_sizes.clone(),
        profile_dim: 8,
        layers: args.layers,
        heads: args.heads,
        head_dim: args.head_dim,
        num_chunks: args.chunks,
        tail_tokens: args.tails,
        window: args.window,
        ffn_hidden: 2 * args.heads * args.head_dim,
        mlp_hidden: 64,
        attention: kind,
        seed: args.seed,
    }
}

fn train(
    args: &Args,
    data: &CtrDataset,
    split: &(Vec<usize>, Vec<usize>),
    kind: AttentionKind,
    device: &Device,
) -> candle_core::Result<Outcome> {
    let reset = reset_peak_rss();
    let model = SparseCtr::new(model_config(args, data, kind), device)?;
    let params = ParamsAdamW {
        lr: args.lr,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(model.vars(), params)?;
    println!(
        "\n== {} attention: {} parameters ==",
        kind.name(),
        model.num_parameters()
    );
    let (train_idx, test_idx) = split;
    let mut train_seconds = 0.0;
    let mut train_tokens = 0usize;
    let mut eval = None;
    for epoch in 1..=args.epochs {
        // The same order for both kinds: seeded by the run's seed and the epoch.
        let mut order = train_idx.clone();
        shuffle(
            &mut Rng::new(args.seed ^ ((epoch as u64) << 32)),
            &mut order,
        );
        let steps = order.len().div_ceil(args.batch);
        let start = Instant::now();
        let (mut loss_sum, mut losses, mut tokens) = (0.0f64, 0usize, 0usize);
        for (step, part) in order.chunks(args.batch).enumerate() {
            let toks = data.tokens(part).map_err(candle_core::Error::wrap)?;
            let batch = ModelBatch::new(&toks, model.config(), device)?;
            if let Some(loss) = train_step(&model, &mut opt, &batch)? {
                loss_sum += loss as f64;
                losses += 1;
            }
            tokens += batch.num_tokens;
            let elapsed = start.elapsed().as_secs_f64();
            print!(
                "\r  epoch {epoch}/{}  step {:>4}/{steps}  loss {:.4}  {:>7.0} tokens/s ",
                args.epochs,
                step + 1,
                loss_sum / losses.max(1) as f64,
                tokens as f64 / elapsed.max(1e-9)
            );
            // Progress only; a closed stdout shows up at the next println.
            let _ = std::io::stdout().flush();
        }
        let seconds = start.elapsed().as_secs_f64();
        train_seconds += seconds;
        train_tokens += tokens;
        let e = evaluate(&model, data, test_idx, args.batch, device)?;
        println!(
            "\n  epoch {epoch}: {seconds:.1} s  held-out AUC {}  log loss {:.4}",
            fmt_auc(e.auc),
            e.log_loss
        );
        eval = Some(e);
    }
    let coeffs = model.coeffs()?;
    for (l, c) in coeffs.iter().enumerate() {
        let heads: Vec<String> = c
            .chunks(3)
            .map(|s| format!("({:+.2}, {:+.2}, {:+.2})", s[0], s[1], s[2]))
            .collect();
        println!(
            "  layer {l} RelTemporal (s1, s2, s3) per head: {}",
            heads.join(" ")
        );
    }
    let Some(eval) = eval else {
        candle_core::bail!("no epoch ran");
    };
    Ok(Outcome {
        kind,
        eval,
        seconds_per_epoch: train_seconds / args.epochs as f64,
        tokens_per_second: train_tokens as f64 / train_seconds.max(1e-9),
        peak_rss_kib: if reset { peak_rss_kib() } else { None },
    })
}

fn fmt_auc(a: Option<f64>) -> String {
    a.map_or("n/a".to_string(), |a| format!("{a:.4}"))
}

/// AUC of the true click probabilities on the held-out requests: the best any model can do.
fn oracle_auc(data: &CtrDataset, oracle: &Oracle, test: &[usize]) -> Option<f64> {
    let mut scores = Vec::new();
    let mut labels = Vec::new();
    for &i in test {
        for (c, &p) in data.requests[i]
            .candidates
            .iter()
            .zip(&oracle.click_prob[i])
        {
            scores.push(p as f32);
            labels.push(f32::from(u8::from(c.label)));
        }
    }
    auc(&scores, &labels)
}

fn load(args: &Args) -> Result<(CtrDataset, Option<Oracle>), String> {
    let (data, oracle) = match &args.data_file {
        Some(path) => {
            let file = File::open(path).map_err(|e| format!("{path}: {e}"))?;
            let data =
                CtrDataset::read_from(BufReader::new(file)).map_err(|e| format!("{path}: {e}"))?;
            println!("data      {path}");
            (data, None)
        }
        None => {
            let (data, oracle) = CtrDataset::generate(&args.data).map_err(|e| e.to_string())?;
            println!(
                "data      generated: seed {}, {} users, {} behaviors each at most, {} candidates",
                args.seed, args.data.users, args.data.max_behaviors, args.data.candidates
            );
            (data, Some(oracle))
        }
    };
    if let Some(path) = &args.write_data {
        let file = File::create(path).map_err(|e| format!("{path}: {e}"))?;
        data.write_to(BufWriter::new(file))
            .map_err(|e| format!("{path}: {e}"))?;
        println!("wrote     {path}");
    }
    Ok((data, oracle))
}

fn run(args: &Args, threads: &str) -> Result<(), String> {
    let device = if args.cuda {
        let device = Device::new_cuda(0).map_err(|e| format!("--cuda: {e}"))?;
        println!("device    GPU 0 (candle's CUDA backend; the attention runs through the crate's kernels)");
        // The model is f32. Loaded here in parallel, the kernels stay out of the first step,
        // which would otherwise compile them one after another.
        let start = Instant::now();
        let n = sparsectr_attn::candle_op::load_kernels(
            &device,
            candle_core::DType::F32,
            args.head_dim,
        )
        .map_err(|e| format!("--cuda: loading the kernels: {e}"))?;
        println!(
            "kernels   {n} loaded in {:.2} s (candle_op::load_kernels: f32, D = {}, sparse and dense)",
            start.elapsed().as_secs_f64(),
            args.head_dim
        );
        device
    } else {
        println!(
            "device    CPU (candle on {threads} thread(s), CANDLE_NUM_THREADS; the attention runs \
             through the crate's f64 reference, single-threaded)"
        );
        Device::Cpu
    };
    let (data, oracle) = load(args)?;
    let split = data.split(0.2, args.seed);
    if split.0.is_empty() || split.1.is_empty() {
        return Err(format!(
            "{} requests are too few to hold out 20% and train on the rest",
            data.requests.len()
        ));
    }
    let tokens: usize = data
        .requests
        .iter()
        .map(|r| 1 + r.behaviors.len() + r.candidates.len())
        .sum();
    println!(
        "          {} requests ({} train, {} held out), {tokens} tokens, {} candidates, \
         click rate {:.3}",
        data.requests.len(),
        split.0.len(),
        split.1.len(),
        data.num_candidates(),
        data.click_rate()
    );
    if let Some(o) = &oracle {
        println!(
            "          held-out AUC of the true click probabilities (the ceiling): {}",
            fmt_auc(oracle_auc(&data, o, &split.1))
        );
    }
    println!(
        "model     {} layers, {} heads x {}, P {} chunks, m {} tails, w {} window; AdamW lr {}, \
         {} requests per step, {} epochs",
        args.layers,
        args.heads,
        args.head_dim,
        args.chunks,
        args.tails,
        args.window,
        args.lr,
        args.batch,
        args.epochs
    );
    let mut outcomes = Vec::new();
    for &kind in &args.attention {
        let outcome = train(args, &data, &split, kind, &device).map_err(|e| e.to_string())?;
        outcomes.push(outcome);
    }
    println!(
        "\n{:<9} {:>8} {:>9} {:>12} {:>10} {:>10}",
        "attention", "AUC", "log loss", "s / epoch", "tokens/s", "peak RSS"
    );
    for o in &outcomes {
        let rss = o.peak_rss_kib.map_or("n/a".to_string(), |k| {
            format!("{:.0} MiB", k as f64 / 1024.0)
        });
        println!(
            "{:<9} {:>8} {:>9.4} {:>12.1} {:>10.0} {:>10}",
            o.kind.name(),
            fmt_auc(o.eval.auc),
            o.eval.log_loss,
            o.seconds_per_epoch,
            o.tokens_per_second,
            rss
        );
    }
    println!(
        "AUC and log loss on the {} held-out candidates after the last epoch; s / epoch and \
         tokens/s are training only (forward, backward, optimizer step). Peak RSS is the \
         process's VmHWM from /proc/self/status, reset before each run by writing 5 to \
         /proc/self/clear_refs (Linux); it includes the data set and memory the allocator \
         kept from an earlier run.",
        outcomes.first().map_or(0, |o| o.eval.candidates)
    );
    Ok(())
}

/// candle's CPU thread pool made this model's small ops about 4x slower on the 2-core
/// development machine (1.1 s vs 4.3 s per epoch at --users 300, the barrier spin-waits on every
/// op), so the example runs candle on one thread unless CANDLE_NUM_THREADS says otherwise.
fn limit_candle_threads() -> String {
    match std::env::var("CANDLE_NUM_THREADS") {
        Ok(n) => n,
        Err(_) => {
            // Before any candle call and before any other thread exists.
            std::env::set_var("CANDLE_NUM_THREADS", "1");
            "1".to_string()
        }
    }
}

fn main() -> ExitCode {
    let threads = limit_candle_threads();
    match parse_args(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{HELP_HEAD}\n{}", indent(ctr_data::FORMAT));
            ExitCode::SUCCESS
        }
        Ok(Command::Run(args)) => match run(&args, &threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("\nerror: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("error: {e}\n(run with --help for the flags)");
            ExitCode::from(2)
        }
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("    {l}\n")
            }
        })
        .collect()
}
