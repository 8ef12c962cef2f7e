//! `trail generate` end to end on the real SmolLM2 (issue 4's acceptance), through the stage's
//! library entry with the command line's own argument parser:
//!
//! - a run killed with SIGKILL once its first part is on disk, then rerun with the same
//!   command, ends with the same `requests.parquet` rows, the same files and the same sha256s
//!   (from the manifests) as an uninterrupted run. The killed run is a child process: this test
//!   binary started again on the ignored test [`child_process`];
//! - pyarrow and polars read the run's hive layout as one table: counts, `remaining =
//!   output_tokens − g`, and the `prompt_mean` rows equal to the runner's own prompt mean.
//!
//! pyarrow and polars are required (CI installs them), as in `datasets.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::Parser;
use trail_datasets::schema::requests_path;
use trail_datasets::store;
use trail_llm::{LayerSet, Runner};
use trail_pipeline::stages::generate;

/// Set (to the JSON array of `trail generate` arguments) in the child process.
const CHILD_ENV: &str = "TRAIL_IT_GENERATE_ARGS";
const PROMPTS: usize = 8;
const MAX_NEW: u32 = 24;
const EVERY: u32 = 8;

/// `trail generate`'s arguments, parsed as the binary parses them.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: generate::Args,
}

fn parse(argv: &[String]) -> generate::Args {
    Cli::try_parse_from(std::iter::once("trail-generate".to_string()).chain(argv.iter().cloned()))
        .unwrap_or_else(|e| panic!("{e}"))
        .args
}

/// The command under test: 8 Alpaca prompts, parts of 2, 2 rows at a time (so parts finish
/// one after another and a kill after the first leaves the others to redo).
fn command(out: &Path) -> Vec<String> {
    let gguf = trail_tests::smollm2_gguf();
    [
        "--dataset",
        "alpaca",
        "--limit",
        &PROMPTS.to_string(),
        "--seed",
        "3",
        "--max-new-tokens",
        &MAX_NEW.to_string(),
        "--sample",
        &format!("every:{EVERY}"),
        "--part-size",
        "2",
        "--batch",
        "2",
        "--model",
        gguf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// The uninterrupted run, made once per test process.
fn reference_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("generate-reference");
        if out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
        }
        let summary = generate::generate(&parse(&command(&out))).unwrap();
        assert_eq!(summary.requests, PROMPTS);
        assert_eq!(summary.parts, PROMPTS / 2);
        assert_eq!(summary.parts_resumed, 0);
        out
    })
}

/// Not a test on its own: the child process `generate_resumes_after_sigkill` starts and kills.
/// Without its environment variable it has nothing to run.
#[test]
#[ignore = "the child process of generate_resumes_after_sigkill"]
fn child_process() {
    let Ok(argv) = std::env::var(CHILD_ENV) else {
        return;
    };
    let argv: Vec<String> = serde_json::from_str(&argv).unwrap();
    generate::generate(&parse(&argv)).unwrap();
}

/// Every file under `dir` (relative paths), temporary ones included.
fn files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// (path, bytes, sha256) of a manifest's outputs.
fn manifest_outputs(run: &Path) -> Vec<(String, u64, String)> {
    let text = std::fs::read_to_string(run.join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["path"].as_str().unwrap().to_string(),
                o["bytes"].as_u64().unwrap(),
                o["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn generate_resumes_after_sigkill() {
    let reference = reference_run();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let argv = command(&out);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "generate::child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, serde_json::to_string(&argv).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = out.join(".parts").join("requests-00000.parquet");
    let t = Instant::now();
    while !first.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("the child exited ({status}) before its first part:\n{err}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "no first part after 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !requests_path(&out).exists() && !out.join("manifest.json").exists(),
        "the child finished before it was killed: nothing was resumed"
    );

    let summary = generate::generate(&parse(&argv)).unwrap();
    assert!(
        summary.parts_resumed >= 1 && summary.parts_resumed < summary.parts,
        "{} of {} parts resumed",
        summary.parts_resumed,
        summary.parts
    );
    assert!(summary.tok_s.is_some());

    assert_eq!(
        store::read_requests(&requests_path(&out)).unwrap(),
        store::read_requests(&requests_path(reference)).unwrap()
    );
    let (a, b) = (manifest_outputs(reference), manifest_outputs(&out));
    assert_eq!(
        a.len(),
        1 + 30 * PROMPTS / 2,
        "requests + 30 layers × 4 parts"
    );
    assert_eq!(a, b);
    // The same files, none left over (temporary or duplicate).
    let listed = |run: &Path| -> Vec<String> {
        files(run)
            .into_iter()
            .filter(|f| f != "manifest.json")
            .collect()
    };
    assert_eq!(listed(reference), listed(&out));

    // A third run over the finished dir resumes everything and changes nothing.
    let again = generate::generate(&parse(&argv)).unwrap();
    assert_eq!(
        (again.parts_resumed, again.tok_s, again.generated_tokens),
        (again.parts, None, 0)
    );
    assert_eq!(manifest_outputs(&out), a);
}

/// What pyarrow and polars read: per reader, layer → request id → prompt_mean embedding.
type PromptMeans = BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f32>>>>;

#[test]
fn pyarrow_and_polars_read_a_generated_run() {
    let run = reference_run();
    let requests = store::read_requests(&requests_path(run)).unwrap();
    assert_eq!(requests.len(), PROMPTS);
    // Per layer: a prompt mean per request and the states g = 0, 8, 16 below its length.
    let per_layer: u32 = requests
        .iter()
        .map(|r| 1 + r.output_tokens.div_ceil(EVERY))
        .sum();
    let checked = [0u32, 14, 29];
    let out = trail_tests::python(
        r#"
import sys, json, os
import pyarrow.dataset as ds, pyarrow.parquet as pq, pyarrow.compute as pc
import polars as pl
run, per_layer, checked = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
emb, req = os.path.join(run, "embeddings"), os.path.join(run, "requests.parquet")
layers = list(range(30))
means = {}

t = ds.dataset(emb, format="parquet", partitioning="hive").to_table()
assert t.num_rows == per_layer * len(layers), (t.num_rows, per_layer)
assert sorted(set(t.column("layer").to_pylist())) == layers
assert t.schema.field("embedding").type.list_size == 576
r = pq.read_table(req)
assert r.num_rows == 8
j = t.drop_columns(["embedding"]).join(r, "request_id")
assert j.num_rows == t.num_rows
assert pc.all(pc.equal(j["remaining"], pc.subtract(j["output_tokens"], j["g"]))).as_py()
pm = t.filter(pc.equal(t["kind"], "prompt_mean"))
assert pm.num_rows == 8 * len(layers)
assert set(pm.column("g").to_pylist()) == {0}
means["pyarrow"] = {}
for row in pm.to_pylist():
    if row["layer"] in checked:
        means["pyarrow"].setdefault(str(row["layer"]), {})[row["request_id"]] = [float(x) for x in row["embedding"]]

df = pl.scan_parquet(os.path.join(emb, "**", "*.parquet"), hive_partitioning=True).collect()
assert df.height == per_layer * len(layers), df.height
jd = df.join(pl.read_parquet(req), on="request_id")
assert jd.height == df.height
assert (jd["remaining"] == jd["output_tokens"] - jd["g"]).all()
tokens = df.filter(pl.col("kind") == "token")
assert (tokens["g"] % 8 == 0).all()
means["polars"] = {}
for row in df.filter((pl.col("kind") == "prompt_mean") & pl.col("layer").is_in(checked)).iter_rows(named=True):
    means["polars"].setdefault(str(row["layer"]), {})[row["request_id"]] = [float(x) for x in row["embedding"]]
print(json.dumps(means))
"#,
        &[
            run.to_str().unwrap(),
            &per_layer.to_string(),
            &serde_json::to_string(&checked).unwrap(),
        ],
    );
    let read: PromptMeans = serde_json::from_str(out.trim()).unwrap();

    // The runner's own prompt mean of each prompt, from one prefill of the whole prompt.
    let runner = Runner::load(&trail_tests::smollm2_gguf()).unwrap();
    let h = runner.config().hidden_size;
    let layers = checked
        .iter()
        .fold(LayerSet::NONE, |s, &l| s.with(l as usize));
    for r in &requests {
        let ids = runner.encode_chat(&r.prompt).unwrap();
        let mut cache = runner.model().new_cache();
        runner.model().prefill(&mut cache, &ids, layers).unwrap();
        let (got_layers, mean) = cache.prompt_mean().unwrap();
        assert_eq!(got_layers, layers);
        for (k, &l) in checked.iter().enumerate() {
            let want = &mean[k * h..(k + 1) * h];
            for reader in ["pyarrow", "polars"] {
                let stored = &read[reader][&l.to_string()][&r.request_id];
                assert_eq!(stored.len(), h);
                let cos = trail_tests::cosine(stored, want);
                assert!(
                    cos > 0.99999,
                    "{reader} layer {l} {}: cosine {cos}",
                    r.request_id
                );
                for (i, (&s, &w)) in stored.iter().zip(want).enumerate() {
                    // f16 keeps 11 significant bits: relative error ≤ 2^-11.
                    assert!(
                        (s - w).abs() <= w.abs() / 2048.0 + 1e-6,
                        "{reader} layer {l} {} [{i}]: stored {s}, runner {w}",
                        r.request_id
                    );
                }
            }
        }
    }
}

/// `trail bench generate`'s arguments, parsed as the binary parses them.
#[derive(Parser)]
struct BenchCli {
    #[command(flatten)]
    args: trail_pipeline::stages::bench::generate::Args,
}

fn bench_args(extra: &[&str]) -> trail_pipeline::stages::bench::generate::Args {
    let gguf = trail_tests::smollm2_gguf();
    let argv = ["trail-bench-generate", "--model", gguf.to_str().unwrap()]
        .into_iter()
        .chain(extra.iter().copied());
    BenchCli::try_parse_from(argv)
        .unwrap_or_else(|e| panic!("{e}"))
        .args
}

/// `trail bench generate --kv-compare` on a tiny scale: pairs of stage rounds with the f16 and
/// f32 caches in alternating order, every prompt at the length a free greedy f16 pass gave it
/// (or an earlier run's, `--lengths-from`), both formats generating the same tokens; the report
/// holds the rounds, the pairs' ratios and the goal, in JSON and markdown.
#[test]
fn bench_generate_compares_the_kv_caches_at_fixed_lengths() {
    use trail_pipeline::stages::bench::generate::{comparison, markdown, measure};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let args = bench_args(&[
        "--kv-compare",
        "--prompts",
        "4",
        "--max-tokens",
        "8",
        "--batch-size",
        "4",
        "--repeats",
        "2",
        "--seed",
        "3",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    let r = measure(&args).unwrap();
    let c = r.kv_compare.as_ref().expect("a comparison");
    assert!(
        c.lengths_from.contains("free greedy pass"),
        "{}",
        c.lengths_from
    );
    assert!(c.tokens_per_round > 0 && c.tokens_per_round <= 4 * 8);
    assert_eq!(r.generated_tokens, c.tokens_per_round);
    let order: Vec<(usize, &str)> = c
        .rounds
        .iter()
        .map(|x| (x.pair, x.kv_cache.as_str()))
        .collect();
    assert_eq!(order, [(0, "f16"), (0, "f32"), (1, "f32"), (1, "f16")]);
    for x in &c.rounds {
        assert_eq!(x.generated_tokens, c.tokens_per_round, "{x:?}");
        assert!(x.secs > 0.0);
        assert!((x.tok_s - x.generated_tokens as f64 / x.secs).abs() < 1e-9);
    }
    assert_ne!(c.rounds[0].kernel_id, c.rounds[1].kernel_id);
    assert_eq!(c.rounds[0].kernel_id, c.rounds[3].kernel_id);
    assert_eq!(r.kernel_id, c.rounds[0].kernel_id);
    let orders: Vec<&str> = c.pairs.iter().map(|p| p.order.as_str()).collect();
    assert_eq!(orders, ["f16 f32", "f32 f16"]);
    for p in &c.pairs {
        assert!((p.ratio - p.f16_tok_s / p.f32_tok_s).abs() < 1e-12);
    }
    assert!(c.ratio_min <= c.ratio_median && c.ratio_median <= c.ratio_max);
    assert_eq!(c.goal_ratio, comparison::GOAL_RATIO);
    assert_eq!(c.goal_met, c.ratio_median >= comparison::GOAL_RATIO);
    // The stage figures are the f16 rounds', the bare runner's its one pass.
    assert!((r.stage_secs - c.f16_secs).abs() < 1e-12);
    assert_eq!(r.per_layer.len(), 30);
    let md = markdown(&r);
    assert!(md.contains("## f16 vs f32 KV cache, interleaved"), "{md}");
    assert!(md.contains("f16 ÷ f32: median"), "{md}");

    // The report as `trail bench generate --out` writes it.
    trail_pipeline::stages::bench::emit("generate", &r, &md, true, Some(&out)).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("generate.json")).unwrap()).unwrap();
    assert_eq!(json["kv_compare"]["rounds"].as_array().unwrap().len(), 4);
    assert_eq!(json["kv_compare"]["pairs"].as_array().unwrap().len(), 2);
    assert_eq!(json["generated_tokens"], c.tokens_per_round);
    assert!(out.join("generate.md").is_file());

    // Lengths from the reference run (8 prompts of seed 3, up to 24 tokens), capped at 8.
    let reference = reference_run();
    let want: u64 = store::read_requests(&requests_path(reference))
        .unwrap()
        .iter()
        .map(|x| u64::from(x.output_tokens.min(8)))
        .sum();
    let args = bench_args(&[
        "--kv-compare",
        "--lengths-from",
        reference.to_str().unwrap(),
        "--prompts",
        "8",
        "--max-tokens",
        "8",
        "--batch-size",
        "8",
        "--seed",
        "3",
        "--json",
    ]);
    let r = measure(&args).unwrap();
    let c = r.kv_compare.as_ref().unwrap();
    assert!(
        c.lengths_from.ends_with("requests.parquet"),
        "{}",
        c.lengths_from
    );
    assert_eq!(c.tokens_per_round, want);
    assert!(c.rounds.iter().all(|x| x.generated_tokens == want));
    assert_eq!(r.generated_tokens, want);

    // Another plan's requests are not in the reference run.
    let args = bench_args(&[
        "--kv-compare",
        "--lengths-from",
        reference.to_str().unwrap(),
        "--prompts",
        "8",
        "--seed",
        "4",
        "--json",
    ]);
    let e = format!("{:#}", measure(&args).unwrap_err());
    assert!(e.contains("no request"), "{e}");
    // --lengths-from belongs to --kv-compare.
    let gguf = trail_tests::smollm2_gguf();
    assert!(
        BenchCli::try_parse_from([
            "x",
            "--model",
            gguf.to_str().unwrap(),
            "--lengths-from",
            "somewhere"
        ])
        .is_err()
    );
}
