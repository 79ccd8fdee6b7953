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

/// A bf16 model's attention on AMX (where this CPU has it): values and gradients within
/// bf16's rounding (P, dO and dS are rounded to bf16 as PyTorch's bf16 kernel does; 1e-2 of
/// the largest) of the f64 composed attention on the same bf16 values, with several tiles
/// each way, T not a multiple of a tile, a cache offset, left padding, GQA, a window and
/// packed segments. On a CPU without AMX the bf16 call takes the f32 products and the same
/// bounds hold.
#[test]
fn bf16_on_amx_agrees_within_bf16_rounding() {
    let amx = crate::ops::bf16_dot::amx::available();
    eprintln!("AMX products: {amx}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let seg = |prompt: usize, parts: &[usize]| -> Vec<u32> {
        let mut v = vec![0u32; prompt];
        for (k, &n) in parts.iter().enumerate() {
            v.extend(std::iter::repeat_n(k as u32 + 1, n));
        }
        v
    };
    let cases = [
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
    ];
    for (d, c) in cases {
        let bf = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::BF16).unwrap()).unwrap();
        let q = bf(randn(&mut rng, (c.b, c.h, c.t, d)));
        let k = bf(randn(&mut rng, (c.b, c.kv, c.s, d)));
        let v = bf(randn(&mut rng, (c.b, c.kv, c.s, d)));
        let w = randn(&mut rng, (c.b, c.t, c.h, d))
            .reshape((c.b, c.t, c.h * d))
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let (mask, bias) = mask_and_bias(&c);
        let scale = 1.0 / (d as f64).sqrt();
        let f64_of = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let (q64, k64, v64) = (f64_of(&q), f64_of(&k), f64_of(&v));
        let want = attend(&q64, &k64, &v64, &bias, scale).unwrap();
        let got = flash_attention(
            &q,
            &k,
            &v,
            &mask,
            scale,
            Tiles::default(),
            Operands::AsGiven,
        )
        .unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let close = |a: &Tensor, b: &Tensor, what: &str| {
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
                "{}: {what} differs by {diff:e} (max {m:e})",
                c.name
            );
        };
        close(&got, &want, "values");
        let w64 = w.to_dtype(DType::F64).unwrap();
        let gw = (&want * &w64)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gg = (&got * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (x, x64, name) in [(&q, &q64, "dq"), (&k, &k64, "dk"), (&v, &v64, "dv")] {
            close(gg.get(x).unwrap(), gw.get(x64).unwrap(), name);
        }
    }
}
