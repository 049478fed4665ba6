//! `gateway audit …`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Subcommand;

use super::{chain, sink, verify};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Check the tamper-evident chain of audit records: every gap, altered
    /// record and broken link is named; non-zero exit on any problem.
    Verify {
        /// Read the journal of this journald namespace (`journalctl --namespace`).
        #[arg(long, conflicts_with = "file")]
        namespace: Option<String>,
        /// Read `journalctl -o json` lines from this file instead of the journal.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cfg: &Config, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Verify {
            namespace,
            file,
            json,
        } => {
            let report = match file {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    verify::verify(
                        verify::parse(&text)
                            .with_context(|| format!("parsing {}", path.display()))?,
                    )
                }
                None => {
                    let mut report = verify::verify(read_journal(namespace.as_deref())?);
                    let head = chain::read_head(&sink::dir(&cfg.daemon.state_dir).join("chain"));
                    if let Some((head, _)) = head
                        && head > report.last_seq.unwrap_or(0)
                    {
                        // Records may still be on their way into the journal.
                        std::thread::sleep(Duration::from_secs(1));
                        report = verify::verify(read_journal(namespace.as_deref())?);
                        let spooled = spooled_seqs(cfg);
                        verify::check_tail(&mut report, head, &spooled);
                    }
                    report
                }
            };
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["ok"] = report.ok().into();
                v["messages"] = report
                    .problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .into();
                println!("{v}");
            } else {
                print!("{}", verify::render(&report));
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// `journalctl -t gateway-audit -o json --all --no-pager [--namespace NS]`.
fn read_journal(namespace: Option<&str>) -> anyhow::Result<Vec<verify::Entry>> {
    let mut cmd = std::process::Command::new("journalctl");
    cmd.args([
        "-t",
        sink::IDENTIFIER,
        "-o",
        "json",
        "--all",
        "--no-pager",
        "-q",
    ]);
    if let Some(ns) = namespace {
        cmd.arg(format!("--namespace={ns}"));
    }
    let out = cmd
        .output()
        .context("running journalctl (is systemd's journalctl installed?)")?;
    if !out.status.success() {
        anyhow::bail!(
            "journalctl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    verify::parse(&String::from_utf8_lossy(&out.stdout)).context("parsing journalctl's output")
}

/// Seqs waiting in the daemon's spool (delivered later, not missing).
fn spooled_seqs(cfg: &Config) -> Vec<u64> {
    let path = sink::dir(&cfg.daemon.state_dir).join("spool.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seq"].as_u64())
        .collect()
}
