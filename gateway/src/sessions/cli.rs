//! `gateway sessions …` (stub: being written).

use clap::Subcommand;

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Recorded sessions.
    List,
}

pub fn run(cfg: &Config, cmd: Cmd) -> anyhow::Result<std::process::ExitCode> {
    let _ = (cfg, cmd);
    anyhow::bail!("not implemented yet")
}
