//! A real OpenID provider for the identity tests: npm `oidc-provider`, run
//! from `tests/oidc/provider.js` with its own signing keys, clients with a
//! groups claim, and JWT access tokens. Not a stub: discovery, JWKS, client
//! authentication and token signing are all the provider's.
//!
//! It also mints "enrolled job tokens" (GitHub-Actions-style JWTs) signed by
//! the provider's own current key, and bad ones (foreign key, `alg: none`,
//! HMAC) for the negative tests.
//!
//! Needs `node` (20+) and `npm ci --prefix tests/oidc`, which `cargo xtask
//! test` runs first.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::{Value, json};

use crate::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The default resource (audience) of a provider started with
/// [`Options::default`].
pub const AUDIENCE: &str = "https://gateway.test";

/// A client of the provider, allowed the client-credentials grant.
#[derive(Debug, Clone)]
pub struct Client {
    pub client_id: String,
    pub client_secret: String,
    /// Extra claims in its access tokens, e.g. `{"groups": ["browser-executor"]}`.
    pub claims: Value,
    /// Access-token lifetime in seconds for this client (overrides the
    /// resource's), e.g. 2 for tokens that expire during a test.
    pub ttl: Option<u64>,
}

impl Client {
    /// A client whose tokens carry `groups`.
    pub fn new(client_id: &str, client_secret: &str, groups: &[&str]) -> Client {
        Client {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            claims: json!({ "groups": groups }),
            ttl: None,
        }
    }

    pub fn ttl(mut self, seconds: u64) -> Client {
        self.ttl = Some(seconds);
        self
    }
}

/// A resource server: access tokens requested for it (`resource=AUDIENCE`)
/// are JWTs with `aud` = `audience`.
#[derive(Debug, Clone)]
pub struct Resource {
    /// An absolute URI.
    pub audience: String,
    /// Space-separated scopes it accepts.
    pub scope: String,
    /// Access-token lifetime in seconds.
    pub ttl: u64,
    /// Signing algorithm of its access tokens (default RS256).
    pub alg: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The first one is the default for token requests without `resource`.
    pub resources: Vec<Resource>,
    /// Listen address (loopback, or an address inside a test namespace).
    pub host: String,
    /// 0 for any free port.
    pub port: u16,
    /// A private JWKS to sign with instead of generated keys; re-read on
    /// [`OidcProvider::reload_keys`]. Access tokens are RS256 unless a
    /// resource says otherwise, so include an RSA key when clients are used.
    pub keys_file: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            resources: vec![Resource {
                audience: AUDIENCE.to_owned(),
                scope: "egress".to_owned(),
                ttl: 300,
                alg: None,
            }],
            host: "127.0.0.1".to_owned(),
            port: 0,
            keys_file: None,
        }
    }
}

/// A running provider, killed on drop.
pub struct OidcProvider {
    child: Child,
    /// Held open: the provider exits when it closes (even if we are killed).
    _stdin: Option<ChildStdin>,
    issuer: String,
    addr: SocketAddr,
    audience: String,
    stderr: Arc<Mutex<String>>,
    _dir: TempDir,
}

/// `tests/oidc`, where `provider.js` and its `node_modules` live.
/// What each thread of process `pid` is doing, from /proc (state, kernel
/// wait channel, CPU time): printed when a process does not start in time,
/// so the report says whether it was blocked, and where, or busy.
pub fn process_snapshot(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("  (process {pid} is gone)\n");
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let stat = read("stat");
        // comm is in parentheses and may hold spaces; the fields after it
        // are: state ... utime (14th field overall) stime (15th).
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        out.push_str(&format!(
            "  tid {} {} state {} wchan {} utime {} stime {} ticks\n",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            fields.first().unwrap_or(&"?"),
            read("wchan").trim(),
            fields.get(11).unwrap_or(&"?"),
            fields.get(12).unwrap_or(&"?"),
        ));
    }
    out
}

pub fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

impl OidcProvider {
    /// Start the provider and wait (with a deadline) for its ready line.
    pub fn start(clients: &[Client], options: Options) -> OidcProvider {
        let dir = harness_dir();
        assert!(
            dir.join("node_modules/oidc-provider/package.json")
                .is_file(),
            "the OpenID provider harness is not installed: run `npm ci --prefix {}` \
             (`cargo xtask test` does this before the tests)",
            dir.display()
        );
        assert!(
            !options.resources.is_empty(),
            "a provider needs at least one resource"
        );
        let tmp = TempDir::new();
        let config = tmp.path().join("provider.json");
        let body = json!({
            "clients": clients.iter().map(|c| json!({
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "claims": c.claims,
                "ttl": c.ttl,
            })).collect::<Vec<_>>(),
            "resources": options.resources.iter().map(|r| json!({
                "audience": r.audience,
                "scope": r.scope,
                "ttl": r.ttl,
                "alg": r.alg,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&config, body.to_string()).unwrap();

        let mut cmd = Command::new("node");
        cmd.arg(dir.join("provider.js"))
            .arg("--config")
            .arg(&config)
            .args(["--host", &options.host, "--port", &options.port.to_string()])
            .arg("--exit-on-stdin-eof");
        if let Some(keys) = &options.keys_file {
            cmd.arg("--keys").arg(keys);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `node` for the OpenID provider harness: {e}; install Node.js 20+"
                )
            });

        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        // The ready line, read on a thread so we can wait with a deadline.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so the provider never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => {
                let threads = process_snapshot(child.id());
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the OpenID provider did not report ready within {START_TIMEOUT:?} ({other:?}); \
                     its threads then:\n{threads}its stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the provider's ready line {line:?} is not JSON: {e}"));
        assert_eq!(ready["ready"], true, "unexpected ready line {line}");
        let issuer = ready["issuer"]
            .as_str()
            .expect("ready line without issuer")
            .to_owned();
        let authority = issuer.trim_start_matches("http://");
        let addr = authority
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("issuer {issuer} has no socket address"));
        OidcProvider {
            _stdin: child.stdin.take(),
            child,
            issuer,
            addr,
            audience: options.resources[0].audience.clone(),
            stderr,
            _dir: tmp,
        }
    }

    /// The issuer URL, `http://127.0.0.1:PORT`: the exact `iss` of its tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The default resource's audience.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the provider wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// An access token (a JWT for the default resource) by the
    /// client-credentials grant, authenticated with HTTP Basic.
    pub fn client_credentials_token(&self, client_id: &str, client_secret: &str) -> String {
        self.client_credentials_token_for(client_id, client_secret, None)
    }

    /// As [`Self::client_credentials_token`], for `resource` (an audience of
    /// one of the provider's resources).
    pub fn client_credentials_token_for(
        &self,
        client_id: &str,
        client_secret: &str,
        resource: Option<&str>,
    ) -> String {
        match self.try_client_credentials_token(client_id, client_secret, resource) {
            Ok(token) => token,
            Err(e) => panic!("client-credentials token for `{client_id}`: {e}"),
        }
    }

    /// The token endpoint's answer: `Ok(access_token)`, or `Err` with the
    /// status and body (e.g. `invalid_client`).
    pub fn try_client_credentials_token(
        &self,
        client_id: &str,
        client_secret: &str,
        resource: Option<&str>,
    ) -> Result<String, String> {
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(r) = resource {
            form.push(("resource", r));
        }
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        // RFC 6749 §2.3.1: form-encode, then Basic.
        let basic =
            base64(format!("{}:{}", form_encode(client_id), form_encode(client_secret)).as_bytes());
        let (status, reply) = self.http(
            "POST",
            "/token",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("authorization", &format!("Basic {basic}")),
            ],
            body.as_bytes(),
        );
        let json: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
        match (status, json["access_token"].as_str()) {
            (200, Some(token)) => Ok(token.to_owned()),
            _ => Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&reply)
            )),
        }
    }

    /// A job token signed by the provider's current key: `request` is the
    /// body of `POST /test/mint` (see provider.js), e.g.
    /// `{"claims": {"sub": "...", "aud": "...", "repository": "acme/shop"}, "ttl": 60}`;
    /// add `"foreign_key": true`, `"alg": "none"` or `"alg": "HS256"` for
    /// bad tokens. `iss`, `iat` and `exp` default to the provider's issuer,
    /// now and now + ttl (300 s).
    pub fn mint(&self, request: &Value) -> String {
        let reply = self.post_json("/test/mint", request);
        reply["token"]
            .as_str()
            .expect("mint reply without token")
            .to_owned()
    }

    /// A GitHub-Actions-style job token for `audience` with the usual claims
    /// (repository, ref, workflow, actor, run_id), valid for `ttl` seconds.
    pub fn mint_job_token(&self, audience: &str, repository: &str, ttl: i64) -> String {
        self.mint(&json!({
            "claims": {
                "sub": format!("repo:{repository}:ref:refs/heads/main"),
                "aud": audience,
                "repository": repository,
                "ref": "refs/heads/main",
                "workflow": "e2e",
                "actor": "octocat",
                "run_id": "4711",
            },
            "ttl": ttl,
        }))
    }

    /// New signing keys, first in the JWKS (the old ones stay published).
    /// Returns every kid, the signing one first.
    pub fn rotate_keys(&self) -> Vec<String> {
        kids(&self.post_json("/test/rotate", &json!({})))
    }

    /// New signing keys, the old ones withdrawn from the JWKS.
    pub fn replace_keys(&self) -> Vec<String> {
        kids(&self.post_json("/test/rotate", &json!({"keep_old": false})))
    }

    /// The current kids, the signing one first.
    pub fn kids(&self) -> Vec<String> {
        let (status, body) = self.http("GET", "/test/kids", &[], b"");
        assert_eq!(
            status,
            200,
            "GET /test/kids: {}",
            String::from_utf8_lossy(&body)
        );
        kids(&serde_json::from_slice(&body).unwrap())
    }

    /// Re-read `Options::keys_file` (SIGHUP), then wait until the JWKS
    /// shows the file's first key.
    pub fn reload_keys(&self) {
        // SAFETY: kill() has no memory preconditions; the pid is our child's.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGHUP) };
        assert_eq!(
            rc,
            0,
            "SIGHUP to the provider: {}",
            std::io::Error::last_os_error()
        );
        let before = self.stderr().matches("reloaded").count();
        let reloaded = crate::poll(START_TIMEOUT, || {
            (self.stderr().matches("reloaded").count() > before).then_some(())
        });
        assert!(
            reloaded.is_some(),
            "the provider did not reload its keys:\n{}",
            self.stderr()
        );
    }

    /// Stop the provider now (tokens it issued stay valid until they expire).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn post_json(&self, path: &str, body: &Value) -> Value {
        let (status, reply) = self.http(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
        let text = String::from_utf8_lossy(&reply);
        assert_eq!(status, 200, "POST {path}: HTTP {status}: {text}");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {text}"))
    }

    /// One HTTP/1.1 request on a fresh connection; returns status and body.
    fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let mut conn = TcpStream::connect_timeout(&self.addr, HTTP_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to the provider at {}: {e}", self.addr));
        conn.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
        conn.set_write_timeout(Some(HTTP_TIMEOUT)).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\naccept: application/json\r\ncontent-length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        conn.write_all(req.as_bytes()).unwrap();
        conn.write_all(body).unwrap();
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw)
            .unwrap_or_else(|e| panic!("{method} {path}: reading the provider's answer: {e}"));
        parse_response(&raw).unwrap_or_else(|| {
            panic!(
                "{method} {path}: unparseable answer: {}",
                String::from_utf8_lossy(&raw)
            )
        })
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("OpenID provider stderr:\n{}", self.stderr());
        }
    }
}

fn kids(v: &Value) -> Vec<String> {
    v["kids"]
        .as_array()
        .expect("reply without kids")
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

/// Status and body of an HTTP/1.1 response read to EOF (`connection: close`),
/// plain or chunked.
fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let body = &raw[split + 4..];
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The claims of a JWT, unverified: for tests that look at what the
/// provider put in a token.
pub fn peek_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("not a JWT");
    let mut bits = 0u32;
    let mut n = 0;
    let mut bytes = Vec::new();
    for c in payload.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => continue,
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            bytes.push((bits >> n) as u8);
        }
    }
    serde_json::from_slice(&bytes).expect("JWT payload is not JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_form_encoding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"ci:s3cret"), "Y2k6czNjcmV0");
        assert_eq!(form_encode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn chunked_and_plain_responses_parse() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(parse_response(plain), Some((200, b"ok".to_vec())));
        let chunked = b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((401, b"abcde".to_vec())));
    }

    /// The driver against the real provider; no root needed.
    #[test]
    fn provider_issues_verifiable_shapes_and_rotates() {
        let clients = [
            Client::new("ci-browser", "browser-secret", &["browser-executor"]),
            Client::new("short", "short-secret", &["reader"]).ttl(2),
        ];
        let mut p = OidcProvider::start(&clients, Options::default());
        assert!(p.issuer().starts_with("http://127.0.0.1:"));

        let token = p.client_credentials_token("ci-browser", "browser-secret");
        let claims = peek_claims(&token);
        assert_eq!(claims["iss"], p.issuer());
        assert_eq!(claims["sub"], "ci-browser");
        assert_eq!(claims["aud"], AUDIENCE);
        assert_eq!(claims["groups"], json!(["browser-executor"]));
        let short = peek_claims(&p.client_credentials_token("short", "short-secret"));
        assert_eq!(
            short["exp"].as_u64().unwrap() - short["iat"].as_u64().unwrap(),
            2
        );

        let err = p
            .try_client_credentials_token("ci-browser", "wrong", None)
            .unwrap_err();
        assert!(err.contains("invalid_client"), "{err}");

        let job = peek_claims(&p.mint_job_token(AUDIENCE, "acme/shop", 60));
        assert_eq!(job["repository"], "acme/shop");
        assert_eq!(job["iss"], p.issuer());
        let none = p.mint(&json!({"claims": {"aud": AUDIENCE}, "alg": "none"}));
        assert!(none.ends_with('.'));

        let before = p.kids();
        let after = p.rotate_keys();
        assert_eq!(after.len(), before.len() * 2);
        assert!(!before.contains(&after[0]));
        assert_eq!(p.replace_keys().len(), before.len());

        p.stop();
        assert!(TcpStream::connect_timeout(&p.addr(), Duration::from_secs(1)).is_err());
    }

    #[test]
    fn keys_from_a_file_are_reloaded_on_sighup() {
        // Generate a private JWKS with the provider's own tooling: start one
        // provider, then use a file with a fixed key for the second.
        let dir = TempDir::new();
        let keys = dir.path().join("keys.json");
        let write_key = |kid: &str| {
            let out = Command::new("node")
                .arg("-e")
                .arg(format!(
                    "const k=require('node:crypto').generateKeyPairSync('ec',{{namedCurve:'P-256'}})\
                     .privateKey.export({{format:'jwk'}});\
                     process.stdout.write(JSON.stringify({{keys:[{{...k,kid:'{kid}',use:'sig',alg:'ES256'}}]}}))"
                ))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&keys, out.stdout).unwrap();
        };
        write_key("file-1");
        let p = OidcProvider::start(
            &[],
            Options {
                keys_file: Some(keys.clone()),
                ..Options::default()
            },
        );
        assert_eq!(p.kids(), ["file-1"]);
        write_key("file-2");
        p.reload_keys();
        assert_eq!(p.kids(), ["file-2"]);
    }
}
