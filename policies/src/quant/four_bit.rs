//! 4-bit NF4 / FP4 weights as bitsandbytes stores them: the code books, blockwise absmax
//! (blocks of 64 consecutive values of the row-major weight, which may run across rows),
//! optionally double-quantized (the absmax less their mean, in 8 bits with the signed
//! dynamic map, blocks of 256), quantize and dequantize.

use super::block_absmax;
#[cfg(target_arch = "x86_64")]
use super::simd;
use rayon::prelude::*;

/// bitsandbytes' NF4 code book (`get_4bit_type("nf4")`): the quantiles of N(0, 1) scaled to
/// [−1, 1], with an exact zero (Dettmers et al. 2023, QLoRA).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 code book (`get_4bit_type("fp4")`: 1 sign, 2 exponent, 1 mantissa bit,
/// normalised by its largest value); index 8 is −0.
pub const FP4: [f32; 16] = [
    0.0,
    0.005_208_333_5,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    -0.0,
    -0.005_208_333_5,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

/// Values per 4-bit block (bitsandbytes' default for QLoRA).
pub const BLOCK: usize = 64;
/// Absmax values per block of the double quantization.
pub const DOUBLE_BLOCK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBit {
    Nf4,
    Fp4,
}

impl FourBit {
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBit::Nf4 => &NF4,
            FourBit::Fp4 => &FP4,
        }
    }
}

/// A code book sorted, with its midpoints and the map from sorted position to code index:
/// quantizing is counting the midpoints below a value (`torch.bucketize`, right = false).
struct Buckets {
    midpoints: Vec<f32>,
    order: Vec<u8>,
}

impl Buckets {
    fn new(code: &[f32]) -> Self {
        let mut order: Vec<u8> = (0..code.len()).map(|i| i as u8).collect();
        // Ties (FP4's +0 at 0 and −0 at 8) keep index order: +0 first.
        order.sort_by(|&a, &b| {
            code[a as usize]
                .partial_cmp(&code[b as usize])
                .expect("finite")
                .then(a.cmp(&b))
        });
        let midpoints = order
            .windows(2)
            .map(|w| (code[w[0] as usize] + code[w[1] as usize]) / 2.0)
            .collect();
        Self { midpoints, order }
    }

    fn index(&self, s: f32) -> u8 {
        self.order[self.midpoints.partition_point(|&m| m < s)]
    }
}

/// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`, Dettmers 2015): 8-bit
/// codes of a dynamic exponent (10⁻⁶ … 10⁰) and a fraction whose bits shrink as the exponent
/// grows, sorted. Its values come from `torch.linspace` in f32, whose vectorised CPU kernel
/// rounds in its own way, so they are bitsandbytes' own bits rather than recomputed
/// (`tests/fixtures/make_kbit_fixture.py` checks them).
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_BITS.map(f32::from_bits)
}

#[rustfmt::skip]
const DYNAMIC_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The per-block absmax of a 4-bit weight, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    /// `absmax ≈ dynamic[codes] · scale[block of 256] + offset`.
    Double {
        codes: Vec<u8>,
        scale: Vec<f32>,
        offset: f32,
    },
}

impl Absmax {
    /// The absmax values, dequantized where they are double-quantized.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Double {
                codes,
                scale,
                offset,
            } => {
                let map = dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| map[c as usize] * scale[i / DOUBLE_BLOCK] + offset)
                    .collect()
            }
        }
    }
}

/// A `[rows, cols]` weight in 4 bits.
#[derive(Debug, Clone, PartialEq)]
pub struct FourBitWeight {
    pub kind: FourBit,
    pub rows: usize,
    pub cols: usize,
    /// `⌈rows·cols / 2⌉` bytes; value `e` is the high nibble of byte `e / 2` when `e` is even.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl FourBitWeight {
    /// Quantizes a row-major `[rows, cols]` weight as `bnb.functional.quantize_4bit` does,
    /// with `double` its `compress_statistics`.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, kind: FourBit, double: bool) -> Self {
        assert_eq!(w.len(), rows * cols, "weight of {rows} × {cols}");
        let absmax = block_absmax(w, BLOCK);
        let buckets = Buckets::new(kind.code());
        let mut packed = vec![0u8; w.len().div_ceil(2)];
        // A block's 64 values fill 32 bytes of their own: the blocks run in parallel.
        packed
            .par_chunks_mut(BLOCK / 2)
            .zip(w.par_chunks(BLOCK))
            .zip(&absmax)
            .for_each(|((bytes, chunk), &am)| {
                let inv = 1.0 / am.max(1e-38);
                for (k, &x) in chunk.iter().enumerate() {
                    let q = buckets.index((x * inv).clamp(-1.0, 1.0));
                    bytes[k / 2] |= if k % 2 == 0 { q << 4 } else { q };
                }
            });
        let absmax = if double {
            double_quantize(&absmax)
        } else {
            Absmax::Plain(absmax)
        };
        Self {
            kind,
            rows,
            cols,
            packed,
            absmax,
        }
    }

    /// Rows `r0..r1` dequantized into `out` (`(r1 − r0) · cols` values), given the
    /// dequantized `absmax` ([`Absmax::values`]).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, absmax: &[f32], out: &mut [f32]) {
        self.dequantize_range(r0 * self.cols, absmax, &mut out[..(r1 - r0) * self.cols]);
    }

    /// The row-major values from `start` on dequantized into `out`:
    /// `x̂_e = code[q_e] · absmax[e / 64]`.
    pub fn dequantize_range(&self, start: usize, absmax: &[f32], out: &mut [f32]) {
        let code = self.kind.code();
        let one = |e: usize| {
            let byte = self.packed[e / 2];
            let q = if e % 2 == 0 { byte >> 4 } else { byte & 0xF };
            code[q as usize] * absmax[e / BLOCK]
        };
        let end = start + out.len();
        let mut e = start;
        if e % 2 == 1 && e < end {
            out[0] = one(e);
            e += 1;
        }
        // Whole bytes: both values of a byte are in one block (64 is even).
        let pairs = (end - e) / 2;
        let bytes = &self.packed[e / 2..e / 2 + pairs];
        let dst = &mut out[e - start..e - start + 2 * pairs];
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            // SAFETY: AVX2 was detected; the slices are as the kernel documents.
            unsafe { simd::dequantize_pairs(code, bytes, e / 2, absmax, dst) };
            if e + 2 * pairs < end {
                out[out.len() - 1] = one(end - 1);
            }
            return;
        }
        for (i, (d, &byte)) in dst.chunks_exact_mut(2).zip(bytes).enumerate() {
            let a = absmax[(e + 2 * i) / BLOCK];
            d[0] = code[(byte >> 4) as usize] * a;
            d[1] = code[(byte & 0xF) as usize] * a;
        }
        if e + 2 * pairs < end {
            out[out.len() - 1] = one(end - 1);
        }
    }

    /// The whole weight dequantized, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &self.absmax.values(), &mut out);
        out
    }

    /// Bytes held: the packed indices and the absmax (codes, scales and offset).
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(v) => 4 * v.len(),
                Absmax::Double { codes, scale, .. } => codes.len() + 4 * scale.len() + 4,
            }
    }
}

/// bitsandbytes' `compress_statistics`: `offset = mean(absmax)`, then `absmax − offset` in
/// 8 bits with the dynamic map, blocks of 256, each with its own absmax.
fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = torch_sum_f32(absmax) / absmax.len() as f32;
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let scale = block_absmax(&centred, DOUBLE_BLOCK);
    let buckets = Buckets::new(&dynamic_map());
    let codes = centred
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let inv = 1.0 / scale[i / DOUBLE_BLOCK].max(1e-38);
            buckets.index((x * inv).clamp(-1.0, 1.0))
        })
        .collect();
    Absmax::Double {
        codes,
        scale,
        offset,
    }
}

/// `torch.sum` of a contiguous f32 vector on the CPU, in its order (ATen's `SumKernel.cpp`,
/// AVX2 build: 8-lane vectors), so that the double quantization's offset `absmax.mean()`
/// (= sum / n) has bitsandbytes' last bit, which decides some absmax codes: the `n / 8`
/// vectors summed lane-wise by [`row_sum`], then the scalar tail, then the 8 lanes in order;
/// fewer than 8 values by [`row_sum`] on scalars. On an AVX-512 build torch sums 16 lanes; its
/// offset can then differ in the last bit.
pub(super) fn torch_sum_f32(v: &[f32]) -> f32 {
    const LANES: usize = 8;
    if v.len() < LANES {
        return row_sum::<1>(v)[0];
    }
    let vecs = v.len() / LANES;
    let lanes = row_sum::<LANES>(&v[..vecs * LANES]);
    let mut total = 0f32;
    for &x in &v[vecs * LANES..] {
        total += x;
    }
    for lane in lanes {
        total += lane;
    }
    total
}

/// ATen's `row_sum` over `v` read as vectors of `L` lanes (`v.len()` a multiple of `L`),
/// lane-wise: rows of 4 vectors (ILP 4), each of the 4 columns summed in a cascade of 4
/// levels that flushes every 2^p rows (`multi_row_sum`, p = max(4, ⌈log2 rows⌉ / 4)), the
/// leftover vectors into column 0, then columns 1–3 into column 0.
// Index loops, as ATen's, so the order of every addition can be read against it.
#[allow(clippy::needless_range_loop)]
fn row_sum<const L: usize>(v: &[f32]) -> [f32; L] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let add = |a: &mut [f32; L], b: &[f32; L]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    let vector = |i: usize| -> [f32; L] { std::array::from_fn(|l| v[i * L + l]) };
    let vecs = v.len() / L;
    let rows = vecs / ILP;
    let ceil_log2 = if rows <= 1 {
        0
    } else {
        usize::BITS - (rows - 1).leading_zeros()
    } as usize;
    let power = (ceil_log2 / LEVELS).max(4);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[[0f32; L]; ILP]; LEVELS];
    let mut i = 0;
    while i + step <= rows {
        for _ in 0..step {
            for k in 0..ILP {
                add(&mut acc[0][k], &vector(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0.0; L];
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    for r in i..rows {
        for k in 0..ILP {
            add(&mut acc[0][k], &vector(r * ILP + k));
        }
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    let mut sums = acc[0];
    for r in rows * ILP..vecs {
        add(&mut sums[0], &vector(r));
    }
    for k in 1..ILP {
        let col = sums[k];
        add(&mut sums[0], &col);
    }
    sums[0]
}
