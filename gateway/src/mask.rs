//! Response-body masking.
//!
//! A [`MaskSpec`] is built from the policy's `mask = [...]` list: built-in
//! detector names (see [`detectors::BUILTINS`]), JSON field selectors
//! (`{ json = "$.customer.tax_id" }`) and custom regexes
//! (`{ regex = "...", name = "..." }`).
//!
//! Replacement text: every masked value becomes `[MASKED:<name>]`, where
//! `<name>` is the detector name (`credit_card`, `email`, ...), the custom
//! rule's name, or `json_field` for a JSON selector. Card numbers keep their
//! last four digits: `[MASKED:credit_card:****1234]`. Inside JSON the
//! replacement is always a JSON string (a selected number becomes
//! `"[MASKED:json_field]"`).
//!
//! Overlapping matches: the one starting first wins; on equal start the
//! longest; on equal span the rule listed first (built-ins in the order of
//! [`detectors::BUILTINS`], then custom rules in config order).
//!
//! Bodies are masked by [`BodyMasker`] (picks the strategy from the
//! Content-Type) or, for text, directly by [`StreamMasker`], whose memory is
//! bounded by its holdback (default [`stream::DEFAULT_HOLDBACK`], 4096 bytes) plus one chunk.

pub mod detectors;
mod encoding;
mod json;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;

use regex::bytes::Regex;
use serde::Deserialize;

#[allow(unused_imports)] // The proxy's body streams use these once wired.
pub use encoding::{EncodedMasker, EncodingError};
pub use json::JsonPath;
pub use stream::StreamMasker;

/// Largest JSON or form body parsed as a whole; bigger bodies are masked as
/// streaming text (detectors only, selectors cannot apply).
pub const DEFAULT_STRUCTURED_CAP: usize = 8 * 1024 * 1024;

/// Counter name used for values masked by JSON field selectors.
pub const JSON_FIELD: &str = "json_field";

/// One entry of a policy's `mask = [...]` list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum MaskEntry {
    Detector(String),
    Json(JsonEntry),
    Regex(RegexEntry),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonEntry {
    pub json: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexEntry {
    pub regex: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaskSpecError {
    #[error(
        "unknown mask detector {name:?}; use one of: {known}, or {{ json = \"$.path\" }} / {{ regex = \"...\", name = \"...\" }}"
    )]
    UnknownDetector { name: String, known: String },
    #[error(
        "invalid mask regex {pattern:?}: {reason}; write a Rust `regex` crate pattern (no look-around or back-references) that cannot match the empty string"
    )]
    InvalidRegex { pattern: String, reason: String },
    #[error("invalid mask rule name {name:?}: use 1-64 characters of a-z, 0-9 and _")]
    InvalidName { name: String },
    #[error(
        "invalid JSON selector {path:?} at byte {at}: {reason}; supported: `$` followed by `.field`, `[*]` or `[N]`, e.g. $.items[*].ssn"
    )]
    InvalidJsonPath {
        path: String,
        at: usize,
        reason: String,
    },
}

pub(crate) struct Rule {
    pub name: String,
    pub re: Regex,
    pub group: Option<usize>,
    pub validate: detectors::Validator,
    pub keep_last4: bool,
}

/// A spec borrowed, or shared so that a masker can be `'static`.
#[derive(Clone)]
pub(crate) enum SpecRef<'a> {
    Borrowed(&'a MaskSpec),
    Shared(Arc<MaskSpec>),
}

impl Deref for SpecRef<'_> {
    type Target = MaskSpec;
    fn deref(&self) -> &MaskSpec {
        match self {
            SpecRef::Borrowed(s) => s,
            SpecRef::Shared(s) => s,
        }
    }
}

/// A compiled masking specification; cheap to share behind an `Arc`.
pub struct MaskSpec {
    pub(crate) rules: Vec<Rule>,
    pub(crate) selectors: Vec<JsonPath>,
}

impl std::fmt::Debug for MaskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskSpec")
            .field(
                "rules",
                &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>(),
            )
            .field("selectors", &self.selectors)
            .finish()
    }
}

fn no_check(_: &[u8], _: usize, _: usize) -> bool {
    true
}

impl MaskSpec {
    /// Compiles a `mask = [...]` list. Duplicated entries are harmless.
    pub fn from_entries(entries: &[MaskEntry]) -> Result<MaskSpec, MaskSpecError> {
        let mut builtins: Vec<&'static detectors::Builtin> = Vec::new();
        let mut custom = Vec::new();
        let mut selectors = Vec::new();
        for entry in entries {
            match entry {
                MaskEntry::Detector(name) => {
                    let b =
                        detectors::builtin(name).ok_or_else(|| MaskSpecError::UnknownDetector {
                            name: name.clone(),
                            known: detectors::builtin_names().join(", "),
                        })?;
                    if !builtins.iter().any(|x| x.name == b.name) {
                        builtins.push(b);
                    }
                }
                MaskEntry::Json(j) => selectors.push(JsonPath::parse(&j.json)?),
                MaskEntry::Regex(r) => {
                    let name = r.name.clone().unwrap_or_else(|| "custom".to_string());
                    if name.is_empty()
                        || name.len() > 64
                        || !name
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    {
                        return Err(MaskSpecError::InvalidName { name });
                    }
                    let re = Regex::new(&r.regex).map_err(|e| MaskSpecError::InvalidRegex {
                        pattern: r.regex.clone(),
                        reason: e.to_string(),
                    })?;
                    if re.is_match(b"") {
                        return Err(MaskSpecError::InvalidRegex {
                            pattern: r.regex.clone(),
                            reason: "it matches the empty string".into(),
                        });
                    }
                    custom.push(Rule {
                        name,
                        re,
                        group: None,
                        validate: no_check,
                        keep_last4: false,
                    });
                }
            }
        }
        // Built-ins in their fixed priority order, then custom rules.
        builtins.sort_by_key(|b| detectors::BUILTINS.iter().position(|x| x.name == b.name));
        let mut rules: Vec<Rule> = builtins
            .into_iter()
            .map(|b| Rule {
                name: b.name.to_string(),
                re: Regex::new(b.pattern).expect("built-in mask pattern compiles"),
                group: b.group,
                validate: b.validate,
                keep_last4: b.name == "credit_card",
            })
            .collect();
        rules.extend(custom);
        Ok(MaskSpec { rules, selectors })
    }

    /// Convenience for tests and config code: detector names only.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn from_names(names: &[&str]) -> Result<MaskSpec, MaskSpecError> {
        let entries: Vec<MaskEntry> = names
            .iter()
            .map(|n| MaskEntry::Detector(n.to_string()))
            .collect();
        MaskSpec::from_entries(&entries)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.selectors.is_empty()
    }

    /// Masks a complete text (bytes need not be UTF-8) in one go.
    pub fn mask_text(&self, text: &[u8], counts: &mut Counts) -> Vec<u8> {
        let mut s = StreamMasker::new(self);
        let mut out = s.push(text);
        out.extend(s.finish());
        counts.merge(s.counts());
        out
    }
}

/// Masked-value counters by detector name, for the audit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(BTreeMap<String, u64>);

impl Counts {
    pub fn add(&mut self, name: &str) {
        *self.0.entry(name.to_string()).or_default() += 1;
    }
    pub fn merge(&mut self, other: &Counts) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }
    pub fn by_name(&self) -> &BTreeMap<String, u64> {
        &self.0
    }
}

/// A match chosen for replacement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hit {
    pub start: usize,
    pub end: usize,
    pub rule: usize,
}

/// Finds every rule's matches in `hay[from..]` (looking at bytes before
/// `from` as context only). `raw` receives every regex match span, valid or
/// not; `hits` the validated spans to mask, resolved so none overlap.
pub(crate) fn scan(
    spec: &MaskSpec,
    hay: &[u8],
    from: usize,
    raw: &mut Vec<(usize, usize)>,
    hits: &mut Vec<Hit>,
) {
    let mut found = Vec::new();
    for (ri, rule) in spec.rules.iter().enumerate() {
        let mut pos = from;
        while pos <= hay.len() {
            let (m_start, m_end, span) = match rule.group {
                None => match rule.re.find_at(hay, pos) {
                    Some(m) => (m.start(), m.end(), (m.start(), m.end())),
                    None => break,
                },
                Some(g) => match rule.re.captures_at(hay, pos) {
                    Some(c) => {
                        let m = c.get(0).expect("group 0");
                        let s = c
                            .get(g)
                            .map_or((m.start(), m.end()), |x| (x.start(), x.end()));
                        (m.start(), m.end(), s)
                    }
                    None => break,
                },
            };
            if m_end == m_start {
                pos = m_end + 1;
                continue;
            }
            raw.push((m_start, m_end));
            if span.1 > span.0 && (rule.validate)(hay, span.0, span.1) {
                found.push(Hit {
                    start: span.0,
                    end: span.1,
                    rule: ri,
                });
            }
            pos = m_end;
        }
    }
    found.sort_by_key(|h| (h.start, std::cmp::Reverse(h.end), h.rule));
    let mut last_end = from;
    for h in found {
        if h.start >= last_end {
            last_end = h.end;
            hits.push(h);
        }
    }
}

/// The replacement for one match.
pub(crate) fn replacement(rule: &Rule, matched: &[u8]) -> String {
    if rule.keep_last4 {
        let digits: Vec<u8> = matched.iter().copied().filter(u8::is_ascii_digit).collect();
        let last4 = String::from_utf8_lossy(&digits[digits.len().saturating_sub(4)..]).into_owned();
        format!("[MASKED:{}:****{last4}]", rule.name)
    } else {
        format!("[MASKED:{}]", rule.name)
    }
}

/// How a body is masked, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
    Text,
    /// Images, archives, octet streams...: passed through untouched.
    Opaque,
}

impl BodyKind {
    pub fn from_content_type(ct: Option<&str>) -> BodyKind {
        let Some(ct) = ct else { return BodyKind::Text };
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime == "application/json" || mime.ends_with("+json") || mime == "text/json" {
            BodyKind::Json
        } else if mime == "application/x-www-form-urlencoded" {
            BodyKind::Form
        } else if mime.starts_with("text/")
            || mime.is_empty()
            || mime.ends_with("+xml")
            || matches!(
                mime.as_str(),
                "application/xml"
                    | "application/javascript"
                    | "application/x-javascript"
                    | "application/xhtml+xml"
            )
        {
            BodyKind::Text
        } else {
            BodyKind::Opaque
        }
    }
}

enum Mode<'a> {
    /// Buffering a structured body (JSON or form) until `finish` or the cap.
    Structured {
        kind: BodyKind,
        buf: Vec<u8>,
    },
    Stream(StreamMasker<'a>),
    Opaque,
}

/// Masks one response body, chunk by chunk. JSON and form bodies are
/// buffered up to `structured_cap` bytes and masked structurally; past the
/// cap (or if they do not parse) they are masked as streaming text.
pub struct BodyMasker<'a> {
    spec: SpecRef<'a>,
    mode: Mode<'a>,
    cap: usize,
    counts: Counts,
}

impl<'a> BodyMasker<'a> {
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn new(spec: &'a MaskSpec, content_type: Option<&str>) -> BodyMasker<'a> {
        BodyMasker::with_cap(spec, content_type, DEFAULT_STRUCTURED_CAP)
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn with_cap(spec: &'a MaskSpec, content_type: Option<&str>, cap: usize) -> BodyMasker<'a> {
        BodyMasker::from_ref(SpecRef::Borrowed(spec), content_type, cap)
    }

    /// Like [`BodyMasker::with_cap`], owning a share of the spec, so the
    /// masker can live in a `'static` body stream.
    pub fn shared(
        spec: Arc<MaskSpec>,
        content_type: Option<&str>,
        cap: usize,
    ) -> BodyMasker<'static> {
        BodyMasker::from_ref(SpecRef::Shared(spec), content_type, cap)
    }

    fn from_ref(spec: SpecRef<'a>, content_type: Option<&str>, cap: usize) -> BodyMasker<'a> {
        let mode = match BodyKind::from_content_type(content_type) {
            k @ (BodyKind::Json | BodyKind::Form) => Mode::Structured {
                kind: k,
                buf: Vec::new(),
            },
            BodyKind::Text => Mode::Stream(StreamMasker::from_ref(
                spec.clone(),
                stream::DEFAULT_HOLDBACK,
            )),
            BodyKind::Opaque => Mode::Opaque,
        };
        BodyMasker {
            spec,
            mode,
            cap,
            counts: Counts::default(),
        }
    }

    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        match &mut self.mode {
            Mode::Opaque => chunk.to_vec(),
            Mode::Stream(s) => s.push(chunk),
            Mode::Structured { buf, .. } => {
                if buf.len() + chunk.len() <= self.cap {
                    buf.extend_from_slice(chunk);
                    return Vec::new();
                }
                let held = std::mem::take(buf);
                let mut s = StreamMasker::from_ref(self.spec.clone(), stream::DEFAULT_HOLDBACK);
                let mut out = s.push(&held);
                out.extend(s.push(chunk));
                self.mode = Mode::Stream(s);
                out
            }
        }
    }

    pub fn finish(&mut self) -> Vec<u8> {
        match std::mem::replace(&mut self.mode, Mode::Opaque) {
            Mode::Opaque => Vec::new(),
            Mode::Stream(mut s) => {
                let out = s.finish();
                self.counts.merge(s.counts());
                out
            }
            Mode::Structured { kind, buf } => {
                let done = match kind {
                    BodyKind::Json => json::mask_json(&self.spec, &buf, &mut self.counts),
                    _ => Some(mask_form(&self.spec, &buf, &mut self.counts)),
                };
                done.unwrap_or_else(|| self.spec.mask_text(&buf, &mut self.counts))
            }
        }
    }

    /// Values masked so far, by name (complete after `finish`).
    pub fn counts(&self) -> Counts {
        let mut c = self.counts.clone();
        if let Mode::Stream(s) = &self.mode {
            c.merge(s.counts());
        }
        c
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn masked_count(&self) -> u64 {
        self.counts().total()
    }

    /// Body bytes held right now, not yet returned: the structured buffer
    /// (up to the cap) or the streaming masker's pending text.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn buffered(&self) -> usize {
        match &self.mode {
            Mode::Structured { buf, .. } => buf.len(),
            Mode::Stream(s) => s.buffered(),
            Mode::Opaque => 0,
        }
    }
}

/// Masks a complete body in one call.
#[cfg_attr(not(test), allow(dead_code))]
pub fn mask_body(spec: &MaskSpec, content_type: Option<&str>, body: &[u8]) -> (Vec<u8>, Counts) {
    let mut m = BodyMasker::new(spec, content_type);
    let mut out = m.push(body);
    out.extend(m.finish());
    (out, m.counts())
}

/// `application/x-www-form-urlencoded`: each value is decoded, masked and,
/// only if something was masked, re-encoded; everything else is kept byte
/// for byte.
pub(crate) fn mask_form(spec: &MaskSpec, body: &[u8], counts: &mut Counts) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    for (i, pair) in body.split(|b| *b == b'&').enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        let Some(eq) = pair.iter().position(|b| *b == b'=') else {
            out.extend_from_slice(pair);
            continue;
        };
        let (key, value) = (&pair[..eq], &pair[eq + 1..]);
        let decoded: Vec<u8> = form_urlencoded::parse(&[b"v=", value].concat())
            .next()
            .map(|(_, v)| v.into_owned().into_bytes())
            .unwrap_or_default();
        let mut local = Counts::default();
        let masked = spec.mask_text(&decoded, &mut local);
        out.extend_from_slice(key);
        out.push(b'=');
        if local.total() == 0 {
            out.extend_from_slice(value);
        } else {
            counts.merge(&local);
            let enc: String = form_urlencoded::byte_serialize(&masked).collect();
            out.extend_from_slice(enc.as_bytes());
        }
    }
    out
}
