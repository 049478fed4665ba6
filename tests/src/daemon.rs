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

/// An identity whose subject and duties come from an OpenID provider
/// (`client_credentials = {...}` or `enrolled = {...}` in the config).
#[derive(Debug, Clone)]
pub struct OidcIdentity {
    pub name: String,
    /// Relative to the cgroup2 mount.
    pub cgroups: Vec<String>,
    pub source: OidcSource,
    /// `groups_claim`; the daemon's default (`groups`) when `None`.
    pub groups_claim: Option<String>,
    /// `duty_mapping`: claim value → duties; empty: values are duties as-is.
    pub duty_mapping: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Clone)]
pub enum OidcSource {
    /// The daemon gets its own tokens for this client.
    ClientCredentials {
        issuer: String,
        client_id: String,
        client_secret_file: PathBuf,
        audience: Option<String>,
        scopes: Vec<String>,
    },
    /// Job cgroups below get the identity of the token they enroll with;
    /// `issuers` empty: any trusted issuer.
    Enrolled { issuers: Vec<String> },
}

/// A `[[trusted_issuer]]`: verifies enrolled job tokens.
#[derive(Debug, Clone)]
pub struct TrustedIssuer {
    pub issuer: String,
    pub audiences: Vec<String>,
    /// Empty: the daemon's default allow-list.
    pub algorithms: Vec<String>,
}

/// A `[[policy.rule]]`. Empty lists are left out (match anything).
#[derive(Debug, Clone, Default)]
pub struct Rule {
    pub id: String,
    /// `allow`, `block` or `approve`.
    pub action: String,
    pub identities: Vec<String>,
    pub duties: Vec<String>,
    /// claim name → accepted values.
    pub claims: Vec<(String, Vec<String>)>,
    pub hosts: Vec<String>,
    pub ips: Vec<String>,
    /// `"20001"` or `"20002-20010"`.
    pub ports: Vec<String>,
    /// HTTP methods, e.g. `GET`.
    pub methods: Vec<String>,
    /// Path globs, e.g. `/v1/charges/**`.
    pub paths: Vec<String>,
    /// Header name → value glob (`*`: present).
    pub headers: Vec<(String, String)>,
    /// `mask` items as TOML, e.g. `"email"` (quoted) or `{ json = "$.a" }`;
    /// [`Rule::mask_detector`], [`Rule::mask_json`] and
    /// [`Rule::mask_regex`] write them.
    pub mask: Vec<String>,
    /// `inject = { header, secret }`: (header, secret name).
    pub inject: Option<(String, String)>,
    /// `approvers` of an `approve` rule: duties that may approve.
    pub approvers: Vec<String>,
}

impl Rule {
    pub fn new(id: &str, action: &str) -> Rule {
        Rule {
            id: id.into(),
            action: action.into(),
            ..Rule::default()
        }
    }

    /// Adds a built-in mask detector (`email`, `credit_card`, ...).
    pub fn mask_detector(mut self, name: &str) -> Rule {
        self.mask.push(q(name));
        self
    }

    /// Adds a JSON field selector, e.g. `$.customer.tax_id`.
    pub fn mask_json(mut self, path: &str) -> Rule {
        self.mask.push(format!("{{ json = {} }}", q(path)));
        self
    }

    /// Adds a custom regex masked as `[MASKED:<name>]`.
    pub fn mask_regex(mut self, regex: &str, name: &str) -> Rule {
        self.mask
            .push(format!("{{ regex = {}, name = {} }}", q(regex), q(name)));
        self
    }

    /// Sets `inject = { header, secret }`.
    pub fn inject(mut self, header: &str, secret: &str) -> Rule {
        self.inject = Some((header.into(), secret.into()));
        self
    }

    fn to_toml(&self) -> String {
        let mut t = String::from("\n[[policy.rule]]\n");
        t += &format!("id = {}\n", q(&self.id));
        let lists = [
            ("identities", &self.identities),
            ("duties", &self.duties),
            ("hosts", &self.hosts),
            ("ips", &self.ips),
            ("methods", &self.methods),
            ("paths", &self.paths),
            ("approvers", &self.approvers),
        ];
        for (key, list) in lists {
            if !list.is_empty() {
                t += &format!("{key} = {}\n", q_list(list));
            }
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self
                .ports
                .iter()
                .map(|p| match p.parse::<u16>() {
                    Ok(n) => n.to_string(),
                    Err(_) => q(p),
                })
                .collect();
            t += &format!("ports = [{}]\n", ports.join(", "));
        }
        if !self.claims.is_empty() {
            t += &format!("claims = {}\n", q_map(&self.claims));
        }
        if !self.headers.is_empty() {
            let items: Vec<String> = self
                .headers
                .iter()
                .map(|(k, v)| format!("{} = {}", q(k), q(v)))
                .collect();
            t += &format!("headers = {{ {} }}\n", items.join(", "));
        }
        if !self.mask.is_empty() {
            t += &format!("mask = [{}]\n", self.mask.join(", "));
        }
        if let Some((header, secret)) = &self.inject {
            t += &format!(
                "inject = {{ header = {}, secret = {} }}\n",
                q(header),
                q(secret)
            );
        }
        t += &format!("action = {}\n", q(&self.action));
        t
    }
}

/// `[approvals]`, with `[approvals.api]` and `[approvals.webhook]`. `None`
/// fields are left out (the daemon's defaults).
#[derive(Debug, Clone, Default)]
pub struct Approvals {
    pub timeout_secs: Option<u64>,
    pub max_window_minutes: Option<u64>,
    /// Issuers whose tokens may approve; empty: every trusted issuer.
    pub issuers: Vec<String>,
    pub groups_claim: Option<String>,
    pub preview_bytes: Option<u64>,
    pub max_pending: Option<u64>,
    /// `[approvals.api] listen`, e.g. `127.0.0.1:0`.
    pub api_listen: Option<String>,
    pub webhook: Option<Webhook>,
}

/// `[approvals.webhook]`.
#[derive(Debug, Clone, Default)]
pub struct Webhook {
    pub url: String,
    pub timeout_ms: Option<u64>,
    pub retries: Option<u32>,
}

impl Approvals {
    fn to_toml(&self) -> String {
        let mut t = String::from("\n[approvals]\n");
        let numbers = [
            ("timeout_secs", self.timeout_secs),
            ("max_window_minutes", self.max_window_minutes),
            ("preview_bytes", self.preview_bytes),
            ("max_pending", self.max_pending),
        ];
        for (key, value) in numbers {
            if let Some(v) = value {
                t += &format!("{key} = {v}\n");
            }
        }
        if !self.issuers.is_empty() {
            t += &format!("issuers = {}\n", q_list(&self.issuers));
        }
        if let Some(claim) = &self.groups_claim {
            t += &format!("groups_claim = {}\n", q(claim));
        }
        if let Some(listen) = &self.api_listen {
            t += &format!("\n[approvals.api]\nlisten = {}\n", q(listen));
        }
        if let Some(w) = &self.webhook {
            t += &format!("\n[approvals.webhook]\nurl = {}\n", q(&w.url));
            if let Some(ms) = w.timeout_ms {
                t += &format!("timeout_ms = {ms}\n");
            }
            if let Some(n) = w.retries {
                t += &format!("retries = {n}\n");
            }
        }
        t
    }
}

/// `[sessions]` (session recordings). `None` fields are left out (the
/// daemon's defaults).
#[derive(Debug, Clone, Default)]
pub struct Sessions {
    pub enabled: Option<bool>,
    pub dir: Option<PathBuf>,
    pub body_cap_bytes: Option<u64>,
    pub max_age_days: Option<u64>,
    pub max_total_mb: Option<u64>,
}

impl Sessions {
    fn to_toml(&self) -> String {
        let mut t = String::from("\n[sessions]\n");
        if let Some(b) = self.enabled {
            t += &format!("enabled = {b}\n");
        }
        if let Some(d) = &self.dir {
            t += &format!("dir = {}\n", q(d.to_string_lossy()));
        }
        let numbers = [
            ("body_cap_bytes", self.body_cap_bytes),
            ("max_age_days", self.max_age_days),
            ("max_total_mb", self.max_total_mb),
        ];
        for (key, value) in numbers {
            if let Some(v) = value {
                t += &format!("{key} = {v}\n");
            }
        }
        t
    }
}

/// An inline table of string lists, `{ "k" = ["v"] }`.
fn q_map(entries: &[(String, Vec<String>)]) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{} = {}", q(k), q_list(v)))
        .collect();
    format!("{{ {} }}", items.join(", "))
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
    /// `daemon.jwks_min_refetch_secs`; the daemon's default when `None`.
    pub jwks_min_refetch_secs: Option<u64>,
    /// `daemon.fast_path`; the daemon's default when `None`.
    pub fast_path: Option<bool>,
    /// `[sessions]`; left out (the daemon's defaults) when `None`.
    pub sessions: Option<Sessions>,
    pub trusted_issuers: Vec<TrustedIssuer>,
    /// Identities backed by an OpenID provider, after the static ones.
    pub oidc_identities: Vec<OidcIdentity>,
    /// `[[policy.rule]]`s in order (first match decides).
    pub rules: Vec<Rule>,
    /// `[[secret]]`s: (name, file holding the value).
    pub secrets: Vec<(String, PathBuf)>,
    /// `interception.upstream_ca_files` (PEM CAs trusted for upstream TLS).
    pub interception_cas: Vec<PathBuf>,
    /// `interception.max_decoded_bytes`; the daemon's default when `None`.
    pub max_decoded_bytes: Option<u64>,
    /// `[approvals]`; left out (the daemon's defaults) when `None`.
    pub approvals: Option<Approvals>,
    /// `[audit]`; left out (the daemon's defaults) when `None`.
    pub audit: Option<Audit>,
}

/// `[audit]`. `None` fields are left out (the daemon's defaults).
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// `"auto"`, `"on"` or `"off"`.
    pub journal: Option<String>,
    pub journal_socket: Option<PathBuf>,
    pub stderr: Option<bool>,
    pub spool_max_bytes: Option<u64>,
}

impl Audit {
    fn to_toml(&self) -> String {
        let mut t = String::from("\n[audit]\n");
        if let Some(j) = &self.journal {
            t += &format!("journal = {}\n", q(j));
        }
        if let Some(p) = &self.journal_socket {
            t += &format!("journal_socket = {}\n", q(p.to_string_lossy()));
        }
        if let Some(b) = self.stderr {
            t += &format!("stderr = {b}\n");
        }
        if let Some(n) = self.spool_max_bytes {
            t += &format!("spool_max_bytes = {n}\n");
        }
        t
    }
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
            jwks_min_refetch_secs: None,
            fast_path: None,
            sessions: None,
            trusted_issuers: Vec::new(),
            oidc_identities: Vec::new(),
            rules: Vec::new(),
            secrets: Vec::new(),
            interception_cas: Vec::new(),
            max_decoded_bytes: None,
            approvals: None,
            audit: None,
        }
    }

    /// `[audit] journal = "on"` with this native-protocol socket (a test's
    /// own journald, see [`crate::journal::Journal`]).
    pub fn journal(mut self, socket: impl Into<PathBuf>) -> Config {
        let a = self.audit.get_or_insert_with(Audit::default);
        a.journal = Some("on".into());
        a.journal_socket = Some(socket.into());
        self
    }

    /// `[audit] stderr`: whether audit events are also on the daemon's log.
    pub fn audit_stderr(mut self, on: bool) -> Config {
        self.audit.get_or_insert_with(Audit::default).stderr = Some(on);
        self
    }

    /// `[audit] spool_max_bytes`.
    pub fn spool_max_bytes(mut self, n: u64) -> Config {
        self.audit
            .get_or_insert_with(Audit::default)
            .spool_max_bytes = Some(n);
        self
    }

    /// A `[[secret]]` read from `file` (written by the test).
    pub fn secret(mut self, name: &str, file: impl Into<PathBuf>) -> Config {
        self.secrets.push((name.into(), file.into()));
        self
    }

    /// A `[[secret]]` whose value the harness writes to a file in the
    /// config dir.
    pub fn secret_value(self, name: &str, value: &str) -> Config {
        let file = self.dir().join(format!("secret-{name}"));
        std::fs::write(&file, value).expect("write secret file");
        self.secret(name, file)
    }

    /// Trust this PEM CA for upstream TLS (`interception.upstream_ca_files`).
    pub fn interception_ca(mut self, path: impl Into<PathBuf>) -> Config {
        self.interception_cas.push(path.into());
        self
    }

    /// Add a client-credentials identity `name` bound to a fresh cgroup; the
    /// secret goes to a file in the config dir (`client_secret_file`).
    pub fn client_credentials_identity(
        mut self,
        name: &str,
        issuer: &str,
        client_id: &str,
        client_secret: &str,
        audience: Option<&str>,
    ) -> Config {
        let secret_file = self.dir().join(format!("{name}.secret"));
        std::fs::write(&secret_file, client_secret).expect("write client secret file");
        self.oidc_identities.push(OidcIdentity {
            name: name.into(),
            cgroups: vec![unique(crate::PREFIX)],
            source: OidcSource::ClientCredentials {
                issuer: issuer.into(),
                client_id: client_id.into(),
                client_secret_file: secret_file,
                audience: audience.map(Into::into),
                scopes: Vec::new(),
            },
            groups_claim: None,
            duty_mapping: Vec::new(),
        });
        self
    }

    /// Add an identity `name` for enrolled job tokens, bound to a fresh
    /// cgroup; `issuers` empty: any trusted issuer.
    pub fn enrolled_identity(mut self, name: &str, issuers: &[&str]) -> Config {
        self.oidc_identities.push(OidcIdentity {
            name: name.into(),
            cgroups: vec![unique(crate::PREFIX)],
            source: OidcSource::Enrolled {
                issuers: issuers.iter().map(|i| i.to_string()).collect(),
            },
            groups_claim: None,
            duty_mapping: Vec::new(),
        });
        self
    }

    pub fn trusted_issuer(mut self, issuer: &str, audiences: &[&str]) -> Config {
        self.trusted_issuers.push(TrustedIssuer {
            issuer: issuer.into(),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            algorithms: Vec::new(),
        });
        self
    }

    pub fn rule(mut self, rule: Rule) -> Config {
        self.rules.push(rule);
        self
    }

    /// Every configured cgroup (static and OIDC identities) with its
    /// identity's name.
    pub fn cgroups(&self) -> Vec<(&str, &str)> {
        let fixed = self
            .identities
            .iter()
            .flat_map(|i| i.cgroups.iter().map(move |c| (i.name.as_str(), c.as_str())));
        let oidc = self
            .oidc_identities
            .iter()
            .flat_map(|i| i.cgroups.iter().map(move |c| (i.name.as_str(), c.as_str())));
        fixed.chain(oidc).collect()
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
        if let Some(secs) = self.jwks_min_refetch_secs {
            t += &format!("jwks_min_refetch_secs = {secs}\n");
        }
        if let Some(fast) = self.fast_path {
            t += &format!("fast_path = {fast}\n");
        }
        for ti in &self.trusted_issuers {
            t += "\n[[trusted_issuer]]\n";
            t += &format!("issuer = {}\n", q(&ti.issuer));
            t += &format!("audiences = {}\n", q_list(&ti.audiences));
            if !ti.algorithms.is_empty() {
                t += &format!("algorithms = {}\n", q_list(&ti.algorithms));
            }
        }
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
        for id in &self.oidc_identities {
            t += "\n[[identity]]\n";
            t += &format!("name = {}\n", q(&id.name));
            t += &format!("cgroups = {}\n", q_list(&id.cgroups));
            match &id.source {
                OidcSource::ClientCredentials {
                    issuer,
                    client_id,
                    client_secret_file,
                    audience,
                    scopes,
                } => {
                    let audience = audience
                        .as_ref()
                        .map(|a| format!(", audience = {}", q(a)))
                        .unwrap_or_default();
                    t += &format!(
                        "client_credentials = {{ issuer = {}, client_id = {}, client_secret_file = {}, scopes = {}{audience} }}\n",
                        q(issuer),
                        q(client_id),
                        q(client_secret_file.to_string_lossy()),
                        q_list(scopes),
                    );
                }
                OidcSource::Enrolled { issuers } => {
                    t += &format!("enrolled = {{ issuers = {} }}\n", q_list(issuers));
                }
            }
            if let Some(claim) = &id.groups_claim {
                t += &format!("groups_claim = {}\n", q(claim));
            }
            if !id.duty_mapping.is_empty() {
                t += &format!("duty_mapping = {}\n", q_map(&id.duty_mapping));
            }
        }
        for (name, file) in &self.secrets {
            t += "\n[[secret]]\n";
            t += &format!("name = {}\n", q(name));
            t += &format!("file = {}\n", q(file.to_string_lossy()));
        }
        if !self.interception_cas.is_empty() || self.max_decoded_bytes.is_some() {
            let files: Vec<String> = self
                .interception_cas
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            t += "\n[interception]\n";
            t += &format!("upstream_ca_files = {}\n", q_list(&files));
            if let Some(max) = self.max_decoded_bytes {
                t += &format!("max_decoded_bytes = {max}\n");
            }
        }
        if let Some(s) = &self.sessions {
            t += &s.to_toml();
        }
        if let Some(a) = &self.approvals {
            t += &a.to_toml();
        }
        if let Some(a) = &self.audit {
            t += &a.to_toml();
        }
        t += "\n[policy]\nversion = 1\n";
        t += &format!("default = {}\n", q(&self.policy_default));
        for rule in &self.rules {
            t += &rule.to_toml();
        }
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

    /// `SIGTERM`, the way systemd stops it, and wait until it has exited
    /// and its log is read to the end; returns its exit status. Pins stay.
    /// Panics (after a `SIGKILL`) if it does not exit within 30 s.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: plain kill(2) on our own child, not yet reaped.
        let r = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(r, 0, "SIGTERM to the daemon failed");
        let status = crate::poll(READY_TIMEOUT, || child.try_wait().ok().flatten());
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon did not exit within {READY_TIMEOUT:?} of SIGTERM");
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        status
    }

    /// Start the daemon again after [`Daemon::kill9`] or
    /// [`Daemon::terminate`] (same config, same pin dir); waits until it is
    /// ready. The earlier run's log stays readable in the diagnostics.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.spawn();
        self.wait_ready();
    }

    /// SIGHUP: the daemon re-reads its config file.
    pub fn reload(&self) {
        let pid = self.child.as_ref().expect("daemon running").id();
        // SAFETY: plain kill(2) on our own child.
        let r = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        assert_eq!(r, 0, "SIGHUP to the daemon failed");
    }

    /// `gateway <sub> --config <this daemon's config>`.
    pub fn gateway(&self, sub: &str) -> Command {
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

    /// `gateway enroll --cgroup <cgroup> --token-file <token_file>`, run
    /// by the test itself (outside every tagged cgroup).
    pub fn enroll(&self, cgroup: &str, token_file: &Path) -> Command {
        let mut c = self.gateway("enroll");
        c.args(["--cgroup", cgroup])
            .arg("--token-file")
            .arg(token_file);
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
        let (_, first) = self
            .cfg
            .cgroups()
            .into_iter()
            .find(|(name, _)| *name == identity)
            .unwrap_or_else(|| panic!("no identity {identity} in the config"));
        cgroup::cgroup2_mount().join(first)
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

    /// Everything the daemon wrote, every run: stderr and stdout, whole.
    /// For checks that something (a secret, a token) never appears.
    pub fn all_output(&self) -> String {
        let mut s = String::new();
        for run in 1..=self.runs {
            s += &std::fs::read_to_string(self.stderr_path(run)).unwrap_or_default();
            s.push('\n');
        }
        for l in self.earlier.iter().chain(std::iter::once(&self.log)) {
            s += &l.tail(usize::MAX);
            s.push('\n');
        }
        s
    }

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
            for (_, cg) in self.cfg.cgroups() {
                cgroup::remove_tree(&root.join(cg));
            }
        }
        // Whatever detach left (it should have left nothing) goes too.
        let _ = std::fs::remove_dir_all(&self.cfg.pin_dir);
    }
}
