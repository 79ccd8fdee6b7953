//! A group's prompt computed once (the packed layout, `rl::layout`) gives what the per-row
//! layout gives: states, log-probs, entropies and adapter gradients (with and without
//! gradient checkpointing), on ragged prompts and responses, groups whose rows are not
//! adjacent, a group of one, a sliding window; and an RL run with it equals one without.

mod common;
use common::rl_run::{config, quiet, series};
use common::*;
use rlft::policies::backward::backward_from_hidden;
use rlft::policies::candle_core::{DType, Device, Tensor};
use rlft::policies::logprobs::Entropy;
use rlft::policies::{Adapter, ForwardCtx, Generation, Pretrained};
use rlft::rewards::default_registry;
use rlft::rl::layout::Layout;
use rlft::rl::rollout::{score, score_hidden_states, Rollouts};
use rlft::rl::trainer::run;

/// The fixture families, and Mistral (Llama with a sliding window of 3, shorter than the
/// prompts and responses here).
fn models(dtype: DType) -> Vec<(String, Pretrained, Option<TempDir>)> {
    let mut out: Vec<_> = FAMILIES
        .iter()
        .map(|m| (m.to_string(), load(m, dtype), None))
        .collect();
    let tmp = TempDir::new(&format!("mistral-window-{dtype:?}"));
    copy_dir(&fixture("llama"), &tmp.0);
    let p = tmp.0.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["model_type"] = "mistral".into();
    c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    c["sliding_window"] = 3.into();
    std::fs::write(&p, c.to_string()).unwrap();
    let pre = Pretrained::load(&tmp.0, dtype, &Device::Cpu).unwrap();
    out.push(("mistral".into(), pre, Some(tmp)));
    out
}

/// Three ragged prompts; rows (prompt, response length) with a one-token response, a group
/// of one (prompt 3) and prompt 0's rows split by other groups.
const ROWS: [(usize, usize); 10] = [
    (0, 4),
    (0, 6),
    (1, 1),
    (1, 5),
    (0, 2),
    (2, 3),
    (2, 6),
    (3, 4),
    (2, 2),
    (0, 5),
];

fn rollouts(pre: &Pretrained) -> Rollouts {
    let v = pre.model.info().vocab_size as u32;
    let tok = |k: u32| 3 + (k * 37) % (v - 3);
    let prompts: [Vec<u32>; 4] = [
        (0..5).map(tok).collect(),
        (10..12).map(tok).collect(),
        (20..27).map(tok).collect(),
        (30..33).map(tok).collect(),
    ];
    let gens = ROWS
        .iter()
        .enumerate()
        .map(|(i, &(p, n))| Generation {
            prompt_ids: prompts[p].clone(),
            completion_ids: (0..n as u32).map(|t| tok(100 + 7 * i as u32 + t)).collect(),
            stopped: n < 6,
        })
        .collect();
    Rollouts::new(ROWS.iter().map(|&(p, _)| p).collect(), gens, 0)
}

/// The subsets of rows a pass may get: all in order, and a shuffled micro-batch.
const SUBSETS: [&[usize]; 2] = [&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], &[6, 0, 3, 9, 7, 2, 8]];

fn both(ro: &Rollouts, rows: &[usize]) -> (Layout, Layout) {
    let packed = Layout::packed(ro, rows, &Device::Cpu).unwrap().unwrap();
    assert!(packed.is_packed());
    let groups = {
        let mut p: Vec<&Vec<u32>> = rows.iter().map(|&i| &ro.prompt_ids[i]).collect();
        p.sort();
        p.dedup();
        p.len()
    };
    assert_eq!(
        packed.input.batch_size(),
        groups,
        "one packed row per prompt"
    );
    (Layout::rows(ro, rows, &Device::Cpu).unwrap(), packed)
}

fn host(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

/// The largest difference on response tokens, relative to the largest magnitude (≥ 1).
fn worst(a: &[Vec<f64>], b: &[Vec<f64>], lens: &[usize]) -> f64 {
    let mut scale = 1f64;
    let mut err = 0f64;
    for ((x, y), &n) in a.iter().zip(b).zip(lens) {
        for t in 0..n {
            scale = scale.max(x[t].abs());
            err = err.max((x[t] - y[t]).abs());
        }
    }
    err / scale
}

#[test]
fn packed_prompts_score_as_the_rows_do() {
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-10)] {
        for (m, pre, _dir) in models(dtype) {
            let ro = rollouts(&pre);
            let adapter = adapter_with_nonzero_b(&pre, 0.0);
            for a in [None, Some(&adapter)] {
                let ctx = ForwardCtx::inference(a);
                for rows in SUBSETS {
                    let (per_row, packed) = both(&ro, rows);
                    let lens = ro.resp_lens(rows);
                    let what = format!("{m} {dtype:?} adapter={} rows {rows:?}", a.is_some());
                    let s =
                        |l: &Layout| score(pre.model.as_ref(), &ctx, l, 0.8, None, Entropy::Metric);
                    let (x, y) = (s(&per_row).unwrap(), s(&packed).unwrap());
                    let err = worst(&host(&x.logp), &host(&y.logp), &lens);
                    assert!(err <= tol, "{what}: log-probs differ by {err:e}");
                    let (hx, hy) = (x.entropy.unwrap(), y.entropy.unwrap());
                    let err = worst(&host(&hx), &host(&hy), &lens);
                    assert!(err <= tol, "{what}: entropies differ by {err:e}");
                    // The states themselves (what a value head reads), every channel.
                    let states = |l: &Layout| {
                        let h = pre.model.forward_hidden(&l.input, &ctx, None).unwrap();
                        let st = l.states(&h).unwrap();
                        let (b, r, d) = st.dims3().unwrap();
                        host(&st.reshape((b, r * d)).unwrap())
                    };
                    let d = pre.model.info().hidden_size;
                    let lens_d: Vec<usize> = lens.iter().map(|n| n * d).collect();
                    let err = worst(&states(&per_row), &states(&packed), &lens_d);
                    assert!(err <= tol, "{what}: states differ by {err:e}");
                }
            }
        }
    }
}

/// The adapter's gradients of `Σ w·logp + Σ u·entropy` over response tokens (fixed distinct
/// weights), summed over `backward_from_hidden`'s stores.
fn adapter_grads(
    pre: &Pretrained,
    adapter: &Adapter,
    ro: &Rollouts,
    rows: &[usize],
    layout: &Layout,
    checkpointing: bool,
) -> Vec<Vec<f64>> {
    let r = ro.r_len;
    let mut w = vec![0f64; rows.len() * r];
    for (k, &i) in rows.iter().enumerate() {
        for t in 0..ro.resp_len(i) {
            w[k * r + t] = 0.5 + 0.1 * ((i * 7 + t * 3) % 5) as f64;
        }
    }
    let dtype = pre.model.info().dtype;
    let w = Tensor::from_vec(w, (rows.len(), r), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let ctx = ForwardCtx::train(Some(adapter), None);
    let vars = adapter.named_vars();
    let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
    backward_from_hidden::<anyhow::Error>(
        pre.model.as_ref(),
        &layout.input,
        &ctx,
        checkpointing,
        &mut |h| {
            let s = score_hidden_states(
                pre.model.as_ref(),
                &ctx,
                h,
                layout,
                0.8,
                None,
                Entropy::Loss,
            )?;
            let lp = (s.logp * &w)?.sum_all()?;
            let ent = (s.entropy.unwrap() * (&w * 0.3)?)?.sum_all()?;
            Ok((lp + ent)?)
        },
        &mut |store| {
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
    sums.into_iter()
        .map(|g| {
            g.expect("every adapter tensor gets a gradient")
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

#[test]
fn packed_prompts_give_the_rows_adapter_gradients() {
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-10)] {
        for (m, pre, _dir) in models(dtype) {
            let ro = rollouts(&pre);
            let adapter = adapter_with_nonzero_b(&pre, 0.0);
            for rows in SUBSETS {
                let (per_row, packed) = both(&ro, rows);
                for checkpointing in [false, true] {
                    let want = adapter_grads(&pre, &adapter, &ro, rows, &per_row, checkpointing);
                    let got = adapter_grads(&pre, &adapter, &ro, rows, &packed, checkpointing);
                    for (k, (a, b)) in want.iter().zip(&got).enumerate() {
                        let scale = a.iter().fold(0f64, |s, x| s.max(x.abs()));
                        assert!(scale > 0.0, "{m}: adapter tensor {k} has a zero gradient");
                        let err = a.iter().zip(b).fold(0f64, |s, (x, y)| s.max((x - y).abs()));
                        assert!(
                            err <= tol * scale,
                            "{m} {dtype:?} ckpt={checkpointing} rows {rows:?} tensor {k}: {err:e} (scale {scale:e})"
                        );
                    }
                }
            }
        }
    }
}

/// A micro-batch without a repeated prompt has no packed layout; the choice packs a GRPO
/// group of short responses and keeps long responses in large groups per row.
#[test]
fn packing_is_chosen_where_it_saves_work() {
    let pre = load("llama", DType::F32);
    let ro = rollouts(&pre);
    assert!(Layout::packed(&ro, &[0, 2, 5, 7], &Device::Cpu)
        .unwrap()
        .is_none());
    let info = pre.model.info();
    assert!(Layout::choose(&ro, &[0, 1, 4, 9], info, true)
        .unwrap()
        .is_packed());
    assert!(!Layout::choose(&ro, &[0, 1, 4, 9], info, false)
        .unwrap()
        .is_packed());
    use rlft::rl::layout::packing_pays;
    // SmolLM2-135M (d = 576), 8 completions of 24 tokens on a 45-token prompt: packed.
    assert!(packing_pays(576, (1, 45 + 8 * 24), (8, 45 + 24)));
    // 16 completions of 2,048 tokens on a 100-token prompt: the packed row's attention over
    // 32k tokens outweighs the prompt saved.
    assert!(!packing_pays(576, (1, 100 + 16 * 2048), (16, 100 + 2048)));
}

/// GRPO with and without shared prompts: the same rollouts at step 1, the same figures and
/// adapter to f32 rounding after three steps (two micro-batches per update, so groups are
/// cut; two epochs, so the second shuffles rows across groups).
#[test]
fn grpo_with_shared_prompts_trains_as_without() {
    let run_with = |share: bool| {
        let tmp = TempDir::new(&format!("grpo-share-{share}"));
        let share = format!("rl.share_prompts={share}");
        let cfg = config(
            &tmp.0,
            "grpo",
            &[
                "rl.num_generations=6",
                "rl.batch_size=12",
                "training.per_device_train_batch_size=4",
                "rl.num_ppo_epochs=2",
                "rl.kl_coef=0.04",
                "training.max_steps=3",
                "training.learning_rate=1e-2",
                &share,
            ],
        );
        run(&cfg, &default_registry(), &quiet()).unwrap();
        let m = metrics(&tmp.0);
        let adapter = tensors(&tmp.0.join("out/adapter/adapter_model.safetensors"));
        (m, adapter)
    };
    let (m_rows, a_rows) = run_with(false);
    let (m_packed, a_packed) = run_with(true);
    assert_eq!(
        series(&m_rows, "objective/scores"),
        series(&m_packed, "objective/scores"),
        "the same rollouts"
    );
    for key in ["objective/kl", "loss/policy", "policy/approxkl", "loss/kl"] {
        let (a, b) = (series(&m_rows, key), series(&m_packed, key));
        assert_eq!(a.len(), 3, "{key}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
                "{key}: {a:?} vs {b:?}"
            );
        }
    }
    for ((name, x), (_, y)) in a_rows.iter().zip(&a_packed) {
        let scale = x.iter().fold(0f64, |s, v| s.max(v.abs()));
        let err = x.iter().zip(y).fold(0f64, |s, (p, q)| s.max((p - q).abs()));
        assert!(err <= 1e-4 * scale, "{name}: {err:e} (scale {scale:e})");
    }
}
