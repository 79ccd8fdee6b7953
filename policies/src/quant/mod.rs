//! k-bit frozen weights as bitsandbytes stores them (issue 15, QLoRA): 4-bit NF4 / FP4 with a
//! blockwise absmax (blocks of 64 consecutive values of the row-major weight, which may run
//! across rows), optionally double-quantized (the absmax values less their mean, in 8 bits
//! with the signed dynamic map, blocks of 256), and 8-bit row-wise absmax (LLM.int8 without
//! outliers).
//!
//! 4-bit, per block b of values x:
//!   `absmax_b = max |x|`, `s = clamp(x · (1 / absmax_b), −1, 1)`,
//!   `q = #{midpoints of the sorted code book < s}` (then mapped back to the code's own order),
//!   and `x̂ = code[q] · absmax_b`; two indices a byte, the first in the high nibble.
//! int8, per row r: `absmax_r = max |x|`, `q = round_half_even(x · (127 / absmax_r))`,
//!   `x̂ = q · absmax_r / 127`.
//!
//! All arithmetic is in f32, in bitsandbytes' order, so the codes and the dequantized values
//! equal its own (`tests/fixtures/make_kbit_fixture.py`).
//!
//! `four_bit.rs` and `int8.rs` hold the formats, `weight.rs` the products ([`QuantWeight`]),
//! `simd.rs` the AVX2 kernels; this file the setting ([`Quantization`], [`QuantConfig`]).

mod four_bit;
mod int8;
#[cfg(target_arch = "x86_64")]
mod simd;
mod weight;

pub use four_bit::{dynamic_map, Absmax, FourBit, FourBitWeight, BLOCK, DOUBLE_BLOCK, FP4, NF4};
pub use int8::Int8Weight;
pub use weight::QuantWeight;

/// `absmax` of each block of `block` consecutive values (the last block may be short).
fn block_absmax(values: &[f32], block: usize) -> Vec<f32> {
    values
        .chunks(block)
        .map(|c| c.iter().fold(0f32, |m, x| m.max(x.abs())))
        .collect()
}

/// How the frozen base's linear weights are held (`model.quantization`), named as
/// bitsandbytes / transformers name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// In `model.dtype`, as loaded.
    #[default]
    None,
    /// 8-bit row-wise absmax (`load_in_8bit`).
    Int8,
    /// 4-bit NormalFloat (`load_in_4bit`, `bnb_4bit_quant_type = "nf4"`).
    Nf4,
    /// 4-bit float (`bnb_4bit_quant_type = "fp4"`).
    Fp4,
}

impl Quantization {
    pub const NAMES: &'static str = "none, int8, nf4, fp4";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Quantization::None,
            "int8" => Quantization::Int8,
            "nf4" => Quantization::Nf4,
            "fp4" => Quantization::Fp4,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Int8 => "int8",
            Quantization::Nf4 => "nf4",
            Quantization::Fp4 => "fp4",
        }
    }
}

/// The quantization of a load: the kind and, for 4 bits, `bnb_4bit_use_double_quant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuantConfig {
    pub kind: Quantization,
    pub double_quant: bool,
}

impl QuantConfig {
    pub fn is_none(&self) -> bool {
        self.kind == Quantization::None
    }

    /// `nf4 (double quantization)`, `int8`, …
    pub fn describe(&self) -> String {
        match self.kind {
            Quantization::Nf4 | Quantization::Fp4 if self.double_quant => {
                format!("{} (double quantization)", self.kind.name())
            }
            k => k.name().to_string(),
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod model_tests;
