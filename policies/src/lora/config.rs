//! LoRA hyper-parameters, read from and written to PEFT's `adapter_config.json`.

use crate::error::{PolicyError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which linear modules get an adapter (PEFT's `target_modules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// A module matches when its path equals a name or ends with `.name`.
    List(Vec<String>),
    /// `"all-linear"`: every linear layer but the output head; any other string is a regex
    /// that must match the whole module path (PEFT's rule).
    Pattern(String),
}

impl Targets {
    pub fn all_linear() -> Self {
        Targets::Pattern("all-linear".into())
    }

    /// PEFT's `check_target_module_exists`, for one module path.
    pub fn matches(&self, path: &str, is_output_head: bool) -> Result<bool> {
        Ok(match self {
            Targets::List(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Targets::Pattern(p) if p == "all-linear" => !is_output_head,
            Targets::Pattern(p) => regex::Regex::new(&format!("^(?:{p})$"))
                .map_err(|e| {
                    PolicyError::InvalidArgument(format!("target_modules regex `{p}`: {e}"))
                })?
                .is_match(path),
        })
    }
}

/// How A is initialised (B is always zero, so a new adapter starts as the identity).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum LoraInit {
    /// PEFT's default: Kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in).
    #[default]
    Default,
    /// PEFT's "gaussian": N(0, σ = 1/r).
    Gaussian,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Targets,
    pub use_rslora: bool,
    pub init: LoraInit,
    /// Set for GPT-2's Conv1D layers (weights stored in×out).
    pub fan_in_fan_out: bool,
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: Targets::List(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            init: LoraInit::Default,
            fan_in_fan_out: false,
            base_model_name_or_path: None,
        }
    }
}

impl LoraConfig {
    /// `α/r`, or `α/√r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(PolicyError::InvalidArgument(
                "LoRA r must be at least 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PolicyError::InvalidArgument(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            )));
        }
        Ok(())
    }
}

/// The fields of PEFT's `adapter_config.json` that rlft reads; the rest are ignored on
/// read, and written with PEFT's defaults.
#[derive(Debug, Deserialize)]
struct PeftConfigIn {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Option<Targets>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    bias: Option<String>,
    #[serde(default)]
    use_dora: bool,
    base_model_name_or_path: Option<String>,
    init_lora_weights: Option<serde_json::Value>,
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    modules_to_save: Option<serde_json::Value>,
    layers_to_transform: Option<serde_json::Value>,
}

/// The module names PEFT's SEQ_CLS task saves whole (`modules_to_save`).
pub const HEAD_MODULES: [&str; 2] = ["score", "classifier"];

/// `adapter_config.json` → the LoRA configuration and the `modules_to_save` names.
pub(crate) fn read_peft_config(path: &Path) -> Result<(LoraConfig, Vec<String>)> {
    let c: PeftConfigIn = crate::error::read_json(path)?;
    let bad = |key: &str, msg: &str| Err(PolicyError::config(path, key, msg));
    match c.peft_type.as_deref() {
        Some("LORA") => {}
        Some(other) => {
            return bad(
                "peft_type",
                &format!("`{other}` is not supported; rlft reads LORA adapters"),
            )
        }
        None => return bad("peft_type", "missing (expected \"LORA\")"),
    }
    if c.use_dora {
        return bad("use_dora", "DoRA adapters are not supported");
    }
    if let Some(b) = c.bias.as_deref().filter(|b| *b != "none") {
        return bad("bias", &format!("`{b}` is not supported; only \"none\""));
    }
    if c.rank_pattern.as_ref().is_some_and(|m| !m.is_empty()) {
        return bad("rank_pattern", "per-module ranks are not supported");
    }
    if c.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty()) {
        return bad("alpha_pattern", "per-module alphas are not supported");
    }
    // Fully trained modules: only a sequence-classification head (`score`, PEFT's
    // SEQ_CLS default names), stored whole beside the LoRA weights.
    let modules_to_save: Vec<String> = match c.modules_to_save {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(v) => {
            let names: Vec<String> = serde_json::from_value(v).map_err(|_| {
                PolicyError::config(path, "modules_to_save", "expected a list of module names")
            })?;
            if let Some(other) = names.iter().find(|n| !HEAD_MODULES.contains(&n.as_str())) {
                return bad(
                    "modules_to_save",
                    &format!(
                        "`{other}`: only a classification head ({}) can be trained in full",
                        HEAD_MODULES.join(", ")
                    ),
                );
            }
            let mut names = names;
            names.sort();
            names.dedup();
            names
        }
    };
    if c.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
        return bad("layers_to_transform", "not supported");
    }
    let init = match c.init_lora_weights.as_ref().and_then(|v| v.as_str()) {
        Some("gaussian") => LoraInit::Gaussian,
        _ => LoraInit::Default,
    };
    let cfg = LoraConfig {
        r: c.r
            .ok_or_else(|| PolicyError::config(path, "r", "missing"))?,
        lora_alpha: c
            .lora_alpha
            .ok_or_else(|| PolicyError::config(path, "lora_alpha", "missing"))?,
        lora_dropout: c.lora_dropout,
        target_modules: c
            .target_modules
            .ok_or_else(|| PolicyError::config(path, "target_modules", "missing"))?,
        use_rslora: c.use_rslora,
        init,
        fan_in_fan_out: c.fan_in_fan_out,
        base_model_name_or_path: c.base_model_name_or_path,
    };
    cfg.validate()
        .map_err(|e| PolicyError::config(path, "r", e.to_string()))?;
    Ok((cfg, modules_to_save))
}

/// PEFT's `adapter_config.json` for `cfg`, with `targets` the leaf names actually adapted
/// and `heads` the modules saved whole (then the task is `SEQ_CLS`, else `CAUSAL_LM`).
pub(crate) fn peft_config_json(
    cfg: &LoraConfig,
    targets: Vec<String>,
    heads: Vec<String>,
) -> serde_json::Value {
    let task_type = if heads.is_empty() {
        "CAUSAL_LM"
    } else {
        "SEQ_CLS"
    };
    let modules_to_save = if heads.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::json!(heads)
    };
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "auto_mapping": null,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "revision": null,
        "inference_mode": true,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "exclude_modules": null,
        "fan_in_fan_out": cfg.fan_in_fan_out,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "modules_to_save": modules_to_save,
        "init_lora_weights": match cfg.init { LoraInit::Default => serde_json::json!(true), LoraInit::Gaussian => serde_json::json!("gaussian") },
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "use_dora": false,
        "layer_replication": null,
        "lora_bias": false,
    })
}
