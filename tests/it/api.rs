//! The server as a vLLM user meets it, through the official `openai` Python client (pinned in
//! `scripts/requirements-test.txt`): `/v1/models` lists the served name, a stream with
//! `stream_options.include_usage` ends with a usage chunk whose `choices` are empty, `stop` ends
//! the text before the stop string (plain and streamed, chat and completion), content given as
//! text parts and `max_completion_tokens` are read, what is not supported (`n: 2`, `logprobs`,
//! `best_of`, tools) is refused with 400 naming the field, a model that is not served is 404,
//! and with an API key every `/v1` route without it is 401 while `/health` and `/metrics` stay
//! open. `/metrics` is read by `prometheus_client`'s text parser: vLLM's families, with TTFT
//! buckets, under the labels `model_name` and `policy`.

use serde_json::Value;
use trail_serving_shim::http::HttpOptions;
use trail_serving_shim::{EngineConfig, PolicyKind};

use crate::serving::{Server, http, runtime};

const KEY: &str = "sk-trail-test";

const SCRIPT: &str = r#"
import json, os, sys
import openai

base = os.environ["TRAIL_BASE_URL"]
client = openai.OpenAI(base_url=base, api_key=os.environ["TRAIL_API_KEY"], max_retries=0)
question = "Name three colours of the rainbow."
messages = [{"role": "user", "content": question}]
out = {"models": [m.id for m in client.models.list().data]}

def chat(**kw):
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

def chat_stream(**kw):
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, stream=True,
        stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return chunks, text, finish

def complete(**kw):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=24, **kw)
    return r.choices[0].text, r.choices[0].finish_reason

# The whole answer, and a stop string from its middle: the text must end just before it.
full, out["full_finish"], out["full_tokens"] = chat()
out["full"] = full
stop = full[len(full) // 2 : len(full) // 2 + 3]
out["stop"] = stop
out["stopped"] = chat(stop=[stop])[:2]
chunks, text, finish = chat_stream(stop=stop)
out["stopped_stream"] = [text, finish]

# The same request as text parts and with max_completion_tokens: the same answer.
parts = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": [{"type": "text", "text": question}]}],
    max_completion_tokens=24,
)
out["parts"] = parts.choices[0].message.content

# A stream with include_usage: a last chunk without choices carrying the usage.
chunks, text, finish = chat_stream()
out["stream"] = text
out["stream_last_choices"] = len(chunks[-1].choices)
out["stream_last_usage"] = chunks[-1].usage.completion_tokens if chunks[-1].usage else None
out["stream_other_usage"] = sum(c.usage is not None for c in chunks[:-1])

ctext, out["completion_finish"] = complete()
cstop = ctext[len(ctext) // 2 : len(ctext) // 2 + 3]
out["completion"], out["completion_stop"] = ctext, cstop
out["completion_stopped"] = complete(stop=cstop)

def error(f):
    try:
        f()
        return None
    except openai.APIStatusError as e:
        return [e.status_code, e.param, e.code]

tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
out["errors"] = {
    "n": error(lambda: chat(n=2)),
    "logprobs": error(lambda: chat(logprobs=True)),
    "tools": error(lambda: chat(tools=tools)),
    "best_of": error(lambda: complete(best_of=2)),
    "model": error(lambda: client.chat.completions.create(model="gpt-4", messages=messages)),
}
wrong = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
out["errors"]["key_models"] = error(lambda: wrong.models.list())
out["errors"]["key_chat"] = error(
    lambda: wrong.chat.completions.create(model="smollm2", messages=messages, max_tokens=2))
json.dump(out, sys.stdout)
"#;

#[test]
fn the_openai_client_meets_vllms_conventions() {
    let rt = runtime();
    let opts = HttpOptions {
        api_key: Some(KEY.into()),
        ..HttpOptions::new(16)
    };
    let server = Server::start_with_options(&rt, EngineConfig::new(4096, PolicyKind::Fcfs), opts);
    let addr = server.addr;

    // Open without the key: /health and /metrics; every /v1 route wants it.
    assert_eq!(http(addr, "GET", "/health", "").0, 200);
    assert_eq!(http(addr, "GET", "/metrics", "").0, 200);
    let (status, _, body) = http(addr, "GET", "/v1/models", "");
    assert_eq!(status, 401, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");

    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .env("TRAIL_BASE_URL", format!("http://{addr}/v1"))
        .env("TRAIL_API_KEY", KEY)
        .output()
        .expect("python3 runs (with the openai package: scripts/test installs it)");
    assert!(
        out.status.success(),
        "the openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (status, head, metrics) = http(addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let report = server.stop(&rt);
    check_metrics(&metrics, report.stats.counters.finished);

    assert_eq!(v["models"], serde_json::json!(["smollm2"]), "{v}");
    let full = v["full"].as_str().unwrap();
    assert!(full.len() >= 12, "an answer long enough to cut: {v}");

    // stop: the text up to the first occurrence, finish reason `stop`, plain and streamed.
    let stop = v["stop"].as_str().unwrap();
    let cut = &full[..full.find(stop).unwrap()];
    assert_eq!(v["stopped"], serde_json::json!([cut, "stop"]), "{v}");
    assert_eq!(
        v["stopped_stream"],
        serde_json::json!([cut, ["stop"]]),
        "{v}"
    );
    let ctext = v["completion"].as_str().unwrap();
    let cstop = v["completion_stop"].as_str().unwrap();
    assert!(!cstop.is_empty(), "{v}");
    let ccut = &ctext[..ctext.find(cstop).unwrap()];
    assert_eq!(v["completion_stopped"], serde_json::json!([ccut, "stop"]));

    assert_eq!(v["parts"], v["full"], "text parts read as the string");
    assert_eq!(v["stream"], v["full"]);
    assert_eq!(v["stream_last_choices"], 0, "{v}");
    assert_eq!(v["stream_last_usage"], v["full_tokens"], "{v}");
    assert_eq!(v["stream_other_usage"], 0, "{v}");

    let e = &v["errors"];
    for field in ["n", "logprobs", "tools", "best_of"] {
        assert_eq!(e[field][0], 400, "{field}: {e}");
        assert_eq!(e[field][1], field, "{e}");
    }
    assert_eq!(
        e["model"],
        serde_json::json!([404, "model", "model_not_found"])
    );
    for k in ["key_models", "key_chat"] {
        assert_eq!(e[k][0], 401, "{e}");
    }
}

/// Parses `text` with `prometheus_client`'s text parser: `{family: {type, samples: [[name,
/// labels, value]]}}`.
fn parse_metrics(text: &str) -> Value {
    const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
json.dump(out, sys.stdout)
"#;
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (with prometheus_client: scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `/metrics` after `finished` requests: every family parses, vLLM's under its names, TTFT a
/// histogram with buckets up to `+Inf` that count every finished request, each series with the
/// model and policy labels.
fn check_metrics(text: &str, finished: u64) {
    let families = parse_metrics(text);
    let family = |name: &str, kind: &str| {
        let f = &families[name];
        assert_eq!(f["type"], kind, "{name}: {f}");
        f["samples"].as_array().unwrap().clone()
    };
    for (name, kind) in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:num_preemptions", "counter"),
        ("vllm:generation_tokens", "counter"),
        ("vllm:request_success", "counter"),
        ("vllm:inter_token_latency_seconds", "histogram"),
        ("vllm:time_per_output_token_seconds", "histogram"),
        ("vllm:e2e_request_latency_seconds", "histogram"),
        ("vllm:request_queue_time_seconds", "histogram"),
        ("trail_predictor_abs_error_tokens", "histogram"),
    ] {
        let samples = family(name, kind);
        assert!(!samples.is_empty(), "{name}");
        for s in &samples {
            assert_eq!(s[1]["model_name"], "smollm2", "{s}");
            assert_eq!(s[1]["policy"], "fcfs", "{s}");
        }
    }
    let ttft = family("vllm:time_to_first_token_seconds", "histogram");
    let buckets: Vec<(&str, f64)> = ttft
        .iter()
        .filter(|s| s[0] == "vllm:time_to_first_token_seconds_bucket")
        .map(|s| (s[1]["le"].as_str().unwrap(), s[2].as_f64().unwrap()))
        .collect();
    assert!(buckets.len() > 10, "{buckets:?}");
    assert_eq!(buckets.last().unwrap(), &("+Inf", finished as f64));
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative: {buckets:?}"
    );
    let count = ttft
        .iter()
        .find(|s| s[0] == "vllm:time_to_first_token_seconds_count")
        .unwrap();
    assert_eq!(count[2], finished as f64);
    let success: f64 = family("vllm:request_success", "counter")
        .iter()
        .filter(|s| s[1]["finished_reason"] != "abort")
        .map(|s| s[2].as_f64().unwrap())
        .sum();
    assert_eq!(success, finished as f64);
}
