//! The daemon configuration: the TOML wire format (serde structs with
//! `deny_unknown_fields`), kept apart from the validated model the rest of
//! the daemon uses. Errors name the file, line and column and say what to do.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    oidc::{Alg, ClientCredentials, Secret, TrustedIssuer},
    policy::{Policy, RawRule},
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
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Block => "block",
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Syntax {
                origin: origin.to_string(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        validate(raw, origin)
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

fn validate(raw: RawConfig, origin: &str) -> Result<Config, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        origin: origin.to_string(),
        message,
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
                client_credentials(cc).map_err(|m| invalid(format!("identity {name:?}: {m}")))?,
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
    let policy = Policy::build(raw.policy.version, raw.policy.default, raw.policy.rules)
        .map_err(|m| invalid(format!("policy: {m}")))?;
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
    })
}

fn client_credentials(cc: RawClientCredentials) -> Result<ClientCredentials, String> {
    let secret = match (&cc.client_secret_file, &cc.client_secret_credential) {
        (Some(path), None) => std::fs::read_to_string(path).map_err(|e| {
            format!(
                "client_credentials.client_secret_file {}: {e}",
                path.display()
            )
        })?,
        (None, Some(name)) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                format!("client_credentials.client_secret_credential {name:?}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit, or client_secret_file)")
            })?;
            let path = PathBuf::from(dir).join(name);
            std::fs::read_to_string(&path)
                .map_err(|e| format!("credential {}: {e}", path.display()))?
        }
        _ => {
            return Err(
                "client_credentials needs exactly one of client_secret_file or client_secret_credential".into(),
            );
        }
    };
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
