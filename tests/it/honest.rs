//! The honest evaluation: no profiled length reaches a predictor, and the filter the engine
//! serves is the one `trail report` and `trail eval mae` score, to the bit.
//!
//! - A request whose profiled length is short, served with a predictor that expects it to run
//!   long, keeps its long estimate until it stops: the profiled length goes to the engine only as
//!   the evaluation-only stop. The release protocol's clamp, kept behind a flag to measure it,
//!   is shown to leak.
//! - A small run generated in f32 with positions at the refresh interval, scored by the scorer
//!   and served through the engine with the same checkpoint: the engine's estimate at each row
//!   `g` equals the scorer's, request by request and row by row.
//! - Over HTTP the profiled length is `eval_output_tokens`, refused (400) unless the server was
//!   started for evaluation, and never above the request's `max_tokens`.

use std::sync::Arc;

use clap::Parser;
use trail_checkpoints::Checkpoint;
use trail_checkpoints::scoring::{self, Predictors, ScoreOptions};
use trail_checkpoints::suite::Run;
use trail_eval::loadgen::workload::{self, Lengths, Prompt};
use trail_pipeline::stages::eval::latency::backend::EngineBackend;
use trail_pipeline::stages::generate;
use trail_serving_shim::{Engine, EngineConfig, GenRequest, PolicyKind, Summary};

use crate::serving::{checkpoint_of, http, runner, runtime, seeded_checkpoint};

/// A checkpoint whose probe and prompt predictor put (nearly) all their mass on the last bin,
/// whatever the input: it expects every request to run to the cap.
fn expects_long(kernel_id: &str) -> Checkpoint {
    let d = runner().config().hidden_size;
    let (h, k) = (8, 10);
    let mut b2 = vec![0.0; k];
    b2[k - 1] = 30.0;
    let weights = (vec![0.0; h * d], vec![0.0; h], vec![0.0; k * h], b2);
    checkpoint_of(kernel_id, 4, weights.clone(), Some(weights))
}

/// Serves one trace request through the evaluation backend's request mapping.
fn serve(engine: &Arc<Engine>, lengths: Lengths) -> (GenRequest, Summary) {
    let pool = [Prompt {
        request_id: "short".into(),
        text: "Say hi.".into(),
        output_tokens: 6,
        prompt_tokens: None,
    }];
    let trace = workload::burst(&pool, 1, 0, lengths, 512).unwrap();
    let req = EngineBackend::new(engine.clone(), 512)
        .gen_request(&trace[0])
        .unwrap();
    let summary = engine.submit_blocking(req.clone()).unwrap().wait().unwrap();
    (req, summary)
}

#[test]
fn a_short_request_keeps_a_long_estimate_until_it_stops() {
    let r = runner();
    let cfg = EngineConfig::new(4096, PolicyKind::Trail);
    let engine =
        Arc::new(Engine::start(r.clone(), Some(expects_long(r.kernel_id())), cfg).unwrap());
    let (req, s) = serve(
        &engine,
        Lengths::Profiled {
            clip: None,
            clamp: false,
        },
    );
    assert_eq!(req.max_new_tokens, 512, "the client's cap");
    assert_eq!(
        req.eval_stop,
        Some(6),
        "the profiled length, as a stop only"
    );
    assert_eq!(s.tokens.len(), 6, "the evaluation stop ends it");
    assert_eq!(s.predictions.len(), 6);
    for &(g, p) in &s.predictions {
        // The last bin's midpoint is 486.4: the estimate stays there, counted down, capped at
        // 512 − g; nothing pulls it to the 6 − g tokens actually left.
        assert!(p > 480.0 - f64::from(g), "row {g}: {p}");
    }
    assert!(s.initial_prediction.unwrap() > 480.0);
    // The release protocol's clamp (`--clamp-to-profiled-length`) hands the true length over.
    let (req, s) = serve(
        &engine,
        Lengths::Profiled {
            clip: None,
            clamp: true,
        },
    );
    assert_eq!(req.max_new_tokens, 6);
    for &(g, p) in &s.predictions {
        assert!(p <= 6.0 - f64::from(g), "row {g}: {p}");
    }
}

#[derive(Parser)]
struct GenerateCli {
    #[command(flatten)]
    args: generate::Args,
}

#[test]
fn the_engine_serves_the_filter_that_the_scorer_scores() {
    const MAX_NEW: u32 = 24;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let gguf = trail_tests::smollm2_gguf();
    let argv = [
        "generate",
        "--dataset",
        "alpaca",
        "--limit",
        "6",
        "--seed",
        "5",
        "--max-new-tokens",
        "24",
        // Rows at the checkpoint's refresh interval, every layer the checkpoint reads, in f32:
        // the scorer sees exactly the states the engine computes.
        "--sample",
        "every:2",
        "--layers",
        "11",
        "--dtype",
        "f32",
        "--batch",
        "3",
        "--model",
        gguf.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ];
    let args = GenerateCli::try_parse_from(argv).unwrap().args;
    generate::generate(&args).unwrap();

    let r = runner();
    let data = Run::open(&run).unwrap();
    let mut ckpt = seeded_checkpoint(r.kernel_id());
    ckpt.meta.model_sha256 = data.info.model_sha256.clone();
    assert_eq!(ckpt.meta.refine_interval, 2);
    let path = dir.path().join("predictor.safetensors");
    ckpt.save(&path).unwrap();
    let opts = ScoreOptions {
        refine_interval: ckpt.meta.refine_interval,
        bootstrap: 10,
        seed: 0,
        g_bucket: 0,
    };
    let scored = scoring::score(&data, None, &Predictors::checkpoint(&path).unwrap(), &opts)
        .expect("scores the run");

    let cfg = EngineConfig::new(8192, PolicyKind::Trail);
    let engine = Engine::start(r.clone(), Some(ckpt), cfg).unwrap();
    let handles: Vec<_> = data
        .requests
        .iter()
        .map(|q| {
            let prompt = r.encode_chat(&q.prompt).unwrap();
            let h = engine
                .submit_blocking(GenRequest::greedy(prompt, MAX_NEW as usize))
                .unwrap();
            (q, h)
        })
        .collect();
    let mut compared = 0;
    for (q, h) in handles {
        let s = h.wait().unwrap();
        assert_eq!(s.tokens.len() as u32, q.output_tokens, "{}", q.request_id);
        let served: std::collections::BTreeMap<u32, f64> = s.predictions.iter().copied().collect();
        let rows = &scored.details.refined[&q.request_id];
        assert_eq!(rows[0].0, 0, "row 0 is scored");
        for &(g, want) in rows {
            let got = served[&g];
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{} row {g}: engine {got}, scorer {want}",
                q.request_id
            );
            compared += 1;
        }
    }
    engine.shutdown().unwrap();
    assert!(compared >= 6 * 3, "{compared} rows compared");
}

/// Posts a chat request with `max_tokens` 64 and `eval_output_tokens` = `stop` to a front end
/// that does (`allow`) or does not accept the evaluation-only stop.
fn post_eval_stop(allow: bool, stop: u64) -> (u16, serde_json::Value) {
    use trail_serving_shim::http::{self as front, HttpOptions};
    let rt = runtime();
    let engine = Arc::new(
        Engine::start(runner(), None, EngineConfig::new(4096, PolicyKind::Oracle)).unwrap(),
    );
    let opts = HttpOptions {
        allow_eval_stop: allow,
        ..HttpOptions::new(16)
    };
    let router = front::router_with_options(engine.clone(), "smollm2", opts);
    let listener = rt
        .block_on(front::bind("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(front::serve(router, listener, async {
        let _ = stopped.await;
    }));
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 64,
        "eval_output_tokens": stop,
    });
    let (status, _, text) = http(addr, "POST", "/v1/chat/completions", &body.to_string());
    stop_tx.send(()).unwrap();
    rt.block_on(task).unwrap().unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

#[test]
fn eval_output_tokens_is_accepted_only_by_a_server_started_for_evaluation() {
    let (status, body) = post_eval_stop(false, 3);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "eval_output_tokens", "{body}");
    let (status, body) = post_eval_stop(true, 3);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
    let (status, body) = post_eval_stop(true, 65);
    assert_eq!(status, 400, "above max_tokens: {body}");
    assert_eq!(body["error"]["param"], "eval_output_tokens", "{body}");
}
