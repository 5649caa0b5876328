//! The candle ops against the crate's reference: forward outputs and the gradients candle's
//! autograd produces through them (`cargo test --features candle`).
#![cfg(feature = "candle")]

mod common;

use std::sync::Arc;

use candle_core::{DType as CDType, Device, Tensor, Var, WithDType};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use sparsectr_attn::candle_op::{dense_attention, evo_attention, EvoLayout};
use sparsectr_attn::workload::{random_tensor, uniform_tensor, Rng};
use sparsectr_attn::{reference, AttnConfig, Chunks, Dims, Element, Gates, Inputs, JaggedBatch};

const H: usize = 2;
const D: usize = 32;

/// `[T, H, D]` x 3 stacked to `[T, 3, H, D]`.
fn stack_qkv<T: Copy>(q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    let row = H * D;
    let mut out = Vec::with_capacity(3 * q.len());
    for t in 0..q.len() / row {
        for x in [q, k, v] {
            out.extend_from_slice(&x[t * row..(t + 1) * row]);
        }
    }
    out
}

/// Equal element for element, or the first index where they differ.
fn same<T: PartialEq + std::fmt::Debug>(
    name: &str,
    got: &[T],
    want: &[T],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: lengths", name);
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        return Err(TestCaseError::fail(format!(
            "{name} differs from the reference first at {i}: {:?} vs {:?}",
            got[i], want[i]
        )));
    }
    Ok(())
}

fn to_t<T: Element>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&v| T::from_f64(v)).collect()
}

fn check<T: Element + WithDType>(
    batch: &JaggedBatch,
    p: usize,
    m: usize,
    w: usize,
    seed: u64,
    f32_gates: bool,
) -> Result<(), TestCaseError> {
    let chunks = Chunks::personalized(batch, p).unwrap();
    let dims = Dims {
        heads: H,
        head_dim: D,
    };
    let config = AttnConfig::new(m, w);
    let layout = Arc::new(EvoLayout::new(batch.clone(), chunks.clone(), dims, config).unwrap());
    let t = batch.num_tokens();
    let mut rng = Rng::new(seed);
    let n = t * H * D;
    let q: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let k: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let v: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let coeffs: Vec<f32> = random_tensor(&mut rng, H * 3, 1.0);
    let g_native: Vec<T> = uniform_tensor(&mut rng, t * H * 3, -0.5, 1.5);
    let g_f32: Vec<f32> = uniform_tensor(&mut rng, t * H * 3, -0.5, 1.5);
    let r: Vec<T> = random_tensor(&mut rng, n, 1.0);

    let dev = Device::Cpu;
    let qkv =
        Var::from_tensor(&Tensor::from_vec(stack_qkv(&q, &k, &v), (t, 3, H, D), &dev).unwrap())
            .unwrap();
    let coeffs_t =
        Var::from_tensor(&Tensor::from_vec(coeffs.clone(), (H, 3), &dev).unwrap()).unwrap();
    let gates_t = if f32_gates {
        Var::from_tensor(&Tensor::from_vec(g_f32.clone(), (t, H, 3), &dev).unwrap()).unwrap()
    } else {
        Var::from_tensor(&Tensor::from_vec(g_native.clone(), (t, H, 3), &dev).unwrap()).unwrap()
    };
    let o = evo_attention(
        qkv.as_tensor(),
        coeffs_t.as_tensor(),
        gates_t.as_tensor(),
        &layout,
    )
    .unwrap();
    prop_assert_eq!(o.dims(), &[t, H, D]);
    // L = sum(O * R): the gradient reaching O is R.
    let r_t = Tensor::from_vec(r.clone(), (t, H, D), &dev).unwrap();
    let loss = (o.to_dtype(CDType::F64).unwrap() * r_t.to_dtype(CDType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();

    let attn = layout.attention();
    let inputs = Inputs {
        q: &q,
        k: &k,
        v: &v,
        coeffs: &coeffs,
        gates: Some(if f32_gates {
            Gates::F32(&g_f32)
        } else {
            Gates::Native(&g_native)
        }),
    };
    let want_o: Vec<T> = to_t(&reference::forward(&attn, &inputs).unwrap().o);
    let got_o: Vec<T> = o.flatten_all().unwrap().to_vec1().unwrap();
    same("O", &got_o, &want_o)?;

    let want = reference::backward(&attn, &inputs, &r).unwrap();
    let got_qkv: Vec<T> = grads
        .get(&qkv)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want_qkv = stack_qkv(
        &to_t::<T>(&want.dq),
        &to_t::<T>(&want.dk),
        &to_t::<T>(&want.dv),
    );
    same("dqkv", &got_qkv, &want_qkv)?;
    let got_c: Vec<f32> = grads
        .get(&coeffs_t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    same("dcoeffs", &got_c, &to_t::<f32>(&want.dcoeffs))?;
    let got_g = grads.get(&gates_t).unwrap();
    prop_assert_eq!(got_g.dtype(), gates_t.dtype());
    let got_g: Vec<f64> = got_g
        .to_dtype(CDType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want_g: Vec<f64> = if f32_gates {
        to_t::<f32>(&want.dgates)
            .iter()
            .map(|&x| x as f64)
            .collect()
    } else {
        to_t::<T>(&want.dgates)
            .iter()
            .map(|x| Element::to_f64(*x))
            .collect()
    };
    same("dgates", &got_g, &want_g)?;
    Ok(())
}

fn run<T: Element + WithDType>(cases: u32) {
    let mut runner = TestRunner::new(ProptestConfig::with_cases(cases));
    runner
        .run(
            &(
                common::batch(3, 20, 3),
                1usize..5,
                1usize..4,
                1usize..8,
                any::<u64>(),
                any::<bool>(),
            ),
            |(batch, p, m, w, seed, f32_gates)| check::<T>(&batch, p, m, w, seed, f32_gates),
        )
        .unwrap();
}

#[test]
fn evo_op_matches_reference_f32() {
    run::<f32>(24);
}

#[test]
fn evo_op_matches_reference_f16() {
    run::<f16>(12);
}

#[test]
fn evo_op_matches_reference_bf16() {
    run::<bf16>(12);
}

#[test]
fn dense_op_matches_reference() {
    let mut rng = Rng::new(5);
    let batch = sparsectr_attn::workload::generate_batch(&mut rng, 3, 15, 2, true).unwrap();
    let chunks = Chunks::personalized(&batch, 3).unwrap();
    let dims = Dims {
        heads: H,
        head_dim: D,
    };
    let layout =
        Arc::new(EvoLayout::new(batch.clone(), chunks, dims, AttnConfig::new(1, 4)).unwrap());
    let t = batch.num_tokens();
    let n = t * H * D;
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        random_tensor(&mut rng, n, 1.0),
        random_tensor(&mut rng, n, 1.0),
        random_tensor(&mut rng, n, 1.0),
    );
    let coeffs: Vec<f32> = random_tensor(&mut rng, H * 3, 1.0);
    let r: Vec<f32> = random_tensor(&mut rng, n, 1.0);
    let dev = Device::Cpu;
    let qkv =
        Var::from_tensor(&Tensor::from_vec(stack_qkv(&q, &k, &v), (t, 3, H, D), &dev).unwrap())
            .unwrap();
    let coeffs_t =
        Var::from_tensor(&Tensor::from_vec(coeffs.clone(), (H, 3), &dev).unwrap()).unwrap();
    let o = dense_attention(qkv.as_tensor(), coeffs_t.as_tensor(), &layout).unwrap();
    let r_t = Tensor::from_vec(r.clone(), (t, H, D), &dev).unwrap();
    let grads = (o.clone() * r_t)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let attn = layout.attention();
    let inputs = Inputs {
        q: &q,
        k: &k,
        v: &v,
        coeffs: &coeffs,
        gates: None,
    };
    let want_o: Vec<f32> = to_t(&reference::dense_forward(&attn, &inputs).unwrap().o);
    assert_eq!(o.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want_o);
    let want = reference::dense_backward(&attn, &inputs, &r).unwrap();
    let got: Vec<f32> = grads
        .get(&qkv)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        got,
        stack_qkv(
            &to_t::<f32>(&want.dq),
            &to_t::<f32>(&want.dk),
            &to_t::<f32>(&want.dv)
        )
    );
    let got_c: Vec<f32> = grads
        .get(&coeffs_t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got_c, to_t::<f32>(&want.dcoeffs));
}

#[test]
fn bad_shapes_and_dtypes_are_errors() {
    let mut rng = Rng::new(9);
    let batch = sparsectr_attn::workload::generate_batch(&mut rng, 2, 10, 1, false).unwrap();
    let chunks = Chunks::personalized(&batch, 2).unwrap();
    let dims = Dims {
        heads: H,
        head_dim: D,
    };
    let layout =
        Arc::new(EvoLayout::new(batch.clone(), chunks, dims, AttnConfig::new(1, 3)).unwrap());
    let t = batch.num_tokens();
    let dev = Device::Cpu;
    let qkv = Tensor::zeros((t, 3, H, D), CDType::F32, &dev).unwrap();
    let coeffs = Tensor::zeros((H, 3), CDType::F32, &dev).unwrap();
    let gates = Tensor::ones((t, H, 3), CDType::F32, &dev).unwrap();
    let short = Tensor::zeros((t - 1, 3, H, D), CDType::F32, &dev).unwrap();
    // Each error names the tensor and what was wrong with it.
    let wrong = |result: candle_core::Result<Tensor>, words: &[&str]| {
        let message = result.expect_err("an error").to_string();
        for word in words {
            assert!(message.contains(word), "{message:?} does not say {word:?}");
        }
    };
    let short_shape = format!("{:?}", [t - 1, 3, H, D]);
    wrong(
        evo_attention(&short, &coeffs, &gates, &layout),
        &["qkv", &short_shape],
    );
    let bad_coeffs = Tensor::zeros((H, 2), CDType::F32, &dev).unwrap();
    wrong(
        evo_attention(&qkv, &bad_coeffs, &gates, &layout),
        &["coeffs", &format!("{:?}", [H, 2])],
    );
    let f64_qkv = qkv.to_dtype(CDType::F64).unwrap();
    let f64_gates = gates.to_dtype(CDType::F64).unwrap();
    wrong(
        evo_attention(&f64_qkv, &coeffs, &f64_gates, &layout),
        &["qkv", "F64"],
    );
    let bf16_gates = gates.to_dtype(CDType::BF16).unwrap();
    // Gates of a third dtype.
    wrong(
        evo_attention(&qkv, &coeffs, &bf16_gates, &layout),
        &["gates", "BF16"],
    );
    wrong(
        dense_attention(&short, &coeffs, &layout),
        &["qkv", &short_shape],
    );
    // A layout whose parts do not fit is an error when built.
    let other = sparsectr_attn::workload::generate_batch(&mut rng, 2, 12, 1, false).unwrap();
    let other_chunks = Chunks::personalized(&other, 2).unwrap();
    let want = batch.seq(0).behaviors.len();
    let got: usize = other_chunks
        .of_seq(0)
        .map(|c| other_chunks.span(c).len())
        .sum();
    assert!(matches!(
        EvoLayout::new(batch, other_chunks, dims, AttnConfig::new(1, 3)),
        Err(sparsectr_attn::Error::ChunksMismatch { seq: 0, chunked_behaviors, batch_behaviors })
            if chunked_behaviors == got && batch_behaviors == want
    ));
}

#[test]
fn load_kernels_on_the_cpu_loads_nothing_and_bad_requests_are_errors() {
    use sparsectr_attn::candle_op::{load_kernels, loaded_kernels};
    let dev = Device::Cpu;
    for dtype in [CDType::F32, CDType::F16, CDType::BF16] {
        for &d in sparsectr_attn::SUPPORTED_HEAD_DIMS {
            assert_eq!(
                load_kernels(&dev, dtype, d).unwrap(),
                0,
                "{dtype:?} D = {d}"
            );
        }
    }
    assert_eq!(loaded_kernels(&dev).unwrap(), Vec::<&str>::new());
    // The request is checked on every device, so a CPU run already names what a GPU would refuse.
    let message = |dtype, d| {
        load_kernels(&dev, dtype, d)
            .expect_err("an error")
            .to_string()
    };
    for dtype in [CDType::F64, CDType::U8, CDType::I64] {
        let m = message(dtype, D);
        assert!(
            m.contains(&format!("{dtype:?}")) && m.contains("bf16"),
            "{m:?}"
        );
    }
    for d in [0, 48, 256] {
        let m = message(CDType::BF16, d);
        assert!(
            m.contains("head") && m.contains(&d.to_string()),
            "{m:?} does not name head dim {d}"
        );
    }
}
