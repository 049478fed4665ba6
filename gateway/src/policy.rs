//! The policy: a versioned list of rules and a default action.
//!
//! Decision order (what `decide` does, and what `gateway check` prints):
//! 1. Rules are tried in the order they are written; the **first** rule
//!    whose every condition holds decides (allow or block).
//! 2. A condition left out matches anything. Lists match if any element
//!    matches (`duties`: the identity holds at least one of them).
//! 3. No rule matches → the default action. When a rule matched the
//!    destination but not the identity, the reason says which duties were
//!    missing, so a refusal is never a mystery.
//!
//! Every decision carries the rule id (or `default`) and a readable reason;
//! both go into the audit record.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::Deserialize;

use crate::config::Action;

// === wire format ===

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub id: String,
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub duties: Vec<String>,
    /// claim name → accepted value(s).
    #[serde(default)]
    pub claims: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    pub action: Action,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    One(u16),
    /// "8000-8100"
    Range(String),
}

// === model ===

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`: any name strictly below `example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    identities: Vec<String>,
    duties: Vec<String>,
    claims: Vec<(String, Vec<String>)>,
    hosts: Vec<HostPattern>,
    ips: Vec<Cidr>,
    ports: Vec<(u16, u16)>,
    pub action: Action,
}

/// Who is asking, as the policy sees it.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    pub identity: &'a str,
    pub duties: &'a [String],
    /// Claims as strings (numbers and booleans rendered), for `claims`.
    pub claims: &'a BTreeMap<String, String>,
}

/// Where to, as far as it is known at this point.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub ip: IpAddr,
    pub port: u16,
    /// From DNS (L4), later SNI or Host; empty when unknown.
    pub host: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The rule id, or `default`.
    pub rule: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub version: u32,
    pub default: Action,
    pub rules: Vec<Rule>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} → {}", self.id, self.action)?;
        let list = |v: &[String]| v.join(", ");
        if !self.identities.is_empty() {
            write!(f, "; identities [{}]", list(&self.identities))?;
        }
        if !self.duties.is_empty() {
            write!(f, "; duties [{}]", list(&self.duties))?;
        }
        for (k, v) in &self.claims {
            write!(f, "; claim {k} in [{}]", list(v))?;
        }
        if !self.hosts.is_empty() {
            let hosts: Vec<String> = self
                .hosts
                .iter()
                .map(|h| match h {
                    HostPattern::Exact(s) => s.clone(),
                    HostPattern::Suffix(s) => format!("*.{s}"),
                })
                .collect();
            write!(f, "; hosts [{}]", hosts.join(", "))?;
        }
        if !self.ips.is_empty() {
            let ips: Vec<String> = self
                .ips
                .iter()
                .map(|c| format!("{}/{}", c.addr, c.prefix))
                .collect();
            write!(f, "; ips [{}]", ips.join(", "))?;
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self
                .ports
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            write!(f, "; ports [{}]", ports.join(", "))?;
        }
        Ok(())
    }
}

impl Policy {
    /// Validates the wire rules. Errors name the rule and say how to fix it.
    pub fn build(version: u32, default: Action, raw: Vec<RawRule>) -> Result<Policy, String> {
        if version != 1 {
            return Err(format!(
                "policy.version {version} is not supported; this gateway reads version = 1"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let mut rules = Vec::with_capacity(raw.len());
        for r in raw {
            if r.id.is_empty() {
                return Err("a rule has an empty id; give every rule a unique id".into());
            }
            if !seen.insert(r.id.clone()) {
                return Err(format!(
                    "rule id {:?} is used twice; ids must be unique",
                    r.id
                ));
            }
            let at = |m: String| format!("rule {:?}: {m}", r.id);
            let hosts = r
                .hosts
                .iter()
                .map(|h| parse_host(h).map_err(at))
                .collect::<Result<_, _>>()?;
            let ips = r
                .ips
                .iter()
                .map(|c| parse_cidr(c).map_err(at))
                .collect::<Result<_, _>>()?;
            let ports = r
                .ports
                .iter()
                .map(|p| parse_ports(p).map_err(at))
                .collect::<Result<_, _>>()?;
            let claims = r
                .claims
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        OneOrMany::One(s) => vec![s],
                        OneOrMany::Many(v) => v,
                    };
                    (k, v)
                })
                .collect();
            rules.push(Rule {
                id: r.id,
                identities: r.identities,
                duties: r.duties,
                claims,
                hosts,
                ips,
                ports,
                action: r.action,
            });
        }
        Ok(Policy {
            version,
            default,
            rules,
        })
    }

    /// A policy with only a default.
    pub fn default_only(default: Action) -> Policy {
        Policy {
            version: 1,
            default,
            rules: Vec::new(),
        }
    }

    pub fn decide(&self, who: &Subject<'_>, to: &Destination<'_>) -> Decision {
        let mut lacking: Option<&Rule> = None;
        for rule in &self.rules {
            if !rule.matches_destination(to) {
                continue;
            }
            if rule.matches_subject(who) {
                return Decision {
                    action: rule.action,
                    rule: rule.id.clone(),
                    reason: format!("rule {} matched: {}", rule.id, rule.action),
                };
            }
            if lacking.is_none() && rule.action == Action::Allow {
                lacking = Some(rule);
            }
        }
        let reason = match lacking {
            Some(r) if !r.duties.is_empty() && !holds_any(who.duties, &r.duties) => format!(
                "identity {} holds none of the duties [{}] that rule {} requires for this destination; default {}",
                who.identity,
                r.duties.join(", "),
                r.id,
                self.default
            ),
            Some(r) => format!(
                "identity {} does not satisfy rule {} for this destination; default {}",
                who.identity, r.id, self.default
            ),
            None => format!("no rule matched; default {}", self.default),
        };
        Decision {
            action: self.default,
            rule: "default".into(),
            reason,
        }
    }
}

fn holds_any(have: &[String], want: &[String]) -> bool {
    want.iter().any(|w| have.contains(w))
}

impl Rule {
    fn matches_destination(&self, to: &Destination<'_>) -> bool {
        let host_ok = self.hosts.is_empty()
            || (!to.host.is_empty() && self.hosts.iter().any(|h| host_matches(h, to.host)));
        let ip_ok = self.ips.is_empty() || self.ips.iter().any(|c| c.contains(to.ip));
        let port_ok =
            self.ports.is_empty() || self.ports.iter().any(|(a, b)| (*a..=*b).contains(&to.port));
        host_ok && ip_ok && port_ok
    }

    fn matches_subject(&self, who: &Subject<'_>) -> bool {
        let ident_ok =
            self.identities.is_empty() || self.identities.iter().any(|i| i == who.identity);
        let duty_ok = self.duties.is_empty() || holds_any(who.duties, &self.duties);
        let claims_ok = self
            .claims
            .iter()
            .all(|(k, vals)| who.claims.get(k).is_some_and(|v| vals.contains(v)));
        ident_ok && duty_ok && claims_ok
    }
}

fn host_matches(p: &HostPattern, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match p {
        HostPattern::Exact(h) => host == *h,
        HostPattern::Suffix(s) => host
            .strip_suffix(s.as_str())
            .is_some_and(|pre| pre.len() > 1 && pre.ends_with('.')),
    }
}

/// `api.example.com` or `*.example.com`; a wildcard only as the whole
/// leading label, never a bare `*`.
fn parse_host(h: &str) -> Result<HostPattern, String> {
    let lower = h.trim_end_matches('.').to_ascii_lowercase();
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest.to_string()),
        None => (false, lower.clone()),
    };
    let valid = !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid {
        return Err(format!(
            "host {h:?} is not a host name or a leading-label wildcard; write \"api.example.com\" or \"*.example.com\" (punycode for non-ASCII)"
        ));
    }
    Ok(if wild {
        HostPattern::Suffix(name)
    } else {
        HostPattern::Exact(name)
    })
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| {
        format!("ip {s:?} is not an address or CIDR; write \"10.0.0.0/8\" or \"fd00::1\"")
    })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("ip {s:?}: prefix must be 0..={max}"))?,
        None => max,
    };
    Ok(Cidr {
        addr: addr.to_canonical(),
        prefix,
    })
}

fn parse_ports(p: &PortSpec) -> Result<(u16, u16), String> {
    match p {
        PortSpec::One(0) => Err("port 0 is not a port; leave `ports` out to match any".into()),
        PortSpec::One(n) => Ok((*n, *n)),
        PortSpec::Range(s) => {
            let bad = || format!("ports entry {s:?} is not a number or a range like \"8000-8100\"");
            let (a, b) = s.split_once('-').ok_or_else(bad)?;
            let a: u16 = a.trim().parse().map_err(|_| bad())?;
            let b: u16 = b.trim().parse().map_err(|_| bad())?;
            if a == 0 || a > b {
                return Err(bad());
            }
            Ok((a, b))
        }
    }
}

#[cfg(test)]
mod tests;
