//! Self-test of the interception tests' origin: `gw-origin` driven by
//! `WebOrigin` in a network namespace, checked from the host namespace with
//! real clients (curl, and the harness's WebSocket client), without the
//! gateway. If these fail, an interception test failing says nothing about
//! the gateway.

use gateway_tests::web::{BIG_CARD, WebOptions, WebOrigin, WsClient, WsMessage, tls_connect};
use gateway_tests::{TestNet, require_root};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);

fn opts() -> WebOptions {
    WebOptions::new(env!("CARGO_BIN_EXE_gw-origin"))
}

/// curl from the host namespace, with the origin's names resolved to `ip`,
/// its CA trusted, and no proxy from the environment.
fn curl_raw(o: &WebOrigin, ip: IpAddr, args: &[&str]) -> Output {
    let ip = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let mut c = Command::new("curl");
    c.args(["-sS", "--noproxy", "*", "--max-time", "10", "--cacert"])
        .arg(o.ca_pem_path());
    for name in o.names() {
        for port in [o.http_port(), o.https_port()] {
            c.arg("--resolve").arg(format!("{name}:{port}:{ip}"));
        }
    }
    c.args(args).stdin(Stdio::null());
    c.output().expect("run curl (is it installed?)")
}

/// A response as curl `-i` shows it (body decoded with `--compressed`).
#[derive(Debug)]
struct Fetched {
    version: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Fetched {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }
}

fn fetch(o: &WebOrigin, args: &[&str]) -> Fetched {
    let mut all = vec!["-i"];
    all.extend_from_slice(args);
    let out = curl_raw(o, o.addr_v4().into(), &all);
    assert!(
        out.status.success(),
        "curl {args:?} failed ({}): {}; origin log: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        o.log().tail(20)
    );
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("curl -i output has a header block");
    let head = String::from_utf8_lossy(&out.stdout[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap().to_owned();
    let status = parts.next().unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Fetched {
        version,
        status,
        headers,
        body: out.stdout[split + 4..].to_vec(),
    }
}

#[test]
fn https_h2_and_h1_echo_and_compressed_files() {
    require_root();
    let net = TestNet::new();
    let o = WebOrigin::start(&net, opts());
    o.write("index.html", "<html><body>hello</body></html>");
    let json = r#"{"customer":{"name":"Ada","card":"4111111111111111"},"items":[1,2,3]}"#;
    o.write_precompressed("data.json", json);

    // HTTP/2 over TLS, negotiated by ALPN.
    let r = fetch(&o, &["--http2", &o.https_url("/")]);
    assert_eq!((r.version.as_str(), r.status), ("HTTP/2", 200), "{r:?}");
    assert_eq!(r.body, b"<html><body>hello</body></html>");
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let req = o.wait_request(|r| r["path"] == "/" && r["version"] == "HTTP/2.0", WAIT);
    assert_eq!(req["tls"], true);
    assert_eq!(req["alpn"], "h2");
    assert_eq!(req["sni"], "origin.test");
    assert_eq!(req["host"], "origin.test");
    let done = o.wait_done(|d| d["id"] == req["id"], WAIT);
    assert_eq!(done["status"], 200);
    assert_eq!(done["complete"], true);

    // HTTP/1.1 over TLS; /echo reflects a custom header and the body.
    let r = fetch(
        &o,
        &[
            "--http1.1",
            "-H",
            "X-Custom: hello origin",
            "--data-binary",
            "abc",
            &o.https_url("/echo?x=1"),
        ],
    );
    assert_eq!((r.version.as_str(), r.status), ("HTTP/1.1", 200), "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let echo = r.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["headers"]["x-custom"][0], "hello origin");
    assert_eq!(echo["body_len"], 3);
    assert_eq!(
        echo["body_sha256"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let req = o.wait_request(|r| r["path"] == "/echo", WAIT);
    assert_eq!(req["version"], "HTTP/1.1");
    assert_eq!(req["alpn"], "http/1.1");
    assert_eq!(req["headers"]["x-custom"][0], "hello origin");

    // A precompressed sibling is served to a client that accepts it, and
    // curl decodes it.
    let r = fetch(
        &o,
        &[
            "--compressed",
            "-H",
            "Accept-Encoding: gzip",
            &o.https_url("/data.json"),
        ],
    );
    assert_eq!(r.header("content-encoding"), Some("gzip"), "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body, json.as_bytes());
    let r = fetch(&o, &["--compressed", &o.https_url("/data.json")]);
    assert_eq!(r.header("content-encoding"), Some("br"), "{r:?}");
    assert_eq!(r.body, json.as_bytes());
    // Without Accept-Encoding: the identity file.
    let r = fetch(&o, &[&o.https_url("/data.json")]);
    assert_eq!(r.header("content-encoding"), None, "{r:?}");
    assert_eq!(r.body, json.as_bytes());
    // On-the-fly compression, plain HTTP.
    for coding in ["gzip", "deflate", "br"] {
        let r = fetch(
            &o,
            &[
                "--compressed",
                &o.http_url(&format!("/echo?encoding={coding}")),
            ],
        );
        assert_eq!(r.header("content-encoding"), Some(coding), "{r:?}");
        assert_eq!(r.json()["query"], format!("encoding={coding}"));
    }
    assert_eq!(fetch(&o, &[&o.http_url("/missing.html")]).status, 404);
}

fn ws_roundtrip<S: std::io::Read + std::io::Write>(o: &WebOrigin, stream: S, tag: &str) {
    let mut ws = WsClient::handshake(stream, "origin.test", "/ws")
        .unwrap_or_else(|e| panic!("{tag}: handshake: {e}; log: {}", o.log().tail(10)));
    let text = format!("hello {tag} ✓");
    ws.send_text(&text).unwrap();
    assert_eq!(ws.recv().unwrap(), WsMessage::Text(text.clone()));
    let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
    ws.send_binary(&big).unwrap();
    assert_eq!(ws.recv().unwrap(), WsMessage::Binary(big));
    assert_eq!(ws.close().unwrap(), Some(1000));
    let logged = o.wait_ws(|w| w["text"] == text.as_str(), WAIT);
    o.wait_ws(|w| w["id"] == logged["id"] && w["binary"] == 70_000, WAIT);
    o.wait_ws(|w| w["id"] == logged["id"] && w["close"] == 1000, WAIT);
    let upgrade = o.wait_request(|r| r["id"] == logged["id"], WAIT);
    assert_eq!(upgrade["path"], "/ws");
    assert_eq!(upgrade["headers"]["upgrade"][0], "websocket");
    o.wait_done(|d| d["id"] == logged["id"] && d["status"] == 101, WAIT);
}

#[test]
fn websocket_echo_over_plain_and_tls() {
    require_root();
    let net = TestNet::new();
    let o = WebOrigin::start(&net, opts());
    let plain = SocketAddr::new(o.addr_v4().into(), o.http_port());
    let tcp = TcpStream::connect_timeout(&plain, WAIT).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    ws_roundtrip(&o, tcp, "plain");

    let tls = SocketAddr::new(o.addr_v4().into(), o.https_port());
    let stream = tls_connect(tls, "origin.test", o.ca_pem_path(), &["http/1.1"]).unwrap();
    assert_eq!(stream.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    ws_roundtrip(&o, stream, "tls");

    // Over IPv6 as well.
    let v6 = SocketAddr::new(o.addr_v6().into(), o.http_port());
    let tcp = TcpStream::connect_timeout(&v6, WAIT).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    ws_roundtrip(&o, tcp, "v6");
}

#[test]
fn h1_only_origin_streaming_and_failures() {
    require_root();
    let net = TestNet::new();
    let o = WebOrigin::start(&net, opts().h1_only().names(&["h1.test", "alt.h1.test"]));
    assert_eq!(o.https_url("/x"), "https://h1.test/x");

    // The client offers h2; the origin only has http/1.1.
    let out = curl_raw(
        &o,
        o.addr_v4().into(),
        &[
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            &o.https_url("/echo"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1.1");
    let req = o.wait_request(|r| r["path"] == "/echo", WAIT);
    assert_eq!(req["alpn"], "http/1.1");
    assert_eq!(req["sni"], "h1.test");

    // The second name and the v6 address are in the certificate too.
    let out = curl_raw(
        &o,
        o.addr_v6().into(),
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "https://alt.h1.test/echo",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");

    // /big streams N bytes, chunked, with a card number every KiB.
    let r = fetch(&o, &["--http1.1", &o.https_url("/big?bytes=100000")]);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{r:?}");
    assert_eq!(r.body.len(), 100_000);
    let text = String::from_utf8(r.body).unwrap();
    assert_eq!(text.matches(BIG_CARD).count(), 98); // 97 full blocks + 1 partial
    assert!(text.starts_with(&format!("00000000 card {BIG_CARD} ")));
    // Streamed compression decodes to the same bytes.
    let r = fetch(
        &o,
        &[
            "--compressed",
            &o.http_url("/big?bytes=100000&encoding=gzip"),
        ],
    );
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(String::from_utf8(r.body).unwrap(), text);

    // /slow-close: half the announced body, then the connection dies.
    let out = curl_raw(
        &o,
        o.addr_v4().into(),
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &o.https_url("/slow-close"),
        ],
    );
    assert_eq!(out.status.code(), Some(18), "curl: partial file; {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "32768");
    o.wait_done(
        |d| d["path"] == "/slow-close" && d["complete"] == false,
        WAIT,
    );

    // A client that does not trust the CA: the origin logs the failed
    // handshake.
    let mut c = Command::new("curl");
    c.args(["-sS", "--noproxy", "*", "--max-time", "10", "--resolve"])
        .arg(format!("h1.test:{}:{}", o.https_port(), o.addr_v4()))
        .arg(o.https_url("/"));
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(60), "{out:?}");
    gateway_tests::poll(WAIT, || (!o.tls_errors().is_empty()).then_some(()))
        .unwrap_or_else(|| panic!("no tls_error logged: {}", o.log().tail(10)));
}

#[test]
fn slow_close_over_h2_resets_the_stream_after_half() {
    require_root();
    let net = TestNet::new();
    let o = WebOrigin::start(&net, opts());
    for _ in 0..3 {
        let out = curl_raw(
            &o,
            o.addr_v4().into(),
            &[
                "--http2",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{http_version}",
                &o.https_url("/slow-close"),
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(92),
            "curl: HTTP/2 stream error; {out:?}"
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "32768 2");
    }
}
