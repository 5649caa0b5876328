//! `#[repr(C)]` mirrors of the structs in `kernels/common/params.cuh`, sizes asserted on both sides.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

/// The scalars of every launch (`EvoParams` in params.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct EvoParams {
    pub num_seqs: i32,
    pub num_tokens: i32,
    pub heads: i32,
    /// `P`: stride of the per-sequence chunk arrays.
    pub max_chunks: i32,
    pub tail_tokens: i32,
    pub window: i32,
    pub num_time_buckets: i32,
    pub gates_mode: i32,
    pub scale: f32,
    pub head_dim: i32,
    pub reserved: [i32; 2],
}
const _: () = assert!(std::mem::size_of::<EvoParams>() == 48);

// SAFETY: plain old data with the layout of the CUDA struct (asserted size, repr(C), no padding).
unsafe impl DeviceRepr for EvoParams {}

/// `EvoParams::gates_mode` (`GatesMode` in params.cuh).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GatesMode {
    None = 0,
    Native = 1,
    F32 = 2,
}

/// Where one sequence sits in the packed batch (`SeqInfo` in params.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SeqInfo {
    pub start: i32,
    pub behaviors: i32,
    pub candidates: i32,
    pub end: i32,
}
const _: () = assert!(std::mem::size_of::<SeqInfo>() == 16);

// SAFETY: four i32 in C layout, as in params.cuh.
unsafe impl DeviceRepr for SeqInfo {}
// SAFETY: all-zero bits are four zero i32.
unsafe impl ValidAsZeroBits for SeqInfo {}
