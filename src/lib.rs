//! # sparsectr-attn
//!
//! EvoAttention, the sparse attention of SparseCTR ("Unleashing the Potential of Sparse Attention
//! on Long-term Behaviors for CTR Prediction", arXiv 2601.17836): a user's long behavior history
//! is cut into personal, time-aware chunks, and each query attends in three branches,
//!
//! - **global**: the summaries (mean K and V) of the chunks completed so far: long-term interests;
//! - **transition**: the last `m` behaviors of each chunk so far: how interests moved;
//! - **local**: a sliding window of the last `w` behaviors and the user token: short-term interests,
//!
//! each with a learnable per-head RelTemporal bias (log time gap, hour of day, weekday/weekend),
//! and the three outputs are gated and summed. The exact function is `SPEC.md`; this crate holds
//! its f64 reference, the chunking and the bias, and the CUDA kernels of the forward and the
//! backward (module `cuda`).
//!
//! ```
//! use sparsectr_attn::{reference, AttnConfig, Chunks, Dims, EvoAttention, Inputs, JaggedBatch};
//!
//! // One user: a user token, 6 behaviors in two sessions, 2 candidates at the request time.
//! let t0 = 1_700_000_000;
//! let ts = vec![0, t0, t0 + 5, t0 + 9, t0 + 86_400, t0 + 86_460, t0 + 86_500, t0 + 90_000, t0 + 90_000];
//! let batch = JaggedBatch::new(vec![0, 9], vec![2], true, ts)?;
//! let chunks = Chunks::personalized(&batch, 2)?; // cut once, at the one-day gap
//! assert_eq!(chunks.span(0), 1..4);
//!
//! let dims = Dims { heads: 2, head_dim: 32 };
//! let attn = EvoAttention::new(&batch, &chunks, dims, AttnConfig::new(1, 3))?;
//! let n = batch.num_tokens() * 2 * 32;
//! let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
//! let coeffs = [0.5f32, 0.2, 0.1, 1.0, 0.0, -0.3];
//! let inputs = Inputs { q: &x, k: &x, v: &x, coeffs: &coeffs, gates: None };
//! let out = reference::forward(&attn, &inputs)?;
//! assert_eq!(out.o.len(), n);
//! // The user token attends to nothing: its LSE is -inf in all three branches.
//! assert!(out.lse[..3].iter().all(|l| *l == f64::NEG_INFINITY));
//! # Ok::<(), sparsectr_attn::Error>(())
//! ```

// Every public item is documented; clippy's -D warnings in CI holds it.
#![warn(missing_docs)]

pub mod attention;
pub mod batch;
#[cfg(feature = "candle")]
pub mod candle_op;
pub mod chunking;
pub mod ctr_data;
pub mod cuda;
pub mod dtype;
pub mod error;
#[cfg(feature = "candle")]
pub mod model;
pub mod reference;
pub mod temporal;
pub mod workload;

pub use attention::{
    AttnConfig, Branch, Dims, EvoAttention, Gates, Inputs, Key, Widened, NUM_BRANCHES,
    SUPPORTED_HEAD_DIMS,
};
pub use batch::{JaggedBatch, Padded, SeqSpan};
pub use chunking::Chunks;
pub use dtype::{rel_l2_error, DType, Element};
pub use error::{Error, Result};
pub use temporal::RelTemporal;

// The README's Rust example, compiled and run by `cargo test` as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
