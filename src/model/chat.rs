//! Chat templates rendered the way transformers renders them: Jinja with `trim_blocks` and
//! `lstrip_blocks`, Python string/dict methods, `raise_exception`, `strftime_now`, and a
//! `tojson` that writes what Python's `json.dumps` writes.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use crate::data::Message;
use crate::error::{Result, usage};

/// ChatML, for models that come without a template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, … as the template sees them.
    special_tokens: Vec<(String, String)>,
}

impl ChatTemplate {
    pub fn new(source: &str, special_tokens: Vec<(String, String)>) -> Result<Self> {
        let mut env = Environment::new();
        let mut syntax = SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(|e| usage(format!("chat template syntax: {e}")))?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(source))
            .map_err(|e| usage(format!("chat template: {}", jinja_message(&e))))?;
        Ok(ChatTemplate { env, special_tokens })
    }

    /// Render a conversation; with `add_generation_prompt` the text ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_value(Value::from(Serde(messages)), add_generation_prompt, &[])
    }

    /// Render with any serialisable messages (tool calls, extra fields) and extra variables
    /// (`tools`, `documents`, …).
    pub fn render_value(&self, messages: Value, add_generation_prompt: bool, extra: &[(&str, Value)]) -> Result<String> {
        let mut context: std::collections::BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        context.insert("messages".into(), messages);
        context.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        context.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| usage(jinja_message(&e)))?;
        template
            .render(Value::from_object(context))
            .map_err(|e| usage(format!("chat template: {}", jinja_message(&e))))
    }
}

/// minijinja's message with its location, on one line.
fn jinja_message(error: &JinjaError) -> String {
    let mut text = error.to_string();
    if let Some(line) = error.line() {
        if !text.contains("line") {
            text += &format!(" (line {line})");
        }
    }
    text
}

fn raise_exception(message: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, format!("raise_exception: {message}")))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=…,
/// sort_keys=…)`, whose default separators are `", "` and `": "`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::BadSerialization, e.to_string()))?;
    if sort_keys.unwrap_or(false) {
        json = sorted(json);
    }
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(&pad));
            json.serialize(&mut ser)
        }
        None => json.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter)),
    };
    written.map_err(|e| JinjaError::new(ErrorKind::BadSerialization, e.to_string()))?;
    Ok(Value::from_safe_string(String::from_utf8_lossy(&out).into_owned()))
}

fn sorted(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Python's compact-with-spaces JSON layout: `{"a": 1, "b": [1, 2]}`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// transformers' `{% generation %}…{% endgeneration %}` (which marks assistant tokens) becomes
/// a block that always renders, keeping any whitespace-control dashes.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let left_dash = inner.starts_with('-');
        let right_dash = inner.ends_with('-');
        let word = inner.trim_matches('-').trim();
        let replacement = match word {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(body) => {
                out.push_str("{%");
                if left_dash {
                    out.push('-');
                }
                out.push(' ');
                out.push_str(body);
                out.push(' ');
                if right_dash {
                    out.push('-');
                }
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<Message> {
        vec![Message::new("user", "Say hi."), Message::new("assistant", "Hi!")]
    }

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, vec![]).unwrap();
        assert_eq!(
            t.render(&conversation(), false).unwrap(),
            "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n"
        );
        assert!(t.render(&conversation()[..1], true).unwrap().ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn trim_and_lstrip_blocks_apply() {
        let source = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(source, vec![]).unwrap();
        assert_eq!(t.render(&conversation(), false).unwrap(), "[Say hi.]\n");
    }

    #[test]
    fn python_methods_special_tokens_and_tojson() {
        let source = "{{ bos_token }}{{ messages[0].content.strip().upper() }}|{{ {'a': 1, 'b': [1, 'x']} | tojson }}";
        let t = ChatTemplate::new(source, vec![("bos_token".into(), "<s>".into())]).unwrap();
        let messages = vec![Message::new("user", "  hi  ")];
        assert_eq!(t.render(&messages, false).unwrap(), "<s>HI|{\"a\": 1, \"b\": [1, \"x\"]}");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let source = "{% if messages[0].role != 'system' %}{{ raise_exception('System message first') }}{% endif %}";
        let t = ChatTemplate::new(source, vec![]).unwrap();
        let e = t.render(&conversation(), false).unwrap_err();
        assert!(e.to_string().contains("System message first"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn generation_tags_render_their_content() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(source, vec![]).unwrap();
        assert_eq!(t.render(&conversation(), false).unwrap(), "Hi!");
    }

    #[test]
    fn syntax_errors_are_bad_input() {
        let e = ChatTemplate::new("{% for m in messages %}", vec![]).err().unwrap();
        assert_eq!(e.exit_code(), 2);
    }
}
