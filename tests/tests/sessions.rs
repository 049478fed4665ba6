//! Issue 6, session recordings: traffic through the gateway (curl under
//! `gateway exec`, trusting the gateway's CA, to `gw-origin` in its own
//! network namespace) is recorded per connection; `gateway sessions
//! list|show|export --har|prune` read the recordings; credentials never
//! reach a recording file; retention keeps the store under its size cap,
//! oldest first, and removes recordings past their age.

use gateway_tests::daemon::{Sessions, is_event, num, text};
use gateway_tests::web::{WebOptions, WebOrigin};
use gateway_tests::{Config, Daemon, Rule, TestNet, poll, require_root};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const EVENT: Duration = Duration::from_secs(15);

const SHOP: &str = "shop.test";
const PARTNER: &str = "partner.test";
const OTHER: &str = "other.test";

/// Injected by the gateway on partner requests; the client never has it.
const SECRET: &str = "Bearer s3cr3t-partner-token-5e1d0c";
/// What the client itself sends, and must never be recorded.
const COOKIE_VALUE: &str = "cookie-value-9f8e7d6c5b";
const CLIENT_TOKEN: &str = "client-bearer-token-a1b2c3d4";

const ORDERS: &str =
    r#"{"orders":[{"id":"ORD-1","card":"4111 1111 1111 1111","email":"alice@example.com"}]}"#;

fn origin_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gw-origin"))
}

/// One world at a time: each adds a network namespace and a daemon.
static SERIAL: Mutex<()> = Mutex::new(());

struct World {
    daemon: Daemon,
    origin: WebOrigin,
    net: TestNet,
    _serial: MutexGuard<'static, ()>,
}

impl World {
    fn with(sessions: Sessions) -> World {
        require_root();
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let net = TestNet::new();
        let origin = WebOrigin::start(
            &net,
            WebOptions::new(origin_bin()).names(&[SHOP, PARTNER, OTHER]),
        );
        let mut cfg = Config::new();
        cfg.policy_default = "block".into();
        cfg.sessions = Some(sessions);
        let cfg = cfg
            .interception_ca(origin.ca_pem_path())
            .secret_value("partner-token", SECRET)
            .rule(Rule {
                hosts: vec![SHOP.into()],
                methods: vec!["DELETE".into()],
                ..Rule::new("no-deletes", "block")
            })
            .rule(
                Rule {
                    hosts: vec![SHOP.into()],
                    ..Rule::new("shop-mask", "allow")
                }
                .mask_detector("credit_card")
                .mask_detector("email"),
            )
            .rule(
                Rule {
                    hosts: vec![PARTNER.into()],
                    ..Rule::new("partner-credential", "allow")
                }
                .inject("Authorization", "partner-token"),
            );
        let daemon = Daemon::start(cfg);
        World {
            daemon,
            origin,
            net,
            _serial: serial,
        }
    }

    fn sessions_dir(&self) -> PathBuf {
        self.daemon.config().state_dir.join("sessions")
    }

    /// curl under `gateway exec`, trusting the gateway CA, names pinned to
    /// the origin.
    fn curl(&self, args: &[&str]) -> Output {
        let ip = self.net.ns_v4().to_string();
        let ca = self.daemon.config().state_dir.join("ca").join("cert.pem");
        let mut full: Vec<String> = vec![
            "-sS".into(),
            "--max-time".into(),
            "20".into(),
            "--cacert".into(),
            ca.display().to_string(),
        ];
        for host in [SHOP, PARTNER, OTHER] {
            for port in [80, 443] {
                full.push("--resolve".into());
                full.push(format!("{host}:{port}:{ip}"));
            }
        }
        full.extend(args.iter().map(|s| s.to_string()));
        self.daemon
            .exec("t1", "curl", &full)
            .output()
            .expect("run curl")
    }

    /// The recording id of the connection that carried `method host path`
    /// (its `http` event names the session; the `connection` event of that
    /// session names the recording).
    fn recording_of_request(&self, method: &str, host: &str, path: &str) -> String {
        let http = self.daemon.wait_event(
            |v| {
                is_event(v, "http")
                    && v["method"] == method
                    && v["host"] == host
                    && v["path"] == path
            },
            EVENT,
        );
        let session = num(&http, "session").expect("http event names its session");
        self.recording_of_session(session)
    }

    fn recording_of_session(&self, session: u64) -> String {
        let conn = self.daemon.wait_event(
            |v| is_event(v, "connection") && num(v, "session") == Some(session),
            EVENT,
        );
        let id = text(&conn, "recording");
        assert!(!id.is_empty(), "connection not recorded: {conn}");
        id
    }

    /// `gateway sessions <args>`; panics unless it succeeds.
    fn sessions(&self, args: &[&str]) -> String {
        let out = self
            .daemon
            .gateway("sessions")
            .args(args)
            .output()
            .expect("run gateway sessions");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "gateway sessions {args:?} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    fn list(&self, args: &[&str]) -> Vec<String> {
        let mut a = vec!["list", "--json"];
        a.extend_from_slice(args);
        let v: Value = serde_json::from_str(&self.sessions(&a)).expect("list --json is JSON");
        v.as_array()
            .expect("an array")
            .iter()
            .map(|s| s["id"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    fn wait_file(&self, id: &str) -> PathBuf {
        let p = self.sessions_dir().join(format!("{id}.json.gz"));
        poll(EVENT, || p.exists().then_some(()))
            .unwrap_or_else(|| panic!("recording {} never written", p.display()));
        p
    }
}

fn decompress(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(p).expect("open recording"))
        .read_to_end(&mut out)
        .expect("a recording is gzip");
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json.gz"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The HAR 1.2 structure (required fields and their types,
/// <http://www.softwareishard.com/blog/har-12-spec/>).
fn validate_har(v: &Value) -> Result<(), String> {
    fn field<'a>(v: &'a Value, key: &str, at: &str) -> Result<&'a Value, String> {
        v.get(key).ok_or_else(|| format!("{at}.{key} is missing"))
    }
    fn string(v: &Value, key: &str, at: &str) -> Result<(), String> {
        field(v, key, at)?
            .as_str()
            .map(|_| ())
            .ok_or_else(|| format!("{at}.{key} is not a string"))
    }
    fn number(v: &Value, key: &str, at: &str) -> Result<f64, String> {
        field(v, key, at)?
            .as_f64()
            .ok_or_else(|| format!("{at}.{key} is not a number"))
    }
    fn object<'a>(v: &'a Value, key: &str, at: &str) -> Result<&'a Value, String> {
        let o = field(v, key, at)?;
        o.is_object()
            .then_some(o)
            .ok_or_else(|| format!("{at}.{key} is not an object"))
    }
    fn pairs(v: &Value, key: &str, at: &str) -> Result<(), String> {
        let a = field(v, key, at)?
            .as_array()
            .ok_or_else(|| format!("{at}.{key} is not an array"))?;
        for (i, p) in a.iter().enumerate() {
            string(p, "name", &format!("{at}.{key}[{i}]"))?;
            string(p, "value", &format!("{at}.{key}[{i}]"))?;
        }
        Ok(())
    }
    fn iso8601(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() >= 20
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && (s.ends_with('Z') || s[19..].contains('+') || s[19..].contains('-'))
    }
    let log = object(v, "log", "")?;
    if log["version"] != "1.2" {
        return Err(format!("log.version is {}, not \"1.2\"", log["version"]));
    }
    let creator = object(log, "creator", "log")?;
    string(creator, "name", "log.creator")?;
    string(creator, "version", "log.creator")?;
    let entries = field(log, "entries", "log")?
        .as_array()
        .ok_or("log.entries is not an array")?;
    for (i, e) in entries.iter().enumerate() {
        let at = format!("log.entries[{i}]");
        string(e, "startedDateTime", &at)?;
        if !iso8601(e["startedDateTime"].as_str().unwrap_or_default()) {
            return Err(format!("{at}.startedDateTime is not ISO 8601"));
        }
        number(e, "time", &at)?;
        let rq = object(e, "request", &at)?;
        let rat = format!("{at}.request");
        for k in ["method", "url", "httpVersion"] {
            string(rq, k, &rat)?;
        }
        pairs(rq, "cookies", &rat)?;
        pairs(rq, "headers", &rat)?;
        pairs(rq, "queryString", &rat)?;
        number(rq, "headersSize", &rat)?;
        number(rq, "bodySize", &rat)?;
        if rq.get("postData").is_some() {
            let p = object(rq, "postData", &rat)?;
            string(p, "mimeType", &format!("{rat}.postData"))?;
        }
        let rs = object(e, "response", &at)?;
        let sat = format!("{at}.response");
        number(rs, "status", &sat)?;
        for k in ["statusText", "httpVersion", "redirectURL"] {
            string(rs, k, &sat)?;
        }
        pairs(rs, "cookies", &sat)?;
        pairs(rs, "headers", &sat)?;
        let c = object(rs, "content", &sat)?;
        number(c, "size", &format!("{sat}.content"))?;
        string(c, "mimeType", &format!("{sat}.content"))?;
        if c.get("text").is_some() {
            string(c, "text", &format!("{sat}.content"))?;
        }
        number(rs, "headersSize", &sat)?;
        number(rs, "bodySize", &sat)?;
        object(e, "cache", &at)?;
        let t = object(e, "timings", &at)?;
        for k in ["send", "wait", "receive"] {
            if number(t, k, &format!("{at}.timings"))? < 0.0 {
                return Err(format!("{at}.timings.{k} is negative"));
            }
        }
    }
    Ok(())
}

#[test]
fn traffic_is_recorded_listed_shown_and_exported_without_credentials() {
    let w = World::with(Sessions::default());
    w.origin.write("orders.json", ORDERS);
    let cookie = format!("Cookie: sid={COOKIE_VALUE}; theme=dark");
    let auth = format!("Authorization: Bearer {CLIENT_TOKEN}");

    // Masked JSON, with the client's own cookie and token.
    let out = w.curl(&[
        "-H",
        &cookie,
        "-H",
        &auth,
        &format!("https://{SHOP}/orders.json"),
    ]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("[MASKED:"), "not masked: {body}");
    // The partner gets the injected credential; the origin echoes it back.
    let out = w.curl(&[
        "-H",
        &cookie,
        "-X",
        "POST",
        "--data",
        "hello=partner",
        &format!("https://{PARTNER}/echo?page=2"),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("s3cr3t-partner-token"),
        "the origin did not echo the injected credential"
    );
    // Blocked per request.
    let out = w.curl(&["-i", "-X", "DELETE", &format!("https://{SHOP}/items/1")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 403"));
    // Blocked at connection level (no rule for the host; default block).
    let _ = w.curl(&[&format!("http://{OTHER}/")]);

    let orders = w.recording_of_request("GET", SHOP, "/orders.json");
    let partner = w.recording_of_request("POST", PARTNER, "/echo");
    let delete = w.recording_of_request("DELETE", SHOP, "/items/1");
    let other_ev = w
        .daemon
        .wait_event(|v| is_event(v, "connection") && v["host"] == OTHER, EVENT);
    assert_eq!(text(&other_ev, "decision"), "block", "{other_ev}");
    let other = text(&other_ev, "recording");
    assert!(!other.is_empty(), "{other_ev}");
    let all = [&orders, &partner, &delete, &other];
    for id in all {
        w.wait_file(id);
    }

    // list and its filters
    let listed = w.list(&[]);
    for id in all {
        assert!(listed.contains(id), "{id} not listed: {listed:?}");
    }
    assert_eq!(w.list(&["--identity", "t1"]).len(), listed.len());
    assert!(w.list(&["--identity", "nobody"]).is_empty());
    let blocked = w.list(&["--decision", "block"]);
    assert!(
        blocked.contains(&delete) && blocked.contains(&other),
        "{blocked:?}"
    );
    assert!(
        !blocked.contains(&orders) && !blocked.contains(&partner),
        "{blocked:?}"
    );
    let inspected = w.list(&["--decision", "inspect"]);
    assert!(
        inspected.contains(&orders) && !inspected.contains(&other),
        "{inspected:?}"
    );
    assert_eq!(w.list(&["--since", "1h"]).len(), listed.len());
    let future = (SystemTime::now() + Duration::from_secs(3600))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    assert!(w.list(&["--since", &future]).is_empty());
    assert_eq!(
        w.list(&["--since", "2020-01-01T00:00:00Z"]).len(),
        listed.len()
    );
    let table = w.sessions(&["list"]);
    assert!(table.contains(&orders), "{table}");

    // show: who, where, and the exchange with its masked body
    let rec: Value = serde_json::from_str(&w.sessions(&["show", &orders, "--json"])).unwrap();
    assert_eq!(rec["identity"], "t1");
    assert_eq!(rec["subject"], "t1@localhost");
    assert_eq!(rec["duties"][0], "tester");
    assert_eq!(rec["decision"], "inspect");
    assert_eq!(rec["host"], SHOP);
    assert!(rec["pid"].as_u64().unwrap_or(0) > 0);
    assert!(
        rec["exe"].as_str().unwrap_or_default().ends_with("curl"),
        "{rec}"
    );
    assert!(
        rec["destination"]
            .as_str()
            .unwrap_or_default()
            .ends_with(":443")
    );
    assert!(rec["started_unix_ms"].as_u64().unwrap() <= rec["ended_unix_ms"].as_u64().unwrap());
    let ex = &rec["exchanges"][0];
    assert_eq!(ex["method"], "GET");
    assert_eq!(ex["url"], format!("https://{SHOP}/orders.json"));
    assert_eq!(ex["rule"], "shop-mask");
    assert_eq!(ex["response"]["status"], 200);
    assert!(ex["masked"].as_u64().unwrap_or(0) >= 2, "{ex}");
    let sent = ex["response"]["body"]["text"].as_str().unwrap_or_default();
    assert!(sent.contains("[MASKED:credit_card:****1111]"), "{sent}");
    assert!(!sent.contains("4111 1111 1111 1111") && !sent.contains("alice@example.com"));
    assert!(sent.contains("ORD-1"), "{sent}");
    let headers = ex["request"]["headers"].as_array().unwrap();
    let h = |n: &str| {
        headers
            .iter()
            .find(|h| h["name"] == n)
            .map(|h| h["value"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(h("authorization"), "Bearer [REDACTED]");
    assert_eq!(h("cookie"), "sid=[REDACTED]; theme=[REDACTED]");
    let readable = w.sessions(&["show", &orders]);
    assert!(
        readable.contains(&format!("GET https://{SHOP}/orders.json")),
        "{readable}"
    );
    assert!(
        readable.contains("[MASKED:credit_card:****1111]"),
        "{readable}"
    );

    let rec: Value = serde_json::from_str(&w.sessions(&["show", &delete, "--json"])).unwrap();
    let ex = &rec["exchanges"][0];
    assert_eq!(ex["decision"], "block");
    assert_eq!(ex["rule"], "no-deletes");
    assert_eq!(ex["response"]["status"], 403);
    let rec: Value = serde_json::from_str(&w.sessions(&["show", &partner, "--json"])).unwrap();
    let ex = &rec["exchanges"][0];
    assert_eq!(ex["request"]["body"]["text"], "hello=partner");
    assert_eq!(ex["injected"][0], "authorization<-partner-token");

    // HAR export, to stdout and to a file
    let har: Value = serde_json::from_str(&w.sessions(&["export", &partner, "--har"])).unwrap();
    validate_har(&har).unwrap_or_else(|e| panic!("invalid HAR: {e}\n{har:#}"));
    let e = &har["log"]["entries"][0];
    assert_eq!(e["request"]["method"], "POST");
    assert_eq!(
        e["request"]["url"],
        format!("https://{PARTNER}/echo?page=2")
    );
    assert_eq!(e["request"]["queryString"][0]["name"], "page");
    assert_eq!(e["request"]["postData"]["text"], "hello=partner");
    assert_eq!(e["response"]["status"], 200);
    assert_eq!(e["request"]["cookies"][0]["name"], "sid");
    let file = w.daemon.config().dir().join("orders.har");
    w.sessions(&[
        "export",
        &orders,
        "--har",
        "--output",
        file.to_str().unwrap(),
    ]);
    let har: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    validate_har(&har).unwrap_or_else(|e| panic!("invalid HAR: {e}\n{har:#}"));
    assert_eq!(har["log"]["entries"].as_array().unwrap().len(), 1);
    // A connection that was not intercepted: no entries, still valid.
    let har: Value = serde_json::from_str(&w.sessions(&["export", &other, "--har"])).unwrap();
    validate_har(&har).unwrap();
    // An unknown id is an error that says so.
    let out = w
        .daemon
        .gateway("sessions")
        .args(["show", "1-999999"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no recording"));

    // No credential anywhere in any recording, byte by byte.
    let mut files = 0;
    for e in std::fs::read_dir(w.sessions_dir()).unwrap() {
        let p = e.unwrap().path();
        let raw = decompress(&p);
        files += 1;
        for s in [
            SECRET,
            "s3cr3t-partner-token-5e1d0c",
            COOKIE_VALUE,
            CLIENT_TOKEN,
        ] {
            assert!(!contains(&raw, s), "{s} appears in {}", p.display());
        }
    }
    assert!(files >= 4);
}

#[test]
fn the_size_cap_holds_and_the_oldest_recordings_go_first() {
    let w = World::with(Sessions {
        max_total_mb: Some(1),
        body_cap_bytes: Some(400_000),
        ..Sessions::default()
    });
    // Incompressible: each recording is about 300 KB.
    let noise: Vec<u8> = (0..300_000).map(|_| rand::random::<u8>()).collect();
    w.origin.write("noise.bin", &noise);
    let dir = w.sessions_dir();
    let cap = 1024 * 1024;
    let mut ids = Vec::new();
    for i in 0..8 {
        let out = w.curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{SHOP}/noise.bin?n={i}"),
        ]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
        let http = w.daemon.wait_event(
            |v| {
                is_event(v, "http")
                    && v["path"] == "/noise.bin"
                    && num(v, "status") == Some(200)
                    && !ids_sessions_contains(&ids, num(v, "session"))
            },
            EVENT,
        );
        let session = num(&http, "session").unwrap();
        let id = w.recording_of_session(session);
        w.wait_file(&id);
        let total = dir_bytes(&dir);
        assert!(
            total <= cap,
            "the store holds {total} bytes, over its {cap}-byte cap"
        );
        ids.push((session, id));
    }
    let left = w.list(&[]);
    let last = &ids.last().unwrap().1;
    assert!(left.contains(last), "{left:?}");
    assert!(!left.contains(&ids[0].1), "the oldest was kept: {left:?}");
    // What is left is the newest, contiguously.
    let kept: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, (_, id))| left.contains(id))
        .map(|(i, _)| i)
        .collect();
    assert!(kept.len() >= 2, "{kept:?}");
    assert_eq!(kept, (kept[0]..ids.len()).collect::<Vec<_>>());
    // Every removal was audited, with the reason and the oldest first.
    let pruned: Vec<Value> = w
        .daemon
        .events()
        .into_iter()
        .filter(|v| is_event(v, "sessions_pruned"))
        .collect();
    assert!(!pruned.is_empty(), "no sessions_pruned event");
    let mut removed = Vec::new();
    for p in &pruned {
        assert_eq!(p["reason"], "size", "{p}");
        assert!(num(p, "bytes").unwrap_or(0) > 0, "{p}");
        removed.extend(text(p, "ids").split(',').map(str::to_string));
    }
    let expect: Vec<String> = ids[..kept[0]].iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(removed, expect);
}

fn ids_sessions_contains(ids: &[(u64, String)], session: Option<u64>) -> bool {
    ids.iter().any(|(s, _)| Some(*s) == session)
}

#[test]
fn prune_removes_recordings_older_than_max_age() {
    let w = World::with(Sessions {
        max_age_days: Some(1),
        ..Sessions::default()
    });
    w.origin.write("a.txt", "first");
    let _ = w.curl(&[&format!("https://{SHOP}/a.txt?old")]);
    let old = w.recording_of_request("GET", SHOP, "/a.txt");
    let old_file = w.wait_file(&old);
    let _ = w.curl(&[&format!("https://{PARTNER}/echo")]);
    let new = w.recording_of_request("GET", PARTNER, "/echo");
    w.wait_file(&new);
    // Two days old, as far as retention can tell.
    let f = std::fs::File::options()
        .write(true)
        .open(&old_file)
        .unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(2 * 86_400))
        .unwrap();
    drop(f);
    let out = w.sessions(&["prune"]);
    assert!(out.contains(&format!("removed {old}")), "{out}");
    assert!(out.contains("age"), "{out}");
    assert!(!out.contains(&format!("removed {new}")), "{out}");
    assert!(!old_file.exists());
    let left = w.list(&[]);
    assert!(left.contains(&new) && !left.contains(&old), "{left:?}");
    // Nothing more to do.
    let out = w.sessions(&["prune"]);
    assert!(out.starts_with("0 recording(s) removed"), "{out}");
}
