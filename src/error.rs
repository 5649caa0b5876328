//! The one error type of the crate.
//!
//! Every variant names the field at fault and, where there is one, the index and value, so that a
//! caller can find the bad element without reading our code. Bad input never panics and never
//! reaches a kernel; a missing driver, GPU or NVRTC is an error value too.

use std::fmt;

/// Result alias used by every fallible function of the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, with the field, index and value at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// `seq_offsets` is empty: it needs `B + 1` entries, at least `[0]`.
    SeqOffsetsEmpty,
    /// `seq_offsets[0]` is not 0.
    SeqOffsetsStart {
        /// `seq_offsets[0]`.
        value: usize,
    },
    /// `seq_offsets[index] < seq_offsets[index - 1]`.
    SeqOffsetsDecreasing {
        /// The entry that decreases.
        index: usize,
        /// `seq_offsets[index]`.
        value: usize,
        /// `seq_offsets[index - 1]`.
        previous: usize,
    },
    /// `seq_offsets[B]` is not the number of tokens `T` (the length of `timestamps`).
    SeqOffsetsEnd {
        /// `seq_offsets[B]`.
        value: usize,
        /// `T`, the length of `timestamps`.
        num_tokens: usize,
    },
    /// A per-sequence or per-token array has the wrong length.
    Length {
        /// The array, as the docs name it.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The length it must have.
        expected: usize,
    },
    /// Sequence `seq` is too short for its `num_candidates[seq]` candidates (plus the user token).
    TooManyCandidates {
        /// The sequence.
        seq: usize,
        /// `num_candidates[seq]`.
        num_candidates: usize,
        /// Its tokens, the user token's included.
        seq_len: usize,
        /// Whether its first token is a user token.
        has_user_token: bool,
    },
    /// `timestamps[index]` (a behavior of sequence `seq`) is earlier than the behavior before it.
    DecreasingTimestamp {
        /// The sequence.
        seq: usize,
        /// The token, an index into `timestamps`.
        index: usize,
        /// `timestamps[index]`.
        value: i64,
        /// `timestamps[index - 1]`.
        previous: i64,
    },
    /// The behaviors and candidates of sequence `seq` span more than `i32::MAX` seconds.
    TimeSpanTooLarge {
        /// The sequence.
        seq: usize,
        /// Its last timestamp minus its first behavior's, in seconds.
        span: i128,
    },
    /// A size parameter that must be at least 1 is 0 (`heads`, `num_chunks`, `tail_tokens`,
    /// `window`, `num_time_buckets`).
    Zero {
        /// The parameter.
        field: &'static str,
    },
    /// The head dimension is not one the kernels are built for.
    UnsupportedHeadDim {
        /// The head dimension asked for.
        value: usize,
        /// The ones there are kernels for.
        supported: &'static [usize],
    },
    /// A scalar parameter is out of its domain (`scale` not finite and positive, `utc_offset`
    /// beyond a day, ...).
    OutOfRange {
        /// The parameter or size.
        field: &'static str,
        /// Its value, printed.
        value: String,
        /// The domain it must be in.
        expected: &'static str,
    },
    /// Caller-supplied chunk boundaries do not partition the behaviors of sequence `seq`.
    ChunkBoundaries {
        /// The array of boundaries or lengths.
        field: &'static str,
        /// The sequence.
        seq: usize,
        /// The entry at fault, an index into `field`.
        index: usize,
        /// That entry.
        value: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Chunks were built for a different batch than the one they are used with.
    ChunksMismatch {
        /// The first sequence whose behaviors the chunks do not partition.
        seq: usize,
        /// Its behaviors when chunked.
        chunked_behaviors: usize,
        /// Its behaviors in the batch given.
        batch_behaviors: usize,
    },
    /// A padded `[B, L]` conversion cannot be done (`max_len` or `row` overflow); wrong `mask` or
    /// `timestamps` lengths are [`Error::Length`].
    Padded {
        /// The argument at fault.
        field: &'static str,
        /// The index at fault (0 for a size).
        index: usize,
        /// Its value.
        value: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No CUDA driver library (`libcuda`) could be loaded.
    NoCudaDriver,
    /// The driver loaded but reports no GPU (or not the requested ordinal).
    NoGpu {
        /// The device ordinal asked for.
        ordinal: usize,
        /// What the driver said.
        detail: String,
    },
    /// No NVRTC library could be loaded.
    NoNvrtc,
    /// A kernel failed to compile; the log is NVRTC's.
    Compile {
        /// The kernel module.
        kernel: String,
        /// NVRTC's log.
        log: String,
    },
    /// No kernel was built for this combination (the instantiation list in build.rs).
    NoKernel {
        /// The kernel module.
        entry: &'static str,
        /// The element type asked for (`none` for kernels without one).
        dtype: &'static str,
        /// The head dimension asked for, for kernels built per head dimension.
        head_dim: Option<usize>,
    },
    /// The GPU's compute capability is below what the kernels need (sm_80).
    UnsupportedArch {
        /// The GPU's compute capability, major part.
        major: i32,
        /// Its minor part.
        minor: i32,
    },
    /// Device data built for one batch or setting used with another, or device buffers of another
    /// GPU than the handle's.
    DeviceMismatch {
        /// The argument at fault.
        field: &'static str,
        /// What it was built for, printed.
        value: String,
        /// What this call needs.
        expected: String,
    },
    /// A CUDA driver call failed.
    Cuda {
        /// The driver call (or what it was for).
        call: &'static str,
        /// The driver's error.
        detail: String,
    },
    /// A kernel source of `SPARSECTR_KERNEL_DIR` (feature `dev-kernel-dir`) could not be used.
    KernelSource {
        /// The file or folder.
        path: String,
        /// What went wrong.
        detail: String,
    },
}

impl Error {
    /// The name of the input field at fault, as the docs and SPEC.md spell it; for a missing
    /// driver, GPU or NVRTC, the category `device` or `kernels`.
    pub fn field(&self) -> &'static str {
        match self {
            Error::SeqOffsetsEmpty
            | Error::SeqOffsetsStart { .. }
            | Error::SeqOffsetsDecreasing { .. }
            | Error::SeqOffsetsEnd { .. } => "seq_offsets",
            Error::Length { field, .. } => field,
            Error::TooManyCandidates { .. } => "num_candidates",
            Error::DecreasingTimestamp { .. } | Error::TimeSpanTooLarge { .. } => "timestamps",
            Error::Zero { field } => field,
            Error::UnsupportedHeadDim { .. } => "head_dim",
            Error::OutOfRange { field, .. } => field,
            Error::ChunkBoundaries { field, .. } => field,
            Error::ChunksMismatch { .. } => "chunks",
            Error::Padded { field, .. } => field,
            Error::NoCudaDriver | Error::NoGpu { .. } | Error::Cuda { .. } => "device",
            Error::NoNvrtc
            | Error::Compile { .. }
            | Error::NoKernel { .. }
            | Error::KernelSource { .. } => "kernels",
            Error::UnsupportedArch { .. } => "device",
            Error::DeviceMismatch { field, .. } => field,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::SeqOffsetsEmpty => write!(f, "seq_offsets is empty; it needs B + 1 entries"),
            Error::SeqOffsetsStart { value } => {
                write!(f, "seq_offsets[0] = {value}, must be 0")
            }
            Error::SeqOffsetsDecreasing {
                index,
                value,
                previous,
            } => write!(
                f,
                "seq_offsets[{index}] = {value} is less than seq_offsets[{}] = {previous}",
                index.saturating_sub(1)
            ),
            Error::SeqOffsetsEnd { value, num_tokens } => write!(
                f,
                "seq_offsets ends at {value}, but there are {num_tokens} tokens (timestamps.len())"
            ),
            Error::Length {
                field,
                len,
                expected,
            } => write!(f, "{field} has length {len}, expected {expected}"),
            Error::TooManyCandidates {
                seq,
                num_candidates,
                seq_len,
                has_user_token,
            } => write!(
                f,
                "num_candidates[{seq}] = {num_candidates} does not fit sequence {seq} of length \
                 {seq_len}{}",
                if *has_user_token {
                    " with its user token"
                } else {
                    ""
                }
            ),
            Error::DecreasingTimestamp {
                seq,
                index,
                value,
                previous,
            } => write!(
                f,
                "timestamps[{index}] = {value} (sequence {seq}) is earlier than the behavior \
                 before it ({previous}); behaviors must be non-decreasing in time"
            ),
            Error::TimeSpanTooLarge { seq, span } => write!(
                f,
                "timestamps of sequence {seq} span {span} s, more than i32::MAX"
            ),
            Error::Zero { field } => write!(f, "{field} = 0, must be at least 1"),
            Error::UnsupportedHeadDim { value, supported } => {
                write!(
                    f,
                    "head_dim = {value} is not supported; supported: {supported:?}"
                )
            }
            Error::OutOfRange {
                field,
                value,
                expected,
            } => write!(f, "{field} = {value}, expected {expected}"),
            Error::ChunkBoundaries {
                field,
                seq,
                index,
                value,
                reason,
            } => write!(f, "{field}[{index}] = {value} (sequence {seq}): {reason}"),
            Error::ChunksMismatch {
                seq,
                chunked_behaviors,
                batch_behaviors,
            } => write!(
                f,
                "chunks of sequence {seq} do not partition its behaviors (they cover \
                 {chunked_behaviors}, the batch has {batch_behaviors}, starting where they \
                 start): the chunks belong to another batch"
            ),
            Error::Padded {
                field,
                index,
                value,
                reason,
            } => write!(f, "{field}[{index}] = {value}: {reason}"),
            Error::NoCudaDriver => write!(
                f,
                "no CUDA driver: libcuda could not be loaded (is an NVIDIA driver installed?)"
            ),
            Error::NoGpu { ordinal, detail } => {
                write!(f, "no GPU with ordinal {ordinal}: {detail}")
            }
            Error::NoNvrtc => write!(
                f,
                "no NVRTC: libnvrtc could not be loaded (install the CUDA toolkit or the \
                 nvidia-cuda-nvrtc wheel and put its lib/ on LD_LIBRARY_PATH)"
            ),
            Error::Compile { kernel, log } => {
                write!(f, "kernel {kernel} failed to compile:\n{log}")
            }
            Error::NoKernel {
                entry,
                dtype,
                head_dim,
            } => write!(
                f,
                "no {entry} kernel for dtype {dtype}{}",
                head_dim.map_or(String::new(), |d| format!(" and head_dim {d}"))
            ),
            Error::UnsupportedArch { major, minor } => write!(
                f,
                "GPU compute capability {major}.{minor} is not supported; sm_80 or newer is needed"
            ),
            Error::DeviceMismatch {
                field,
                value,
                expected,
            } => write!(f, "{field} = {value} does not match {expected}"),
            Error::Cuda { call, detail } => write!(f, "CUDA call {call} failed: {detail}"),
            Error::KernelSource { path, detail } => {
                write!(f, "kernel source {path} (SPARSECTR_KERNEL_DIR): {detail}")
            }
        }
    }
}

impl std::error::Error for Error {}
