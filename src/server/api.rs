//! The OpenAI request and response shapes the server speaks, their validation, and
//! its error type (an OpenAI-style `{"error": {...}}` body with an HTTP status).
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::sampling::SamplerParams;
use crate::tokenizer::ChatMessage;

/// Most stop sequences per request (OpenAI allows 4).
const MAX_STOP: usize = 4;

/// An error answered to the client: status, OpenAI error type, message.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid or missing API key: send the header `Authorization: Bearer KEY`",
        )
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            message,
        )
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    /// The body: `{"error": {"message", "type", "code"}}`, as OpenAI and llama-server
    /// send it.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// A JSON request body, parsed with OpenAI-style errors (axum's own extractor
/// answers in plain text, and only with the right content type).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_data() {
            "invalid request"
        } else {
            "malformed JSON"
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields chat and text completions share.
#[derive(Debug, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
}

/// A message's content: a string, or a list of parts of which only text is read.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Value,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// What a request asks of generation, validated.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Most tokens to generate (None: the server's default, `--n-predict`).
    pub max_tokens: Option<usize>,
    pub sampler: SamplerParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

impl CommonParams {
    /// Check every value. `random_seed` is used when the request gives no seed. The
    /// `model` named is not checked: the server has one model, which serves whatever
    /// name a client asks for (clients default to names like `gpt-4o-mini`), as
    /// llama-server's does; the response names the model really served.
    pub fn validate(&self, random_seed: u64) -> Result<GenParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("only n = 1 is supported"));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            // llama.cpp's n_predict = -1: until the end of generation or a full context.
            Some(-1) => Some(usize::MAX),
            Some(n) if n >= 1 => Some(n as usize),
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "max_tokens must be at least 1 (or -1 for no limit), got {n}"
                )))
            }
        };
        let mut sampler = SamplerParams::default();
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::bad_request(format!(
                    "temperature must lie in [0, 2], got {t}"
                )));
            }
            sampler.temp = t as f32;
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::bad_request(format!(
                    "top_p must lie in (0, 1], got {p}"
                )));
            }
            sampler.top_p = p as f32;
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::bad_request(format!(
                    "min_p must lie in [0, 1], got {p}"
                )));
            }
            sampler.min_p = p as f32;
        }
        if let Some(k) = self.top_k {
            if k < 0 {
                return Err(ApiError::bad_request(format!(
                    "top_k must be 0 (off) or more, got {k}"
                )));
            }
            sampler.top_k = k as usize;
        }
        sampler.seed = match self.seed {
            Some(s) => s as u64,
            None => random_seed,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
            return Err(ApiError::bad_request(format!(
                "stop takes at most {MAX_STOP} non-empty strings"
            )));
        }
        Ok(GenParams {
            max_tokens,
            sampler,
            stop,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

impl ChatRequest {
    /// The messages, checked: known roles, text content.
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request("messages must not be empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !matches!(
                    m.role.as_str(),
                    "system" | "developer" | "user" | "assistant"
                ) {
                    return Err(ApiError::bad_request(format!(
                        "messages[{i}].role '{}' is not one of system, user, assistant",
                        m.role
                    )));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::bad_request(format!(
                                        "messages[{i}]: content parts of type '{kind}' are not \
                                         supported (text only)"
                                    )))
                                }
                            }
                        }
                        text
                    }
                };
                let role = if m.role == "developer" {
                    "system"
                } else {
                    &m.role
                };
                Ok(ChatMessage::new(role, content))
            })
            .collect()
    }
}

impl CompletionRequest {
    /// The prompt: one string (a list holding one string is accepted too).
    pub fn prompt_text(&self) -> Result<String, ApiError> {
        match &self.prompt {
            Value::String(s) => Ok(s.clone()),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                Ok(a[0].as_str().unwrap_or_default().to_string())
            }
            _ => Err(ApiError::bad_request(
                "prompt must be a string (one prompt per request)",
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub content: String,
    #[serde(default)]
    pub add_special: bool,
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<i64>,
}

/// Token counts in OpenAI's `usage`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptDetails,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PromptDetails {
    /// Prompt tokens whose KV entries were reused from the slot's cache.
    pub cached_tokens: usize,
}

/// llama-server's `timings`, with the slot's KV cache size added.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    /// Prompt tokens run through the model for this request.
    pub prompt_n: usize,
    /// Prompt tokens reused from the slot's cache.
    pub cache_n: usize,
    pub prompt_ms: f64,
    pub prompt_per_second: f64,
    pub predicted_n: usize,
    pub predicted_ms: f64,
    pub predicted_per_second: f64,
    /// Bytes the slot's KV cache holds after the request.
    pub kv_bytes: usize,
    /// Bytes it would hold without eviction.
    pub kv_bytes_full: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(body: Value) -> Result<GenParams, ApiError> {
        let req: ChatRequest = serde_json::from_value(body).unwrap();
        req.common.validate(7)
    }

    #[test]
    fn max_tokens_default_unlimited_and_invalid() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let p = params(json!({"messages": msgs})).unwrap();
        assert_eq!(p.max_tokens, None, "absent: the server's --n-predict");
        assert_eq!(p.sampler.seed, 7, "no seed: the random one given");
        let p = params(json!({"messages": msgs, "max_tokens": -1})).unwrap();
        assert_eq!(p.max_tokens, Some(usize::MAX), "-1: no limit");
        let p = params(json!({"messages": msgs, "max_completion_tokens": 5, "max_tokens": 9}));
        assert_eq!(p.unwrap().max_tokens, Some(5), "the newer name wins");
        let e = params(json!({"messages": msgs, "max_tokens": 0})).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        // Any model name: the one model serves it.
        assert!(params(json!({"messages": msgs, "model": "gpt-4o-mini"})).is_ok());
        let p = params(json!({"messages": msgs, "model": "m", "stop": "x", "seed": 3})).unwrap();
        assert_eq!((p.stop, p.sampler.seed), (vec!["x".to_string()], 3));
    }
}
