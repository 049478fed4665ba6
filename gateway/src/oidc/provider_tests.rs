//! Verification and client credentials against a real OpenID provider: npm
//! `oidc-provider`, started from `tests/oidc/provider.js` on loopback with
//! its own keys. Needs `node` and `npm ci --prefix tests/oidc` (which
//! `cargo xtask test` runs); without them these tests fail, saying so.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::{Child, Command};

use super::*;

const AUD: &str = "https://gateway.test";
const OTHER_AUD: &str = "https://elsewhere.test";

/// A running `tests/oidc/provider.js`, killed on drop.
struct Provider {
    issuer: String,
    child: Child,
    config: PathBuf,
    stderr: Arc<Mutex<String>>,
    http: reqwest::Client,
}

/// Each thread of `pid`: state, kernel wait channel and CPU ticks, for the
/// report when the provider does not start in time.
fn process_snapshot(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("  (process {pid} is gone)\n");
    };
    let mut out = String::new();
    for task in tasks.flatten() {
        let read = |name: &str| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
        let stat = read("stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        out.push_str(&format!(
            "  {} state {} wchan {} utime+stime {}+{}\n",
            read("comm").trim(),
            fields.first().unwrap_or(&"?"),
            read("wchan").trim(),
            fields.get(11).unwrap_or(&"?"),
            fields.get(12).unwrap_or(&"?"),
        ));
    }
    out
}

fn harness_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc");
    dir.canonicalize().unwrap_or(dir)
}

impl Provider {
    /// Start a provider whose clients and resources are `config` (see
    /// provider.js), and wait for its ready line.
    async fn start(config: Value) -> Provider {
        let dir = harness_dir();
        assert!(
            dir.join("node_modules/oidc-provider/package.json")
                .is_file(),
            "the OpenID provider harness is not installed: run `npm ci --prefix {}` \
             (`cargo xtask test` does this before the tests)",
            dir.display()
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "gateway-oidc-{}-{}.json",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, config.to_string()).unwrap();
        let mut child = Command::new("node")
            .arg(dir.join("provider.js"))
            .arg("--config")
            .arg(&path)
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `node` for the OpenID provider harness: {e}; install Node.js 20+"
                )
            });

        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });

        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        let line = match ready {
            Ok(Ok(Some(line))) => line,
            other => panic!(
                "the OpenID provider did not report ready ({other:?}); its threads then:\n{}\
                 its stderr:\n{}",
                child.id().map(process_snapshot).unwrap_or_default(),
                stderr.lock().unwrap()
            ),
        };
        let ready: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
        assert_eq!(ready["ready"], true, "{line}");
        Provider {
            issuer: ready["issuer"].as_str().unwrap().to_owned(),
            child,
            config: path,
            stderr,
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.issuer))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    /// A job token signed by the provider's current key (see /test/mint).
    async fn mint(&self, body: Value) -> String {
        self.post("/test/mint", body).await["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// New signing keys first in the provider's JWKS, old ones kept.
    async fn rotate(&self) -> Vec<String> {
        let kids = self.post("/test/rotate", json!({})).await["kids"].clone();
        serde_json::from_value(kids).unwrap()
    }

    async fn stop(&mut self) {
        self.child.kill().await.unwrap();
    }

    fn verifier(&self, leeway: Duration) -> Verifier {
        Verifier::new(
            vec![TrustedIssuer::new(&self.issuer, vec![AUD.to_owned()])],
            leeway,
        )
        .with_http_client(self.http.clone())
    }

    fn client(&self, id: &str, secret: &str) -> ClientCredentials {
        ClientCredentials {
            issuer: self.issuer.clone(),
            client_id: id.to_owned(),
            client_secret: Secret::new(secret),
            scopes: vec!["egress".to_owned()],
            audience: Some(AUD.to_owned()),
        }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.config);
        if std::thread::panicking() {
            eprintln!("OpenID provider stderr:\n{}", self.stderr.lock().unwrap());
        }
    }
}

fn config() -> Value {
    json!({
        "clients": [
            {"client_id": "ci-browser", "client_secret": "browser-secret",
             "claims": {"groups": ["browser-executor"]}},
            {"client_id": "payer", "client_secret": "payer-secret",
             "claims": {"groups": ["payments", "unmapped-group"]}},
            {"client_id": "short", "client_secret": "short-secret", "ttl": 2,
             "claims": {"groups": ["browser-executor"]}},
        ],
        "resources": [
            {"audience": AUD, "scope": "egress", "ttl": 300},
            {"audience": OTHER_AUD, "scope": "egress", "ttl": 300},
        ],
    })
}

fn job_claims() -> Value {
    json!({
        "sub": "repo:acme/shop:ref:refs/heads/main",
        "aud": AUD,
        "repository": "acme/shop",
        "ref": "refs/heads/main",
        "workflow": "e2e",
        "actor": "octocat",
        "run_id": "4711",
    })
}

/// Poll `verify` (external state: the clock against a token's `exp`) until
/// `done` holds, or fail at the deadline.
async fn verify_until(
    v: &Verifier,
    token: &str,
    deadline: Duration,
    done: impl Fn(&Result<Claims, VerifyError>) -> bool,
) -> Result<Claims, VerifyError> {
    let end = Instant::now() + deadline;
    loop {
        let r = v.verify(token).await;
        if done(&r) {
            return r;
        }
        assert!(Instant::now() < end, "still {r:?} after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn client_credentials_token_verifies_and_its_groups_become_duties() {
    let p = Provider::start(config()).await;
    let v = p.verifier(Duration::from_secs(5));
    let before = SystemTime::now();
    let token: Token = p
        .client("ci-browser", "browser-secret")
        .fetch_token(&v)
        .await
        .unwrap();

    assert_eq!(token.claims.sub, "ci-browser");
    assert_eq!(token.claims.iss, p.issuer);
    assert_eq!(token.claims.aud, vec![AUD.to_owned()]);
    assert_eq!(token.claims.groups, vec!["browser-executor".to_owned()]);
    assert_eq!(
        token.claims.claim_str("client_id").as_deref(),
        Some("ci-browser")
    );
    let ttl = token.expires_at.duration_since(before).unwrap();
    assert!(
        ttl > Duration::from_secs(290) && ttl <= Duration::from_secs(301),
        "{ttl:?}"
    );
    assert!(token.refresh_at(before) < token.expires_at);
    assert!(!format!("{token:?}").contains(token.raw.expose()));

    let mapping = BTreeMap::from([
        ("browser-executor".to_owned(), vec!["browse".to_owned()]),
        (
            "payments".to_owned(),
            vec!["pay".to_owned(), "refund".to_owned()],
        ),
    ]);
    assert_eq!(
        token.claims.duties("groups", &BTreeMap::new()),
        vec!["browser-executor"]
    );
    assert_eq!(token.claims.duties("groups", &mapping), vec!["browse"]);

    // The raw token verifies on its own too (as an enrolled token would).
    let again = v.verify(token.raw.expose()).await.unwrap();
    assert_eq!(again.sub, "ci-browser");

    let payer = p
        .client("payer", "payer-secret")
        .fetch_token(&v)
        .await
        .unwrap();
    assert_eq!(
        payer.claims.duties("groups", &mapping),
        vec!["pay", "refund"]
    );
}

#[tokio::test]
async fn a_wrong_client_secret_is_a_readable_error_without_the_secret() {
    let p = Provider::start(config()).await;
    let v = p.verifier(Duration::from_secs(5));
    let err = p
        .client("ci-browser", "not-the-secret")
        .fetch_token(&v)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, OidcError::TokenEndpoint { .. }), "{err:?}");
    assert!(text.contains("invalid_client"), "{text}");
    assert!(!text.contains("not-the-secret") && !format!("{err:?}").contains("not-the-secret"));

    // A token for another audience is refused by the verifier.
    let mut other = p.client("ci-browser", "browser-secret");
    other.audience = Some(OTHER_AUD.to_owned());
    match other.fetch_token(&v).await {
        Err(OidcError::Token {
            source: VerifyError::WrongAudience { aud, .. },
            ..
        }) => assert_eq!(aud, format!("[`{OTHER_AUD}`]")),
        other => panic!("expected WrongAudience, got {other:?}"),
    }
}

#[tokio::test]
async fn job_tokens_signed_by_the_provider_verify_with_every_key_type() {
    let p = Provider::start(config()).await;
    let v = p.verifier(Duration::from_secs(5));
    for alg in ["RS256", "PS256", "ES256", "EdDSA"] {
        let token = p.mint(json!({"claims": job_claims(), "alg": alg})).await;
        let c = v
            .verify(&token)
            .await
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(c.claim_str("repository").as_deref(), Some("acme/shop"));
        assert_eq!(c.claim_str("ref").as_deref(), Some("refs/heads/main"));
        assert_eq!(c.claim_str("workflow").as_deref(), Some("e2e"));
        assert_eq!(c.claim_str("actor").as_deref(), Some("octocat"));
        assert_eq!(c.claim_str("run_id").as_deref(), Some("4711"));
    }
}

#[tokio::test]
async fn bad_job_tokens_are_refused_each_with_its_own_reason() {
    let p = Provider::start(config()).await;
    let v = p.verifier(Duration::from_secs(5));
    let mint = |body: Value| p.mint(body);

    let wrong_aud = mint(json!({"claims": {"sub": "x", "aud": OTHER_AUD}})).await;
    let foreign = mint(json!({"claims": job_claims(), "foreign_key": true})).await;
    let foreign_kid =
        mint(json!({"claims": job_claims(), "foreign_key": true, "kid": "attacker-1"})).await;
    let none = mint(json!({"claims": job_claims(), "alg": "none"})).await;
    let hmac = mint(json!({"claims": job_claims(), "alg": "HS256"})).await;
    let untrusted =
        mint(json!({"claims": with_iss("https://token.actions.githubusercontent.com")})).await;
    let expired = mint(json!({"claims": job_claims(), "ttl": -60})).await;
    let future = mint(json!({"claims": with_nbf(3600)})).await;

    let cases = [
        ("wrong audience", wrong_aud, "wrong_audience"),
        ("foreign key, provider's kid", foreign, "bad_signature"),
        ("foreign key, own kid", foreign_kid, "unknown_key"),
        ("alg none", none, "alg_not_allowed"),
        ("HS256 keyed with the public key", hmac, "alg_not_allowed"),
        ("untrusted issuer", untrusted, "untrusted_issuer"),
        ("expired", expired, "expired"),
        ("not yet valid", future, "not_yet_valid"),
    ];
    let mut messages = Vec::new();
    for (name, token, code) in cases {
        let err = v.verify(&token).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err}");
        let text = err.to_string();
        assert!(!text.contains(&token), "{name}: error quotes the token");
        messages.push(text);
    }
    messages.sort();
    messages.dedup();
    assert_eq!(messages.len(), 8, "reasons are not distinct: {messages:#?}");
}

fn with_iss(iss: &str) -> Value {
    let mut c = job_claims();
    c["iss"] = json!(iss);
    c
}

fn with_nbf(ahead: u64) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut c = job_claims();
    c["nbf"] = json!(now + ahead);
    c
}

#[tokio::test]
async fn a_short_lived_token_verifies_then_expires() {
    let p = Provider::start(config()).await;
    let v = p.verifier(Duration::ZERO);
    let token = p
        .client("short", "short-secret")
        .fetch_token(&v)
        .await
        .unwrap();
    v.verify(token.raw.expose()).await.unwrap();
    let err = verify_until(&v, token.raw.expose(), Duration::from_secs(15), |r| {
        r.is_err()
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::Expired { exp, .. } if exp == token.claims.exp),
        "{err:?}"
    );
}

#[tokio::test]
async fn key_rotation_at_the_provider_is_picked_up_without_a_restart() {
    let p = Provider::start(config()).await;
    let v = p
        .verifier(Duration::from_secs(5))
        .with_refetch_interval(Duration::ZERO);
    let old = p.mint(json!({"claims": job_claims()})).await;
    v.verify(&old).await.unwrap();

    let kids = p.rotate().await;
    let new = p.mint(json!({"claims": job_claims()})).await;
    let new_kid = kid_of(&new);
    assert_eq!(new_kid, kids[0], "the provider signs with its new key");
    assert_ne!(new_kid, kid_of(&old));
    // Same verifier, new kid: one refetch, accepted; the old key still works.
    v.verify(&new).await.unwrap();
    v.verify(&old).await.unwrap();
    // Client-credentials tokens are signed with the new key too.
    let token = p
        .client("ci-browser", "browser-secret")
        .fetch_token(&v)
        .await
        .unwrap();
    assert_eq!(kid_of(token.raw.expose()), new_kid);

    // The refetch is rate-limited: a verifier that fetched just now does not
    // fetch again for a new kid within its interval.
    let limited = p
        .verifier(Duration::from_secs(5))
        .with_refetch_interval(Duration::from_secs(3600));
    limited.verify(&new).await.unwrap();
    p.rotate().await;
    let newer = p.mint(json!({"claims": job_claims()})).await;
    assert!(matches!(
        limited.verify(&newer).await,
        Err(VerifyError::UnknownKey { .. })
    ));
    v.verify(&newer).await.unwrap();
}

fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn with_the_provider_down_cached_keys_verify_until_the_token_expires() {
    let mut p = Provider::start(config()).await;
    let v = p
        .verifier(Duration::ZERO)
        .with_refetch_interval(Duration::ZERO);
    let token = p
        .client("short", "short-secret")
        .fetch_token(&v)
        .await
        .unwrap();
    let job = p.mint(json!({"claims": job_claims()})).await;
    let issuer = p.issuer.clone();
    p.stop().await;

    // Cached keys keep working, even for a token first seen now.
    v.verify(token.raw.expose()).await.unwrap();
    v.verify(&job).await.unwrap();
    // A verifier that never fetched cannot, and says where it tried.
    let fresh = Verifier::new(
        vec![TrustedIssuer::new(&issuer, vec![AUD.to_owned()])],
        Duration::ZERO,
    );
    match fresh.verify(&job).await {
        Err(VerifyError::Jwks(msg)) => assert!(msg.contains(&issuer), "{msg}"),
        other => panic!("expected Jwks, got {other:?}"),
    }
    // A token with a kid we never saw: the refetch fails, and says so.
    let unseen = forge_kid(&job, "rsa-never-seen");
    assert!(matches!(v.verify(&unseen).await, Err(VerifyError::Jwks(_))));

    // Until it expires.
    let err = verify_until(&v, token.raw.expose(), Duration::from_secs(15), |r| {
        r.is_err()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, VerifyError::Expired { .. }), "{err:?}");
}

/// `token` with its header's kid replaced (the signature no longer matters:
/// the key lookup comes first).
fn forge_kid(token: &str, kid: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut header: Value = serde_json::from_slice(&b64.decode(&parts[0]).unwrap()).unwrap();
    header["kid"] = json!(kid);
    parts[0] = b64.encode(serde_json::to_vec(&header).unwrap());
    parts.join(".")
}
