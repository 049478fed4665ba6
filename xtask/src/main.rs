//! Project tasks: `cargo xtask <command>` (the alias lives in
//! `.cargo/config.toml`).

mod bench;
mod ebpf;
mod install;
mod prereqs;
mod util;

use std::{ffi::OsString, os::unix::process::CommandExt, process::Command};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use util::{cargo, say};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Build, run, test and benchmark gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the kernel programs (installs nightly rust-src and bpf-linker
    /// when missing, and says so).
    BuildEbpf,
    /// build-ebpf, then the release binaries of gateway and gateway-tests.
    Build,
    /// Build, then run `gateway run ARGS` in the foreground (root only).
    Run {
        /// Arguments for `gateway run`, after `--`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Install the test prerequisites, check formatting and lints, build,
    /// and run the whole test suite (root only).
    Test {
        /// Extra `cargo test` arguments, after `--` (a second `--` starts
        /// the arguments for the test binaries).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then install the binary (PREFIX/bin), the systemd units
    /// (/etc/systemd/system), the example drop-ins (PREFIX/share/gateway)
    /// and a commented default config (/etc/gateway/gateway.toml, never
    /// overwritten); reloads systemd where it runs.
    Install(install::Args),
    /// wrk against nginx in a network namespace, direct and through the
    /// gateway, in one run (root only).
    Bench(bench::Args),
}

fn main() {
    util::ensure_sbin_on_path();
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli.command) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(task: Task) -> Result<()> {
    match task {
        Task::BuildEbpf => ebpf::build_ebpf(),
        Task::Build => build(),
        Task::Run { args } => run(args),
        Task::Test { args } => test(args),
        Task::Install(args) => install::install(&args),
        Task::Bench(args) => bench::bench(&args),
    }
}

/// The eBPF object first: `gateway/build.rs` embeds it.
pub fn build() -> Result<()> {
    ebpf::build_ebpf()?;
    util::run(cargo().args(["build", "--release", "-p", "gateway", "--bins"]))?;
    util::run(cargo().args(["build", "--release", "-p", "gateway-tests", "--bins"]))?;
    say(format!("daemon: {}", util::gateway_bin().display()));
    Ok(())
}

fn run(args: Vec<OsString>) -> Result<()> {
    util::require_root("run")?;
    build()?;
    let mut cmd = Command::new(util::gateway_bin());
    cmd.arg("run").args(args);
    say(format!("$ {}", util::show(&cmd)));
    // Replaces this process, so signals and the exit status are the daemon's.
    let err = cmd.exec();
    bail!("cannot start {}: {err}", util::gateway_bin().display())
}

fn test(extra: Vec<String>) -> Result<()> {
    util::require_root("test")?;
    prereqs::ensure(prereqs::TEST)?;
    util::ensure_bpffs()?;

    // Cheap checks first, so a formatting slip fails in seconds.
    util::run(cargo().args(["fmt", "--all", "--check"]))?;
    // The object before clippy, so `gateway/build.rs` finds it.
    ebpf::build_ebpf()?;
    util::run(cargo().args([
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    build()?;

    util::run(
        cargo()
            .args(test_args(&extra))
            .env("GATEWAY_BIN", util::gateway_bin())
            .env_remove("GATEWAY_EBPF_OBJ"),
    )
}

/// `cargo test --release --workspace --exclude gateway-ebpf [CARGO ARGS] --
/// --test-threads=2 [TEST ARGS]`; `--workspace` goes when the caller picks
/// packages, and their own `--test-threads` wins.
fn test_args(extra: &[String]) -> Vec<String> {
    let (cargo_args, bin_args) = match extra.iter().position(|a| a == "--") {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[][..]),
    };
    // Every test binary runs even when an earlier one fails, so one red
    // report shows everything that is broken.
    let mut args: Vec<String> = vec!["test".into(), "--release".into(), "--no-fail-fast".into()];
    let picks_packages = cargo_args
        .iter()
        .any(|a| a.starts_with("-p") || a.starts_with("--package"));
    if !picks_packages {
        // The eBPF crate only builds for the BPF target; its test harness
        // cannot link on the host.
        args.extend([
            "--workspace".into(),
            "--exclude".into(),
            "gateway-ebpf".into(),
        ]);
    }
    args.extend(cargo_args.iter().cloned());
    args.push("--".into());
    if !bin_args.iter().any(|a| a.starts_with("--test-threads")) {
        args.push("--test-threads=2".into());
    }
    args.extend(bin_args.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use super::test_args;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn cargo_test_arguments() {
        const ALL: &[&str] = &[
            "test",
            "--release",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "gateway-ebpf",
        ];
        let with = |rest: &[&str]| s(&[ALL, rest].concat());
        assert_eq!(test_args(&[]), with(&["--", "--test-threads=2"]));
        assert_eq!(
            test_args(&s(&["redirect"])),
            with(&["redirect", "--", "--test-threads=2"])
        );
        assert_eq!(
            test_args(&s(&["--", "--test-threads=1"])),
            with(&["--", "--test-threads=1"])
        );
        assert_eq!(
            test_args(&s(&["-p", "gateway-tests", "--", "--nocapture"])),
            s(&[
                "test",
                "--release",
                "--no-fail-fast",
                "-p",
                "gateway-tests",
                "--",
                "--test-threads=2",
                "--nocapture"
            ])
        );
    }
}
