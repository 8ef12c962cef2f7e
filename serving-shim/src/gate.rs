//! [`Gate`]: what the HTTP front end refuses before a handler runs, so that a web page cannot
//! post work to a server on 127.0.0.1.
//!
//! - A request with an `Origin` header (every browser sends one on a cross-origin request, and
//!   on any POST) is refused with 403 unless the origin is the server's own
//!   (`http://` + `Host`) or one of [`Gate::allowed_origins`] (`--allowed-origins`). Allowed
//!   origins get CORS headers, and their preflight (`OPTIONS`) is answered.
//! - With an API key ([`Gate::api_key`], `--api-key`), a request to a `/v1` route without
//!   `Authorization: Bearer KEY` is refused with 401, as vLLM refuses it; `/health` and
//!   `/metrics` stay open, and so does a CORS preflight.
//! - A `POST` whose `Content-Type` is not `application/json` is refused with 415: a page's
//!   form or `text/plain` post (which needs no preflight) never reaches the engine.
//!
//! Every refusal is JSON in OpenAI's error shape (see `http`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api_error::ApiError;

/// The gate's settings.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    /// Origins (`scheme://host[:port]`, or `*` for any) whose browser pages may call the API.
    pub allowed_origins: Vec<String>,
    /// The key every `/v1` request must bear (`Authorization: Bearer KEY`), if any.
    pub api_key: Option<String>,
}

impl Gate {
    /// Whether a request carrying `origin` may pass (its own origin always may).
    fn allows(&self, origin: &str, headers: &HeaderMap) -> bool {
        let own = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|host| origin == format!("http://{host}"));
        own || self
            .allowed_origins
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/') == origin)
    }
}

/// Whether `headers` bear `key` (`Authorization: Bearer KEY`), compared in time independent
/// of where the first difference is.
fn bears(headers: &HeaderMap, key: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Whether `headers` declare a JSON body (`application/json`, parameters allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// The middleware: origin first, then the API key of a `/v1` route, then the content type of a
/// POST.
pub async fn check(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("?").to_string());
    if let Some(origin) = &origin
        && !gate.allows(origin, req.headers())
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_origin_refused",
            format!(
                "requests from origin {origin:?} are refused: start the server with \
                 --allowed-origins {origin} to let its pages call the API"
            ),
        )
        .into_response();
    }
    if let Some(origin) = &origin
        && req.method() == Method::OPTIONS
    {
        return preflight(origin);
    }
    if let Some(key) = &gate.api_key
        && req.uri().path().starts_with("/v1")
        && !bears(req.headers(), key)
    {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "this server wants an API key: send `Authorization: Bearer KEY` (the key of \
             --api-key)",
        )
        .into_response();
    }
    if req.method() == Method::POST && !is_json(req.headers()) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON, sent with `Content-Type: application/json`",
        )
        .into_response();
    }
    let mut response = next.run(req).await;
    if let Some(origin) = origin.and_then(|o| HeaderValue::from_str(&o).ok()) {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

/// The answer to an allowed origin's preflight.
fn preflight(origin: &str) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    if let Ok(o) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
    }
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type, authorization"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn own_and_listed_origins_pass_others_do_not() {
        let host = headers(&[(header::HOST, "127.0.0.1:8000")]);
        let none = Gate::default();
        assert!(none.allows("http://127.0.0.1:8000", &host));
        assert!(!none.allows("http://evil.example", &host));
        assert!(!none.allows("null", &host));
        let listed = Gate {
            allowed_origins: vec!["https://app.example/".into()],
            ..Gate::default()
        };
        assert!(listed.allows("https://app.example", &host));
        assert!(!listed.allows("https://app.example.evil", &host));
        let any = Gate {
            allowed_origins: vec!["*".into()],
            ..Gate::default()
        };
        assert!(any.allows("http://evil.example", &host));
    }

    #[test]
    fn only_the_bearer_of_the_key_passes() {
        let auth = |v: &str| headers(&[(header::AUTHORIZATION, v)]);
        assert!(bears(&auth("Bearer sk-1"), "sk-1"));
        assert!(!bears(&auth("Bearer sk-2"), "sk-1"));
        assert!(!bears(&auth("Bearer sk-10"), "sk-1"));
        assert!(!bears(&auth("sk-1"), "sk-1"));
        assert!(!bears(&HeaderMap::new(), "sk-1"));
    }

    #[test]
    fn only_application_json_is_json() {
        let ct = |v: &str| headers(&[(header::CONTENT_TYPE, v)]);
        assert!(is_json(&ct("application/json")));
        assert!(is_json(&ct("Application/JSON; charset=utf-8")));
        assert!(!is_json(&ct("text/plain")));
        assert!(!is_json(&ct("application/x-www-form-urlencoded")));
        assert!(!is_json(&HeaderMap::new()));
    }
}
