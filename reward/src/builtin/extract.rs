//! Pulling the answer out of a completion before comparing it.

use crate::{Options, RewardError};

#[derive(Debug, Clone)]
pub enum Extract {
    /// The whole completion (trimmed).
    All,
    /// The first line (trimmed).
    FirstLine,
    /// The first / last number in the text (`-12`, `3.5`, `1,000`).
    FirstNumber,
    LastNumber,
    /// The content of the last `\boxed{…}`.
    Boxed,
    /// The first capture group (or the whole match) of a regex.
    Regex(regex::Regex),
}

impl Extract {
    /// Reads option `extract` (`all` | `first_line` | `first_number` | `last_number` |
    /// `boxed` | `regex:PATTERN`).
    pub fn from_options(o: &Options, default: &str) -> Result<Self, RewardError> {
        let v = o.str_or("extract", default)?;
        Ok(match v.as_str() {
            "all" => Extract::All,
            "first_line" => Extract::FirstLine,
            "first_number" => Extract::FirstNumber,
            "last_number" => Extract::LastNumber,
            "boxed" => Extract::Boxed,
            _ if v.starts_with("regex:") => Extract::Regex(regex::Regex::new(&v[6..]).map_err(|e| RewardError::BadOption {
                name: o.reward().to_string(),
                option: "extract".into(),
                msg: e.to_string(),
            })?),
            _ => {
                return Err(RewardError::BadOption {
                    name: o.reward().to_string(),
                    option: "extract".into(),
                    msg: format!("`{v}`: expected all, first_line, first_number, last_number, boxed or regex:PATTERN"),
                })
            }
        })
    }

    pub fn apply<'a>(&self, text: &'a str) -> Option<String> {
        match self {
            Extract::All => Some(text.trim().to_string()),
            Extract::FirstLine => text.trim().lines().next().map(|l| l.trim().to_string()),
            Extract::FirstNumber => numbers(text).next(),
            Extract::LastNumber => numbers(text).last(),
            Extract::Boxed => {
                let start = text.rfind("\\boxed{")? + 7;
                let mut depth = 1;
                for (i, c) in text[start..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(text[start..start + i].trim().to_string());
                            }
                        }
                        _ => {}
                    }
                }
                None
            }
            Extract::Regex(re) => {
                let c = re.captures(text)?;
                Some(c.get(1).or_else(|| c.get(0))?.as_str().to_string())
            }
        }
    }
}

fn number_re() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+").expect("valid regex"))
}

fn numbers(text: &str) -> impl Iterator<Item = String> + '_ {
    number_re()
        .find_iter(text)
        .map(|m| m.as_str().replace(',', ""))
}

/// The number a string denotes, if any (`"1,000"` → 1000).
pub fn extract_number(text: &str) -> Option<f64> {
    numbers(text).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction() {
        assert_eq!(
            Extract::LastNumber.apply("12+35 = 47.").as_deref(),
            Some("47")
        );
        assert_eq!(
            Extract::FirstNumber
                .apply("answer: -1,200 then 3")
                .as_deref(),
            Some("-1200")
        );
        assert_eq!(
            Extract::Boxed
                .apply("so \\boxed{\\frac{1}{2}} ok")
                .as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(
            Extract::FirstLine.apply("  42 \nmore").as_deref(),
            Some("42")
        );
        assert_eq!(Extract::LastNumber.apply("no digits"), None);
        assert_eq!(extract_number("x 3.5"), Some(3.5));
    }
}
