//! The policy: a versioned list of rules and a default action.
//!
//! A rule has an **L4 part** (`identities`, `duties`, `claims`, `hosts`,
//! `ips`, `ports`), an optional **request part** (`methods`, `paths`,
//! `headers`, HTTP only) and, on `allow` rules, **effects** (`mask`:
//! response-body masking, `inject`: a secret set as a request header).
//!
//! Decision order (what `gateway check` prints):
//! 1. Rules are tried in the order they are written; the **first** rule
//!    whose every condition holds decides (allow or block).
//! 2. A condition left out matches anything. Lists match if any element
//!    matches (`duties`: the identity holds at least one of them); every
//!    listed header must be present with a value matching its glob (any
//!    value of a repeated header may match).
//! 3. No rule matches → the default action. When a rule matched the
//!    destination but not the identity, the reason says which duties were
//!    missing, so a refusal is never a mystery.
//! 4. When the outcome is allow, `mask` and `inject` add up over the
//!    deciding rule and every **later** matching `allow` rule, so one rule
//!    can decide and another add a credential. The same header injected
//!    twice: the earlier rule wins. The default carries no effects.
//!
//! Where each part is decided:
//! - [`Policy::plan`], before any byte is read: when no rule that could
//!   apply (subject, ip and port match) needs the host name, the request or
//!   HTTP effects, the connection is decided at once (and may use the
//!   kernel fast path); otherwise the proxy sniffs the first bytes.
//! - [`Policy::decide_connection`], after sniffing (host from SNI / Host):
//!   TLS and HTTP connections whose outcome depends on requests, or that
//!   need mask/inject, are inspected request by request
//!   ([`Policy::decide_request`]); the rest are decided for the whole
//!   connection. On other (opaque) TCP, rules with a request part never
//!   match, and an allow that needs mask/inject is refused, since neither
//!   can be applied.
//! - Paths are matched after [`glob::normalize_path`] (query cut off,
//!   unreserved `%XX` decoded, `//`, `.` and `..` resolved).
//!
//! Every decision carries the rule id (or `default`) and a readable reason;
//! both go into the audit record. Secret values never appear in either,
//! nor in `Debug` output: only the secret's name does.

// The HTTP half (plan / decide_connection / decide_request) is wired into
// the proxy by the interception work; until then only tests call it.

pub mod glob;
pub mod secret;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    ops::Range,
    sync::{Arc, Mutex, PoisonError},
};

use http::{HeaderMap, HeaderName};
use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use crate::{
    config::Action,
    mask::{MaskEntry, MaskSpec},
};
pub use glob::{PathGlob, ValueGlob};
pub use secret::SecretValue;

// === wire format ===

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub id: Spanned<String>,
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub duties: Vec<String>,
    /// claim name → accepted value(s).
    #[serde(default)]
    pub claims: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub ips: Vec<Spanned<String>>,
    #[serde(default)]
    pub ports: Vec<Spanned<PortSpec>>,
    /// HTTP methods, e.g. `["GET", "HEAD"]`.
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    /// Path globs, e.g. `["/v1/charges/**"]`.
    #[serde(default)]
    pub paths: Vec<Spanned<String>>,
    /// Header name → value glob (`"*"`: present).
    #[serde(default)]
    pub headers: BTreeMap<Spanned<String>, Spanned<String>>,
    /// Response-body masking (`crate::mask`).
    #[serde(default)]
    pub mask: Option<Spanned<Vec<Spanned<MaskEntry>>>>,
    /// `{ header = "...", secret = "..." }` or a list of them.
    #[serde(default)]
    pub inject: Option<Spanned<RawInjects>>,
    pub action: Spanned<Action>,
    /// `approve` rules: the duties any one of which may approve.
    #[serde(default)]
    pub approvers: Option<Spanned<Vec<String>>>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInject {
    pub header: Spanned<String>,
    pub secret: Spanned<String>,
}

/// One `inject` table or a list of them. (Not an untagged enum, so that
/// the spans inside survive for error messages.)
#[derive(Debug, Clone, Default)]
pub struct RawInjects(pub Vec<RawInject>);

impl<'de> Deserialize<'de> for RawInjects {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawInjects;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a table { header = \"...\", secret = \"...\" } or a list of such tables",
                )
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawInjects, A::Error> {
                RawInject::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|one| RawInjects(vec![one]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<RawInjects, A::Error> {
                Vec::<RawInject>::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(RawInjects)
            }
        }
        d.deserialize_any(V)
    }
}

/// A policy that cannot be built: the message (naming the rule, saying how
/// to fix it) and, when known, the byte range of the offending value in the
/// config text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub message: String,
    pub span: Option<Range<usize>>,
}

impl PolicyError {
    fn at(span: Range<usize>, message: String) -> PolicyError {
        PolicyError {
            message,
            span: Some(span),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
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

/// A secret set as a request header on matching requests.
#[derive(Debug, Clone)]
pub struct Injection {
    pub header: HeaderName,
    /// Redacted in `Debug`/`Display`; `value.header_value()` for the wire.
    pub value: SecretValue,
    /// The secret's name (safe to log).
    pub secret: String,
    /// The rule that asked for it.
    pub rule: String,
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
    /// Upper case.
    methods: Vec<String>,
    paths: Vec<PathGlob>,
    headers: Vec<(HeaderName, ValueGlob)>,
    mask_entries: Vec<MaskEntry>,
    mask: Option<Arc<MaskSpec>>,
    inject: Vec<Injection>,
    pub action: Action,
    /// Duties that may approve (`approve` rules only).
    approvers: Vec<String>,
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

/// What the proxy learned by sniffing a connection's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// A TLS ClientHello.
    Tls,
    /// A plain HTTP/1 request line.
    Http,
    /// Anything else.
    Opaque,
}

/// [`Policy::plan`]: decided before reading a byte, or sniff first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnPlan {
    Decided(Decision),
    Sniff,
}

/// [`Policy::decide_connection`]: decided for the whole connection, or
/// decide each HTTP request ([`Policy::decide_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnDecision {
    Decided(Decision),
    Inspect,
}

/// One HTTP request, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The request target's path (a query, if present, is ignored).
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, Clone)]
pub struct RequestDecision {
    pub decision: Decision,
    /// Mask response bodies with this (allow only).
    pub mask: Option<Arc<MaskSpec>>,
    /// Set these request headers (allow only); one per header name.
    pub inject: Vec<Injection>,
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
    merged: MaskCache,
}

/// Merged mask specs, per set of contributing rules (indices, in order).
#[derive(Clone, Default)]
struct MaskCache(Arc<Mutex<HashMap<Vec<usize>, Arc<MaskSpec>>>>);

/// More distinct sets than this are compiled per request, not kept.
const MASK_CACHE_MAX: usize = 256;

impl fmt::Debug for MaskCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.lock().map_or(0, |m| m.len());
        write!(f, "MaskCache({n} merged)")
    }
}

fn mask_entry_text(e: &MaskEntry) -> String {
    match e {
        MaskEntry::Detector(d) => d.clone(),
        MaskEntry::Json(j) => format!("json {}", j.json),
        MaskEntry::Regex(r) => format!(
            "regex {:?} as {}",
            r.regex,
            r.name.as_deref().unwrap_or("custom")
        ),
    }
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
        if !self.methods.is_empty() {
            write!(f, "; methods [{}]", list(&self.methods))?;
        }
        if !self.paths.is_empty() {
            let paths: Vec<String> = self.paths.iter().map(ToString::to_string).collect();
            write!(f, "; paths [{}]", paths.join(", "))?;
        }
        for (name, glob) in &self.headers {
            write!(f, "; header {name} ~ {glob:?}")?;
        }
        if !self.mask_entries.is_empty() {
            let m: Vec<String> = self.mask_entries.iter().map(mask_entry_text).collect();
            write!(f, "; mask [{}]", m.join(", "))?;
        }
        for i in &self.inject {
            write!(f, "; inject {} ← secret {}", i.header, i.secret)?;
        }
        if !self.approvers.is_empty() {
            write!(f, "; approvers [{}]", list(&self.approvers))?;
        }
        Ok(())
    }
}

/// What `gateway check` prints: the decision semantics, then the rules.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "policy v{}: {} rules, first match decides, else default {}",
            self.version,
            self.rules.len(),
            self.default
        )?;
        writeln!(
            f,
            "  order: rules are tried top to bottom; the first whose conditions all hold decides (allow, block or approve); none: default {}",
            self.default
        )?;
        writeln!(
            f,
            "  effects: on allow, mask and inject add up over the deciding rule and every later matching allow rule; a header injected twice: the earlier rule wins"
        )?;
        writeln!(
            f,
            "  http: methods/paths/headers are checked per request (TLS is intercepted only when a rule needs it); on non-HTTP TCP such rules never match, and an allow needing mask/inject is refused"
        )?;
        for r in &self.rules {
            writeln!(f, "  rule {r}")?;
        }
        Ok(())
    }
}

impl Policy {
    /// Validates the wire rules. Errors name the rule, say how to fix it
    /// and carry the span of the offending value. `secrets` are the loaded
    /// `[[secret]]`s by name, for `inject`.
    pub fn build(
        version: u32,
        default: Action,
        raw: Vec<RawRule>,
        secrets: &BTreeMap<String, SecretValue>,
    ) -> Result<Policy, PolicyError> {
        if version != 1 {
            return Err(PolicyError {
                message: format!(
                    "policy.version {version} is not supported; this gateway reads version = 1"
                ),
                span: None,
            });
        }
        let mut seen = std::collections::HashSet::new();
        let mut rules = Vec::with_capacity(raw.len());
        for r in raw {
            let id = r.id.get_ref().clone();
            if id.is_empty() {
                return Err(PolicyError::at(
                    r.id.span(),
                    "a rule has an empty id; give every rule a unique id".into(),
                ));
            }
            if !seen.insert(id.clone()) {
                return Err(PolicyError::at(
                    r.id.span(),
                    format!("rule id {id:?} is used twice; ids must be unique"),
                ));
            }
            let at = |span: Range<usize>| {
                let id = id.clone();
                move |m: String| PolicyError::at(span, format!("rule {id:?}: {m}"))
            };
            let hosts = r
                .hosts
                .iter()
                .map(|h| parse_host(h.get_ref()).map_err(at(h.span())))
                .collect::<Result<_, _>>()?;
            let ips = r
                .ips
                .iter()
                .map(|c| parse_cidr(c.get_ref()).map_err(at(c.span())))
                .collect::<Result<_, _>>()?;
            let ports = r
                .ports
                .iter()
                .map(|p| parse_ports(p.get_ref()).map_err(at(p.span())))
                .collect::<Result<_, _>>()?;
            let mut methods: Vec<String> = Vec::new();
            for m in &r.methods {
                let up = parse_method(m.get_ref()).map_err(at(m.span()))?;
                if !methods.contains(&up) {
                    methods.push(up);
                }
            }
            let paths = r
                .paths
                .iter()
                .map(|p| PathGlob::parse(p.get_ref()).map_err(at(p.span())))
                .collect::<Result<_, _>>()?;
            let mut headers: Vec<(HeaderName, ValueGlob)> = Vec::new();
            for (name, glob) in &r.headers {
                let n = HeaderName::from_bytes(name.get_ref().as_bytes()).map_err(|_| {
                    at(name.span())(format!(
                        "headers: {:?} is not an HTTP header name; use letters, digits and '-', e.g. \"x-env\"",
                        name.get_ref()
                    ))
                })?;
                if headers.iter().any(|(h, _)| *h == n) {
                    return Err(at(name.span())(format!(
                        "headers: {n} is listed twice (names are case-insensitive); keep one glob per header"
                    )));
                }
                let g = ValueGlob::parse(glob.get_ref())
                    .map_err(|m| at(glob.span())(format!("headers.{n}: {m}")))?;
                headers.push((n, g));
            }
            headers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            let action = *r.action.get_ref();
            let (mask_entries, mask) = match &r.mask {
                Some(list) if !list.get_ref().is_empty() => {
                    if action == Action::Block {
                        return Err(at(list.span())(
                            "mask only applies to allow and approve rules; move it to an allow rule or drop it"
                                .into(),
                        ));
                    }
                    for e in list.get_ref() {
                        MaskSpec::from_entries(std::slice::from_ref(e.get_ref()))
                            .map_err(|e2| at(e.span())(e2.to_string()))?;
                    }
                    let entries: Vec<MaskEntry> =
                        list.get_ref().iter().map(|e| e.get_ref().clone()).collect();
                    let spec = MaskSpec::from_entries(&entries)
                        .map_err(|e| at(list.span())(e.to_string()))?;
                    (entries, Some(Arc::new(spec)))
                }
                _ => (Vec::new(), None),
            };
            let mut inject: Vec<Injection> = Vec::new();
            if let Some(list) = &r.inject {
                if action == Action::Block && !list.get_ref().0.is_empty() {
                    return Err(at(list.span())(
                        "inject only applies to allow and approve rules; move it to an allow rule or drop it"
                            .into(),
                    ));
                }
                for i in &list.get_ref().0 {
                    let header =
                        parse_inject_header(i.header.get_ref()).map_err(at(i.header.span()))?;
                    if inject.iter().any(|x| x.header == header) {
                        return Err(at(i.header.span())(format!(
                            "inject sets {header} twice; keep one secret per header"
                        )));
                    }
                    let name = i.secret.get_ref();
                    let value = secrets.get(name).cloned().ok_or_else(|| {
                        at(i.secret.span())(format!(
                            "inject names secret {name:?}, which is not defined; add [[secret]] name = {name:?} with file = \"/path\" or credential = \"name\"{}",
                            if secrets.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    " (defined: {})",
                                    secrets.keys().cloned().collect::<Vec<_>>().join(", ")
                                )
                            }
                        ))
                    })?;
                    inject.push(Injection {
                        header,
                        value,
                        secret: name.clone(),
                        rule: id.clone(),
                    });
                }
            }
            let approvers = match (&r.approvers, action) {
                (Some(list), Action::Approve) => {
                    if list.get_ref().is_empty() || list.get_ref().iter().any(String::is_empty) {
                        return Err(at(list.span())(
                            "approvers must name at least one duty (non-empty), e.g. approvers = [\"approval-engine\"]".into(),
                        ));
                    }
                    list.get_ref().clone()
                }
                (None, Action::Approve) => {
                    return Err(at(r.action.span())(
                        "an approve rule needs approvers = [\"<duty>\", ...]: the duties of the identities that may approve (never the requester itself)".into(),
                    ));
                }
                (Some(list), _) => {
                    return Err(at(list.span())(format!(
                        "approvers only apply to action = \"approve\"; this rule's action is {}",
                        action
                    )));
                }
                (None, _) => Vec::new(),
            };
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
                id,
                identities: r.identities,
                duties: r.duties,
                claims,
                hosts,
                ips,
                ports,
                methods,
                paths,
                headers,
                mask_entries,
                mask,
                inject,
                action,
                approvers,
            });
        }
        Ok(Policy {
            version,
            default,
            rules,
            merged: MaskCache::default(),
        })
    }

    /// The approver duties of approve rule `rule` (empty if there is none).
    pub fn approvers_of(&self, rule: &str) -> Vec<String> {
        self.rules
            .iter()
            .find(|r| r.id == rule)
            .map(|r| r.approvers.clone())
            .unwrap_or_default()
    }

    /// Every duty any approve rule names, sorted.
    pub fn approver_duties(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .rules
            .iter()
            .flat_map(|r| r.approvers.iter().cloned())
            .collect();
        d.sort();
        d.dedup();
        d
    }

    /// A policy with only a default.
    pub fn default_only(default: Action) -> Policy {
        Policy {
            version: 1,
            default,
            rules: Vec::new(),
            merged: MaskCache::default(),
        }
    }

    /// Before reading any byte. Sniff when a rule that could apply (its
    /// subject part, ip and port match) needs the host name, the request
    /// or HTTP effects before a rule decides at L4 regardless of them;
    /// otherwise `Decided(self.decide(who, to))`. `to.host` here is the
    /// DNS-learned name or "".
    pub fn plan(&self, who: &Subject<'_>, to: &Destination<'_>) -> ConnPlan {
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.matches_ip_port(to) || !rule.matches_subject(who) {
                continue;
            }
            if !rule.hosts.is_empty() || rule.has_request_part() {
                return ConnPlan::Sniff;
            }
            // This rule decides whatever the host or the requests are.
            if rule.action != Action::Block
                && (rule.has_effects()
                    || self.rules[i + 1..].iter().any(|r| {
                        r.action == Action::Allow
                            && r.has_effects()
                            && r.matches_ip_port(to)
                            && r.matches_subject(who)
                    }))
            {
                return ConnPlan::Sniff;
            }
            break;
        }
        ConnPlan::Decided(self.decide(who, to))
    }

    /// After sniffing; `to.host` = SNI (TLS), Host header (HTTP), else the
    /// DNS name.
    ///
    /// TLS/HTTP: the rules whose subject and L4 part match are walked in
    /// order; a rule with a request part, or an allow decider that (or a
    /// later matching allow rule that) carries mask/inject → `Inspect`.
    /// Otherwise the first match decides, else the default.
    ///
    /// Opaque: rules with a request part are skipped; the first L4 match
    /// decides; an allow that needs mask/inject is refused (block).
    pub fn decide_connection(
        &self,
        who: &Subject<'_>,
        to: &Destination<'_>,
        traffic: Traffic,
    ) -> ConnDecision {
        if traffic == Traffic::Opaque {
            return ConnDecision::Decided(self.decide_opaque(who, to));
        }
        let mut lacking: Option<&Rule> = None;
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.matches_destination(to) {
                continue;
            }
            if !rule.matches_subject(who) {
                if lacking.is_none() && rule.action != Action::Block {
                    lacking = Some(rule);
                }
                continue;
            }
            if rule.has_request_part() {
                return ConnDecision::Inspect;
            }
            if rule.action != Action::Block
                && std::iter::once(rule)
                    .chain(self.later_l4_allows(i, who, to, false))
                    .any(Rule::has_effects)
            {
                return ConnDecision::Inspect;
            }
            return ConnDecision::Decided(rule.decision(String::new()));
        }
        ConnDecision::Decided(self.default_decision(who, lacking, None))
    }

    /// Per HTTP request; `to.host` = the request's host (Host / :authority
    /// without port). The first rule whose subject, L4 and request parts
    /// all match decides; on allow, mask and inject are gathered from it
    /// and every later matching allow rule.
    pub fn decide_request(
        &self,
        who: &Subject<'_>,
        to: &Destination<'_>,
        req: &Request<'_>,
    ) -> RequestDecision {
        let path = glob::normalize_path(req.path);
        let what = describe_request(req.method, &path, to);
        let matches = |r: &Rule| {
            r.matches_destination(to) && r.matches_request(req.method, &path, req.headers)
        };
        let mut lacking: Option<&Rule> = None;
        for (i, rule) in self.rules.iter().enumerate() {
            if !matches(rule) {
                continue;
            }
            if !rule.matches_subject(who) {
                if lacking.is_none() && rule.action != Action::Block {
                    lacking = Some(rule);
                }
                continue;
            }
            if rule.action == Action::Block {
                return RequestDecision {
                    decision: rule.decision(format!(" ({what})")),
                    mask: None,
                    inject: Vec::new(),
                };
            }
            let contributors: Vec<usize> = std::iter::once(i)
                .chain(
                    self.rules
                        .iter()
                        .enumerate()
                        .skip(i + 1)
                        .filter(|(_, r)| {
                            r.action == Action::Allow
                                && r.has_effects()
                                && matches(r)
                                && r.matches_subject(who)
                        })
                        .map(|(j, _)| j),
                )
                .collect();
            let mut inject: Vec<Injection> = Vec::new();
            for &c in &contributors {
                for inj in &self.rules[c].inject {
                    if !inject.iter().any(|x| x.header == inj.header) {
                        inject.push(inj.clone());
                    }
                }
            }
            let masking: Vec<usize> = contributors
                .iter()
                .copied()
                .filter(|c| self.rules[*c].mask.is_some())
                .collect();
            let mask = match self.merged_mask(&masking) {
                Ok(m) => m,
                Err(e) => {
                    // Cannot happen (each part compiled at load); refuse
                    // rather than forward unmasked.
                    return RequestDecision {
                        decision: Decision {
                            action: Action::Block,
                            rule: rule.id.clone(),
                            reason: format!(
                                "rule {} matched: allow ({what}), but its masks cannot be combined: {e}; blocked",
                                rule.id
                            ),
                        },
                        mask: None,
                        inject: Vec::new(),
                    };
                }
            };
            let mut extra = format!(" ({what})");
            if !masking.is_empty() {
                let ids: Vec<&str> = masking.iter().map(|c| self.rules[*c].id.as_str()).collect();
                extra += &format!("; mask from {}", ids.join(", "));
            }
            if !inject.is_empty() {
                let inj: Vec<String> = inject
                    .iter()
                    .map(|x| format!("{} from {}", x.header, x.rule))
                    .collect();
                extra += &format!("; inject {}", inj.join(", "));
            }
            return RequestDecision {
                decision: rule.decision(extra),
                mask,
                inject,
            };
        }
        RequestDecision {
            decision: self.default_decision(who, lacking, Some(&what)),
            mask: None,
            inject: Vec::new(),
        }
    }

    /// The L4 decision (unchanged signature): `decide_connection(..,
    /// Traffic::Opaque)`, never `Inspect`.
    pub fn decide(&self, who: &Subject<'_>, to: &Destination<'_>) -> Decision {
        self.decide_opaque(who, to)
    }

    fn decide_opaque(&self, who: &Subject<'_>, to: &Destination<'_>) -> Decision {
        let mut lacking: Option<&Rule> = None;
        for (i, rule) in self.rules.iter().enumerate() {
            // A rule with a request part cannot match what is not HTTP.
            if rule.has_request_part() || !rule.matches_destination(to) {
                continue;
            }
            if !rule.matches_subject(who) {
                if lacking.is_none() && rule.action != Action::Block {
                    lacking = Some(rule);
                }
                continue;
            }
            if rule.action != Action::Block
                && let Some(needy) = std::iter::once(rule)
                    .chain(self.later_l4_allows(i, who, to, true))
                    .find(|r| r.has_effects())
            {
                return Decision {
                    action: Action::Block,
                    rule: needy.id.clone(),
                    reason: format!(
                        "rule {} needs HTTP inspection (mask/inject) but this connection is not HTTP; blocked",
                        needy.id
                    ),
                };
            }
            return rule.decision(String::new());
        }
        self.default_decision(who, lacking, None)
    }

    /// Allow rules after `i` whose subject and L4 part match (and, when
    /// `l4_only`, that have no request part).
    fn later_l4_allows<'s>(
        &'s self,
        i: usize,
        who: &'s Subject<'_>,
        to: &'s Destination<'_>,
        l4_only: bool,
    ) -> impl Iterator<Item = &'s Rule> + 's {
        self.rules[i + 1..].iter().filter(move |r| {
            r.action == Action::Allow
                && !(l4_only && r.has_request_part())
                && r.matches_destination(to)
                && r.matches_subject(who)
        })
    }

    fn default_decision(
        &self,
        who: &Subject<'_>,
        lacking: Option<&Rule>,
        what: Option<&str>,
    ) -> Decision {
        let target = what.unwrap_or("this destination");
        let reason = match lacking {
            Some(r) if !r.duties.is_empty() && !holds_any(who.duties, &r.duties) => format!(
                "identity {} holds none of the duties [{}] that rule {} requires for {target}; default {}",
                who.identity,
                r.duties.join(", "),
                r.id,
                self.default
            ),
            Some(r) => format!(
                "identity {} does not satisfy rule {} for {target}; default {}",
                who.identity, r.id, self.default
            ),
            None => match what {
                Some(w) => format!("no rule matched {w}; default {}", self.default),
                None => format!("no rule matched; default {}", self.default),
            },
        };
        Decision {
            action: self.default,
            rule: "default".into(),
            reason,
        }
    }

    /// The rules' own specs when one rule masks; a merged spec, compiled
    /// once per set of rules, when several do.
    fn merged_mask(&self, masking: &[usize]) -> Result<Option<Arc<MaskSpec>>, String> {
        match masking {
            [] => Ok(None),
            [one] => Ok(self.rules[*one].mask.clone()),
            many => {
                if let Some(m) = self
                    .merged
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(many)
                {
                    return Ok(Some(m.clone()));
                }
                let entries: Vec<MaskEntry> = many
                    .iter()
                    .flat_map(|c| self.rules[*c].mask_entries.iter().cloned())
                    .collect();
                let spec = Arc::new(MaskSpec::from_entries(&entries).map_err(|e| e.to_string())?);
                let mut cache = self.merged.0.lock().unwrap_or_else(PoisonError::into_inner);
                if cache.len() < MASK_CACHE_MAX {
                    cache.insert(many.to_vec(), spec.clone());
                }
                Ok(Some(spec))
            }
        }
    }
}

fn holds_any(have: &[String], want: &[String]) -> bool {
    want.iter().any(|w| have.contains(w))
}

/// `DELETE /v1/x on db.prod.internal`, bounded in length.
fn describe_request(method: &str, path: &str, to: &Destination<'_>) -> String {
    const MAX: usize = 200;
    let path = match path.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &path[..cut]),
        None => path.to_string(),
    };
    let method: String = method.chars().take(32).collect();
    if to.host.is_empty() {
        format!("{method} {path} on {}", to.ip)
    } else {
        format!("{method} {path} on {}", to.host)
    }
}

impl Rule {
    fn decision(&self, extra: String) -> Decision {
        Decision {
            action: self.action,
            rule: self.id.clone(),
            reason: format!("rule {} matched: {}{extra}", self.id, self.action),
        }
    }

    fn has_request_part(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty() || !self.headers.is_empty()
    }

    fn has_effects(&self) -> bool {
        self.mask.is_some() || !self.inject.is_empty()
    }

    fn matches_ip_port(&self, to: &Destination<'_>) -> bool {
        let ip_ok = self.ips.is_empty() || self.ips.iter().any(|c| c.contains(to.ip));
        let port_ok =
            self.ports.is_empty() || self.ports.iter().any(|(a, b)| (*a..=*b).contains(&to.port));
        ip_ok && port_ok
    }

    /// Hosts, ips and ports.
    fn matches_destination(&self, to: &Destination<'_>) -> bool {
        let host_ok = self.hosts.is_empty()
            || (!to.host.is_empty() && self.hosts.iter().any(|h| host_matches(h, to.host)));
        host_ok && self.matches_ip_port(to)
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

    /// `path` normalised ([`glob::normalize_path`]).
    fn matches_request(&self, method: &str, path: &str, headers: &HeaderMap) -> bool {
        let method_ok = self.methods.is_empty() || self.methods.iter().any(|m| m == method);
        let path_ok = self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path));
        let headers_ok = self.headers.iter().all(|(name, glob)| {
            headers
                .get_all(name)
                .iter()
                .any(|v| glob.matches(v.as_bytes()))
        });
        method_ok && path_ok && headers_ok
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

/// An HTTP method token, upper-cased.
fn parse_method(m: &str) -> Result<String, String> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if m.is_empty() || m.len() > 32 || !m.chars().all(tchar) {
        return Err(format!(
            "method {m:?} is not an HTTP method; write e.g. \"GET\", \"POST\" or \"DELETE\""
        ));
    }
    Ok(m.to_ascii_uppercase())
}

/// A header `inject` may set: not a pseudo-header, nothing that frames or
/// routes the message.
fn parse_inject_header(h: &str) -> Result<HeaderName, String> {
    const FORBIDDEN: &[&str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ];
    let name = HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
        format!("inject header {h:?} is not an HTTP header name; write e.g. \"Authorization\" or \"X-Api-Key\"")
    })?;
    if FORBIDDEN.contains(&name.as_str()) {
        return Err(format!(
            "inject header {h:?} frames or routes the request and cannot be injected; inject a credential header such as \"Authorization\""
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests;
