//! Rotary embedding tables: inverse frequencies (default, linear, llama3 scaling) and the
//! cos/sin lookup by per-sequence position.

use candle_core::{DType, Device, Result, Tensor};
use serde_json::Value;

/// How the inverse frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor` (transformers' "linear").
    Linear {
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone)]
pub struct RopeConfig {
    pub theta: f64,
    pub head_dim: usize,
    pub scaling: RopeScaling,
}

/// Reads `rope_theta` and the scaling from a config: transformers ≥ 5 writes
/// `rope_parameters {rope_type, rope_theta, …}`, older versions a top-level `rope_theta`
/// and `rope_scaling {type | rope_type, …}`. Returns `Err(key, message)` on a bad value.
pub fn parse_rope(
    cfg: &Value,
    head_dim: usize,
    default_theta: f64,
) -> std::result::Result<RopeConfig, (String, String)> {
    let params = cfg
        .get("rope_parameters")
        .filter(|v| v.is_object())
        .or_else(|| cfg.get("rope_scaling").filter(|v| v.is_object()));
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| cfg.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(default_theta);
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> std::result::Result<f64, (String, String)> {
        params
            .and_then(|p| p.get(key))
            .and_then(Value::as_f64)
            .ok_or_else(|| {
                (
                    format!("rope_parameters.{key}"),
                    format!("required for rope_type `{kind}`"),
                )
            })
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err((
                "rope_parameters.rope_type".into(),
                format!("unsupported rope_type `{other}`; supported: default, linear, llama3"),
            ))
        }
    };
    Ok(RopeConfig {
        theta,
        head_dim,
        scaling,
    })
}

impl RopeConfig {
    /// `inv_freq[i] = 1 / theta^(2i/d)`, then scaled; computed in f32 as transformers does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / (self.theta as f32).powf(i as f32 / d as f32))
            .collect();
        match self.scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                // transformers `_compute_llama3_parameters`: long wavelengths are divided by
                // `factor`, short ones kept, the band between interpolated smoothly.
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let out = if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        out as f32
                    })
                    .collect()
            }
        }
    }
}

/// cos/sin tables `[max_positions, head_dim/2]`, indexed by position at run time.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
}

impl RopeTables {
    pub fn new(cfg: &RopeConfig, max_positions: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let inv = cfg.inv_freq();
        let half = inv.len();
        let mut angles = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            angles.extend(inv.iter().map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (max_positions, half), dev)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            max_positions,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `positions`: [b, t] u32 → (cos, sin), each [b, t, head_dim/2].
    pub fn lookup(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, ()))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, ()))?;
        Ok((cos, sin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_hand_computed_bands() {
        let cfg = RopeConfig {
            theta: 500000.0,
            head_dim: 128,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let plain = RopeConfig {
            scaling: RopeScaling::Default,
            ..cfg.clone()
        }
        .inv_freq();
        let scaled = cfg.inv_freq();
        // Highest frequency (wavelength 2π < 2048): unchanged.
        assert_eq!(scaled[0], plain[0]);
        // Lowest frequency (wavelength far above 8192): divided by the factor.
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
        // A medium band element lies strictly between the two.
        let mid = plain
            .iter()
            .position(|&f| {
                let w = 2.0 * std::f64::consts::PI / f as f64;
                w > 2048.0 && w < 8192.0
            })
            .expect("a medium-band frequency");
        assert!(scaled[mid] < plain[mid] && scaled[mid] > plain[mid] / 8.0);
    }

    #[test]
    fn parses_old_and_new_config_shapes() {
        let new: Value =
            serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}});
        assert_eq!(parse_rope(&new, 16, 1e4).unwrap().theta, 1e6);
        let old: Value = serde_json::json!({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}});
        let r = parse_rope(&old, 16, 1e4).unwrap();
        assert_eq!(r.theta, 5e5);
        assert_eq!(r.scaling, RopeScaling::Linear { factor: 2.0 });
        let bad: Value = serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}});
        let err = parse_rope(&bad, 16, 1e4).unwrap_err();
        assert!(err.1.contains("yarn") && err.1.contains("llama3"));
    }
}
