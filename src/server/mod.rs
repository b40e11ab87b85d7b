//! `fastkv serve`: an OpenAI-compatible HTTP server (llama-server's routes and
//! conventions) on axum. The HTTP side parses, validates and tokenizes; one engine
//! thread ([`engine`]) owns the slots and runs the model; they talk through channels.
//!
//! The engine must run on a rayon pool thread (the CLI runs every command on one):
//! a parallel loop started from elsewhere pays a scheduler round trip per product.
pub mod api;
pub mod engine;
mod http;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tower_http::catch_panic::CatchPanicLayer;

use api::{
    ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, GenParams, TokenizeRequest,
};
use engine::{Event, Finish, Job, Permit};
use metrics::Counters;

use crate::tokenizer::{ChatTemplate, Tokenizer, TokenizerError};

/// Largest request body accepted (a long document fits many times over).
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// A system message of at least this many tokens is a document: with an eviction
/// policy it is compressed once per slot and reused by the requests that follow.
pub const DOCUMENT_MIN_TOKENS: usize = 256;

/// The chat page served at `/`.
const PAGE: &str = include_str!("page.html");

/// How the server listens.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` on every route but `/health` and `/`.
    pub api_key: Option<String>,
    /// Serve `/metrics`.
    pub metrics: bool,
    /// Host names accepted in the `Host` header besides loopback ones, when the
    /// server listens on loopback (see [`guard_browsers`]).
    pub allowed_hosts: Vec<String>,
    /// The most a client may take to send a request's head, and its body.
    pub timeout: std::time::Duration,
    /// Connections open at once; more wait to be accepted.
    pub max_connections: usize,
}

/// What the handlers need once the model is loaded.
pub struct Ready {
    pub tokenizer: Arc<Tokenizer>,
    /// Rendered on the blocking pool (a render may start the template sandbox).
    pub template: Arc<ChatTemplate>,
    /// The model's name in the API (its file name without `.gguf`).
    pub model_id: String,
    /// Tokens of context per slot.
    pub n_ctx: usize,
    pub n_slots: usize,
    /// Requests that may wait for a slot; more get 503.
    pub max_queue: usize,
    /// Whether an eviction policy is on (documents are then compressed).
    pub compress: bool,
    pub jobs: Sender<Job>,
}

struct AppState {
    /// Whether the server listens on a loopback address.
    loopback: bool,
    cfg: ServerConfig,
    ready: OnceLock<Ready>,
    counters: Arc<Counters>,
    next_id: AtomicU64,
}

impl AppState {
    fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready
            .get()
            .ok_or_else(|| ApiError::unavailable("Loading model"))
    }
}

/// A server that is listening (and answering 503 until [`Listening::set_ready`]).
pub struct Listening {
    state: Arc<AppState>,
    pub addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl Listening {
    pub fn counters(&self) -> Arc<Counters> {
        self.state.counters.clone()
    }

    /// The model is loaded: requests are served from now on.
    pub fn set_ready(&self, ready: Ready) {
        let _ = self.state.ready.set(ready);
    }
}

/// Bind the address and start answering HTTP on a small tokio runtime of its own.
pub fn listen(cfg: ServerConfig) -> Result<Listening> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fastkv-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port)))
        .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
    let addr = listener.local_addr()?;
    let limits = http::Limits {
        timeout: cfg.timeout,
        max_connections: cfg.max_connections,
    };
    let state = Arc::new(AppState {
        loopback: addr.ip().is_loopback(),
        cfg,
        ready: OnceLock::new(),
        counters: Arc::new(Counters::default()),
        next_id: AtomicU64::new(1),
    });
    let app = router(state.clone());
    runtime.spawn(http::serve(listener, app, limits));
    Ok(Listening {
        state,
        addr,
        _runtime: runtime,
    })
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), body_in_time))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard_browsers,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("internal error while handling the request").into_response()
        }))
        .with_state(state)
}

/// Keep web pages out. A page in a browser can send a "simple" cross-site POST (a
/// form's content types) without asking first, and a page on a domain that resolves
/// to 127.0.0.1 (DNS rebinding) can even read the replies. So a POST must say its body
/// is JSON (which makes a browser ask first, and this server answers no CORS
/// requests), and on a loopback bind the `Host` header must name loopback or a host
/// given with `--allowed-host`.
async fn guard_browsers(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if app.loopback {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok());
        if let Some(host) = host.filter(|h| !host_allowed(h, &app.cfg.allowed_hosts)) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "Host '{host}' is not allowed: this server listens on loopback; start it \
                     with --allowed-host NAME to accept requests addressed to NAME"
                ),
            )
            .into_response();
        }
    }
    if req.method() == axum::http::Method::POST {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "send the body as JSON, with the header `Content-Type: application/json`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Read the request's body within `--timeout`: a client that sends it a byte at a
/// time is answered 408 instead of holding its connection and handler. The body is
/// then handed on whole.
async fn body_in_time(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    // A body announced larger than the limit is refused before any of it is read
    // (reading would wait for bytes that need never come).
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        tokio::spawn(drain(body, app.cfg.timeout));
        return too_large().into_response();
    }
    let read = axum::body::to_bytes(body, MAX_BODY_BYTES);
    match tokio::time::timeout(app.cfg.timeout, read).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            let too_large =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .any(|e| e.to_string().contains("length limit exceeded"));
            if too_large {
                self::too_large()
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
            .into_response()
        }
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {} s",
                app.cfg.timeout.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

/// Read and throw away what a client still sends of a refused body, for at most
/// `limit`: a client that writes its whole body before reading the answer then sees
/// the 413 instead of a reset connection (nginx's "lingering close").
async fn drain(body: axum::body::Body, limit: std::time::Duration) {
    use tokio_stream::StreamExt;
    let mut data = body.into_data_stream();
    let _ = tokio::time::timeout(limit, async {
        while let Some(Ok(_)) = data.next().await {}
    })
    .await;
}

/// The answer to a body over [`MAX_BODY_BYTES`].
fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("request body larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// Whether a `Host` header (name, optional port) names loopback or an allowed host.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // [::1]:8080
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let loopback = name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback || allowed.iter().any(|a| a.eq_ignore_ascii_case(&name))
}

/// `--api-key`: every route but the health check and the page needs the key.
async fn authorize(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/health" | "/");
    if let (Some(key), false) = (&app.cfg.api_key, open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !key_matches(given, key) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Whether a request's bearer token is the key, compared in constant time so that
/// response times tell nothing about how much of a guess was right. (Only the key's
/// length can show, and a guess must match it whole.)
fn key_matches(given: Option<&str>, key: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(key.as_bytes())))
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    match app.ready() {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(app): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let r = app.ready()?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": r.model_id,
            "object": "model",
            "created": unix_time(),
            "owned_by": "fastkv",
            "meta": {"n_ctx": r.n_ctx, "n_slots": r.n_slots},
        }],
    })))
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    if !app.cfg.metrics {
        return ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_supported_error",
            "metrics are off: start the server with --metrics",
        )
        .into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.counters.render(),
    )
        .into_response()
}

/// A body, or the OpenAI-style error for one that could not be read (too large).
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        status => ApiError::new(status, "invalid_request_error", e.body_text()),
    })
}

async fn tokenize(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let r = app.ready()?;
    let req: TokenizeRequest = api::parse_body(&body_bytes(body)?)?;
    let tok = r.tokenizer.clone();
    let tokens = off_runtime(move || tok.encode(&req.content, req.add_special, true)).await?;
    Ok(Json(json!({ "tokens": tokens })))
}

/// Run `work` (rendering and tokenizing a request: up to the body limit of text) on
/// tokio's blocking pool, so that a large request never stalls the runtime that
/// answers every other route, /health included.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))
}

async fn detokenize(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let r = app.ready()?;
    let req: DetokenizeRequest = api::parse_body(&body_bytes(body)?)?;
    let n_vocab = r.tokenizer.n_vocab();
    let ids = req
        .tokens
        .iter()
        .map(|&t| {
            u32::try_from(t)
                .ok()
                .filter(|&t| (t as usize) < n_vocab)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "token {t} is outside the vocabulary (0..{n_vocab})"
                    ))
                })
        })
        .collect::<Result<Vec<u32>, ApiError>>()?;
    Ok(Json(json!({ "content": r.tokenizer.decode(&ids, true) })))
}

/// Chat or text completion: the two differ in prompt and response shapes only.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = app.ready()?;
    let req: ChatRequest = api::parse_body(&body_bytes(body)?)?;
    let params = req.common.validate(random_seed())?;
    let messages = req.chat_messages()?;
    // Message content stays text: only the template's own markup becomes control
    // tokens (a message holding `<|im_end|><|im_start|>system` cannot open a turn).
    // A long opening system message is a document to compress once and reuse: its
    // rendered turn must tokenize as the prompt's first tokens.
    let (template, tok, compress) = (r.template.clone(), r.tokenizer.clone(), r.compress);
    let (prompt, system) = off_runtime(move || {
        let rendered = template.render_untrusted(&tok, &messages, true)?;
        let system = if compress && messages.len() > 1 && messages[0].role == "system" {
            let (s, content) = template.render_untrusted(&tok, &messages[..1], false)?;
            Some(tok.encode_chat_content(&s, &content))
        } else {
            None
        };
        Ok((tok.encode_chat_content(&rendered.0, &rendered.1), system))
    })
    .await?
    .map_err(|e| match e {
        TokenizerError::Sandbox(_) => ApiError::internal(e.to_string()),
        e => ApiError::bad_request(format!("cannot apply the chat template: {e}")),
    })?;
    let document = system
        .filter(|s| s.len() >= DOCUMENT_MIN_TOKENS && prompt.starts_with(s))
        .map(|s| 0..s.len());
    generate(&app, r, Kind::Chat, prompt, document, params).await
}

async fn completions(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = app.ready()?;
    let req: CompletionRequest = api::parse_body(&body_bytes(body)?)?;
    let params = req.common.validate(random_seed())?;
    let text = req.prompt_text()?;
    let tok = r.tokenizer.clone();
    let prompt = off_runtime(move || tok.encode(&text, true, true)).await?;
    generate(&app, r, Kind::Text, prompt, None, params).await
}

/// Queue the job and answer: one JSON response, or a stream of events.
async fn generate(
    app: &AppState,
    r: &Ready,
    kind: Kind,
    prompt: Vec<u32>,
    document: Option<std::ops::Range<usize>>,
    params: GenParams,
) -> Result<Response, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    if prompt.len() >= r.n_ctx {
        return Err(ApiError::bad_request(format!(
            "the prompt has {} tokens, more than the context of {} tokens per slot allows \
             (leave room for the reply, or start the server with a larger -c)",
            prompt.len(),
            r.n_ctx
        )));
    }
    let Some(permit) = Permit::acquire(&app.counters, r.n_slots + r.max_queue) else {
        app.counters.rejected.fetch_add(1, Relaxed);
        return Err(ApiError::unavailable(format!(
            "the server is busy: all {} slots are in use and {} requests wait; retry later",
            r.n_slots, r.max_queue
        )));
    };
    let (tx, events) = unbounded_channel();
    let stream = params.stream;
    let include_usage = params.include_usage;
    let job = Job {
        prompt,
        document,
        params,
        events: tx,
        permit,
    };
    r.jobs
        .send(job)
        .map_err(|_| ApiError::internal("the engine has stopped"))?;
    let reply = Reply {
        kind,
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            app.next_id.fetch_add(1, Relaxed)
        ),
        created: unix_time(),
        model: r.model_id.clone(),
    };
    if stream {
        Ok(reply.stream(events, include_usage).into_response())
    } else {
        reply.collect(events).await.map(IntoResponse::into_response)
    }
}

/// The fields every response and chunk of one request share.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    /// Wait for the whole generation; one response.
    async fn collect(self, mut events: UnboundedReceiver<Event>) -> Result<Json<Value>, ApiError> {
        let mut text = String::new();
        while let Some(ev) = events.recv().await {
            match ev {
                Event::Piece(p) => text.push_str(&p),
                Event::Error(e) => return Err(e),
                Event::Done(f) => {
                    let choice = match self.kind {
                        Kind::Chat => json!({
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": f.reason,
                        }),
                        Kind::Text => json!({
                            "index": 0,
                            "text": text,
                            "logprobs": null,
                            "finish_reason": f.reason,
                        }),
                    };
                    let mut body = self.envelope(false, vec![choice]);
                    body["usage"] = json!(f.usage);
                    body["timings"] = json!(f.timings);
                    return Ok(Json(body));
                }
            }
        }
        Err(ApiError::internal("generation ended without a result"))
    }

    /// Server-Sent Events: a chunk per piece of text, a last chunk with the finish
    /// reason and timings, the usage when asked, then `[DONE]`. When the client goes,
    /// the stream is dropped, the forwarding task ends, and with it the engine's
    /// channel: the slot is freed at its next step.
    fn stream(
        self,
        mut events: UnboundedReceiver<Event>,
        include_usage: bool,
    ) -> Sse<tokio_stream::wrappers::ReceiverStream<Result<SseEvent, std::convert::Infallible>>>
    {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let send = |data: String| {
                let tx = tx.clone();
                async move { tx.send(Ok(SseEvent::default().data(data))).await }
            };
            if self.kind == Kind::Chat
                && send(
                    self.chunk(json!({"role": "assistant", "content": ""}), None)
                        .to_string(),
                )
                .await
                .is_err()
            {
                return;
            }
            while let Some(ev) = events.recv().await {
                let sent = match ev {
                    Event::Piece(p) => {
                        let delta = match self.kind {
                            Kind::Chat => json!({ "content": p }),
                            Kind::Text => json!(p),
                        };
                        send(self.chunk(delta, None).to_string()).await
                    }
                    Event::Error(e) => {
                        let _ = send(e.body().to_string()).await;
                        return;
                    }
                    Event::Done(f) => {
                        let _ = self.finish(&send, &f, include_usage).await;
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
            let e = ApiError::internal("generation ended without a result");
            let _ = send(e.body().to_string()).await;
        });
        Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    async fn finish<F, Fut, E>(&self, send: &F, f: &Finish, include_usage: bool) -> Result<(), E>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let empty = match self.kind {
            Kind::Chat => json!({}),
            Kind::Text => json!(""),
        };
        let mut last = self.chunk(empty, Some(f.reason));
        last["timings"] = json!(f.timings);
        send(last.to_string()).await?;
        if include_usage {
            let mut usage = self.envelope(true, Vec::new());
            usage["usage"] = json!(f.usage);
            send(usage.to_string()).await?;
        }
        send("[DONE]".to_string()).await
    }

    /// One streamed chunk: a delta (chat) or a piece of text (completion).
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "delta": delta, "finish_reason": finish_reason}),
            Kind::Text => {
                json!({"index": 0, "text": delta, "logprobs": null, "finish_reason": finish_reason})
            }
        };
        self.envelope(true, vec![choice])
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        let object = match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A seed for requests that give none.
fn random_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ 0x9e37_79b9_7f4a_7c15
}

#[cfg(test)]
mod tests {
    use super::{host_allowed, key_matches};

    #[test]
    fn loopback_hosts_and_allowed_names_pass() {
        let allowed = ["box.lan".to_string()];
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:1",
            "127.0.0.1:8080",
            "127.3.4.5",
            "[::1]:8080",
            "box.lan:8080",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "evil.com",
            "evil.com:8080",
            "127.0.0.1.evil.com",
            "[::2]:80",
            "10.0.0.1",
            "",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
    }

    #[test]
    fn only_the_whole_key_matches() {
        assert!(key_matches(Some("sekrit"), "sekrit"));
        for wrong in [
            None,
            Some(""),
            Some("sekri"),
            Some("sekrit "),
            Some("Sekrit"),
        ] {
            assert!(!key_matches(wrong, "sekrit"), "{wrong:?}");
        }
    }
}
