//! The candle ops' CUDA path against their CPU path (feature `candle-cuda`): forward outputs and
//! the gradients candle's autograd produces, on awkward batches, every head dim, f32/f16/bf16.
//! Without a GPU these print SKIPPED (and fail under `SPARSECTR_REQUIRE_GPU=1`).
#![cfg(feature = "candle-cuda")]

mod common;

use std::io::Write;
use std::sync::{Arc, OnceLock};

use candle_core::{DType as CDType, Device, Tensor, Var, WithDType};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sparsectr_attn::candle_op::{dense_attention, evo_attention, EvoLayout};
use sparsectr_attn::workload::{random_tensor, uniform_tensor, Rng};
use sparsectr_attn::{
    rel_l2_error, AttnConfig, Chunks, DType, Dims, Element, JaggedBatch, SUPPORTED_HEAD_DIMS,
};

/// candle's CUDA device 0, or `None` after a SKIPPED line (a panic under
/// `SPARSECTR_REQUIRE_GPU=1`).
fn cuda(test: &str) -> Option<Device> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    match DEV.get_or_init(|| Device::new_cuda(0).map_err(|e| e.to_string())) {
        Ok(dev) => Some(dev.clone()),
        Err(e) => {
            if std::env::var("SPARSECTR_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("SPARSECTR_REQUIRE_GPU=1 but no GPU: {e}");
            }
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no GPU ({e})");
            None
        }
    }
}

/// Unit roundoff of a dtype.
fn roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        DType::F64 => f64::EPSILON / 2.0,
    }
}

/// The CUDA path against the CPU path. The CPU path is the f64 reference rounded once to the
/// output dtype, within `u` of it (`u` the unit roundoff), and the CUDA path's outputs, rounded
/// to the dtype too, are within SPEC section 8's `tol` of the reference (the kernels' own tests
/// hold them to it), so the two are within `tol + u` of each other. NaN never passes.
fn compare(name: &str, gpu: &Tensor, cpu: &Tensor, dtype: DType) -> Result<(), String> {
    if gpu.dims() != cpu.dims() || gpu.dtype() != cpu.dtype() {
        return Err(format!(
            "{name}: GPU {:?} {:?} vs CPU {:?} {:?}",
            gpu.dims(),
            gpu.dtype(),
            cpu.dims(),
            cpu.dtype()
        ));
    }
    let got = to_f64(gpu);
    let want = to_f64(cpu);
    let tol = dtype.tolerance() + roundoff(dtype);
    if let Some(zero) = common::gpu::zero_reference(name, &got, &want, tol) {
        return zero;
    }
    let err = rel_l2_error(&got, &want);
    if err.is_finite() && err <= tol {
        Ok(())
    } else {
        Err(format!("{name}: relative L2 error {err:e} > {tol:e}"))
    }
}

/// dcoeffs on the CUDA path against the CPU path, with `common::gpu::compare_dcoeffs`'s floor
/// and the tolerance of `compare`.
fn compare_dcoeffs(gpu: &Tensor, cpu: &Tensor, dtype: DType) -> Result<(), String> {
    let tol = dtype.tolerance() + roundoff(dtype);
    common::gpu::compare_dcoeffs(&to_f64(gpu), &to_f64(cpu), tol)
}

/// The `[T, 3, H, D]` gradient of qkv compared as dQ, dK and dV, each against its own norm: a
/// small one's error does not hide in the others'.
fn compare_dqkv(gpu: &Tensor, cpu: &Tensor, dtype: DType) -> Result<(), String> {
    for (i, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
        let part = |t: &Tensor| {
            t.narrow(1, i, 1)
                .and_then(|x| x.contiguous())
                .map_err(|e| format!("{name}: {e}"))
        };
        compare(name, &part(gpu)?, &part(cpu)?, dtype)?;
    }
    Ok(())
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(CDType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("tensor to host")
}

/// One case's host data: `[T, 3, H, D]` QKV, `[H, 3]` coeffs, `[T, H, 3]` gates of both dtypes,
/// and `R` `[T, H, D]`, the gradient that `L = sum(O * R)` sends to O.
struct Data<T> {
    qkv: Vec<T>,
    coeffs: Vec<f32>,
    gates: Vec<T>,
    gates_f32: Vec<f32>,
    r: Vec<T>,
}

impl<T: Element> Data<T> {
    fn new(seed: u64, t: usize, dims: Dims) -> Self {
        let mut rng = Rng::new(seed);
        let n = t * dims.heads * dims.head_dim;
        Data {
            qkv: random_tensor(&mut rng, 3 * n, 1.0),
            coeffs: random_tensor(&mut rng, dims.heads * 3, 1.0),
            gates: uniform_tensor(&mut rng, t * dims.heads * 3, -0.5, 1.5),
            gates_f32: uniform_tensor(&mut rng, t * dims.heads * 3, -0.5, 1.5),
            r: random_tensor(&mut rng, n, 1.0),
        }
    }
}

/// The sparse op's output and gradients (qkv, coeffs, gates) on `dev`.
fn evo_run<T: Element + WithDType>(
    data: &Data<T>,
    layout: &Arc<EvoLayout>,
    f32_gates: bool,
    dev: &Device,
) -> candle_core::Result<[Tensor; 4]> {
    let (t, dims) = (layout.num_tokens(), layout.dims());
    let qkv = Var::from_tensor(&Tensor::from_vec(
        data.qkv.clone(),
        (t, 3, dims.heads, dims.head_dim),
        dev,
    )?)?;
    let coeffs = Var::from_tensor(&Tensor::from_vec(
        data.coeffs.clone(),
        (dims.heads, 3),
        dev,
    )?)?;
    let gates = if f32_gates {
        Var::from_tensor(&Tensor::from_vec(
            data.gates_f32.clone(),
            (t, dims.heads, 3),
            dev,
        )?)?
    } else {
        Var::from_tensor(&Tensor::from_vec(
            data.gates.clone(),
            (t, dims.heads, 3),
            dev,
        )?)?
    };
    let o = evo_attention(
        qkv.as_tensor(),
        coeffs.as_tensor(),
        gates.as_tensor(),
        layout,
    )?;
    let r = Tensor::from_vec(data.r.clone(), (t, dims.heads, dims.head_dim), dev)?;
    let loss = (o.to_dtype(CDType::F64)? * r.to_dtype(CDType::F64)?)?.sum_all()?;
    let grads = loss.backward()?;
    let grad = |v: &Var| {
        grads
            .get(v)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
    };
    Ok([o, grad(&qkv)?, grad(&coeffs)?, grad(&gates)?])
}

fn evo_case<T: Element + WithDType>(
    dev: &Device,
    batch: &JaggedBatch,
    (p, m, w): (usize, usize, usize),
    head_dim: usize,
    seed: u64,
    f32_gates: bool,
) -> Result<(), String> {
    let dims = Dims { heads: 2, head_dim };
    let chunks = Chunks::personalized(batch, p).map_err(|e| e.to_string())?;
    let layout = Arc::new(
        EvoLayout::new(batch.clone(), chunks, dims, AttnConfig::new(m, w))
            .map_err(|e| e.to_string())?,
    );
    let data = Data::<T>::new(seed, batch.num_tokens(), dims);
    let cpu = evo_run(&data, &layout, f32_gates, &Device::Cpu).map_err(|e| e.to_string())?;
    let gpu = evo_run(&data, &layout, f32_gates, dev).map_err(|e| format!("CUDA path: {e}"))?;
    let dtype = <T as Element>::DTYPE;
    compare("O", &gpu[0], &cpu[0], dtype)?;
    compare_dqkv(&gpu[1], &cpu[1], dtype)?;
    compare_dcoeffs(&gpu[2], &cpu[2], dtype)?;
    compare("dgates", &gpu[3], &cpu[3], dtype)
}

fn evo_matches_cpu<T: Element + WithDType>(test: &str, default_cases: u32) {
    let Some(dev) = cuda(test) else {
        return;
    };
    for &head_dim in SUPPORTED_HEAD_DIMS {
        TestRunner::new(Config::with_cases(common::gpu::cases(default_cases)))
            .run(
                &(
                    // candle cannot hold a CUDA tensor of no elements (every op allocates, and a
                    // zero-byte cuMemAlloc is an error), so empty batches are covered by
                    // `cuda_op_takes_a_zero_token_view` instead.
                    common::nonempty_batch(4, 40, 4),
                    (1usize..6, 1usize..4, 1usize..9),
                    any::<u64>(),
                    any::<bool>(),
                ),
                |(batch, pmw, seed, f32_gates)| {
                    evo_case::<T>(&dev, &batch, pmw, head_dim, seed, f32_gates)
                        .map_err(TestCaseError::fail)
                },
            )
            .unwrap();
    }
}

#[test]
fn cuda_evo_op_matches_cpu_f32() {
    evo_matches_cpu::<f32>("cuda_evo_op_matches_cpu_f32", 12);
}

#[test]
fn cuda_evo_op_matches_cpu_f16() {
    evo_matches_cpu::<f16>("cuda_evo_op_matches_cpu_f16", 8);
}

#[test]
fn cuda_evo_op_matches_cpu_bf16() {
    evo_matches_cpu::<bf16>("cuda_evo_op_matches_cpu_bf16", 8);
}

/// The dense op's output and gradients (qkv, coeffs) on `dev`.
fn dense_run<T: Element + WithDType>(
    data: &Data<T>,
    layout: &Arc<EvoLayout>,
    dev: &Device,
) -> candle_core::Result<[Tensor; 3]> {
    let (t, dims) = (layout.num_tokens(), layout.dims());
    let qkv = Var::from_tensor(&Tensor::from_vec(
        data.qkv.clone(),
        (t, 3, dims.heads, dims.head_dim),
        dev,
    )?)?;
    let coeffs = Var::from_tensor(&Tensor::from_vec(
        data.coeffs.clone(),
        (dims.heads, 3),
        dev,
    )?)?;
    let o = dense_attention(qkv.as_tensor(), coeffs.as_tensor(), layout)?;
    let r = Tensor::from_vec(data.r.clone(), (t, dims.heads, dims.head_dim), dev)?;
    let grads = (o.to_dtype(CDType::F64)? * r.to_dtype(CDType::F64)?)?
        .sum_all()?
        .backward()?;
    let qkv_grad = grads.get(&qkv).cloned().expect("qkv gradient");
    let coeffs_grad = grads.get(&coeffs).cloned().expect("coeffs gradient");
    Ok([o, qkv_grad, coeffs_grad])
}

fn dense_matches_cpu<T: Element + WithDType>(test: &str) {
    let Some(dev) = cuda(test) else {
        return;
    };
    let mut rng = Rng::new(11);
    // Sequences of 26..33, 75..99 and 51..67 tokens: inside, across and just past the dense
    // kernels' 64-row tiles.
    for (seqs, behaviors) in [(3, 30), (1, 96), (2, 64)] {
        let batch =
            sparsectr_attn::workload::generate_batch(&mut rng, seqs, behaviors, 2, true).unwrap();
        for &head_dim in SUPPORTED_HEAD_DIMS {
            let dims = Dims { heads: 3, head_dim };
            let chunks = Chunks::personalized(&batch, 3).unwrap();
            let layout = Arc::new(
                EvoLayout::new(batch.clone(), chunks, dims, AttnConfig::new(1, 4)).unwrap(),
            );
            let data = Data::<T>::new(rng.next_u64(), batch.num_tokens(), dims);
            let cpu = dense_run(&data, &layout, &Device::Cpu).unwrap();
            let gpu = dense_run(&data, &layout, &dev).unwrap();
            let check = || -> Result<(), String> {
                compare("O", &gpu[0], &cpu[0], <T as Element>::DTYPE)?;
                compare_dqkv(&gpu[1], &cpu[1], <T as Element>::DTYPE)?;
                compare_dcoeffs(&gpu[2], &cpu[2], <T as Element>::DTYPE)
            };
            if let Err(e) = check() {
                panic!("{test}: T={} D={head_dim}: {e}", batch.num_tokens());
            }
        }
    }
}

#[test]
fn cuda_dense_op_matches_cpu_f32() {
    dense_matches_cpu::<f32>("cuda_dense_op_matches_cpu_f32");
}

#[test]
fn cuda_dense_op_matches_cpu_bf16() {
    dense_matches_cpu::<bf16>("cuda_dense_op_matches_cpu_bf16");
}

/// A batch of no tokens reaches the op on CUDA only as an empty view of a larger tensor; the op
/// returns `[0, H, D]` for it instead of asking CUDA for zero bytes.
#[test]
fn cuda_op_takes_a_zero_token_view() {
    let test = "cuda_op_takes_a_zero_token_view";
    let Some(dev) = cuda(test) else {
        return;
    };
    let dims = Dims {
        heads: 2,
        head_dim: 32,
    };
    let batch = JaggedBatch::new(vec![0, 0], vec![0], false, vec![]).unwrap();
    let chunks = Chunks::personalized(&batch, 2).unwrap();
    let layout = Arc::new(EvoLayout::new(batch, chunks, dims, AttnConfig::new(1, 4)).unwrap());
    let run = || -> candle_core::Result<Vec<usize>> {
        let qkv = Tensor::ones((1, 3, 2, 32), CDType::BF16, &dev)?.narrow(0, 0, 0)?;
        let gates = Tensor::ones((1, 2, 3), CDType::BF16, &dev)?.narrow(0, 0, 0)?;
        let coeffs = Tensor::ones((2, 3), CDType::F32, &dev)?;
        let o = evo_attention(&qkv, &coeffs, &gates, &layout)?;
        let d = dense_attention(&qkv, &coeffs, &layout)?;
        assert_eq!(d.dims(), o.dims());
        Ok(o.dims().to_vec())
    };
    assert_eq!(run().unwrap(), vec![0, 2, 32]);
}

/// Inputs that are views with an offset (a `narrow` of a larger tensor) give the same bits as
/// whole tensors, and one layout serves two calls (its upload is reused).
#[test]
fn cuda_views_with_offsets_give_the_same_bits() {
    let test = "cuda_views_with_offsets_give_the_same_bits";
    let Some(dev) = cuda(test) else {
        return;
    };
    let mut rng = Rng::new(3);
    let batch = sparsectr_attn::workload::generate_batch(&mut rng, 3, 25, 2, true).unwrap();
    let dims = Dims {
        heads: 2,
        head_dim: 64,
    };
    let chunks = Chunks::personalized(&batch, 3).unwrap();
    let layout =
        Arc::new(EvoLayout::new(batch.clone(), chunks, dims, AttnConfig::new(1, 4)).unwrap());
    let t = batch.num_tokens();
    let data = Data::<f32>::new(7, t + 1, dims);
    let big_qkv = Tensor::from_vec(data.qkv.clone(), (t + 1, 3, 2, 64), &dev).unwrap();
    let big_gates = Tensor::from_vec(data.gates.clone(), (t + 1, 2, 3), &dev).unwrap();
    let coeffs = Tensor::from_vec(data.coeffs.clone(), (2, 3), &dev).unwrap();
    let (qkv_view, gates_view) = (
        big_qkv.narrow(0, 1, t).unwrap(),
        big_gates.narrow(0, 1, t).unwrap(),
    );
    let o_view = evo_attention(&qkv_view, &coeffs, &gates_view, &layout).unwrap();
    let o_whole = evo_attention(
        &qkv_view.copy().unwrap(),
        &coeffs,
        &gates_view.copy().unwrap(),
        &layout,
    )
    .unwrap();
    assert_eq!(to_f64(&o_view), to_f64(&o_whole), "sparse O, view vs whole");
    let d_view = dense_attention(&qkv_view, &coeffs, &layout).unwrap();
    let d_whole = dense_attention(&qkv_view.copy().unwrap(), &coeffs, &layout).unwrap();
    assert_eq!(to_f64(&d_view), to_f64(&d_whole), "dense O, view vs whole");
}

/// A call on untracked tensors (inference: nothing kept for a backward, no branch outputs
/// written) gives the bits of the same call on `Var`s, for the tensor-core (bf16) and warp
/// (f32) forwards and the dense one.
#[test]
fn cuda_untracked_calls_give_the_tracked_bits() {
    fn check<T: Element + WithDType>(dev: &Device) {
        let mut rng = Rng::new(11);
        let batch = sparsectr_attn::workload::generate_batch(&mut rng, 3, 30, 3, true).unwrap();
        let dims = Dims {
            heads: 2,
            head_dim: 64,
        };
        let chunks = Chunks::personalized(&batch, 4).unwrap();
        let layout =
            Arc::new(EvoLayout::new(batch.clone(), chunks, dims, AttnConfig::new(2, 5)).unwrap());
        let t = batch.num_tokens();
        let data = Data::<T>::new(5, t, dims);
        let qkv = Tensor::from_vec(data.qkv.clone(), (t, 3, 2, 64), dev).unwrap();
        let gates = Tensor::from_vec(data.gates.clone(), (t, 2, 3), dev).unwrap();
        let coeffs = Tensor::from_vec(data.coeffs.clone(), (2, 3), dev).unwrap();
        let (qkv_var, coeffs_var) = (
            Var::from_tensor(&qkv).unwrap(),
            Var::from_tensor(&coeffs).unwrap(),
        );
        assert!(!qkv.track_op() && qkv_var.as_tensor().track_op());
        let untracked = evo_attention(&qkv, &coeffs, &gates, &layout).unwrap();
        let tracked = evo_attention(qkv_var.as_tensor(), &coeffs, &gates, &layout).unwrap();
        let what = <T as Element>::DTYPE;
        assert_eq!(to_f64(&untracked), to_f64(&tracked), "sparse O {what:?}");
        let dense = dense_attention(&qkv, &coeffs, &layout).unwrap();
        let dense_tracked = dense_attention(&qkv, coeffs_var.as_tensor(), &layout).unwrap();
        assert_eq!(to_f64(&dense), to_f64(&dense_tracked), "dense O {what:?}");
    }
    let Some(dev) = cuda("cuda_untracked_calls_give_the_tracked_bits") else {
        return;
    };
    check::<bf16>(&dev);
    check::<f32>(&dev);
}

/// After `load_kernels`, the ops' forward and backward (sparse and dense) of that dtype and head
/// dim load nothing more on that device, and a second `load_kernels` loads nothing.
#[test]
fn cuda_load_kernels_loads_what_the_ops_run() {
    use sparsectr_attn::candle_op::{load_kernels, loaded_kernels};
    fn check<T: Element + WithDType>(dev: &Device, head_dim: usize) {
        let what = format!("{:?} D = {head_dim}", <T as Element>::DTYPE);
        let n = load_kernels(dev, <T as WithDType>::DTYPE, head_dim).unwrap();
        assert!(n > 0, "{what}: nothing loaded on a device of its own");
        let before = loaded_kernels(dev).unwrap();
        let mut rng = Rng::new(3);
        let batch = sparsectr_attn::workload::generate_batch(&mut rng, 3, 30, 3, true).unwrap();
        let dims = Dims { heads: 2, head_dim };
        let chunks = Chunks::personalized(&batch, 4).unwrap();
        let layout = Arc::new(EvoLayout::new(batch, chunks, dims, AttnConfig::new(2, 5)).unwrap());
        let data = Data::<T>::new(7, layout.num_tokens(), dims);
        evo_run(&data, &layout, false, dev).unwrap();
        evo_run(&data, &layout, true, dev).unwrap();
        dense_run(&data, &layout, dev).unwrap();
        assert_eq!(
            loaded_kernels(dev).unwrap(),
            before,
            "{what}: the ops loaded more"
        );
        assert_eq!(
            load_kernels(dev, <T as WithDType>::DTYPE, head_dim).unwrap(),
            0,
            "{what}"
        );
    }
    if cuda("cuda_load_kernels_loads_what_the_ops_run").is_none() {
        return;
    }
    // A stream of its own, hence a kernel handle of its own (one per candle stream): the other
    // tests' kernels are not in it.
    let dev = Device::new_cuda_with_stream(0).unwrap();
    assert_eq!(loaded_kernels(&dev).unwrap(), Vec::<&str>::new());
    check::<f32>(&dev, 32);
    check::<bf16>(&dev, 64);
    check::<f16>(&dev, 128);
}
