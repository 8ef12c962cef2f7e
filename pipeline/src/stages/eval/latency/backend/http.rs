//! The HTTP backend: an OpenAI-compatible server (`trail serve`, vLLM, llama.cpp's server…)
//! driven like a real client, streaming chat completions, each token stamped as its
//! server-sent event arrives.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trail_eval::loadgen::{Backend, Observed, TraceRequest};

/// An OpenAI-compatible server (`trail serve`, vLLM, llama.cpp's server…), driven like vLLM's
/// `benchmark_serving.py`: streaming chat completions, greedy, one SSE chunk per token.
/// `max_tokens` is the trace's cap (the client's); a profiled output length goes as the
/// evaluation-only `eval_output_tokens` with `ignore_eos`, which only a `trail serve` started
/// with `--allow-eval-output-tokens` accepts, and which only its stop rule and oracle read.
#[derive(Debug, Clone)]
pub struct HttpBackend {
    /// e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    pub model: String,
    /// Cap on output tokens when the trace gives none.
    pub max_tokens: u32,
    client: reqwest::Client,
}

impl HttpBackend {
    pub fn new(base_url: impl Into<String>, model: impl Into<String>, max_tokens: u32) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            model: model.into(),
            max_tokens,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .build()
                .expect("a default reqwest client builds"),
        }
    }

    fn body(&self, req: &TraceRequest) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": req.prompt}],
            "max_tokens": req.max_tokens.unwrap_or(self.max_tokens),
            "temperature": 0.0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(n) = req.output_tokens {
            body["ignore_eos"] = json!(true);
            body["eval_output_tokens"] = json!(n);
        }
        body
    }
}

impl Backend for HttpBackend {
    async fn send(&self, req: &TraceRequest) -> Result<Observed, String> {
        let start = Instant::now();
        let url = format!("{}/v1/chat/completions", self.base_url);
        let mut resp = self
            .client
            .post(&url)
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
        Ok(sse.observed)
    }
}

/// Parses an OpenAI server-sent-event stream incrementally, stamping tokens as they arrive.
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
                    self.observed.first_token.get_or_insert(at);
                    self.observed.last_token = Some(at);
                    self.observed.output_tokens += 1;
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    self.usage_tokens = Some(n as u32);
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
            "data: {\"choices\":[],\"usage\":{\"completion_tokens\":3},\"trail\":{\"queue_s\":0.5,\"preemptions\":2}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for cut in 0..stream.len() {
            let mut sse = SseAccumulator::default();
            sse.push(&stream[..cut], Duration::from_millis(1)).unwrap();
            sse.push(&stream[cut..], Duration::from_millis(2)).unwrap();
            assert!(sse.done);
            assert_eq!(
                sse.observed.output_tokens, 3,
                "usage wins over chunk counts"
            );
            assert!(sse.observed.first_token.is_some());
            assert_eq!(sse.observed.queue_s, Some(0.5));
            assert_eq!(sse.observed.preemptions, Some(2));
        }
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
