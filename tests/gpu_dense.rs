//! The dense counterpart's GPU kernels (forward and backward) against the f64 dense reference,
//! within SPEC section 8's tolerances, over awkward jagged batches (sequences longer than a
//! 64-row tile, no candidates, no user token, ties). Outputs are poisoned with NaN first. Without
//! a GPU these tests print a visible SKIPPED line and pass; with `SPARSECTR_REQUIRE_GPU=1` they
//! fail instead.

mod common;

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use proptest::prelude::*;
use sparsectr_attn::cuda::{
    BackwardMode, DenseGrads, DenseOutputs, DeviceInputs, GpuDevice, GpuElement,
};
use sparsectr_attn::workload::{self, random_tensor, Rng};
use sparsectr_attn::{
    reference, rel_l2_error, AttnConfig, Chunks, DType, Dims, Error, EvoAttention, Inputs,
    JaggedBatch, RelTemporal,
};

use common::gpu::{for_each_head_dim, gpu};

#[derive(Debug, Clone)]
struct Case {
    batch: JaggedBatch,
    heads: usize,
    utc_offset: i64,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        // Up to 150 behaviors: three 64-row tiles, and a candidate tile of its own.
        common::nonempty_batch(4, 150, 5),
        1usize..4,
        prop_oneof![Just(0i64), -43_200i64..43_200],
        any::<u64>(),
    )
        .prop_map(|(batch, heads, utc_offset, seed)| Case {
            batch,
            heads,
            utc_offset,
            seed,
        })
}

/// dQ, dK, dV on the device and dcoeffs on the host, of one backward run.
type Grads<T> = (CudaSlice<T>, CudaSlice<T>, CudaSlice<T>, Vec<f32>);

fn down<T: GpuElement>(gpu: &GpuDevice, x: &CudaSlice<T>) -> Vec<f64> {
    gpu.stream()
        .clone_dtoh(x)
        .unwrap()
        .iter()
        .map(|v| v.to_f64())
        .collect()
}

fn within(what: &str, got: &[f64], want: &[f64], tol: f64) -> Result<(), String> {
    let err = rel_l2_error(got, want);
    if err.is_finite() && err <= tol {
        Ok(())
    } else {
        Err(format!("{what}: relative L2 error {err:e} > {tol:e}"))
    }
}

/// Forward and backward of one case on the GPU against the f64 dense reference.
fn check_case<T: GpuElement>(gpu: &GpuDevice, c: &Case, head_dim: usize) -> Result<(), String> {
    let dims = Dims {
        heads: c.heads,
        head_dim,
    };
    let mut config = AttnConfig::new(1, 1);
    config.temporal = RelTemporal {
        num_time_buckets: 40,
        utc_offset: c.utc_offset,
    };
    let t = c.batch.num_tokens();
    let n = t * c.heads * head_dim;
    let mut rng = Rng::new(c.seed);
    let q: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let k: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let v: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let coeffs: Vec<f32> = random_tensor(&mut rng, c.heads * 3, 1.0);
    let d_o: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let inputs = Inputs {
        q: &q,
        k: &k,
        v: &v,
        coeffs: &coeffs,
        gates: None,
    };
    let chunks = Chunks::personalized(&c.batch, 1).unwrap();
    let attn = EvoAttention::new(&c.batch, &chunks, dims, config).unwrap();
    let want = reference::dense_forward(&attn, &inputs).unwrap();
    let want_g = reference::dense_backward(&attn, &inputs, &d_o).unwrap();
    if t == 0 {
        return Ok(());
    }
    let tol = T::DTYPE.tolerance();

    let stream = gpu.stream();
    let d_batch = gpu.upload_batch(&c.batch, &config.temporal).unwrap();
    let up = |x: &[T]| stream.clone_htod(x).unwrap();
    let (dq_in, dk_in, dv_in, do_in) = (up(&q), up(&k), up(&v), up(&d_o));
    let d_coeffs = stream.clone_htod(&coeffs).unwrap();
    let d_inputs = DeviceInputs {
        q: &dq_in,
        k: &dk_in,
        v: &dv_in,
        coeffs: &d_coeffs,
        gates: None,
    };
    let nan_t = vec![T::from_f64(f64::NAN); n];
    let mut o = up(&nan_t);
    let mut lse = stream.clone_htod(&vec![f32::NAN; t * c.heads]).unwrap();
    let out = DenseOutputs {
        o: &mut o,
        lse: &mut lse,
    };
    gpu.dense_forward_into(&d_batch, dims, &config, &d_inputs, out)
        .map_err(|e| e.to_string())?;
    within("dense O", &down(gpu, &o), &want.o, tol)?;
    let lse_got: Vec<f64> = stream
        .clone_dtoh(&lse)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    within("dense LSE", &lse_got, &want.lse, tol)?;

    let mut grads: Vec<Grads<T>> = Vec::new();
    for _ in 0..2 {
        let (mut dq, mut dk, mut dv) = (up(&nan_t), up(&nan_t), up(&nan_t));
        let mut dcoeffs = stream.clone_htod(&vec![f32::NAN; c.heads * 3]).unwrap();
        let g = DenseGrads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
            dcoeffs: &mut dcoeffs,
        };
        gpu.dense_backward_into(
            &d_batch,
            dims,
            &config,
            &d_inputs,
            &o,
            &lse,
            &do_in,
            BackwardMode::Deterministic,
            g,
        )
        .map_err(|e| e.to_string())?;
        let dc = stream.clone_dtoh(&dcoeffs).unwrap();
        grads.push((dq, dk, dv, dc));
    }
    let (dq, dk, dv, dc) = &grads[0];
    within("dense dQ", &down(gpu, dq), &want_g.dq, tol)?;
    within("dense dK", &down(gpu, dk), &want_g.dk, tol)?;
    within("dense dV", &down(gpu, dv), &want_g.dv, tol)?;
    dense_dcoeffs(dc, &want_g.dcoeffs, tol)?;
    // Run to run: the same bits.
    let (dq2, dk2, dv2, dc2) = &grads[1];
    let bits = |x: &CudaSlice<T>| {
        stream
            .clone_dtoh(x)
            .unwrap()
            .iter()
            .map(|v| v.to_f64().to_bits())
            .collect::<Vec<_>>()
    };
    if bits(dq) != bits(dq2) || bits(dk) != bits(dk2) || bits(dv) != bits(dv2) || dc != dc2 {
        return Err("dense backward: two runs gave different bits".into());
    }
    Ok(())
}

#[test]
fn gpu_dense_matches_reference_f32() {
    for_each_head_dim(
        "gpu_dense_matches_reference_f32",
        24,
        case,
        check_case::<f32>,
    );
}

#[test]
fn gpu_dense_matches_reference_f16() {
    for_each_head_dim(
        "gpu_dense_matches_reference_f16",
        24,
        case,
        check_case::<f16>,
    );
}

#[test]
fn gpu_dense_matches_reference_bf16() {
    for_each_head_dim(
        "gpu_dense_matches_reference_bf16",
        24,
        case,
        check_case::<bf16>,
    );
}

/// dcoeffs within `tol` relative to max(||ref||, 1e-3): where a softmax's keys share their
/// features, the reference cancels to ~1e-16 while the kernels' f32 sums leave ~1e-8. (The
/// sparse tests' floor, `common::gpu::compare_dcoeffs`, is per element and looser.)
fn dense_dcoeffs(got: &[f32], want: &[f64], tol: f64) -> Result<(), String> {
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, b)| (f64::from(a) - b) * (f64::from(a) - b))
        .sum::<f64>()
        .sqrt();
    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    if got.len() == want.len() && diff.is_finite() && diff <= tol * norm.max(1e-3) {
        Ok(())
    } else {
        Err(format!(
            "dense dcoeffs: error {diff:e} against norm {norm:e} (tolerance {tol:e})"
        ))
    }
}

/// A BENCH.md-like batch (sessions, about a thousand behaviors per user) through the host calls.
#[test]
fn gpu_dense_realistic_batch() {
    let Some(gpu) = gpu("gpu_dense_realistic_batch") else {
        return;
    };
    let wl = workload::CTR_BASE;
    let batch = wl.batch(3, 1024, 1 << 12).unwrap();
    let n = batch.num_tokens() * wl.heads * wl.head_dim;
    let mut rng = Rng::new(9);
    let q: Vec<bf16> = random_tensor(&mut rng, n, 1.0);
    let k: Vec<bf16> = random_tensor(&mut rng, n, 1.0);
    let v: Vec<bf16> = random_tensor(&mut rng, n, 1.0);
    let d_o: Vec<bf16> = random_tensor(&mut rng, n, 1.0);
    let coeffs: Vec<f32> = random_tensor(&mut rng, wl.heads * 3, 1.0);
    let inputs = Inputs {
        q: &q,
        k: &k,
        v: &v,
        coeffs: &coeffs,
        gates: None,
    };
    let chunks = Chunks::personalized(&batch, 1).unwrap();
    let attn = EvoAttention::new(&batch, &chunks, wl.dims(), wl.config()).unwrap();
    let got = gpu
        .dense_forward_host(&batch, wl.dims(), &wl.config(), &inputs)
        .unwrap();
    let want = reference::dense_forward(&attn, &inputs).unwrap();
    let o: Vec<f64> = got.o.iter().map(|x| x.to_f64()).collect();
    let err = rel_l2_error(&o, &want.o);
    let tol = DType::BF16.tolerance();
    assert!(err.is_finite() && err <= tol, "bf16 dense O error {err:e}");
    let g = gpu
        .dense_backward_host(&batch, wl.dims(), &wl.config(), &inputs, &d_o)
        .unwrap();
    let want_g = reference::dense_backward(&attn, &inputs, &d_o).unwrap();
    for (name, got, want) in [
        ("dq", &g.dq, &want_g.dq),
        ("dk", &g.dk, &want_g.dk),
        ("dv", &g.dv, &want_g.dv),
    ] {
        let got: Vec<f64> = got.iter().map(|x| x.to_f64()).collect();
        let err = rel_l2_error(&got, want);
        assert!(
            err.is_finite() && err <= tol,
            "bf16 dense {name} error {err:e}"
        );
    }
    if let Err(e) = dense_dcoeffs(&g.dcoeffs, &want_g.dcoeffs, tol) {
        panic!("bf16 realistic batch: {e}");
    }
}

/// Bad calls are errors that name the field, before any launch.
#[test]
fn gpu_dense_bad_calls_are_errors() {
    let Some(gpu) = gpu("gpu_dense_bad_calls_are_errors") else {
        return;
    };
    let batch = workload::CTR_SMALL.batch(5, 64, 512).unwrap();
    let d_batch = gpu.upload_batch(&batch, &RelTemporal::default()).unwrap();
    let dims = Dims {
        heads: 2,
        head_dim: 32,
    };
    let n = batch.num_tokens() * 2 * 32;
    let x = gpu.stream().clone_htod(&vec![0.5f32; n]).unwrap();
    let short = gpu.stream().clone_htod(&vec![0.5f32; n - 1]).unwrap();
    let coeffs = gpu.stream().clone_htod(&[0.1f32; 6]).unwrap();
    let config = AttnConfig::new(1, 4);
    let inputs = DeviceInputs {
        q: &x,
        k: &x,
        v: &x,
        coeffs: &coeffs,
        gates: None,
    };
    let bad = DeviceInputs {
        v: &short,
        ..inputs
    };
    let r = gpu.dense_forward(&d_batch, dims, &config, &bad);
    assert!(matches!(r, Err(Error::Length { field: "v", .. })), "{r:?}");
    // The sparse LSE has three entries per row; the dense one has one.
    let mut o = gpu.stream().clone_htod(&vec![0.0f32; n]).unwrap();
    let mut lse3 = gpu
        .stream()
        .clone_htod(&vec![0.0f32; batch.num_tokens() * 2 * 3])
        .unwrap();
    let out = DenseOutputs {
        o: &mut o,
        lse: &mut lse3,
    };
    let r = gpu.dense_forward_into(&d_batch, dims, &config, &inputs, out);
    assert!(
        matches!(r, Err(Error::Length { field: "lse", .. })),
        "{r:?}"
    );
    let mut other = config;
    other.temporal.utc_offset = 60;
    let r = gpu.dense_forward(&d_batch, dims, &other, &inputs);
    assert!(
        matches!(
            r,
            Err(Error::DeviceMismatch {
                field: "utc_offset",
                ..
            })
        ),
        "{r:?}"
    );
}

/// Every device buffer of `dense_backward_into` one element short is an `Error::Length` naming
/// it, its length and the expected one, and no kernel runs: the gradients keep their poison.
#[test]
fn gpu_dense_backward_short_buffers_are_errors_before_any_launch() {
    let Some(gpu) = gpu("gpu_dense_backward_short_buffers_are_errors_before_any_launch") else {
        return;
    };
    let wl = workload::CTR_SMALL;
    let batch = wl.batch(5, 64, 512).unwrap();
    let (dims, config) = (wl.dims(), wl.config());
    let t = batch.num_tokens();
    let rows = t * dims.heads * dims.head_dim;
    let stream = gpu.stream();
    let d_batch = gpu.upload_batch(&batch, &config.temporal).unwrap();
    for (field, expected) in [
        ("q", rows),
        ("k", rows),
        ("v", rows),
        ("coeffs", dims.heads * 3),
        ("o", rows),
        ("lse", t * dims.heads),
        ("d_o", rows),
        ("dq", rows),
        ("dk", rows),
        ("dv", rows),
        ("dcoeffs", dims.heads * 3),
    ] {
        let len = |f: &str, n: usize| if f == field { n - 1 } else { n };
        let b16 = |f: &str, n: usize, x: bf16| stream.clone_htod(&vec![x; len(f, n)]).unwrap();
        let b32 = |f: &str, n: usize, x: f32| stream.clone_htod(&vec![x; len(f, n)]).unwrap();
        let one = bf16::ONE;
        let (q, k, v) = (
            b16("q", rows, one),
            b16("k", rows, one),
            b16("v", rows, one),
        );
        let coeffs = b32("coeffs", dims.heads * 3, 0.5);
        let inputs = DeviceInputs {
            q: &q,
            k: &k,
            v: &v,
            coeffs: &coeffs,
            gates: None,
        };
        let (o, d_o) = (b16("o", rows, one), b16("d_o", rows, one));
        let lse = b32("lse", t * dims.heads, 0.0);
        let (mut dq, mut dk, mut dv) = (
            b16("dq", rows, bf16::NAN),
            b16("dk", rows, bf16::NAN),
            b16("dv", rows, bf16::NAN),
        );
        let mut dcoeffs = b32("dcoeffs", dims.heads * 3, f32::NAN);
        let grads = DenseGrads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
            dcoeffs: &mut dcoeffs,
        };
        let r = gpu.dense_backward_into(
            &d_batch,
            dims,
            &config,
            &inputs,
            &o,
            &lse,
            &d_o,
            BackwardMode::Fast,
            grads,
        );
        let down = common::gpu::down_f64::<bf16>;
        let outputs = [
            down(gpu, &dq),
            down(gpu, &dk),
            down(gpu, &dv),
            common::gpu::down_f64(gpu, &dcoeffs),
        ];
        common::gpu::assert_one_short(r, field, expected, &outputs);
    }
}
