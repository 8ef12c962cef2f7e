//! `trail eval latency` on the real SmolLM2 with tiny settings (in-process engine, a handful of
//! short requests): the traces it writes are the seeded Poisson process at load × measured
//! capacity, every request of every cell is in results.parquet exactly once, a rerun redoes only
//! the cells that are missing, and policies without their checkpoint are refused by flag; `trail
//! sim trace` replays a cell on its own step log. The generator itself is checked on a large
//! synthetic sample.

use std::path::Path;

use clap::Parser;
use trail_datasets::schema::{FinishReason, RequestRow, requests_path};
use trail_datasets::split::Split;
use trail_datasets::store::write_requests;
use trail_eval::loadgen::workload::{Lengths, Prompt, poisson_trace};
use trail_eval::loadgen::{Arrivals, read_results, read_trace};
use trail_pipeline::stages::eval::{self, Eval};
use trail_pipeline::stages::sim;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    eval: Eval,
}

/// Runs `trail eval latency ARGV...` in process; the error as `{:#}` prints it.
fn eval_latency(argv: &[&str]) -> Result<(), String> {
    let mut full = vec!["trail", "latency"];
    full.extend_from_slice(argv);
    let cli = Cli::try_parse_from(&full).map_err(|e| e.to_string())?;
    eval::run(cli.eval).map_err(|e| format!("{e:#}"))
}

/// Runs `trail sim trace ARGV...` in process.
fn sim_trace(argv: &[&str]) -> Result<(), String> {
    #[derive(Parser)]
    struct SimCli {
        #[command(flatten)]
        sim: sim::Args,
    }
    let mut full = vec!["sim", "trace"];
    full.extend_from_slice(argv);
    let cli = SimCli::try_parse_from(&full).map_err(|e| e.to_string())?;
    sim::run(cli.sim).map_err(|e| format!("{e:#}"))
}

/// `argv` with the argument `old` replaced by `new`.
fn replaced<'a>(argv: &[&'a str], old: &str, new: &'a str) -> Vec<&'a str> {
    argv.iter()
        .map(|a| if *a == old { new } else { *a })
        .collect()
}

const PROFILED: Lengths = Lengths::Profiled {
    clip: None,
    clamp: false,
};

fn pool(n: usize) -> Vec<Prompt> {
    (0..n)
        .map(|i| Prompt {
            request_id: format!("r{i}"),
            text: format!("prompt {i}"),
            output_tokens: 1 + (i as u32 * 37) % 300,
            prompt_tokens: None,
        })
        .collect()
}

#[test]
fn generated_arrivals_are_the_seeded_poisson_process() {
    let pool = pool(40);
    let (n, rate) = (20_000, 2.5);
    let a = poisson_trace(&pool, n, rate, 11, PROFILED, 512).unwrap();
    let times: Vec<f64> = a.iter().map(|r| r.arrival_s).collect();
    // Exactly the arrival process of that seed and rate, and the same again for the same seed.
    assert_eq!(times, Arrivals::Poisson { rate }.times(n, 11).unwrap());
    let again = poisson_trace(&pool, n, rate, 11, PROFILED, 512).unwrap();
    assert_eq!(a, again);
    let other = poisson_trace(&pool, n, rate, 12, PROFILED, 512).unwrap();
    assert_ne!(
        times[..10],
        other.iter().map(|r| r.arrival_s).collect::<Vec<_>>()[..10]
    );
    // Exponential gaps: mean 1 / rate and coefficient of variation 1 (both within 3 %; the
    // standard errors at n = 20,000 are 0.7 % and about 1 %).
    let gaps: Vec<f64> = std::iter::once(times[0])
        .chain(times.windows(2).map(|w| w[1] - w[0]))
        .collect();
    assert!(gaps.iter().all(|g| *g > 0.0));
    let mean = gaps.iter().sum::<f64>() / n as f64;
    let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    assert!((mean * rate - 1.0).abs() < 0.03, "mean gap {mean}");
    assert!(
        (var.sqrt() / mean - 1.0).abs() < 0.03,
        "cv {}",
        var.sqrt() / mean
    );
    // Every request carries its prompt's profiled length.
    for r in &a[..40] {
        let p = pool
            .iter()
            .find(|p| Some(&p.request_id) == r.request_id.as_ref())
            .unwrap();
        assert_eq!(r.output_tokens, Some(p.output_tokens));
        assert_eq!(r.prompt, p.text);
    }
}

const QUESTIONS: [&str; 6] = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Why is the sky blue?",
    "Which planet is known as the red planet?",
];

/// A generated run with only what the stage reads: requests.parquet, the questions in the test
/// split (plus one training request the stage must not use) with short profiled lengths.
fn tiny_run(dir: &Path) {
    // Prompt tokens after the chat template, as `trail generate` records them (what the
    // engine prefills, and what `trail sim trace` replays).
    let runner = trail_llm::Runner::load(&trail_tests::smollm2_gguf()).unwrap();
    let mut rows: Vec<RequestRow> = QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, q)| RequestRow {
            request_id: format!("q{i}"),
            dataset: "tiny".into(),
            split: Split::Test,
            prompt: q.to_string(),
            prompt_tokens: runner.encode_chat(q).unwrap().len() as u32,
            output: String::new(),
            output_tokens: 2 + i as u32,
            finish_reason: FinishReason::Stop,
        })
        .collect();
    rows.push(RequestRow {
        request_id: "train0".into(),
        dataset: "tiny".into(),
        split: Split::Train,
        prompt: "A training prompt that must never be served.".into(),
        prompt_tokens: 12,
        output: String::new(),
        output_tokens: 3,
        finish_reason: FinishReason::Stop,
    });
    write_requests(&requests_path(dir), &rows).unwrap();
}

/// `trail eval latency` arguments for a tiny run in `tmp` (written by [`tiny_run`]): FCFS and
/// the oracle, 8 requests a cell, batch 4, on `backend`, at `loads` and `seeds`; and the
/// output directory.
fn tiny_latency_args(
    tmp: &Path,
    backend: &str,
    loads: &str,
    seeds: &str,
) -> (Vec<String>, std::path::PathBuf) {
    let data = tmp.join("run");
    std::fs::create_dir_all(&data).unwrap();
    tiny_run(&data);
    let out = tmp.join("latency");
    let (data_s, out_s, model_s) = (
        data.display().to_string(),
        out.display().to_string(),
        trail_tests::smollm2_gguf().display().to_string(),
    );
    let argv = [
        "--data",
        &data_s,
        "--out",
        &out_s,
        "--model",
        &model_s,
        "--backend",
        backend,
        "--policies",
        "fcfs,oracle",
        "--loads",
        loads,
        "--requests",
        "8",
        "--seeds",
        seeds,
        "--max-running",
        "4",
        "--kv-budget-tokens",
        "2048",
        "--saturation-requests",
        "6",
        "--bootstrap",
        "50",
    ]
    .map(String::from)
    .to_vec();
    (argv, out)
}

#[test]
#[cfg_attr(
    not(feature = "model"),
    ignore = "needs the real model (feature `model`)"
)]
fn every_request_is_accounted_for_on_the_real_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let (argv, out) = tiny_latency_args(tmp.path(), "inprocess", "0.8", "1,2");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    eval_latency(&argv).unwrap();

    // The traces: Poisson at 0.8 × the measured capacity, seeded, prompts from the test split.
    let sat: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("saturation.json")).unwrap())
            .unwrap();
    let capacity = sat["rps"].as_f64().unwrap();
    assert!(capacity > 0.0 && sat["completed"] == 6, "{sat}");
    for seed in [1u64, 2] {
        let trace =
            read_trace(&out.join(format!("traces/load=0.80/seed={seed}/trace.jsonl"))).unwrap();
        let expect = Arrivals::Poisson {
            rate: 0.8 * capacity,
        }
        .times(8, seed)
        .unwrap();
        assert_eq!(trace.len(), expect.len());
        for (r, t) in trace.iter().zip(&expect) {
            // Through JSON text and back: equal to the last bit or so.
            assert!(
                (r.arrival_s - t).abs() <= 1e-12 * t,
                "{} vs {t}",
                r.arrival_s
            );
        }
        for r in &trace {
            assert!(QUESTIONS.contains(&r.prompt.as_str()), "{r:?}");
        }
    }

    // Every request of every cell, once, complete, with the length it was asked for.
    let rows = read_results(&out.join("results.parquet")).unwrap();
    assert_eq!(rows.len(), 2 * 2 * 8);
    for policy in ["fcfs", "oracle"] {
        for seed in [1u64, 2] {
            let mut idx: Vec<usize> = rows
                .iter()
                .filter(|r| r.policy == policy && r.seed == seed)
                .map(|r| r.result.index)
                .collect();
            idx.sort_unstable();
            assert_eq!(idx, (0..8).collect::<Vec<_>>(), "{policy} seed {seed}");
        }
    }
    for r in &rows {
        assert!(r.result.error.is_none(), "{r:?}");
        assert_eq!(Some(r.result.output_tokens), r.target_tokens, "{r:?}");
        let ttft = r.result.ttft_s.unwrap();
        assert!(ttft > 0.0 && ttft <= r.result.latency_s, "{r:?}");
        assert!(r.result.queue_s.is_some() && r.result.preemptions.is_some());
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["summary"]["cells"].as_array().unwrap().len(), 2);
    // Each server's speed against the step model fitted to every log, per seed.
    for cell in summary["summary"]["cells"].as_array().unwrap() {
        let rel = cell["engine"]["relative_step_time"].as_object().unwrap();
        assert_eq!(rel.len(), 2, "{cell}");
        assert!(rel.values().all(|r| r.as_f64().unwrap() > 0.0), "{cell}");
    }
    // The simulator on the grid's traces: the oracle's headroom and FCFS's sensitivity.
    let sim = &summary["summary"]["simulated"];
    assert_eq!(sim.as_array().unwrap().len(), 1, "{sim}");
    assert_eq!(sim[0]["requests"], 16, "{sim}");
    let headroom = sim[0]["fcfs_over_oracle"].as_f64().unwrap();
    assert!(headroom > 0.9 && headroom.is_finite(), "{sim}");
    assert!(
        sim[0]["fcfs_sensitivity_to_slower_steps"].as_f64().unwrap() > -0.01,
        "{sim}"
    );
    for f in ["report.md", "manifest.json", "latency_vs_load.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let step_log = out.join("cells/policy=oracle/load=0.80/seed=2/steps.parquet");
    assert!(step_log.is_file());

    // The trace-driven simulator replays a cell's trace with the engine's settings over the
    // step time fitted to that cell's own step log: its mean latency lands near the measured
    // one (loosely: 8 requests, and the tests share the cores).
    let cell = out.join("cells/policy=fcfs/load=0.80/seed=1");
    let sim_out = tmp.path().join("sim");
    let (trace_s, steps_s, sim_s) = (
        out.join("traces/load=0.80/seed=1/trace.jsonl")
            .display()
            .to_string(),
        cell.join("steps.parquet").display().to_string(),
        sim_out.display().to_string(),
    );
    sim_trace(&[
        "--trace",
        &trace_s,
        "--steps",
        &steps_s,
        "--policy",
        "fcfs",
        "--max-running",
        "4",
        "--kv-budget-tokens",
        "2048",
        "--out",
        &sim_s,
    ])
    .unwrap();
    let sim: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sim_out.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(sim["requests"], 8, "{sim}");
    let simulated = sim["rows"][0]["mean_latency_s"].as_f64().unwrap();
    let measured: Vec<f64> = rows
        .iter()
        .filter(|r| r.policy == "fcfs" && r.seed == 1)
        .map(|r| r.result.latency_s)
        .collect();
    let measured = measured.iter().sum::<f64>() / measured.len() as f64;
    eprintln!("fcfs, load 0.8, seed 1: measured {measured:.3} s, simulated {simulated:.3} s");
    assert!(
        (simulated / measured - 1.0).abs() < 0.35,
        "simulated {simulated} s vs measured {measured} s"
    );

    // A rerun redoes only the missing cell and ends with the same accounting.
    let kept = out.join("cells/policy=fcfs/load=0.80/seed=1/results.parquet");
    let kept_before = std::fs::read(&kept).unwrap();
    std::fs::remove_file(out.join("cells/policy=oracle/load=0.80/seed=2/results.parquet")).unwrap();
    eval_latency(&argv).unwrap();
    assert_eq!(std::fs::read(&kept).unwrap(), kept_before);
    let again = read_results(&out.join("results.parquet")).unwrap();
    assert_eq!(again.len(), rows.len());

    // Other settings in the same directory are refused rather than mixed.
    let err = eval_latency(&replaced(&argv, "4", "8")).unwrap_err();
    assert!(err.contains("max_running"), "{err}");

    // Policies without their checkpoint name the flag.
    let err = eval_latency(&replaced(&argv, "fcfs,oracle", "fcfs,trail")).unwrap_err();
    assert!(err.contains("--checkpoint"), "{err}");
    let err = eval_latency(&replaced(&argv, "fcfs,oracle", "sjf-bert")).unwrap_err();
    assert!(err.contains("--bert-checkpoint"), "{err}");
}

/// `--backend virtual`: the engine's clock moves by the step-time model fitted to the
/// saturation burst (whose capacity is measured on that clock, here or from a copied model), so running the cells again gives the same latencies to the bit, however
/// loaded the machine is; and cells that replay the recording pass give what cells that run the
/// model give.
#[test]
#[cfg_attr(
    not(feature = "model"),
    ignore = "needs the real model (feature `model`)"
)]
fn virtual_time_cells_repeat_to_the_bit_replayed_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (argv, out) = tiny_latency_args(tmp.path(), "virtual", "0.9", "1");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    eval_latency(&argv).unwrap();
    assert!(out.join("step_model.json").is_file());
    // The saturation is measured on the clock the cells run on: the burst ran here for its step
    // log, and its capacity is the burst replayed under the model fitted to that log.
    let saturation = std::fs::read_to_string(out.join("saturation.json")).unwrap();
    assert!(
        saturation.contains(r#""source": "virtual""#),
        "{saturation}"
    );
    assert!(out.join("saturation").join("steps.parquet").is_file());
    // A fresh run holding only that step model (copied) runs no burst on this machine and
    // finds the same capacity, on the copied model's clock.
    let copied = tmp.path().join("copied");
    std::fs::create_dir_all(&copied).unwrap();
    std::fs::copy(out.join("step_model.json"), copied.join("step_model.json")).unwrap();
    let copied_s = copied.display().to_string();
    eval_latency(&replaced(&argv, &out.display().to_string(), &copied_s)).unwrap();
    assert!(
        !copied.join("saturation").exists(),
        "no burst ran on this machine"
    );
    assert_eq!(
        std::fs::read_to_string(copied.join("saturation.json")).unwrap(),
        saturation
    );
    let sorted = |mut rows: Vec<trail_eval::loadgen::ResultRow>| {
        rows.sort_by(|a, b| (&a.policy, a.result.index).cmp(&(&b.policy, b.result.index)));
        rows
    };
    let first = sorted(read_results(&out.join("results.parquet")).unwrap());
    assert_eq!(first.len(), 2 * 8);
    for r in &first {
        assert!(r.result.error.is_none(), "{r:?}");
        assert_eq!(Some(r.result.output_tokens), r.target_tokens, "{r:?}");
        let ttft = r.result.ttft_s.unwrap();
        assert!(ttft > 0.0 && ttft <= r.result.latency_s, "{r:?}");
        assert_eq!(r.result.sent_s, r.result.arrival_s, "{r:?}");
    }

    // The same saturation, step model and traces; the cells run again, this time running the
    // model in every cell instead of replaying the recording pass.
    std::fs::remove_dir_all(out.join("cells")).unwrap();
    std::fs::remove_file(out.join("results.parquet")).unwrap();
    let mut rerun = argv.clone();
    rerun.push("--no-replay");
    eval_latency(&rerun).unwrap();
    let again = sorted(read_results(&out.join("results.parquet")).unwrap());
    assert_eq!(first, again);

    // A rerun reads the first run's recordings back (its pass runs no model) and replays them.
    let recordings = std::fs::read_to_string(out.join("recordings.jsonl")).unwrap();
    assert!(recordings.lines().count() > 0);
    std::fs::remove_dir_all(out.join("cells")).unwrap();
    std::fs::remove_file(out.join("results.parquet")).unwrap();
    eval_latency(&argv).unwrap();
    let replayed = sorted(read_results(&out.join("results.parquet")).unwrap());
    assert_eq!(first, replayed);
    assert_eq!(
        std::fs::read_to_string(out.join("recordings.jsonl")).unwrap(),
        recordings
    );
}

/// `--step-model`: the cells step by the given model, whose KV capacity replaces
/// `--kv-budget-tokens`; the saturation is the burst replayed on virtual time under it (no burst
/// runs on this machine); `settings.json` names the file. The engine's FCFS cells and the
/// simulator's FCFS on the same traces (the report's headroom) agree to the engine's
/// nanosecond timestamps: the engine on virtual time and the simulator time the same
/// scheduler's steps by the same model (one KV token more or less in any step would move the
/// mean by over 1e-6 s).
#[test]
#[cfg_attr(
    not(feature = "model"),
    ignore = "needs the real model (feature `model`)"
)]
fn a_given_step_model_times_the_cells_and_the_saturation_burst() {
    let tmp = tempfile::tempdir().unwrap();
    let (argv, out) = tiny_latency_args(tmp.path(), "virtual", "0.9", "1");
    let model_path = tmp.path().join("gpu.json");
    std::fs::write(
        &model_path,
        r#"{"base_s": 0.01, "per_decode_row_s": 0.0001, "per_prefill_token_s": 0.0001,
            "per_kv_token_s": 1e-5, "per_swap_token_s": 5e-6, "kv_capacity_tokens": 4096}"#,
    )
    .unwrap();
    let model_s = model_path.display().to_string();
    let mut argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    argv.extend(["--step-model", &model_s]);
    eval_latency(&argv).unwrap();

    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(name)).unwrap()).unwrap()
    };
    let sat = read("saturation.json");
    assert_eq!(sat["source"], "virtual", "{sat}");
    assert!(
        !out.join("saturation").exists(),
        "no burst ran on this machine"
    );
    let settings = read("settings.json");
    // Paths are recorded relative to the run, never as this machine's absolute paths.
    assert_eq!(settings["step_model"], "../gpu.json");
    for name in [
        "settings.json",
        "summary.json",
        "manifest.json",
        "report.md",
    ] {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        let tmp_s = tmp.path().display().to_string();
        assert!(!text.contains(&tmp_s), "{name} names {tmp_s}: {text}");
    }
    assert_eq!(settings["engine"]["kv_budget_tokens"], 4096);
    let step_model = read("step_model.json");
    assert_eq!(step_model["per_swap_token_s"], 5e-6);

    let summary = read("summary.json");
    let fcfs = summary["summary"]["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["policy"] == "fcfs")
        .unwrap()["mean_latency_s"]["value"]
        .as_f64()
        .unwrap();
    let simulated = summary["summary"]["simulated"][0]["fcfs_mean_latency_s"]
        .as_f64()
        .unwrap();
    assert!(
        (fcfs - simulated).abs() < 1e-8,
        "engine {fcfs} vs simulator {simulated}"
    );

    // --step-model is for virtual time only.
    let err = eval_latency(&replaced(&argv, "virtual", "inprocess")).unwrap_err();
    assert!(err.contains("--backend virtual"), "{err}");

    // --burstiness: gamma gaps at the same rate, recorded (absent from a Poisson run's
    // settings), named in the report; the trace is that arrival process of the seed.
    assert!(settings.get("burstiness").is_none(), "{settings}");
    let bursty = tmp.path().join("bursty");
    let bursty_s = bursty.display().to_string();
    let mut bursty_argv = replaced(&argv, &out.display().to_string(), &bursty_s);
    bursty_argv.extend(["--burstiness", "0.25"]);
    eval_latency(&bursty_argv).unwrap();
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bursty.join("settings.json")).unwrap())
            .unwrap();
    assert_eq!(settings["burstiness"], 0.25);
    let rate = 0.9 * sat["rps"].as_f64().unwrap();
    let trace = read_trace(&bursty.join("traces/load=0.90/seed=1/trace.jsonl")).unwrap();
    let times: Vec<f64> = trace.iter().map(|r| r.arrival_s).collect();
    let expect = Arrivals::Gamma {
        rate,
        burstiness: 0.25,
    }
    .times(trace.len(), 1)
    .unwrap();
    for (t, e) in times.iter().zip(&expect) {
        assert!(
            (t - e).abs() <= 1e-9 * e.max(1.0),
            "{times:?} vs {expect:?}"
        );
    }
    let report = std::fs::read_to_string(bursty.join("report.md")).unwrap();
    assert!(report.contains("burstiness 0.25"), "{report}");
    let err = eval_latency(&replaced(&bursty_argv, "0.25", "0")).unwrap_err();
    assert!(err.contains("burstiness"), "{err}");
}

/// `--base-url`: a `trail serve` front end that this test starts (for evaluation, FCFS) is
/// driven over HTTP like any OpenAI-compatible server; the protocol is inferred from its
/// `/v1/models` (a trail server: `eval-output-tokens`). The summary's ITL, p99 TTFT and goodput
/// equal those computed here, as `benchmark_serving.py` computes them, from the chunk times
/// each request recorded in `results.parquet`; every response carried one chunk per token and
/// exactly its profiled length.
#[test]
#[cfg(feature = "model")]
fn a_running_server_is_benchmarked_through_base_url() {
    use crate::serving::{Server, runtime};
    use trail_serving_shim::{EngineConfig, PolicyKind};

    let rt = runtime();
    let opts = trail_serving_shim::http::HttpOptions {
        allow_eval_stop: true,
        ..trail_serving_shim::http::HttpOptions::new(64)
    };
    let mut cfg = EngineConfig::new(2048, PolicyKind::Fcfs);
    cfg.scheduler.max_running = 4;
    let server = Server::start_with_options(&rt, cfg, opts);
    let tmp = tempfile::tempdir().unwrap();
    let (mut argv, out) = tiny_latency_args(tmp.path(), "http", "0.9", "1");
    let url = format!("http://{}", server.addr);
    let i = argv.iter().position(|a| a == "fcfs,oracle").unwrap();
    argv[i] = "fcfs".into();
    argv.extend(
        [
            "--base-url",
            &url,
            "--served-model-name",
            "smollm2",
            "--goodput",
            "ttft:400,tpot:60",
        ]
        .map(String::from),
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    eval_latency(&argv).unwrap();
    server.stop(&rt);

    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("settings.json")).unwrap()).unwrap();
    assert_eq!(settings["client"]["protocol"], "eval-output-tokens");
    assert_eq!(settings["client"]["base_url"], url.as_str());
    let rows = read_results(&out.join("results.parquet")).unwrap();
    assert_eq!(rows.len(), 8);
    let mut itl = Vec::new();
    let (mut ttft, mut good) = (Vec::new(), 0);
    for r in &rows {
        let x = &r.result;
        assert!(x.error.is_none(), "{x:?}");
        assert_eq!(
            Some(x.output_tokens),
            r.target_tokens,
            "the profiled length"
        );
        assert_eq!(
            x.itl_s.len() as u32,
            x.output_tokens - 1,
            "a chunk per token"
        );
        assert!(x.prompt_tokens.is_some_and(|n| n > 0));
        let t = x.ttft_s.unwrap();
        let tpot = (x.latency_s - t) / f64::from(x.output_tokens - 1);
        assert!((x.tpot_s.unwrap() - tpot).abs() < 1e-12);
        good += usize::from(t <= 0.4 && tpot <= 0.06);
        ttft.push(t);
        itl.extend(&x.itl_s);
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let b = &summary["summary"]["cells"][0]["benchmark"];
    let close = |key: &str, want: f64| {
        let got = b[key].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{key}: {got} vs {want}"
        );
    };
    close("mean_itl_s", itl.iter().sum::<f64>() / itl.len() as f64);
    close("median_itl_s", numpy_quantile(&itl, 0.5));
    close("p99_itl_s", numpy_quantile(&itl, 0.99));
    close("p99_ttft_s", numpy_quantile(&ttft, 0.99));
    assert_eq!(b["good_requests"].as_u64().unwrap() as usize, good);
    let duration = rows
        .iter()
        .map(|r| r.result.arrival_s + r.result.latency_s)
        .fold(0.0, f64::max);
    close("request_goodput_rps", good as f64 / duration);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("--base-url") && report.contains("eval-output-tokens"));
}

/// numpy's default quantile (linear interpolation between closest ranks), written out.
#[cfg(feature = "model")]
fn numpy_quantile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let h = (v.len() - 1) as f64 * q;
    let (lo, t) = (h.floor() as usize, h - h.floor());
    if lo + 1 >= v.len() {
        return v[lo];
    }
    v[lo] + (v[lo + 1] - v[lo]) * t
}
