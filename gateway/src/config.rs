//! The daemon configuration: the TOML wire format (serde structs with
//! `deny_unknown_fields`), kept apart from the validated model the rest of
//! the daemon uses. Errors name the file, line and column and say what to do.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;
use toml::Spanned;

use crate::{
    oidc::{Alg, ClientCredentials, Secret, TrustedIssuer},
    policy::{Policy, RawRule, SecretValue},
};

/// Where `gateway run` looks when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/gateway/gateway.toml";

/// Used when no config file exists: a demo cgroup bound to a static local
/// identity, allow-and-audit policy.
pub const EMBEDDED_DEFAULT: &str = include_str!("config/default.toml");

/// What went wrong reading a config, with where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

// === wire format ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default, rename = "trusted_issuer")]
    trusted_issuers: Vec<RawTrustedIssuer>,
    #[serde(default, rename = "identity")]
    identities: Vec<RawIdentity>,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default, rename = "secret")]
    secrets: Vec<RawSecret>,
    #[serde(default)]
    interception: RawInterception,
    #[serde(default)]
    approvals: RawApprovals,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    sessions: RawSessions,
}

/// `[audit]`: where audit events go.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAudit {
    journal: Option<Spanned<String>>,
    journal_socket: Option<PathBuf>,
    stderr: Option<bool>,
    spool_max_bytes: Option<Spanned<u64>>,
}

/// `[sessions]`: session recordings on disk.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSessions {
    enabled: Option<bool>,
    dir: Option<PathBuf>,
    body_cap_bytes: Option<Spanned<u64>>,
    max_age_days: Option<Spanned<u64>>,
    max_total_mb: Option<Spanned<u64>>,
}

/// `[approvals]`: how `action = "approve"` holds requests and who may
/// decide.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApprovals {
    timeout_secs: Option<Spanned<u64>>,
    max_window_minutes: Option<Spanned<u64>>,
    issuers: Vec<Spanned<String>>,
    groups_claim: Option<String>,
    duty_mapping: BTreeMap<String, Vec<String>>,
    preview_bytes: Option<Spanned<u64>>,
    max_pending: Option<Spanned<u64>>,
    api: Option<RawApprovalApi>,
    webhook: Option<RawWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovalApi {
    listen: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Spanned<String>,
    #[serde(default)]
    timeout_ms: Option<Spanned<u64>>,
    #[serde(default)]
    retries: Option<u32>,
}

/// `[[secret]]`: a value `inject` may set as a request header.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: Spanned<String>,
    file: Option<Spanned<PathBuf>>,
    /// A systemd credential (`LoadCredential=`), read from
    /// `$CREDENTIALS_DIRECTORY/<name>`.
    credential: Option<Spanned<String>>,
}

/// `[interception]`: TLS interception and HTTP inspection settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawInterception {
    upstream_ca_files: Vec<Spanned<PathBuf>>,
    system_roots: Option<bool>,
    sniff_timeout_ms: Option<Spanned<u64>>,
    max_decoded_bytes: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDaemon {
    proxy_port: u16,
    dns_port: u16,
    pin_dir: PathBuf,
    state_dir: PathBuf,
    admin_socket: PathBuf,
    dns_upstreams: Vec<String>,
    udp_allow: Vec<String>,
    allow_foreign_netns: bool,
    connect_timeout_ms: u64,
    idle_timeout_secs: u64,
    jwks_min_refetch_secs: u64,
    fast_path: bool,
}

impl Default for RawDaemon {
    fn default() -> Self {
        Self {
            proxy_port: 15001,
            dns_port: 15053,
            pin_dir: PathBuf::from("/sys/fs/bpf/gateway"),
            state_dir: PathBuf::from("/var/lib/gateway"),
            admin_socket: PathBuf::from("/run/gateway/admin.sock"),
            dns_upstreams: Vec::new(),
            udp_allow: Vec::new(),
            allow_foreign_netns: false,
            connect_timeout_ms: 5000,
            idle_timeout_secs: 300,
            jwks_min_refetch_secs: 10,
            fast_path: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrustedIssuer {
    issuer: String,
    audiences: Vec<String>,
    #[serde(default)]
    algorithms: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    name: String,
    cgroups: Vec<String>,
    #[serde(rename = "static")]
    static_: Option<RawStatic>,
    client_credentials: Option<RawClientCredentials>,
    enrolled: Option<RawEnrolled>,
    #[serde(default = "default_groups_claim")]
    groups_claim: String,
    #[serde(default)]
    duty_mapping: BTreeMap<String, Vec<String>>,
}

fn default_groups_claim() -> String {
    "groups".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientCredentials {
    issuer: String,
    client_id: String,
    client_secret_file: Option<PathBuf>,
    /// Name of a systemd credential (`LoadCredential=`), read from
    /// `$CREDENTIALS_DIRECTORY/<name>`.
    client_secret_credential: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    audience: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnrolled {
    /// Which trusted issuers may enroll jobs here; empty: any of them.
    #[serde(default)]
    issuers: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatic {
    subject: String,
    #[serde(default)]
    duties: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: u32,
    default: Action,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
}

impl Default for RawPolicy {
    fn default() -> Self {
        Self {
            version: 1,
            default: Action::Block,
            rules: Vec::new(),
        }
    }
}

// === validated model ===

/// The action a policy takes. Only the default exists until rules land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Block,
    /// Hold until an approver decides (rules only, never the default).
    Approve,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Block => "block",
            Action::Approve => "approve",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from: a file path or `<embedded default>`.
    pub origin: String,
    pub daemon: Daemon,
    /// Issuers whose tokens may enroll jobs and (later) approve.
    pub trusted_issuers: Vec<TrustedIssuer>,
    pub identities: Vec<Identity>,
    pub policy: Policy,
    /// The `[[secret]]`s: names and sources only; the values live in the
    /// policy's injections.
    pub secrets: Vec<SecretInfo>,
    pub interception: Interception,
    pub approvals: Approvals,
    pub audit: Audit,
    pub sessions: Sessions,
}

/// Whether audit events go to journald.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalMode {
    /// Journald when its socket exists at start, else stderr only.
    Auto,
    /// Always journald; while it is unreachable events are spooled in the
    /// state directory and delivered when it returns.
    On,
    Off,
}

/// `[audit]`.
#[derive(Debug, Clone)]
pub struct Audit {
    pub journal: JournalMode,
    /// journald's native protocol socket.
    pub journal_socket: PathBuf,
    /// Also print audit events on stderr, with the operational log.
    pub stderr: bool,
    /// The spool never grows past this; beyond it events are counted, and
    /// the count is audited when journald is back.
    pub spool_max_bytes: u64,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            journal: JournalMode::Auto,
            journal_socket: PathBuf::from("/run/systemd/journal/socket"),
            stderr: true,
            spool_max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// `[sessions]`.
#[derive(Debug, Clone)]
pub struct Sessions {
    pub enabled: bool,
    /// Default `<state_dir>/sessions`.
    pub dir: PathBuf,
    /// Bytes of each request and response body kept (after masking).
    pub body_cap: usize,
    /// Recordings older than this are removed.
    pub max_age: Duration,
    /// The store never grows past this; the oldest go first.
    pub max_total_bytes: u64,
}

/// `[approvals]`.
#[derive(Debug, Clone)]
pub struct Approvals {
    /// No decision by then: denied.
    pub timeout: Duration,
    /// The longest window an approver may grant.
    pub max_window: Duration,
    /// Trusted issuers whose tokens may approve; empty: every
    /// `[[trusted_issuer]]`.
    pub issuers: Vec<String>,
    /// Approver duties come from this claim of the approver's token ...
    pub groups_claim: String,
    /// ... mapped like an identity's (empty: values are duties as-is).
    pub duty_mapping: BTreeMap<String, Vec<String>>,
    /// Bytes of the request body kept (after masking) as a preview.
    pub preview_bytes: usize,
    /// More held requests than this at once: refused.
    pub max_pending: usize,
    /// The HTTP admin API's address, if it runs.
    pub api_listen: Option<SocketAddr>,
    pub webhook: Option<Webhook>,
}

impl Default for Approvals {
    fn default() -> Self {
        Approvals {
            timeout: Duration::from_secs(300),
            max_window: Duration::from_secs(8 * 3600),
            issuers: Vec::new(),
            groups_claim: "groups".into(),
            duty_mapping: BTreeMap::new(),
            preview_bytes: 1024,
            max_pending: 1000,
            api_listen: None,
            webhook: None,
        }
    }
}

/// `[approvals.webhook]`: where new pending approvals are POSTed.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: String,
    /// Per attempt.
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
}

/// Where a secret (or a client secret) is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    /// A systemd credential name, read from `$CREDENTIALS_DIRECTORY/<name>`.
    Credential(String),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "file {}", p.display()),
            SecretSource::Credential(c) => write!(f, "credential {c}"),
        }
    }
}

/// What the process environment contributes to loading a config; tests
/// pass their own instead of changing the process's environment.
#[derive(Debug, Clone, Default)]
pub struct LoadEnv {
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
    pub credentials_directory: Option<PathBuf>,
}

impl LoadEnv {
    pub fn from_process() -> LoadEnv {
        LoadEnv {
            credentials_directory: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        }
    }
}

impl SecretSource {
    /// The file the secret is read from.
    pub fn path(&self, env: &LoadEnv) -> Result<PathBuf, String> {
        match self {
            SecretSource::File(p) => Ok(p.clone()),
            SecretSource::Credential(name) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(format!(
                        "credential {name:?} is not a credential name; write the name given to LoadCredential= (no '/')"
                    ));
                }
                let dir = env.credentials_directory.as_ref().ok_or_else(|| {
                    format!(
                        "credential {name:?}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential={name}:/path in the unit, or a file)"
                    )
                })?;
                Ok(dir.join(name))
            }
        }
    }

    /// Reads the secret's bytes. Errors name the file, never the content.
    pub fn read(&self, env: &LoadEnv) -> Result<(PathBuf, Vec<u8>), String> {
        use std::io::Read as _;
        let path = self.path(env)?;
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(SECRET_MAX_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|e| match self {
                SecretSource::File(_) => format!("cannot read {}: {e}", path.display()),
                SecretSource::Credential(name) => {
                    format!("cannot read credential {name:?} at {}: {e}", path.display())
                }
            })?;
        if bytes.len() as u64 > SECRET_MAX_BYTES {
            return Err(format!(
                "{} is larger than {SECRET_MAX_BYTES} bytes; a secret is one short line",
                path.display()
            ));
        }
        Ok((path, bytes))
    }
}

/// Secrets (and client secrets) longer than this are refused.
const SECRET_MAX_BYTES: u64 = 64 * 1024;

/// A `[[secret]]` as `gateway check` may show it: never the value.
#[derive(Debug, Clone)]
pub struct SecretInfo {
    pub name: String,
    pub source: SecretSource,
    /// The file it was read from.
    pub path: PathBuf,
}

/// `[interception]`.
#[derive(Debug, Clone)]
pub struct Interception {
    /// PEM files trusted for upstream TLS, besides the system roots.
    pub upstream_ca_files: Vec<PathBuf>,
    /// Their certificates, read and parsed at load.
    pub upstream_cas: Vec<CertificateDer<'static>>,
    /// Trust the system's root store for upstream TLS.
    pub system_roots: bool,
    /// How long to wait for a client's first bytes (ClientHello, request
    /// line) before deciding on what is known.
    pub sniff_timeout: Duration,
    /// Cap on a decompressed response body while masking.
    pub max_decoded_bytes: u64,
}

impl Default for Interception {
    fn default() -> Self {
        Interception {
            upstream_ca_files: Vec::new(),
            upstream_cas: Vec::new(),
            system_roots: true,
            sniff_timeout: Duration::from_millis(1000),
            max_decoded_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Daemon {
    pub proxy_port: u16,
    pub dns_port: u16,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    /// Empty means: the nameservers of /etc/resolv.conf, read at start.
    pub dns_upstreams: Vec<SocketAddr>,
    pub udp_allow: Vec<SocketAddr>,
    pub allow_foreign_netns: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// An unknown `kid` refetches an issuer's JWKS at most this often.
    pub jwks_min_refetch: Duration,
    /// Reuse L4 allow decisions in the kernel for 30 s (direct connects,
    /// still audited).
    pub fast_path: bool,
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    /// Paths relative to the cgroup2 mount, without leading or trailing `/`.
    pub cgroups: Vec<String>,
    pub source: IdentitySource,
    /// Claim whose values become duties (OIDC sources).
    pub groups_claim: String,
    /// Claim value → duties; empty: every value is a duty as-is.
    pub duty_mapping: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// Development only: subject and duties written in the config.
    Static {
        subject: String,
        duties: Vec<String>,
    },
    /// The gateway gets its own tokens from the issuer and refreshes them.
    ClientCredentials(ClientCredentials),
    /// Each job's cgroup below gets the identity of the token it enrolls
    /// with (`gateway enroll`); `issuers` restricts the trusted issuers.
    Enrolled { issuers: Vec<String> },
}

impl IdentitySource {
    pub fn kind(&self) -> &'static str {
        match self {
            IdentitySource::Static { .. } => "static",
            IdentitySource::ClientCredentials(_) => "client_credentials",
            IdentitySource::Enrolled { .. } => "enrolled",
        }
    }
}

impl Config {
    /// Reads `path`, or the embedded default when `path` is `None` and the
    /// default path does not exist.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_PATH)).filter(|p| p.exists()),
        };
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Config::parse(&text, &path.display().to_string())
            }
            None => Config::parse(EMBEDDED_DEFAULT, "<embedded default>"),
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, origin, &LoadEnv::from_process())
    }

    /// [`Config::parse`] with an explicit environment (secrets read from
    /// `$CREDENTIALS_DIRECTORY`).
    pub fn parse_with(text: &str, origin: &str, env: &LoadEnv) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Syntax {
                origin: origin.to_string(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        validate(raw, origin, text, env)
    }

    /// The policy part of `gateway check`: secrets (names and sources,
    /// never values), interception settings, the decision semantics and
    /// the rules in order.
    pub fn policy_report(&self) -> String {
        use fmt::Write as _;
        let mut out = String::new();
        for s in &self.secrets {
            let at = match s.source {
                SecretSource::File(_) => String::new(),
                SecretSource::Credential(_) => format!(" ({})", s.path.display()),
            };
            let _ = writeln!(out, "secret {}: {}{at}, value not shown", s.name, s.source);
        }
        let i = &self.interception;
        let cas: Vec<String> = i
            .upstream_ca_files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let _ = writeln!(
            out,
            "interception: upstream trust {}{}, sniff timeout {} ms, decoded bodies up to {} bytes",
            if i.system_roots {
                "system roots"
            } else {
                "no system roots"
            },
            if cas.is_empty() {
                String::new()
            } else {
                format!(
                    " + [{}] ({} certificates)",
                    cas.join(", "),
                    i.upstream_cas.len()
                )
            },
            i.sniff_timeout.as_millis(),
            i.max_decoded_bytes
        );
        let a = &self.approvals;
        let _ = writeln!(
            out,
            "approvals: timeout {} s, windows up to {} min, approver duties from claim {:?}, issuers [{}], api {}, webhook {}",
            a.timeout.as_secs(),
            a.max_window.as_secs() / 60,
            a.groups_claim,
            if a.issuers.is_empty() {
                "every trusted issuer".to_string()
            } else {
                a.issuers.join(", ")
            },
            a.api_listen.map_or("off".to_string(), |l| l.to_string()),
            a.webhook.as_ref().map_or("off".to_string(), |w| {
                // Only the receiver: the path may carry its token.
                reqwest::Url::parse(&w.url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_default()
            }),
        );
        let _ = write!(out, "{}", self.policy);
        out
    }

    /// The identity bound to `name`.
    pub fn identity(&self, name: &str) -> Option<&Identity> {
        self.identities.iter().find(|i| i.name == name)
    }

    /// Every configured cgroup with the identity it is bound to.
    pub fn bindings(&self) -> impl Iterator<Item = (&str, &Identity)> {
        self.identities
            .iter()
            .flat_map(|i| i.cgroups.iter().map(move |c| (c.as_str(), i)))
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn validate(
    raw: RawConfig,
    origin: &str,
    text: &str,
    env: &LoadEnv,
) -> Result<Config, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        origin: origin.to_string(),
        message,
    };
    // An error about a value: file:line:column of that value.
    let at = |span: Range<usize>, message: String| {
        let (line, column) = line_col(text, span.start);
        ConfigError::Syntax {
            origin: origin.to_string(),
            line,
            column,
            message,
        }
    };
    let d = raw.daemon;
    if d.proxy_port != 0 && d.proxy_port == d.dns_port {
        return Err(invalid(format!(
            "daemon.proxy_port and daemon.dns_port are both {}; give the DNS forwarder its own port",
            d.proxy_port
        )));
    }
    let dns_upstreams = d
        .dns_upstreams
        .iter()
        .map(|s| parse_upstream(s).map_err(|m| invalid(format!("daemon.dns_upstreams: {m}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let udp_allow = d
        .udp_allow
        .iter()
        .map(|s| {
            s.parse::<SocketAddr>().map_err(|_| {
                invalid(format!(
                    "daemon.udp_allow: {s:?} is not an address with a port; write \"10.0.0.1:123\" or \"[fd00::1]:0\" (port 0 = any)"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if d.connect_timeout_ms == 0 || d.idle_timeout_secs == 0 {
        return Err(invalid(
            "daemon.connect_timeout_ms and daemon.idle_timeout_secs must be greater than 0".into(),
        ));
    }

    let mut trusted_issuers: Vec<TrustedIssuer> = Vec::new();
    for t in raw.trusted_issuers {
        if !(t.issuer.starts_with("https://") || t.issuer.starts_with("http://")) {
            return Err(invalid(format!(
                "trusted_issuer {:?} must be the issuer URL exactly as tokens carry it in `iss`",
                t.issuer
            )));
        }
        if t.audiences.is_empty() {
            return Err(invalid(format!(
                "trusted_issuer {:?} needs at least one audience, so tokens minted for other services are refused",
                t.issuer
            )));
        }
        let mut ti = TrustedIssuer::new(t.issuer.clone(), t.audiences);
        if !t.algorithms.is_empty() {
            ti.algorithms = t
                .algorithms
                .iter()
                .map(|a| a.parse::<Alg>())
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(format!("trusted_issuer {:?}: {e}", t.issuer)))?;
        }
        if trusted_issuers.iter().any(|x| x.issuer == ti.issuer) {
            return Err(invalid(format!(
                "trusted_issuer {:?} is listed twice",
                ti.issuer
            )));
        }
        trusted_issuers.push(ti);
    }
    let mut names = HashSet::new();
    let mut cgroups = HashSet::new();
    let mut identities = Vec::new();
    for raw in raw.identities {
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(format!(
                "identity name {:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                raw.name
            )));
        }
        if !names.insert(raw.name.clone()) {
            return Err(invalid(format!("identity {:?} is defined twice", raw.name)));
        }
        if raw.cgroups.is_empty() {
            return Err(invalid(format!(
                "identity {:?} has no cgroups; bind it to at least one, e.g. cgroups = [\"gateway.slice/{}\"]",
                raw.name, raw.name
            )));
        }
        let mut paths = Vec::new();
        for c in &raw.cgroups {
            let path = normalise_cgroup(c)
                .map_err(|m| invalid(format!("identity {:?}: cgroup {c:?}: {m}", raw.name)))?;
            if !cgroups.insert(path.clone()) {
                return Err(invalid(format!(
                    "cgroup {path:?} is bound to more than one identity"
                )));
            }
            paths.push(path);
        }
        let name = raw.name.clone();
        let source = match (raw.static_, raw.client_credentials, raw.enrolled) {
            (Some(st), None, None) => {
                if st.subject.is_empty() {
                    return Err(invalid(format!(
                        "identity {name:?}: static.subject must not be empty"
                    )));
                }
                IdentitySource::Static {
                    subject: st.subject,
                    duties: st.duties,
                }
            }
            (None, Some(cc), None) => IdentitySource::ClientCredentials(
                client_credentials(cc, env)
                    .map_err(|m| invalid(format!("identity {name:?}: {m}")))?,
            ),
            (None, None, Some(en)) => {
                for i in &en.issuers {
                    if !trusted_issuers.iter().any(|t| &t.issuer == i) {
                        return Err(invalid(format!(
                            "identity {name:?}: enrolled.issuers names {i:?}, which is not a [[trusted_issuer]]; add it there first"
                        )));
                    }
                }
                if trusted_issuers.is_empty() {
                    return Err(invalid(format!(
                        "identity {name:?} takes enrolled job tokens but no [[trusted_issuer]] is configured to verify them"
                    )));
                }
                IdentitySource::Enrolled {
                    issuers: en.issuers,
                }
            }
            (None, None, None) => {
                return Err(invalid(format!(
                    "identity {name:?} has no source; add one of static = {{ subject = \"...\", duties = [...] }}, client_credentials = {{ ... }} or enrolled = {{}}"
                )));
            }
            _ => {
                return Err(invalid(format!(
                    "identity {name:?} has more than one source; keep exactly one of static, client_credentials, enrolled"
                )));
            }
        };
        identities.push(Identity {
            name: raw.name,
            cgroups: paths,
            source,
            groups_claim: raw.groups_claim,
            duty_mapping: raw.duty_mapping,
        });
    }
    let (secrets, secret_values) = load_secrets(raw.secrets, env, &at)?;
    let interception = interception(raw.interception, &at, &invalid)?;
    let approvals = approvals(raw.approvals, &trusted_issuers, &at)?;
    let audit = audit(raw.audit, &at)?;
    let sessions = sessions(raw.sessions, &d.state_dir, &at)?;
    if raw.policy.default == Action::Approve {
        return Err(invalid(
            "policy.default = \"approve\" is not possible (an approval needs a rule's approvers); use allow or block and write an approve rule"
                .into(),
        ));
    }
    let policy = Policy::build(
        raw.policy.version,
        raw.policy.default,
        raw.policy.rules,
        &secret_values,
    )
    .map_err(|e| match e.span {
        Some(span) => at(span, format!("policy: {}", e.message)),
        None => invalid(format!("policy: {}", e.message)),
    })?;
    Ok(Config {
        origin: origin.to_string(),
        daemon: Daemon {
            proxy_port: d.proxy_port,
            dns_port: d.dns_port,
            pin_dir: d.pin_dir,
            state_dir: d.state_dir,
            admin_socket: d.admin_socket,
            dns_upstreams,
            udp_allow,
            allow_foreign_netns: d.allow_foreign_netns,
            connect_timeout: Duration::from_millis(d.connect_timeout_ms),
            idle_timeout: Duration::from_secs(d.idle_timeout_secs),
            jwks_min_refetch: Duration::from_secs(d.jwks_min_refetch_secs),
            fast_path: d.fast_path,
        },
        trusted_issuers,
        identities,
        policy,
        secrets,
        interception,
        approvals,
        audit,
        sessions,
    })
}

/// Reads every `[[secret]]` (at load and at every reload). Errors point at
/// the secret and name the file; they never contain the value.
fn load_secrets(
    raw: Vec<RawSecret>,
    env: &LoadEnv,
    at: &impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<(Vec<SecretInfo>, BTreeMap<String, SecretValue>), ConfigError> {
    let mut infos = Vec::new();
    let mut values = BTreeMap::new();
    for s in raw {
        let name = s.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(at(
                s.name.span(),
                format!(
                    "secret name {name:?} must be non-empty and use only letters, digits, '-', '_' and '.'"
                ),
            ));
        }
        if values.contains_key(&name) {
            return Err(at(
                s.name.span(),
                format!("secret {name:?} is defined twice; give each [[secret]] its own name"),
            ));
        }
        let (source, span) = match (s.file, s.credential) {
            (Some(f), None) => (SecretSource::File(f.get_ref().clone()), f.span()),
            (None, Some(c)) => (SecretSource::Credential(c.get_ref().clone()), c.span()),
            _ => {
                return Err(at(
                    s.name.span(),
                    format!(
                        "secret {name:?} needs exactly one of file = \"/path\" or credential = \"name\" (systemd LoadCredential=)"
                    ),
                ));
            }
        };
        let (path, bytes) = source
            .read(env)
            .map_err(|m| at(span.clone(), format!("secret {name:?}: {m}")))?;
        let value = SecretValue::from_file_bytes(&bytes).map_err(|e| {
            at(
                span.clone(),
                format!(
                    "secret {name:?} ({}): {e}; store only the header value, on one line",
                    path.display()
                ),
            )
        })?;
        values.insert(name.clone(), value);
        infos.push(SecretInfo { name, source, path });
    }
    Ok((infos, values))
}

fn audit(
    raw: RawAudit,
    at: &impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<Audit, ConfigError> {
    let d = Audit::default();
    let journal = match &raw.journal {
        None => d.journal,
        Some(s) => match s.get_ref().as_str() {
            "auto" => JournalMode::Auto,
            "on" => JournalMode::On,
            "off" => JournalMode::Off,
            other => {
                return Err(at(
                    s.span(),
                    format!("audit.journal is \"auto\", \"on\" or \"off\", not {other:?}"),
                ));
            }
        },
    };
    let spool_max_bytes = match &raw.spool_max_bytes {
        Some(s) if *s.get_ref() == 0 => {
            return Err(at(
                s.span(),
                "audit.spool_max_bytes must be greater than 0".into(),
            ));
        }
        Some(s) => *s.get_ref(),
        None => d.spool_max_bytes,
    };
    Ok(Audit {
        journal,
        journal_socket: raw.journal_socket.unwrap_or(d.journal_socket),
        stderr: raw.stderr.unwrap_or(d.stderr),
        spool_max_bytes,
    })
}

fn sessions(
    raw: RawSessions,
    state_dir: &Path,
    at: &impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<Sessions, ConfigError> {
    let positive = |v: &Option<Spanned<u64>>, key: &str, default: u64| match v {
        Some(s) if *s.get_ref() == 0 => Err(at(
            s.span(),
            format!("sessions.{key} must be greater than 0 (default {default})"),
        )),
        Some(s) => Ok(*s.get_ref()),
        None => Ok(default),
    };
    let body_cap = positive(&raw.body_cap_bytes, "body_cap_bytes", 64 * 1024)?;
    let days = positive(&raw.max_age_days, "max_age_days", 30)?;
    let mb = positive(&raw.max_total_mb, "max_total_mb", 1024)?;
    Ok(Sessions {
        enabled: raw.enabled.unwrap_or(true),
        dir: raw.dir.unwrap_or_else(|| state_dir.join("sessions")),
        body_cap: usize::try_from(body_cap).unwrap_or(usize::MAX),
        max_age: Duration::from_secs(days.saturating_mul(86_400)),
        max_total_bytes: mb.saturating_mul(1024 * 1024),
    })
}

fn approvals(
    raw: RawApprovals,
    trusted: &[TrustedIssuer],
    at: &impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<Approvals, ConfigError> {
    let d = Approvals::default();
    let positive = |v: &Option<Spanned<u64>>, key: &str, default: u64| match v {
        Some(s) if *s.get_ref() == 0 => Err(at(
            s.span(),
            format!("approvals.{key} must be greater than 0 (default {default})"),
        )),
        Some(s) => Ok(*s.get_ref()),
        None => Ok(default),
    };
    let timeout = positive(&raw.timeout_secs, "timeout_secs", d.timeout.as_secs())?;
    let max_window = positive(
        &raw.max_window_minutes,
        "max_window_minutes",
        d.max_window.as_secs() / 60,
    )?;
    let preview = positive(&raw.preview_bytes, "preview_bytes", d.preview_bytes as u64)?;
    let max_pending = positive(&raw.max_pending, "max_pending", d.max_pending as u64)?;
    for i in &raw.issuers {
        if !trusted.iter().any(|t| &t.issuer == i.get_ref()) {
            return Err(at(
                i.span(),
                format!(
                    "approvals.issuers names {:?}, which is not a [[trusted_issuer]]; add it there first",
                    i.get_ref()
                ),
            ));
        }
    }
    let api_listen = match raw.api {
        Some(api) => Some(api.listen.get_ref().parse::<SocketAddr>().map_err(|_| {
            at(
                api.listen.span(),
                format!(
                    "approvals.api.listen: {:?} is not an address with a port; write \"127.0.0.1:8787\"",
                    api.listen.get_ref()
                ),
            )
        })?),
        None => None,
    };
    let webhook = match raw.webhook {
        Some(w) => {
            let url = w.url.get_ref();
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || reqwest::Url::parse(url).is_err()
            {
                return Err(at(
                    w.url.span(),
                    format!("approvals.webhook.url: {url:?} is not an http:// or https:// URL"),
                ));
            }
            Some(Webhook {
                url: url.clone(),
                timeout: Duration::from_millis(positive(
                    &w.timeout_ms,
                    "webhook.timeout_ms",
                    5000,
                )?),
                retries: w.retries.unwrap_or(3).min(10),
            })
        }
        None => None,
    };
    Ok(Approvals {
        timeout: Duration::from_secs(timeout),
        max_window: Duration::from_secs(max_window.saturating_mul(60)),
        issuers: raw.issuers.into_iter().map(Spanned::into_inner).collect(),
        groups_claim: raw.groups_claim.unwrap_or(d.groups_claim),
        duty_mapping: raw.duty_mapping,
        preview_bytes: usize::try_from(preview).unwrap_or(usize::MAX),
        max_pending: usize::try_from(max_pending).unwrap_or(usize::MAX),
        api_listen,
        webhook,
    })
}

fn interception(
    raw: RawInterception,
    at: &impl Fn(Range<usize>, String) -> ConfigError,
    invalid: &impl Fn(String) -> ConfigError,
) -> Result<Interception, ConfigError> {
    let d = Interception::default();
    let mut upstream_cas = Vec::new();
    let mut upstream_ca_files = Vec::new();
    for f in &raw.upstream_ca_files {
        let path = f.get_ref();
        let hint = "give a PEM file of CA certificates (-----BEGIN CERTIFICATE-----)";
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                at(
                    f.span(),
                    format!(
                        "interception.upstream_ca_files: {}: {e}; {hint}",
                        path.display()
                    ),
                )
            })?;
        if certs.is_empty() {
            return Err(at(
                f.span(),
                format!(
                    "interception.upstream_ca_files: {} holds no certificate; {hint}",
                    path.display()
                ),
            ));
        }
        for (n, c) in certs.iter().enumerate() {
            if let Err(e) = x509_parser::parse_x509_certificate(c) {
                return Err(at(
                    f.span(),
                    format!(
                        "interception.upstream_ca_files: {}: certificate {} is not a valid X.509 certificate ({e}); {hint}",
                        path.display(),
                        n + 1
                    ),
                ));
            }
        }
        upstream_ca_files.push(path.clone());
        upstream_cas.extend(certs);
    }
    let positive = |v: &Option<Spanned<u64>>, key: &str, default: u64| match v {
        Some(s) if *s.get_ref() == 0 => Err(at(
            s.span(),
            format!("interception.{key} must be greater than 0 (default {default})"),
        )),
        Some(s) => Ok(*s.get_ref()),
        None => Ok(default),
    };
    let sniff_ms = positive(
        &raw.sniff_timeout_ms,
        "sniff_timeout_ms",
        u64::try_from(d.sniff_timeout.as_millis()).unwrap_or(1000),
    )?;
    let max_decoded_bytes = positive(
        &raw.max_decoded_bytes,
        "max_decoded_bytes",
        d.max_decoded_bytes,
    )?;
    let system_roots = raw.system_roots.unwrap_or(d.system_roots);
    if !system_roots && upstream_cas.is_empty() {
        return Err(invalid(
            "interception.system_roots = false and no upstream_ca_files: no upstream could be verified; add upstream_ca_files or leave system_roots on".into(),
        ));
    }
    Ok(Interception {
        upstream_ca_files,
        upstream_cas,
        system_roots,
        sniff_timeout: Duration::from_millis(sniff_ms),
        max_decoded_bytes,
    })
}

fn client_credentials(
    cc: RawClientCredentials,
    env: &LoadEnv,
) -> Result<ClientCredentials, String> {
    let (source, key) = match (&cc.client_secret_file, &cc.client_secret_credential) {
        (Some(path), None) => (
            SecretSource::File(path.clone()),
            "client_credentials.client_secret_file",
        ),
        (None, Some(name)) => (
            SecretSource::Credential(name.clone()),
            "client_credentials.client_secret_credential",
        ),
        _ => {
            return Err(
                "client_credentials needs exactly one of client_secret_file or client_secret_credential".into(),
            );
        }
    };
    let (path, bytes) = source.read(env).map_err(|m| format!("{key}: {m}"))?;
    let secret = String::from_utf8(bytes)
        .map_err(|_| format!("{key}: {} is not UTF-8 text", path.display()))?;
    let secret = secret.trim_end_matches(['\n', '\r']).to_string();
    if secret.is_empty() {
        return Err("client_credentials: the client secret is empty".into());
    }
    if !(cc.issuer.starts_with("https://") || cc.issuer.starts_with("http://")) {
        return Err(format!(
            "client_credentials.issuer {:?} must be the issuer URL",
            cc.issuer
        ));
    }
    Ok(ClientCredentials {
        issuer: cc.issuer,
        client_id: cc.client_id,
        client_secret: Secret::new(secret),
        scopes: cc.scopes,
        audience: cc.audience,
    })
}

/// "10.0.0.1", "10.0.0.1:53", "[fd00::1]:53" or "fd00::1".
fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(format!(
        "{s:?} is not an IP address (with optional port); write \"10.0.0.53\" or \"10.0.0.53:53\""
    ))
}

/// `/a/b/` → `a/b`; refuses `..`, empty segments and the root itself.
pub fn normalise_cgroup(c: &str) -> Result<String, String> {
    let trimmed = c.trim_matches('/');
    if trimmed.is_empty() {
        return Err("binding the cgroup root would tag every process on the host, the gateway included; name a child cgroup".into());
    }
    for seg in trimmed.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err("use a plain relative path without '.', '..' or '//'".into());
        }
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests;
