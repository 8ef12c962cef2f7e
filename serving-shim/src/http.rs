//! The OpenAI-compatible HTTP front end (axum): `POST /v1/completions`,
//! `POST /v1/chat/completions` (`max_tokens`, `temperature`, `top_p`, `seed`, `stream` as SSE
//! ending in `[DONE]`, `usage`, and `ignore_eos` for benchmarks), `GET /health` and
//! `GET /metrics` (Prometheus text). A server started for evaluation also takes
//! `eval_output_tokens`, a profiled length at which the request ends, seen only by the stop rule
//! and the oracle ([`GenRequest::eval_stop`]; refused with 400 unless
//! [`HttpOptions::allow_eval_stop`]); `max_tokens` stays the client's cap everywhere. Beside
//! `usage`, a response (or a stream's last chunk)
//! carries `trail`: `queue_s` (arrival to first admission), `preemptions` and
//! `recomputed_tokens`, for load generators.
//!
//! With a [`BertPredictor`], each request's user message (the last `user` message of a chat, the
//! prompt of a completion) gets its initial length prediction before it is submitted.
//!
//! Overload (the waiting queue at `max_waiting`) is 429 with `Retry-After`; a request beyond
//! the context or the KV budget, or a malformed body, is 400 naming the limit or the field; a
//! body over [`HttpOptions::max_body_bytes`] is 413, one slower than
//! [`HttpOptions::body_read_timeout`] 408; a POST that is not `application/json` is 415 and a
//! browser request from a foreign origin 403 (see [`crate::gate`]); an unknown route is 404, a
//! wrong method 405; a dead engine makes `/health` and every request 503. Every error is JSON in
//! OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`. A client that goes away
//! drops its [`RequestHandle`], which cancels the request and
//! frees its blocks. Connection limits (header-read timeout, open connections, the shutdown
//! deadline) are the [`crate::listener`] module's.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use trail_llm::{Message, Sampling};

use crate::api_error::ApiError;
use crate::bert::BertPredictor;
use crate::engine::Engine;
use crate::error::{EngineError, SchedulerError};
use crate::gate::{self, Gate};
use crate::listener::{self, Limits};
use crate::request::{Event, GenRequest, RequestHandle, Summary};
use crate::sequence::FinishReason;

/// What the front end does with requests beyond the engine's own limits.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// `max_tokens` of a request that gives none.
    pub default_max_tokens: usize,
    /// Predicts each request's length before it is submitted.
    pub bert: Option<Arc<BertPredictor>>,
    /// Origins whose browser pages may call the API (see [`crate::gate`]).
    pub allowed_origins: Vec<String>,
    /// Most bytes in a request body (413 beyond).
    pub max_body_bytes: usize,
    /// Longest wait for a request's body once its headers are in (408 beyond).
    pub body_read_timeout: Duration,
    /// Whether requests may carry the evaluation-only `eval_output_tokens`
    /// (`trail serve --allow-eval-output-tokens`).
    pub allow_eval_stop: bool,
}

impl HttpOptions {
    /// Defaults: no BERT, no foreign origin, bodies up to 2 MiB read within 30 s.
    pub fn new(default_max_tokens: usize) -> Self {
        Self {
            default_max_tokens,
            bert: None,
            allowed_origins: Vec::new(),
            max_body_bytes: 2 << 20,
            body_read_timeout: Duration::from_secs(30),
            allow_eval_stop: false,
        }
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
struct App {
    engine: Arc<Engine>,
    model: Arc<str>,
    default_max_tokens: usize,
    bert: Option<Arc<BertPredictor>>,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    allow_eval_stop: bool,
}

/// The router over `engine`; `model` is the name reported in responses.
pub fn router(engine: Arc<Engine>, model: &str, default_max_tokens: usize) -> Router {
    router_with_bert(engine, model, default_max_tokens, None)
}

/// [`router`], with `bert` predicting each request's length before it is submitted.
pub fn router_with_bert(
    engine: Arc<Engine>,
    model: &str,
    default_max_tokens: usize,
    bert: Option<Arc<BertPredictor>>,
) -> Router {
    let opts = HttpOptions {
        bert,
        ..HttpOptions::new(default_max_tokens)
    };
    router_with_options(engine, model, opts)
}

/// The router over `engine` with every front-end option.
pub fn router_with_options(engine: Arc<Engine>, model: &str, opts: HttpOptions) -> Router {
    let app = App {
        engine,
        model: model.into(),
        default_max_tokens: opts.default_max_tokens,
        bert: opts.bert,
        max_body_bytes: opts.max_body_bytes,
        body_read_timeout: opts.body_read_timeout,
        allow_eval_stop: opts.allow_eval_stop,
    };
    let gate = Arc::new(Gate {
        allowed_origins: opts.allowed_origins,
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(gate, gate::check))
}

/// Serves `router` on `listener` with the default [`Limits`] until `shutdown` resolves, then
/// finishes open responses (cut after the shutdown deadline).
pub async fn serve(
    router: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener::serve(router, listener, Limits::default(), shutdown)
        .await
        .map(drop)
}

/// Binds `addr` (127.0.0.1 unless told otherwise by the caller).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::Scheduler(SchedulerError::Overloaded { .. }) => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                message,
            )
            .retry_after(1),
            EngineError::Scheduler(SchedulerError::TooLong { .. }) => {
                Self::bad("max_tokens", format!("{message} (the KV budget)"))
                    .with_code("context_length_exceeded")
            }
            EngineError::ContextExceeded { .. } => {
                Self::bad("max_tokens", message).with_code("context_length_exceeded")
            }
            EngineError::EvalStop { .. } => Self::bad(EVAL_STOP, message),
            EngineError::Scheduler(SchedulerError::EmptyPrompt(_)) => Self::bad("prompt", message),
            EngineError::ShuttingDown => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message).retry_after(5)
            }
            EngineError::Stopped(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "engine_unavailable",
                message,
            ),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message),
        }
    }
}

/// Sampling and length fields shared by both endpoints.
struct Common {
    max_tokens: usize,
    sampling: Sampling,
    stream: bool,
    ignore_eos: bool,
    /// Evaluation only: the profiled length to stop at ([`GenRequest::eval_stop`]).
    eval_stop: Option<usize>,
}

fn field_u64(v: &Value, name: &'static str) -> Result<Option<u64>, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(name, format!("`{name}` must be a non-negative integer"))),
    }
}

fn field_f64(v: &Value, name: &'static str) -> Result<Option<f64>, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad(name, format!("`{name}` must be a number"))),
    }
}

fn field_bool(v: &Value, name: &'static str) -> Result<bool, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| ApiError::bad(name, format!("`{name}` must be true or false"))),
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    }
    Ok(v)
}

/// Reads a request body within the app's size and time limits.
async fn read_body(app: &App, body: Body) -> Result<Bytes, ApiError> {
    use axum::body::HttpBody as _;
    let limit = app.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is over {limit} bytes, or was cut off"),
        )
    };
    // A Content-Length over the limit is refused before a byte of the body is read.
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    match tokio::time::timeout(app.body_read_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(too_large()),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the body did not arrive within {} s",
                app.body_read_timeout.as_secs_f64()
            ),
        )),
    }
}

/// `max_tokens` (the default when absent), at least 1 and at most the model's `context`:
/// checked before any arithmetic meets it.
fn max_tokens(v: &Value, default: usize, context: usize) -> Result<usize, ApiError> {
    let Some(m) = field_u64(v, "max_tokens")? else {
        return Ok(default);
    };
    if m == 0 {
        return Err(ApiError::bad(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
    }
    usize::try_from(m)
        .ok()
        .filter(|&m| m <= context)
        .ok_or_else(|| {
            ApiError::bad(
                "max_tokens",
                format!("`max_tokens` {m} exceeds the context of {context} tokens"),
            )
            .with_code("context_length_exceeded")
        })
}

/// The request field of the evaluation-only stop.
const EVAL_STOP: &str = "eval_output_tokens";

/// The evaluation-only stop of a request, refused unless the app allows it.
fn eval_stop(v: &Value, app: &App) -> Result<Option<usize>, ApiError> {
    let Some(n) = field_u64(v, EVAL_STOP)? else {
        return Ok(None);
    };
    if !app.allow_eval_stop {
        return Err(ApiError::bad(
            EVAL_STOP,
            "`eval_output_tokens` is an evaluation-only stop (a profiled output length); this \
             server was not started with --allow-eval-output-tokens",
        ));
    }
    Ok(Some(usize::try_from(n).unwrap_or(usize::MAX)))
}

fn common(v: &Value, app: &App) -> Result<Common, ApiError> {
    let max_tokens = max_tokens(v, app.default_max_tokens, context(app))?;
    let temperature = field_f64(v, "temperature")?.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            "`temperature` must be in [0, 2]",
        ));
    }
    let top_p = field_f64(v, "top_p")?;
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(ApiError::bad("top_p", "`top_p` must be in (0, 1]"));
    }
    let seed = field_u64(v, "seed")?.unwrap_or(0);
    Ok(Common {
        max_tokens,
        sampling: Sampling::new(temperature, top_p, seed),
        stream: field_bool(v, "stream")?,
        ignore_eos: field_bool(v, "ignore_eos")?,
        eval_stop: eval_stop(v, app)?,
    })
}

/// 200 while the engine thread runs, 503 once it died.
async fn health(State(app): State<App>) -> Response {
    if app.engine.is_alive() {
        axum::Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "engine_unavailable",
            "the engine stopped",
        )
        .into_response()
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_url",
        format!(
            "no route {}: the API has POST /v1/completions, POST /v1/chat/completions, \
             GET /health and GET /metrics",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.engine.stats().render_prometheus(),
    )
}

async fn completions(State(app): State<App>, body: Body) -> Result<Response, ApiError> {
    let v = parse_body(&read_body(&app, body).await?)?;
    let prompt = match v.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(_) => return Err(ApiError::bad("prompt", "`prompt` must be a string")),
        None => return Err(ApiError::bad("prompt", "missing field `prompt`")),
    };
    let c = common(&v, &app)?;
    let runner = app.engine.runner();
    // User text: special-token text in it stays text.
    let ids = runner
        .encode(&prompt)
        .map_err(|e| ApiError::bad("prompt", e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::bad("prompt", "`prompt` has no tokens"));
    }
    run(app, ids, prompt, c, Kind::Text).await
}

async fn chat_completions(State(app): State<App>, body: Body) -> Result<Response, ApiError> {
    let v = parse_body(&read_body(&app, body).await?)?;
    let Some(Value::Array(msgs)) = v.get("messages") else {
        return Err(ApiError::bad(
            "messages",
            "missing or non-array field `messages`",
        ));
    };
    let mut owned: Vec<(String, String)> = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").and_then(Value::as_str);
        match (role, content) {
            (Some(r @ ("system" | "user" | "assistant")), Some(c)) => {
                owned.push((r.to_string(), c.to_string()))
            }
            _ => {
                return Err(ApiError::bad(
                    "messages",
                    format!(
                        "`messages[{i}]` needs a role (system, user, assistant) and a string content"
                    ),
                ));
            }
        }
    }
    if owned.is_empty() {
        return Err(ApiError::bad("messages", "`messages` is empty"));
    }
    let c = common(&v, &app)?;
    let runner = app.engine.runner();
    let messages: Vec<Message<'_>> = owned
        .iter()
        .map(|(role, content)| Message { role, content })
        .collect();
    // Special tokens only where the template puts them: a message cannot forge a turn.
    let ids = runner
        .encode_messages(&messages)
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    // What the length predictor reads: the user's message, as in training.
    let user = match owned.iter().rev().find(|(role, _)| role == "user") {
        Some((_, content)) => content.clone(),
        None => runner
            .template()
            .render(&messages)
            .map_err(|e| ApiError::bad("messages", e.to_string()))?,
    };
    run(app, ids, user, c, Kind::Chat).await
}

/// The model's context length: the most `max_tokens` can be.
fn context(app: &App) -> usize {
    app.engine.runner().config().max_position_embeddings
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Chat,
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.tokens.len(),
        "total_tokens": s.prompt_tokens + s.tokens.len(),
    })
}

/// trail's extension beside `usage`: seconds from arrival to first admission and preemptions
/// (what a load generator cannot observe from the outside).
fn trail_extension(s: &Summary) -> Value {
    json!({
        "queue_s": s.times.first_scheduled.map(|f| (f - s.times.arrival).max(0.0)),
        "preemptions": s.preemptions_policy + s.preemptions_memory,
        "recomputed_tokens": s.recomputed_tokens,
    })
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn run(
    app: App,
    ids: Vec<u32>,
    user: String,
    c: Common,
    kind: Kind,
) -> Result<Response, ApiError> {
    let initial_prediction = match &app.bert {
        Some(bert) => Some(bert.predict(user).await?),
        None => None,
    };
    let req = GenRequest {
        prompt: ids,
        max_new_tokens: c.max_tokens,
        sampling: c.sampling,
        ignore_eos: c.ignore_eos,
        initial_prediction,
        eval_stop: c.eval_stop,
        arrival: None,
    };
    let handle = app.engine.submit(req).await?;
    let (prefix, object) = match kind {
        Kind::Text => ("cmpl", "text_completion"),
        Kind::Chat => ("chatcmpl", "chat.completion"),
    };
    let id = format!("{prefix}-{}", handle.id);
    if c.stream {
        Ok(stream(app, handle, id, kind).into_response())
    } else {
        let mut handle = handle;
        let mut summary = None;
        while let Some(ev) = handle.events.recv().await {
            if let Event::Done(s) = ev {
                summary = Some(s);
                break;
            }
        }
        let s = summary.ok_or_else(|| {
            ApiError::from(EngineError::Stopped(
                "the request ended without a result".into(),
            ))
        })?;
        if s.finish == FinishReason::Aborted {
            // The client is here, so the engine gave up on the request (a failed step).
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "engine_error",
                "the engine failed while running this request; the server goes on",
            ));
        }
        let text = app
            .engine
            .runner()
            .decode(&s.tokens)
            .map_err(|e| ApiError::from(EngineError::Llm(e)))?;
        let choice = match kind {
            Kind::Text => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": s.finish.as_str()})
            }
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": s.finish.as_str()
            }),
        };
        Ok(axum::Json(json!({
            "id": id,
            "object": object,
            "created": now_unix(),
            "model": &*app.model,
            "choices": [choice],
            "usage": usage(&s),
            "trail": trail_extension(&s),
        }))
        .into_response())
    }
}

/// Incremental detokenization state of a stream.
struct Streamer {
    app: App,
    handle: RequestHandle,
    id: String,
    kind: Kind,
    tokens: Vec<u32>,
    sent: usize,
    first: bool,
    done: bool,
}

impl Streamer {
    /// One SSE chunk; the last carries `usage` and trail's extension.
    fn chunk(&self, delta: &str, finish: Option<&str>, done: Option<&Summary>) -> SseEvent {
        let usage = done.map(usage);
        let trail = done.map(trail_extension);
        let created = now_unix();
        let model = &*self.app.model;
        let v = match self.kind {
            Kind::Text => json!({
                "id": self.id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": delta, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
                "trail": trail,
            }),
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if self.first {
                    d.insert("role".into(), "assistant".into());
                }
                if !delta.is_empty() || finish.is_none() {
                    d.insert("content".into(), delta.into());
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": d, "finish_reason": finish}],
                    "usage": usage,
                    "trail": trail,
                })
            }
        };
        SseEvent::default().data(v.to_string())
    }

    /// Text decoded since the last chunk (held back while it ends in an incomplete character).
    fn delta(&mut self) -> String {
        let text = self
            .app
            .engine
            .runner()
            .decode(&self.tokens)
            .unwrap_or_default();
        if text.ends_with('\u{FFFD}') || text.len() < self.sent || !text.is_char_boundary(self.sent)
        {
            return String::new();
        }
        let d = text[self.sent..].to_string();
        self.sent = text.len();
        d
    }

    async fn next(mut self) -> Option<(Result<SseEvent, Infallible>, Self)> {
        if self.done {
            return None;
        }
        loop {
            match self.handle.events.recv().await {
                Some(Event::Token(t)) => {
                    self.tokens.push(t);
                    let d = self.delta();
                    if d.is_empty() && !self.first {
                        continue;
                    }
                    let ev = self.chunk(&d, None, None);
                    self.first = false;
                    return Some((Ok(ev), self));
                }
                Some(Event::Done(s)) => {
                    self.tokens.clone_from(&s.tokens);
                    let d = self.delta();
                    let ev = self.chunk(&d, Some(s.finish.as_str()), Some(&*s));
                    self.done = true;
                    return Some((Ok(ev), self));
                }
                None => return None,
            }
        }
    }
}

fn stream(
    app: App,
    handle: RequestHandle,
    id: String,
    kind: Kind,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    use futures_util::StreamExt;
    let s = Streamer {
        app,
        handle,
        id,
        kind,
        tokens: Vec::new(),
        sent: 0,
        first: true,
        done: false,
    };
    let body =
        futures_util::stream::unfold(s, Streamer::next).chain(futures_util::stream::once(async {
            Ok(SseEvent::default().data("[DONE]"))
        }));
    Sse::new(body)
}
