//! `trail predict --checkpoint F "prompt"`: answer a prompt greedily and print, as the answer
//! streams, the exported predictor's estimate of the remaining length.
//!
//! The first estimate comes from the prompt predictor on the mean of the prompt's states; the
//! Bayesian filter then refreshes it with the probe every `refine_interval` tokens (from the
//! checkpoint) and counts down in between, as the serving engine does. The checkpoint must be
//! for this model (sha256) and hidden size: anything else is an error naming the file.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;

use anyhow::Context;
use trail_checkpoints::Checkpoint;
use trail_checkpoints::checkpoint::g_features;
use trail_checkpoints::refine::RefineState;
use trail_llm::{LayerSet, hub};

use super::model_args::ModelArgs;

/// Arguments of `trail predict`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The exported checkpoint (`trail export`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The user message.
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long = "max-tokens", alias = "max-new-tokens", default_value_t = 512)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The features a predictor reads: `layers` of a row's captured states, concatenated.
fn features(layers: &[usize], get: impl Fn(usize) -> Option<Vec<f32>>) -> anyhow::Result<Vec<f32>> {
    let mut v = Vec::new();
    for &l in layers {
        v.extend(get(l).with_context(|| format!("layer {l} was not captured"))?);
    }
    Ok(v)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runner = args.model.load()?;
    let sha = hub::sha256_file(runner.path())?;
    let hidden = runner.config().hidden_size;
    let ckpt = Checkpoint::load_for(&args.checkpoint, &sha, hidden)?;
    let prompt_probe = ckpt
        .prompt
        .as_ref()
        .with_context(|| format!("{}: no prompt predictor", args.checkpoint.display()))?;
    let m = &ckpt.meta;
    let mut set = LayerSet::NONE;
    for &l in m.probe_layers.iter().chain(&m.prompt_layers) {
        set = set.with(l);
    }
    let filter = m.filter(m.refine_interval.max(1));
    let model = runner.model();
    let tokens = runner.encode_chat(&args.prompt)?;
    let mut cache = model.new_cache();
    let mut out = model.prefill(&mut cache, &tokens, set)?;
    let (mean_set, mean) = cache.prompt_mean().context("no prompt mean was captured")?;
    let x = features(&m.prompt_layers, |l| {
        let r = mean_set.rank(l)?;
        Some(mean[r * hidden..(r + 1) * hidden].to_vec())
    })?;
    let probs = prompt_probe.predict_proba(&x)?;
    let max_new = args.max_new_tokens as u32;
    let mut state = RefineState::new(&filter, &probs, max_new);
    eprintln!(
        "prompt predictor (layers {:?}): about {:.0} tokens",
        m.prompt_layers,
        state.remaining(&filter)
    );
    let mut generated: Vec<u32> = Vec::new();
    let mut estimates = Vec::new();
    let mut stdout = std::io::stdout();
    loop {
        let mut x = features(&m.probe_layers, |l| out.hidden(0, l).map(<[f32]>::to_vec))?;
        if m.g_input {
            x.extend_from_slice(&g_features(generated.len() as u32, m.bins.max()));
        }
        if generated.is_empty() || state.due(&filter) {
            state.refine(&filter, &ckpt.probe.predict_proba(&x)?);
            let est = state.remaining(&filter);
            estimates.push((state.generated(), est));
            let (dim, reset) = if std::io::stderr().is_terminal() {
                ("\x1b[2m", "\x1b[0m")
            } else {
                ("", "")
            };
            eprint!("{dim}[g={} ≈{est:.0} left]{reset}", state.generated());
        }
        let tok = out.argmax(0);
        generated.push(tok);
        let text = runner.decode(&[tok])?;
        print!("{text}");
        stdout.flush().ok();
        if runner.is_stop(tok) || generated.len() >= args.max_new_tokens {
            break;
        }
        out = model.decode(&mut [&mut cache], &[tok], set)?;
        state.advance(1);
    }
    println!();
    let n = generated.len() as f64;
    let mae: f64 = estimates
        .iter()
        .map(|&(g, e)| (e - (n - g as f64)).abs())
        .sum::<f64>()
        / estimates.len().max(1) as f64;
    eprintln!(
        "{} tokens generated; first estimate {:.0}; MAE of the {} refreshed estimates {mae:.1} tokens",
        generated.len(),
        estimates.first().map_or(f64::NAN, |e| e.1),
        estimates.len()
    );
    Ok(())
}
