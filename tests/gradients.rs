//! Gradients reach every adapter tensor, exactly (f64 finite differences), and never the
//! frozen base weights.

mod common;
use common::*;
use rlft::policies::candle_core::{DType, Tensor, Var};
use rlft::policies::logprobs::token_logprobs;
use rlft::policies::{Adapter, BatchInput, ForwardCtx, Pretrained};

fn batch(pre: &Pretrained) -> BatchInput {
    let rows = vec![
        pre.tokenizer.encode("12+35=47", true).unwrap(),
        pre.tokenizer.encode("The quick brown fox", true).unwrap(),
    ];
    BatchInput::left_padded(&rows, 0, &pre.model.info().device).unwrap()
}

/// `L = Σ w_ij · logp_ij` over real target tokens, with fixed distinct weights `w`.
fn loss(pre: &Pretrained, input: &BatchInput, ctx: &ForwardCtx) -> Tensor {
    let lp = token_logprobs(pre.model.as_ref(), input, ctx, 1.0).unwrap();
    let (b, t) = lp.dims2().unwrap();
    let mut w = vec![0f64; b * t];
    for i in 0..b {
        for j in 0..t {
            if input.valid[i][j + 1] {
                w[i * t + j] = 0.5 + 0.1 * ((i * 7 + j * 3) % 5) as f64;
            }
        }
    }
    let w = Tensor::from_vec(w, (b, t), &pre.model.info().device)
        .unwrap()
        .to_dtype(lp.dtype())
        .unwrap();
    (lp * w).unwrap().sum_all().unwrap()
}

#[test]
fn every_adapter_tensor_gets_a_gradient_and_no_base_weight_does() {
    for m in FAMILIES {
        let pre = load(m, DType::F32);
        let adapter = adapter_with_nonzero_b(&pre, 0.0);
        let input = batch(&pre);
        let l = loss(&pre, &input, &ForwardCtx::train(Some(&adapter), None));
        let grads = l.backward().unwrap();
        let vars = adapter.named_vars();
        assert!(
            vars.len() >= 8,
            "{m}: all-linear adapts every block's layers"
        );
        for (name, v) in &vars {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{m}: no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{m}: zero gradient for {name}"
            );
        }
        for lin in pre.model.linears() {
            assert!(
                grads.get(lin.dense_weight().unwrap()).is_none(),
                "{m}: frozen {} got a gradient",
                lin.path
            );
        }
    }
}

#[test]
fn adapter_gradients_match_finite_differences_in_f64() {
    for m in FAMILIES {
        let pre = load(m, DType::F64);
        let adapter = adapter_with_nonzero_b(&pre, 0.0);
        let input = batch(&pre);
        let grads = loss(&pre, &input, &ForwardCtx::train(Some(&adapter), None))
            .backward()
            .unwrap();
        let vars = adapter.named_vars();
        // First and last layers' A and B, and a middle module.
        let picks = [0, 1, vars.len() / 2, vars.len() - 2, vars.len() - 1];
        let h = 1e-5;
        let mut checked = 0;
        for &vi in &picks {
            let (name, var) = &vars[vi];
            let g = grads
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for &e in &[0usize, base.len() / 3, base.len() - 1] {
                let at = |delta: f64| -> f64 {
                    let mut v = base.clone();
                    v[e] += delta;
                    let t = Tensor::from_vec(v, var.as_tensor().shape(), var.device()).unwrap();
                    var.set(&t).unwrap();
                    let l = loss(&pre, &input, &ForwardCtx::inference(Some(&adapter)));
                    l.to_scalar::<f64>().unwrap()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                restore(var, &base);
                let ad = g[e];
                assert!(
                    (fd - ad).abs() <= 1e-6 + 1e-5 * ad.abs(),
                    "{m} {name}[{e}]: autograd {ad} vs finite difference {fd}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 15);
    }
}

fn restore(var: &Var, vals: &[f64]) {
    let t = Tensor::from_vec(vals.to_vec(), var.as_tensor().shape(), var.device()).unwrap();
    var.set(&t).unwrap();
}

#[test]
fn lora_dropout_acts_in_training_only_and_is_seeded() {
    use rand::SeedableRng;
    use std::sync::Mutex;
    let pre = load("llama", DType::F32);
    let adapter = adapter_with_nonzero_b(&pre, 0.5);
    let input = batch(&pre);
    let eval = loss(&pre, &input, &ForwardCtx::inference(Some(&adapter)))
        .to_scalar::<f32>()
        .unwrap();
    let eval2 = loss(&pre, &input, &ForwardCtx::train(Some(&adapter), None))
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(
        eval, eval2,
        "without a dropout generator the pass is deterministic"
    );
    let run = |seed: u64| {
        let rng = Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        loss(&pre, &input, &ForwardCtx::train(Some(&adapter), Some(&rng)))
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_ne!(run(1), eval, "dropout changes the training loss");
    assert_eq!(run(1), run(1), "the same seed gives the same masks");
    assert_ne!(run(1), run(2));
}

/// The loss of [`loss`] from final hidden states (what a checkpointed backward needs).
fn loss_from_hidden(
    pre: &Pretrained,
    input: &BatchInput,
    hidden: &Tensor,
    ctx: &ForwardCtx,
) -> Tensor {
    use rlft::policies::logprobs::next_token_logprobs;
    let lp = next_token_logprobs(pre.model.as_ref(), input, hidden, ctx, 1.0).unwrap();
    let (b, t) = lp.dims2().unwrap();
    let mut w = vec![0f64; b * t];
    for i in 0..b {
        for j in 0..t {
            if input.valid[i][j + 1] {
                w[i * t + j] = 0.5 + 0.1 * ((i * 7 + j * 3) % 5) as f64;
            }
        }
    }
    let w = Tensor::from_vec(w, (b, t), &pre.model.info().device)
        .unwrap()
        .to_dtype(lp.dtype())
        .unwrap();
    (lp * w).unwrap().sum_all().unwrap()
}

/// The adapter's gradients through `backward_from_hidden`, summed over its stores, and the
/// dropout generator's position after the pass.
fn grads_of(
    pre: &Pretrained,
    adapter: &Adapter,
    checkpointing: bool,
    dropout_seed: Option<u64>,
) -> (Vec<Vec<f64>>, f64, Option<u128>) {
    use rand::SeedableRng;
    use rlft::policies::backward::backward_from_hidden;
    use std::sync::Mutex;
    let input = batch(pre);
    let rng = dropout_seed.map(|s| Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(s)));
    let ctx = ForwardCtx::train(Some(adapter), rng.as_ref());
    let vars = adapter.named_vars();
    let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut value = 0f64;
    let mut stores = 0;
    backward_from_hidden::<rlft::policies::PolicyError>(
        pre.model.as_ref(),
        &input,
        &ctx,
        checkpointing,
        &mut |h| {
            let l = loss_from_hidden(pre, &input, h, &ctx);
            value = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            Ok(l)
        },
        &mut |store| {
            stores += 1;
            for (slot, (_, v)) in sums.iter_mut().zip(&vars) {
                if let Some(g) = store.get(v) {
                    *slot = Some(match slot.take() {
                        Some(s) => (s + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok(())
        },
    )
    .unwrap();
    let n_blocks = pre.model.info().num_layers;
    // Checkpointed: one store for the last block with the head, one per other block.
    assert_eq!(stores, if checkpointing { n_blocks } else { 1 });
    let grads = sums
        .into_iter()
        .map(|g| {
            g.expect("every adapter tensor gets a gradient")
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect();
    let pos = rng.map(|r| r.into_inner().unwrap().get_word_pos());
    (grads, value, pos)
}

#[test]
fn checkpointed_gradients_equal_the_whole_backward() {
    for m in FAMILIES {
        // f64: equal to 1e-12, with and without dropout (the recompute draws the same masks
        // and leaves the generator where a whole pass leaves it).
        let pre = load(m, DType::F64);
        for (p, seed) in [(0.0, None), (0.3, Some(5))] {
            let adapter = adapter_with_nonzero_b(&pre, p);
            let (whole, lw, pw) = grads_of(&pre, &adapter, false, seed);
            let (ckpt, lc, pc) = grads_of(&pre, &adapter, true, seed);
            assert!(
                (lw - lc).abs() <= 1e-12 * lw.abs().max(1.0),
                "{m}: loss {lw} vs {lc}"
            );
            assert_eq!(pw, pc, "{m}: dropout generator position");
            let mut worst = 0f64;
            for (a, b) in whole.iter().zip(&ckpt) {
                for (x, y) in a.iter().zip(b) {
                    worst = worst.max((x - y).abs() / x.abs().max(1.0));
                }
            }
            assert!(worst <= 1e-12, "{m} p={p}: gradients differ by {worst:e}");
        }
        // f32 (the fused CPU ops, whose recompute skips each block's last product): within
        // rounding, with and without dropout.
        let pre = load(m, DType::F32);
        for (p, seed) in [(0.0, None), (0.3, Some(5))] {
            let adapter = adapter_with_nonzero_b(&pre, p);
            let (whole, _, pw) = grads_of(&pre, &adapter, false, seed);
            let (ckpt, _, pc) = grads_of(&pre, &adapter, true, seed);
            assert_eq!(pw, pc, "{m} f32: dropout generator position");
            for (a, b) in whole.iter().zip(&ckpt) {
                let scale = a.iter().fold(0f64, |s, x| s.max(x.abs())).max(1e-6);
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= 1e-4 * scale, "{m} f32 p={p}: {x} vs {y}");
                }
            }
        }
    }
}
