//! Each hand-written backward against candle's autograd of the same function written with
//! plain differentiable ops (the "slow" reference versions), in f64.

use super::*;
use candle_core::{DType, Device, Tensor, Var, D};

fn randn(shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
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
