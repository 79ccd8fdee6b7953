use super::*;

/// A small deterministic generator (xorshift) for the tests' operands.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Roughly normal values (a sum of uniforms), with an outlier now and then.
    fn value(&mut self) -> f32 {
        let u: f32 = (0..4)
            .map(|_| (self.next() % 100_000) as f32 / 1e5)
            .sum::<f32>()
            - 2.0;
        if self.next().is_multiple_of(97) {
            u * 300.0
        } else {
            u
        }
    }
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }
}

fn widen(b: u16) -> f64 {
    f32::from_bits((b as u32) << 16) as f64
}

/// `Σ_p bf16(x[i, p]) · w[j, p]` in f64, with the sum of |terms| for the tolerance.
fn reference_t(x: &[f32], w: &[u16], (m, n, k): (usize, usize, usize)) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut a) = (0f64, 0f64);
            for p in 0..k {
                let t = widen(round_bf16(x[i * k + p])) * widen(w[j * k + p]);
                s += t;
                a += t.abs();
            }
            out.push((s, a));
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[(f64, f64)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (idx, (&g, &(s, a))) in got.iter().zip(want).enumerate() {
        // f32 sums of exact products: error ≤ (terms) · 2⁻²⁴ · Σ|t|; the k here are ≤ 1,200.
        let tol = 1e-4 * a + 1e-6;
        assert!(
            ((g as f64) - s).abs() <= tol,
            "{what}[{idx}]: {g} vs {s} (Σ|t| {a})"
        );
    }
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| round_bf16(x)).collect()
}

#[test]
fn round_bf16_rounds_to_nearest_even_and_flushes_denormals() {
    assert_eq!(round_bf16(1.0), 0x3f80);
    // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: to the even one, 1.
    assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
    // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ (odd) and 1 + 2·2⁻⁷ (even): up.
    assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
    // Just above the halfway point: up.
    assert_eq!(round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
    assert_eq!(round_bf16(-2.5), 0xc020);
    assert_eq!(round_bf16(1e-40), 0x0000);
    assert_eq!(round_bf16(-1e-40), 0x8000);
    assert_eq!(round_bf16(f32::MAX), 0x7f80, "overflow rounds to infinity");
    let nan = round_bf16(f32::from_bits(0x7f80_0001));
    assert_eq!(nan & 0x7fc0, 0x7fc0, "a NaN stays a quiet NaN: {nan:#x}");
    // Normal values: the half crate's conversion (round to nearest even) agrees.
    let mut rng = Rng(7);
    for _ in 0..100_000 {
        let x = f32::from_bits(rng.next() as u32);
        if x.is_normal() {
            assert_eq!(round_bf16(x), half::bf16::from_f32(x).to_bits(), "{x:e}");
        }
    }
}

/// A hand case that tells the orders apart: acc = 2²⁴ + 2, products (a₀b₀, a₁b₁) = (−1, 1).
/// Odd first: 2²⁴+3 rounds to 2²⁴+4, then −1 gives 2²⁴+3 → 2²⁴+4. Even first would give
/// 2²⁴, and one fused rounding 2²⁴ + 2.
#[test]
fn dot_pair_adds_the_odd_product_first_with_a_rounding_each() {
    let one = round_bf16(1.0) as u32;
    let minus_one = round_bf16(-1.0) as u32;
    let a = minus_one | one << 16;
    let b = one | one << 16;
    assert_eq!(dot_pair(16_777_218.0, a, b), 16_777_220.0);
    // Denormal operands count as zero; a denormal result is flushed.
    let tiny = 0x0001u32; // a bf16 denormal
    assert_eq!(dot_pair(1.0, tiny | tiny << 16, one | one << 16), 1.0);
    let small = round_bf16(2f32.powi(-70)) as u32; // normal, product 2⁻¹⁴⁰ is denormal
    assert_eq!(dot_pair(0.0, small, small).to_bits(), 0);
}

/// The packed product and the dot path, emulated, against an f64 reference of the rounded
/// operands: odd k, ragged panels and tiles, several K passes, several weight blocks.
#[test]
fn emulated_products_match_an_f64_reference() {
    let mut rng = Rng(11);
    let kernels = Kernels::emulated();
    for (m, n, k, block) in [
        (3, 37, 19, 1 << 20),
        (16, 70, 64, 1 << 20),
        (17, 70, 33, 1 << 20),
        (25, 130, 1100, 1 << 20), // k > 2·KC pairs: three passes over each panel
        (40, 200, 31, 64 * 31),   // blocks of 64 weight rows (t) and 64 (n)
        (7 * MR + 1, 65, 2 * KC + 1, 3 * 65),
    ] {
        let x = rng.values(m * k);
        let w = bf16_bits(&rng.values(n * k));
        let got = matmul_t(
            &x,
            &w,
            (m, n, k),
            block,
            false,
            Engine::Tiles(kernels),
            kernels.dot,
            None,
        );
        assert_close(
            &got,
            &reference_t(&x, &w, (m, n, k)),
            &format!("t {m}x{n}x{k}"),
        );
        // dy · w = (wᵀ as a [k, n] weight) applied to dy.
        let dy = rng.values(m * n);
        let wt: Vec<u16> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let got = matmul_n(
            &dy,
            &w,
            (m, n, k),
            block,
            false,
            Engine::Tiles(kernels),
            None,
        );
        assert_close(
            &got,
            &reference_t(&dy, &wt, (m, k, n)),
            &format!("n {m}x{n}x{k}"),
        );
    }
}

/// Whether this CPU is Intel's: the emulation follows the order of Intel's pseudocode for
/// `VDPBF16PS` and was found bit-exact on a Sapphire Rapids core; no AMD core (Zen 4) was at
/// hand to check whether AMD sums a pair in the same order.
fn genuine_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        [r.ebx, r.edx, r.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// On a CPU with AVX512-BF16: the kernels equal the emulation bit for bit on Intel's (tiles,
/// ragged edges, accumulation into c, the masked tails of the dot path; threads change
/// nothing), and are held to the f32 bound of the f64 reference on others.
#[test]
fn hardware_kernels_equal_the_emulation_bit_for_bit() {
    let Some(hw) = Kernels::hardware() else {
        eprintln!("no avx512_bf16 on this CPU: the emulation is checked against f64 only");
        return;
    };
    let exact = genuine_intel();
    if !exact {
        eprintln!("not an Intel CPU: VDPBF16PS is checked against the f64 reference");
    }
    let emu = Kernels::emulated();
    let mut rng = Rng(5);
    for (m, n, k, block) in [
        (1, 5, 7, 1 << 20),
        (4, 9, 32, 1 << 20),
        (16, 33, 95, 1 << 20),
        (17, 64, 64, 1 << 20),
        (61, 129, 1100, 64 * 1100),
        (96 + 5, 300, 577, 1 << 20),
    ] {
        // Raw bit patterns too (denormals, huge values), not only tame ones.
        let mut x = rng.values(m * k);
        for v in x.iter_mut().step_by(13) {
            let b = rng.next() as u32;
            let f = f32::from_bits(b);
            if f.is_finite() && f.abs() < 1e30 {
                *v = f;
            }
        }
        let w = bf16_bits(&rng.values(n * k));
        let dy = rng.values(m * n);
        for parallel in [false, true] {
            if !exact {
                let wt: Vec<u16> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
                let e = Engine::Tiles(hw);
                let got = matmul_t(&x, &w, (m, n, k), block, parallel, e, hw.dot, None);
                assert_close(&got, &reference_t(&x, &w, (m, n, k)), "t");
                let got = matmul_n(&dy, &w, (m, n, k), block, parallel, e, None);
                assert_close(&got, &reference_t(&dy, &wt, (m, k, n)), "n");
                continue;
            }
            let (a, b) = (
                matmul_t(
                    &x,
                    &w,
                    (m, n, k),
                    block,
                    parallel,
                    Engine::Tiles(hw),
                    hw.dot,
                    None,
                ),
                matmul_t(
                    &x,
                    &w,
                    (m, n, k),
                    block,
                    false,
                    Engine::Tiles(emu),
                    emu.dot,
                    None,
                ),
            );
            assert!(
                a.iter()
                    .zip(&b)
                    .all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan())),
                "t {m}x{n}x{k}"
            );
            let (a, b) = (
                matmul_n(&dy, &w, (m, n, k), block, parallel, Engine::Tiles(hw), None),
                matmul_n(&dy, &w, (m, n, k), block, false, Engine::Tiles(emu), None),
            );
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "n {m}x{n}x{k}"
            );
        }
    }
}

/// On a CPU with AMX: both products within the f32 bound of the f64 reference (AMX's order
/// of summation is its own), ragged edges, several blocks and threads included.
#[test]
fn amx_products_match_an_f64_reference() {
    if !amx::available() {
        eprintln!("no AMX-BF16 on this CPU (or not granted by the OS): nothing to check");
        return;
    }
    let mut rng = Rng(23);
    let emu = Kernels::emulated();
    for (m, n, k, block) in [
        (17, 33, 19, 1 << 20),
        (32, 64, 64, 1 << 20),
        (61, 129, 1100, 64 * 1100),
        (100, 300, 577, 96 * 577),
        (40, 70, 31, 1 << 20),
    ] {
        let x = rng.values(m * k);
        let w = bf16_bits(&rng.values(n * k));
        let dy = rng.values(m * n);
        let wt: Vec<u16> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        for parallel in [false, true] {
            let (kp, np) = (steps(k, Engine::Amx), steps(n, Engine::Amx));
            let mut pt = vec![0u32; n.div_ceil(NR) * kp * NR];
            pack_t(&w, n, k, kp, &mut pt, parallel);
            let mut pn = vec![0u32; k.div_ceil(NR) * np * NR];
            pack_n(&w, n, k, np, &mut pn, parallel);
            let want_t = reference_t(&x, &w, (m, n, k));
            let want_n = reference_t(&dy, &wt, (m, k, n));
            for (whole_t, whole_n) in [(None, None), (Some(&pt[..]), Some(&pn[..]))] {
                let e = Engine::Amx;
                let got = matmul_t(&x, &w, (m, n, k), block, parallel, e, emu.dot, whole_t);
                assert_close(&got, &want_t, &format!("amx t {m}x{n}x{k}"));
                let got = matmul_n(&dy, &w, (m, n, k), block, parallel, e, whole_n);
                assert_close(&got, &want_n, &format!("amx n {m}x{n}x{k}"));
            }
        }
    }
}

/// Rounding rows with `VCVTNE2PS2BF16` (where the CPU has it) equals [`round_bf16`] value
/// for value, on raw bit patterns (NaNs, infinities, denormals on Intel's CPUs), with odd
/// widths and padding.
#[test]
fn round_pairs_equals_the_scalar_rounding() {
    let mut rng = Rng(3);
    for (m, k) in [(3usize, 70usize), (5, 33), (2, 64), (1, 1)] {
        let x: Vec<f32> = (0..m * k)
            .map(|_| f32::from_bits(rng.next() as u32))
            // Denormals only where the instruction's flush to zero was seen (Intel's).
            .map(|v| {
                if v.is_subnormal() && !genuine_intel() {
                    0.5
                } else {
                    v
                }
            })
            .collect();
        let (rows, pairs) = (m + 2, k.div_ceil(2) + 5);
        let got = round_pairs(&x, (m, k), (rows, pairs), true);
        for i in 0..rows {
            for p in 0..pairs {
                let at = |c: usize| {
                    if i < m && c < k {
                        round_bf16(x[i * k + c]) as u32
                    } else {
                        0
                    }
                };
                let want = at(2 * p) | at(2 * p + 1) << 16;
                assert_eq!(got[i * pairs + p], want, "{m}x{k} row {i} pair {p}");
            }
        }
    }
}
