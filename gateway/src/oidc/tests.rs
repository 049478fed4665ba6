//! Verification rules that need no provider: keys are preloaded (or served by
//! a tiny in-test HTTP server), tokens are signed here with test-only keys.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

const ISS: &str = "https://idp.example.test";
const AUD: &str = "https://gateway.example.test";
/// Test-only keys (PKCS#8 DER), generated for these tests and used nowhere else.
const ED_KEY: &str = "MC4CAQAwBQYDK2VwBCIEIAwe1LlSHNS5B9U+YQbBijMQhVZmaTMKxtVjD9yrCBlI";
const ED_OTHER: &str = "MC4CAQAwBQYDK2VwBCIEID5/hBaSwWm/056CuLmOpGuno1AYVdIHDR5W8cS8zaZg";
const EC_KEY: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg3zhAE76aP+qetSJh9Glqcre6WzxilTEcz80UPL1/d6ChRANCAAQaKV/CF12NrXlHY4tGF1kJ1sgPG21lISMLlFVTiqZ2cztZPpywuaYz21qzkst8BgKqBsh6upfGME/aCPllf2Av";
/// "Now" for every time-dependent check.
const T: u64 = 1_700_000_000;
const LEEWAY: Duration = Duration::from_secs(30);

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn ed_key() -> EncodingKey {
    EncodingKey::from_ed_der(&STANDARD.decode(ED_KEY).unwrap())
}

fn ed_other() -> EncodingKey {
    EncodingKey::from_ed_der(&STANDARD.decode(ED_OTHER).unwrap())
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_der(&STANDARD.decode(EC_KEY).unwrap())
}

fn public_jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

fn jwks() -> JwkSet {
    JwkSet {
        keys: vec![
            public_jwk(&ed_key(), Algorithm::EdDSA, "ed-1"),
            public_jwk(&ec_key(), Algorithm::ES256, "ec-1"),
        ],
    }
}

fn verifier() -> Verifier {
    let v = Verifier::new(vec![TrustedIssuer::new(ISS, vec![AUD.to_owned()])], LEEWAY);
    v.preload_keys(ISS, jwks());
    v
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// A token with exactly this header and payload, signed with `key` as `alg`.
fn sign(header: Value, payload: Value, key: &EncodingKey, alg: Algorithm) -> String {
    let input = format!("{}.{}", b64(&header), b64(&payload));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

fn claims() -> Value {
    json!({
        "iss": ISS,
        "sub": "repo:acme/shop:ref:refs/heads/main",
        "aud": AUD,
        "iat": T - 10,
        "exp": T + 300,
        "groups": ["browser-executor", "reader"],
        "repository": "acme/shop",
        "run_id": 4711,
    })
}

fn with(mut base: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn ed_token(payload: Value) -> String {
    sign(
        json!({"alg": "EdDSA", "typ": "JWT", "kid": "ed-1"}),
        payload,
        &ed_key(),
        Algorithm::EdDSA,
    )
}

async fn verify(token: &str) -> Result<Claims, VerifyError> {
    verifier().verify_at(token, at(T)).await
}

/// Errors are logged and audited: they must never carry the token.
fn assert_no_token_in(err: &VerifyError, token: &str) {
    let text = format!("{err} {err:?}");
    for part in token.split('.').filter(|p| p.len() > 8) {
        assert!(
            !text.contains(part),
            "error `{text}` contains a token segment"
        );
    }
}

#[tokio::test]
async fn a_valid_eddsa_token_verifies_with_all_its_claims() {
    let c = verify(&ed_token(claims())).await.unwrap();
    assert_eq!(c.sub, "repo:acme/shop:ref:refs/heads/main");
    assert_eq!(c.iss, ISS);
    assert_eq!(c.aud, vec![AUD.to_owned()]);
    assert_eq!(c.exp, T + 300);
    assert_eq!(
        c.groups,
        vec!["browser-executor".to_owned(), "reader".to_owned()]
    );
    assert_eq!(c.claim_str("repository").as_deref(), Some("acme/shop"));
    assert_eq!(c.claim_str("run_id").as_deref(), Some("4711"));
    assert_eq!(c.claim_str("groups"), None);
    assert_eq!(c.claim_str("absent"), None);
    assert_eq!(c.expires_at(), at(T + 300));
}

#[tokio::test]
async fn a_valid_es256_token_verifies() {
    let token = sign(
        json!({"alg": "ES256", "kid": "ec-1"}),
        claims(),
        &ec_key(),
        Algorithm::ES256,
    );
    verify(&token).await.unwrap();
}

#[tokio::test]
async fn a_token_without_kid_verifies_against_the_keys_fit_for_its_alg() {
    let token = sign(
        json!({"alg": "EdDSA"}),
        claims(),
        &ed_key(),
        Algorithm::EdDSA,
    );
    verify(&token).await.unwrap();
}

#[tokio::test]
async fn alg_none_is_refused() {
    let payload = b64(&claims());
    for alg in ["none", "None", "NONE"] {
        let header = b64(&json!({"alg": alg, "typ": "JWT"}));
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}.c2ln"),
        ] {
            let err = verify(&token).await.unwrap_err();
            assert_eq!(
                err,
                VerifyError::AlgNotAllowed {
                    alg: alg.to_owned()
                },
                "{token}"
            );
            assert_no_token_in(&err, &token);
        }
    }
}

#[tokio::test]
async fn hmac_is_refused_even_keyed_with_the_public_key() {
    // The classic key-confusion attack: HS256 keyed with the public key bytes.
    let public = public_jwk(&ed_key(), Algorithm::EdDSA, "ed-1");
    let secret = serde_json::to_vec(&public).unwrap();
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let token = sign(
            json!({"alg": format!("{alg:?}"), "kid": "ed-1"}),
            claims(),
            &EncodingKey::from_secret(&secret),
            alg,
        );
        let err = verify(&token).await.unwrap_err();
        assert_eq!(
            err,
            VerifyError::AlgNotAllowed {
                alg: format!("{alg:?}")
            }
        );
        assert_eq!(err.code(), "alg_not_allowed");
    }
}

#[tokio::test]
async fn an_alg_outside_the_issuers_allow_list_is_refused() {
    let v = Verifier::new(
        vec![TrustedIssuer {
            issuer: ISS.to_owned(),
            audiences: vec![AUD.to_owned()],
            algorithms: vec![Alg::RS256],
        }],
        LEEWAY,
    );
    v.preload_keys(ISS, jwks());
    let err = v.verify_at(&ed_token(claims()), at(T)).await.unwrap_err();
    assert_eq!(
        err,
        VerifyError::AlgNotAllowed {
            alg: "EdDSA".to_owned()
        }
    );
    // Unknown algorithm names never get as far as a key lookup.
    let token = sign(
        json!({"alg": "ES512", "kid": "ec-1"}),
        claims(),
        &ec_key(),
        Algorithm::ES256,
    );
    assert_eq!(
        verify(&token).await.unwrap_err(),
        VerifyError::AlgNotAllowed {
            alg: "ES512".to_owned()
        }
    );
}

#[tokio::test]
async fn malformed_tokens_are_refused_without_panicking() {
    let header = b64(&json!({"alg": "EdDSA", "kid": "ed-1"}));
    let payload = b64(&claims());
    let not_json = URL_SAFE_NO_PAD.encode(b"{not json");
    let array = b64(&json!(["alg", "EdDSA"]));
    let long = "a".repeat(MAX_TOKEN_LEN + 1);
    let cases: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("whitespace", "  \n".to_owned()),
        ("garbage", "garbage".to_owned()),
        ("two segments", format!("{header}.{payload}")),
        ("four segments", format!("{header}.{payload}.c2ln.c2ln")),
        ("JWE", "a.b.c.d.e".to_owned()),
        ("header not base64url", format!("!!!.{payload}.c2ln")),
        ("header padded base64", format!("{header}==.{payload}.c2ln")),
        ("header not JSON", format!("{not_json}.{payload}.c2ln")),
        ("header a JSON array", format!("{array}.{payload}.c2ln")),
        (
            "header without alg",
            format!("{}.{payload}.c2ln", b64(&json!({"kid": "ed-1"}))),
        ),
        (
            "alg not a string",
            format!("{}.{payload}.c2ln", b64(&json!({"alg": 7}))),
        ),
        (
            "kid not a string",
            format!("{}.{payload}.c2ln", b64(&json!({"alg": "EdDSA", "kid": 1}))),
        ),
        (
            "crit header",
            format!(
                "{}.{payload}.c2ln",
                b64(&json!({"alg": "EdDSA", "crit": ["b64"]}))
            ),
        ),
        ("payload not base64url", format!("{header}.***.c2ln")),
        ("payload not JSON", format!("{header}.{not_json}.c2ln")),
        (
            "payload a JSON string",
            format!("{header}.{}.c2ln", b64(&json!("hi"))),
        ),
        ("empty signature", format!("{header}.{payload}.")),
        ("signature not base64url", format!("{header}.{payload}.@@@")),
        ("too long", long),
        ("unicode", "ä.ö.ü".to_owned()),
        ("dots only", "..".to_owned()),
    ];
    for (name, token) in cases {
        match verify(&token).await {
            Err(err @ VerifyError::Malformed(_)) => {
                assert_eq!(err.code(), "malformed");
                assert_no_token_in(&err, &token);
            }
            other => panic!("{name}: expected Malformed, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn required_claims_must_be_present_and_well_typed() {
    for (name, changes) in [
        ("no iss", json!({"iss": null})),
        ("iss not a string", json!({"iss": 1})),
        ("no exp", json!({"exp": null})),
        ("exp a string", json!({"exp": "tomorrow"})),
        ("exp negative", json!({"exp": -1})),
        ("nbf a string", json!({"nbf": "now"})),
        ("no sub", json!({"sub": null})),
        ("empty sub", json!({"sub": ""})),
        ("aud an object", json!({"aud": {"a": 1}})),
        ("aud array with a number", json!({"aud": [AUD, 1]})),
    ] {
        match verify(&ed_token(with(claims(), changes))).await {
            Err(VerifyError::Malformed(_)) => {}
            other => panic!("{name}: expected Malformed, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn audience_may_be_a_string_or_an_array() {
    verify(&ed_token(with(claims(), json!({"aud": AUD}))))
        .await
        .unwrap();
    let c = verify(&ed_token(with(
        claims(),
        json!({"aud": ["https://other.test", AUD]}),
    )))
    .await
    .unwrap();
    assert_eq!(c.aud, vec!["https://other.test".to_owned(), AUD.to_owned()]);

    for (aud, shown) in [
        (json!("https://other.test"), "[`https://other.test`]"),
        (
            json!(["https://a.test", "https://b.test"]),
            "[`https://a.test`, `https://b.test`]",
        ),
        (json!([]), "(none)"),
        (Value::Null, "(none)"),
    ] {
        let err = verify(&ed_token(with(claims(), json!({"aud": aud}))))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            VerifyError::WrongAudience {
                aud: shown.to_owned(),
                expected: format!("[`{AUD}`]"),
            }
        );
    }
}

#[tokio::test]
async fn exp_and_nbf_are_checked_with_the_leeway() {
    let leeway = LEEWAY.as_secs();
    // Expired 10 s ago, within the 30 s leeway: still accepted.
    verify(&ed_token(with(claims(), json!({"exp": T - 10}))))
        .await
        .unwrap();
    verify(&ed_token(with(claims(), json!({"exp": T - leeway + 1}))))
        .await
        .unwrap();
    for exp in [T - leeway, T - leeway - 1, 0] {
        let err = verify(&ed_token(with(claims(), json!({"exp": exp}))))
            .await
            .unwrap_err();
        assert_eq!(err, VerifyError::Expired { exp, now: T });
        assert_eq!(err.code(), "expired");
    }
    // Fractional NumericDates are fine.
    verify(&ed_token(with(
        claims(),
        json!({"exp": (T + 5) as f64 + 0.5}),
    )))
    .await
    .unwrap();

    // Not before: within the leeway accepted, beyond it refused.
    verify(&ed_token(with(claims(), json!({"nbf": T + 20}))))
        .await
        .unwrap();
    verify(&ed_token(with(claims(), json!({"nbf": T + leeway}))))
        .await
        .unwrap();
    let err = verify(&ed_token(with(claims(), json!({"nbf": T + leeway + 1}))))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        VerifyError::NotYetValid {
            nbf: T + leeway + 1,
            now: T
        }
    );

    // Zero leeway: expiry is exact.
    let v = Verifier::new(
        vec![TrustedIssuer::new(ISS, vec![AUD.to_owned()])],
        Duration::ZERO,
    );
    v.preload_keys(ISS, jwks());
    let token = ed_token(with(claims(), json!({"exp": T + 1})));
    v.verify_at(&token, at(T)).await.unwrap();
    assert!(matches!(
        v.verify_at(&token, at(T + 1)).await,
        Err(VerifyError::Expired { .. })
    ));
}

#[tokio::test]
async fn a_signature_by_another_key_is_refused() {
    let token = sign(
        json!({"alg": "EdDSA", "kid": "ed-1"}),
        claims(),
        &ed_other(),
        Algorithm::EdDSA,
    );
    let err = verify(&token).await.unwrap_err();
    assert_eq!(err, VerifyError::BadSignature);
    assert_no_token_in(&err, &token);

    // A payload changed after signing.
    let good = ed_token(claims());
    let parts: Vec<&str> = good.split('.').collect();
    let forged = b64(&with(claims(), json!({"sub": "admin"})));
    let token = format!("{}.{forged}.{}", parts[0], parts[2]);
    assert_eq!(verify(&token).await.unwrap_err(), VerifyError::BadSignature);
}

#[tokio::test]
async fn a_key_of_the_wrong_type_for_the_alg_is_refused() {
    let token = sign(
        json!({"alg": "ES256", "kid": "ed-1"}),
        claims(),
        &ec_key(),
        Algorithm::ES256,
    );
    assert_eq!(
        verify(&token).await.unwrap_err(),
        VerifyError::KeyMismatch {
            kid: "ed-1".to_owned(),
            alg: "ES256".to_owned()
        }
    );
}

#[tokio::test]
async fn an_unknown_kid_within_the_refetch_interval_is_refused_without_a_fetch() {
    // preload_keys counts as a fetch just now; the issuer's host does not
    // even resolve, so a fetch would show up as a Jwks error instead.
    let token = sign(
        json!({"alg": "EdDSA", "kid": "ed-9"}),
        claims(),
        &ed_key(),
        Algorithm::EdDSA,
    );
    assert_eq!(
        verify(&token).await.unwrap_err(),
        VerifyError::UnknownKey {
            kid: "ed-9".to_owned()
        }
    );
}

#[tokio::test]
async fn an_untrusted_issuer_is_refused_before_any_network_access() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let trusted = format!("http://{}", listener.local_addr().unwrap());
    let v = Verifier::new(
        vec![TrustedIssuer::new(trusted, vec![AUD.to_owned()])],
        LEEWAY,
    );
    let token = ed_token(with(claims(), json!({"iss": "https://evil.example.test"})));
    let err = v.verify_at(&token, at(T)).await.unwrap_err();
    assert_eq!(
        err,
        VerifyError::UntrustedIssuer {
            iss: "https://evil.example.test".to_owned()
        }
    );
    assert_eq!(err.code(), "untrusted_issuer");
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the verifier connected to the trusted issuer for an untrusted token: {accepted:?}"
    );
    // Similar-looking issuers are not the trusted one.
    for iss in [format!("{ISS}/"), ISS.to_uppercase(), format!("{ISS}.evil")] {
        let token = ed_token(with(claims(), json!({"iss": iss})));
        assert!(matches!(
            verify(&token).await,
            Err(VerifyError::UntrustedIssuer { .. })
        ));
    }
}

/// A minimal HTTP/1.1 server for discovery and JWKS that counts requests and
/// serves whatever JWKS is current.
struct FakeIdp {
    issuer: String,
    requests: Arc<AtomicUsize>,
    jwks: Arc<std::sync::Mutex<Value>>,
}

impl FakeIdp {
    async fn start(jwks: &JwkSet) -> FakeIdp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let current = Arc::new(std::sync::Mutex::new(serde_json::to_value(jwks).unwrap()));
        let (iss, count, served) = (issuer.clone(), requests.clone(), current.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let (iss, served) = (iss.clone(), served.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let body = match path.as_str() {
                        "/.well-known/openid-configuration" => {
                            json!({"issuer": iss, "jwks_uri": format!("{iss}/jwks")})
                        }
                        "/jwks" => served.lock().unwrap().clone(),
                        _ => json!({}),
                    }
                    .to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        });
        FakeIdp {
            issuer,
            requests,
            jwks: current,
        }
    }
}

#[tokio::test]
async fn an_unknown_kid_triggers_one_rate_limited_refetch() {
    let idp = FakeIdp::start(&JwkSet {
        keys: vec![public_jwk(&ed_key(), Algorithm::EdDSA, "ed-1")],
    })
    .await;
    let v = Verifier::new(
        vec![TrustedIssuer::new(&idp.issuer, vec![AUD.to_owned()])],
        LEEWAY,
    )
    .with_refetch_interval(Duration::from_secs(3600));
    let token = |key: &EncodingKey, kid: &str| {
        sign(
            json!({"alg": "EdDSA", "kid": kid}),
            with(claims(), json!({"iss": idp.issuer})),
            key,
            Algorithm::EdDSA,
        )
    };

    // First use: discovery + JWKS.
    v.verify_at(&token(&ed_key(), "ed-1"), at(T)).await.unwrap();
    assert_eq!(idp.requests.load(Ordering::SeqCst), 2);
    // Cached: no request.
    v.verify_at(&token(&ed_key(), "ed-1"), at(T)).await.unwrap();
    assert_eq!(idp.requests.load(Ordering::SeqCst), 2);

    // The IdP rotates; the new kid is unknown and the interval has not
    // passed, so no refetch: refused as unknown.
    *idp.jwks.lock().unwrap() = serde_json::to_value(JwkSet {
        keys: vec![
            public_jwk(&ed_other(), Algorithm::EdDSA, "ed-2"),
            public_jwk(&ed_key(), Algorithm::EdDSA, "ed-1"),
        ],
    })
    .unwrap();
    for _ in 0..3 {
        assert_eq!(
            v.verify_at(&token(&ed_other(), "ed-2"), at(T))
                .await
                .unwrap_err(),
            VerifyError::UnknownKey {
                kid: "ed-2".to_owned()
            }
        );
    }
    assert_eq!(idp.requests.load(Ordering::SeqCst), 2);

    // A fresh verifier: eight concurrent first uses of the new kid share
    // one fetch.
    let v = Arc::new(
        Verifier::new(
            vec![TrustedIssuer::new(&idp.issuer, vec![AUD.to_owned()])],
            LEEWAY,
        )
        .with_refetch_interval(Duration::from_secs(3600)),
    );
    let before = idp.requests.load(Ordering::SeqCst);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (v, t) = (v.clone(), token(&ed_other(), "ed-2"));
            tokio::spawn(async move { v.verify_at(&t, at(T)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        idp.requests.load(Ordering::SeqCst) - before,
        2,
        "one discovery + one JWKS fetch"
    );
}

#[tokio::test]
async fn stale_keys_keep_verifying_while_a_refresh_runs_in_the_background() {
    let idp = FakeIdp::start(&jwks()).await;
    let v = Verifier::new(
        vec![TrustedIssuer::new(&idp.issuer, vec![AUD.to_owned()])],
        LEEWAY,
    )
    .with_refetch_interval(Duration::ZERO)
    .with_max_key_age(Duration::ZERO);
    assert_eq!(v.leeway(), LEEWAY);
    assert_eq!(
        v.trusted_issuers()
            .map(|t| t.issuer.as_str())
            .collect::<Vec<_>>(),
        [idp.issuer.as_str()]
    );
    let token = ed_token(with(claims(), json!({"iss": idp.issuer})));
    v.verify_at(&token, at(T)).await.unwrap();
    assert_eq!(idp.requests.load(Ordering::SeqCst), 2);
    // The cache is already stale (max age zero): the key is used as it is,
    // and a refresh (discovery + JWKS) follows in the background.
    v.verify_at(&token, at(T)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while idp.requests.load(Ordering::SeqCst) < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background refresh"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_unreachable_issuer_is_a_jwks_error_naming_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let v = Verifier::new(
        vec![TrustedIssuer::new(&issuer, vec![AUD.to_owned()])],
        LEEWAY,
    );
    let token = ed_token(with(claims(), json!({"iss": issuer})));
    match v.verify_at(&token, at(T)).await {
        Err(VerifyError::Jwks(msg)) => {
            assert!(
                msg.contains(&format!("{issuer}/.well-known/openid-configuration")),
                "{msg}"
            );
        }
        other => panic!("expected Jwks, got {other:?}"),
    }
    // Rate-limited: the next attempt reports the same failure without waiting.
    assert!(matches!(
        v.verify_at(&token, at(T)).await,
        Err(VerifyError::Jwks(_))
    ));
}

#[test]
fn duties_pass_through_without_a_mapping_and_are_an_allow_list_with_one() {
    let mut extra = serde_json::Map::new();
    extra.insert(
        "groups".into(),
        json!(["browser-executor", "reader", "reader", 7]),
    );
    extra.insert("role".into(), json!("approver"));
    let c = Claims {
        sub: "s".into(),
        iss: ISS.into(),
        aud: vec![AUD.into()],
        exp: T,
        groups: vec![],
        extra,
    };
    let none = BTreeMap::new();
    assert_eq!(
        c.duties("groups", &none),
        vec!["browser-executor", "reader"]
    );
    assert_eq!(c.duties("role", &none), vec!["approver"]);
    assert!(c.duties("absent", &none).is_empty());

    let mapping = BTreeMap::from([
        (
            "browser-executor".to_owned(),
            vec!["browse".to_owned(), "pay".to_owned()],
        ),
        ("admins".to_owned(), vec!["approve".to_owned()]),
    ]);
    assert_eq!(c.duties("groups", &mapping), vec!["browse", "pay"]);
    assert!(c.duties("role", &mapping).is_empty());
}

#[test]
fn secrets_never_print() {
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s}"), "***");
    assert_eq!(format!("{s:?}"), "***");
    assert_eq!(s.expose(), "hunter2");
    let cc = ClientCredentials {
        issuer: ISS.into(),
        client_id: "ci".into(),
        client_secret: s,
        scopes: vec![],
        audience: None,
    };
    assert!(!format!("{cc:?}").contains("hunter2"));
    assert_eq!(cc.trusted_issuer().audiences, vec!["ci".to_owned()]);
}

#[test]
fn only_asymmetric_algorithms_can_be_configured() {
    for bad in ["none", "HS256", "HS512", "rs256", ""] {
        assert!(bad.parse::<Alg>().is_err(), "{bad}");
    }
    for good in Alg::DEFAULT_ALLOWED {
        assert_eq!(good.as_str().parse::<Alg>(), Ok(good));
    }
    assert!(serde_json::from_value::<Alg>(json!("HS256")).is_err());
    assert_eq!(
        serde_json::from_value::<Alg>(json!("PS256")).unwrap(),
        Alg::PS256
    );
}
