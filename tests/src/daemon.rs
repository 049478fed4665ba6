//! The daemon under test: its config file, the running `gateway run`
//! process with its JSON event log, and the other `gateway` subcommands
//! (`exec`, `status`, `detach`) pointed at the same config.

use crate::jsonlog::{JsonLines, WaitError};
use crate::{TempDir, cgroup, gateway_bin, unique};
use serde_json::Value;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A TOML string (JSON's escaping is valid TOML for basic strings).
fn q(s: impl AsRef<str>) -> String {
    serde_json::to_string(s.as_ref()).unwrap()
}

fn q_list<S: AsRef<str>>(items: &[S]) -> String {
    let items: Vec<String> = items.iter().map(q).collect();
    format!("[{}]", items.join(", "))
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    /// Relative to the cgroup2 mount.
    pub cgroups: Vec<String>,
    pub subject: String,
    pub duties: Vec<String>,
}

/// The daemon's config, owning the temp dir its state lives in. Every name
/// in it (pin dir, cgroups, sockets) is unique to this run.
#[derive(Debug)]
pub struct Config {
    dir: TempDir,
    pub proxy_port: u16,
    pub dns_port: u16,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub dns_upstreams: Vec<String>,
    pub udp_allow: Vec<String>,
    pub allow_foreign_netns: bool,
    pub connect_timeout_ms: u64,
    pub idle_timeout_secs: u64,
    pub identities: Vec<Identity>,
    pub policy_default: String,
}

impl Config {
    /// One identity `t1` bound to a fresh cgroup, allow-all policy, ports 0.
    pub fn new() -> Config {
        crate::require_root();
        let dir = TempDir::new();
        let state_dir = dir.path().join("state");
        let admin_socket = dir.path().join("admin.sock");
        Config {
            dir,
            proxy_port: 0,
            dns_port: 0,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(unique(crate::PREFIX)),
            state_dir,
            admin_socket,
            dns_upstreams: Vec::new(),
            udp_allow: Vec::new(),
            allow_foreign_netns: false,
            connect_timeout_ms: 5000,
            idle_timeout_secs: 300,
            identities: vec![Identity {
                name: "t1".into(),
                cgroups: vec![unique(crate::PREFIX)],
                subject: "t1@localhost".into(),
                duties: vec!["tester".into()],
            }],
            policy_default: "allow".into(),
        }
    }

    pub fn dns_upstream(mut self, upstream: impl ToString) -> Config {
        self.dns_upstreams.push(upstream.to_string());
        self
    }

    pub fn udp_allow(mut self, dest: impl ToString) -> Config {
        self.udp_allow.push(dest.to_string());
        self
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        t += "[daemon]\n";
        t += &format!("proxy_port = {}\n", self.proxy_port);
        t += &format!("dns_port = {}\n", self.dns_port);
        t += &format!("pin_dir = {}\n", q(self.pin_dir.to_string_lossy()));
        t += &format!("state_dir = {}\n", q(self.state_dir.to_string_lossy()));
        t += &format!(
            "admin_socket = {}\n",
            q(self.admin_socket.to_string_lossy())
        );
        t += &format!("dns_upstreams = {}\n", q_list(&self.dns_upstreams));
        t += &format!("udp_allow = {}\n", q_list(&self.udp_allow));
        t += &format!("allow_foreign_netns = {}\n", self.allow_foreign_netns);
        t += &format!("connect_timeout_ms = {}\n", self.connect_timeout_ms);
        t += &format!("idle_timeout_secs = {}\n", self.idle_timeout_secs);
        for id in &self.identities {
            t += "\n[[identity]]\n";
            t += &format!("name = {}\n", q(&id.name));
            t += &format!("cgroups = {}\n", q_list(&id.cgroups));
            t += &format!(
                "static = {{ subject = {}, duties = {} }}\n",
                q(&id.subject),
                q_list(&id.duties)
            );
        }
        t += "\n[policy]\nversion = 1\n";
        t += &format!("default = {}\n", q(&self.policy_default));
        t
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

/// `gateway run` in the foreground with `--log-format json`.
pub struct Daemon {
    cfg: Config,
    cfg_path: PathBuf,
    child: Option<Child>,
    log: JsonLines,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Logs of earlier runs (before `restart`), for failure reports.
    earlier: Vec<JsonLines>,
    runs: u32,
    ready: Value,
}

/// Whether `v` is the event named `name`.
pub fn is_event(v: &Value, name: &str) -> bool {
    v["event"] == name
}

/// A numeric field, whether logged as a number or as a decimal string.
pub fn num(v: &Value, key: &str) -> Option<u64> {
    match &v[key] {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A string field (numbers rendered), or "" when absent.
pub fn text(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl Daemon {
    /// Write the config, start the daemon and wait for its ready event.
    pub fn start(cfg: Config) -> Daemon {
        let cfg_path = cfg.dir().join("gateway.toml");
        std::fs::write(&cfg_path, cfg.to_toml()).expect("write daemon config");
        let mut d = Daemon {
            cfg,
            cfg_path,
            child: None,
            log: JsonLines::new(),
            reader: None,
            earlier: Vec::new(),
            runs: 0,
            ready: Value::Null,
        };
        d.spawn();
        d.wait_ready();
        d
    }

    fn stderr_path(&self, run: u32) -> PathBuf {
        self.cfg.dir().join(format!("daemon-{run}.stderr"))
    }

    fn spawn(&mut self) {
        self.runs += 1;
        let stderr = File::create(self.stderr_path(self.runs)).expect("create daemon stderr file");
        let mut child = Command::new(gateway_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.cfg_path)
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", gateway_bin().display()));
        let log = JsonLines::new();
        self.reader = Some(log.follow(child.stdout.take().unwrap()));
        let old = std::mem::replace(&mut self.log, log);
        if self.runs > 1 {
            self.earlier.push(old);
        }
        self.child = Some(child);
        self.ready = Value::Null;
    }

    /// Wait for this run's `ready` event; panics with the daemon's output
    /// if it exits or stays silent.
    pub fn wait_ready(&mut self) -> &Value {
        match self.log.wait(0, READY_TIMEOUT, |v| is_event(v, "ready")) {
            Ok(v) => self.ready = v,
            // Drop prints the daemon's output while this panic unwinds.
            Err(e) => panic!(
                "daemon not ready within {READY_TIMEOUT:?}: {}",
                match e {
                    WaitError::Closed => "it exited",
                    WaitError::TimedOut => "no ready event",
                },
            ),
        }
        &self.ready
    }

    pub fn ready_event(&self) -> &Value {
        &self.ready
    }

    pub fn proxy_port(&self) -> u16 {
        num(&self.ready, "proxy_port").expect("ready event has proxy_port") as u16
    }

    pub fn dns_port(&self) -> u16 {
        num(&self.ready, "dns_port").expect("ready event has dns_port") as u16
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn config_path(&self) -> &Path {
        &self.cfg_path
    }

    /// The current run's event log.
    pub fn log(&self) -> &JsonLines {
        &self.log
    }

    pub fn events(&self) -> Vec<Value> {
        self.log.values()
    }

    /// The first event of this run matching `pred`, waiting up to `timeout`.
    pub fn wait_event(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        self.wait_events(1, pred, timeout).swap_remove(0)
    }

    /// `n` events of this run matching `pred`, waiting up to `timeout`.
    pub fn wait_events(
        &self,
        n: usize,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Vec<Value> {
        self.log
            .wait_count(0, n, timeout, pred)
            .unwrap_or_else(|(e, found)| {
                panic!(
                    "waited {timeout:?} for {n} matching daemon events, got {} ({e:?}); last lines:\n{}",
                    found.len(),
                    self.log.tail(40)
                )
            })
    }

    /// The `connection` event of the client with this pid and original
    /// destination port.
    pub fn wait_connection(&self, pid: u64, dst_port: u16) -> Value {
        self.wait_event(
            |v| {
                is_event(v, "connection")
                    && num(v, "pid") == Some(pid)
                    && text(v, "orig_dst").ends_with(&format!(":{dst_port}"))
            },
            Duration::from_secs(10),
        )
    }

    /// `SIGKILL` the daemon and reap it. Pins stay (fail closed).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// Start the daemon again on the same config (same pin dir) and wait
    /// until it is ready.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready();
    }

    fn gateway(&self, sub: &str) -> Command {
        let mut c = Command::new(gateway_bin());
        c.arg(sub).arg("--config").arg(&self.cfg_path);
        c
    }

    /// `gateway exec --identity <identity> -- <program> <args>`.
    pub fn exec<I, S>(&self, identity: &str, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.gateway("exec");
        c.args(["--identity", identity, "--"])
            .arg(program)
            .args(args);
        c
    }

    /// `gateway status --json`, parsed.
    pub fn status_json(&self) -> Value {
        let out = self
            .gateway("status")
            .arg("--json")
            .output()
            .expect("run gateway status");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "`gateway status --json` failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("`gateway status --json` printed no JSON ({e}): {stdout}"))
    }

    /// `gateway detach`.
    pub fn detach(&self) -> Output {
        self.try_detach().expect("run gateway detach")
    }

    fn try_detach(&self) -> std::io::Result<Output> {
        self.gateway("detach").stdin(Stdio::null()).output()
    }

    /// Absolute path of an identity's first cgroup.
    pub fn identity_cgroup(&self, identity: &str) -> PathBuf {
        let id = self
            .cfg
            .identities
            .iter()
            .find(|i| i.name == identity)
            .unwrap_or_else(|| panic!("no identity {identity} in the config"));
        cgroup::cgroup2_mount().join(&id.cgroups[0])
    }

    /// Move a running process into a fresh child cgroup of the identity's
    /// cgroup by writing `cgroup.procs`, the way a service manager places a
    /// runner, not through `gateway exec`. Returns the cgroup as the kernel
    /// names it (`/<identity cgroup>/<child>`).
    pub fn move_into(&self, identity: &str, pid: u32) -> String {
        let parent = self.identity_cgroup(identity);
        let child = parent.join(unique("moved"));
        std::fs::create_dir(&child)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", child.display()));
        std::fs::write(child.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move pid {pid} into {}: {e}", child.display()));
        let root = cgroup::cgroup2_mount();
        format!("/{}", child.strip_prefix(&root).unwrap().display())
    }

    /// The daemon's stderr and the tail of its stdout, every run.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for run in 1..=self.runs {
            let err = std::fs::read_to_string(self.stderr_path(run)).unwrap_or_default();
            let lines: Vec<&str> = err.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            s += &format!("--- daemon run {run} stderr (last 60 lines) ---\n{tail}\n");
        }
        for (i, l) in self.earlier.iter().enumerate() {
            s += &format!(
                "--- daemon run {} stdout (last 40 lines) ---\n{}\n",
                i + 1,
                l.tail(40)
            );
        }
        s += &format!(
            "--- daemon run {} stdout (last 40 lines) ---\n{}\n",
            self.runs,
            self.log.tail(40)
        );
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // GATEWAY_TESTS_VERBOSE=1 shows the daemon's output for passing
        // tests too.
        if std::thread::panicking() || std::env::var_os("GATEWAY_TESTS_VERBOSE").is_some() {
            eprintln!("{}", self.diagnostics());
        }
        self.kill9();
        match self.try_detach() {
            Ok(out) if !out.status.success() => eprintln!(
                "gateway-tests: `gateway detach` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("gateway-tests: cannot run `gateway detach`: {e}"),
            Ok(_) => {}
        }
        if let Some(root) = cgroup::try_cgroup2_mount() {
            for id in &self.cfg.identities {
                for cg in &id.cgroups {
                    cgroup::remove_tree(&root.join(cg));
                }
            }
        }
        // Whatever detach left (it should have left nothing) goes too.
        let _ = std::fs::remove_dir_all(&self.cfg.pin_dir);
    }
}
