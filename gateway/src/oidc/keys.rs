//! The signing keys of one trusted issuer: discovery, JWKS fetch, cache, and
//! the rate-limited refetch that makes key rotation at the IdP just work.
//!
//! Cached keys are never dropped because a fetch failed: when the IdP is
//! down, tokens signed with keys we already hold keep verifying.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use serde_json::Value;

use super::{Alg, VerifyError, error_chain, shorten};

/// Discovery documents and JWKS larger than this are refused.
const MAX_DOCUMENT: usize = 1024 * 1024;

/// RSA keys with a shorter modulus are ignored.
const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, Clone, Copy)]
pub(super) struct FetchPolicy {
    /// Minimum time between two fetches for one issuer.
    pub refetch_interval: Duration,
    /// Age after which the cache is refreshed (in the background).
    pub max_age: Duration,
}

#[derive(Debug)]
pub(super) struct IssuerKeys {
    issuer: String,
    state: Mutex<State>,
    /// Serialises fetches, so concurrent tokens with one new `kid` cause one
    /// fetch, not one each.
    fetch_lock: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    keys: Option<Arc<Vec<CachedKey>>>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    /// The most recent fetch's failure; cleared by a success.
    last_error: Option<String>,
}

#[derive(Clone)]
struct CachedKey {
    kid: Option<String>,
    jwk: Jwk,
    key: DecodingKey,
}

impl std::fmt::Debug for CachedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

enum Selected {
    Keys(Vec<DecodingKey>),
    /// The `kid` exists but none of its keys can check `alg` signatures.
    Mismatch,
    NotFound,
}

impl IssuerKeys {
    pub(super) fn new(issuer: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            state: Mutex::new(State::default()),
            fetch_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The keys that may have signed a token with header `kid` and `alg`:
    /// the one key with that `kid`, or, for a token without `kid`, every key
    /// fit for `alg`.
    pub(super) async fn keys_for(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Alg,
        http: &reqwest::Client,
        policy: &FetchPolicy,
    ) -> Result<Vec<DecodingKey>, VerifyError> {
        let kid_label = || kid.map_or_else(|| "(no kid)".to_owned(), shorten);
        let mismatch = || VerifyError::KeyMismatch {
            kid: kid_label(),
            alg: alg.to_string(),
        };

        // Fast path: the cache knows the key.
        let (keys, stale) = self.snapshot(policy);
        if let Some(keys) = &keys {
            match select(keys, kid, alg) {
                Selected::Keys(found) => {
                    if stale {
                        self.refresh_in_background(http, policy);
                    }
                    return Ok(found);
                }
                Selected::Mismatch => return Err(mismatch()),
                Selected::NotFound => {}
            }
        }

        // Unknown key, or no keys yet: one rate-limited fetch, shared with
        // whoever else is waiting for it.
        let _fetching = self.fetch_lock.lock().await;
        if self.may_attempt(policy) {
            self.refresh(http).await;
        }
        let (keys, _) = self.snapshot(policy);
        let last_error = self.lock().last_error.clone();
        match keys.as_deref().map(|k| select(k, kid, alg)) {
            Some(Selected::Keys(found)) => Ok(found),
            Some(Selected::Mismatch) => Err(mismatch()),
            Some(Selected::NotFound) | None => match last_error {
                Some(e) => Err(VerifyError::Jwks(e)),
                None if keys.is_none() => Err(VerifyError::Jwks(format!(
                    "no keys fetched yet for {}; retrying at most every {}s",
                    self.issuer,
                    policy.refetch_interval.as_secs()
                ))),
                None => Err(VerifyError::UnknownKey { kid: kid_label() }),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data, valid after any panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self, policy: &FetchPolicy) -> (Option<Arc<Vec<CachedKey>>>, bool) {
        let st = self.lock();
        let stale = st.fetched_at.is_none_or(|t| t.elapsed() >= policy.max_age);
        (st.keys.clone(), stale)
    }

    fn may_attempt(&self, policy: &FetchPolicy) -> bool {
        self.lock()
            .last_attempt
            .is_none_or(|t| t.elapsed() >= policy.refetch_interval)
    }

    fn refresh_in_background(self: &Arc<Self>, http: &reqwest::Client, policy: &FetchPolicy) {
        if !self.may_attempt(policy) {
            return;
        }
        let this = Arc::clone(self);
        let http = http.clone();
        let policy = *policy;
        tokio::spawn(async move {
            let _fetching = this.fetch_lock.lock().await;
            if this.may_attempt(&policy) {
                this.refresh(&http).await;
            }
        });
    }

    /// Fetch now and update the cache; a failure keeps the old keys.
    async fn refresh(&self, http: &reqwest::Client) {
        self.lock().last_attempt = Some(Instant::now());
        let result = fetch(&self.issuer, http).await;
        let mut st = self.lock();
        match result {
            Ok(keys) => {
                let kids: Vec<&str> = keys.iter().filter_map(|k| k.kid.as_deref()).collect();
                tracing::info!(issuer = %self.issuer, ?kids, "fetched the issuer's signing keys");
                st.keys = Some(Arc::new(keys));
                st.fetched_at = Some(Instant::now());
                st.last_error = None;
            }
            Err(e) => {
                tracing::warn!(
                    issuer = %self.issuer,
                    error = %e,
                    cached_keys = st.keys.as_ref().map_or(0, |k| k.len()),
                    "cannot fetch the issuer's signing keys; keeping the cached ones"
                );
                st.last_error = Some(e);
            }
        }
    }

    #[cfg(test)]
    pub(super) fn preload(&self, jwks: jsonwebtoken::jwk::JwkSet) {
        let keys = jwks
            .keys
            .into_iter()
            .map(|jwk| cached_key(jwk).expect("preload: unusable key"))
            .collect();
        let mut st = self.lock();
        st.keys = Some(Arc::new(keys));
        st.fetched_at = Some(Instant::now());
        st.last_attempt = Some(Instant::now());
    }
}

fn select(keys: &[CachedKey], kid: Option<&str>, alg: Alg) -> Selected {
    let named: Vec<&CachedKey> = match kid {
        Some(kid) => keys
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid))
            .collect(),
        None => keys.iter().collect(),
    };
    let fit: Vec<DecodingKey> = named
        .iter()
        .filter(|k| fits(&k.jwk, alg))
        .map(|k| k.key.clone())
        .collect();
    if !fit.is_empty() {
        Selected::Keys(fit)
    } else if kid.is_some() && !named.is_empty() {
        Selected::Mismatch
    } else {
        Selected::NotFound
    }
}

/// Whether `jwk` may check an `alg` signature: a signing key (by `use` and
/// `key_ops`), of the matching type and curve, and, if the key names an
/// `alg`, that one.
fn fits(jwk: &Jwk, alg: Alg) -> bool {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return false;
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return false;
    }
    if let Some(key_alg) = jwk.common.key_algorithm
        && key_alg != KeyAlgorithm::from(alg.jwt())
    {
        return false;
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => matches!(
            alg,
            Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512
        ),
        AlgorithmParameters::EllipticCurve(p) => matches!(
            (&p.curve, alg),
            (EllipticCurve::P256, Alg::ES256) | (EllipticCurve::P384, Alg::ES384)
        ),
        AlgorithmParameters::OctetKeyPair(p) => {
            matches!((&p.curve, alg), (EllipticCurve::Ed25519, Alg::EdDSA))
        }
        // Symmetric keys never verify anything here; unknown types neither.
        _ => false,
    }
}

/// A JWK we can use, or why not.
fn cached_key(jwk: Jwk) -> Result<CachedKey, String> {
    match &jwk.algorithm {
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric key (kty oct) ignored".to_owned());
        }
        AlgorithmParameters::RSA(p) => {
            let n = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &p.n)
                .map_err(|_| "RSA modulus is not base64url".to_owned())?;
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of about {bits} bits is below {MIN_RSA_BITS}"
                ));
            }
        }
        _ => {}
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(CachedKey {
        kid: jwk.common.key_id.clone(),
        jwk,
        key,
    })
}

/// Discovery, then the JWKS it names.
async fn fetch(issuer: &str, http: &reqwest::Client) -> Result<Vec<CachedKey>, String> {
    let discovery_url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let doc = get_json(http, &discovery_url).await?;
    match doc.get("issuer").and_then(Value::as_str) {
        Some(named) if named == issuer => {}
        Some(named) => {
            return Err(format!(
                "{discovery_url} names issuer `{}`, expected exactly `{issuer}`",
                shorten(named)
            ));
        }
        None => return Err(format!("{discovery_url} has no `issuer`")),
    }
    let jwks_uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{discovery_url} has no `jwks_uri`"))?;
    if issuer.starts_with("https://") && !jwks_uri.starts_with("https://") {
        return Err(format!(
            "{discovery_url} names jwks_uri `{}`, which is not https",
            shorten(jwks_uri)
        ));
    }
    let jwks = get_json(http, jwks_uri).await?;
    let entries = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{jwks_uri} is not a JWKS (no `keys` array)"))?;
    let mut keys = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let kid = entry
            .get("kid")
            .and_then(Value::as_str)
            .unwrap_or("(no kid)");
        let usable = serde_json::from_value::<Jwk>(entry.clone())
            .map_err(|e| format!("not a JWK: {e}"))
            .and_then(cached_key);
        match usable {
            Ok(k) => keys.push(k),
            Err(why) => {
                tracing::debug!(%issuer, index = i, kid, %why, "skipping a key of the issuer's JWKS")
            }
        }
    }
    if keys.is_empty() {
        return Err(format!("{jwks_uri} holds no usable signing key"));
    }
    Ok(keys)
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let mut resp = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e.without_url())))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("GET {url}: HTTP {status}"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e.without_url())))?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT {
            return Err(format!(
                "GET {url}: response is larger than {MAX_DOCUMENT} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not JSON ({e})"))
}
