//! rlft's policy objectives against TRL's own code: `scripts/twins/trl_grpo_loss.py` ran
//! TRL 1.16's `GRPOTrainer._compute_loss` on fixed log-probs, old and reference log-probs,
//! advantages and ragged masks (garbage at padding), for every loss type × importance level
//! × β, and committed the loss and its gradient with respect to the per-token log-probs
//! (tests/fixtures/trl_grpo_losses.json). Here rlft computes them with the functions its
//! update uses, in f64, and must agree within 1e-6.

mod common;

use common::fixture;
use rlft::policies::candle_core::{DType, Device, Tensor, Var};
use rlft::rl::losses::{
    agg_weights, kl_k3, policy_loss, weighted_sum, ImportanceSamplingLevel, LossType,
    PolicyObjective,
};
use serde_json::Value;

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn tensor(rows: &[Vec<f64>]) -> Tensor {
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

fn parse<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn grpo_loss_types_match_trl() {
    let text = std::fs::read_to_string(fixture("trl_grpo_losses.json")).unwrap();
    let f: Value = serde_json::from_str(&text).unwrap();
    let (logp0, old, lref) = (
        matrix(&f["logp"]),
        tensor(&matrix(&f["old_logp"])),
        tensor(&matrix(&f["ref_logp"])),
    );
    let mask_rows = matrix(&f["mask"]);
    let (b, width) = (logp0.len(), logp0[0].len());
    let lens: Vec<usize> = mask_rows
        .iter()
        .map(|r| r.iter().sum::<f64>() as usize)
        .collect();
    let adv: Vec<f64> = parse(&f["advantages"]);
    let adv = tensor(&adv.iter().map(|&a| vec![a; width]).collect::<Vec<_>>());
    let mask = tensor(&mask_rows);
    let max_new_tokens = f["max_completion_length"].as_u64().unwrap() as usize;
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 26);
    for case in cases {
        let loss_type: LossType = parse(&case["loss_type"]);
        let level: ImportanceSamplingLevel = parse(&case["importance_sampling_level"]);
        let beta = case["beta"].as_f64().unwrap();
        let p = PolicyObjective {
            loss_type,
            level,
            eps_low: f["epsilon_low"].as_f64().unwrap(),
            eps_high: case["epsilon_high"].as_f64().unwrap(),
            dual_clip: None,
            sapo_temperature_pos: f["sapo_temperature_pos"].as_f64().unwrap(),
            sapo_temperature_neg: f["sapo_temperature_neg"].as_f64().unwrap(),
        };
        // The weights of the loss type's aggregation: the fixture's batch is one mini-batch.
        let tokens = lens.iter().sum();
        let w = agg_weights(
            loss_type.aggregation(),
            &lens,
            width,
            tokens,
            b,
            max_new_tokens,
        );
        let w = Tensor::from_vec(w, (b, width), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let logp = Var::from_tensor(&tensor(&logp0)).unwrap();
        let (pg, _) = policy_loss(logp.as_tensor(), &old, &adv, &mask, &p).unwrap();
        let mut loss = weighted_sum(&pg, &w).unwrap();
        if beta > 0.0 {
            let kl = weighted_sum(&kl_k3(logp.as_tensor(), &lref).unwrap(), &w).unwrap();
            loss = (loss + (kl * beta).unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let grad = grads
            .get(logp.as_tensor())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let name = format!("{loss_type:?} {level:?} β={beta} ε_high={}", p.eps_high);
        let (got, want) = (
            loss.to_scalar::<f64>().unwrap(),
            case["loss"].as_f64().unwrap(),
        );
        assert!(
            (got - want).abs() <= 1e-6,
            "{name}: loss {got} vs TRL {want}"
        );
        for (i, (g, w)) in grad.iter().zip(matrix(&case["grad"])).enumerate() {
            for (t, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "{name}: d loss / d logp[{i}][{t}] {a} vs TRL {b}"
                );
            }
        }
    }
}

/// KTO's loss, its gradient with respect to the policy's sequence log-probs, the KL
/// estimate and TRL's metrics, against `KTOTrainer._compute_loss` on fixed log-probs
/// (scripts/twins/trl_kto_loss.py: step 0 with policy = reference, mixed labels, weights,
/// a negative KL mean that TRL clamps to 0, all desirable).
#[test]
fn kto_loss_matches_trl() {
    use rlft::preference::losses::{kto_kl, kto_losses};
    let text = std::fs::read_to_string(fixture("trl_kto_loss.json")).unwrap();
    let f: Value = serde_json::from_str(&text).unwrap();
    let vec = |v: &Value| -> Tensor {
        let x: Vec<f64> = parse(v);
        Tensor::new(x, &Device::Cpu).unwrap()
    };
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let labels: Vec<bool> = parse(&case["labels"]);
        let n = labels.len();
        let desirable = Tensor::new(
            labels
                .iter()
                .map(|&l| f64::from(u8::from(l)))
                .collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        let beta = case["beta"].as_f64().unwrap();
        let weights = (
            case["desirable_weight"].as_f64().unwrap(),
            case["undesirable_weight"].as_f64().unwrap(),
        );
        let pi = Var::from_tensor(&vec(&case["policy_logps"])).unwrap();
        let reference = vec(&case["ref_logps"]);
        let z0 = kto_kl(&vec(&case["policy_kl_logps"]), &vec(&case["ref_kl_logps"])).unwrap();
        let losses =
            kto_losses(beta, weights, (pi.as_tensor(), &reference), &desirable, z0).unwrap();
        // TRL's loss: the mean over the batch's examples.
        let loss = (losses.sum_all().unwrap() / n as f64).unwrap();
        let grads = loss.backward().unwrap();
        let grad = grads.get(pi.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let (got, want) = (
            loss.to_scalar::<f64>().unwrap(),
            case["loss"].as_f64().unwrap(),
        );
        assert!(
            (got - want).abs() <= 1e-6,
            "{name}: loss {got} vs TRL {want}"
        );
        if name == "step0" {
            assert!(
                (got - 0.5).abs() < 1e-12,
                "policy = reference: the loss is 0.5"
            );
        }
        let want_grad: Vec<f64> = parse(&case["grad"]);
        for (i, (a, b)) in grad.iter().zip(&want_grad).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6,
                "{name}: d loss / d logp[{i}] {a} vs TRL {b}"
            );
        }
        let m = &case["metrics"];
        assert!(
            (z0 - m["kl"].as_f64().unwrap()).abs() <= 1e-6,
            "{name}: kl {z0} vs {}",
            m["kl"]
        );
        // rewards/chosen and /rejected: β r averaged over each class; logps the policy's.
        let pi_v: Vec<f64> = parse(&case["policy_logps"]);
        let ref_v: Vec<f64> = parse(&case["ref_logps"]);
        for (side, want_label) in [("chosen", true), ("rejected", false)] {
            let idx: Vec<usize> = (0..n).filter(|&i| labels[i] == want_label).collect();
            let reward = |i: usize| beta * (pi_v[i] - ref_v[i]);
            let mean = |f: &dyn Fn(usize) -> f64| {
                idx.iter().map(|&i| f(i)).sum::<f64>() / idx.len() as f64
            };
            match m[format!("rewards/{side}")].as_f64() {
                Some(w) => {
                    assert!((mean(&reward) - w).abs() <= 1e-6, "{name}: rewards/{side}");
                    let lp = m[format!("logps/{side}")].as_f64().unwrap();
                    assert!(
                        (mean(&|i| pi_v[i]) - lp).abs() <= 1e-6,
                        "{name}: logps/{side}"
                    );
                }
                None => assert!(idx.is_empty(), "{name}: TRL logged no {side}"),
            }
        }
    }
}
