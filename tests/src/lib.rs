//! Harness for the gateway's end-to-end tests: real network namespaces with
//! origin servers in them, a real daemon attached to a real cgroup, and a
//! probe binary (`gw-probe`) that plays the client and reports what a user
//! would see (errno, bytes, getpeername) as one JSON line.
//!
//! Everything a test creates carries a per-run unique name and is removed on
//! `Drop`, so a crashed run cannot break the next one.

pub mod cgroup;
pub mod chromium;
pub mod daemon;
pub mod dns;
pub mod errno;
pub mod hook;
pub mod journal;
pub mod jsonlog;
pub mod net;
pub mod oidc;
pub mod origin;
pub mod probe;
pub mod tlsca;
pub mod web;

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use cgroup::cgroup2_mount;
pub use daemon::{Config, Daemon, Rule};
pub use jsonlog::JsonLines;
pub use net::TestNet;
pub use origin::{DnsOrigin, Origin};
pub use probe::{Probe, ProbeRun, Repl};

/// Prefix of every name the tests create (netns, cgroups, pin dirs, temp
/// dirs). `unique` appends `<pid>-<counter>-<random>`; the reaper relies on
/// that shape to find leftovers of dead runs.
pub const PREFIX: &str = "gwt";

/// The one place that decides whether the suite can run: it needs root for
/// network namespaces, cgroups and BPF. `cargo xtask test` runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "the gateway end-to-end tests need root (network namespaces, cgroups, BPF); \
         run them with `cargo xtask test` as root (euid is {euid})"
    );
    static REAP: Once = Once::new();
    REAP.call_once(reap_stale);
}

/// A name no other test, concurrent process or earlier run uses:
/// `<prefix>-<pid>-<counter>-<random hex>`.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u16 = rand::random();
    format!("{prefix}-{}-{n}-{r:04x}", std::process::id())
}

/// Absolute path of the daemon binary under test, from `GATEWAY_BIN`.
pub fn gateway_bin() -> PathBuf {
    let bin = std::env::var_os("GATEWAY_BIN").unwrap_or_else(|| {
        panic!(
            "GATEWAY_BIN is not set: run the suite with `cargo xtask test`, or set \
             GATEWAY_BIN to the absolute path of a built `gateway` binary"
        )
    });
    let bin = PathBuf::from(bin);
    assert!(
        bin.is_file(),
        "GATEWAY_BIN={} does not name a file; build it with `cargo build --release -p gateway`",
        bin.display()
    );
    bin
}

/// Poll `f` until it returns `Some`, or give up at the deadline.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Back-off between polls of external state; never a synchronisation
        // point by itself.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(unique(PREFIX));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The pid encoded in a name made by `unique(PREFIX)`, if it has that shape.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    let mut parts = rest.split('-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    let r = parts.next()?;
    (r.len() == 4 && u16::from_str_radix(r, 16).is_ok() && parts.next().is_none()).then_some(pid)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove what crashed runs left behind: network namespaces, pinned programs
/// and cgroups whose creating process is gone. Only names of our exact shape
/// with a dead owner are touched.
fn reap_stale() {
    let stale = |name: &str| owner_pid(name).is_some_and(|pid| !pid_alive(pid));
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &name])
                    .status();
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            if stale(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Some(root) = cgroup::try_cgroup2_mount()
        && let Ok(dir) = std::fs::read_dir(&root)
    {
        for e in dir.flatten() {
            if stale(&e.file_name().to_string_lossy()) {
                cgroup::remove_tree(&e.path());
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for e in dir.flatten() {
            if stale(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_have_the_reapable_shape() {
        let a = unique(PREFIX);
        let b = unique(PREFIX);
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert_eq!(owner_pid("gwt-12-x-0000"), None);
        assert_eq!(owner_pid("gwt-12-3-00001"), None);
        assert_eq!(owner_pid("other-12-3-0000"), None);
    }
}
