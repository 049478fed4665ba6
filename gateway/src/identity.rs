//! Who opened a socket: the identity bound to the nearest configured
//! ancestor of the process's cgroup.

use std::{collections::BTreeMap, sync::Arc};

use crate::config::{Config, IdentitySource};

/// An identity as the data path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub subject: String,
    pub duties: Vec<String>,
    /// `static`, for development identities written in the config.
    pub source: &'static str,
    /// Claims as strings, for policy `claims` conditions and the audit.
    pub claims: BTreeMap<String, String>,
}

/// cgroup path → identity, built from the config.
#[derive(Debug, Default)]
pub struct Bindings {
    /// (cgroup path with leading `/`, identity), longest path first so the
    /// first prefix match is the nearest ancestor.
    by_path: Vec<(String, Arc<Identity>)>,
}

impl Bindings {
    pub fn from_config(cfg: &Config) -> Self {
        let mut by_path: Vec<(String, Arc<Identity>)> = Vec::new();
        for id in &cfg.identities {
            let ident = Arc::new(match &id.source {
                IdentitySource::Static { subject, duties } => Identity {
                    name: id.name.clone(),
                    subject: subject.clone(),
                    duties: duties.clone(),
                    source: "static",
                    claims: BTreeMap::from([("sub".to_string(), subject.clone())]),
                },
            });
            for cg in &id.cgroups {
                by_path.push((format!("/{cg}"), ident.clone()));
            }
        }
        by_path.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Self { by_path }
    }

    /// The identity of the nearest configured ancestor of `cgroup` (itself
    /// included), matching whole path segments only.
    pub fn lookup(&self, cgroup: &str) -> Option<Arc<Identity>> {
        self.by_path.iter().find_map(|(p, id)| {
            let inside = cgroup == p
                || cgroup
                    .strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.starts_with('/'));
            inside.then(|| id.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bindings() -> Bindings {
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
        Bindings::from_config(&cfg)
    }

    #[test]
    fn nearest_ancestor_wins_on_whole_segments() {
        let b = bindings();
        let name = |p: &str| b.lookup(p).map(|i| i.name.clone());
        assert_eq!(name("/ci").as_deref(), Some("outer"));
        assert_eq!(name("/ci/job-1").as_deref(), Some("outer"));
        assert_eq!(name("/ci/browser").as_deref(), Some("inner"));
        assert_eq!(name("/ci/browser/exec-1-1").as_deref(), Some("inner"));
        assert_eq!(name("/ci/browserx").as_deref(), Some("outer"));
        assert_eq!(name("/cix"), None);
        assert_eq!(name("/"), None);
    }
}
