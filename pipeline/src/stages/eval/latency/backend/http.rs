//! The HTTP backend: an OpenAI-compatible server (`trail serve`, vLLM, llama.cpp's server…)
//! driven like a real client, streaming chat completions, each output chunk stamped as its
//! server-sent event arrives (so inter-token latencies exist), with the [`Protocol`] that says
//! how a profiled output length reaches the server.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use trail_eval::loadgen::{Backend, Observed, TraceRequest};

/// How a request's profiled output length (the release protocol's fixed length) reaches the
/// server. A profiled length never goes where a predictor can read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// `trail serve --allow-eval-output-tokens`: `max_tokens` is the client's cap (what the
    /// predictors clamp to), the profiled length goes as the evaluation-only
    /// `eval_output_tokens` with `ignore_eos`, which only the stop rule and the oracle read.
    EvalOutputTokens,
    /// A server without a length predictor (llama.cpp's server, vLLM): the profiled length as
    /// `max_tokens` with `ignore_eos`, which it honours and which leaks nothing to it (it
    /// predicts nothing). Each response's `completion_tokens` must equal that length, so every
    /// system does the same work; a response that differs is a failed request.
    MaxTokens,
}

impl Protocol {
    /// How the report says it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::EvalOutputTokens => {
                "profiled length as the evaluation-only `eval_output_tokens` (with `ignore_eos`); \
                 `max_tokens` the client's cap"
            }
            Self::MaxTokens => {
                "profiled length as `max_tokens` with `ignore_eos` (a server without a length \
                 predictor); each `completion_tokens` checked equal to it"
            }
        }
    }

    /// The protocol of the server at `base_url`: `eval-output-tokens` when its `/v1/models`
    /// says a model is `owned_by` trail (a `trail serve`), else `max-tokens`.
    pub async fn infer(backend: &HttpBackend) -> Result<Self, String> {
        let url = format!("{}/v1/models", backend.base_url);
        let resp = backend
            .authorized(backend.client.get(&url))
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("{url}: HTTP {status}"));
        }
        let v: Value = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
        let trail = v["data"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["owned_by"] == "trail"));
        Ok(if trail {
            Self::EvalOutputTokens
        } else {
            Self::MaxTokens
        })
    }
}

/// An OpenAI-compatible server (`trail serve`, vLLM, llama.cpp's server…), driven like vLLM's
/// `benchmark_serving.py`: streaming chat completions, greedy, with `usage` in the last chunk.
/// `max_tokens` and the profiled length go as its [`Protocol`] says.
#[derive(Debug, Clone)]
pub struct HttpBackend {
    /// e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    pub model: String,
    /// Cap on output tokens when the trace gives none.
    pub max_tokens: u32,
    pub protocol: Protocol,
    /// Sent as a bearer token; never recorded.
    api_key: Option<String>,
    client: reqwest::Client,
}

impl HttpBackend {
    /// A backend with the `eval-output-tokens` protocol and no API key.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>, max_tokens: u32) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            model: model.into(),
            max_tokens,
            protocol: Protocol::EvalOutputTokens,
            api_key: None,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .build()
                .expect("a default reqwest client builds"),
        }
    }

    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key;
        self
    }

    fn authorized(&self, b: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => b.bearer_auth(k),
            None => b,
        }
    }

    fn cap(&self, req: &TraceRequest) -> u32 {
        req.max_tokens.unwrap_or(self.max_tokens)
    }

    fn body(&self, req: &TraceRequest) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": req.prompt}],
            "max_tokens": self.cap(req),
            "temperature": 0.0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(n) = req.output_tokens {
            body["ignore_eos"] = json!(true);
            match self.protocol {
                Protocol::EvalOutputTokens => body["eval_output_tokens"] = json!(n),
                Protocol::MaxTokens => body["max_tokens"] = json!(n),
            }
        }
        body
    }

    /// The tokens a request must generate when its length is fixed: the profiled length (under
    /// the client's cap with `eval-output-tokens`).
    fn expected_tokens(&self, req: &TraceRequest) -> Option<u32> {
        let n = req.output_tokens?;
        Some(match self.protocol {
            Protocol::EvalOutputTokens => n.min(self.cap(req)),
            Protocol::MaxTokens => n,
        })
    }
}

impl Backend for HttpBackend {
    async fn send(&self, req: &TraceRequest) -> Result<Observed, String> {
        let start = Instant::now();
        let url = format!("{}/v1/chat/completions", self.base_url);
        let mut resp = self
            .authorized(self.client.post(&url))
            .json(&self.body(req))
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(format!("{url}: HTTP {status}: {}", text.trim()));
        }
        let mut sse = SseAccumulator::default();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            sse.push(&chunk, start.elapsed())?;
            if sse.done {
                break;
            }
        }
        if !sse.done {
            return Err(format!("{url}: stream ended without [DONE]"));
        }
        match self.expected_tokens(req) {
            Some(n) if sse.observed.output_tokens != n => Err(format!(
                "{url}: completion_tokens {} where the profiled length is {n}: the server did not \
                 generate exactly that many tokens, so it did other work than the other systems",
                sse.observed.output_tokens
            )),
            _ => Ok(sse.observed),
        }
    }
}

/// Parses an OpenAI server-sent-event stream incrementally, stamping each chunk that carries
/// output as it arrives (as `benchmark_serving.py` stamps its chunks); the output tokens are
/// `usage.completion_tokens` where the server gives it, else the chunks.
#[derive(Debug, Default)]
struct SseAccumulator {
    buf: Vec<u8>,
    observed: Observed,
    done: bool,
    usage_tokens: Option<u32>,
}

impl SseAccumulator {
    fn push(&mut self, bytes: &[u8], at: Duration) -> Result<(), String> {
        self.buf.extend_from_slice(bytes);
        while let Some(end) = find(&self.buf, b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    self.done = true;
                    if let Some(n) = self.usage_tokens {
                        self.observed.output_tokens = n;
                    }
                    return Ok(());
                }
                let v: Value =
                    serde_json::from_str(data).map_err(|e| format!("bad SSE event: {e}"))?;
                if let Some(err) = v.get("error") {
                    return Err(format!("server error: {err}"));
                }
                let has_token = v["choices"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c["delta"]["content"]
                            .as_str()
                            .is_some_and(|s| !s.is_empty())
                            || c["text"].as_str().is_some_and(|s| !s.is_empty())
                    })
                });
                if has_token {
                    self.observed.chunk(at, 1);
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    self.usage_tokens = Some(n as u32);
                }
                if let Some(n) = v["usage"]["prompt_tokens"].as_u64() {
                    self.observed.prompt_tokens = Some(n as u32);
                }
                if let Some(t) = v.get("trail") {
                    self.observed.queue_s = t["queue_s"].as_f64().or(self.observed.queue_s);
                    if let Some(p) = t["preemptions"].as_u64() {
                        self.observed.preemptions = Some(p as u32);
                    }
                }
            }
        }
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_stream_split_anywhere_counts_tokens_and_reads_usage() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3},\"trail\":{\"queue_s\":0.5,\"preemptions\":2}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for cut in 0..stream.len() {
            let mut sse = SseAccumulator::default();
            sse.push(&stream[..cut], Duration::from_millis(1)).unwrap();
            sse.push(&stream[cut..], Duration::from_millis(2)).unwrap();
            assert_eq!(sse.observed.chunks.len(), 2, "two chunks carried text");
            assert_eq!(sse.observed.prompt_tokens, Some(9));
            assert!(sse.done);
            assert_eq!(
                sse.observed.output_tokens, 3,
                "usage wins over chunk counts"
            );
            assert!(sse.observed.first_token().is_some());
            assert_eq!(sse.observed.queue_s, Some(0.5));
            assert_eq!(sse.observed.preemptions, Some(2));
        }
    }

    #[test]
    fn each_chunk_is_stamped_so_gaps_are_inter_token_latencies() {
        let mut sse = SseAccumulator::default();
        for (ms, text) in [(10, "a"), (30, "b"), (70, "c")] {
            let ev =
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n");
            sse.push(ev.as_bytes(), Duration::from_millis(ms)).unwrap();
        }
        let itl = sse.observed.itl_s();
        assert_eq!(itl.len(), 2);
        assert!((itl[0] - 0.020).abs() < 1e-12 && (itl[1] - 0.040).abs() < 1e-12);
    }

    #[test]
    fn a_profiled_length_goes_where_the_protocol_says() {
        let mut req = TraceRequest::new(0.0, "hi".into(), Some(7));
        req.max_tokens = Some(100);
        let trail = HttpBackend::new("http://x", "m", 512);
        let b = trail.body(&req);
        assert_eq!(
            (b["max_tokens"].clone(), b["eval_output_tokens"].clone()),
            (json!(100), json!(7))
        );
        let peer = trail.clone().with_protocol(Protocol::MaxTokens);
        let b = peer.body(&req);
        assert_eq!(b["max_tokens"], json!(7));
        assert!(
            b.get("eval_output_tokens").is_none(),
            "nothing trail-only to a peer"
        );
        assert_eq!(b["ignore_eos"], json!(true));
        assert_eq!(peer.expected_tokens(&req), Some(7));
        let free = TraceRequest::new(0.0, "hi".into(), None);
        let b = peer.body(&free);
        assert_eq!(b["max_tokens"], json!(512));
        assert!(b.get("ignore_eos").is_none() && peer.expected_tokens(&free).is_none());
    }

    #[test]
    fn a_server_error_event_is_an_error() {
        let mut sse = SseAccumulator::default();
        let err = sse
            .push(
                b"data: {\"error\":{\"message\":\"boom\"}}\n\n",
                Duration::ZERO,
            )
            .unwrap_err();
        assert!(err.contains("boom"));
    }
}
