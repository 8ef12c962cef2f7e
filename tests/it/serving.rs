//! The serving engine over the real SmolLM2-135M-Instruct: many concurrent requests under a
//! KV budget far too small for all of them, so requests are preempted (memory and policy) and
//! recomputed; every request must still complete with exactly the greedy text of the same
//! request run alone through the bare runner.

use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use trail_checkpoints::{Bins, Checkpoint, CheckpointMeta, Probe, Standardizer};
use trail_llm::{GenerateOptions, Runner};
use trail_serving_shim::{
    Engine, EngineConfig, EngineError, FinishReason, GenRequest, PolicyKind, SchedulerError,
    Summary,
};

fn runner() -> Arc<Runner> {
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
            req.true_len = Some(reference.len());
        }
        let h = engine.submit_blocking(req).expect("admitted");
        handles.push(h);
        if i == refs.len() / 2 {
            // Let the first wave get going, so later short requests meet running long ones.
            std::thread::sleep(std::time::Duration::from_millis(300));
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
fn fcfs_under_memory_pressure_matches_requests_run_alone() {
    let engine = Engine::start(runner(), None, tight_config(PolicyKind::Fcfs)).unwrap();
    let (summaries, report) = serve_all(engine, false);
    let c = report.stats.counters;
    eprintln!(
        "fcfs: {} steps, {} memory preemptions, {} recomputed tokens, {:.3} s in steps",
        c.steps, c.preemptions_memory, c.recomputed_tokens, report.stats.step_secs
    );
    assert!(
        c.preemptions_memory > 0,
        "the budget must force memory preemption"
    );
    assert_eq!(c.preemptions_policy, 0, "fcfs never preempts by policy");
    assert!(summaries.iter().any(|s| s.recomputed_tokens > 0));
    assert_eq!(c.finished, summaries.len() as u64);
    assert_eq!(report.stats.kv_blocks_used, 0);
    let budget = tight_config(PolicyKind::Fcfs).scheduler.kv_budget_tokens;
    assert!(
        report
            .steps
            .iter()
            .all(|s| s.kv_tokens <= budget && s.rows <= 8)
    );
    assert!(report.steps.iter().any(|s| s.preempted_memory > 0));
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

/// A real checkpoint file with a seeded, untrained probe on layer 11 and a prompt predictor
/// (no trained checkpoint is available to the tests): exercises the predictor in the loop.
fn seeded_checkpoint(kernel_id: &str) -> Checkpoint {
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
    let mut probe = || {
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        Probe::new(
            Standardizer {
                mean: vec![0.0; d],
                std: vec![1.0; d],
            },
            t(rnd(h * d, 0.2), &[h, d]),
            t(rnd(h, 0.2), &[h]),
            t(rnd(k * h, 2.0), &[k, h]),
            t(rnd(k, 0.5), &[k]),
        )
        .unwrap()
    };
    let decode = probe();
    let prompt = probe();
    let ck = Checkpoint {
        meta: CheckpointMeta {
            model_sha256: "test".into(),
            kernel_id: kernel_id.into(),
            probe_layers: vec![11],
            prompt_layers: vec![11],
            hidden_size: d,
            bins: Bins::default(),
            refine_interval: 2,
            train_data_sha256: "none".into(),
            val_mae: 0.0,
            prompt_val_mae: None,
            git_commit: "test".into(),
        },
        probe: decode,
        prompt: Some(prompt),
    };
    // Through the file format, as the engine gets it in production.
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
    let text = st.render_prometheus();
    assert!(text.contains("trail_predictor_mae_tokens "));
    assert!(text.contains(&format!("trail_ttft_seconds_count {}", summaries.len())));
}

#[test]
fn kernel_mismatch_warns_and_admission_errors_name_the_limit() {
    let r = runner();
    let mut cfg = EngineConfig::new(256, PolicyKind::Sprpt);
    cfg.scheduler.max_waiting = 1;
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
fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let start = |max_waiting: usize| {
        let mut cfg = EngineConfig::new(2048, PolicyKind::Fcfs);
        cfg.scheduler.max_waiting = max_waiting;
        let engine = Arc::new(Engine::start(r.clone(), None, cfg).unwrap());
        let router = trail_serving_shim::http::router(engine, "smollm2", 16);
        let listener = rt
            .block_on(trail_serving_shim::http::bind(
                "127.0.0.1:0".parse().unwrap(),
            ))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(trail_serving_shim::http::serve(router, listener, async {
            let _ = stopped.await;
        }));
        (addr, stop, server)
    };
    let (addr, stop, server) = start(64);

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

    // Streamed: SSE chunks whose deltas concatenate to the same text, usage last, then [DONE].
    let mut sreq = req.clone();
    sreq["stream"] = true.into();
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
    let last = chunks.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string());
    assert_eq!(last["usage"]["completion_tokens"], alone.tokens.len());

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
    assert!(body.contains("trail_requests_finished_total 3\n"), "{body}");
    assert!(body.contains("trail_ttft_seconds_count 3\n"));
    stop.send(()).unwrap();
    rt.block_on(server).unwrap().unwrap();

    // Overload: a waiting queue of zero refuses everything with 429 and Retry-After.
    let (addr, stop, server) = start(0);
    let (status, head, body) = http(
        addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "hi", "max_tokens": 2}"#,
    );
    assert_eq!(status, 429, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"));
    stop.send(()).unwrap();
    rt.block_on(server).unwrap().unwrap();
}
