//! One traversal of a model's weights. Each module lists its parts once (a block, then the
//! model around its blocks); [`linears`], [`linears_mut`] and [`params`] all read that list,
//! so the order of LoRA candidates and of parameters is written in one place.

use crate::linear::{linear_params, Linear};
use candle_core::Tensor;

/// A weight as a traversal yields it; `T` is `&Tensor` or `&mut Tensor`, `L` likewise.
pub enum Part<'a, T, L> {
    /// The tensor parameter `{path}.{name}` (a norm's weight or bias, an embedding table).
    Param(&'a str, &'static str, T),
    /// A linear layer: a LoRA candidate whose weight (and bias) are parameters.
    Linear(L),
    /// A linear layer whose weight is another parameter (a tied output head): a LoRA
    /// candidate, not a parameter of its own.
    Tied(L),
}

pub type PartRef<'a> = Part<'a, &'a Tensor, &'a Linear>;
pub type PartMut<'a> = Part<'a, &'a mut Tensor, &'a mut Linear>;

/// The linear layers, tied ones included.
pub fn linears<'a>(parts: impl IntoIterator<Item = PartRef<'a>>) -> Vec<&'a Linear> {
    parts
        .into_iter()
        .filter_map(|p| match p {
            Part::Linear(l) | Part::Tied(l) => Some(l),
            Part::Param(..) => None,
        })
        .collect()
}

/// The linear layers, tied ones included.
pub fn linears_mut<'a>(parts: impl IntoIterator<Item = PartMut<'a>>) -> Vec<&'a mut Linear> {
    parts
        .into_iter()
        .filter_map(|p| match p {
            Part::Linear(l) | Part::Tied(l) => Some(l),
            Part::Param(..) => None,
        })
        .collect()
}

/// Every distinct parameter with its Hugging Face name; a tied layer adds none.
pub fn params<'a>(parts: impl IntoIterator<Item = PartMut<'a>>) -> Vec<(String, &'a mut Tensor)> {
    let mut out = Vec::new();
    for p in parts {
        match p {
            Part::Param(path, name, t) => out.push((format!("{path}.{name}"), t)),
            Part::Linear(l) => out.extend(linear_params(l)),
            Part::Tied(_) => {}
        }
    }
    out
}
