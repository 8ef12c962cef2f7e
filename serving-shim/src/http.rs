//! The OpenAI-compatible HTTP front end (axum), as vLLM's server answers it:
//! `POST /v1/completions` and `POST /v1/chat/completions` (`max_tokens` or
//! `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop` strings, `stream` as SSE with
//! `stream_options.include_usage`, `usage`, `ignore_eos` for benchmarks; message content as a
//! string or a list of text parts), `GET /v1/models`, `GET /health` and `GET /metrics`
//! (Prometheus text). Request bodies are the typed structs of [`crate::openai`], checked by
//! `params`; what the server does not support (`n` > 1, `logprobs`, `best_of`, tools,
//! an unknown field) is refused with 400, never ignored. With an API key
//! ([`HttpOptions::api_key`]) every `/v1` route wants `Authorization: Bearer KEY` (401
//! otherwise); `/health` and `/metrics` stay open. A request naming a model that is not served
//! is 404.
//!
//! A server started for evaluation also takes `eval_output_tokens`, a profiled length at which
//! the request ends, seen only by the stop rule and the oracle ([`GenRequest::eval_stop`];
//! refused with 400 unless [`HttpOptions::allow_eval_stop`]); `max_tokens` stays the client's
//! cap everywhere. Beside `usage`, a response (or a stream's finish chunk) carries `trail`:
//! `queue_s` (arrival to first admission), `preemptions` and `recomputed_tokens`, for load
//! generators.
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

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::json;
use trail_llm::Message;

use crate::api_error::ApiError;
use crate::bert::BertPredictor;
use crate::engine::Engine;
use crate::error::{EngineError, SchedulerError};
use crate::gate::{self, Gate};
use crate::listener::{self, Limits};
use crate::openai::{
    AssistantMessage, ChatChoice, ChatRequest, CompletionChoice, CompletionRequest, ModelCard,
    ModelList, TrailExtension, Usage,
};
use crate::params::{self, Allowed, EVAL_STOP, Params};
use crate::request::{Event, GenRequest, RequestHandle, Summary};
use crate::sequence::FinishReason;
use crate::sse::{self, Header, Kind};

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
    /// The names a request may give as its `model` (`--served-model-name`); the first is the
    /// one answered when a request names none. Empty: the router's model name.
    pub served_model_names: Vec<String>,
    /// When set, every `/v1` route wants `Authorization: Bearer` this key (`--api-key`).
    pub api_key: Option<String>,
}

impl HttpOptions {
    /// Defaults: no BERT, no foreign origin, bodies up to 2 MiB read within 30 s, no API key,
    /// the model served under the router's name.
    pub fn new(default_max_tokens: usize) -> Self {
        Self {
            default_max_tokens,
            bert: None,
            allowed_origins: Vec::new(),
            max_body_bytes: 2 << 20,
            body_read_timeout: Duration::from_secs(30),
            allow_eval_stop: false,
            served_model_names: Vec::new(),
            api_key: None,
        }
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
struct App {
    engine: Arc<Engine>,
    /// The model's own name (the GGUF's).
    root: Arc<str>,
    /// The names it is served under; the first is the default.
    names: Arc<[String]>,
    default_max_tokens: usize,
    bert: Option<Arc<BertPredictor>>,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    allow_eval_stop: bool,
}

/// The router over `engine`; `model` is the name reported in responses (and the only one a
/// request may give).
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

/// The router over `engine` with every front-end option; `model` is the model's own name,
/// served under [`HttpOptions::served_model_names`] (or under `model` when they are empty).
pub fn router_with_options(engine: Arc<Engine>, model: &str, opts: HttpOptions) -> Router {
    let names = if opts.served_model_names.is_empty() {
        vec![model.to_string()]
    } else {
        opts.served_model_names
    };
    let app = App {
        engine,
        root: model.into(),
        names: names.into(),
        default_max_tokens: opts.default_max_tokens,
        bert: opts.bert,
        max_body_bytes: opts.max_body_bytes,
        body_read_timeout: opts.body_read_timeout,
        allow_eval_stop: opts.allow_eval_stop,
    };
    let gate = Arc::new(Gate {
        allowed_origins: opts.allowed_origins,
        api_key: opts.api_key,
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
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

/// Reads a request body of type `T`: a syntax error says the body is not valid JSON; a wrong
/// type or an unknown field names the field (`param`).
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad("body", format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::bad(
                "body",
                format!("the body must be a JSON object of the request's fields: {inner}"),
            )
        } else {
            ApiError::bad(path.clone(), format!("`{path}`: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad("body", format!("the body is not valid JSON: {e}")))?;
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

impl App {
    /// What the request checks need of the server.
    fn allowed(&self) -> Allowed {
        Allowed {
            default_max_tokens: self.default_max_tokens,
            context: self.engine.runner().config().max_position_embeddings,
            eval_stop: self.allow_eval_stop,
        }
    }

    /// The served name a request's `model` names (the default when it names none), or 404.
    fn model_name(&self, asked: Option<&str>) -> Result<String, ApiError> {
        match asked {
            None => Ok(self.names[0].clone()),
            Some(m) if self.names.iter().any(|n| n == m) => Ok(m.to_string()),
            Some(m) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "the model `{m}` does not exist: this server serves {}",
                    self.names.join(", ")
                ),
            )
            .with_param("model")),
        }
    }
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
             GET /v1/models, GET /health and GET /metrics",
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
        [(header::CONTENT_TYPE, crate::prometheus::CONTENT_TYPE)],
        crate::prometheus::render(&app.engine.stats(), &app.names[0]),
    )
}

/// `GET /v1/models`: the served names, as vLLM lists them.
async fn models(State(app): State<App>) -> axum::Json<ModelList> {
    let created = now_unix();
    let max_model_len = app.allowed().context;
    axum::Json(ModelList {
        object: "list",
        data: app
            .names
            .iter()
            .map(|id| ModelCard {
                id: id.clone(),
                object: "model",
                created,
                owned_by: "trail",
                root: app.root.to_string(),
                parent: None,
                max_model_len,
            })
            .collect(),
    })
}

async fn completions(State(app): State<App>, body: Body) -> Result<Response, ApiError> {
    let mut req: CompletionRequest = parse(&read_body(&app, body).await?)?;
    let model = app.model_name(req.model.as_deref())?;
    params::refuse_unsupported(&req.unsupported())?;
    let prompt = params::prompt(req.prompt.take())?;
    let cap = (req.max_tokens, "max_tokens");
    let p = Params::check(req.common(), cap, app.allowed())?;
    let runner = app.engine.runner();
    // User text: special-token text in it stays text.
    let ids = runner
        .encode(&prompt)
        .map_err(|e| ApiError::bad("prompt", e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::bad("prompt", "`prompt` has no tokens"));
    }
    run(app, ids, prompt, p, (Kind::Text, model)).await
}

async fn chat_completions(State(app): State<App>, body: Body) -> Result<Response, ApiError> {
    let mut req: ChatRequest = parse(&read_body(&app, body).await?)?;
    let model = app.model_name(req.model.as_deref())?;
    params::refuse_unsupported(&req.unsupported())?;
    let owned = params::messages(req.messages.take())?;
    let cap = params::chat_cap(req.max_tokens, req.max_completion_tokens)?;
    let p = Params::check(req.common(), cap, app.allowed())?;
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
    run(app, ids, user, p, (Kind::Chat, model)).await
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Submits the request (`ids`, with `user` for the length predictor) and answers it: a stream,
/// or the whole response once it ends.
async fn run(
    app: App,
    ids: Vec<u32>,
    user: String,
    p: Params,
    (kind, model): (Kind, String),
) -> Result<Response, ApiError> {
    let initial_prediction = match &app.bert {
        Some(bert) => {
            let cap = u32::try_from(p.max_tokens).unwrap_or(u32::MAX);
            Some(bert.predict(user, cap).await?)
        }
        None => None,
    };
    let req = GenRequest {
        prompt: ids,
        max_new_tokens: p.max_tokens,
        sampling: p.sampling,
        ignore_eos: p.ignore_eos,
        stop: p.stop.clone(),
        initial_prediction,
        eval_stop: p.eval_stop,
        arrival: None,
    };
    let handle = app.engine.submit(req).await?;
    let header = Header {
        id: format!("{}-{}", kind.names().0, handle.id),
        model,
        created: now_unix(),
        kind,
        include_usage: p.include_usage,
    };
    if p.stream {
        let runner = app.engine.runner().clone();
        return Ok(sse::stream(runner, handle, header, p.stop).into_response());
    }
    let s = wait(handle).await?;
    let text = app
        .engine
        .runner()
        .decode(&s.tokens)
        .map_err(|e| ApiError::from(EngineError::Llm(e)))?;
    let text = match p.stop.find(&text) {
        Some(at) => text[..at].to_string(),
        None => text,
    };
    Ok(whole(header, text, &s))
}

/// The summary of a request that ran to its end; a request the engine gave up on is 500.
async fn wait(mut handle: RequestHandle) -> Result<Box<Summary>, ApiError> {
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
    Ok(s)
}

/// A whole (not streamed) response of `text`.
fn whole(header: Header, text: String, s: &Summary) -> Response {
    use crate::openai::Response as Reply;
    let finish = s.finish.as_str();
    let object = header.kind.names().1;
    let (usage, trail) = (Some(Some(Usage::of(s))), Some(TrailExtension::of(s)));
    match header.kind {
        Kind::Text => axum::Json(Reply {
            id: header.id,
            object,
            created: header.created,
            model: header.model,
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: Some(finish),
            }],
            usage,
            trail,
        })
        .into_response(),
        Kind::Chat => axum::Json(Reply {
            id: header.id,
            object,
            created: header.created,
            model: header.model,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: text,
                },
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
            trail,
        })
        .into_response(),
    }
}
