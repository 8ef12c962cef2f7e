//! `trail fetch`.

/// Arguments of `trail fetch`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`trail fetch` is not built yet")
}
