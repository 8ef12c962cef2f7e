//! The configuration of `trail eval latency`, typed once. [`Config`] resolves and checks the
//! arguments (the policies, the grid, the workload, its lengths and caps). What a run records
//! of it is [`Common`] plus, in `settings.json` ([`Settings`]: what every finished cell depends
//! on, so a rerun with other values is refused), the inputs' hashes, and in the manifest
//! ([`ManifestConfig`]) the paths and the grid.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;
use trail_datasets::schema::requests_path;
use trail_eval::loadgen::Arrivals;
use trail_eval::loadgen::workload::{Lengths, Prompt};
use trail_serving_shim::PolicyKind;

use super::{Args, BackendKind, sha256, test_prompts};
use crate::stages::engine_args::EngineArgs;

/// The arguments resolved and checked.
#[derive(Debug)]
pub struct Config {
    /// The policies to run, in the order given.
    pub policies: Vec<PolicyKind>,
    /// Their names.
    pub names: Vec<String>,
    /// The data run's `requests.parquet`.
    pub req_path: PathBuf,
    /// The prompts of its test split.
    pub pool: Vec<Prompt>,
    /// How output lengths are fixed.
    pub lengths: Lengths,
    /// Each request's cap (`max_tokens`).
    pub max_tokens: u32,
    /// Requests of the saturation burst.
    pub saturation_requests: usize,
    /// The target model's GGUF.
    pub model_path: PathBuf,
}

impl Config {
    /// Resolves `args`: an error names the flag at fault. Creates the output directory.
    pub fn resolve(args: &Args) -> anyhow::Result<Self> {
        let policies = policies(args)?;
        check_grid(args)?;
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("{}: cannot create", args.out.display()))?;
        let (rows, pool) = test_prompts(&args.data)?;
        let lengths = lengths(args)?;
        let max_tokens = args
            .max_tokens
            .unwrap_or(trail_checkpoints::suite::generation_cap(&args.data, &rows)?)
            .min(args.clip_output_tokens.unwrap_or(u32::MAX))
            .max(1);
        let saturation_requests = args
            .saturation_requests
            .unwrap_or(8 * args.engine.max_running);
        anyhow::ensure!(
            saturation_requests > 0,
            "--saturation-requests must be at least 1"
        );
        // The arrivals' own check, before any burst runs.
        Arrivals::with_burstiness(1.0, args.burstiness).context("--burstiness")?;
        Ok(Self {
            names: policies.iter().map(|p| p.as_str().to_string()).collect(),
            policies,
            req_path: requests_path(&args.data),
            pool,
            lengths,
            max_tokens,
            saturation_requests,
            model_path: args.model.path()?,
        })
    }

    /// Whether a policy to run needs the predictor checkpoint.
    pub fn needs_checkpoint(&self) -> bool {
        self.policies
            .iter()
            .any(|p| matches!(p, PolicyKind::Trail | PolicyKind::Sprpt))
    }

    /// What the run records of itself in both files.
    fn common(&self, args: &Args) -> Common {
        Common {
            requests: args.requests,
            ignore_eos: args.ignore_eos(),
            clip_output_tokens: args.clip_output_tokens,
            max_tokens: self.max_tokens,
            clamp_to_profiled_length: args.clamp_to_profiled_length,
            backend: args.backend,
            engine: args.engine.clone(),
            c: args.ranking.c,
            refine_every: args.predictor.refine_every,
            saturation_requests: self.saturation_requests,
            saturation_rps: args.saturation_rps,
            burstiness: args.burstiness,
        }
    }

    /// `settings.json`: hashes the data, the checkpoints and the model.
    pub fn settings(&self, args: &Args) -> anyhow::Result<Settings> {
        let hash = |p: &Option<PathBuf>| p.as_deref().map(sha256).transpose();
        Ok(Settings {
            step_model: args.step_model.clone(),
            step_model_sha256: hash(&args.step_model)?,
            checkpoint_sha256: hash(&args.predictor.checkpoint)?,
            bert_checkpoint_sha256: hash(&args.ranking.bert_checkpoint)?,
            data_requests_sha256: sha256(&self.req_path)?,
            model: self.model_path.display().to_string(),
            model_sha256: sha256(&self.model_path)?,
            client: None,
            common: self.common(args),
        })
    }

    /// The manifest's configuration.
    pub fn manifest(&self, args: &Args) -> ManifestConfig {
        ManifestConfig {
            step_model: args.step_model.clone(),
            checkpoint: args.predictor.checkpoint.clone(),
            bert_checkpoint: args.ranking.bert_checkpoint.clone(),
            data: args.data.clone(),
            policies: self.names.clone(),
            loads: args.loads.clone(),
            seeds: args.seeds.clone(),
            out: args.out.clone(),
            bootstrap: args.bootstrap,
            model: args.model.model.clone(),
            threads: args.model.threads,
            common: self.common(args),
        }
    }
}

/// What `settings.json` and the manifest both record.
#[derive(Debug, Clone, Serialize)]
pub struct Common {
    pub requests: usize,
    pub ignore_eos: bool,
    pub clip_output_tokens: Option<u32>,
    pub max_tokens: u32,
    pub clamp_to_profiled_length: bool,
    pub backend: BackendKind,
    pub engine: EngineArgs,
    pub c: f64,
    pub refine_every: Option<u32>,
    pub saturation_requests: usize,
    pub saturation_rps: Option<f64>,
    /// `--burstiness`; absent at 1 (Poisson), as in every run before it.
    #[serde(skip_serializing_if = "is_poisson")]
    pub burstiness: f64,
}

/// Whether `--burstiness` leaves arrivals Poisson.
fn is_poisson(burstiness: &f64) -> bool {
    *burstiness == 1.0
}

/// `settings.json`: what every finished cell depends on.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    #[serde(flatten)]
    pub common: Common,
    pub data_requests_sha256: String,
    pub checkpoint_sha256: Option<String>,
    pub bert_checkpoint_sha256: Option<String>,
    /// The model's path.
    pub model: String,
    pub model_sha256: String,
    /// `--step-model` as given (absent without it, as in every run before it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_model: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_model_sha256: Option<String>,
    /// The HTTP client's server and protocol (absent for the in-process backends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<super::client::ClientRecord>,
}

/// The manifest's `config`.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestConfig {
    #[serde(flatten)]
    pub common: Common,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_model: Option<PathBuf>,
    pub checkpoint: Option<PathBuf>,
    pub bert_checkpoint: Option<PathBuf>,
    pub data: PathBuf,
    pub policies: Vec<String>,
    pub loads: Vec<f64>,
    pub seeds: Vec<u64>,
    pub out: PathBuf,
    pub bootstrap: usize,
    /// `--model` as given.
    pub model: Option<String>,
    pub threads: Option<usize>,
}

/// Binds `out` to `settings` (see [`check_settings`]).
pub fn bind(out: &Path, settings: &Settings) -> anyhow::Result<()> {
    check_settings(out, &serde_json::to_value(settings)?)
}

/// Settings every finished cell depends on: written once, and a rerun with other values is
/// refused (it would mix incomparable cells).
fn check_settings(out: &Path, settings: &Value) -> anyhow::Result<()> {
    let Value::Object(settings) = settings else {
        anyhow::bail!("settings must be a JSON object");
    };
    Ok(trail_fs::bind_settings(
        &out.join("settings.json"),
        settings,
    )?)
}

/// Which policies to run; a policy whose checkpoint is missing is an error naming the flag,
/// or (with `all`) skipped with a warning.
fn policies(args: &Args) -> anyhow::Result<Vec<PolicyKind>> {
    let all = args.policies.trim() == "all";
    let asked: Vec<PolicyKind> = if all {
        PolicyKind::ALL.to_vec()
    } else {
        args.policies
            .split(',')
            .map(|p| PolicyKind::from_str(p.trim()))
            .collect::<Result<_, _>>()
            .context("--policies")?
    };
    if args.ranking.bert_checkpoint.is_none()
        && asked
            .iter()
            .any(|p| matches!(p, PolicyKind::Trail | PolicyKind::Sprpt))
    {
        eprintln!(
            "warning: without --bert-checkpoint, trail and sprpt have no prediction for a request \
             before its prefill: waiting requests are served FCFS among themselves and never \
             preempt a running one"
        );
    }
    let mut out = Vec::new();
    for (i, &p) in asked.iter().enumerate() {
        anyhow::ensure!(!asked[..i].contains(&p), "--policies names {p} twice");
        match missing(args, p) {
            None => out.push(p),
            Some(flag) if all => eprintln!("warning: skipping policy {p}: it needs {flag}"),
            Some(flag) => anyhow::bail!("policy {p} needs {flag}"),
        }
    }
    anyhow::ensure!(!out.is_empty(), "no policy to run");
    Ok(out)
}

/// The flag policy `p` needs and `args` lack, if any.
fn missing(args: &Args, p: PolicyKind) -> Option<&'static str> {
    match p {
        PolicyKind::Trail | PolicyKind::Sprpt if args.predictor.checkpoint.is_none() => {
            Some("--checkpoint (the exported predictor, `trail export`)")
        }
        PolicyKind::SjfBert if args.ranking.bert_checkpoint.is_none() => {
            Some("--bert-checkpoint (bert.safetensors, `trail export --bert`)")
        }
        PolicyKind::Oracle if !args.ignore_eos() => Some(
            "profiled lengths, without --no-ignore-eos (the oracle knows lengths only when they are fixed)",
        ),
        _ => None,
    }
}

/// The grid is not empty and its loads are positive.
fn check_grid(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(!args.seeds.is_empty(), "--seeds is empty");
    anyhow::ensure!(!args.loads.is_empty(), "--loads is empty");
    for &l in &args.loads {
        anyhow::ensure!(
            l.is_finite() && l > 0.0,
            "--loads: {l} is not a positive fraction of saturation"
        );
    }
    Ok(())
}

/// Output lengths: profiled (the release protocol) or free (`--no-ignore-eos`).
fn lengths(args: &Args) -> anyhow::Result<Lengths> {
    if args.ignore_eos() {
        return Ok(Lengths::Profiled {
            clip: args.clip_output_tokens,
            clamp: args.clamp_to_profiled_length,
        });
    }
    anyhow::ensure!(
        !args.clamp_to_profiled_length,
        "--clamp-to-profiled-length needs profiled lengths (not --no-ignore-eos)"
    );
    Ok(Lengths::Free)
}

/// The report's line on output lengths and caps.
pub fn describe_lengths(lengths: Lengths, max_tokens: u32) -> String {
    match lengths {
        Lengths::Profiled { clip, clamp } => {
            let clip = clip.map_or(String::new(), |c| format!(" clipped to {c}"));
            let cap = if clamp {
                "cap = the profiled length (the release protocol's clamp: predictions see the \
                 true length)"
                    .to_string()
            } else {
                format!("cap {max_tokens} (the client's; predictors never see the profiled length)")
            };
            format!("profiled output length{clip} as an evaluation-only stop; {cap}")
        }
        Lengths::Free => format!("model stops freely, at most {max_tokens}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_with_a_float_read_back_equal_so_a_rerun_resumes() {
        let dir = tempfile::tempdir().unwrap();
        // serde_json's default float parser reads this one back one ulp off.
        let settings = serde_json::json!({ "saturation_rps": 1.1985825176004705_f64 });
        check_settings(dir.path(), &settings).unwrap();
        check_settings(dir.path(), &settings).unwrap();
        let other = serde_json::json!({ "saturation_rps": 1.2 });
        let err = check_settings(dir.path(), &other).unwrap_err().to_string();
        assert!(err.contains("saturation_rps"), "{err}");
    }
}
