//! Writes a workload batch, its chunks, random inputs and this crate's forward output to a
//! folder, for the PyTorch baselines (`benches/torch_baselines.py`) to check their EvoAttention
//! against before timing it, and for the CPU emulation of the CUDA kernels
//! (`kernels/emu/run_kernels.cpp`, driven by `tests/kernel_emulation.rs`).
//!
//! ```text
//! cargo run --release --example export_batch -- --out DIR [--workload ctr-small] [--len 64]
//!     [--tokens 2048] [--seed 0] [--dtype bf16|f16|f32] [--cpu] [--grads] [--dense]
//! ```
//!
//! Files (little-endian, row-major): `meta.json` (sizes and parameters); `seq_offsets`,
//! `num_candidates`, `timestamps`, `chunk_offsets`, `chunk_lengths` as i64; `q`, `k`, `v`
//! (`[T, H, D]`), `gates` (`[T, H, 3]`), `coeffs` (`[H, 3]`), `o` (`[T, H, D]`) and `lse`
//! (`[T, H, 3]`) as f32. Inputs are drawn in `--dtype` and stored widened to f32 (exactly).
//! `o` comes from the GPU forward when a GPU answers (unless `--cpu`), else from the f64
//! reference, which also writes `o_branch` (`[T, H, 3, D]`, each branch's output before gating);
//! `meta.json` says which. `meta.json` also says how the gates are passed
//! (`gates_mode`: `native` here; `f32`, or `none` with a `gates` file of ones, from other writers)
//! and whether the chunks are the `personalized` ones of `num_chunks` or `supplied` by the caller.
//!
//! With `--grads` it also writes a random upstream gradient `d_o` (`[T, H, D]`, drawn in
//! `--dtype`) and the f64 reference backward for it: `dq`, `dk`, `dv` (`[T, H, D]`), `dcoeffs`
//! (`[H, 3]`) and `dgates` (`[T, H, 3]`), as f32; `meta.json` gets `"grads":true`.
//!
//! With `--dense` it also writes the f64 reference of the dense counterpart (SPEC section 5):
//! `dense_o` (`[T, H, D]`) and `dense_lse` (`[T, H]`), and with `--grads` `dense_dq`, `dense_dk`,
//! `dense_dv` and `dense_dcoeffs`; `meta.json` gets `"dense":true`.

use std::fs;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use sparsectr_attn::cuda::{GpuDevice, GpuElement};
use sparsectr_attn::workload::{self, Rng, Workload, CTR_SMALL};
use sparsectr_attn::{
    reference, AttnConfig, Chunks, DType, Dims, Element, EvoAttention, Gates, Inputs, JaggedBatch,
    NUM_BRANCHES,
};

struct Args {
    out: PathBuf,
    workload: Workload,
    len: usize,
    tokens: usize,
    seed: u64,
    dtype: DType,
    cpu: bool,
    grads: bool,
    dense: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        out: PathBuf::new(),
        workload: CTR_SMALL,
        len: 64,
        tokens: 2048,
        seed: 0,
        dtype: DType::BF16,
        cpu: false,
        grads: false,
        dense: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => a.out = PathBuf::from(value()?),
            "--workload" => {
                let name = value()?;
                a.workload = Workload::by_name(&name).ok_or(format!("unknown workload {name}"))?
            }
            "--len" => a.len = value()?.parse().map_err(|e| format!("--len: {e}"))?,
            "--tokens" => a.tokens = value()?.parse().map_err(|e| format!("--tokens: {e}"))?,
            "--seed" => a.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--dtype" => {
                a.dtype = match value()?.as_str() {
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    "f32" => DType::F32,
                    other => return Err(format!("--dtype {other}: expected bf16, f16 or f32")),
                }
            }
            "--cpu" => a.cpu = true,
            "--grads" => a.grads = true,
            "--dense" => a.dense = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.out.as_os_str().is_empty() {
        return Err("--out DIR is required".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let result = match args.dtype {
        DType::BF16 => run::<bf16>(&args),
        DType::F16 => run::<f16>(&args),
        DType::F32 => run::<f32>(&args),
        DType::F64 => Err("f64 is not a storage dtype here".into()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run<T: GpuElement>(args: &Args) -> Result<(), String> {
    let wl = args.workload;
    let batch = wl
        .batch(args.seed, args.len, args.tokens)
        .map_err(|e| e.to_string())?;
    let chunks = Chunks::personalized(&batch, wl.num_chunks).map_err(|e| e.to_string())?;
    let t = batch.num_tokens();
    let n = t * wl.heads * wl.head_dim;
    let mut rng = Rng::new(args.seed ^ 0xE4_0127);
    let q: Vec<T> = workload::random_tensor(&mut rng, n, 1.0);
    let k: Vec<T> = workload::random_tensor(&mut rng, n, 1.0);
    let v: Vec<T> = workload::random_tensor(&mut rng, n, 1.0);
    let gates: Vec<T> = workload::uniform_tensor(&mut rng, t * wl.heads * NUM_BRANCHES, 0.5, 1.5);
    let coeffs: Vec<f32> = workload::random_tensor(&mut rng, wl.heads * 3, 0.5);
    // Drawn after everything else, so that the other tensors do not depend on `--grads`.
    let d_o: Option<Vec<T>> = args
        .grads
        .then(|| workload::random_tensor(&mut rng, n, 1.0));
    let inputs = Inputs {
        q: &q,
        k: &k,
        v: &v,
        coeffs: &coeffs,
        gates: Some(Gates::Native(&gates)),
    };

    let gpu = if args.cpu {
        None
    } else {
        GpuDevice::new(0).ok()
    };
    let output = match &gpu {
        Some(gpu) => {
            let out = gpu
                .forward_host(&batch, &chunks, wl.dims(), &wl.config(), &inputs)
                .map_err(|e| e.to_string())?;
            let name = gpu.name().unwrap_or_default();
            Some(Output {
                o: out.o.iter().map(|x| x.to_f64() as f32).collect(),
                lse: out.lse,
                o_branch: None,
                source: format!("gpu {name}"),
            })
        }
        None => None,
    };
    let export = Export {
        name: wl.name,
        batch: &batch,
        chunks: &chunks,
        personalized: true,
        num_chunks: wl.num_chunks,
        dims: wl.dims(),
        config: wl.config(),
        inputs,
        d_o: d_o.as_deref(),
        dense: args.dense,
    };
    let source = write_folder(&args.out, &export, output)?;
    println!(
        "wrote {} ({} users, {t} tokens, output from {source}{})",
        args.out.display(),
        batch.num_seqs(),
        if args.grads {
            ", reference gradients"
        } else {
            ""
        }
    );
    Ok(())
}

/// Everything a folder describes.
pub struct Export<'a, T> {
    /// Recorded as `workload` in meta.json.
    pub name: &'a str,
    pub batch: &'a JaggedBatch,
    pub chunks: &'a Chunks,
    /// `chunks` are `Chunks::personalized(batch, num_chunks)` (else supplied by the caller).
    pub personalized: bool,
    /// `P`.
    pub num_chunks: usize,
    pub dims: Dims,
    pub config: AttnConfig,
    pub inputs: Inputs<'a, T>,
    /// Upstream gradient: with it the folder also holds the reference backward.
    pub d_o: Option<&'a [T]>,
    /// Also write the dense counterpart's reference (forward, and backward with `d_o`).
    pub dense: bool,
}

/// A forward output computed elsewhere (the GPU), written instead of the reference's.
pub struct Output {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
    /// `[T, H, 3, D]`: each branch's output before gating, where known (written as `o_branch`).
    pub o_branch: Option<Vec<f32>>,
    pub source: String,
}

fn write_raw<T: bytemuck::Pod>(dir: &Path, name: &str, data: &[T]) -> Result<(), String> {
    fs::write(dir.join(name), bytemuck::cast_slice(data)).map_err(|e| format!("{name}: {e}"))
}

fn narrow(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Writes the folder; the forward output is `output` or, without it, the f64 reference's.
/// Returns where the output came from.
pub fn write_folder<T: Element>(
    dir: &Path,
    e: &Export<'_, T>,
    output: Option<Output>,
) -> Result<String, String> {
    let batch = e.batch;
    let chunks = e.chunks;
    let attn = EvoAttention::new(batch, chunks, e.dims, e.config).map_err(|err| err.to_string())?;
    let t = batch.num_tokens();
    let heads = e.dims.heads;
    let output = match output {
        Some(out) => out,
        None => {
            let out = reference::forward(&attn, &e.inputs).map_err(|err| err.to_string())?;
            Output {
                o: narrow(&out.o),
                lse: narrow(&out.lse),
                o_branch: Some(narrow(&out.o_branch)),
                source: "cpu reference (f64)".into(),
            }
        }
    };
    let widen = |x: &[T]| x.iter().map(|v| v.to_f64() as f32).collect::<Vec<f32>>();
    let (gates, gates_mode) = match e.inputs.gates {
        Some(Gates::Native(g)) => (widen(g), "native"),
        Some(Gates::F32(g)) => (g.to_vec(), "f32"),
        None => (vec![1.0f32; t * heads * NUM_BRANCHES], "none"),
    };

    fs::create_dir_all(dir).map_err(|err| err.to_string())?;
    let as_i64 = |x: &[usize]| x.iter().map(|&v| v as i64).collect::<Vec<i64>>();
    write_raw(dir, "seq_offsets", &as_i64(batch.seq_offsets()))?;
    write_raw(dir, "num_candidates", &as_i64(batch.num_candidates()))?;
    write_raw(dir, "timestamps", batch.timestamps())?;
    write_raw(dir, "chunk_offsets", &as_i64(chunks.chunk_offsets()))?;
    let lengths: Vec<usize> = (0..chunks.num_chunks())
        .map(|c| chunks.span(c).len())
        .collect();
    write_raw(dir, "chunk_lengths", &as_i64(&lengths))?;
    write_raw(dir, "q", &widen(e.inputs.q))?;
    write_raw(dir, "k", &widen(e.inputs.k))?;
    write_raw(dir, "v", &widen(e.inputs.v))?;
    write_raw(dir, "gates", &gates)?;
    write_raw(dir, "coeffs", e.inputs.coeffs)?;
    write_raw(dir, "o", &output.o)?;
    write_raw(dir, "lse", &output.lse)?;
    if let Some(o_branch) = &output.o_branch {
        write_raw(dir, "o_branch", o_branch)?;
    }
    if let Some(d_o) = e.d_o {
        let g = reference::backward(&attn, &e.inputs, d_o).map_err(|err| err.to_string())?;
        write_raw(dir, "d_o", &widen(d_o))?;
        write_raw(dir, "dq", &narrow(&g.dq))?;
        write_raw(dir, "dk", &narrow(&g.dk))?;
        write_raw(dir, "dv", &narrow(&g.dv))?;
        write_raw(dir, "dcoeffs", &narrow(&g.dcoeffs))?;
        write_raw(dir, "dgates", &narrow(&g.dgates))?;
    }
    if e.dense {
        let f = reference::dense_forward(&attn, &e.inputs).map_err(|err| err.to_string())?;
        write_raw(dir, "dense_o", &narrow(&f.o))?;
        write_raw(dir, "dense_lse", &narrow(&f.lse))?;
        if let Some(d_o) = e.d_o {
            let g =
                reference::dense_backward(&attn, &e.inputs, d_o).map_err(|err| err.to_string())?;
            write_raw(dir, "dense_dq", &narrow(&g.dq))?;
            write_raw(dir, "dense_dk", &narrow(&g.dk))?;
            write_raw(dir, "dense_dv", &narrow(&g.dv))?;
            write_raw(dir, "dense_dcoeffs", &narrow(&g.dcoeffs))?;
        }
    }
    let config = e.config;
    let meta = format!(
        "{{\"workload\":{:?},\"num_seqs\":{},\"num_tokens\":{t},\"num_chunks_total\":{},\
         \"heads\":{},\"head_dim\":{},\"num_chunks\":{},\"tail_tokens\":{},\"window\":{},\
         \"num_time_buckets\":{},\"utc_offset\":{},\"scale\":{},\"has_user_token\":{},\
         \"dtype\":{:?},\"output_source\":{:?},\"gates_mode\":{gates_mode:?},\
         \"chunks\":{:?},\"grads\":{},\"dense\":{}}}\n",
        e.name,
        batch.num_seqs(),
        chunks.num_chunks(),
        heads,
        e.dims.head_dim,
        e.num_chunks,
        config.tail_tokens,
        config.window,
        config.temporal.num_time_buckets,
        config.temporal.utc_offset,
        attn.scale(),
        batch.has_user_token(),
        T::DTYPE.name(),
        output.source,
        if e.personalized {
            "personalized"
        } else {
            "supplied"
        },
        e.d_o.is_some(),
        e.dense,
    );
    fs::write(dir.join("meta.json"), meta).map_err(|err| err.to_string())?;
    Ok(output.source)
}
