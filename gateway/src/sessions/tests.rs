use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::AtomicU64,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::Value;

use super::*;
use crate::policy::SecretValue;

const SECRET: &str = "Bearer inj3cted-s3cret-value-9a8b";
const COOKIE_VALUE: &str = "c00kie-session-abcdef";
const AUTH_TOKEN: &str = "client-own-token-123456";

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "gw-sessions-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cfg(dir: &Path, body_cap: usize, max_total: u64) -> config::Sessions {
    config::Sessions {
        enabled: true,
        dir: dir.to_path_buf(),
        body_cap,
        max_age: Duration::from_secs(30 * 86_400),
        max_total_bytes: max_total,
    }
}

fn conn_record(session: u64) -> ConnRecord {
    ConnRecord {
        session,
        identity: "ci".into(),
        subject: "ci@example".into(),
        duties: vec!["browser-executor".into()],
        identity_source: "static",
        cgroup: "/gw/ci".into(),
        pid: 4242,
        exe: "/usr/bin/curl".into(),
        orig_dst: Some("10.1.2.3:443".parse::<SocketAddr>().unwrap()),
        host: "shop.test".into(),
        decision: "inspect",
        rule: "per-request".into(),
        bytes_up: 10,
        bytes_down: 20,
        duration: Duration::from_millis(15),
        ..ConnRecord::default()
    }
}

fn injection() -> Injection {
    Injection {
        header: HeaderName::from_static("x-partner-auth"),
        value: SecretValue::from_file_bytes(SECRET.as_bytes()).unwrap(),
        secret: "partner".into(),
        rule: "partner-credential".into(),
    }
}

fn request() -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri("/v1/orders?page=2&access_token=qwertyuiop12")
        .header("host", "shop.test")
        .header("authorization", format!("Bearer {AUTH_TOKEN}"))
        .header("cookie", format!("sid={COOKIE_VALUE}; theme=dark"))
        .header("x-api-key", "k-1234567890")
        .header("x-partner-auth", "client-tried-this-value")
        .header("accept", "application/json")
        .body(())
        .unwrap()
}

fn wait_file(dir: &Path, id: &str) -> PathBuf {
    let p = store::path_of(dir, id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never written", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    p
}

fn decompressed(p: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// One intercepted exchange through the capture API, recorded to disk.
fn record_one(dir: &Path, body_cap: usize) -> (Recording, Vec<u8>) {
    let r = Recorder::start(&cfg(dir, body_cap, 1 << 30));
    r.open(7);
    let req = request();
    let cap = r.capture(7, &req, true, "shop.test");
    cap.injected(&[injection()]);
    // The client sends a body; the origin echoes the secret and the cookie.
    let mut tee = cap.tee(http_body_util::Full::new(Bytes::from_static(
        b"{\"card\":\"4111\"}",
    )));
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    while let Poll::Ready(Some(_)) = Pin::new(&mut tee).poll_frame(&mut cx) {}
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert(
        "set-cookie",
        HeaderValue::from_static("sid=s3rver-set-value-xyz; Path=/; HttpOnly"),
    );
    cap.response(StatusCode::OK, &h);
    cap.response_data(format!("{{\"echo\":\"{SECRET}\",\"cookie\":\"{COOKIE_VALUE}\",").as_bytes());
    cap.response_data("\"card\":\"[MASKED:credit_card:****1111]\"}".as_bytes());
    let rec = HttpRecord {
        request_id: "7-1".into(),
        decision: "allow",
        rule: "shop".into(),
        masked: 1,
        injected: vec!["x-partner-auth<-partner".into()],
        status: 200,
        ..HttpRecord::default()
    };
    cap.finish(&rec, "complete");
    drop(cap);
    let id = r.record(&conn_record(7), Outcome::Closed, "closed by the peers");
    assert_eq!(id, r.id_of(7));
    let p = wait_file(dir, &id);
    let raw = decompressed(&p);
    (store::read_file(&p).unwrap(), raw)
}

#[test]
fn an_exchange_is_recorded_with_credentials_redacted_everywhere() {
    let d = TempDir::new("redact");
    let (rec, raw) = record_one(&d.0, 64 * 1024);
    for s in [
        SECRET,
        "inj3cted-s3cret-value-9a8b",
        COOKIE_VALUE,
        AUTH_TOKEN,
        "k-1234567890",
        "client-tried-this-value",
        "s3rver-set-value-xyz",
        "qwertyuiop12",
    ] {
        assert!(!contains(&raw, s), "{s} is in the recording");
    }
    assert_eq!(rec.format, FORMAT);
    assert_eq!(rec.identity, "ci");
    assert_eq!(rec.duties, vec!["browser-executor"]);
    assert_eq!(rec.pid, 4242);
    assert_eq!(rec.destination, "10.1.2.3:443");
    assert_eq!(rec.outcome, "closed");
    assert_eq!(rec.exchanges.len(), 1);
    let ex = &rec.exchanges[0];
    assert_eq!(ex.method, "POST");
    assert_eq!(ex.scheme, "https");
    assert_eq!(ex.host, "shop.test");
    assert_eq!(
        ex.url,
        "https://shop.test/v1/orders?page=2&access_token=[REDACTED]"
    );
    assert_eq!(ex.request_id, "7-1");
    assert_eq!(ex.masked, 1);
    assert_eq!(ex.outcome, "complete");
    let h = |name: &str| {
        ex.request
            .headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(h("authorization"), "Bearer [REDACTED]");
    assert_eq!(h("cookie"), "sid=[REDACTED]; theme=[REDACTED]");
    assert_eq!(h("x-api-key"), "[REDACTED]");
    assert_eq!(h("x-partner-auth"), "[REDACTED]");
    assert_eq!(h("accept"), "application/json");
    let resp = ex.response.as_ref().unwrap();
    assert_eq!(resp.status, 200);
    let sc = &resp
        .headers
        .iter()
        .find(|h| h.name == "set-cookie")
        .unwrap();
    assert_eq!(sc.value, "sid=[REDACTED]; Path=/; HttpOnly");
    let body = resp.body.as_ref().unwrap();
    assert!(!body.base64 && !body.truncated);
    assert!(body.text.contains("[MASKED:credit_card:****1111]"));
    assert!(
        body.text.contains("\"echo\":\"[REDACTED]\""),
        "{}",
        body.text
    );
    let req_body = ex.request.body.as_ref().unwrap();
    assert_eq!(req_body.text, "{\"card\":\"4111\"}");
}

#[test]
fn bodies_stop_at_the_cap_and_say_so() {
    let d = TempDir::new("cap");
    let (rec, _) = record_one(&d.0, 10);
    let ex = &rec.exchanges[0];
    let b = ex.response.as_ref().unwrap().body.as_ref().unwrap();
    assert!(b.truncated);
    assert_eq!(b.kept, 10);
    assert!(b.size > 10);
    assert_eq!(b.text.len(), 10);
    let rb = ex.request.body.as_ref().unwrap();
    assert!(rb.truncated && rb.kept == 10 && rb.size == 15);
}

#[test]
fn binary_bodies_are_base64_and_text_cut_mid_character_stays_text() {
    let b = Body::from_raw(&[0, 159, 146, 150, 1, 2], 6, false);
    assert!(b.base64);
    assert_eq!(b.bytes(), vec![0, 159, 146, 150, 1, 2]);
    // "é" is two bytes; the cap cut it in half.
    let b = Body::from_raw("abcé".as_bytes().split_at(4).0, 5, true);
    assert!(!b.base64 && b.truncated);
    assert_eq!(b.text, "abc");
}

#[test]
fn exchanges_past_the_cap_are_counted_not_kept() {
    let d = TempDir::new("many");
    let r = Recorder::start(&cfg(&d.0, 16, 1 << 30));
    r.open(1);
    let req = http::Request::builder().uri("/x").body(()).unwrap();
    for i in 0..(MAX_EXCHANGES + 5) {
        let cap = r.capture(1, &req, false, "h.test");
        cap.response(StatusCode::OK, &HeaderMap::new());
        cap.finish(
            &HttpRecord {
                request_id: format!("1-{i}"),
                ..HttpRecord::default()
            },
            "complete",
        );
    }
    let id = r.record(&conn_record(1), Outcome::Closed, "");
    let rec = store::read_file(&wait_file(&d.0, &id)).unwrap();
    assert_eq!(rec.exchanges.len(), MAX_EXCHANGES);
    assert_eq!(rec.exchanges_dropped, 5);
    assert_eq!(rec.exchanges[0].request_id, "1-0");
}

#[test]
fn a_request_whose_client_went_away_is_still_recorded() {
    let d = TempDir::new("gone");
    let r = Recorder::start(&cfg(&d.0, 1024, 1 << 30));
    r.open(3);
    let cap = r.capture(3, &request(), true, "shop.test");
    cap.request_body(b"held body");
    drop(cap);
    // Not an open connection: nothing captured, nothing leaks.
    assert!(r.capture(99, &request(), true, "x").0.is_none());
    let id = r.record(&conn_record(3), Outcome::Closed, "");
    let rec = store::read_file(&wait_file(&d.0, &id)).unwrap();
    assert_eq!(rec.exchanges.len(), 1);
    assert_eq!(rec.exchanges[0].outcome, "aborted");
    assert!(rec.exchanges[0].response.is_none());
    assert!(r.open.lock().unwrap().is_empty());
}

#[test]
fn connections_that_were_not_redirected_are_not_recorded() {
    let d = TempDir::new("none");
    let r = Recorder::start(&cfg(&d.0, 1024, 1 << 30));
    let c = ConnRecord {
        session: 5,
        ..ConnRecord::default()
    };
    assert_eq!(r.record(&c, Outcome::Refused, "no origin"), "");
}

// --- HAR ---

/// The HAR 1.2 required fields and their types.
pub(crate) fn validate_har(v: &Value) -> Result<(), String> {
    fn need<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a Value, String> {
        v.get(key).ok_or_else(|| format!("{what}.{key} missing"))
    }
    fn s(v: &Value, key: &str, what: &str) -> Result<(), String> {
        need(v, key, what)?
            .as_str()
            .map(|_| ())
            .ok_or_else(|| format!("{what}.{key} not a string"))
    }
    fn n(v: &Value, key: &str, what: &str) -> Result<(), String> {
        need(v, key, what)?
            .as_f64()
            .map(|_| ())
            .ok_or_else(|| format!("{what}.{key} not a number"))
    }
    fn pairs(v: &Value, key: &str, what: &str) -> Result<(), String> {
        let a = need(v, key, what)?
            .as_array()
            .ok_or_else(|| format!("{what}.{key} not an array"))?;
        for p in a {
            s(p, "name", key)?;
            s(p, "value", key)?;
        }
        Ok(())
    }
    let log = need(v, "log", "")?;
    if log["version"] != "1.2" {
        return Err("log.version is not 1.2".into());
    }
    let c = need(log, "creator", "log")?;
    s(c, "name", "creator")?;
    s(c, "version", "creator")?;
    let entries = need(log, "entries", "log")?
        .as_array()
        .ok_or("log.entries not an array")?;
    for e in entries {
        s(e, "startedDateTime", "entry")?;
        n(e, "time", "entry")?;
        let rq = need(e, "request", "entry")?;
        for k in ["method", "url", "httpVersion"] {
            s(rq, k, "request")?;
        }
        pairs(rq, "cookies", "request")?;
        pairs(rq, "headers", "request")?;
        pairs(rq, "queryString", "request")?;
        n(rq, "headersSize", "request")?;
        n(rq, "bodySize", "request")?;
        if let Some(p) = rq.get("postData") {
            s(p, "mimeType", "postData")?;
        }
        let rs = need(e, "response", "entry")?;
        n(rs, "status", "response")?;
        for k in ["statusText", "httpVersion", "redirectURL"] {
            s(rs, k, "response")?;
        }
        pairs(rs, "cookies", "response")?;
        pairs(rs, "headers", "response")?;
        let content = need(rs, "content", "response")?;
        n(content, "size", "content")?;
        s(content, "mimeType", "content")?;
        n(rs, "headersSize", "response")?;
        n(rs, "bodySize", "response")?;
        need(e, "cache", "entry")?
            .as_object()
            .ok_or("entry.cache not an object")?;
        let t = need(e, "timings", "entry")?;
        for k in ["send", "wait", "receive"] {
            n(t, k, "timings")?;
            if t[k].as_f64().unwrap_or(-1.0) < 0.0 {
                return Err(format!("timings.{k} negative"));
            }
        }
    }
    Ok(())
}

#[test]
fn har_export_has_the_required_structure() {
    let d = TempDir::new("har");
    let (rec, _) = record_one(&d.0, 64 * 1024);
    let har = har::export(&rec);
    validate_har(&har).unwrap();
    let e = &har["log"]["entries"][0];
    assert_eq!(e["request"]["method"], "POST");
    assert_eq!(e["response"]["status"], 200);
    assert_eq!(e["response"]["statusText"], "OK");
    assert_eq!(e["request"]["postData"]["text"], "{\"card\":\"4111\"}");
    assert!(
        e["response"]["content"]["text"]
            .as_str()
            .unwrap()
            .contains("[MASKED:credit_card:****1111]")
    );
    let q = &e["request"]["queryString"];
    assert_eq!(q[0]["name"], "page");
    assert_eq!(q[1]["value"], "[REDACTED]");
    assert_eq!(e["request"]["cookies"][0]["name"], "sid");
    assert_eq!(e["request"]["cookies"][0]["value"], "[REDACTED]");
    assert_eq!(e["response"]["cookies"][0]["name"], "sid");
    assert!(e["startedDateTime"].as_str().unwrap().ends_with('Z'));
    // A binary, truncated body is base64 with the flag; no response at all
    // still yields a valid entry.
    let mut rec2 = rec.clone();
    rec2.exchanges[0].response.as_mut().unwrap().body = Some(Body::from_raw(&[0, 1, 2], 9, true));
    rec2.exchanges.push(Exchange {
        method: "GET".into(),
        url: "https://shop.test/".into(),
        http_version: "HTTP/2.0".into(),
        outcome: "aborted".into(),
        ..Exchange::default()
    });
    let har = har::export(&rec2);
    validate_har(&har).unwrap();
    let c = &har["log"]["entries"][0]["response"]["content"];
    assert_eq!(c["encoding"], "base64");
    assert_eq!(c["size"], 9);
    assert_eq!(har["log"]["entries"][1]["response"]["status"], 0);
}

// --- retention ---

fn fake(dir: &Path, id: &str, bytes: usize, age: Duration) {
    let p = store::path_of(dir, id);
    std::fs::write(&p, vec![b'x'; bytes]).unwrap();
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

fn ids(dir: &Path) -> Vec<String> {
    store::scan(dir)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

#[test]
fn retention_removes_by_age_then_the_oldest_until_under_the_cap() {
    let d = TempDir::new("prune");
    let day = Duration::from_secs(86_400);
    fake(&d.0, "100-1", 100, day * 40);
    fake(&d.0, "100-2", 100, day * 31);
    fake(&d.0, "100-3", 100, day * 3);
    fake(&d.0, "100-10", 100, day * 2);
    fake(&d.0, "100-4", 100, day);
    fake(&d.0, "100-5", 100, Duration::ZERO);
    std::fs::write(d.0.join("unrelated.txt"), "x").unwrap();
    assert_eq!(
        ids(&d.0),
        ["100-1", "100-2", "100-3", "100-10", "100-4", "100-5"]
    );
    let (batches, left) = store::prune(&d.0, day * 30, 250, SystemTime::now()).unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].reason, "age");
    let aged: Vec<_> = batches[0].entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(aged, ["100-1", "100-2"]);
    assert_eq!(batches[1].reason, "size");
    let sized: Vec<_> = batches[1].entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(sized, ["100-3", "100-10"]);
    assert_eq!(batches[1].bytes(), 200);
    assert_eq!(left, 200);
    assert_eq!(ids(&d.0), ["100-4", "100-5"]);
    assert!(d.0.join("unrelated.txt").exists());
    // Nothing to do: nothing removed.
    let (batches, _) = store::prune(&d.0, day * 30, 250, SystemTime::now()).unwrap();
    assert!(batches.is_empty());
}

#[test]
fn the_writer_keeps_the_store_under_its_cap_oldest_first() {
    let d = TempDir::new("cap-store");
    let max = 40_000;
    let mut w = Writer {
        dir: d.0.clone(),
        max_age: Duration::from_secs(86_400),
        max_total: max,
        total: 0,
    };
    // Bodies that do not compress: ~12 KB recordings.
    let mut seed = 0x1234_5678_u64;
    for i in 1..=10u64 {
        let noise: Vec<u8> = (0..12_000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % 251) as u8
            })
            .collect();
        let mut raw = ExRaw {
            ex: Exchange::default(),
            started: Instant::now(),
            response_at: None,
            ended: None,
            req: BodyBuf::default(),
            resp: BodyBuf::default(),
            injected_names: Vec::new(),
        };
        raw.ex.response = Some(Response::default());
        raw.resp
            .push(&noise, 1 << 20, &AtomicUsize::new(usize::MAX));
        w.write(Pending {
            rec: Recording {
                id: format!("500-{i}"),
                session: i,
                ..Recording::default()
            },
            raw: vec![raw],
            secrets: Vec::new(),
        });
        let total: u64 = store::scan(&d.0).unwrap().iter().map(|e| e.bytes).sum();
        assert!(total <= max, "store at {total} bytes after write {i}");
    }
    let left = ids(&d.0);
    assert!(left.contains(&"500-10".to_string()), "{left:?}");
    assert!(!left.contains(&"500-1".to_string()), "{left:?}");
    // What is left is the newest, in order.
    let nums: Vec<u64> = left
        .iter()
        .map(|i| i.rsplit('-').next().unwrap().parse().unwrap())
        .collect();
    let first = nums[0];
    assert_eq!(nums, (first..=10).collect::<Vec<_>>());
}

#[test]
fn a_write_error_skips_the_recording_and_nothing_else() {
    let d = TempDir::new("rofs");
    // The "directory" is a file: every write fails.
    let f = d.0.join("not-a-dir");
    std::fs::write(&f, "x").unwrap();
    let mut w = Writer {
        dir: f.clone(),
        max_age: Duration::from_secs(86_400),
        max_total: 1 << 20,
        total: 0,
    };
    w.write(Pending {
        rec: Recording {
            id: "1-1".into(),
            ..Recording::default()
        },
        raw: Vec::new(),
        secrets: Vec::new(),
    });
    assert_eq!(w.total, 0);
}

#[test]
fn ids_never_name_paths_outside_the_store() {
    for bad in ["../x", "a/b", "", ".hidden", "x y"] {
        assert!(!store::valid_id(bad), "{bad}");
    }
    assert!(store::valid_id("1764000000000-12"));
    let d = TempDir::new("ids");
    assert!(store::load(&d.0, "../../etc/passwd").is_err());
    assert!(store::load(&d.0, "1-1").is_err());
}

// --- CLI helpers ---

#[test]
fn times_format_and_parse() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    let p = cli::parse_rfc3339;
    assert_eq!(p("2026-11-18T11:06:40.123Z"), Some(1_795_000_000_123));
    assert_eq!(p("2026-11-18T12:06:40+01:00"), Some(1_795_000_000_000));
    assert_eq!(p("2026-11-18"), Some(1_794_960_000_000));
    assert_eq!(p("2026-13-01"), None);
    assert_eq!(p("yesterday"), None);
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    assert_eq!(
        cli::parse_since("1h30m", now).unwrap(),
        (1_000_000 - 5400) * 1000
    );
    assert_eq!(
        cli::parse_since("7d", now).unwrap(),
        (1_000_000 - 604_800) * 1000
    );
    assert_eq!(
        cli::parse_since("1700000000", now).unwrap(),
        1_700_000_000_000
    );
    assert!(cli::parse_since("soon", now).is_err());
    assert_eq!(cli::parse_duration("90s"), Some(Duration::from_secs(90)));
    assert_eq!(cli::parse_duration("5"), None);
}

#[test]
fn header_and_query_redaction_rules() {
    let mut s = Vec::new();
    assert_eq!(
        redact::header("Proxy-Authorization", b"Basic dXNlcjpwYXNz", &mut s).1,
        "Basic [REDACTED]"
    );
    assert_eq!(
        redact::header("X-Auth-Token", b"abcdefgh", &mut s).1,
        "[REDACTED]"
    );
    assert_eq!(redact::header("X-Request-Id", b"r-1", &mut s).1, "r-1");
    assert_eq!(redact::header("User-Agent", b"curl/8", &mut s).1, "curl/8");
    assert!(s.contains(&b"dXNlcjpwYXNz".to_vec()));
    assert_eq!(
        redact::query("a=1&api_key=zzzzzzzz&sig=12345678&q=x", &mut s),
        "a=1&api_key=[REDACTED]&sig=[REDACTED]&q=x"
    );
    assert_eq!(
        redact::scrub("x abcdefgh y zzzzzzzz", &s),
        "x [REDACTED] y [REDACTED]"
    );
}
