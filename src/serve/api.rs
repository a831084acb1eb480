//! OpenAI's wire format: request bodies, response bodies, streaming chunks and the
//! `{"error": {message, type, param, code}}` body every failure answers with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::data::Message;

/// A failure answered with OpenAI's error body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message)
    }

    pub fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param), ..Self::bad_request(message) }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"), message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "invalid_request_error", Some("insufficient_permissions"), message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), message)
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError { param: Some("model"), ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found"), format!("The model `{model}` does not exist")) }
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", Some("request_too_large"), format!("The request body exceeds {limit} bytes"))
    }

    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "requests", Some("rate_limit_exceeded"), message)
    }

    pub fn queue_full() -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "server_overloaded", Some("queue_full"), "The server's queue is full; retry shortly")
    }

    pub fn timeout() -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", Some("timeout"), "The request took longer than the server's per-request timeout")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, message)
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `stop`, `prompt`, `input`: one string or a list of them.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What `/v1/chat/completions` and `/v1/completions` share.
#[derive(Deserialize, Debug, Clone)]
pub struct SamplingParams {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub params: SamplingParams,
}

/// A chat message; `content` is a string or a list of `{type: "text", text}` parts.
#[derive(Deserialize, Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

impl ChatRequest {
    /// The conversation as lathe messages; only text parts are accepted.
    pub fn to_messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_param("messages", "`messages` must hold at least one message"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant") {
                    return Err(ApiError::bad_param("messages", format!("messages[{i}].role `{}`: expected system, user or assistant", m.role)));
                }
                let role = if m.role == "developer" { "system" } else { m.role.as_str() };
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for part in parts {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (other, _) => {
                                    return Err(ApiError::bad_param("messages", format!("messages[{i}]: content part type `{other}` is not supported (text only)")));
                                }
                            }
                        }
                        text
                    }
                };
                Ok(Message::new(role, &content))
            })
            .collect()
    }
}

#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub params: SamplingParams,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ModerationRequest {
    pub input: OneOrMany,
    pub model: Option<String>,
}

/// Which endpoint a generation answers, for the shape of its bodies and chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completion => "/v1/completions",
        }
    }
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// The whole answer of a non-streaming request.
pub fn full_response(endpoint: Endpoint, id: &str, created: i64, model: &str, text: &str, finish_reason: &str, usage: Value) -> Value {
    match endpoint {
        Endpoint::Chat => json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null}, "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage,
        }),
        Endpoint::Completion => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage,
        }),
    }
}

/// One streaming chunk: the role opens a chat stream, then text deltas, then the finish reason.
pub fn chunk(endpoint: Endpoint, id: &str, created: i64, model: &str, role: bool, text: Option<&str>, finish_reason: Option<&str>) -> Value {
    match endpoint {
        Endpoint::Chat => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(text) = text {
                delta.insert("content".into(), json!(text));
            }
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
            })
        }
        Endpoint::Completion => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish_reason}],
        }),
    }
}

/// The closing usage chunk of `stream_options.include_usage`.
pub fn usage_chunk(endpoint: Endpoint, id: &str, created: i64, model: &str, usage: Value) -> Value {
    let object = if endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage})
}
