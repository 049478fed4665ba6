//! `gateway audit …` (stub: being written).

use clap::Subcommand;

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Check the tamper-evident chain of audit records.
    Verify,
}

pub fn run(cfg: &Config, cmd: Cmd) -> anyhow::Result<std::process::ExitCode> {
    let _ = (cfg, cmd);
    anyhow::bail!("not implemented yet")
}
