//! The SparseCTR model (paper Figure 1) in candle, trained end to end (feature `candle`).
//!
//! ```text
//! input layer   user token  = Linear(concat of profile-field embeddings)
//!               behavior / candidate token = item + category + hour-of-day + weekday + kind
//!                                            embeddings
//! L x block     x += Out(EvoAttention(QKV(RMSNorm(x)), coeffs, sigmoid(Gate(RMSNorm(x)))))
//!               x += SwiGLU(RMSNorm(x))
//! prediction    logit(c) = MLP([RMSNorm(x)[c], profile embedding of c's user])
//! ```
//!
//! All candidates of a request sit in the same sequence and are scored in one pass: the
//! attention's candidate isolation keeps them from seeing each other. The loss is binary cross
//! entropy over every candidate of the mini-batch. [`AttentionKind::Dense`] swaps EvoAttention
//! for the dense counterpart (one causal softmax over the user token and every behavior, no
//! gates) and keeps everything else, for comparison.
//!
//! The batch layout and its chunks ([`EvoLayout`]) are built once per mini-batch
//! ([`ModelBatch::new`]) and shared by every layer. Parameters live in a [`VarMap`] and are
//! initialised from the model's seed (candle's CPU generator cannot be seeded), so two models
//! with the same seed start from the same weights wherever their parameters coincide.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Result, Shape, Tensor, Var, D};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{AdamW, Embedding, Init, Linear, Optimizer, VarBuilder, VarMap};

use crate::candle_op::{dense_attention, evo_attention, EvoLayout};
use crate::ctr_data::{CtrDataset, Tokens};
use crate::workload::Rng;
use crate::{AttnConfig, Chunks, Dims};

/// Which attention the blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// SparseCTR's EvoAttention: global, transition and local branches, gated per token.
    Evo,
    /// The dense counterpart: one softmax over the user token and all behaviors so far.
    Dense,
}

impl AttentionKind {
    /// `"evo"` or `"dense"`.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKind::Evo => "evo",
            AttentionKind::Dense => "dense",
        }
    }
}

/// Sizes and hyperparameters of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Item ids are `0..num_items`.
    pub num_items: usize,
    /// Category ids are `0..num_categories`.
    pub num_categories: usize,
    /// Number of values of each profile field.
    pub profile_sizes: Vec<usize>,
    /// Width of each profile field's embedding.
    pub profile_dim: usize,
    /// Number of blocks `L`.
    pub layers: usize,
    /// Attention heads `H`; the model width is `H * D`.
    pub heads: usize,
    /// Head dimension `D` (32, 64 or 128).
    pub head_dim: usize,
    /// `P`: personal time-aware chunks per user.
    pub num_chunks: usize,
    /// `m`: tail tokens per chunk in the transition branch.
    pub tail_tokens: usize,
    /// `w`: local window.
    pub window: usize,
    /// Hidden width of the SwiGLU feed-forward.
    pub ffn_hidden: usize,
    /// Hidden width of the prediction MLP.
    pub mlp_hidden: usize,
    /// EvoAttention or dense.
    pub attention: AttentionKind,
    /// Seed of the initial weights.
    pub seed: u64,
}

impl ModelConfig {
    /// The model width `H * D`.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn dims(&self) -> Dims {
        Dims {
            heads: self.heads,
            head_dim: self.head_dim,
        }
    }
}

/// A mini-batch on the device: the shared attention layout and the token features as tensors.
pub struct ModelBatch {
    /// Batch, chunks and attention parameters, shared by every layer.
    pub layout: Arc<EvoLayout>,
    /// Number of tokens `T`, over all sequences.
    pub num_tokens: usize,
    items: Tensor,         // [T] u32
    categories: Tensor,    // [T] u32
    hours: Tensor,         // [T] u32
    weekdays: Tensor,      // [T] u32
    kinds: Tensor,         // [T] u32
    is_user: Tensor,       // [T, 1] f32, 1 at user tokens
    seq_of_token: Tensor,  // [T] u32
    profile: Tensor,       // [B, F] u32
    candidates: Tensor,    // [N] u32, token index of each candidate
    candidate_seq: Tensor, // [N] u32
    /// `[N]` f32 labels.
    pub labels: Tensor,
}

impl ModelBatch {
    /// Chunks the batch once (`P` personal chunks per user) and uploads the features.
    pub fn new(tokens: &Tokens, config: &ModelConfig, device: &Device) -> Result<ModelBatch> {
        let batch = tokens.batch.clone();
        let chunks =
            Chunks::personalized(&batch, config.num_chunks).map_err(candle_core::Error::wrap)?;
        let attn = AttnConfig::new(config.tail_tokens, config.window);
        let layout =
            EvoLayout::new(batch, chunks, config.dims(), attn).map_err(candle_core::Error::wrap)?;
        let t = tokens.batch.num_tokens();
        let b = tokens.batch.num_seqs();
        let u32s = |v: &[u32]| Tensor::from_slice(v, v.len(), device);
        let is_user: Vec<f32> = tokens
            .kinds
            .iter()
            .map(|&k| f32::from(k == crate::ctr_data::TokenKind::User as u32))
            .collect();
        Ok(ModelBatch {
            layout: Arc::new(layout),
            num_tokens: t,
            items: u32s(&tokens.items)?,
            categories: u32s(&tokens.categories)?,
            hours: u32s(&tokens.hours)?,
            weekdays: u32s(&tokens.weekdays)?,
            kinds: u32s(&tokens.kinds)?,
            is_user: Tensor::from_vec(is_user, (t, 1), device)?,
            seq_of_token: u32s(&tokens.seq_of_token)?,
            profile: Tensor::from_slice(&tokens.profile, (b, config.profile_sizes.len()), device)?,
            candidates: u32s(&tokens.candidates)?,
            candidate_seq: u32s(&tokens.candidate_seq)?,
            labels: Tensor::from_slice(&tokens.labels, tokens.labels.len(), device)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

/// Root-mean-square normalisation with a learned gain, written with differentiable tensor ops
/// (candle-nn's `RmsNorm::forward` calls a fused kernel that records no backward).
struct RmsNorm {
    weight: Tensor, // [width]
}

impl RmsNorm {
    const EPS: f64 = 1e-6;

    fn new(width: usize, vb: VarBuilder) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get_with_hints(width, "weight", Init::Const(1.0))?,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(mean_sq + Self::EPS)?.sqrt()?)?
            .broadcast_mul(&self.weight)
    }
}

/// An embedding table initialised with a small normal spread.
fn embedding(rows: usize, width: usize, vb: VarBuilder) -> Result<Embedding> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: 0.1,
    };
    Ok(Embedding::new(
        vb.get_with_hints((rows, width), "weight", init)?,
        width,
    ))
}

/// Profile features to the user token; item, category, time and kind to the other tokens.
struct InputLayer {
    profile: Vec<Embedding>, // one [S_f, profile_dim] per field
    user: Linear,            // F * profile_dim -> width
    item: Embedding,
    category: Embedding,
    hour: Embedding,
    weekday: Embedding,
    kind: Embedding,
}

impl InputLayer {
    fn new(c: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let width = c.width();
        let profile = c
            .profile_sizes
            .iter()
            .enumerate()
            .map(|(f, &size)| embedding(size, c.profile_dim, vb.pp(format!("profile{f}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(InputLayer {
            profile,
            user: candle_nn::linear(c.profile_sizes.len() * c.profile_dim, width, vb.pp("user"))?,
            item: embedding(c.num_items, width, vb.pp("item"))?,
            category: embedding(c.num_categories, width, vb.pp("category"))?,
            hour: embedding(24, width, vb.pp("hour"))?,
            weekday: embedding(7, width, vb.pp("weekday"))?,
            kind: embedding(3, width, vb.pp("kind"))?,
        })
    }

    /// `[B, F * profile_dim]`: the profile embeddings of each sequence's user, concatenated.
    fn profile(&self, b: &ModelBatch) -> Result<Tensor> {
        let fields = self
            .profile
            .iter()
            .enumerate()
            .map(|(f, emb)| {
                // candle's CUDA index_select reads its ids as contiguous whatever their strides
                // (candle-kernels 0.11.1, indexing.cu), so a column of `profile` is copied first.
                emb.forward(&b.profile.narrow(1, f, 1)?.squeeze(1)?.contiguous()?)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&fields, 1)
    }

    /// `[T, width]`: the input token of every position.
    fn tokens(&self, b: &ModelBatch, profile: &Tensor) -> Result<Tensor> {
        let user = self
            .user
            .forward(profile)?
            .index_select(&b.seq_of_token, 0)?;
        let other = (self.item.forward(&b.items)?
            + self.category.forward(&b.categories)?
            + self.hour.forward(&b.hours)?
            + self.weekday.forward(&b.weekdays)?
            + self.kind.forward(&b.kinds)?)?;
        // User rows take the profile token, the others their feature sum.
        let keep = b.is_user.affine(-1.0, 1.0)?;
        user.broadcast_mul(&b.is_user)? + other.broadcast_mul(&keep)?
    }
}

/// Pre-norm attention: RMSNorm, fused Q/K/V, EvoAttention (or dense), output projection.
struct AttentionLayer {
    norm: RmsNorm,
    qkv: Linear,           // width -> 3 * H * D
    gates: Option<Linear>, // width -> H * 3, EvoAttention only
    coeffs: Tensor,        // [H, 3] RelTemporal (s1, s2, s3) per head
    out: Linear,           // H * D -> width
    kind: AttentionKind,
    dims: Dims,
}

impl AttentionLayer {
    fn new(c: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let width = c.width();
        let gates = match c.attention {
            AttentionKind::Evo => Some(candle_nn::linear(width, c.heads * 3, vb.pp("gates"))?),
            AttentionKind::Dense => None,
        };
        Ok(AttentionLayer {
            norm: RmsNorm::new(width, vb.pp("norm"))?,
            qkv: candle_nn::linear_no_bias(width, 3 * width, vb.pp("qkv"))?,
            gates,
            coeffs: vb.get_with_hints((c.heads, 3), "coeffs", Init::Const(0.0))?,
            out: candle_nn::linear_no_bias(width, width, vb.pp("out"))?,
            kind: c.attention,
            dims: c.dims(),
        })
    }

    /// `x` `[T, width]` to the attention's contribution `[T, width]`.
    fn forward(&self, x: &Tensor, layout: &Arc<EvoLayout>) -> Result<Tensor> {
        let t = x.dim(0)?;
        let Dims { heads, head_dim } = self.dims;
        let h = self.norm.forward(x)?;
        let qkv = self.qkv.forward(&h)?.reshape((t, 3, heads, head_dim))?;
        let o = match (self.kind, &self.gates) {
            (AttentionKind::Evo, Some(gates)) => {
                let g = candle_nn::ops::sigmoid(&gates.forward(&h)?)?.reshape((t, heads, 3))?;
                evo_attention(&qkv, &self.coeffs, &g, layout)?
            }
            (AttentionKind::Dense, None) => dense_attention(&qkv, &self.coeffs, layout)?,
            (kind, _) => candle_core::bail!("attention layer built inconsistently for {kind:?}"),
        };
        self.out.forward(&o.reshape((t, heads * head_dim))?)
    }
}

/// Pre-norm SwiGLU feed-forward.
struct FeedForward {
    norm: RmsNorm,
    up: Linear,   // width -> 2 * hidden (gate and value)
    down: Linear, // hidden -> width
}

impl FeedForward {
    fn new(c: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(FeedForward {
            norm: RmsNorm::new(c.width(), vb.pp("norm"))?,
            up: candle_nn::linear_no_bias(c.width(), 2 * c.ffn_hidden, vb.pp("up"))?,
            down: candle_nn::linear_no_bias(c.ffn_hidden, c.width(), vb.pp("down"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.up.forward(&self.norm.forward(x)?)?;
        self.down.forward(&candle_nn::ops::swiglu(&h)?)
    }
}

/// One SparseBlock: attention then feed-forward, each with a residual connection.
struct SparseBlock {
    attention: AttentionLayer,
    ffn: FeedForward,
}

impl SparseBlock {
    fn forward(&self, x: &Tensor, layout: &Arc<EvoLayout>) -> Result<Tensor> {
        let x = (x + self.attention.forward(x, layout)?)?;
        &x + self.ffn.forward(&x)?
    }
}

/// Each candidate's final state with its user's profile embedding, through an MLP, to a logit.
struct PredictionHead {
    norm: RmsNorm,
    hidden: Linear, // width + F * profile_dim -> mlp_hidden
    out: Linear,    // mlp_hidden -> 1
}

impl PredictionHead {
    fn new(c: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let input = c.width() + c.profile_sizes.len() * c.profile_dim;
        Ok(PredictionHead {
            norm: RmsNorm::new(c.width(), vb.pp("norm"))?,
            hidden: candle_nn::linear(input, c.mlp_hidden, vb.pp("hidden"))?,
            out: candle_nn::linear(c.mlp_hidden, 1, vb.pp("out"))?,
        })
    }

    /// `[N]` logits from `x` `[T, width]` and `profile` `[B, F * profile_dim]`.
    fn forward(&self, x: &Tensor, profile: &Tensor, b: &ModelBatch) -> Result<Tensor> {
        let cand = self.norm.forward(&x.index_select(&b.candidates, 0)?)?;
        let user = profile.index_select(&b.candidate_seq, 0)?;
        let h = self
            .hidden
            .forward(&Tensor::cat(&[&cand, &user], 1)?)?
            .silu()?;
        self.out.forward(&h)?.squeeze(1)
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// SparseCTR: input layer, `L` SparseBlocks, prediction head.
pub struct SparseCtr {
    config: ModelConfig,
    vars: VarMap,
    input: InputLayer,
    blocks: Vec<SparseBlock>,
    head: PredictionHead,
}

impl SparseCtr {
    /// A freshly initialised model on `device` (f32 weights).
    pub fn new(config: ModelConfig, device: &Device) -> Result<SparseCtr> {
        if config.layers == 0 || config.profile_sizes.is_empty() {
            candle_core::bail!("the model needs at least one layer and one profile field");
        }
        config.dims().validate().map_err(candle_core::Error::wrap)?;
        let vars = VarMap::new();
        let backend = SeededInit {
            vars: vars.clone(),
            seed: config.seed,
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
        let input = InputLayer::new(&config, vb.pp("input"))?;
        let blocks = (0..config.layers)
            .map(|l| {
                let vb = vb.pp(format!("block{l}"));
                Ok(SparseBlock {
                    attention: AttentionLayer::new(&config, vb.pp("attention"))?,
                    ffn: FeedForward::new(&config, vb.pp("ffn"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = PredictionHead::new(&config, vb.pp("head"))?;
        Ok(SparseCtr {
            config,
            vars,
            input,
            blocks,
            head,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Every trainable variable (for the optimizer).
    pub fn vars(&self) -> Vec<Var> {
        self.vars.all_vars()
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// `[N]` click logits of every candidate of the batch, in [`Tokens::candidates`] order.
    pub fn forward(&self, b: &ModelBatch) -> Result<Tensor> {
        let profile = self.input.profile(b)?;
        let mut x = self.input.tokens(b, &profile)?;
        for block in &self.blocks {
            x = block.forward(&x, &b.layout)?;
        }
        self.head.forward(&x, &profile, b)
    }

    /// The per-head RelTemporal coefficients `(s1, s2, s3)` of each layer, `[L][H * 3]`.
    pub fn coeffs(&self) -> Result<Vec<Vec<f32>>> {
        self.blocks
            .iter()
            .map(|b| b.attention.coeffs.flatten_all()?.to_vec1())
            .collect()
    }
}

/// Mean binary cross entropy of `logits` against `labels` (both `[N]`), computed stably as
/// `max(z, 0) - z y + log(1 + exp(-|z|))` (candle-nn's version takes `log(sigmoid(z))`, which
/// underflows for confident logits).
pub fn bce_with_logits(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    ((logits.relu()? - (logits * labels)?)? + softplus_neg_abs)?.mean_all()
}

/// Area under the ROC curve of `scores` against `labels` (ties count half); `None` when either
/// class is missing or the two lengths differ.
pub fn auc(scores: &[f32], labels: &[f32]) -> Option<f64> {
    if scores.len() != labels.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = labels.iter().filter(|&&y| y > 0.5).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    // Sum of the (average) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mid_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mid_rank * order[i..=j].iter().filter(|&&k| labels[k] > 0.5).count() as f64;
        i = j + 1;
    }
    let p = positives as f64;
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// Held-out quality of a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// ROC AUC over all candidates; `None` when the labels hold one class only.
    pub auc: Option<f64>,
    /// Mean binary cross entropy (natural log); NaN when there are no candidates.
    pub log_loss: f64,
    /// Number of candidates scored.
    pub candidates: usize,
}

/// One optimizer step on a mini-batch; returns the batch's mean loss before the step, or `None`
/// (and no step) when the batch has no candidates.
pub fn train_step(model: &SparseCtr, opt: &mut AdamW, batch: &ModelBatch) -> Result<Option<f32>> {
    if batch.labels.elem_count() == 0 {
        return Ok(None);
    }
    let loss = bce_with_logits(&model.forward(batch)?, &batch.labels)?;
    opt.backward_step(&loss)?;
    Ok(Some(loss.to_scalar::<f32>()?))
}

/// AUC and log loss of `model` on the requests at `indices`, `batch_size` requests at a time.
pub fn evaluate(
    model: &SparseCtr,
    data: &CtrDataset,
    indices: &[usize],
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation> {
    let mut logits: Vec<f32> = Vec::new();
    let mut labels: Vec<f32> = Vec::new();
    for part in indices.chunks(batch_size.max(1)) {
        let tokens = data.tokens(part).map_err(candle_core::Error::wrap)?;
        if tokens.labels.is_empty() {
            continue;
        }
        let batch = ModelBatch::new(&tokens, &model.config, device)?;
        logits.extend(model.forward(&batch)?.to_vec1::<f32>()?);
        labels.extend_from_slice(&tokens.labels);
    }
    let log_loss = logits
        .iter()
        .zip(&labels)
        .map(|(&z, &y)| {
            let (z, y) = (z as f64, y as f64);
            z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
        })
        .sum::<f64>()
        / labels.len() as f64;
    Ok(Evaluation {
        auc: auc(&logits, &labels),
        log_loss,
        candidates: labels.len(),
    })
}

/// A [`VarMap`] whose new variables are drawn from a generator seeded by the model's seed and
/// the variable's name (candle's CPU generator cannot be seeded).
struct SeededInit {
    vars: VarMap,
    seed: u64,
}

impl SeededInit {
    fn init(&self, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
        // FNV-1a of the name: the same name gets the same values whatever the creation order.
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = Rng::new(self.seed ^ hash);
        let n = shape.elem_count();
        let uniform = |rng: &mut Rng, lo: f64, hi: f64| (lo + (hi - lo) * rng.uniform()) as f32;
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| (mean + stdev * rng.normal()) as f32)
                .collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| uniform(&mut rng, lo, up)).collect(),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan_of(fan, shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => {
                        (0..n).map(|_| (std * rng.normal()) as f32).collect()
                    }
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n).map(|_| uniform(&mut rng, -bound, bound)).collect()
                    }
                }
            }
        }
    }
}

fn fan_of(fan: FanInOut, shape: &Shape) -> usize {
    fan.for_shape(shape).max(1)
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = lock(self.vars.data())?;
        if let Some(var) = vars.get(name) {
            if var.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let values = Tensor::from_vec(self.init(&s, name, h), s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&values)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: the model's variables are created with a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        lock(self.vars.data()).is_ok_and(|v| v.contains_key(name))
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("the variable map's lock is poisoned".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ties_half() {
        assert_eq!(auc(&[0.1, 0.9], &[0.0, 1.0]), Some(1.0));
        assert_eq!(auc(&[0.9, 0.1], &[0.0, 1.0]), Some(0.0));
        assert_eq!(auc(&[0.5, 0.5, 0.5], &[0.0, 1.0, 0.0]), Some(0.5));
        // Positives at ranks 2 and 4 of 4: (2 + 4 - 3) / (2 * 2).
        assert_eq!(
            auc(&[0.1, 0.2, 0.3, 0.4], &[0.0, 1.0, 0.0, 1.0]),
            Some(0.75)
        );
        assert_eq!(auc(&[0.1, 0.2], &[1.0, 1.0]), None);
        // Lengths that differ are no AUC (they indexed past the labels).
        assert_eq!(auc(&[0.1, 0.2, 0.3], &[0.0, 1.0]), None);
        assert_eq!(auc(&[0.1], &[0.0, 1.0]), None);
    }

    #[test]
    fn bce_matches_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::new(&[-30.0f32, -1.0, 0.0, 2.0, 25.0], &dev)?;
        let y = Tensor::new(&[0.0f32, 1.0, 0.0, 1.0, 0.0], &dev)?;
        let got = bce_with_logits(&z, &y)?.to_scalar::<f32>()? as f64;
        let want: f64 = [
            (-30.0f64, 0.0),
            (-1.0, 1.0),
            (0.0, 0.0),
            (2.0, 1.0),
            (25.0, 0.0),
        ]
        .iter()
        .map(|&(z, y)| {
            let p = 1.0 / (1.0 + (-z).exp());
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum::<f64>()
            / 5.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        Ok(())
    }
}
