//! Who opened a socket. Each configured cgroup is bound to an identity
//! source; a connection is attributed to the nearest configured ancestor of
//! its process's cgroup and gets that source's *current, verified* identity —
//! or a refusal with the reason (fail closed):
//! - static: the subject and duties written in the config (development);
//! - client credentials: the gateway's own token for that client, fetched
//!   and refreshed in the background; a failed refresh keeps the previous
//!   token until it expires, so the IdP going down breaks nothing early;
//! - enrolled: each job cgroup below gets the identity of the token a job
//!   enrolled with (`gateway enroll`), until that token expires or the
//!   cgroup goes away.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::{
    config::{self, Config, IdentitySource},
    oidc::{Claims, ClientCredentials, Verifier},
};

/// An identity as the data path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub subject: String,
    pub duties: Vec<String>,
    /// `static`, `client_credentials` or `enrolled`.
    pub source: &'static str,
    /// Scalar claims as strings, for policy `claims` conditions and audit.
    pub claims: BTreeMap<String, String>,
    /// When the token behind it expires; `None` for static identities.
    pub expires_at: Option<SystemTime>,
}

impl Identity {
    /// Who is asking, as the policy sees it.
    pub fn policy_subject(&self) -> crate::policy::Subject<'_> {
        crate::policy::Subject {
            identity: &self.name,
            duties: &self.duties,
            claims: &self.claims,
        }
    }

    fn from_claims(
        binding: &config::Identity,
        source: &'static str,
        claims: &Claims,
        expires_at: SystemTime,
    ) -> Identity {
        let scalars = claims
            .extra
            .keys()
            .filter_map(|k| claims.claim_str(k).map(|v| (k.clone(), v)))
            .collect();
        Identity {
            name: binding.name.clone(),
            subject: claims.sub.clone(),
            duties: claims.duties(&binding.groups_claim, &binding.duty_mapping),
            source,
            claims: scalars,
            expires_at: Some(expires_at),
        }
    }

    fn expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

fn expired_reason(ident: &Identity) -> String {
    format!(
        "the token of identity {} (subject {}) expired at {} (unix); refusing until a valid one is in place",
        ident.name,
        ident.subject,
        ident.expires_at.map_or(0, unix)
    )
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The live state of one configured identity.
#[derive(Debug)]
enum Source {
    Static(Arc<Identity>),
    ClientCredentials {
        creds: ClientCredentials,
        /// The last token's identity (kept after it expires, so refusals
        /// say "expired"), or why there never was one.
        current: RwLock<Result<Arc<Identity>, String>>,
        /// Why the last refresh failed, if it did.
        last_error: RwLock<Option<String>>,
    },
    Enrolled {
        issuers: Vec<String>,
        /// Enrolled job cgroup (path with leading `/`) → its identity.
        jobs: RwLock<BTreeMap<String, Arc<Identity>>>,
    },
}

#[derive(Debug)]
pub struct Binding {
    pub config: config::Identity,
    source: Source,
}

/// cgroup path → identity source, for the daemon's lifetime.
#[derive(Debug)]
pub struct Identities {
    /// (cgroup path with leading `/`, binding), longest first so the first
    /// prefix match is the nearest ancestor.
    by_path: Vec<(String, Arc<Binding>)>,
    bindings: Vec<Arc<Binding>>,
    /// Verifies enrolled job tokens (and later approver tokens).
    pub verifier: Arc<Verifier>,
    jwks_min_refetch: Duration,
}

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY: Duration = Duration::from_secs(30);

/// Whether `path` is `root` or below it, on whole segments.
pub fn within(path: &str, root: &str) -> bool {
    path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

impl Identities {
    pub fn from_config(cfg: &Config) -> Self {
        let verifier = Arc::new(
            Verifier::new(cfg.trusted_issuers.clone(), LEEWAY)
                .with_refetch_interval(cfg.daemon.jwks_min_refetch),
        );
        let mut by_path = Vec::new();
        let mut bindings = Vec::new();
        for id in &cfg.identities {
            let source = match &id.source {
                IdentitySource::Static { subject, duties } => Source::Static(Arc::new(Identity {
                    name: id.name.clone(),
                    subject: subject.clone(),
                    duties: duties.clone(),
                    source: "static",
                    claims: BTreeMap::from([("sub".to_string(), subject.clone())]),
                    expires_at: None,
                })),
                IdentitySource::ClientCredentials(creds) => Source::ClientCredentials {
                    creds: creds.clone(),
                    current: RwLock::new(Err(format!(
                        "identity {} has no token yet (first fetch from {} pending)",
                        id.name, creds.issuer
                    ))),
                    last_error: RwLock::new(None),
                },
                IdentitySource::Enrolled { issuers } => Source::Enrolled {
                    issuers: issuers.clone(),
                    jobs: RwLock::new(BTreeMap::new()),
                },
            };
            let b = Arc::new(Binding {
                config: id.clone(),
                source,
            });
            for cg in &id.cgroups {
                by_path.push((format!("/{cg}"), b.clone()));
            }
            bindings.push(b);
        }
        by_path.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Self {
            by_path,
            bindings,
            verifier,
            jwks_min_refetch: cfg.daemon.jwks_min_refetch,
        }
    }

    /// The binding of the nearest configured ancestor of `cgroup`.
    pub fn binding(&self, cgroup: &str) -> Option<(&str, &Arc<Binding>)> {
        self.by_path
            .iter()
            .find(|(p, _)| within(cgroup, p))
            .map(|(p, b)| (p.as_str(), b))
    }

    /// The verified identity a connection from `cgroup` acts as, or why
    /// there is none.
    pub fn resolve(&self, cgroup: &str) -> Result<Arc<Identity>, String> {
        let Some((root, b)) = self.binding(cgroup) else {
            return Err(format!("cgroup {cgroup} is not bound to an identity"));
        };
        let now = SystemTime::now();
        let ident = match &b.source {
            Source::Static(i) => return Ok(i.clone()),
            Source::ClientCredentials {
                current,
                last_error,
                ..
            } => {
                let ident = current
                    .read()
                    .map_err(|_| "identity state is poisoned".to_string())?
                    .clone()?;
                if ident.expired(now)
                    && let Ok(Some(e)) = last_error.read().as_deref()
                {
                    return Err(format!(
                        "{}; refreshing it failed: {e}",
                        expired_reason(&ident)
                    ));
                }
                ident
            }
            Source::Enrolled { jobs, .. } => {
                let jobs = jobs
                    .read()
                    .map_err(|_| "identity state is poisoned".to_string())?;
                // The nearest enrolled cgroup at or above this one, inside
                // the binding.
                let found = jobs
                    .iter()
                    .filter(|(p, _)| within(cgroup, p) && within(p, root))
                    .max_by_key(|(p, _)| p.len());
                match found {
                    Some((_, i)) => i.clone(),
                    None => {
                        return Err(format!(
                            "no job token is enrolled for cgroup {cgroup} (identity {}); run `gateway enroll --cgroup {cgroup} --token-file FILE` in the job first",
                            b.config.name
                        ));
                    }
                }
            }
        };
        if ident.expired(now) {
            return Err(expired_reason(&ident));
        }
        Ok(ident)
    }

    /// Every subject bound to `cgroup`: the identity configured for it
    /// (static subject, or the client-credentials client and its current
    /// token's subject) and every job token enrolled at, above or below it.
    /// None of them may approve a request from that cgroup.
    pub fn subjects_bound_to(&self, cgroup: &str) -> Vec<String> {
        let mut out = Vec::new();
        let Some((root, b)) = self.binding(cgroup) else {
            return out;
        };
        match &b.source {
            Source::Static(i) => out.push(i.subject.clone()),
            Source::ClientCredentials { creds, current, .. } => {
                out.push(creds.client_id.clone());
                if let Ok(Ok(i)) = current.read().as_deref() {
                    out.push(i.subject.clone());
                }
            }
            Source::Enrolled { jobs, .. } => {
                if let Ok(jobs) = jobs.read() {
                    out.extend(
                        jobs.iter()
                            .filter(|(p, _)| {
                                within(p, root) && (within(cgroup, p) || within(p, cgroup))
                            })
                            .map(|(_, i)| i.subject.clone()),
                    );
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Verifies `token` and binds it to `cgroup` (path with leading `/`),
    /// which must lie inside an identity configured for enrolled tokens.
    pub async fn enroll(&self, cgroup: &str, token: &str) -> Result<Arc<Identity>, String> {
        let Some((_, b)) = self.binding(cgroup) else {
            return Err(format!(
                "cgroup {cgroup} is not inside any configured identity's cgroup"
            ));
        };
        let Source::Enrolled { issuers, jobs } = &b.source else {
            return Err(format!(
                "identity {} bound to {cgroup} is {}, not enrolled; only identities with `enrolled = {{}}` take job tokens",
                b.config.name,
                b.config.source.kind()
            ));
        };
        let claims = self
            .verifier
            .verify(token)
            .await
            .map_err(|e| format!("token refused ({}): {e}", e.code()))?;
        if !issuers.is_empty() && !issuers.contains(&claims.iss) {
            return Err(format!(
                "token refused (issuer_not_allowed): issuer {} may not enroll jobs of identity {}",
                claims.iss, b.config.name
            ));
        }
        let ident = Arc::new(Identity::from_claims(
            &b.config,
            "enrolled",
            &claims,
            claims.expires_at(),
        ));
        jobs.write()
            .map_err(|_| "identity state is poisoned".to_string())?
            .insert(cgroup.to_string(), ident.clone());
        Ok(ident)
    }

    /// Drops enrollments whose token expired or whose cgroup is gone.
    pub fn sweep(&self, mount: &Path) -> Vec<(String, String)> {
        let now = SystemTime::now();
        let mut ended = Vec::new();
        for b in &self.bindings {
            if let Source::Enrolled { jobs, .. } = &b.source
                && let Ok(mut jobs) = jobs.write()
            {
                jobs.retain(|path, ident| {
                    let why = if ident.expired(now) {
                        Some("token expired")
                    } else if !mount.join(path.trim_start_matches('/')).exists() {
                        Some("cgroup removed")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        ended.push((path.clone(), why.to_string()));
                    }
                    why.is_none()
                });
            }
        }
        ended
    }

    /// Starts one refresher task per client-credentials identity.
    pub fn spawn_refreshers(self: &Arc<Self>) {
        for b in &self.bindings {
            if let Source::ClientCredentials { creds, .. } = &b.source {
                let b = b.clone();
                let verifier = Arc::new(
                    Verifier::new(vec![creds.trusted_issuer()], LEEWAY)
                        .with_refetch_interval(self.jwks_min_refetch),
                );
                tokio::spawn(async move { refresh_loop(b, verifier).await });
            }
        }
    }

    /// For `gateway status`: sources, subjects, duties, expiry. Never tokens.
    pub fn status(&self) -> Value {
        let list: Vec<Value> = self
            .bindings
            .iter()
            .map(|b| {
                let describe = |i: &Identity| {
                    json!({
                        "subject": i.subject,
                        "duties": i.duties,
                        "expires_at_unix": i.expires_at.map(unix),
                    })
                };
                let mut v = json!({
                    "name": b.config.name,
                    "source": b.config.source.kind(),
                    "cgroups": b.config.cgroups,
                });
                match &b.source {
                    Source::Static(i) => v["identity"] = describe(i),
                    Source::ClientCredentials {
                        current,
                        creds,
                        last_error,
                    } => {
                        v["issuer"] = creds.issuer.clone().into();
                        match current.read().as_deref() {
                            Ok(Ok(i)) => v["identity"] = describe(i),
                            Ok(Err(e)) => v["error"] = e.clone().into(),
                            Err(_) => v["error"] = "poisoned".into(),
                        }
                        if let Ok(Some(e)) = last_error.read().as_deref() {
                            v["last_refresh_error"] = e.clone().into();
                        }
                    }
                    Source::Enrolled { jobs, .. } => {
                        let jobs: Vec<Value> = jobs
                            .read()
                            .map(|j| {
                                j.iter()
                                    .map(|(p, i)| {
                                        let mut d = describe(i);
                                        d["cgroup"] = p.clone().into();
                                        d
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        v["enrolled"] = jobs.into();
                    }
                }
                v
            })
            .collect();
        list.into()
    }
}

/// Keeps a client-credentials identity's token fresh: refetch at 80 % of
/// its lifetime; on failure keep the old token while it is valid and retry
/// with backoff.
async fn refresh_loop(b: Arc<Binding>, verifier: Arc<Verifier>) {
    let Source::ClientCredentials {
        creds,
        current,
        last_error,
    } = &b.source
    else {
        return;
    };
    let mut backoff = Duration::from_millis(500);
    loop {
        let fetched_at = SystemTime::now();
        let wait = match creds.fetch_token(&verifier).await {
            Ok(tok) => {
                let ident = Arc::new(Identity::from_claims(
                    &b.config,
                    "client_credentials",
                    &tok.claims,
                    tok.expires_at,
                ));
                tracing::info!(
                    event = "identity_token",
                    identity = %b.config.name,
                    subject = %ident.subject,
                    duties = %ident.duties.join(","),
                    expires_at_unix = unix(tok.expires_at),
                );
                if let Ok(mut c) = current.write() {
                    *c = Ok(ident);
                }
                if let Ok(mut l) = last_error.write() {
                    *l = None;
                }
                backoff = Duration::from_millis(500);
                tok.refresh_at(fetched_at)
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::from_secs(1))
                    .max(Duration::from_secs(1))
            }
            Err(e) => {
                let msg = format!(
                    "cannot get a token for identity {} from {}: {e}",
                    b.config.name, creds.issuer
                );
                tracing::warn!(event = "identity_token_failed", identity = %b.config.name, error = %e);
                // A token we had stays, valid or expired: `resolve` refuses
                // an expired one with that reason (and this error). Only
                // "never had one" takes the error itself.
                if let Ok(mut c) = current.write()
                    && c.is_err()
                {
                    *c = Err(msg.clone());
                }
                if let Ok(mut l) = last_error.write() {
                    *l = Some(msg);
                }
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                w
            }
        };
        // Wake at the latest when the current token expires, so the state
        // flips to "expired" promptly for status (resolve checks anyway).
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identities() -> Identities {
        let cfg = Config::parse(
            r#"
[[identity]]
name = "outer"
cgroups = ["ci"]
static = { subject = "o", duties = ["a"] }
[[identity]]
name = "inner"
cgroups = ["ci/browser"]
static = { subject = "i", duties = ["b"] }
"#,
            "t",
        )
        .unwrap();
        Identities::from_config(&cfg)
    }

    #[test]
    fn nearest_ancestor_wins_on_whole_segments() {
        let ids = identities();
        let name = |p: &str| ids.resolve(p).ok().map(|i| i.name.clone());
        assert_eq!(name("/ci").as_deref(), Some("outer"));
        assert_eq!(name("/ci/job-1").as_deref(), Some("outer"));
        assert_eq!(name("/ci/browser").as_deref(), Some("inner"));
        assert_eq!(name("/ci/browser/exec-1-1").as_deref(), Some("inner"));
        assert_eq!(name("/ci/browserx").as_deref(), Some("outer"));
        assert_eq!(name("/cix"), None);
        assert_eq!(name("/"), None);
        assert!(ids.resolve("/cix").unwrap_err().contains("not bound"));
    }
}
