//! `trail chat`: one answer from the target model, streamed, then tok/s.

use std::io::Write;

use trail_llm::{GenerateOptions, Sampling, StopReason};

use super::model_args::ModelArgs;

/// Arguments of `trail chat`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The user message.
    pub message: String,
    /// A system prompt instead of the template's default.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long = "max-tokens", alias = "max-new-tokens", default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep the end of a prompt longer than the context instead of failing.
    #[arg(long)]
    pub truncate: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// What one chat produced, for `trail run`.
pub struct ChatStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runner = args.model.load()?;
    eprintln!(
        "model: {} ({})",
        runner.path().display(),
        runner.kernel_id()
    );
    let stats = answer(&runner, &args)?;
    eprintln!(
        "\n[{} prompt tokens, prefill {:.0} tok/s; {} new tokens, decode {:.1} tok/s]",
        stats.prompt_tokens, stats.prefill_tok_s, stats.new_tokens, stats.decode_tok_s
    );
    Ok(())
}

/// Streams the answer to `args.message` on stdout.
pub fn answer(runner: &trail_llm::Runner, args: &Args) -> anyhow::Result<ChatStats> {
    let prompt = runner.encode_chat_with_system(args.system.as_deref(), &args.message)?;
    let sampling = Sampling::new(args.temperature, Some(args.top_p), args.seed);
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        truncate_prompt: args.truncate,
        ..GenerateOptions::default()
    };
    let mut out = std::io::stdout().lock();
    let mut ids = Vec::new();
    let mut printed = 0;
    let mut err = None;
    let generation = runner.generate(&prompt, &opts, |tok| {
        if err.is_some() || runner.is_stop(tok) {
            return;
        }
        ids.push(tok);
        // Decode the whole answer and print the new suffix, so multi-token characters and
        // byte-level merges come out whole.
        match runner.decode(&ids) {
            Ok(s) if s.len() > printed && s.is_char_boundary(printed) => {
                let _ = out.write_all(&s.as_bytes()[printed..]);
                let _ = out.flush();
                printed = s.len();
            }
            Ok(_) => {}
            Err(e) => err = Some(e),
        }
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    writeln!(out)?;
    if generation.stop == StopReason::MaxNewTokens {
        eprintln!("[stopped at --max-tokens {}]", args.max_new_tokens);
    }
    let decode_steps = generation.tokens.len().saturating_sub(1);
    Ok(ChatStats {
        prompt_tokens: generation.prompt_tokens,
        new_tokens: generation.tokens.len(),
        prefill_tok_s: generation.prompt_tokens as f64 / generation.prefill_secs.max(1e-9),
        decode_tok_s: decode_steps as f64 / generation.decode_secs.max(1e-9),
    })
}
