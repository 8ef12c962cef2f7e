//! `trail run`: the main job on the embedded defaults, fetching what it needs. For now: fetch
//! SmolLM2-135M-Instruct, answer the first Alpaca prompt (streamed) and report tok/s.

use std::io::BufRead;

use anyhow::Context;
use trail_datasets::corpus;

use super::chat;
use super::model_args::ModelArgs;

/// Arguments of `trail run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Tokens to generate for the answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The user message of the carried Alpaca's first record (only its first line is read).
fn first_alpaca_prompt() -> anyhow::Result<String> {
    let path = corpus::carried_alpaca_path();
    let mut line = String::new();
    corpus::open_carried_alpaca()?
        .read_line(&mut line)
        .with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("{}: line 1 is not JSON", path.display()))?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
    corpus::alpaca_prompt(field("instruction"), field("input"))
        .map_err(|e| anyhow::anyhow!("{}: line 1: {e}", path.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    eprintln!("[1/2] model");
    let runner = args.model.load()?;
    eprintln!("      {} ({})", runner.path().display(), runner.kernel_id());
    let prompt = first_alpaca_prompt()?;
    eprintln!("[2/2] the first Alpaca prompt: {prompt:?}\n");
    let chat_args = chat::Args {
        message: prompt,
        system: None,
        max_new_tokens: args.max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        truncate: false,
        model: args.model.clone(),
    };
    let stats = chat::answer(&runner, &chat_args)?;
    eprintln!(
        "\n{} prompt tokens prefilled at {:.0} tok/s; {} tokens generated at {:.1} tok/s (greedy, {} threads)",
        stats.prompt_tokens,
        stats.prefill_tok_s,
        stats.new_tokens,
        stats.decode_tok_s,
        super::model_args::threads()
    );
    Ok(())
}
