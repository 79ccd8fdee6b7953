//! Chat templates rendered as transformers renders them: Jinja with `trim_blocks` and
//! `lstrip_blocks`, Python string methods, `raise_exception`, `tojson`, `strftime_now`.

use crate::error::{PolicyError, Result};
use crate::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::Path;

pub struct ChatTemplate {
    source: String,
}

impl ChatTemplate {
    /// The template from `tokenizer_config.json` (`chat_template`: a string, or a list of
    /// `{name, template}` of which "default" is used), else `chat_template.jinja` beside it.
    pub(crate) fn from_config(cfg: &Value, cfg_path: &Path, dir: &Path) -> Result<Option<Self>> {
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            Some(Value::Null) | None => None,
            Some(_) => {
                return Err(PolicyError::config(
                    cfg_path,
                    "chat_template",
                    "expected a string or a list of {name, template}",
                ))
            }
        };
        let source = match source {
            Some(s) => Some(s),
            None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| PolicyError::io(&jinja, e))?)
                } else {
                    None
                }
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let tpl = Self { source };
        // Compile once now so a broken template is reported at load, naming the file.
        tpl.env()
            .map_err(|e| PolicyError::config(cfg_path, "chat_template", e.to_string()))?;
        Ok(Some(tpl))
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    fn env(&self) -> std::result::Result<minijinja::Environment<'static>, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_now(&fmt)
        });
        env.add_template_owned("chat", self.source.clone())?;
        Ok(env)
    }

    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        tok: &Tokenizer,
    ) -> Result<String> {
        if !messages.is_array() {
            return Err(PolicyError::ChatTemplate(
                "`messages` must be a list of {role, content}".into(),
            ));
        }
        let env = self
            .env()
            .map_err(|e| PolicyError::ChatTemplate(e.to_string()))?;
        let tpl = env
            .get_template("chat")
            .map_err(|e| PolicyError::ChatTemplate(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => tok.bos_token.clone().unwrap_or_default(),
            eos_token => tok.eos_token.clone().unwrap_or_default(),
            pad_token => tok.pad_token.clone().unwrap_or_default(),
            unk_token => tok.unk_token.clone().unwrap_or_default(),
        };
        tpl.render(ctx)
            .map_err(|e| PolicyError::ChatTemplate(format!("rendering failed: {e:#}")))
    }
}

/// A minimal `strftime` for the formats chat templates use (`%d %b %Y`, `%Y-%m-%d`).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", month)
        .replace("%b", &month[..3])
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_454), (2026, 1, 1));
    }
}
