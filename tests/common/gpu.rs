//! The GPU for tests, or a visible SKIPPED line without one.

use std::io::Write;
use std::sync::OnceLock;

use sparsectr_attn::cuda::{GpuDevice, SparseKernels};
use sparsectr_attn::Error;

/// The GPU, or `None` after a SKIPPED line on the terminal (written past libtest's capture).
/// With `SPARSECTR_REQUIRE_GPU=1` a missing GPU fails the test instead.
pub fn gpu(test: &str) -> Option<&'static GpuDevice> {
    static GPU: OnceLock<Result<GpuDevice, Error>> = OnceLock::new();
    match GPU.get_or_init(|| GpuDevice::new(0)) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            if std::env::var("SPARSECTR_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("SPARSECTR_REQUIRE_GPU=1 but no GPU: {e}");
            }
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no GPU ({e})");
            None
        }
    }
}

/// Property-test cases for a GPU test: `SPARSECTR_GPU_CASES` if set (compute-sanitizer runs use
/// a few), else `default`. A value that is not a positive count is refused: zero cases, or a
/// typo read as the default, would pass having checked nothing asked for.
pub fn cases(default: u32) -> u32 {
    match std::env::var("SPARSECTR_GPU_CASES") {
        Err(_) => default,
        Ok(v) => match v.parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => panic!("SPARSECTR_GPU_CASES={v:?}: expected a positive number of cases"),
        },
    }
}

/// Runs `check` on the GPU over `cases(default_cases)` values of `strategy` for every supported
/// head dimension; skips (visibly) without a GPU.
pub fn for_each_head_dim<S: proptest::strategy::Strategy>(
    test: &str,
    default_cases: u32,
    strategy: impl Fn() -> S,
    check: impl Fn(&GpuDevice, &S::Value, usize) -> Result<(), String>,
) {
    let Some(gpu) = gpu(test) else {
        return;
    };
    run_head_dims(gpu, default_cases, strategy, check);
}

/// Runs `check` on `gpu` over `cases(default_cases)` values of `strategy` for every supported
/// head dimension.
pub fn run_head_dims<S: proptest::strategy::Strategy>(
    gpu: &GpuDevice,
    default_cases: u32,
    strategy: impl Fn() -> S,
    check: impl Fn(&GpuDevice, &S::Value, usize) -> Result<(), String>,
) {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    for &head_dim in sparsectr_attn::SUPPORTED_HEAD_DIMS {
        TestRunner::new(Config::with_cases(cases(default_cases)))
            .run(&strategy(), |c| {
                check(gpu, &c, head_dim).map_err(TestCaseError::fail)
            })
            .unwrap();
    }
}

/// A handle of its own on the test GPU, running `kernels`: tests that change the kernel choice
/// must not share a handle with the tests running beside them. `None` (after a SKIPPED line)
/// without a GPU.
pub fn own_handle(test: &str, kernels: SparseKernels) -> Option<GpuDevice> {
    let shared = gpu(test)?;
    let stream = shared
        .stream()
        .context()
        .new_stream()
        .expect("a second stream");
    let own = GpuDevice::from_stream(stream).expect("a handle on the same GPU");
    own.set_sparse_kernels(kernels);
    Some(own)
}

/// The check of a gradient whose reference is zero, or `None` where it is not.
///
/// A reference gradient is zero where no pair reaches it, and also where pairs reach it but
/// cancel exactly: a softmax over one key has p = 1, so dz = p (g u - dgate) = 0. The GPU computes
/// u = dO.v and dgate in f32 in different orders and leaves ~1e-7 there, so a zero reference is
/// compared on the unit scale of the tests' inputs (O(1) random values): the GPU's norm must be
/// within `tol` of zero per element. Poisoned, unwritten outputs still fail.
pub fn zero_reference(
    name: &str,
    got: &[f64],
    want: &[f64],
    tol: f64,
) -> Option<Result<(), String>> {
    let unit = (want.len() as f64).sqrt();
    let want_norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    if want_norm > 1e-12 * unit {
        return None;
    }
    let got_norm = got.iter().map(|x| x * x).sum::<f64>().sqrt();
    Some(if got_norm.is_finite() && got_norm <= tol * unit {
        Ok(())
    } else {
        Err(format!(
            "{name}: reference is zero, GPU norm {got_norm:e} > {:e}",
            tol * unit
        ))
    })
}

/// dcoeffs sums dz * features over every pair; where a branch's keys all share their features
/// the terms cancel exactly (the dz of one softmax sum to zero) and the reference is rounding
/// residue (~1e-16) while a correct f32 kernel leaves ~1e-8. So the error is relative to the
/// reference or to an absolute floor of 1e-2 per element, whichever is larger.
pub fn compare_dcoeffs(got: &[f64], want: &[f64], tol: f64) -> Result<(), String> {
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    let floor = 1e-2 * (want.len() as f64).sqrt();
    let err = diff / norm.max(floor);
    if err.is_finite() && err <= tol && got.len() == want.len() {
        Ok(())
    } else {
        Err(format!(
            "dcoeffs: error {err:e} > {tol:e} (relative to max(||ref||, {floor:e}))"
        ))
    }
}

/// Each entry of a per-row scalar that one lost or gained key moves (the forward's finite LSE
/// entries, the backward's dgates) within this of max(1, |reference|), whatever the dtype (the
/// emulation's bound, kernels/emu/run_kernels.cpp). A row's LSE moves by at least about p for a
/// lost key of weight p, its dgates by about p times the key's dP'; a relative L2 over the whole
/// output cannot see one such row. Rounding moves them by about 1e-5 at most (the 16-bit halves
/// of the chunk summaries).
pub const ENTRY_TOL: f64 = 1e-3;

/// The worst entry of `got` against `want` (paired entries) and [`ENTRY_TOL`].
pub fn check_entries(name: &str, got: &[f64], want: &[f64]) -> Result<(), String> {
    let mut worst = (0.0f64, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs() / w.abs().max(1.0);
        // NaN is the worst there is.
        if e.is_nan() || e > worst.0 {
            worst = (e, i);
        }
    }
    let (e, i) = worst;
    if got.len() == want.len() && !e.is_nan() && e <= ENTRY_TOL {
        Ok(())
    } else {
        Err(format!(
            "{name}: entry {i} off by {e:e} of max(1, |reference|) > {ENTRY_TOL:e} (got {}, \
             reference {}): a key lost or gained?",
            got.get(i).copied().unwrap_or(f64::NAN),
            want.get(i).copied().unwrap_or(f64::NAN)
        ))
    }
}

/// [`GpuDevice::backward_host`] with every output NaN before the kernels run (SPEC section 8:
/// poison outputs in tests), where `backward_host` itself zero-fills them: a kernel that skipped
/// the elements whose gradient is zero (the user token's dQ, keys no query sees) would pass
/// through it. The forward runs first on the device, saving the branch outputs as `saved` says.
#[allow(clippy::too_many_arguments)]
pub fn backward_poisoned<T: sparsectr_attn::cuda::GpuElement>(
    gpu: &GpuDevice,
    batch: &sparsectr_attn::JaggedBatch,
    chunks: &sparsectr_attn::Chunks,
    dims: sparsectr_attn::Dims,
    config: &sparsectr_attn::AttnConfig,
    inputs: &sparsectr_attn::Inputs<'_, T>,
    d_o: &[T],
    mode: sparsectr_attn::cuda::BackwardMode,
    saved: sparsectr_attn::cuda::Saved,
) -> Result<sparsectr_attn::cuda::HostGradients<T>, String> {
    use sparsectr_attn::cuda::{DeviceGates, DeviceGrads, DeviceInputs, HostGradients, Saved};
    use sparsectr_attn::Gates;
    let t = batch.num_tokens();
    let e = |what: &'static str| move |err: Error| format!("{what}: {err}");
    if t == 0 {
        // No gradient but dcoeffs (zero, from the host call): nothing to poison.
        return gpu
            .backward_host(batch, chunks, dims, config, inputs, d_o, mode, saved)
            .map_err(e("backward_host"));
    }
    let stream = gpu.stream();
    let up = |x: &[T]| {
        stream
            .clone_htod(x)
            .map_err(|err| format!("upload: {err:?}"))
    };
    let up_f32 = |x: &[f32]| {
        stream
            .clone_htod(x)
            .map_err(|err| format!("upload: {err:?}"))
    };
    let d_batch = gpu
        .upload_batch(batch, &config.temporal)
        .map_err(e("upload_batch"))?;
    let d_chunks = gpu
        .upload_chunks(batch, chunks)
        .map_err(e("upload_chunks"))?;
    let (q, k, v, d_o) = (up(inputs.q)?, up(inputs.k)?, up(inputs.v)?, up(d_o)?);
    let coeffs = up_f32(inputs.coeffs)?;
    let (g_native, g_f32) = match inputs.gates {
        Some(Gates::Native(g)) => (Some(up(g)?), None),
        Some(Gates::F32(g)) => (None, Some(up_f32(g)?)),
        None => (None, None),
    };
    let d_inputs = DeviceInputs {
        q: &q,
        k: &k,
        v: &v,
        coeffs: &coeffs,
        gates: match (&g_native, &g_f32) {
            (Some(g), _) => Some(DeviceGates::Native(g)),
            (_, Some(g)) => Some(DeviceGates::F32(g)),
            _ => None,
        },
    };
    let (lse, branch_out) = match saved {
        Saved::BranchOutputs => {
            let (_, lse, b) = gpu
                .forward_for_backward(&d_batch, &d_chunks, dims, config, &d_inputs)
                .map_err(e("forward_for_backward"))?;
            (lse, Some(b))
        }
        Saved::LseOnly => {
            let (_, lse) = gpu
                .forward(&d_batch, &d_chunks, dims, config, &d_inputs)
                .map_err(e("forward"))?;
            (lse, None)
        }
    };
    let rows = t * dims.heads * dims.head_dim;
    let nan = vec![T::from_f64(f64::NAN); rows];
    let (mut dq, mut dk, mut dv) = (up(&nan)?, up(&nan)?, up(&nan)?);
    let mut dcoeffs = up_f32(&vec![f32::NAN; dims.heads * 3])?;
    let mut dgates = up_f32(&vec![f32::NAN; t * dims.heads * 3])?;
    let grads = DeviceGrads {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
        dcoeffs: &mut dcoeffs,
        dgates: &mut dgates,
    };
    gpu.backward_into(
        &d_batch,
        &d_chunks,
        dims,
        config,
        &d_inputs,
        &lse,
        branch_out.as_ref(),
        &d_o,
        mode,
        grads,
    )
    .map_err(e("backward_into"))?;
    let down = |x| {
        stream
            .clone_dtoh(x)
            .map_err(|err| format!("download: {err:?}"))
    };
    let down_f32 = |x| {
        stream
            .clone_dtoh(x)
            .map_err(|err| format!("download: {err:?}"))
    };
    Ok(HostGradients {
        dq: down(&dq)?,
        dk: down(&dk)?,
        dv: down(&dv)?,
        dcoeffs: down_f32(&dcoeffs)?,
        dgates: down_f32(&dgates)?,
    })
}

/// For the short-buffer tests: `r` is the `Error::Length` of `field`, one element short of
/// `expected`, and every one of `outputs` (the call's poisoned outputs, as f64) is still NaN,
/// so no kernel ran.
pub fn assert_one_short(r: Result<(), Error>, field: &str, expected: usize, outputs: &[Vec<f64>]) {
    assert!(
        matches!(
            &r,
            Err(Error::Length { field: f, len, expected: e })
                if *f == field && *len == expected - 1 && *e == expected
        ),
        "{field}: {r:?}"
    );
    assert!(
        outputs.iter().flatten().all(|v| v.is_nan()),
        "{field}: a kernel ran"
    );
}

/// A device buffer on the host as f64.
pub fn down_f64<T: sparsectr_attn::cuda::GpuElement>(
    gpu: &GpuDevice,
    x: &cudarc::driver::CudaSlice<T>,
) -> Vec<f64> {
    let host = gpu.stream().clone_dtoh(x).expect("download");
    host.iter().map(|v| v.to_f64()).collect()
}
