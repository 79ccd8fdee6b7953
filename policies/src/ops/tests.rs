//! Each hand-written backward against candle's autograd of the same function written with
//! plain differentiable ops (the "slow" reference versions), in f64.

use super::*;
use candle_core::{DType, Device, Tensor, Var, D};

fn randn(shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap()).unwrap()
}

pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `Σ y · r` for a fixed random `r`, so every output element gets a distinct upstream grad.
fn project(y: &Tensor, r: &Tensor) -> Tensor {
    (y * r).unwrap().sum_all().unwrap()
}

fn check(name: &str, fast: &Tensor, slow: &Tensor, vars: &[&Var]) {
    assert!(max_diff(fast, slow) < 1e-10, "{name}: forward differs");
    let r = Tensor::randn(0f64, 1.0, fast.shape(), &Device::Cpu).unwrap();
    let gf = project(fast, &r).backward().unwrap();
    let gs = project(slow, &r).backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let a = gf
            .get(v)
            .unwrap_or_else(|| panic!("{name}: no gradient for input {i}"));
        let b = gs.get(v).unwrap();
        assert!(
            max_diff(a, b) < 1e-9,
            "{name}: gradient of input {i} differs by {}",
            max_diff(a, b)
        );
    }
}

#[test]
fn rms_norm_backward() {
    let (x, w) = (randn(&[3, 5, 8]), randn(&[8]));
    let fast = rms_norm(&x, &w, 1e-6).unwrap();
    let slow = candle_nn::ops::rms_norm_slow(&x, &w, 1e-6).unwrap();
    check("rms_norm", &fast, &slow, &[&x, &w]);
}

/// The fused f32 input gradient (frozen weight: no weight gradient asked for) against the
/// f64 reference, and no gradient reaches the frozen weight.
#[test]
fn rms_norm_backward_frozen_weight_f32() {
    let x64 = randn(&[4, 7, 40]);
    let w64 = Tensor::randn(0f64, 1.0, 40, &Device::Cpu).unwrap();
    let slow = candle_nn::ops::rms_norm_slow(&x64, &w64, 1e-6).unwrap();
    let r = Tensor::randn(0f64, 1.0, slow.shape(), &Device::Cpu).unwrap();
    let want = project(&slow, &r)
        .backward()
        .unwrap()
        .get(&x64)
        .unwrap()
        .clone();
    let x = Var::from_tensor(&x64.to_dtype(DType::F32).unwrap()).unwrap();
    let w = w64.to_dtype(DType::F32).unwrap();
    let fast = rms_norm(&x, &w, 1e-6).unwrap();
    let g = project(&fast, &r.to_dtype(DType::F32).unwrap())
        .backward()
        .unwrap();
    let got = g.get(&x).unwrap().to_dtype(DType::F64).unwrap();
    assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
    assert!(g.get(&w).is_none());
}

#[test]
fn layer_norm_backward() {
    let (x, w, b) = (randn(&[2, 4, 6]), randn(&[6]), randn(&[6]));
    let fast = layer_norm(&x, &w, &b, 1e-5).unwrap();
    let slow = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap();
    check("layer_norm", &fast, &slow, &[&x, &w, &b]);
}

#[test]
fn softmax_backward() {
    let x = randn(&[2, 3, 7]);
    let fast = softmax_last_dim(&x).unwrap();
    let slow = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
    check("softmax", &fast, &slow, &[&x]);
}

#[test]
fn rope_backward_with_per_sequence_positions() {
    let x = randn(&[2, 3, 4, 8]);
    let angles = Tensor::randn(0f64, 2.0, (2, 4, 4), &Device::Cpu).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let fast = rope(&x, &cos, &sin).unwrap();
    // Reference: rotate-half written out, cos/sin broadcast over heads.
    let c = Tensor::cat(&[&cos, &cos], D::Minus1)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let s = Tensor::cat(&[&sin, &sin], D::Minus1)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let x1 = x.narrow(D::Minus1, 0, 4).unwrap();
    let x2 = x.narrow(D::Minus1, 4, 4).unwrap();
    let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
    let slow = (x.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap();
    check("rope", &fast, &slow, &[&x]);
}

#[test]
fn frozen_matmul_gives_input_gradient_only() {
    let x = randn(&[5, 6]);
    let w = Tensor::randn(0f64, 1.0, (4, 6), &Device::Cpu).unwrap();
    let fast = frozen_matmul_t(&x, &w).unwrap();
    let slow = x.matmul(&w.t().unwrap()).unwrap();
    check("frozen_matmul", &fast, &slow, &[&x]);
    let g = fast.sum_all().unwrap().backward().unwrap();
    assert!(
        g.get(&w).is_none(),
        "a frozen weight must receive no gradient"
    );
}

#[test]
fn logprob_backward_and_entropy() {
    let logits = randn(&[6, 11]);
    let targets = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &Device::Cpu).unwrap();
    let fast = gather_logprobs(&logits, &targets).unwrap();
    let slow = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    check("gather_logprobs", &fast, &slow, &[&logits]);
    // Entropy of a uniform row is ln V.
    let u = Tensor::zeros((1, 11), DType::F64, &Device::Cpu).unwrap();
    let h = entropy(&u).unwrap().to_vec1::<f64>().unwrap()[0];
    assert!((h - 11f64.ln()).abs() < 1e-12);
}

/// The CPU f32 training path (a custom op, not a bridge): the product and the input
/// gradient dy·W against f64, nothing for the weight; for many rows and for few.
#[test]
fn frozen_matmul_f32_training_path() {
    for rows in [40, 3] {
        let x64 = randn(&[rows, 24]);
        let w64 = Tensor::randn(0f64, 1.0, (10, 24), &Device::Cpu).unwrap();
        let x = Var::from_tensor(&x64.to_dtype(DType::F32).unwrap()).unwrap();
        let w = w64.to_dtype(DType::F32).unwrap();
        let y = frozen_matmul_t(&x, &w).unwrap();
        let want = x64.matmul(&w64.t().unwrap()).unwrap();
        assert!(max_diff(&y.to_dtype(DType::F64).unwrap(), &want) < 1e-4);
        let r = Tensor::randn(0f64, 1.0, (rows, 10), &Device::Cpu).unwrap();
        let g = project(&y, &r.to_dtype(DType::F32).unwrap())
            .backward()
            .unwrap();
        let dx = g.get(&x).unwrap().to_dtype(DType::F64).unwrap();
        assert!(max_diff(&dx, &r.matmul(&w64).unwrap()) < 1e-4);
        assert!(g.get(&w).is_none());
    }
}

/// The unchunked reference of `head_logprobs`: the whole logits, candle's ops throughout.
fn head_reference(h: &Tensor, w: &Tensor, b: &Tensor, y: &Tensor, tau: f64) -> (Tensor, Tensor) {
    let z = (h.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap() / tau).unwrap();
    let lp = candle_nn::ops::log_softmax(&z, D::Minus1)
        .unwrap()
        .gather(&y.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    (lp, entropy(&z).unwrap())
}

/// Chunked log-probs and entropy against the whole logits in f64, chunks that divide
/// nothing (7 rows over 23) and of one row (the backward recomputes their logits), one
/// chunk of all rows and a size above the row count (the one chunk's logits are kept);
/// τ ≠ 1 and a bias;
/// the gradient of `Σ r·lp` (and of `Σ r·[lp, H]` for the entropy bonus) w.r.t. the hidden
/// states, and none for the head.
#[test]
fn head_logprobs_chunked_match_whole_logits() {
    use crate::logprobs::Entropy;
    let (n, hsz, v, tau) = (23, 12, 37, 0.7);
    let w = randn(&[v, hsz]);
    let bias = Tensor::randn(0f64, 1.0, v, &Device::Cpu).unwrap();
    let ys: Vec<u32> = (0..n as u32).map(|i| (i * 11 + 3) % v as u32).collect();
    let y = Tensor::new(ys.as_slice(), &Device::Cpu).unwrap();
    let head = FrozenHead {
        weight: w.as_tensor().clone(),
        bias: Some(bias.clone()),
        tau,
    };
    for rows in [7, 1, 23, 100] {
        let h = randn(&[n, hsz]);
        let (lp_ref, h_ref) = head_reference(&h, w.as_tensor(), &bias, &y, tau);
        let (lp, ent) = head_logprobs(&h, &y, &head, rows, Entropy::Skip).unwrap();
        assert!(ent.is_none());
        check(&format!("head lp, {rows} rows"), &lp, &lp_ref, &[&h]);
        let g = lp.sum_all().unwrap().backward().unwrap();
        assert!(
            g.get(&w).is_none(),
            "the frozen head must receive no gradient"
        );

        let (lp, ent) = head_logprobs(&h, &y, &head, rows, Entropy::Metric).unwrap();
        let ent = ent.unwrap();
        assert!(
            max_diff(&ent, &h_ref) < 1e-10,
            "entropy metric, {rows} rows"
        );
        assert!(!ent.track_op(), "a metric entropy is detached");
        check(
            &format!("head lp (metric), {rows} rows"),
            &lp,
            &lp_ref,
            &[&h],
        );

        let (lp, ent) = head_logprobs(&h, &y, &head, rows, Entropy::Loss).unwrap();
        let fast = Tensor::stack(&[&lp, &ent.unwrap()], 1).unwrap();
        let slow = Tensor::stack(&[&lp_ref, &h_ref], 1).unwrap();
        check(
            &format!("head lp + entropy loss, {rows} rows"),
            &fast,
            &slow,
            &[&h],
        );
    }
}

/// The f32 path (gemm's products, f32 row passes) against the f64 reference, within
/// rounding, values and input gradients; recomputed (7 rows a chunk) and kept (one chunk).
#[test]
fn head_logprobs_f32_within_rounding() {
    use crate::logprobs::Entropy;
    let (n, hsz, v, tau) = (23, 40, 300, 1.3);
    let h64 = randn(&[n, hsz]);
    let w64 = Tensor::randn(0f64, 0.3, (v, hsz), &Device::Cpu).unwrap();
    let b64 = Tensor::zeros(v, DType::F64, &Device::Cpu).unwrap();
    let ys: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % v as u32).collect();
    let y = Tensor::new(ys.as_slice(), &Device::Cpu).unwrap();
    let (lp_ref, h_ref) = head_reference(&h64, &w64, &b64, &y, tau);
    let r = Tensor::randn(0f64, 1.0, (n, 2), &Device::Cpu).unwrap();
    let slow = Tensor::stack(&[&lp_ref, &h_ref], 1).unwrap();
    let want = project(&slow, &r)
        .backward()
        .unwrap()
        .get(&h64)
        .unwrap()
        .clone();
    let f32_ = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let h = Var::from_tensor(&f32_(&h64)).unwrap();
    let head = FrozenHead {
        weight: f32_(&w64),
        bias: None,
        tau,
    };
    let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    for rows in [7, n] {
        let (lp, ent) = head_logprobs(&h, &y, &head, rows, Entropy::Loss).unwrap();
        let fast = Tensor::stack(&[&lp, &ent.unwrap()], 1).unwrap();
        let err = max_diff(&f64_(&fast), &slow);
        assert!(err < 1e-4, "{rows} rows: values differ by {err}");
        let g = project(&fast, &f32_(&r)).backward().unwrap();
        let err = max_diff(&f64_(g.get(&h).unwrap()), &want);
        assert!(err < 1e-4, "{rows} rows: gradients differ by {err}");
    }
}

/// Issue 23's regression: a real vocabulary's long tail. 50,000 logits with one dominant
/// logit and the rest 18–26 below it (each term of the softmax sum below half an f32 ulp of
/// the running total near 1, together ~1e-4 of it): the f32 log-probs, entropies and input
/// gradients are within a few ulps of the f64 values of the same f32 inputs. A serial f32
/// sum drops the whole tail and is off by ~1e-4 on every row.
#[test]
fn head_logprobs_f32_long_tail_vocabulary() {
    use crate::logprobs::Entropy;
    use rand::{Rng, SeedableRng};
    let (n, v) = (5, 50_000);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
    // z = h·Wᵀ with h = [1, s]: column 0 holds the logits, column 1 a small per-row shift.
    let mut w = vec![0f32; v * 2];
    for k in 0..v {
        w[2 * k] = if k == 17 {
            0.0
        } else {
            -18.0 - 8.0 * rng.random::<f32>()
        };
        w[2 * k + 1] = rng.random::<f32>() - 0.5;
    }
    let hs: Vec<f32> = (0..n).flat_map(|i| [1.0, 0.25 * i as f32]).collect();
    let ys: Vec<u32> = vec![17, 3, 40_000, 17, 49_999];
    let dev = Device::Cpu;
    let w32 = Tensor::from_vec(w.clone(), (v, 2), &dev).unwrap();
    let h = Var::from_tensor(&Tensor::from_vec(hs.clone(), (n, 2), &dev).unwrap()).unwrap();
    let y = Tensor::new(ys.as_slice(), &dev).unwrap();
    let head = FrozenHead {
        weight: w32,
        bias: None,
        tau: 1.0,
    };
    // The f64 reference of the same f32 inputs (each product of two f32 is exact in f64).
    let mut want_lp = vec![0f64; n];
    let mut want_h = vec![0f64; n];
    let mut want_dh = vec![0f64; n * 2];
    for i in 0..n {
        let z: Vec<f64> = (0..v)
            .map(|k| {
                hs[2 * i] as f64 * w[2 * k] as f64 + hs[2 * i + 1] as f64 * w[2 * k + 1] as f64
            })
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
        want_lp[i] = z[ys[i] as usize] - lse;
        want_h[i] = -z.iter().map(|&x| (x - lse).exp() * (x - lse)).sum::<f64>();
        // d(lp + H)/dz = onehot − p − p (l + H); dh = dz W.
        for k in 0..v {
            let l = z[k] - lse;
            let p = l.exp();
            let dz = (k == ys[i] as usize) as u8 as f64 - p - p * (l + want_h[i]);
            want_dh[2 * i] += dz * w[2 * k] as f64;
            want_dh[2 * i + 1] += dz * w[2 * k + 1] as f64;
        }
    }
    for rows in [2, n] {
        let (lp, ent) = head_logprobs(&h, &y, &head, rows, Entropy::Loss).unwrap();
        let ent = ent.unwrap();
        let got_lp: Vec<f32> = lp.to_vec1().unwrap();
        let got_h: Vec<f32> = ent.to_vec1().unwrap();
        for i in 0..n {
            // Rounding of the result alone: a couple of ulps of |lp| (≥ 1e-7 absolute).
            let tol = (want_lp[i].abs() * 4.0 * f32::EPSILON as f64).max(1e-7);
            let err = (got_lp[i] as f64 - want_lp[i]).abs();
            assert!(
                err <= tol,
                "row {i}: lp {} vs f64 {} ({err:e} > {tol:e})",
                got_lp[i],
                want_lp[i]
            );
            let err = (got_h[i] as f64 - want_h[i]).abs();
            assert!(
                err <= 1e-7 + 1e-5 * want_h[i].abs(),
                "row {i}: entropy off by {err:e}"
            );
        }
        let g = (lp + ent).unwrap().sum_all().unwrap().backward().unwrap();
        let dh: Vec<f32> = g.get(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (k, (&a, &b)) in dh.iter().zip(&want_dh).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 1e-4 * b.abs().max(1.0),
                "dh[{k}]: {a} vs {b}"
            );
        }
    }
}

/// Issue 23's regression: an outlier channel. RMSNorm and LayerNorm rows with one channel of
/// 3·10⁴ beside channels of |x| ≤ 5 (each square below half an f32 ulp of 9·10⁸, so a serial
/// f32 sum drops them all and the scale comes out ~2.7e-6 too high, ~20 ulps): the f32
/// forward and the RMSNorm input and weight gradients within a few ulps of f64.
#[test]
fn norms_f32_with_an_outlier_channel() {
    use rand::{Rng, SeedableRng};
    let (rows, n) = (6, 576);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(30_000);
    let mut x: Vec<f32> = (0..rows * n)
        .map(|_| 10.0 * rng.random::<f32>() - 5.0)
        .collect();
    for r in 0..rows {
        x[r * n + 7] = 30_000.0 - 1000.0 * r as f32;
    }
    let w: Vec<f32> = (0..n).map(|_| 0.5 + rng.random::<f32>()).collect();
    let bias: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
    let g: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>() - 0.5).collect();
    let dev = Device::Cpu;
    let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap();
    let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let rel = |a: &Tensor, b: &Tensor| {
        let d = (to64(a) - b).unwrap().abs().unwrap();
        let s = b.abs().unwrap().maximum(1e-3).unwrap();
        (d / s)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };

    // RMSNorm with a trainable weight (dx and dw) and a frozen one (dx alone).
    let x32 = Var::from_tensor(&t(&x, &[rows, n])).unwrap();
    let w32 = Var::from_tensor(&t(&w, &[n])).unwrap();
    let x64 = Var::from_tensor(&to64(&x32)).unwrap();
    let w64 = Var::from_tensor(&to64(&w32)).unwrap();
    let (g32, g64) = (t(&g, &[rows, n]), to64(&t(&g, &[rows, n])));
    let y32 = rms_norm(&x32, &w32, 1e-5).unwrap();
    let y64 = rms_norm(&x64, &w64, 1e-5).unwrap();
    let err = rel(&y32, &y64);
    assert!(
        err < 3.0 * f32::EPSILON as f64,
        "rms forward: relative error {err:e}"
    );
    let gr32 = (&y32 * &g32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gr64 = (&y64 * &g64)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (dx, dx_ref) = (gr32.get(&x32).unwrap(), gr64.get(&x64).unwrap());
    // dx is a difference of two O(r) terms: measure it against the row's scale r·|g·w|.
    let scale = dx_ref.abs().unwrap().max_keepdim(1).unwrap();
    let err = (to64(dx) - dx_ref)
        .unwrap()
        .abs()
        .unwrap()
        .broadcast_div(&scale)
        .unwrap();
    let err = err
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(err < 1e-6, "rms dx: error {err:e} of the row's largest");
    let err = rel(gr32.get(&w32).unwrap(), gr64.get(&w64).unwrap());
    assert!(err < 1e-5, "rms dw: relative error {err:e}");
    let frozen = rms_norm(&x32, w32.as_tensor(), 1e-5).unwrap();
    let gf = (&frozen * &g32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        max_diff(&to64(gf.get(&x32).unwrap()), &to64(dx)),
        0.0,
        "the frozen-weight path gives the same dx"
    );

    // LayerNorm forward: a two-pass variance in f64 (E[x²] − E[x]² in f32 loses ~all digits
    // of the small channels' spread beside a mean of ~50).
    let b32 = t(&bias, &[n]);
    let y32 = layer_norm(&x32, w32.as_tensor(), &b32, 1e-5).unwrap();
    let y64 = layer_norm(&to64(&x32), &to64(&w32), &to64(&b32), 1e-5).unwrap();
    let err = max_diff(&to64(&y32), &y64);
    assert!(err < 1e-5, "layer norm forward: error {err:e}");
}

/// The bf16 RMSNorm forward rounds as transformers' `LlamaRMSNorm` does: `h = x·r` in f32,
/// rounded to bf16, then `w·h` rounded to bf16.
#[test]
fn rms_norm_bf16_rounds_as_transformers() {
    use half::bf16;
    let dev = Device::Cpu;
    let xs: Vec<f32> = (0..64)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
        .collect();
    let ws: Vec<f32> = (0..32).map(|i| 0.8 + 0.013 * i as f32).collect();
    let x = Tensor::from_slice(&xs, (2, 32), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let w = Tensor::from_slice(&ws, 32, &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let got: Vec<bf16> = rms_norm(&x, &w, 1e-6)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (xb, wb): (Vec<bf16>, Vec<bf16>) = (
        x.flatten_all().unwrap().to_vec1().unwrap(),
        w.to_vec1().unwrap(),
    );
    for r in 0..2 {
        let row = &xb[r * 32..(r + 1) * 32];
        let ms = row.iter().map(|v| (v.to_f32() as f64).powi(2)).sum::<f64>() / 32.0;
        let inv = (1.0 / (ms + 1e-6).sqrt()) as f32;
        for i in 0..32 {
            let h = bf16::from_f32(row[i].to_f32() * inv);
            let want = bf16::from_f32(wb[i].to_f32() * h.to_f32());
            assert_eq!(got[r * 32 + i], want, "row {r}, channel {i}");
        }
    }
}

/// `split_heads` (one op) against reshape → transpose → `rope` (the composed ops it replaces):
/// values and input gradients in f64 with per-sequence and shared rotary tables and without
/// a rotation; in f32 the values are the composed ops' bits.
#[test]
fn split_heads_equals_reshape_transpose_rope() {
    let (b, t, heads, d) = (2, 5, 3, 8);
    let x = randn(&[b, t, heads * d]);
    let composed = |x: &Tensor, rot: Option<(&Tensor, &Tensor)>| {
        let xh = x
            .reshape((b, t, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        match rot {
            Some((c, s)) => rope(&xh, c, s).unwrap(),
            None => xh.contiguous().unwrap(),
        }
    };
    let angles = Tensor::randn(0f64, 2.0, (b, t, d / 2), &Device::Cpu).unwrap();
    let (cos_b, sin_b) = (angles.cos().unwrap(), angles.sin().unwrap());
    let (cos_t, sin_t) = (
        cos_b.get(0).unwrap().contiguous().unwrap(),
        sin_b.get(0).unwrap().contiguous().unwrap(),
    );
    for rot in [Some((&cos_b, &sin_b)), Some((&cos_t, &sin_t)), None] {
        let fast = rope::split_heads(&x, heads, rot).unwrap();
        assert_eq!(fast.dims(), &[b, heads, t, d]);
        check("split_heads", &fast, &composed(&x, rot), &[&x]);
    }
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (x32, c32, s32) = (f(&x), f(&cos_b), f(&sin_b));
    let fast = rope::split_heads(&x32, heads, Some((&c32, &s32))).unwrap();
    let want = {
        let xh = x32
            .reshape((b, t, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        rope(&xh, &c32, &s32).unwrap()
    };
    assert_eq!(
        fast.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert!(rope::split_heads(&x, 5, None).is_err(), "24 is not 5 heads");
}
