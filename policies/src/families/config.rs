//! Reading a family's `config.json` into its serde config struct, with errors that name the
//! file and the key, and the activation functions those configs name.
//!
//! A key set to `null` reads as absent (its `#[serde(default)]`), as transformers treats it.

use crate::error::{PolicyError, Result};
use serde::de::value::BorrowedStrDeserializer;
use serde::de::{DeserializeOwned, DeserializeSeed, Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;

/// Deserializes `T` from the object `cfg` read from `path`. A bad value is reported as
/// `path: key `k`: invalid type: …, expected …`; a missing required key as `key `k`: missing`.
pub(crate) fn parse<T: DeserializeOwned>(cfg: &Value, path: &Path) -> Result<T> {
    let Some(map) = cfg.as_object() else {
        return Err(PolicyError::config(path, "", "expected a JSON object"));
    };
    let mut key = None;
    T::deserialize(Keys::new(map, &mut key)).map_err(|e| {
        let msg = e.to_string();
        match key {
            Some(k) => PolicyError::config(path, &k, msg),
            // Past the last key: a required one was absent ("missing field `k`").
            None => match missing_field(&msg) {
                Some(k) => PolicyError::config(path, k, "missing"),
                None => PolicyError::config(path, "", msg),
            },
        }
    })
}

fn missing_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")?.split('`').next()
}

/// A JSON object as a serde map that remembers the key whose value is being read, so an
/// error can name it (serde_json's own messages name only missing fields).
struct Keys<'de, 'k> {
    iter: serde_json::map::Iter<'de>,
    value: Option<&'de Value>,
    key: &'k mut Option<String>,
}

impl<'de, 'k> Keys<'de, 'k> {
    fn new(map: &'de Map<String, Value>, key: &'k mut Option<String>) -> Self {
        Self {
            iter: map.iter(),
            value: None,
            key,
        }
    }
}

impl<'de> MapAccess<'de> for Keys<'de, '_> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> std::result::Result<Option<K::Value>, Self::Error> {
        for (k, v) in self.iter.by_ref() {
            if v.is_null() {
                continue;
            }
            *self.key = Some(k.clone());
            self.value = Some(v);
            return seed.deserialize(BorrowedStrDeserializer::new(k)).map(Some);
        }
        *self.key = None;
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        let value = self
            .value
            .take()
            .ok_or_else(|| serde_json::Error::custom("value read before its key"))?;
        seed.deserialize(value)
    }
}

impl<'de> Deserializer<'de> for Keys<'de, '_> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(
        self,
        visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        visitor.visit_map(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// Activation functions by their transformers names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU: "gelu".
    Gelu,
    /// Tanh approximation: "gelu_new", "gelu_pytorch_tanh", "gelu_fast".
    GeluTanh,
    Relu,
}

impl Activation {
    pub fn apply(self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Activation::Silu => x.silu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
        }
    }
}

impl<'de> Deserialize<'de> for Activation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Ok(match name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(D::Error::custom(format!(
                    "unsupported activation `{other}`; supported: silu, gelu, gelu_new, gelu_pytorch_tanh, relu"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Cfg {
        hidden_size: usize,
        #[serde(default = "eps")]
        eps: f64,
        #[serde(default = "silu")]
        act: Activation,
    }
    fn eps() -> f64 {
        1e-6
    }
    fn silu() -> Activation {
        Activation::Silu
    }

    fn err(v: Value) -> String {
        parse::<Cfg>(&v, Path::new("m/config.json"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_and_nulls() {
        let c: Cfg = parse(
            &serde_json::json!({"hidden_size": 8, "eps": null, "other": [1]}),
            Path::new("c"),
        )
        .unwrap();
        assert_eq!((c.hidden_size, c.eps, c.act), (8, 1e-6, Activation::Silu));
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let e = err(serde_json::json!({"eps": 1.0}));
        assert_eq!(e, "m/config.json: key `hidden_size`: missing");
        let e = err(serde_json::json!({"hidden_size": null}));
        assert_eq!(e, "m/config.json: key `hidden_size`: missing");
        let e = err(serde_json::json!({"hidden_size": "64"}));
        assert!(
            e.starts_with("m/config.json: key `hidden_size`: invalid type"),
            "{e}"
        );
        let e = err(serde_json::json!({"hidden_size": -1}));
        assert!(e.contains("key `hidden_size`"), "{e}");
        let e = err(serde_json::json!({"hidden_size": 8, "act": "tanh"}));
        assert!(
            e.contains("key `act`: unsupported activation `tanh`; supported: silu"),
            "{e}"
        );
    }
}
