//! A GGUF's tensors as a Hugging Face `model.safetensors`: llama.cpp's names mapped back to
//! transformers', the q/k row permutation of `convert_hf_to_gguf.py`'s Llama path undone, and
//! quantized blocks dequantized to f32 by candle (as transformers' loader does; F32, F16 and
//! BF16 tensors keep their type). The file is written a tensor at a time: a tensor's data is
//! read, dequantized and permuted only when the writer reaches it, so the conversion holds
//! one tensor in memory, never the model.

use super::config::HfConfig;
use super::{err, io};
use crate::error::Result;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::cell::RefCell;
use std::path::Path;

/// llama.cpp's whole-model tensors and transformers' names for them.
const WHOLE: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// A block's modules: llama.cpp's name and transformers'.
const BLOCK: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// `name` in the other naming (llama.cpp → transformers when `to_hf`, else back), or `None`
/// for a tensor rlft does not map.
fn rename(name: &str, to_hf: bool) -> Option<String> {
    let side =
        |(gguf, hf): (&'static str, &'static str)| if to_hf { (gguf, hf) } else { (hf, gguf) };
    if let Some((_, to)) = WHOLE.into_iter().map(side).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (from_prefix, to_prefix) = side(("blk.", "model.layers."));
    let (layer, rest) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if !matches!(param, "weight" | "bias") {
        return None;
    }
    let (_, to) = BLOCK
        .into_iter()
        .map(side)
        .find(|(from, _)| *from == module)?;
    Some(format!("{to_prefix}{layer}.{to}.{param}"))
}

/// transformers' name of llama.cpp's tensor `name`, or `None` for one rlft does not map.
pub fn hf_name(name: &str) -> Option<String> {
    rename(name, true)
}

/// llama.cpp's name of transformers' tensor `name` (the GGUF export).
pub fn gguf_name(name: &str) -> Option<String> {
    rename(name, false)
}

/// The head count whose permutation llama.cpp applied to `name` (Llama's q and k only).
fn permuted_heads(name: &str, cfg: &HfConfig) -> Option<usize> {
    if cfg.arch != "llama" {
        return None;
    }
    if name.contains(".attn_q.") {
        Some(cfg.num_heads)
    } else if name.contains(".attn_k.") {
        Some(cfg.num_kv_heads)
    } else {
        None
    }
}

/// Undoes `convert_hf_to_gguf.py`'s `permute` of q/k rows: llama.cpp stores each head's rows
/// interleaved as (pair, half); transformers' rotate-half wants (half, pair). `rows` =
/// `heads · 2 · d`; row `h·2d + d_i·2 + t` goes to `h·2d + t·d + d_i`.
pub fn unpermute_rows(v: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads / 2;
    let mut out = vec![0f32; v.len()];
    for h in 0..heads {
        for di in 0..d {
            for t in 0..2 {
                let src = h * 2 * d + di * 2 + t;
                let dst = h * 2 * d + t * d + di;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The inverse of [`unpermute_rows`] (the GGUF export and the tests).
pub fn permute_rows(v: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads / 2;
    let mut out = vec![0f32; v.len()];
    for h in 0..heads {
        for di in 0..d {
            for t in 0..2 {
                let src = h * 2 * d + t * d + di;
                let dst = h * 2 * d + di * 2 + t;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// One output tensor, read when the writer asks for its bytes.
struct Lazy<'a> {
    file: &'a Path,
    content: &'a Content,
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    heads: Option<usize>,
    /// The first failure: `View::data` cannot return one, so it is kept and reported after.
    failure: &'a RefCell<Option<crate::PolicyError>>,
}

impl Lazy<'_> {
    /// The tensor dequantized to f32, its rows un-permuted when llama.cpp permuted them, as
    /// little-endian bytes of `self.dtype` (exact: an F16/BF16 tensor dequantizes to the f32
    /// values of its own type).
    fn bytes(&self) -> Result<Vec<u8>> {
        let mut f = std::fs::File::open(self.file).map_err(|e| io(self.file, e))?;
        let fail = |e: candle_core::Error| err(self.file, format!("tensor `{}`: {e}", self.name));
        let mut v: Vec<f32> = self
            .content
            .tensor(&mut f, &self.name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1())
            .map_err(fail)?;
        if let Some(heads) = self.heads {
            let cols = self.shape[1..].iter().product::<usize>().max(1);
            v = unpermute_rows(&v, self.shape[0], cols, heads);
        }
        Ok(match self.dtype {
            Dtype::F16 => v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            Dtype::BF16 => v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
            _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        })
    }
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.bytes() {
            Ok(b) => Cow::Owned(b),
            Err(e) => {
                self.failure.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes `out` (a `model.safetensors`) from the tensors of the GGUF `file`.
pub fn write_safetensors(file: &Path, content: &Content, cfg: &HfConfig, out: &Path) -> Result<()> {
    let failure = RefCell::new(None);
    let mut views = Vec::new();
    for (name, info) in &content.tensor_infos {
        let Some(hf) = hf_name(name) else {
            return Err(err(
                file,
                format!("tensor `{name}` has no Hugging Face counterpart rlft knows"),
            ));
        };
        if let Some(layer) = hf
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
        {
            if layer.parse::<usize>().map_or(true, |l| l >= cfg.num_layers) {
                return Err(err(
                    file,
                    format!(
                        "tensor `{name}`: layer beyond block_count {}",
                        cfg.num_layers
                    ),
                ));
            }
        }
        let dtype = match info.ggml_dtype {
            GgmlDType::F16 => Dtype::F16,
            GgmlDType::BF16 => Dtype::BF16,
            _ => Dtype::F32,
        };
        let heads = permuted_heads(name, cfg);
        let shape = info.shape.dims().to_vec();
        if let Some(h) = heads {
            if shape[0] % (2 * h) != 0 {
                return Err(err(
                    file,
                    format!(
                        "tensor `{name}`: {} rows do not split into {h} heads",
                        shape[0]
                    ),
                ));
            }
        }
        views.push((
            hf,
            Lazy {
                file,
                content,
                name: name.clone(),
                shape,
                dtype,
                heads,
                failure: &failure,
            },
        ));
    }
    let written = safetensors::tensor::serialize_to_file(views, None, out);
    if let Some(e) = failure.into_inner() {
        return Err(e);
    }
    written.map_err(|e| err(file, format!("writing {}: {e}", out.display())))
}
