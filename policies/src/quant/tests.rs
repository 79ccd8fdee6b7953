//! Against bitsandbytes (`tests/fixtures/kbit/reference.safetensors`, made by
//! `tests/fixtures/make_kbit_fixture.py`): code books, dynamic map, packed 4-bit indices,
//! absmax (plain and double-quantized), dequantized values, and int8 row-wise codes.

use super::*;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

fn reference() -> HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/kbit/reference.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn code_books_and_the_dynamic_map_are_bitsandbytes_own() {
    let r = reference();
    assert_eq!(f32s(&r["code.nf4"]), NF4.to_vec());
    let fp4 = f32s(&r["code.fp4"]);
    assert_eq!(fp4, FP4.to_vec());
    assert!(FP4[8].is_sign_negative() && FP4[0].is_sign_positive());
    assert_eq!(f32s(&r["code.dynamic"]), dynamic_map().to_vec());
}

#[test]
fn four_bit_codes_and_values_equal_bitsandbytes() {
    let r = reference();
    let w = f32s(&r["weight"]);
    for (name, kind) in [("nf4", FourBit::Nf4), ("fp4", FourBit::Fp4)] {
        // Plain absmax: the same bytes, absmax and values.
        let q = FourBitWeight::quantize(&w, 24, 160, kind, false);
        assert_eq!(
            q.packed,
            u8s(&r[&format!("{name}.packed")]),
            "{name} indices"
        );
        let Absmax::Plain(a) = &q.absmax else {
            panic!()
        };
        assert_eq!(a, &f32s(&r[&format!("{name}.absmax")]), "{name} absmax");
        assert_eq!(
            q.dequantize(),
            f32s(&r[&format!("{name}.dequantized")]),
            "{name} values"
        );
        // Double quantization: bitsandbytes' stored codes dequantize to its values exactly.
        let k = format!("{name}_dq");
        let theirs = FourBitWeight {
            kind,
            rows: 24,
            cols: 160,
            packed: u8s(&r[&format!("{k}.packed")]),
            absmax: Absmax::Double {
                codes: u8s(&r[&format!("{k}.absmax_codes")]),
                scale: f32s(&r[&format!("{k}.absmax_scale")]),
                offset: f32s(&r[&format!("{k}.offset")])[0],
            },
        };
        let want = f32s(&r[&format!("{k}.dequantized")]);
        assert_eq!(
            theirs.dequantize(),
            want,
            "{k}: dequantizing bitsandbytes' codes"
        );
        // And rlft's own double quantization gives the same codes (its mean may differ from
        // torch's in the last bit, so values within a rounding of it).
        let ours = FourBitWeight::quantize(&w, 24, 160, kind, true);
        assert_eq!(ours.packed, theirs.packed, "{k} indices");
        let Absmax::Double { codes, offset, .. } = &ours.absmax else {
            panic!()
        };
        let Absmax::Double {
            codes: tc,
            offset: to,
            ..
        } = &theirs.absmax
        else {
            panic!()
        };
        assert_eq!(codes, tc, "{k} absmax codes");
        assert!(
            (offset - to).abs() <= f32::EPSILON * to.abs(),
            "{k} offset {offset} vs {to}"
        );
        assert!(max_diff(&ours.dequantize(), &want) < 1e-7, "{k} values");
        assert_eq!(ours.bytes(), 1920 + 60 + 4 + 4);
    }
}

#[test]
fn int8_row_codes_equal_bitsandbytes() {
    let r = reference();
    let w = f32s(&r["weight"]);
    let q = Int8Weight::quantize(&w, 24, 160);
    let want: Vec<i8> = r["int8.values"]
        .flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as i8)
        .collect();
    assert_eq!(q.values, want);
    assert_eq!(q.row_absmax, f32s(&r["int8.row_absmax"]));
    // Dequantized within half a step of the weight.
    let d = q.dequantize();
    for (r, (row, wrow)) in d.chunks(160).zip(w.chunks(160)).enumerate() {
        let half_step = q.row_absmax[r] / 127.0 / 2.0;
        assert!(max_diff(row, wrow) <= half_step * 1.0001, "row {r}");
    }
}

#[test]
fn dequantizing_some_rows_equals_the_same_rows_of_the_whole() {
    let w: Vec<f32> = (0..24 * 160)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 97.0)
        .collect();
    let q = FourBitWeight::quantize(&w, 24, 160, FourBit::Nf4, true);
    let all = q.dequantize();
    let absmax = q.absmax.values();
    let mut part = vec![0f32; 5 * 160];
    q.dequantize_rows(7, 12, &absmax, &mut part);
    assert_eq!(part, all[7 * 160..12 * 160].to_vec());
    let q8 = Int8Weight::quantize(&w, 24, 160);
    let mut part = vec![0f32; 3 * 160];
    q8.dequantize_rows(20, 23, &mut part);
    assert_eq!(part, q8.dequantize()[20 * 160..23 * 160].to_vec());
}

/// Any run of values (odd starts and lengths, across blocks and rows) dequantizes to
/// `code[q_e] · absmax[e / 64]` element by element: the SIMD kernel and the scalar loop, and
/// int8's row-by-row widening, agree with the formula bit for bit.
#[test]
fn dequantizing_any_range_equals_the_formula_per_value() {
    use crate::ops::half_weight::RowSource;
    let (rows, cols) = (9, 100);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 53 % 89) as f32 - 44.0) / 61.0)
        .collect();
    for kind in [FourBit::Nf4, FourBit::Fp4] {
        let q = FourBitWeight::quantize(&w, rows, cols, kind, false);
        let absmax = q.absmax.values();
        let code = kind.code();
        let value = |e: usize| {
            let b = q.packed[e / 2];
            code[(if e % 2 == 0 { b >> 4 } else { b & 0xF }) as usize] * absmax[e / BLOCK]
        };
        for (start, len) in [
            (0, 900),
            (1, 1),
            (3, 130),
            (63, 2),
            (64, 64),
            (101, 700),
            (899, 1),
        ] {
            let mut out = vec![0f32; len];
            q.dequantize_range(start, &absmax, &mut out);
            let want: Vec<f32> = (start..start + len).map(value).collect();
            assert_eq!(out, want, "{kind:?} {start}+{len}");
        }
    }
    let q8 = QuantWeight::Int8(Int8Weight::quantize(&w, rows, cols));
    let all = q8.dequantize();
    for (start, len) in [(0, 900), (57, 300), (199, 2)] {
        let mut out = vec![0f32; len];
        q8.widen(start, &mut out);
        assert_eq!(out, all[start..start + len].to_vec(), "int8 {start}+{len}");
    }
}

/// Both products of every kind of k-bit weight, one block and several (a block smaller than a
/// row included), equal the f32 products of the dequantized weight to f32 rounding.
#[test]
fn quantized_products_equal_products_with_the_dequantized_weight() {
    let dev = Device::Cpu;
    for (m, n, k) in [(3, 37, 64), (40, 70, 48), (17, 9, 130)] {
        let w: Vec<f32> = Tensor::randn(0f32, 0.05, n * k, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        let weights = [
            QuantWeight::four_bit(FourBitWeight::quantize(&w, n, k, FourBit::Nf4, true)),
            QuantWeight::four_bit(FourBitWeight::quantize(&w, n, k, FourBit::Fp4, false)),
            QuantWeight::Int8(Int8Weight::quantize(&w, n, k)),
        ];
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
        let (xv, dv): (Vec<f32>, Vec<f32>) = (
            x.flatten_all().unwrap().to_vec1().unwrap(),
            dy.flatten_all().unwrap().to_vec1().unwrap(),
        );
        for q in &weights {
            let deq = q.dequantize();
            let wt = Tensor::from_vec(deq, (n, k), &dev).unwrap();
            let want_t: Vec<f32> = x
                .matmul(&wt.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want_n: Vec<f32> = dy
                .matmul(&wt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for block in [crate::ops::half_weight::BLOCK_ELEMS, 5 * k, 1] {
                assert!(
                    max_diff(&q.matmul_t_blocks(&xv, m, block), &want_t) < 1e-5,
                    "t {m}x{n}x{k} {block}"
                );
                assert!(
                    max_diff(&q.matmul_n_blocks(&dv, m, block), &want_n) < 1e-5,
                    "n {m}x{n}x{k} {block}"
                );
            }
        }
    }
}

/// The double quantization's offset is `torch.sum(absmax) / n` with torch's CPU summation
/// order: vectors of 1 to 4,096 values summed as torch sums them on this CPU
/// (`tests/fixtures/kbit/logprobs.json`, `torch_sums`), bit for bit; the plain left-to-right
/// sum differs on some of them.
#[test]
fn the_offset_sums_as_torch_does() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/kbit/logprobs.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut plain_differs = 0;
    for case in v["torch_sums"].as_array().unwrap() {
        let xs: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let want = case["sum"].as_f64().unwrap() as f32;
        let got = super::four_bit::torch_sum_f32(&xs);
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "n = {}: {got} vs torch {want}",
            xs.len()
        );
        let plain: f32 = xs.iter().sum();
        plain_differs += (plain.to_bits() != want.to_bits()) as usize;
    }
    assert!(
        plain_differs > 0,
        "the fixture does not tell the orders apart"
    );
}
