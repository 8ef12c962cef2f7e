//! The serving engine over the real SmolLM2-135M-Instruct: many concurrent requests under a
//! KV budget far too small for all of them, so requests are preempted (memory and policy) and
//! recomputed; every request must still complete with exactly the greedy text of the same
//! request run alone through the bare runner. Over HTTP too: 64 concurrent requests, and the
//! official `openai` Python client (installed by `.ci/run`) reading a streamed chat completion.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use trail_checkpoints::{Bins, Checkpoint, CheckpointMeta, Probe, Standardizer};
use trail_llm::{GenerateOptions, Runner};
use trail_serving_shim::{
    BertPredictor, Engine, EngineConfig, EngineError, FinishReason, GenRequest, PolicyKind,
    PreemptionMode, Recording, RecordingKey, Recordings, SchedulerError, StepTimeModel, Summary,
    VirtualTime,
};

pub(crate) fn runner() -> Arc<Runner> {
    static RUNNER: OnceLock<Arc<Runner>> = OnceLock::new();
    RUNNER
        .get_or_init(|| Arc::new(Runner::load(&trail_tests::smollm2_gguf()).expect("load SmolLM2")))
        .clone()
}

const QUESTIONS: [&str; 20] = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give one tip for better sleep.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Describe a cat in one sentence.",
    "What does a thermometer measure?",
    "List two uses of copper.",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
    "What is the boiling point of water in Celsius?",
    "Write a short greeting for a birthday card.",
    "Which planet is known as the red planet?",
    "Explain what a noun is.",
    "What is photosynthesis?",
    "Give an example of a mammal that flies.",
    "What language is spoken in Brazil?",
    "Summarize the plot of Cinderella in one sentence.",
];

const MAX_NEW: usize = 24;

/// The greedy tokens of each question run alone through the bare runner (computed once).
fn references() -> &'static Vec<(Vec<u32>, Vec<u32>)> {
    static REFS: OnceLock<Vec<(Vec<u32>, Vec<u32>)>> = OnceLock::new();
    REFS.get_or_init(|| {
        let r = runner();
        let opts = GenerateOptions {
            max_new_tokens: MAX_NEW,
            ..GenerateOptions::default()
        };
        QUESTIONS
            .iter()
            .map(|q| {
                let prompt = r.encode_chat(q).expect("encode");
                let g = r.generate(&prompt, &opts, |_| {}).expect("generate");
                (prompt, g.tokens)
            })
            .collect()
    })
}

/// Submits every question (the second half after the first tokens of the first half) and
/// checks each completes with the reference tokens; returns the summaries and the report.
fn serve_all(
    engine: Engine,
    oracle_lengths: bool,
) -> (Vec<Summary>, trail_serving_shim::EngineReport) {
    let refs = references();
    let mut handles = Vec::new();
    for (i, (prompt, reference)) in refs.iter().enumerate() {
        let mut req = GenRequest::greedy(prompt.clone(), MAX_NEW);
        if oracle_lengths {
            req.eval_stop = Some(reference.len());
        }
        let h = engine.submit_blocking(req).expect("admitted");
        handles.push(h);
        if i == refs.len() / 2 {
            // Let the first wave get going (decoding, however loaded the machine is), so later
            // short requests meet running long ones.
            let started = std::time::Instant::now();
            while engine.stats().counters.generated_tokens < 6
                && started.elapsed() < std::time::Duration::from_secs(60)
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
    let summaries: Vec<Summary> = handles
        .into_iter()
        .map(|h| h.wait().expect("done"))
        .collect();
    for (s, (prompt, reference)) in summaries.iter().zip(refs) {
        assert_ne!(s.finish, FinishReason::Aborted);
        assert_eq!(s.prompt_tokens, prompt.len());
        let r = runner();
        assert_eq!(
            s.tokens,
            *reference,
            "request {} ({} preemptions): {:?} != {:?}",
            s.id,
            s.preemptions_policy + s.preemptions_memory,
            r.decode(&s.tokens).unwrap(),
            r.decode(reference).unwrap()
        );
        assert_eq!(s.times.tokens.len(), s.tokens.len());
        assert!(s.times.first_token.unwrap() >= s.times.arrival);
    }
    let report = engine.shutdown().expect("clean shutdown");
    (summaries, report)
}

fn tight_config(policy: PolicyKind) -> EngineConfig {
    let longest = references().iter().map(|(p, _)| p.len()).max().unwrap();
    // Room for about three requests at a time out of twenty.
    let mut cfg = EngineConfig::new(3 * (longest + MAX_NEW), policy);
    cfg.scheduler.max_running = 8;
    cfg.scheduler.prefill_chunk = Some(32);
    cfg
}

#[test]
fn oracle_preempts_by_policy_and_matches_requests_run_alone() {
    let mut cfg = tight_config(PolicyKind::Oracle);
    cfg.scheduler.max_running = 3;
    let engine = Engine::start(runner(), None, cfg).unwrap();
    let (summaries, report) = serve_all(engine, true);
    let c = report.stats.counters;
    eprintln!(
        "oracle: {} steps, {} policy + {} memory preemptions",
        c.steps, c.preemptions_policy, c.preemptions_memory
    );
    assert!(
        c.preemptions_policy > 0,
        "short late requests must preempt long running ones"
    );
    assert!(summaries.iter().any(|s| s.preemptions_policy > 0));
}

#[test]
fn swapped_requests_resume_from_their_kept_cache_and_match_requests_run_alone() {
    // As above, with preemption by swap: a victim keeps its KV cache and continues from it,
    // and its text is still the text of the request run alone.
    let mut cfg = tight_config(PolicyKind::Oracle);
    cfg.scheduler.max_running = 3;
    cfg.scheduler.preemption_mode = PreemptionMode::Swap;
    cfg.scheduler.swap_budget_tokens = 1 << 20;
    let engine = Engine::start(runner(), None, cfg).unwrap();
    let (summaries, report) = serve_all(engine, true);
    let c = report.stats.counters;
    eprintln!(
        "oracle, swap: {} steps, {} policy + {} memory preemptions, {} swaps",
        c.steps, c.preemptions_policy, c.preemptions_memory, c.swaps
    );
    assert!(c.swaps > 0 && c.swapped_tokens > 0);
    assert_eq!(c.swaps, c.preemptions_policy + c.preemptions_memory);
    assert_eq!(c.recomputed_tokens, 0);
    assert!(summaries.iter().all(|s| s.recomputed_tokens == 0));
}

/// A real checkpoint file with a seeded, untrained probe on layer 11 and a prompt predictor
/// (no trained checkpoint is available to the tests): exercises the predictor in the loop.
pub(crate) fn seeded_checkpoint(kernel_id: &str) -> Checkpoint {
    let r = runner();
    let d = r.config().hidden_size;
    let (h, k) = (32, 10);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    };
    let mut probe =
        |h: usize, k: usize| (rnd(h * d, 0.2), rnd(h, 0.2), rnd(k * h, 2.0), rnd(k, 0.5));
    let decode = probe(h, k);
    let prompt = probe(h, k);
    checkpoint_of(kernel_id, 2, decode, Some(prompt))
}

/// A probe's weights `(w1, b1, w2, b2)`, row-major.
pub(crate) type ProbeWeights = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// A checkpoint on layer 11 of SmolLM2 with the given probe and prompt predictor (identity
/// standardization), through the file format as the engine gets it in production.
pub(crate) fn checkpoint_of(
    kernel_id: &str,
    refine_interval: u32,
    decode: ProbeWeights,
    prompt: Option<ProbeWeights>,
) -> Checkpoint {
    let d = runner().config().hidden_size;
    let probe = |(w1, b1, w2, b2): ProbeWeights| {
        let (h, k) = (b1.len(), b2.len());
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        Probe::new(
            Standardizer {
                mean: vec![0.0; d],
                std: vec![1.0; d],
            },
            t(w1, &[h, d]),
            t(b1, &[h]),
            t(w2, &[k, h]),
            t(b2, &[k]),
        )
        .unwrap()
    };
    let ck = Checkpoint {
        meta: CheckpointMeta {
            model_sha256: "test".into(),
            kernel_id: kernel_id.into(),
            probe_layers: vec![11],
            prompt_layers: vec![11],
            hidden_size: d,
            bins: Bins::default(),
            refine_interval,
            train_data_sha256: "none".into(),
            val_mae: 0.0,
            prompt_val_mae: None,
            git_commit: "test".into(),
            g_input: false,
            label_prior: None,
            likelihood_exponent: 0.0,
        },
        probe: probe(decode),
        prompt: prompt.map(probe),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("probe.safetensors");
    ck.save(&path).unwrap();
    Checkpoint::load(&path).unwrap()
}

#[test]
fn trail_with_the_predictor_in_the_loop_matches_requests_run_alone() {
    let r = runner();
    let engine = Engine::start(
        r.clone(),
        Some(seeded_checkpoint(r.kernel_id())),
        tight_config(PolicyKind::Trail),
    )
    .unwrap();
    assert!(engine.warnings().is_empty());
    let (summaries, report) = serve_all(engine, false);
    let st = &report.stats;
    for s in &summaries {
        let p = s.initial_prediction.expect("first prediction at prefill");
        assert!((0.0..=512.0).contains(&p), "{p}");
        assert_eq!(
            s.predictions.len(),
            s.tokens.len(),
            "a prediction after every token"
        );
        assert!(
            s.predictions
                .iter()
                .all(|&(g, p)| p >= 0.0 && p <= (MAX_NEW as f64 - f64::from(g)) + 1e-9),
            "clamped to max_new − generated: {:?}",
            s.predictions
        );
    }
    assert!(st.refined_mae().is_some() && st.initial_mae().is_some());
    assert!(st.predictor_secs > 0.0 && st.predictor_secs < st.step_secs);
    eprintln!(
        "trail: {} steps, {} policy + {} memory preemptions; predictor {:.4} s of {:.3} s steps ({:.2} %)",
        st.counters.steps,
        st.counters.preemptions_policy,
        st.counters.preemptions_memory,
        st.predictor_secs,
        st.step_secs,
        100.0 * st.predictor_share()
    );
    let text = trail_serving_shim::prometheus::render(st, "smollm2");
    let refined = [("estimate", "refined")];
    let errors = sample(&text, "trail_predictor_abs_error_tokens_count", &refined);
    assert_eq!(errors, st.refined_error.count as f64);
    let mae = sample(&text, "trail_predictor_abs_error_tokens_sum", &refined) / errors;
    assert!((mae - st.refined_mae().unwrap()).abs() < 1e-9);
    let ttft = sample(&text, "vllm:time_to_first_token_seconds_count", &[]);
    assert_eq!(ttft, summaries.len() as f64);
}

/// The value of the sample `name` of a Prometheus text exposition whose labels include
/// `labels` (the first such line).
pub(crate) fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            let has = |(k, v): &(&str, &str)| rest.contains(&format!("{k}=\"{v}\""));
            (n == name && labels.iter().all(has)).then(|| value.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {name} {labels:?} in the exposition:\n{text}"))
}

#[test]
fn kernel_mismatch_warns_and_admission_errors_name_the_limit() {
    let r = runner();
    let mut cfg = EngineConfig::new(256, PolicyKind::Sprpt);
    // Room for the dropped request and its successor in the queue: the engine may not have
    // seen the drop yet when the second arrives (a starved engine thread made this flaky at 1).
    cfg.scheduler.max_waiting = 2;
    cfg.scheduler.max_running = 1;
    let engine = Engine::start(r.clone(), Some(seeded_checkpoint("other-kernels")), cfg).unwrap();
    assert_eq!(engine.warnings().len(), 1);
    assert!(engine.warnings()[0].contains("other-kernels"));
    let prompt = r.encode_chat("Hello").unwrap();
    match engine.submit_blocking(GenRequest::greedy(prompt.clone(), 10_000)) {
        Err(EngineError::ContextExceeded { context, .. }) => {
            assert_eq!(context, r.config().max_position_embeddings)
        }
        other => panic!("expected a context error, got {other:?}"),
    }
    match engine.submit_blocking(GenRequest::greedy(prompt.clone(), 400)) {
        Err(EngineError::Scheduler(SchedulerError::TooLong { budget: 256, .. })) => {}
        other => panic!("expected a budget error, got {other:?}"),
    }
    // Dropping a handle cancels its request; the engine keeps serving.
    let first = engine
        .submit_blocking(GenRequest::greedy(prompt.clone(), 8))
        .unwrap();
    drop(first);
    let second = engine
        .submit_blocking(GenRequest::greedy(prompt.clone(), 8))
        .unwrap();
    let s = second.wait().unwrap();
    assert_eq!(s.tokens.len().min(8), s.tokens.len());
    let report = engine.shutdown().unwrap();
    assert_eq!(report.stats.kv_blocks_used, 0);
    assert_eq!(
        report.stats.counters.aborted + report.stats.counters.finished,
        2
    );
}

/// A minimal HTTP/1.1 client over a raw socket: returns (status, headers, body), de-chunked.
pub(crate) fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        let mut out = String::new();
        let mut rest = rest;
        loop {
            let (len, tail) = rest.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(len.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    (status, head.to_string(), body)
}

#[test]
fn http_front_end_serves_openai_requests() {
    let r = runner();
    let rt = runtime();
    let start = |max_waiting: usize| {
        let mut cfg = EngineConfig::new(2048, PolicyKind::Fcfs);
        cfg.scheduler.max_waiting = max_waiting;
        Server::start(&rt, cfg)
    };
    let server = start(64);
    let addr = server.addr;

    let (status, _, body) = http(addr, "GET", "/health", "");
    assert_eq!((status, body.contains("ok")), (200, true));

    // Non-streamed chat: the same text as the bare runner on the same prompt.
    let question = "What is the capital of France?";
    let req = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 12,
    });
    let (status, _, body) = http(addr, "POST", "/v1/chat/completions", &req.to_string());
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let prompt = r.encode_chat(question).unwrap();
    let alone = r
        .generate(
            &prompt,
            &GenerateOptions {
                max_new_tokens: 12,
                ..GenerateOptions::default()
            },
            |_| {},
        )
        .unwrap();
    let expected = r.decode(&alone.tokens).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], alone.tokens.len());
    // trail's extension: queue time and preemptions, for load generators.
    assert!(v["trail"]["queue_s"].as_f64().unwrap() >= 0.0, "{v}");
    assert_eq!(v["trail"]["preemptions"], 0);

    // Streamed: SSE chunks whose deltas concatenate to the same text; asked for, one last
    // chunk with no choices and the usage (null on every other chunk); then [DONE].
    let mut sreq = req.clone();
    sreq["stream"] = true.into();
    sreq["stream_options"] = serde_json::json!({"include_usage": true});
    let (status, head, body) = http(addr, "POST", "/v1/chat/completions", &sreq.to_string());
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("text/event-stream"));
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected);
    let (usage, rest) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], serde_json::json!([]), "{usage}");
    assert_eq!(usage["usage"]["completion_tokens"], alone.tokens.len());
    let finish = rest.last().unwrap();
    assert!(finish["choices"][0]["finish_reason"].is_string());
    assert!(finish["trail"]["queue_s"].as_f64().is_some(), "{finish}");
    assert!(
        rest.iter()
            .all(|c| c["usage"].is_null() && c.get("usage").is_some())
    );
    // Not asked for: no chunk has `usage`.
    sreq.as_object_mut().unwrap().remove("stream_options");
    let (_, _, body) = http(addr, "POST", "/v1/chat/completions", &sreq.to_string());
    assert!(!body.contains("\"usage\""), "{body}");

    // Plain completion with ignore_eos runs to max_tokens.
    let creq =
        serde_json::json!({"prompt": "Once upon a time", "max_tokens": 5, "ignore_eos": true});
    let (status, _, body) = http(addr, "POST", "/v1/completions", &creq.to_string());
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Errors name the field or the limit.
    let (status, _, body) = http(addr, "POST", "/v1/completions", "{not json");
    assert_eq!(status, 400);
    assert!(body.contains("not valid JSON"), "{body}");
    let (status, _, body) = http(
        addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "hi", "max_tokens": "many"}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("max_tokens"), "{body}");
    let (status, _, body) = http(addr, "POST", "/v1/chat/completions", r#"{"max_tokens": 3}"#);
    assert_eq!(status, 400);
    assert!(body.contains("messages"), "{body}");
    let (status, _, body) = http(
        addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "hi", "max_tokens": 100000}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("context"), "{body}");
    let (status, _, body) = http(
        addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "hi", "max_tokens": 4000}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("KV budget"), "{body}");

    let (status, head, body) = http(addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(head.contains("text/plain"));
    let finished = |reason| {
        sample(
            &body,
            "vllm:request_success_total",
            &[("finished_reason", reason)],
        )
    };
    assert_eq!(finished("stop") + finished("length"), 4.0, "{body}");
    let model = [("model_name", "smollm2"), ("policy", "fcfs")];
    assert_eq!(
        sample(&body, "vllm:time_to_first_token_seconds_count", &model),
        4.0
    );

    // The official OpenAI Python client: a streamed and a plain chat completion of the same
    // request, each the text of the request run alone.
    let (stream, plain) = openai_client_chat(addr, question, 12);
    assert_eq!(stream, expected, "streamed through the openai client");
    assert_eq!(plain, expected, "plain through the openai client");
    let report = server.stop(&rt);
    assert_eq!(report.stats.counters.finished, 6);
    assert_eq!(report.stats.kv_blocks_used, 0);

    // Overload: a waiting queue of zero refuses everything with 429 and Retry-After.
    let server = start(0);
    let (status, head, body) = http(
        server.addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "hi", "max_tokens": 2}"#,
    );
    assert_eq!(status, 429, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"));
    // OpenAI's shape, typed as a rate limit (not as an invalid request).
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    server.stop(&rt);
}

/// Runs the official `openai` Python client against `addr`: one streamed and one plain chat
/// completion of `question` (greedy, `max_tokens`); returns (streamed text, plain text).
fn openai_client_chat(
    addr: std::net::SocketAddr,
    question: &str,
    max_tokens: usize,
) -> (String, String) {
    const SCRIPT: &str = r#"
import json, os, sys
import openai

client = openai.OpenAI(base_url=os.environ["TRAIL_BASE_URL"], api_key="unused", max_retries=0)
messages = [{"role": "user", "content": os.environ["TRAIL_QUESTION"]}]
n = int(os.environ["TRAIL_MAX_TOKENS"])
parts, finish, done = [], None, 0
for chunk in client.chat.completions.create(
    model="smollm2", messages=messages, max_tokens=n, temperature=0, stream=True
):
    done += 1
    c = chunk.choices[0]
    if c.delta.content:
        parts.append(c.delta.content)
    finish = c.finish_reason or finish
plain = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=n)
json.dump({
    "stream": "".join(parts),
    "stream_finish": finish,
    "chunks": done,
    "plain": plain.choices[0].message.content,
    "plain_finish": plain.choices[0].finish_reason,
    "completion_tokens": plain.usage.completion_tokens,
}, sys.stdout)
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .env("TRAIL_BASE_URL", format!("http://{addr}/v1"))
        .env("TRAIL_QUESTION", question)
        .env("TRAIL_MAX_TOKENS", max_tokens.to_string())
        .output()
        .expect("python3 runs (the tests need it with the openai package, see .ci/run)");
    assert!(
        out.status.success(),
        "the openai client failed (pip install openai, see .ci/run): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["chunks"].as_u64().unwrap() >= 2, "{v}");
    assert!(v["stream_finish"].is_string(), "{v}");
    assert_eq!(v["stream_finish"], v["plain_finish"], "{v}");
    assert!(v["completion_tokens"].as_u64().unwrap() <= max_tokens as u64);
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    (text("stream"), text("plain"))
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An engine behind the HTTP front end on an ephemeral port of 127.0.0.1.
pub(crate) struct Server {
    pub(crate) addr: std::net::SocketAddr,
    engine: Arc<Engine>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    fn start(rt: &tokio::runtime::Runtime, cfg: EngineConfig) -> Self {
        Self::start_with_bert(rt, cfg, None)
    }

    fn start_with_bert(
        rt: &tokio::runtime::Runtime,
        cfg: EngineConfig,
        bert: Option<Arc<BertPredictor>>,
    ) -> Self {
        let opts = trail_serving_shim::http::HttpOptions {
            bert,
            ..trail_serving_shim::http::HttpOptions::new(16)
        };
        Self::start_with_options(rt, cfg, opts)
    }

    /// An engine over SmolLM2 named `smollm2`, behind a front end with `opts`.
    pub(crate) fn start_with_options(
        rt: &tokio::runtime::Runtime,
        cfg: EngineConfig,
        opts: trail_serving_shim::http::HttpOptions,
    ) -> Self {
        let engine = Arc::new(Engine::start(runner(), None, cfg).unwrap());
        let router = trail_serving_shim::http::router_with_options(engine.clone(), "smollm2", opts);
        let listener = rt
            .block_on(trail_serving_shim::http::bind(
                "127.0.0.1:0".parse().unwrap(),
            ))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(trail_serving_shim::http::serve(router, listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            engine,
            stop,
            task,
        }
    }

    /// Stops the server, then the engine; returns the engine's report.
    pub(crate) fn stop(self, rt: &tokio::runtime::Runtime) -> trail_serving_shim::EngineReport {
        self.stop.send(()).unwrap();
        rt.block_on(self.task).unwrap().unwrap();
        Arc::try_unwrap(self.engine)
            .expect("the server released the engine")
            .shutdown()
            .expect("clean shutdown")
    }
}

/// 64 distinct chat questions: the 20 questions, each also asked briefly and in one sentence.
fn questions_64() -> Vec<String> {
    let mut qs: Vec<String> = Vec::with_capacity(64);
    for prefix in ["", "Briefly: ", "In one sentence: ", "Answer simply. "] {
        for q in QUESTIONS {
            if qs.len() < 64 {
                qs.push(format!("{prefix}{q}"));
            }
        }
    }
    qs
}

const HTTP_MAX_NEW: usize = 16;

#[test]
fn http_64_concurrent_requests_under_a_tight_kv_budget_match_requests_run_alone() {
    let r = runner();
    let questions = questions_64();
    let opts = GenerateOptions {
        max_new_tokens: HTTP_MAX_NEW,
        ..GenerateOptions::default()
    };
    let alone: Vec<(usize, Vec<u32>)> = questions
        .iter()
        .map(|q| {
            let prompt = r.encode_chat(q).unwrap();
            let g = r.generate(&prompt, &opts, |_| {}).unwrap();
            (prompt.len(), g.tokens)
        })
        .collect();
    let longest = alone.iter().map(|(p, _)| *p).max().unwrap();
    // Room for about three requests at a time out of 64: memory preemption is certain.
    let budget = 3 * (longest + HTTP_MAX_NEW);
    let mut cfg = EngineConfig::new(budget, PolicyKind::Fcfs);
    cfg.scheduler.max_running = 8;
    cfg.scheduler.prefill_chunk = Some(32);
    let rt = runtime();
    let server = Server::start(&rt, cfg);
    let addr = server.addr;

    let clients: Vec<_> = questions
        .iter()
        .map(|q| {
            let body = serde_json::json!({
                "model": "smollm2",
                "messages": [{"role": "user", "content": q}],
                "max_tokens": HTTP_MAX_NEW,
            })
            .to_string();
            std::thread::spawn(move || http(addr, "POST", "/v1/chat/completions", &body))
        })
        .collect();
    for ((client, (prompt_len, tokens)), q) in clients.into_iter().zip(&alone).zip(&questions) {
        let (status, _, body) = client.join().unwrap();
        assert_eq!(status, 200, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            r.decode(tokens).unwrap().as_str(),
            "{q}"
        );
        assert_eq!(v["usage"]["prompt_tokens"], *prompt_len, "{q}");
        assert_eq!(v["usage"]["completion_tokens"], tokens.len(), "{q}");
    }

    let (status, _, metrics) = http(addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let value = |name: &str, labels: &[(&str, &str)]| sample(&metrics, name, labels) as u64;
    let memory = value("trail_preemptions_total", &[("kind", "memory")]);
    assert!(memory > 0, "the budget must force memory preemption");
    assert_eq!(value("trail_preemptions_total", &[("kind", "policy")]), 0);
    assert_eq!(value("vllm:num_preemptions_total", &[]), memory);
    let finished = |reason| value("vllm:request_success_total", &[("finished_reason", reason)]);
    assert_eq!(finished("stop") + finished("length"), 64);
    assert_eq!(finished("abort"), 0);

    let report = server.stop(&rt);
    let c = report.stats.counters;
    eprintln!(
        "64 over HTTP, fcfs: {} steps, {} memory preemptions, {} recomputed tokens",
        c.steps, c.preemptions_memory, c.recomputed_tokens
    );
    assert_eq!(c.preemptions_memory, memory);
    assert!(c.recomputed_tokens > 0);
    assert_eq!(report.stats.kv_blocks_used, 0);
    let steps = &report.steps;
    assert!(steps.iter().all(|s| s.kv_tokens <= budget && s.rows <= 8));
    assert!(steps.iter().any(|s| s.preempted_memory > 0));
    assert!(steps.iter().enumerate().all(|(i, s)| s.step == i as u64));
    assert_eq!(
        steps.iter().map(|s| s.preempted_memory as u64).sum::<u64>(),
        memory
    );
    // The step log as `trail serve --out` writes it, read back whole.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steps.parquet");
    trail_serving_shim::steps::write(&path, steps).unwrap();
    assert_eq!(trail_serving_shim::steps::read(&path).unwrap(), *steps);
}

/// A BERT as `trail export --bert` writes it (self-contained: weights, config, tokenizer,
/// bins): the real all-MiniLM-L6-v2 encoder with a seeded, untrained length head (no fine-tuned
/// BERT is available to the tests).
fn seeded_bert(dir: &std::path::Path) -> std::path::PathBuf {
    use rand::SeedableRng;
    use trail_checkpoints::bert_tune::{TuneConfig, from_base};
    let cfg = TuneConfig {
        max_len: 64,
        head_hidden: 32,
        ..TuneConfig::default()
    };
    let base = trail_tests::minilm_dir();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (bert, _, _) = from_base(&base, 10, &cfg, &mut rng).unwrap();
    let path = dir.join("bert.safetensors");
    let read = |f: &str| std::fs::read_to_string(base.join(f)).unwrap();
    let meta = [
        ("format", "trail-bert".to_string()),
        ("bins_k", "10".into()),
        ("bins_max", "512".into()),
        ("head_hidden", "32".into()),
        ("max_len", "64".into()),
        ("config_json", read("config.json")),
        ("tokenizer_json", read("tokenizer.json")),
    ]
    .map(|(k, v)| (k.to_string(), v));
    bert.save(&path, candle_core::DType::F32, meta.into_iter().collect())
        .unwrap();
    path
}

#[test]
fn bert_predicts_on_arrival_batched_and_sjf_bert_serves_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let bert = Arc::new(BertPredictor::load(&seeded_bert(dir.path())).unwrap());
    let questions = &QUESTIONS[..8];
    // Alone, then all at once (one batch on the BERT thread): the same predictions, up to the
    // padding's rounding.
    let alone: Vec<f64> = questions
        .iter()
        .map(|q| bert.predict_blocking(q.to_string(), 512).unwrap())
        .collect();
    assert!(alone.iter().all(|p| (0.0..=512.0).contains(p)), "{alone:?}");
    assert!(
        alone.iter().any(|p| (p - alone[0]).abs() > 1e-3),
        "different prompts, different predictions: {alone:?}"
    );
    let together: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = questions
            .iter()
            .map(|q| {
                let b = &bert;
                s.spawn(move || b.predict_blocking(q.to_string(), 512).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, t) in alone.iter().zip(&together) {
        assert!((a - t).abs() < 1e-2, "{alone:?} vs {together:?}");
    }
    let missing = BertPredictor::load(&dir.path().join("nope.safetensors"));
    assert!(
        missing
            .unwrap_err()
            .to_string()
            .contains("nope.safetensors"),
        "errors name the file"
    );

    // Over HTTP: every request gets BERT's prediction before it is submitted and is served
    // with the text of the same request run alone.
    let r = runner();
    let rt = runtime();
    let mut cfg = EngineConfig::new(4096, PolicyKind::SjfBert);
    cfg.scheduler.max_running = 2;
    let server = Server::start_with_bert(&rt, cfg, Some(bert.clone()));
    let addr = server.addr;
    let clients: Vec<_> = questions
        .iter()
        .map(|q| {
            let body = serde_json::json!({
                "messages": [{"role": "user", "content": q}],
                "max_tokens": 8,
            })
            .to_string();
            std::thread::spawn(move || http(addr, "POST", "/v1/chat/completions", &body))
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        ..GenerateOptions::default()
    };
    for (client, q) in clients.into_iter().zip(questions) {
        let (status, _, body) = client.join().unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let g = r
            .generate(&r.encode_chat(q).unwrap(), &opts, |_| {})
            .unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            r.decode(&g.tokens).unwrap().as_str()
        );
    }
    let report = server.stop(&rt);
    assert_eq!(report.stats.counters.finished, questions.len() as u64);
    assert_eq!(
        report.stats.initial_error.count,
        questions.len() as u64,
        "every request had BERT's initial prediction"
    );
}

/// Virtual time: the clock moves by the step cost (here 1 s a step, whatever its shape), a
/// request reaches the scheduler at its arrival, and the clock jumps to it when nothing runs.
/// The tokens are the same as on the wall clock.
#[test]
fn virtual_time_moves_by_the_step_cost_and_jumps_to_arrivals() {
    let refs = references();
    let mut cfg = EngineConfig::new(4096, PolicyKind::Fcfs);
    cfg.virtual_time = Some(VirtualTime::new(StepTimeModel::constant(1.0)));
    let engine = Engine::start(runner(), None, cfg).unwrap();
    let reqs: Vec<GenRequest> = [(0usize, 0.5), (1, 100.0)]
        .iter()
        .map(|&(i, at)| {
            let mut r = GenRequest::greedy(refs[i].0.clone(), 4);
            r.arrival = Some(at);
            r
        })
        .collect();
    let handles = engine.submit_all_blocking(reqs).unwrap();
    let s: Vec<Summary> = handles
        .into_iter()
        .map(|h| h.unwrap().wait().unwrap())
        .collect();
    // The first: arrives at 0.5, prefilled in the first step (its first token at 1.5), then one
    // token a step. The second: the clock jumps from 4.5 to its arrival at 100.
    assert_eq!(s[0].times.arrival, 0.5);
    assert_eq!(s[0].times.tokens, vec![1.5, 2.5, 3.5, 4.5]);
    assert_eq!(s[1].times.arrival, 100.0);
    assert_eq!(s[1].times.tokens, vec![101.0, 102.0, 103.0, 104.0]);
    for (sum, (_, reference)) in s.iter().zip(refs) {
        assert_eq!(sum.tokens, reference[..4]);
    }
    engine.shutdown().unwrap();
}

/// Submits `reqs`, waits for every one, shuts the engine down: the summaries in order.
fn run_to_end(engine: Engine, reqs: Vec<GenRequest>) -> Vec<Summary> {
    let summaries: Vec<Summary> = engine
        .submit_all_blocking(reqs)
        .unwrap()
        .into_iter()
        .map(|h| h.unwrap().wait().unwrap())
        .collect();
    engine.shutdown().unwrap();
    summaries
}

/// Virtual time charges swaps: with one running request, the oracle and preemption by swap,
/// each step 1 s plus 10 ms per KV token swapped. L (5 tokens) starts at 0; S (1 token)
/// arrives at 1.5 s, during L's second step. At 2 s the oracle swaps L out (its prompt + 1 fed
/// token) to prefill S, which is done one step and the swap later; the next step swaps L back in
/// and decodes its third token, which costs the swap again. The tokens are those of the
/// requests run alone.
#[test]
fn virtual_time_charges_the_kv_a_swap_moves_out_and_back_in() {
    let refs = references();
    let mut cfg = EngineConfig::new(4096, PolicyKind::Oracle);
    cfg.scheduler.max_running = 1;
    cfg.scheduler.preemption_mode = PreemptionMode::Swap;
    cfg.virtual_time = Some(VirtualTime::new(StepTimeModel {
        per_swap_token_s: 0.01,
        ..StepTimeModel::constant(1.0)
    }));
    let engine = Engine::start(runner(), None, cfg).unwrap();
    let reqs: Vec<GenRequest> = [(0usize, 0.0, 5usize), (1, 1.5, 1)]
        .iter()
        .map(|&(i, at, n)| {
            let mut r = GenRequest::greedy(refs[i].0.clone(), MAX_NEW);
            r.eval_stop = Some(n);
            r.arrival = Some(at);
            r
        })
        .collect();
    let s = run_to_end(engine, reqs);
    let swap = 1.0 + 0.01 * (refs[0].0.len() + 1) as f64;
    let after_swap_out = 1.0 + 1.0 + swap;
    let back_in = after_swap_out + swap;
    assert_eq!(s[1].times.tokens, vec![after_swap_out]);
    assert_eq!(
        s[0].times.tokens,
        vec![1.0, 2.0, back_in, back_in + 1.0, back_in + 1.0 + 1.0]
    );
    assert_eq!(s[0].preemptions_policy, 1);
    assert_eq!(s[0].tokens, refs[0].1[..5]);
    assert_eq!(s[1].tokens, refs[1].1[..1]);
}

/// The step-time model of the virtual-time engine tests: 10 ms a step, 4 ms a decode row,
/// 0.5 ms a prefill token, 10 µs a KV token.
fn virtual_time() -> VirtualTime {
    VirtualTime::new(StepTimeModel::linear(0.01, 0.004, 0.0005, 1e-5))
}

/// An engine on virtual time that replays recorded requests gives what one that runs the model
/// gives: tokens, every timestamp, predictions and preemptions, under TRAIL with the predictor
/// in the loop, chunked prefill and a tight KV budget. The recordings come from a third engine
/// with another policy, batch and arrivals, so their bits owe nothing to the schedule.
#[test]
fn virtual_engines_replaying_recordings_match_engines_running_the_model() {
    let r = runner();
    let refs = references();
    let run = |policy: PolicyKind, recs: Option<Arc<Recordings>>, spaced: bool| {
        let mut cfg = tight_config(policy);
        cfg.virtual_time = Some(virtual_time());
        cfg.recordings = recs;
        if !spaced {
            cfg.scheduler.max_running = 16;
            cfg.scheduler.kv_budget_tokens = 16384;
        }
        let engine = Engine::start(r.clone(), Some(seeded_checkpoint(r.kernel_id())), cfg).unwrap();
        let reqs: Vec<GenRequest> = refs
            .iter()
            .enumerate()
            .map(|(i, (prompt, _))| {
                let mut g = GenRequest::greedy(prompt.clone(), MAX_NEW);
                g.arrival = Some(if spaced { 0.03 * i as f64 } else { 0.0 });
                g
            })
            .collect();
        run_to_end(engine, reqs)
    };
    let computed = run(PolicyKind::Trail, None, true);
    assert!(
        computed
            .iter()
            .any(|s| s.preemptions_policy + s.preemptions_memory > 0),
        "the schedule preempts, so replays must follow a different batch history"
    );
    let recs = Arc::new(Recordings::new());
    run(PolicyKind::Fcfs, Some(recs.clone()), false);
    assert_eq!((recs.len(), recs.hits()), (refs.len(), 0));
    let replayed = run(PolicyKind::Trail, Some(recs.clone()), true);
    assert_eq!(recs.hits(), refs.len(), "every request replayed");
    for ((c, p), (_, reference)) in computed.iter().zip(&replayed).zip(refs) {
        assert_eq!(c.tokens, *reference);
        assert_eq!(c, p, "tokens, timestamps, predictions and preemptions");
    }
}

/// One engine, two executors: with recordings of only every other request, an engine replays
/// those and runs the model for the others in the same steps (recording them as it goes), and
/// gives what an engine running the model for every request gives (TRAIL with the predictor
/// in the loop, preemptions, chunked prefill); the recordings it makes equal the first's.
#[test]
fn an_engine_replaying_some_requests_and_running_the_others_matches_one_running_all() {
    let r = runner();
    let refs = references();
    let run = |recs: Arc<Recordings>| {
        let mut cfg = tight_config(PolicyKind::Trail);
        cfg.virtual_time = Some(virtual_time());
        cfg.recordings = Some(recs);
        let engine = Engine::start(r.clone(), Some(seeded_checkpoint(r.kernel_id())), cfg).unwrap();
        let reqs: Vec<GenRequest> = refs
            .iter()
            .enumerate()
            .map(|(i, (prompt, _))| {
                let mut g = GenRequest::greedy(prompt.clone(), MAX_NEW);
                g.arrival = Some(0.03 * i as f64);
                g
            })
            .collect();
        run_to_end(engine, reqs)
    };
    // Nothing recorded yet: every request runs the model, and is recorded.
    let all = Arc::new(Recordings::new());
    let computed = run(all.clone());
    assert_eq!((all.len(), all.hits()), (refs.len(), 0));
    assert!(
        computed
            .iter()
            .any(|s| s.preemptions_policy + s.preemptions_memory > 0),
        "the schedule preempts"
    );
    let key = |i: usize| RecordingKey::of(&GenRequest::greedy(refs[i].0.clone(), MAX_NEW));
    let recorded: HashMap<RecordingKey, Recording> = all
        .entries()
        .into_iter()
        .map(|(k, rec)| (k, (*rec).clone()))
        .collect();
    let half = Arc::new(Recordings::new());
    for i in (0..refs.len()).step_by(2) {
        half.insert(key(i), recorded[&key(i)].clone());
    }
    let mixed = run(half.clone());
    assert_eq!(
        half.hits(),
        refs.len().div_ceil(2),
        "every other request replayed"
    );
    for (c, m) in computed.iter().zip(&mixed) {
        assert_eq!(c, m, "tokens, timestamps, predictions and preemptions");
    }
    let remade: HashMap<RecordingKey, Recording> = half
        .entries()
        .into_iter()
        .map(|(k, rec)| (k, (*rec).clone()))
        .collect();
    assert_eq!(remade, recorded, "the others were recorded, to the bit");
}

#[test]
fn replay_on_the_wall_clock_is_refused_as_a_configuration_error() {
    let mut cfg = EngineConfig::new(4096, PolicyKind::Fcfs);
    cfg.recordings = Some(Arc::new(Recordings::new()));
    match Engine::start(runner(), None, cfg) {
        Err(EngineError::Config(m)) => assert!(m.contains("virtual time"), "{m}"),
        Err(e) => panic!("not a configuration error: {e}"),
        Ok(_) => panic!("replay without virtual time started"),
    }
}

/// A predictor v2 checkpoint on layer 11 whose probe and prompt predictor are sure every answer
/// runs to its cap (the cap class's bias dominates), reading the tokens generated as inputs,
/// with a calibrated likelihood; through the file format.
fn cap_class_checkpoint() -> Checkpoint {
    let d = runner().config().hidden_size;
    let bins = Bins::default().with_cap_class();
    let (h, k) = (4, bins.k());
    let probe = |dim: usize| {
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        let mut b2 = vec![0f32; k];
        b2[k - 1] = 40.0;
        Probe::new(
            Standardizer {
                mean: vec![0.0; dim],
                std: vec![1.0; dim],
            },
            t(vec![0.0; h * dim], &[h, dim]),
            t(vec![0.0; h], &[h]),
            t(vec![0.0; k * h], &[k, h]),
            t(b2, &[k]),
        )
        .unwrap()
    };
    let ck = Checkpoint {
        meta: CheckpointMeta {
            model_sha256: "test".into(),
            kernel_id: runner().kernel_id().into(),
            probe_layers: vec![11],
            prompt_layers: vec![11],
            hidden_size: d,
            bins,
            refine_interval: 4,
            train_data_sha256: "none".into(),
            val_mae: 0.0,
            prompt_val_mae: None,
            git_commit: "test".into(),
            g_input: true,
            label_prior: Some(vec![1.0 / k as f64; k]),
            likelihood_exponent: 1.0,
        },
        probe: probe(d + 2),
        prompt: Some(probe(d)),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.safetensors");
    ck.save(&path).unwrap();
    Checkpoint::load(&path).unwrap()
}

/// The cap class reads out each request's own cap, the one its client sent: a request capped
/// at 12 tokens and one at 30, sure to run to their caps, are predicted 12 and 30 at prefill
/// (the preemption limit's base) and `cap − g` at every row after.
#[test]
fn the_cap_class_reads_out_each_client_s_own_cap() {
    let r = runner();
    let ck = cap_class_checkpoint();
    assert_eq!(ck.meta.format_version(), 2);
    let engine = Engine::start(
        r.clone(),
        Some(ck),
        EngineConfig::new(256, PolicyKind::Trail),
    )
    .unwrap();
    let prompt = r.encode_chat("Tell me about cats.").unwrap();
    let handles: Vec<_> = [12usize, 30]
        .iter()
        .map(|&cap| {
            let h = engine
                .submit_blocking(GenRequest::greedy(prompt.clone(), cap))
                .expect("admitted");
            (cap, h)
        })
        .collect();
    for (cap, h) in handles {
        let s = h.wait().expect("done");
        let initial = s.initial_prediction.expect("a first prediction");
        assert!((initial - cap as f64).abs() < 1e-6, "cap {cap}: {initial}");
        assert!(!s.predictions.is_empty());
        for &(g, p) in &s.predictions {
            let want = cap as f64 - f64::from(g);
            assert!((p - want).abs() < 1e-6, "cap {cap}, g {g}: {p} vs {want}");
        }
    }
}
