//! The fused attention against the composed one.

use super::*;
use crate::families::attention::attend;
use crate::families::batch::{attention_bias, packed_attention_bias};
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

fn randn(rng: &mut rand_chacha::ChaCha8Rng, shape: (usize, usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.5..1.5)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

struct Case {
    name: &'static str,
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    s: usize,
    window: Option<usize>,
    /// Left padding per row (rows of their own).
    pad: Vec<usize>,
    /// Packed rows: segments per token (then positions restart per segment).
    packed: Option<Vec<Vec<u32>>>,
}

/// The mask and the composed path's bias for a case.
fn mask_and_bias(c: &Case) -> (AttentionMask, Tensor) {
    let dev = Device::Cpu;
    let offset = c.s - c.t;
    match &c.packed {
        None => {
            let valid: Vec<Vec<bool>> = c
                .pad
                .iter()
                .map(|&p| (0..c.s).map(|j| j >= p).collect())
                .collect();
            let bias = attention_bias(&valid, c.t, offset, c.window, &dev).unwrap();
            let mask = AttentionMask {
                batch: c.b,
                queries: c.t,
                keys: c.s,
                offset,
                key_valid: valid.concat(),
                segments: None,
                positions: None,
                window: c.window,
            };
            (mask, bias)
        }
        Some(segs) => {
            // [prompt | a | b …]: a continuation's positions follow the prompt's.
            let valid: Vec<Vec<bool>> = c
                .pad
                .iter()
                .map(|&p| (0..c.t).map(|j| j >= p).collect())
                .collect();
            let positions: Vec<Vec<u32>> = segs
                .iter()
                .zip(&c.pad)
                .map(|(seg, &p)| {
                    let prompt = seg.iter().skip(p).filter(|&&x| x == 0).count() as u32;
                    let mut next = std::collections::HashMap::new();
                    seg.iter()
                        .enumerate()
                        .map(|(j, &sg)| {
                            if j < p {
                                0
                            } else if sg == 0 {
                                (j - p) as u32
                            } else {
                                let n = next.entry(sg).or_insert(prompt);
                                *n += 1;
                                *n - 1
                            }
                        })
                        .collect()
                })
                .collect();
            let bias = packed_attention_bias(&valid, segs, &positions, c.window, &dev).unwrap();
            let mask = AttentionMask {
                batch: c.b,
                queries: c.t,
                keys: c.s,
                offset: 0,
                key_valid: valid.concat(),
                segments: Some(segs.concat()),
                positions: Some(positions.concat()),
                window: c.window,
            };
            (mask, bias)
        }
    }
}

fn cases() -> Vec<Case> {
    let seg = |prompt: usize, parts: &[usize], pad: usize| -> Vec<u32> {
        let mut v = vec![0u32; pad + prompt];
        for (k, &n) in parts.iter().enumerate() {
            v.extend(std::iter::repeat_n(k as u32 + 1, n));
        }
        v
    };
    vec![
        Case {
            name: "causal, one head group",
            b: 1,
            h: 2,
            kv: 2,
            t: 37,
            s: 37,
            window: None,
            pad: vec![0],
            packed: None,
        },
        Case {
            name: "left padding, GQA 3",
            b: 2,
            h: 6,
            kv: 2,
            t: 29,
            s: 29,
            window: None,
            pad: vec![0, 7],
            packed: None,
        },
        Case {
            name: "GQA 9 to 1",
            b: 1,
            h: 9,
            kv: 1,
            t: 20,
            s: 20,
            window: None,
            pad: vec![3],
            packed: None,
        },
        Case {
            name: "sliding window 5",
            b: 2,
            h: 4,
            kv: 2,
            t: 41,
            s: 41,
            window: Some(5),
            pad: vec![2, 0],
            packed: None,
        },
        Case {
            name: "a cache: 9 new queries over 30 keys",
            b: 2,
            h: 4,
            kv: 4,
            t: 9,
            s: 30,
            window: None,
            pad: vec![0, 4],
            packed: None,
        },
        Case {
            name: "one decoding query",
            b: 2,
            h: 6,
            kv: 3,
            t: 1,
            s: 23,
            window: Some(7),
            pad: vec![5, 0],
            packed: None,
        },
        Case {
            name: "packed groups with a window",
            b: 2,
            h: 4,
            kv: 2,
            t: 33,
            s: 33,
            window: Some(6),
            pad: vec![0, 3],
            packed: Some(vec![seg(9, &[10, 7, 7], 0), seg(12, &[9, 1, 8], 3)]),
        },
        Case {
            name: "packed groups",
            b: 1,
            h: 3,
            kv: 1,
            t: 30,
            s: 30,
            window: None,
            pad: vec![0],
            packed: Some(vec![seg(5, &[12, 13], 0)]),
        },
    ]
}

/// Values and gradients of Σ w ∘ o equal the composed attention's in f64 (≤ 1e-10) with
/// tiles small enough that every case spans several, with remainders.
#[test]
fn values_and_gradients_equal_the_composed_attention() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for c in cases() {
        let d = 8;
        let q = Var::from_tensor(&randn(&mut rng, (c.b, c.h, c.t, d))).unwrap();
        let k = Var::from_tensor(&randn(&mut rng, (c.b, c.kv, c.s, d))).unwrap();
        let v = Var::from_tensor(&randn(&mut rng, (c.b, c.kv, c.s, d))).unwrap();
        let w = randn(&mut rng, (c.b, c.t, c.h, d))
            .reshape((c.b, c.t, c.h * d))
            .unwrap();
        let (mask, bias) = mask_and_bias(&c);
        let scale = 1.0 / (d as f64).sqrt();
        let want = attend(&q, &k, &v, &bias, scale).unwrap();
        let tiles = Tiles {
            queries: 8,
            keys: 16,
        };
        let got = flash_attention(&q, &k, &v, &mask, scale, tiles, Operands::AsGiven).unwrap();
        let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
        let diff = diff.to_scalar::<f64>().unwrap();
        assert!(diff <= 1e-10, "{}: values differ by {diff:e}", c.name);
        let g_want = (&want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_got = (&got * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (x, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
            let a = g_got.get(x).unwrap();
            let b = g_want.get(x).unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f64>().unwrap();
            assert!(diff <= 1e-10, "{}: {name} differs by {diff:e}", c.name);
        }
    }
}

/// In f32 the default tiles agree with the composed attention within 1e-5 relative.
#[test]
fn f32_agrees_within_f32_rounding() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let c = Case {
        name: "f32",
        b: 1,
        h: 6,
        kv: 2,
        t: 200,
        s: 200,
        window: None,
        pad: vec![13],
        packed: None,
    };
    let d = 16;
    let f = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
    let q = f(randn(&mut rng, (c.b, c.h, c.t, d)));
    let k = f(randn(&mut rng, (c.b, c.kv, c.s, d)));
    let v = f(randn(&mut rng, (c.b, c.kv, c.s, d)));
    let (mask, bias) = mask_and_bias(&c);
    let want = attend(&q, &k, &v, &bias, 0.25).unwrap();
    let got =
        flash_attention(&q, &k, &v, &mask, 0.25, Tiles::default(), Operands::AsGiven).unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "f32 values differ by {diff:e}"
    );
    let gw = want.sum_all().unwrap().backward().unwrap();
    let gg = got.sum_all().unwrap().backward().unwrap();
    for x in [&q, &k, &v] {
        let (a, b) = (gg.get(x).unwrap(), gw.get(x).unwrap());
        let m = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= 1e-5 * m.max(1.0),
            "f32 gradients differ by {diff:e}"
        );
    }
}

/// The bf16 cases: several tiles each way, T not a multiple of a tile, a cache offset, left
/// padding, GQA, a window and packed segments; (head size, case).
fn bf16_cases() -> Vec<(usize, Case)> {
    let seg = |prompt: usize, parts: &[usize]| -> Vec<u32> {
        let mut v = vec![0u32; prompt];
        for (k, &n) in parts.iter().enumerate() {
            v.extend(std::iter::repeat_n(k as u32 + 1, n));
        }
        v
    };
    vec![
        (
            64,
            Case {
                name: "ragged, GQA 3",
                b: 2,
                h: 6,
                kv: 2,
                t: 300,
                s: 300,
                window: None,
                pad: vec![0, 37],
                packed: None,
            },
        ),
        (
            32,
            Case {
                name: "cache offset, window",
                b: 1,
                h: 4,
                kv: 4,
                t: 70,
                s: 333,
                window: Some(150),
                pad: vec![5],
                packed: None,
            },
        ),
        (
            64,
            Case {
                name: "packed",
                b: 1,
                h: 3,
                kv: 1,
                t: 290,
                s: 290,
                window: None,
                pad: vec![0],
                packed: Some(vec![seg(100, &[120, 70])]),
            },
        ),
    ]
}

/// A bf16 case's inputs (as `Var`s), the output's weights and the mask.
fn bf16_inputs(
    rng: &mut rand_chacha::ChaCha8Rng,
    d: usize,
    c: &Case,
) -> ([Var; 3], Tensor, AttentionMask, Tensor) {
    let bf = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::BF16).unwrap()).unwrap();
    let q = bf(randn(rng, (c.b, c.h, c.t, d)));
    let k = bf(randn(rng, (c.b, c.kv, c.s, d)));
    let v = bf(randn(rng, (c.b, c.kv, c.s, d)));
    let w = randn(rng, (c.b, c.t, c.h, d))
        .reshape((c.b, c.t, c.h * d))
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let (mask, bias) = mask_and_bias(c);
    ([q, k, v], w, mask, bias)
}

/// Values and the gradients of Σ w ∘ o of a bf16 call on `engine` (None: the f32 products);
/// f32 inputs (holding bf16 values) are read as [`Operands::Bf16`] and give f32 results.
fn bf16_run(
    engine: Option<Engine>,
    [q, k, v]: &[Var; 3],
    w: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> [Tensor; 4] {
    let operands = if q.dtype() == DType::F32 {
        Operands::Bf16
    } else {
        Operands::AsGiven
    };
    let got = crate::ops::bf16_dot::with_engine(engine, || {
        flash_attention(q, k, v, mask, scale, Tiles::default(), operands).unwrap()
    });
    assert_eq!(got.dtype(), q.dtype());
    let g = (&got * w).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |x: &Var| g.get(x).unwrap().clone();
    [got, grad(q), grad(k), grad(v)]
}

/// A bf16 model's attention on each bf16 engine — this CPU's (AMX or `VDPBF16PS`, where it
/// has one) and the portable emulation of `VDPBF16PS` (any host) — and on the f32 products:
/// values and gradients within bf16's rounding (P, dO and dS are rounded to bf16 as
/// PyTorch's bf16 kernel does; 1e-2 of the largest) of the f64 composed attention on the
/// same bf16 values.
#[test]
fn bf16_engines_agree_within_bf16_rounding() {
    use crate::ops::bf16_dot::{engine, Kernels};
    let engines = [
        ("this CPU's", engine()),
        (
            "emulated VDPBF16PS",
            Some(Engine::Tiles(Kernels::emulated())),
        ),
        ("f32", None),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for (d, c) in bf16_cases() {
        let (inputs, w, mask, bias) = bf16_inputs(&mut rng, d, &c);
        let scale = 1.0 / (d as f64).sqrt();
        let f64_of = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let [q64, k64, v64] = [0, 1, 2].map(|i| f64_of(&inputs[i]));
        let want = attend(&q64, &k64, &v64, &bias, scale).unwrap();
        let w64 = w.to_dtype(DType::F64).unwrap();
        let gw = (&want * &w64)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let wants = [
            want.clone(),
            gw.get(&q64).unwrap().clone(),
            gw.get(&k64).unwrap().clone(),
            gw.get(&v64).unwrap().clone(),
        ];
        for (name, e) in engines {
            let got = bf16_run(e, &inputs, &w, &mask, scale);
            for ((a, b), what) in got.iter().zip(&wants).zip(["values", "dq", "dk", "dv"]) {
                let a = a.to_dtype(DType::F64).unwrap();
                let m = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let diff = (&a - b).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f64>().unwrap();
                assert!(
                    diff <= 1e-2 * m.max(1e-3),
                    "{} on {name}: {what} differs by {diff:e} (max {m:e})",
                    c.name
                );
            }
        }
    }
}

/// Where this CPU has AVX512-BF16, the `VDPBF16PS` products give the bits of their
/// portable emulation: values and gradients, in f32, equal exactly.
#[test]
fn vdpbf16ps_attention_equals_its_emulation_bit_for_bit() {
    use crate::ops::bf16_dot::Kernels;
    let Some(hardware) = Kernels::hardware() else {
        eprintln!("no AVX512-BF16 here: nothing to compare");
        return;
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for (d, c) in bf16_cases() {
        let (inputs, w, mask, _) = bf16_inputs(&mut rng, d, &c);
        let f32_of = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let inputs = [0, 1, 2].map(|i| f32_of(&inputs[i]));
        let w = w.to_dtype(DType::F32).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let run = |k: Kernels| bf16_run(Some(Engine::Tiles(k)), &inputs, &w, &mask, scale);
        let (a, b) = (run(hardware), run(Kernels::emulated()));
        for ((x, y), what) in a.iter().zip(&b).zip(["values", "dq", "dk", "dv"]) {
            let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{}: {what} differs from the emulation", c.name);
        }
    }
}
