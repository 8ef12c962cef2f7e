//! Step models from a file (issue 25), model-free: a model with a swap cost and a KV capacity
//! round-trips through its file, and so do the GPU models committed under
//! `reports/latency-smollm2/step-models/`; the saturation of an engine under a given model is a
//! burst replayed on virtual time, whose makespan is computed here by hand; and a step that
//! swaps a request out, or back in, takes its tokens × the swap cost longer.

use std::path::{Path, PathBuf};

use trail_eval::loadgen::TraceRequest;
use trail_eval::tracesim::{
    self, PolicyKind, Predictions, Router, SchedulerConfig, SimConfig, StepTimeModel,
};
use trail_pipeline::stages::eval::latency::saturation;
use trail_pipeline::stages::step_model;
use trail_serving_shim::PreemptionMode;

/// A request of a hand-made trace: arrival, prompt tokens, output tokens.
fn request(arrival_s: f64, prompt_tokens: u32, output_tokens: u32) -> TraceRequest {
    TraceRequest {
        prompt_tokens: Some(prompt_tokens),
        max_tokens: Some(512),
        ..TraceRequest::new(arrival_s, "p".into(), Some(output_tokens))
    }
}

fn scheduler(max_running: usize, mode: PreemptionMode) -> SchedulerConfig {
    SchedulerConfig {
        max_running,
        preemption_mode: mode,
        ..SchedulerConfig::new(4096)
    }
}

#[test]
fn a_step_model_file_round_trips_with_its_swap_cost_and_capacity() {
    let model = StepTimeModel {
        per_swap_token_s: 5.12e-6,
        kv_capacity_tokens: Some(434_512),
        ..StepTimeModel::linear(0.011321861, 9.6217e-5, 8.9482e-5, 9.9e-8)
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpu.json");
    let text = serde_json::to_string_pretty(&model).unwrap();
    std::fs::write(&path, &text).unwrap();
    let back = step_model::read(&path).unwrap();
    assert_eq!(back, model);
    assert_eq!(serde_json::to_string_pretty(&back).unwrap(), text);
}

/// The committed GPU step models: each reads, passes the checks, says its capacity and swap
/// cost, and writes back to the same bytes.
#[test]
fn the_committed_gpu_step_models_read_and_round_trip() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../reports/latency-smollm2/step-models");
    let files: Vec<PathBuf> = ["a100-80gb", "h100-80gb"]
        .iter()
        .map(|g| dir.join(format!("llama3-8b-bf16-{g}.json")))
        .collect();
    for path in files {
        let model = step_model::read(&path).unwrap_or_else(|e| panic!("{e:#}"));
        let capacity = model
            .kv_capacity_tokens
            .expect("a GPU model says its capacity");
        // 48 running requests of at most ~300 prompt + 512 output tokens fit many times over.
        assert!(capacity > 48 * 1024, "{}: {capacity}", path.display());
        assert!(model.per_swap_token_s > 0.0, "{}", path.display());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            serde_json::to_string_pretty(&model).unwrap(),
            text.trim_end(),
            "{}",
            path.display()
        );
    }
}

/// Three requests at t = 0 (prompts 10, 20, 30; outputs 2, 3, 1), two running at most,
/// steps of 1 s + 0.5 s a decode row + 10 ms a prefill token + 1 ms a KV token attended:
///
/// 1. prefill A and B: 1 + 0.01·30 + 0.001·30 = 1.33 s (A and B have their first token);
/// 2. decode A and B: 1 + 0.5·2 + 0.001·(11 + 21) = 2.032 s (A is done: C is admitted next);
/// 3. decode B, prefill C: 1 + 0.5 + 0.01·30 + 0.001·(22 + 30) = 1.852 s (B and C are done).
///
/// Makespan 5.214 s: 3 / 5.214 requests/s, 6 / 5.214 output tokens/s.
#[test]
fn saturation_under_a_step_model_is_a_burst_replayed_on_virtual_time() {
    let burst = [
        request(0.0, 10, 2),
        request(0.0, 20, 3),
        request(0.0, 30, 1),
    ];
    let model = StepTimeModel::linear(1.0, 0.5, 0.01, 0.001);
    let sat = saturation::on_virtual_time(&burst, &scheduler(2, PreemptionMode::Recompute), &model)
        .unwrap();
    let makespan = 1.33 + 2.032 + 1.852;
    assert!((sat.makespan_s - makespan).abs() < 1e-12, "{sat:?}");
    assert!((sat.rps - 3.0 / makespan).abs() < 1e-12, "{sat:?}");
    assert!((sat.output_tokens_per_s - 6.0 / makespan).abs() < 1e-12);
    assert_eq!(
        (sat.source.as_str(), sat.requests, sat.completed),
        ("virtual", 3, 3)
    );
    // One at a time, the burst takes six steps (1.11 + 1.511 + 1.22 + 1.521 + 1.522 + 1.33
    // s): the batch is the run's.
    let one = saturation::on_virtual_time(&burst, &scheduler(1, PreemptionMode::Recompute), &model)
        .unwrap();
    assert!((one.makespan_s - 8.214).abs() < 1e-12, "{one:?}");
    // Free lengths cannot be replayed.
    let free = [TraceRequest::new(0.0, "p".into(), None)];
    let err = saturation::on_virtual_time(&free, &scheduler(2, PreemptionMode::Recompute), &model)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--saturation-rps"), "{err}");
}

/// One running request at most, the oracle, preemption by swap; steps of 1 s + 10 ms per KV
/// token swapped. L (prompt 10, 5 tokens) starts at 0; S (prompt 10, 1 token) arrives at 1.5 s,
/// during L's second step. At 2 s the oracle swaps L out (10 prompt + 1 fed token = 11 KV
/// tokens) to prefill S: that step takes 1 + 0.11 s, and S is done at 3.11 s. The next step
/// swaps L's 11 tokens back in and decodes its third token (1.11 s, at 4.22 s); its last two
/// take 1 s each: L is done at 6.22 s. Without the swap cost: 3 s and 6 s.
#[test]
fn a_swap_costs_its_tokens_out_and_back_in() {
    let trace = [request(0.0, 10, 5), request(1.5, 10, 1)];
    let run = |per_swap_token_s: f64| {
        let cfg = SimConfig {
            scheduler: scheduler(1, PreemptionMode::Swap),
            policy: PolicyKind::Oracle,
            c: 0.8,
            replicas: 1,
            router: Router::RoundRobin,
            predictions: Predictions::default(),
        };
        let model = StepTimeModel {
            per_swap_token_s,
            ..StepTimeModel::constant(1.0)
        };
        let r = tracesim::simulate(&trace, &[10, 10], &cfg, &model).unwrap();
        assert_eq!(r.requests[0].preemptions, 1);
        (r.requests[0].finish, r.requests[1].finish, r.steps)
    };
    let swap = 1.0 + 0.01 * 11.0;
    assert_eq!(
        run(0.01),
        (1.0 + 1.0 + swap + swap + 1.0 + 1.0, 1.0 + 1.0 + swap, 6)
    );
    assert_eq!(run(0.0), (6.0, 3.0, 6));
}
