//! A short end-to-end training run of the SparseCTR model on synthetic CTR data (CPU): the
//! training loss must fall well below where it started and below what the click rate alone
//! gives, and the held-out AUC must clear a constant predictor's 0.5 by a wide margin. Also runs
//! the dense-attention variant (`cargo test --release --features candle --test train_smoke`).
#![cfg(feature = "candle")]

use std::sync::Once;
use std::time::Instant;

use candle_core::Device;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use sparsectr_attn::ctr_data::{shuffle, CtrConfig, CtrDataset};
use sparsectr_attn::model::{
    bce_with_logits, evaluate, train_step, AttentionKind, ModelBatch, ModelConfig, SparseCtr,
};
use sparsectr_attn::temporal::is_weekend;
use sparsectr_attn::workload::Rng;

/// candle's CPU thread pool spin-waits on every op; on a 2-core machine one thread is about 4x
/// faster for a model this small (see the training example). Set before any candle call; the
/// `Once` blocks the other test until it is done, so no thread reads the environment meanwhile.
fn one_candle_thread() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
    });
}

fn data() -> CtrDataset {
    let cfg = CtrConfig {
        users: 1500,
        max_behaviors: 32,
        candidates: 16,
        seed: 7,
        ..CtrConfig::default()
    };
    CtrDataset::generate(&cfg).unwrap().0
}

fn config(data: &CtrDataset, attention: AttentionKind) -> ModelConfig {
    ModelConfig {
        num_items: data.num_items,
        num_categories: data.num_categories,
        profile_sizes: data.profile_sizes.clone(),
        profile_dim: 8,
        layers: 1,
        heads: 2,
        head_dim: 32,
        num_chunks: 4,
        tail_tokens: 1,
        window: 8,
        ffn_hidden: 128,
        mlp_hidden: 32,
        attention,
        seed: 3,
    }
}

/// Log loss of always predicting the click rate `p` (the best constant predictor).
fn constant_log_loss(p: f64) -> f64 {
    -(p * p.ln() + (1.0 - p) * (1.0 - p).ln())
}

#[test]
fn training_learns_the_clicks() {
    one_candle_thread();
    let started = Instant::now();
    let data = data();
    let dev = Device::Cpu;
    let (train, test) = data.split(0.25, 1);
    let model = SparseCtr::new(config(&data, AttentionKind::Evo), &dev).unwrap();
    let params = ParamsAdamW {
        lr: 3e-3,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(model.vars(), params).unwrap();
    // Training loss measured on a fixed part of the training set, before and after.
    let probe = &train[..200];
    let before = evaluate(&model, &data, probe, 64, &dev).unwrap();
    let mut order = train.clone();
    for epoch in 0..3 {
        shuffle(&mut Rng::new(epoch), &mut order);
        for part in order.chunks(16) {
            let tokens = data.tokens(part).unwrap();
            let batch = ModelBatch::new(&tokens, model.config(), &dev).unwrap();
            let loss = train_step(&model, &mut opt, &batch)
                .unwrap()
                .expect("candidates");
            assert!(loss.is_finite(), "loss {loss} in epoch {epoch}");
        }
    }
    let after = evaluate(&model, &data, probe, 64, &dev).unwrap();
    let held_out = evaluate(&model, &data, &test, 64, &dev).unwrap();
    let rate = data.click_rate();
    let auc = held_out.auc.expect("both classes in the held-out set");
    println!(
        "train log loss {:.4} -> {:.4} (constant predictor {:.4}); held-out AUC {auc:.4}, log \
         loss {:.4} over {} candidates; {:.1} s",
        before.log_loss,
        after.log_loss,
        constant_log_loss(rate),
        held_out.log_loss,
        held_out.candidates,
        started.elapsed().as_secs_f64()
    );
    assert!(
        after.log_loss.is_finite() && after.log_loss < 0.75 * before.log_loss,
        "training loss {} is not well below its start {}",
        after.log_loss,
        before.log_loss
    );
    assert!(
        after.log_loss < constant_log_loss(rate) - 0.02,
        "training loss {} does not beat the click rate alone ({})",
        after.log_loss,
        constant_log_loss(rate)
    );
    assert!(auc > 0.6, "held-out AUC {auc} is not clearly above 0.5");
}

#[test]
fn dense_mode_runs_and_differs() {
    one_candle_thread();
    let data = data();
    let dev = Device::Cpu;
    // Requests with a behavior on the other side of a weekend boundary from the request, so that
    // every RelTemporal feature (Wk included) is non-zero for some pair.
    let crossing: Vec<usize> = (0..data.requests.len())
        .filter(|&i| {
            let r = &data.requests[i];
            let weekend = is_weekend(r.request_time, 0);
            r.behaviors.iter().any(|b| is_weekend(b.time, 0) != weekend)
        })
        .take(8)
        .collect();
    assert_eq!(crossing.len(), 8);
    let tokens = data.tokens(&crossing).unwrap();
    let evo = SparseCtr::new(config(&data, AttentionKind::Evo), &dev).unwrap();
    let dense = SparseCtr::new(config(&data, AttentionKind::Dense), &dev).unwrap();
    // Same seed: the dense model is the sparse one without the gate layer (width x 3H + 3H).
    let gates = 64 * 6 + 6;
    assert_eq!(evo.num_parameters(), dense.num_parameters() + gates);
    let batch = ModelBatch::new(&tokens, dense.config(), &dev).unwrap();
    let evo_logits: Vec<f32> = evo.forward(&batch).unwrap().to_vec1().unwrap();
    let dense_logits: Vec<f32> = dense.forward(&batch).unwrap().to_vec1().unwrap();
    assert_eq!(dense_logits.len(), tokens.num_candidates());
    assert!(dense_logits.iter().all(|z| z.is_finite()));
    let differ = evo_logits
        .iter()
        .zip(&dense_logits)
        .filter(|(a, b)| (*a - *b).abs() > 1e-4)
        .count();
    assert!(
        differ > dense_logits.len() / 2,
        "only {differ} logits differ"
    );

    // Fitting one batch: the dense model's loss on it must fall, and its RelTemporal
    // coefficients must move (gradients reach them through the dense op).
    let start = dense.coeffs().unwrap();
    let mut opt = AdamW::new(dense.vars(), ParamsAdamW::default()).unwrap();
    let first = bce_with_logits(&dense.forward(&batch).unwrap(), &batch.labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut last = first;
    for _ in 0..20 {
        last = train_step(&dense, &mut opt, &batch)
            .unwrap()
            .expect("candidates");
    }
    assert!(last < 0.5 * first, "dense loss {first} -> {last}");
    let moved = dense.coeffs().unwrap()[0]
        .iter()
        .zip(&start[0])
        .all(|(a, b)| a != b);
    assert!(
        moved,
        "dense RelTemporal coefficients did not all move: {start:?} -> {:?}",
        dense.coeffs().unwrap()
    );
}
