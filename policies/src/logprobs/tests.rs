//! The chunked head path against the whole logits on the fixture models: log-probs,
//! entropies and the adapter's gradients of a small SFT-style loss; and when it applies.

use super::*;
use crate::{Adapter, LoraConfig, Pretrained, Targets};
use candle_core::{Device, Var};
use std::path::PathBuf;

fn load(name: &str) -> Pretrained {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    Pretrained::load(&dir, DType::F32, &Device::Cpu).unwrap()
}

/// An adapter on `targets` with a seeded non-zero B, so A's gradient is non-zero too.
fn adapter(pre: &Pretrained, targets: Targets) -> Adapter {
    let cfg = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: targets,
        ..LoraConfig::default()
    };
    let adapter = Adapter::new(pre.model.as_ref(), cfg, 7).unwrap();
    for (i, (_, m)) in adapter.modules().enumerate() {
        let dims = m.b.as_tensor().dims().to_vec();
        let vals: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|j| (((i * 31 + j * 17) % 13) as f32 - 6.0) * 0.03)
            .collect();
        m.b.set(&Tensor::from_vec(vals, dims, &Device::Cpu).unwrap())
            .unwrap();
    }
    adapter
}

/// Three left-padded rows: 3 × 10 − 3 = 27 scored positions, which 5 does not divide.
fn batch(pre: &Pretrained) -> BatchInput {
    let rows: Vec<Vec<u32>> = ["12+35=47 and 8", "The quick brown fox", "a b"]
        .iter()
        .map(|s| pre.tokenizer.encode(s, true).unwrap())
        .collect();
    BatchInput::left_padded(&rows, 0, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Fixed distinct weights on the real targets of `lp` [b, t−1] (0 on padding).
fn weights(input: &BatchInput, lp: &Tensor) -> Tensor {
    let (b, t) = lp.dims2().unwrap();
    let w: Vec<f32> = (0..b * t)
        .map(|k| {
            let (i, j) = (k / t, k % t);
            if input.valid[i][j + 1] {
                0.5 + 0.1 * ((i * 7 + j * 3) % 5) as f32
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(w, (b, t), &Device::Cpu).unwrap()
}

/// A scoring: the values to compare and a loss to differentiate.
type Scoring<'a> = &'a dyn Fn() -> (Vec<Tensor>, Tensor);

/// (values, gradient of every adapter tensor) of a scoring under `chunks`.
fn run(chunks: HeadChunks, f: Scoring, adapter: &Adapter) -> (Vec<Tensor>, Vec<Tensor>) {
    let prev = set_head_chunks(chunks);
    let (vals, loss) = f();
    set_head_chunks(prev);
    let grads = loss.backward().unwrap();
    let g = adapter
        .named_vars()
        .iter()
        .map(|(n, v)| {
            grads
                .get(v)
                .unwrap_or_else(|| panic!("no gradient for {n}"))
                .clone()
        })
        .collect();
    (vals.iter().map(Tensor::detach).collect(), g)
}

fn assert_same(what: &str, a: &(Vec<Tensor>, Vec<Tensor>), b: &(Vec<Tensor>, Vec<Tensor>)) {
    for (x, y) in a.0.iter().zip(&b.0) {
        assert!(
            max_diff(x, y) <= 1e-5,
            "{what}: values differ by {}",
            max_diff(x, y)
        );
    }
    // Gradients: relative to the tensor's largest entry (the head's and the attention's
    // summation orders differ between the paths; entries reach ~10 on the fixtures).
    for (x, y) in a.1.iter().zip(&b.1) {
        let scale = max_diff(y, &y.zeros_like().unwrap());
        assert!(
            max_diff(x, y) <= 1e-5 * scale.max(1.0),
            "{what}: gradients differ by {} (largest entry {scale})",
            max_diff(x, y)
        );
    }
}

/// `token_logprobs` and the adapter gradients of `Σ w·lp` (an SFT loss), then `score_hidden`
/// at τ = 0.7 with a differentiable entropy bonus and with a metric entropy: chunks of 5
/// rows (recomputed in the backward) and the automatic size (one chunk here, kept) give the
/// whole logits' values (≤ 1e-5) and gradients (≤ 1e-5 of each tensor's largest entry).
#[test]
fn chunked_head_matches_whole_logits_on_fixtures() {
    for name in ["llama", "gpt2"] {
        let pre = load(name);
        let model = pre.model.as_ref();
        let ad = adapter(&pre, Targets::all_linear());
        let input = batch(&pre);
        let ctx = ForwardCtx::train(Some(&ad), None);
        assert!(frozen_head(
            model,
            &Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
            &ctx
        )
        .is_some());
        let sft = || {
            let lp = token_logprobs(model, &input, &ctx, 1.0).unwrap();
            let loss = (&lp * weights(&input, &lp)).unwrap().sum_all().unwrap();
            (vec![lp], loss)
        };
        let t = input.seq_len();
        let (input, ctx) = (&input, &ctx);
        let scored = |want: Entropy| {
            move || {
                let h = model
                    .forward_hidden(input, ctx, None)
                    .unwrap()
                    .narrow(1, 0, t - 1)
                    .unwrap();
                let y = input.ids.narrow(1, 1, t - 1).unwrap();
                let s = score_hidden(model, &h, &y, ctx, 0.7, want).unwrap();
                let ent = s.entropy.unwrap();
                assert_eq!(ent.track_op(), want == Entropy::Loss, "{name}");
                let w = weights(input, &s.logp);
                let loss = ((&s.logp * &w).unwrap() + (&ent * 0.1).unwrap().mul(&w).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                (vec![s.logp, ent], loss)
            }
        };
        let cases: [(&str, Scoring); 3] = [
            ("sft", &sft),
            ("entropy loss", &scored(Entropy::Loss)),
            ("entropy metric", &scored(Entropy::Metric)),
        ];
        for (what, f) in cases {
            let whole = run(HeadChunks::Off, f, &ad);
            for chunks in [HeadChunks::Rows(5), HeadChunks::Auto] {
                assert_same(
                    &format!("{name} {what} {chunks:?}"),
                    &run(chunks, f, &ad),
                    &whole,
                );
            }
        }
    }
}

/// The chunked path is taken only for a frozen head without a LoRA module, on the CPU, in
/// f32/f64; an adapter on `lm_head` or a trainable head keeps the whole logits.
#[test]
fn chunked_head_only_for_a_frozen_unadapted_head() {
    let mut pre = load("llama");
    let h = Tensor::zeros((1, 1, 64), DType::F32, &Device::Cpu).unwrap();
    let on_head = adapter(&pre, Targets::List(vec!["lm_head".into(), "q_proj".into()]));
    let model = pre.model.as_ref();
    assert!(frozen_head(model, &h, &ForwardCtx::inference(None)).is_some());
    assert!(frozen_head(model, &h, &ForwardCtx::train(Some(&on_head), None)).is_none());
    assert!(frozen_head(model, &h, &ForwardCtx::inference(Some(&on_head))).is_none());
    assert!(frozen_head(
        model,
        &h.to_dtype(DType::BF16).unwrap(),
        &ForwardCtx::inference(None)
    )
    .is_none());
    for (name, w) in pre.model.params_mut() {
        if name == "lm_head.weight" {
            *w = Var::from_tensor(w).unwrap().as_tensor().clone();
        }
    }
    let model = pre.model.as_ref();
    assert!(frozen_head(model, &h, &ForwardCtx::train(None, None)).is_none());
    // Frozen for a pass that records no gradients.
    assert!(frozen_head(model, &h, &ForwardCtx::inference(None)).is_some());
}
