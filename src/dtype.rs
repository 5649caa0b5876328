//! Element types of Q, K, V, O and gates.

use half::{bf16, f16};

/// The storage type of an attention tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`).
    BF16,
    /// Accepted by the CPU reference only (finite differences need it); no kernel takes it.
    F64,
}

impl DType {
    /// Lower-case name as used in kernel ids and command lines (`bf16`, `f16`, `f32`, `f64`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
        }
    }

    /// Relative L2 tolerance against the f64 reference (SPEC section 8).
    pub fn tolerance(self) -> f64 {
        match self {
            DType::F32 => 1e-5,
            DType::F16 => 3e-3,
            DType::BF16 => 1e-2,
            DType::F64 => 1e-12,
        }
    }
}

/// A scalar that an attention tensor can hold. The reference computes in f64 whatever this is.
pub trait Element: Copy + Send + Sync + bytemuck::Pod + std::fmt::Debug + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widen to f64 (exact for every implementor).
    fn to_f64(self) -> f64;
    /// Round to nearest from f64.
    fn from_f64(x: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
}

/// Widen a slice to f64.
pub fn to_f64_vec<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| x.to_f64()).collect()
}

/// Relative L2 error `||x - reference|| / ||reference||`; `NaN` if either side holds a NaN, so
/// that `err <= tol` fails. A zero reference gives the absolute norm of `x`.
pub fn rel_l2_error(x: &[f64], reference: &[f64]) -> f64 {
    if x.len() != reference.len() {
        return f64::NAN;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(reference) {
        num += (a - b) * (a - b);
        den += b * b;
    }
    if num.is_nan() || den.is_nan() {
        return f64::NAN;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
