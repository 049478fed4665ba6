//! OIDC tokens: verification of JWTs against the JWKS of trusted issuers, and
//! acquisition of access tokens by the client-credentials grant.
//!
//! A token is accepted only when, in this order:
//! 1. it parses as a compact JWS (three base64url segments, JSON header and
//!    payload) — else [`VerifyError::Malformed`];
//! 2. its header `alg` is an asymmetric signature algorithm (`none` and every
//!    HMAC algorithm are refused outright, so a public key can never be used
//!    as an HMAC secret) — else [`VerifyError::AlgNotAllowed`];
//! 3. its `iss` is exactly one of the trusted issuers — checked before any
//!    network access, so an untrusted issuer never causes a fetch — else
//!    [`VerifyError::UntrustedIssuer`];
//! 4. `alg` is in that issuer's allow-list — else [`VerifyError::AlgNotAllowed`];
//! 5. the issuer's JWKS has a key with the header's `kid` whose type fits
//!    `alg` — else [`VerifyError::UnknownKey`] / [`VerifyError::KeyMismatch`]
//!    (an unknown `kid` first triggers one rate-limited JWKS refetch);
//! 6. the signature verifies with that key — else [`VerifyError::BadSignature`];
//! 7. `aud` (string or array) holds one of the issuer's audiences, `exp` is
//!    present and not past, `nbf` (if present) is not in the future, both
//!    with the configured leeway.
//!
//! Errors never contain the token; claim values quoted in them are shortened.

mod client;
mod keys;

#[cfg(test)]
mod provider_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

pub use client::ClientCredentials;
#[cfg(test)]
pub use client::{OidcError, Token};
use keys::IssuerKeys;

/// Tokens larger than this are refused before any parsing.
const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Claim values quoted in error messages are cut to this many characters.
const MAX_QUOTED: usize = 120;

/// An asymmetric JWS signature algorithm. There is deliberately no `none`
/// and no HMAC variant: they cannot be configured, so they cannot be allowed.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Alg {
    /// The allow-list used when an issuer configures none.
    pub const DEFAULT_ALLOWED: [Alg; 4] = [Alg::RS256, Alg::ES256, Alg::PS256, Alg::EdDSA];

    pub fn as_str(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::EdDSA => "EdDSA",
        }
    }

    fn jwt(self) -> jsonwebtoken::Algorithm {
        use jsonwebtoken::Algorithm as J;
        match self {
            Alg::RS256 => J::RS256,
            Alg::RS384 => J::RS384,
            Alg::RS512 => J::RS512,
            Alg::PS256 => J::PS256,
            Alg::PS384 => J::PS384,
            Alg::PS512 => J::PS512,
            Alg::ES256 => J::ES256,
            Alg::ES384 => J::ES384,
            Alg::EdDSA => J::EdDSA,
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Alg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "PS256" => Alg::PS256,
            "PS384" => Alg::PS384,
            "PS512" => Alg::PS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "EdDSA" => Alg::EdDSA,
            other => {
                return Err(format!(
                    "`{}` is not an allowed signature algorithm; use one of RS256, RS384, \
                     RS512, PS256, PS384, PS512, ES256, ES384, EdDSA (never none or HS*)",
                    shorten(other)
                ));
            }
        })
    }
}

/// An issuer whose tokens the gateway accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedIssuer {
    /// The exact `iss` value, a URL; discovery is at
    /// `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// At least one of these must be in the token's `aud`.
    pub audiences: Vec<String>,
    /// Header `alg` values accepted for this issuer.
    pub algorithms: Vec<Alg>,
}

impl TrustedIssuer {
    /// An issuer with the default algorithm allow-list
    /// ([`Alg::DEFAULT_ALLOWED`]).
    pub fn new(issuer: impl Into<String>, audiences: Vec<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audiences,
            algorithms: Alg::DEFAULT_ALLOWED.to_vec(),
        }
    }
}

/// Why a token was refused. Each variant is a distinct, user-readable reason;
/// none of them carries the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("signature algorithm `{alg}` is not allowed (never none, never HMAC)")]
    AlgNotAllowed { alg: String },
    #[error("issuer `{iss}` is not a trusted issuer")]
    UntrustedIssuer { iss: String },
    #[error("token audience {aud} does not include any of {expected}")]
    WrongAudience { aud: String, expected: String },
    #[error("token expired at {exp} (unix time), it is now {now}")]
    Expired { exp: u64, now: u64 },
    #[error("token is not valid before {nbf} (unix time), it is now {now}")]
    NotYetValid { nbf: u64, now: u64 },
    #[error(
        "no key `{kid}` in the issuer's JWKS as last fetched (an unknown kid refetches it, at most once per jwks_min_refetch_secs)"
    )]
    UnknownKey { kid: String },
    #[error("key `{kid}` in the issuer's JWKS cannot verify `{alg}` signatures")]
    KeyMismatch { kid: String, alg: String },
    #[error("signature does not verify with the issuer's key")]
    BadSignature,
    #[error("cannot get the issuer's signing keys: {0}")]
    Jwks(String),
}

impl VerifyError {
    /// A short stable code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Malformed(_) => "malformed",
            VerifyError::AlgNotAllowed { .. } => "alg_not_allowed",
            VerifyError::UntrustedIssuer { .. } => "untrusted_issuer",
            VerifyError::WrongAudience { .. } => "wrong_audience",
            VerifyError::Expired { .. } => "expired",
            VerifyError::NotYetValid { .. } => "not_yet_valid",
            VerifyError::UnknownKey { .. } => "unknown_key",
            VerifyError::KeyMismatch { .. } => "key_mismatch",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::Jwks(_) => "jwks_unavailable",
        }
    }
}

/// The verified claims of a token.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    /// `aud`, normalised to a list.
    pub aud: Vec<String>,
    pub exp: u64,
    /// The `groups` claim (a string or an array of strings; empty if absent).
    pub groups: Vec<String>,
    /// Every claim of the token, the ones above included.
    pub extra: Map<String, Value>,
}

impl Claims {
    /// The duties these claims grant.
    ///
    /// The values of claim `groups_claim` (a string is one value, an array
    /// contributes its string elements) become duties:
    /// - with an **empty** `mapping`, every value is a duty as-is;
    /// - with a **non-empty** `mapping`, only values that have an entry count,
    ///   each granting the duties listed for it; unmapped values grant
    ///   nothing. A mapping is an allow-list, so a new group created at the
    ///   IdP grants no duty until someone maps it.
    ///
    /// The result is sorted and free of duplicates.
    pub fn duties(
        &self,
        groups_claim: &str,
        mapping: &BTreeMap<String, Vec<String>>,
    ) -> Vec<String> {
        let values = self
            .extra
            .get(groups_claim)
            .map(string_values)
            .unwrap_or_default();
        let mut duties: Vec<String> = if mapping.is_empty() {
            values
        } else {
            values
                .iter()
                .filter_map(|v| mapping.get(v))
                .flatten()
                .cloned()
                .collect()
        };
        duties.sort();
        duties.dedup();
        duties
    }

    /// A scalar claim as a string (`repository`, `ref`, `workflow`, `actor`,
    /// `run_id`, …): strings as they are, numbers and booleans in their JSON
    /// spelling; `None` if absent, null, an array or an object.
    pub fn claim_str(&self, name: &str) -> Option<String> {
        match self.extra.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// `exp` as a point in time.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }
}

/// A secret string (client secret, raw token) whose `Debug` and `Display`
/// print `***`. Read it with [`Secret::expose`].
#[derive(Clone, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Verifies tokens of a fixed set of trusted issuers, caching each issuer's
/// JWKS. Share it (`Arc<Verifier>`) rather than building one per token: the
/// key cache and the refetch rate limit live in it.
#[derive(Debug)]
pub struct Verifier {
    issuers: Vec<(TrustedIssuer, Arc<IssuerKeys>)>,
    leeway: Duration,
    policy: keys::FetchPolicy,
    http: reqwest::Client,
}

impl Verifier {
    /// Default minimum time between two JWKS fetches for one issuer.
    pub const DEFAULT_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
    /// Default age after which cached keys are refreshed in the background.
    pub const DEFAULT_MAX_KEY_AGE: Duration = Duration::from_secs(3600);

    pub fn new(issuers: Vec<TrustedIssuer>, leeway: Duration) -> Self {
        let issuers = issuers
            .into_iter()
            .map(|t| {
                let keys = Arc::new(IssuerKeys::new(&t.issuer));
                (t, keys)
            })
            .collect();
        Self {
            issuers,
            leeway,
            policy: keys::FetchPolicy {
                refetch_interval: Self::DEFAULT_REFETCH_INTERVAL,
                max_age: Self::DEFAULT_MAX_KEY_AGE,
            },
            http: http_client(),
        }
    }

    /// At most one JWKS fetch per issuer per `interval` (unknown `kid`s and
    /// stale caches both count).
    pub fn with_refetch_interval(mut self, interval: Duration) -> Self {
        self.policy.refetch_interval = interval;
        self
    }

    /// Cached keys older than `age` are refreshed in the background; until a
    /// refresh succeeds the old keys keep working (IdP outages).
    #[cfg(test)]
    pub fn with_max_key_age(mut self, age: Duration) -> Self {
        self.policy.max_age = age;
        self
    }

    /// Use this HTTP client for discovery, JWKS and token requests.
    #[cfg(test)]
    pub fn with_http_client(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    pub fn http_client(&self) -> &reqwest::Client {
        &self.http
    }

    #[cfg(test)]
    pub fn trusted_issuers(&self) -> impl Iterator<Item = &TrustedIssuer> {
        self.issuers.iter().map(|(t, _)| t)
    }

    #[cfg(test)]
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Verify `token` now. See the module documentation for the checks.
    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        self.verify_at(token, SystemTime::now()).await
    }

    /// Verify `token` as of `now` (time-dependent checks only; keys are
    /// whatever the cache holds or fetches now).
    pub async fn verify_at(&self, token: &str, now: SystemTime) -> Result<Claims, VerifyError> {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let jws = Jws::parse(token)?;
        let alg = jws.alg;
        let iss = match jws.payload.get("iss") {
            Some(Value::String(iss)) => iss,
            Some(_) => return Err(malformed("`iss` is not a string")),
            None => return Err(malformed("no `iss` claim")),
        };
        let (trusted, keys) = self
            .issuers
            .iter()
            .find(|(t, _)| t.issuer == *iss)
            .ok_or_else(|| VerifyError::UntrustedIssuer { iss: shorten(iss) })?;
        if !trusted.algorithms.contains(&alg) {
            return Err(VerifyError::AlgNotAllowed {
                alg: alg.to_string(),
            });
        }

        let candidates = keys
            .keys_for(jws.kid.as_deref(), alg, &self.http, &self.policy)
            .await?;
        let verified = candidates.iter().any(|key| {
            jsonwebtoken::crypto::verify(
                jws.signature,
                jws.signing_input.as_bytes(),
                key,
                alg.jwt(),
            )
            .unwrap_or(false)
        });
        if !verified {
            return Err(VerifyError::BadSignature);
        }

        self.check_claims(trusted, jws.payload, now)
    }

    fn check_claims(
        &self,
        trusted: &TrustedIssuer,
        payload: Map<String, Value>,
        now: u64,
    ) -> Result<Claims, VerifyError> {
        let leeway = self.leeway.as_secs();
        let aud = match payload.get("aud") {
            None => Vec::new(),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| malformed("`aud` array holds a non-string"))?,
            Some(_) => return Err(malformed("`aud` is neither a string nor an array")),
        };
        if !aud.iter().any(|a| trusted.audiences.contains(a)) {
            return Err(VerifyError::WrongAudience {
                aud: if aud.is_empty() {
                    "(none)".to_owned()
                } else {
                    shorten(&quote_list(&aud))
                },
                expected: quote_list(&trusted.audiences),
            });
        }
        let exp = numeric_date(&payload, "exp")?
            .ok_or_else(|| malformed("no `exp` claim: tokens without expiry are refused"))?;
        if now >= exp.saturating_add(leeway) {
            return Err(VerifyError::Expired { exp, now });
        }
        if let Some(nbf) = numeric_date(&payload, "nbf")?
            && now.saturating_add(leeway) < nbf
        {
            return Err(VerifyError::NotYetValid { nbf, now });
        }
        let sub = match payload.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(malformed("no `sub` claim (or not a non-empty string)")),
        };
        let groups = payload.get("groups").map(string_values).unwrap_or_default();
        Ok(Claims {
            sub,
            iss: trusted.issuer.clone(),
            aud,
            exp,
            groups,
            extra: payload,
        })
    }

    #[cfg(test)]
    pub(crate) fn preload_keys(&self, issuer: &str, jwks: jsonwebtoken::jwk::JwkSet) {
        let (_, keys) = self
            .issuers
            .iter()
            .find(|(t, _)| t.issuer == issuer)
            .expect("preload_keys: issuer is not trusted");
        keys.preload(jwks);
    }
}

/// The HTTP client for discovery, JWKS and token requests: rustls with the
/// system roots and the bundled webpki roots, no redirects (an issuer's
/// endpoints are named in its discovery document), bounded time.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .user_agent(concat!("gateway/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("building the rustls HTTP client with no custom settings cannot fail")
}

/// A compact JWS split and decoded, signature not yet checked.
struct Jws<'a> {
    alg: Alg,
    kid: Option<String>,
    payload: Map<String, Value>,
    signing_input: &'a str,
    signature: &'a str,
}

impl<'a> Jws<'a> {
    fn parse(token: &'a str) -> Result<Self, VerifyError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(malformed("empty token"));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed(&format!(
                "token is longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let parts: Vec<&str> = token.split('.').collect();
        match parts.len() {
            3 => {}
            5 => return Err(malformed("encrypted tokens (JWE) are not supported")),
            n => {
                return Err(malformed(&format!(
                    "expected 3 dot-separated segments, found {n}"
                )));
            }
        }
        let header = decode_json(parts[0], "header")?;
        // The algorithm is judged first, so `alg: none` (with its empty
        // signature) and HMAC tokens are reported as such.
        let alg = match header.get("alg") {
            Some(Value::String(a)) => a
                .parse::<Alg>()
                .map_err(|_| VerifyError::AlgNotAllowed { alg: shorten(a) })?,
            Some(_) => return Err(malformed("header `alg` is not a string")),
            None => return Err(malformed("header has no `alg`")),
        };
        let kid = match header.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(malformed("header `kid` is not a string")),
        };
        if header.contains_key("crit") {
            return Err(malformed(
                "critical header extensions (`crit`) are not supported",
            ));
        }
        let payload = decode_json(parts[1], "payload")?;
        if parts[2].is_empty() {
            return Err(malformed("empty signature"));
        }
        if URL_SAFE_NO_PAD.decode(parts[2]).is_err() {
            return Err(malformed("signature is not base64url"));
        }
        let signing_input = &token[..parts[0].len() + 1 + parts[1].len()];
        Ok(Self {
            alg,
            kid,
            payload,
            signing_input,
            signature: parts[2],
        })
    }
}

fn decode_json(segment: &str, what: &str) -> Result<Map<String, Value>, VerifyError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| malformed(&format!("{what} is not base64url")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(malformed(&format!("{what} is not a JSON object"))),
        Err(e) => Err(malformed(&format!("{what} is not JSON ({e})"))),
    }
}

/// A NumericDate claim as whole seconds; fractions are truncated.
fn numeric_date(payload: &Map<String, Value>, name: &str) -> Result<Option<u64>, VerifyError> {
    match payload.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
                    _ => Err(malformed(&format!("`{name}` is not a non-negative number"))),
                }
            }
        }
        Some(_) => Err(malformed(&format!("`{name}` is not a number"))),
    }
}

/// A claim's string values: a string is one value, an array contributes its
/// string elements, anything else none.
fn string_values(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn malformed(reason: &str) -> VerifyError {
    VerifyError::Malformed(reason.to_owned())
}

fn quote_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("`{i}`")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Cut attacker-controlled text quoted in errors and logs.
fn shorten(s: &str) -> String {
    if s.chars().count() <= MAX_QUOTED {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(MAX_QUOTED).collect();
        out.push('…');
        out
    }
}

/// An error's whole source chain, for errors from HTTP clients whose
/// top-level message alone ("error sending request") says too little.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = s.source();
    }
    out
}
