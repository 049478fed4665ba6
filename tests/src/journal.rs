//! A real systemd-journald of the test's own: `systemd-journald NS` runs
//! standalone (no systemd as PID 1 needed) as the journal namespace `NS`,
//! listens on `/run/systemd/journal.NS/socket` and stores under
//! `/var/log/journal/<machine-id>.NS`; `journalctl --namespace=NS` reads it.
//! Compression is off (`/etc/systemd/journald@NS.conf`), so the raw files
//! can be searched byte by byte. Drop stops it and removes all of it.

use crate::{PREFIX, poll, unique};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const JOURNALD: &str = "/lib/systemd/systemd-journald";
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// One journald namespace, started by the test.
pub struct Journal {
    ns: String,
    child: Option<Child>,
    conf: PathBuf,
}

impl Journal {
    /// Start a journald for a fresh namespace and wait for its socket.
    pub fn start() -> Journal {
        crate::require_root();
        reap_stale();
        let ns = unique(PREFIX);
        let conf = PathBuf::from(format!("/etc/systemd/journald@{ns}.conf"));
        std::fs::write(
            &conf,
            "[Journal]\nStorage=persistent\nCompress=no\nRateLimitBurst=0\nSplitMode=none\n",
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        let mut j = Journal {
            ns,
            child: None,
            conf,
        };
        j.spawn();
        j
    }

    fn spawn(&mut self) {
        assert!(
            Path::new(JOURNALD).exists(),
            "{JOURNALD} is missing: install systemd (apt-get install systemd)"
        );
        // A socket left by a killed journald would look ready.
        let _ = std::fs::remove_file(self.socket());
        let child = Command::new(JOURNALD)
            .arg(&self.ns)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {JOURNALD} {}: {e}", self.ns));
        self.child = Some(child);
        let socket = self.socket();
        poll(START_TIMEOUT, || socket.exists().then_some(())).unwrap_or_else(|| {
            panic!(
                "journald for namespace {} did not create {} within {START_TIMEOUT:?}",
                self.ns,
                socket.display()
            )
        });
    }

    /// The namespace name (`journalctl --namespace`).
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The native-protocol socket (`[audit] journal_socket`).
    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("socket")
    }

    fn run_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/systemd/journal.{}", self.ns))
    }

    /// The directories holding this namespace's journal files.
    pub fn storage_dirs(&self) -> Vec<PathBuf> {
        let suffix = format!(".{}", self.ns);
        let mut dirs = Vec::new();
        for root in ["/var/log/journal", "/run/log/journal"] {
            if let Ok(rd) = std::fs::read_dir(root) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().ends_with(&suffix) {
                        dirs.push(e.path());
                    }
                }
            }
        }
        dirs
    }

    /// Every byte of every journal file of this namespace.
    pub fn raw_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for d in self.storage_dirs() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if let Ok(b) = std::fs::read(e.path()) {
                    all.extend_from_slice(&b);
                }
            }
        }
        all
    }

    /// Kill journald (SIGKILL, like a crash); its socket file stays behind,
    /// so senders get `ECONNREFUSED`.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start journald again after [`Journal::stop`]: same namespace, same
    /// files.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "journald is still running");
        self.spawn();
    }

    /// `journalctl --namespace=NS <args> -o json --all --no-pager`, parsed.
    pub fn journalctl(&self, args: &[&str]) -> Vec<Value> {
        let out = Command::new("journalctl")
            .arg(format!("--namespace={}", self.ns))
            .args(args)
            .args(["-o", "json", "--all", "--no-pager", "-q"])
            .output()
            .expect("run journalctl");
        assert!(
            out.status.success(),
            "journalctl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("journalctl line {l:?}: {e}"))
            })
            .collect()
    }

    /// The audit entries (`-t gateway-audit`).
    pub fn entries(&self) -> Vec<Value> {
        self.journalctl(&["-t", "gateway-audit"])
    }

    /// Every entry of the namespace.
    pub fn all_entries(&self) -> Vec<Value> {
        self.journalctl(&[])
    }

    /// The raw `journalctl -t gateway-audit -o json` text (for export).
    pub fn export(&self) -> String {
        let out = Command::new("journalctl")
            .arg(format!("--namespace={}", self.ns))
            .args(["-t", "gateway-audit", "-o", "json", "--no-pager", "-q"])
            .output()
            .expect("run journalctl");
        assert!(out.status.success(), "journalctl failed");
        String::from_utf8(out.stdout).expect("journalctl prints UTF-8 JSON")
    }

    /// Waits until at least `n` audit entries match `pred`; returns them.
    pub fn wait_entries(
        &self,
        n: usize,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Vec<Value> {
        let mut last = Vec::new();
        poll(timeout, || {
            last = self.entries();
            let found: Vec<Value> = last.iter().filter(|v| pred(v)).cloned().collect();
            (found.len() >= n).then_some(found)
        })
        .unwrap_or_else(|| {
            let tail: Vec<String> = last
                .iter()
                .rev()
                .take(20)
                .map(|v| v["MESSAGE"].to_string())
                .collect();
            panic!(
                "waited {timeout:?} for {n} matching audit entries in journal namespace {}; {} entries, the last: {tail:#?}",
                self.ns,
                last.len()
            )
        })
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.run_dir());
        for d in self.storage_dirs() {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// Journald namespaces of dead test runs (names of the `unique` shape whose
/// owner is gone): stop their journald by pid and remove their files.
fn reap_stale() {
    let stale = |ns: &str| crate::owner_pid(ns).is_some_and(|pid| !crate::pid_alive(pid));
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.first().map(String::as_str) == Some(JOURNALD)
                && args.get(1).is_some_and(|ns| stale(ns))
            {
                // SAFETY: kill(2) on one journald of a dead test run, by pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let dirs = [
        ("/run/systemd", "journal."),
        ("/var/log/journal", ""),
        ("/run/log/journal", ""),
    ];
    for (root, prefix) in dirs {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ns = match prefix {
                "" => name.split_once('.').map(|(_, ns)| ns.to_string()),
                p => name.strip_prefix(p).map(str::to_string),
            };
            if ns.is_some_and(|ns| stale(&ns)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    for e in std::fs::read_dir("/etc/systemd")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(ns) = name
            .strip_prefix("journald@")
            .and_then(|n| n.strip_suffix(".conf"))
            && stale(ns)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
