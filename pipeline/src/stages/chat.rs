//! `trail chat`.

/// Arguments of `trail chat`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`trail chat` is not built yet")
}
