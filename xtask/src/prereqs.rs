//! Machine prerequisites of the test suite and the benchmark, installed when
//! missing. Adding one is one line in [`TEST`].

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::util::{self, say};

/// How to tell that a prerequisite is present.
#[derive(Clone, Copy, Debug)]
pub enum Check {
    /// An executable on PATH.
    Bin(&'static str),
    /// An npm project directory (relative to the workspace root) whose
    /// `node_modules` is installed and not older than its `package-lock.json`.
    NpmTree(&'static str),
}

/// Who installs the package when the check fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installer {
    /// `apt-get install -y --no-install-recommends PACKAGE`
    Apt,
    /// `npm ci --prefix <workspace>/PACKAGE`: PACKAGE is an npm project
    /// directory with a `package-lock.json`.
    NpmCi,
}

use Check::*;
use Installer::*;

/// (check, package, installer): what `cargo xtask test` needs.
pub const TEST: &[(Check, &str, Installer)] = &[
    (Bin("ip"), "iproute2", Apt),
    (Bin("nginx"), "nginx", Apt),
    (Bin("wrk"), "wrk", Apt),
    (Bin("bpftool"), "bpftool", Apt),
    (Bin("dig"), "dnsutils", Apt),
    (Bin("curl"), "curl", Apt),
    (Bin("ps"), "procps", Apt),
    // `gateway ca trust --nssdb` puts the CA into NSS databases with it.
    (Bin("certutil"), "libnss3-tools", Apt),
    // Real headless Chromium for the interception tests (no proxy flags).
    (Bin("chromium"), "chromium", Apt),
    // The benchmark's peer: mitmproxy in transparent mode, behind iptables.
    (Bin("mitmdump"), "mitmproxy", Apt),
    (Bin("iptables"), "iptables", Apt),
    // The audit tests start their own systemd-journald (and read it back
    // with journalctl); the unit tests run systemd-analyze verify.
    (Bin("journalctl"), "systemd", Apt),
    (Bin("systemd-analyze"), "systemd", Apt),
    // The unit's capability set is tried under setpriv.
    (Bin("setpriv"), "util-linux", Apt),
    // The OpenID provider the identity tests run (npm `oidc-provider`).
    (NpmTree("tests/oidc"), "tests/oidc", NpmCi),
];

/// The part of [`TEST`] that `cargo xtask bench` needs.
pub fn bench() -> Vec<(Check, &'static str, Installer)> {
    TEST.iter()
        .copied()
        .filter(|(_, pkg, _)| ["iproute2", "nginx", "wrk", "mitmproxy", "iptables"].contains(pkg))
        .collect()
}

impl Check {
    fn present(self) -> bool {
        match self {
            Bin(name) => util::which(name).is_some(),
            NpmTree(dir) => npm_tree_current(&util::root_dir().join(dir)),
        }
    }

    fn describe(self) -> String {
        match self {
            Bin(name) => format!("`{name}`"),
            NpmTree(dir) => format!("npm packages of {dir}"),
        }
    }
}

/// Installs the packages whose check fails, then checks again.
pub fn ensure(list: &[(Check, &str, Installer)]) -> Result<()> {
    let missing: Vec<_> = list.iter().filter(|(check, ..)| !check.present()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for installer in [Apt, NpmCi] {
        let packages: Vec<&str> = missing
            .iter()
            .filter(|(.., i)| *i == installer)
            .map(|(_, pkg, _)| *pkg)
            .collect();
        if packages.is_empty() {
            continue;
        }
        let what: Vec<String> = missing
            .iter()
            .filter(|(.., i)| *i == installer)
            .map(|(check, pkg, _)| format!("{} ({pkg})", check.describe()))
            .collect();
        say(format!("missing: {}; installing", what.join(", ")));
        match installer {
            Apt => apt_install(&packages)?,
            NpmCi => npm_ci(&packages)?,
        }
    }
    let still: Vec<String> = list
        .iter()
        .filter(|(check, ..)| !check.present())
        .map(|(check, pkg, _)| format!("{} (package {pkg})", check.describe()))
        .collect();
    if !still.is_empty() {
        bail!("still missing after installing: {}", still.join(", "));
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let install = || {
        util::run(
            apt_get()
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages),
        )
    };
    if install().is_ok() {
        return Ok(());
    }
    say("apt-get install failed; updating the package lists and trying once more");
    util::run(apt_get().arg("update"))?;
    install()
}

/// npm records what it installed in `node_modules/.package-lock.json`; a
/// lockfile changed since then means the tree is stale.
fn npm_tree_current(dir: &Path) -> bool {
    let mtime = |p: PathBuf| fs::metadata(p).and_then(|m| m.modified()).ok();
    match (
        mtime(dir.join("node_modules/.package-lock.json")),
        mtime(dir.join("package-lock.json")),
    ) {
        (Some(installed), Some(lock)) => installed >= lock,
        _ => false,
    }
}

fn npm_ci(dirs: &[&str]) -> Result<()> {
    if util::which("npm").is_none() {
        bail!(
            "npm (Node.js 20 or newer) is needed to install the npm packages of {}",
            dirs.join(", ")
        );
    }
    for dir in dirs {
        util::run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--prefix"])
                .arg(util::root_dir().join(dir)),
        )?;
    }
    Ok(())
}
