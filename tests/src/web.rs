//! `WebOrigin`: the `gw-origin` HTTP/HTTPS/WebSocket server running inside
//! a `TestNet`, with its own test CA, a docroot the test writes pages into,
//! and its JSON-lines log (see `tests/src/bin/gw-origin/main.rs` for the
//! routes and the log format).
//!
//! It binds the namespace's IPv4 and IPv6 addresses, plain HTTP on port 80
//! and HTTPS on 443 by default (the namespace is the test's own, so the
//! well-known ports are free). Its leaf certificate names the configured DNS
//! names (default `origin.test`) and both namespace addresses.
//!
//! Also here: a small blocking WebSocket client (`WsClient`) and a rustls
//! client connector (`tls_connect`) for tests that talk to an origin
//! directly.

use crate::TempDir;
use crate::jsonlog::JsonLines;
use crate::net::TestNet;
use crate::tlsca::TestCa;
use base64::Engine;
use serde_json::Value;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// The card number gw-origin's `/big` puts in every 1 KiB block.
pub const BIG_CARD: &str = "4111111111111111";

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start a `WebOrigin`. `bin` is gw-origin's path: integration tests
/// pass `env!("CARGO_BIN_EXE_gw-origin")`, which the library cannot see.
#[derive(Clone, Debug)]
pub struct WebOptions {
    bin: PathBuf,
    names: Vec<String>,
    http_port: u16,
    https_port: u16,
    alpn: Option<String>,
}

impl WebOptions {
    pub fn new(bin: impl Into<PathBuf>) -> WebOptions {
        WebOptions {
            bin: bin.into(),
            names: vec!["origin.test".to_owned()],
            http_port: 80,
            https_port: 443,
            alpn: None,
        }
    }

    /// DNS names in the leaf certificate (the first is its CN and the
    /// host of `https_url`/`http_url`). Replaces the default `origin.test`.
    pub fn names(mut self, names: &[&str]) -> WebOptions {
        assert!(!names.is_empty(), "a WebOrigin needs at least one name");
        self.names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    pub fn http_port(mut self, port: u16) -> WebOptions {
        self.http_port = port;
        self
    }

    pub fn https_port(mut self, port: u16) -> WebOptions {
        self.https_port = port;
        self
    }

    /// Offer only `http/1.1` in ALPN: an origin that cannot speak h2.
    pub fn h1_only(self) -> WebOptions {
        self.alpn("http/1.1")
    }

    /// The ALPN list, comma-separated (`h2`, `http/1.1`). Default both.
    pub fn alpn(mut self, list: &str) -> WebOptions {
        self.alpn = Some(list.to_owned());
        self
    }
}

pub struct WebOrigin {
    child: Child,
    log: JsonLines,
    reader: Option<std::thread::JoinHandle<()>>,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    http_port: u16,
    https_port: u16,
    names: Vec<String>,
    ca: TestCa,
    cert: PathBuf,
    key: PathBuf,
    docroot: PathBuf,
    /// Holds the CA, leaf and docroot; removed last.
    _dir: TempDir,
}

impl std::fmt::Debug for WebOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebOrigin")
            .field("v4", &self.v4)
            .field("http_port", &self.http_port)
            .field("https_port", &self.https_port)
            .field("names", &self.names)
            .finish()
    }
}

/// The port of the first `ip:port` in `list`.
fn first_port(list: &Value) -> Option<u16> {
    list.get(0)?
        .as_str()?
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.port())
}

impl WebOrigin {
    /// Start gw-origin in `net`, bound to the namespace's v4 and v6
    /// addresses. Panics (with the origin's output) if it does not come up
    /// within 10 s.
    pub fn start(net: &TestNet, opts: WebOptions) -> WebOrigin {
        let dir = TempDir::new();
        let docroot = dir.path().join("docroot");
        let ca_dir = dir.path().join("ca");
        for d in [&docroot, &ca_dir] {
            std::fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        let (v4, v6) = (net.ns_v4(), net.ns_v6());
        let mut ca = TestCa::new(&ca_dir, "gateway-tests origin CA");
        let names: Vec<&str> = opts.names.iter().map(String::as_str).collect();
        let (cert, key) = ca.issue(&names, &[v4.into(), v6.into()]);
        let mut cmd = Command::new(&opts.bin);
        for ip in [IpAddr::from(v4), IpAddr::from(v6)] {
            cmd.arg("--bind").arg(ip.to_string());
        }
        cmd.arg("--http-port")
            .arg(opts.http_port.to_string())
            .arg("--https-port")
            .arg(opts.https_port.to_string())
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--docroot")
            .arg(&docroot);
        if let Some(alpn) = &opts.alpn {
            cmd.arg("--alpn").arg(alpn);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = net.spawn_in_ns(cmd);
        let log = JsonLines::new();
        let reader = Some(log.follow(child.stdout.take().unwrap()));
        let mut origin = WebOrigin {
            child,
            log,
            reader,
            v4,
            v6,
            http_port: opts.http_port,
            https_port: opts.https_port,
            names: opts.names.clone(),
            ca,
            cert,
            key,
            docroot,
            _dir: dir,
        };
        let ready = origin.log.wait(0, START_TIMEOUT, |v| {
            v.get("listening").is_some() || v["ok"] == false
        });
        match ready {
            Ok(v) if v.get("listening").is_some() => {
                // Port 0 means "any": report what was bound (on v4).
                origin.http_port = first_port(&v["http"]).unwrap_or(opts.http_port);
                origin.https_port = first_port(&v["https"]).unwrap_or(opts.https_port);
                origin
            }
            other => panic!(
                "gw-origin ({}) did not start: {other:?}; output: {}",
                opts.bin.display(),
                origin.log.tail(20)
            ),
        }
    }

    /// The directory served at `/`; write pages into it.
    pub fn docroot(&self) -> &Path {
        &self.docroot
    }

    /// Write `<docroot>/<rel>` (creating directories).
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.docroot.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        std::fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Write `<rel>` and its precompressed siblings `<rel>.gz` and
    /// `<rel>.br`, which the origin serves to clients accepting them.
    pub fn write_precompressed(&self, rel: &str, content: impl AsRef<[u8]>) {
        let content = content.as_ref();
        self.write(rel, content);
        self.write(&format!("{rel}.gz"), gzip(content));
        self.write(&format!("{rel}.br"), brotli_compress(content));
    }

    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The PEM of the CA that issued the origin's certificate.
    pub fn ca_pem_path(&self) -> &Path {
        self.ca.pem_path()
    }

    /// The origin's leaf certificate and key (PEM).
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// The DNS names in the certificate; the first is the primary one.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn addr_v4(&self) -> Ipv4Addr {
        self.v4
    }

    pub fn addr_v6(&self) -> Ipv6Addr {
        self.v6
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    pub fn https_port(&self) -> u16 {
        self.https_port
    }

    /// `https://<first name>[:port]<path>`.
    pub fn https_url(&self, path: &str) -> String {
        match self.https_port {
            443 => format!("https://{}{path}", self.names[0]),
            p => format!("https://{}:{p}{path}", self.names[0]),
        }
    }

    /// `http://<first name>[:port]<path>`.
    pub fn http_url(&self, path: &str) -> String {
        match self.http_port {
            80 => format!("http://{}{path}", self.names[0]),
            p => format!("http://{}:{p}{path}", self.names[0]),
        }
    }

    /// The raw log (every line, including `listening`).
    pub fn log(&self) -> &JsonLines {
        &self.log
    }

    /// The `request` objects logged so far (the value of each
    /// `{"request": {...}}` line).
    pub fn requests(&self) -> Vec<Value> {
        self.of_kind("request")
    }

    /// How many logged requests match `pred` (given the `request` object).
    pub fn request_count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.requests().iter().filter(|r| pred(r)).count()
    }

    /// Wait for a logged request matching `pred`; returns its `request`
    /// object. Panics with the log's tail on timeout.
    pub fn wait_request(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        self.wait_kind("request", pred, timeout)
    }

    /// The `done` objects logged so far.
    pub fn dones(&self) -> Vec<Value> {
        self.of_kind("done")
    }

    /// Wait for a `done` object matching `pred`, e.g. the one whose `id` is
    /// a request's.
    pub fn wait_done(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        self.wait_kind("done", pred, timeout)
    }

    /// The `ws` objects logged so far.
    pub fn ws_events(&self) -> Vec<Value> {
        self.of_kind("ws")
    }

    /// Wait for a `ws` object matching `pred`, e.g. `|w| w["text"] == "hi"`.
    pub fn wait_ws(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        self.wait_kind("ws", pred, timeout)
    }

    /// Failed TLS handshakes (`{"tls_error": "...", "peer": ...}` lines).
    pub fn tls_errors(&self) -> Vec<Value> {
        self.log
            .values()
            .into_iter()
            .filter(|v| v.get("tls_error").is_some())
            .collect()
    }

    fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.log
            .values()
            .into_iter()
            .filter_map(|mut v| v.get_mut(kind).map(Value::take))
            .collect()
    }

    fn wait_kind(&self, kind: &str, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        match self
            .log
            .wait(0, timeout, |v| v.get(kind).is_some_and(&pred))
        {
            Ok(mut v) => v[kind].take(),
            Err(e) => panic!(
                "gw-origin logged no matching {kind} ({e:?}); its log: {}",
                self.log.tail(30)
            ),
        }
    }
}

impl Drop for WebOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn brotli_compress(data: &[u8]) -> Vec<u8> {
    let mut w = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
    w.write_all(data).unwrap();
    w.into_inner()
}

/// A rustls client connection to `addr`, verifying the server against the
/// CA in `ca_pem` for `server_name`, offering `alpn` (e.g. `&["http/1.1"]`).
/// The handshake is completed before returning.
pub fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &Path,
    alpn: &[&str],
) -> io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let other = |e: String| io::Error::other(e);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).map_err(|e| other(e.to_string()))? {
        roots
            .add(c.map_err(|e| other(e.to_string()))?)
            .map_err(|e| other(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| other(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| other(e.to_string()))?;
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| other(e.to_string()))?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// A minimal blocking WebSocket client (RFC 6455): masked frames out,
/// whole messages in. Enough to check an echo end to end.
pub struct WsClient<S: Read + Write> {
    stream: S,
}

/// One received WebSocket message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    Text(String),
    Binary(Vec<u8>),
    /// A close frame with its code (if any).
    Close(Option<u16>),
}

impl<S: Read + Write> WsClient<S> {
    /// Send the upgrade request for `path` with `Host: host` and check the
    /// 101 answer and its `Sec-WebSocket-Accept`.
    pub fn handshake(mut stream: S, host: &str, path: &str) -> io::Result<WsClient<S>> {
        let key_bytes: [u8; 16] = rand::random();
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )?;
        stream.flush()?;
        // Read the head byte by byte so no frame byte is consumed.
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut b)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("handshake answer cut: {}", String::from_utf8_lossy(&head)),
                ));
            }
            head.push(b[0]);
            if head.len() > 16384 {
                return Err(io::Error::other("handshake answer too long"));
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let bad = |why: &str| io::Error::other(format!("{why}: {head}"));
        if !head.starts_with("HTTP/1.1 101") {
            return Err(bad("not 101"));
        }
        let digest = ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
        );
        let want = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
        let accepted = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(n, v)| {
                n.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == want
            })
        });
        if !accepted {
            return Err(bad("wrong or missing Sec-WebSocket-Accept"));
        }
        Ok(WsClient { stream })
    }

    fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mask: [u8; 4] = rand::random();
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&out)?;
        self.stream.flush()
    }

    pub fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send_frame(0x1, text.as_bytes())
    }

    pub fn send_binary(&mut self, data: &[u8]) -> io::Result<()> {
        self.send_frame(0x2, data)
    }

    /// The next data or close message (pings are answered, pongs skipped;
    /// fragments reassembled).
    pub fn recv(&mut self) -> io::Result<WsMessage> {
        let mut partial: Option<(u8, Vec<u8>)> = None;
        loop {
            let mut h = [0u8; 2];
            self.stream.read_exact(&mut h)?;
            let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                self.stream.read_exact(&mut b)?;
                len = u64::from(u16::from_be_bytes(b));
            } else if len == 127 {
                let mut b = [0u8; 8];
                self.stream.read_exact(&mut b)?;
                len = u64::from_be_bytes(b);
            }
            if h[1] & 0x80 != 0 {
                return Err(io::Error::other("server sent a masked frame"));
            }
            let mut payload = vec![0u8; len as usize];
            self.stream.read_exact(&mut payload)?;
            let (op, data) = match opcode {
                0x8 => {
                    let code = payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                    return Ok(WsMessage::Close(code));
                }
                0x9 => {
                    self.send_frame(0xA, &payload)?;
                    continue;
                }
                0xA => continue,
                0x0 => {
                    let (op, mut data) = partial
                        .take()
                        .ok_or_else(|| io::Error::other("continuation without a message"))?;
                    data.extend_from_slice(&payload);
                    (op, data)
                }
                op => (op, payload),
            };
            if !fin {
                partial = Some((op, data));
                continue;
            }
            return match op {
                0x1 => String::from_utf8(data)
                    .map(WsMessage::Text)
                    .map_err(|_| io::Error::other("text message is not UTF-8")),
                _ => Ok(WsMessage::Binary(data)),
            };
        }
    }

    /// Send a close (1000) and wait for the server's.
    pub fn close(&mut self) -> io::Result<Option<u16>> {
        self.send_frame(0x8, &1000u16.to_be_bytes())?;
        loop {
            if let WsMessage::Close(code) = self.recv()? {
                return Ok(code);
            }
        }
    }

    pub fn into_inner(self) -> S {
        self.stream
    }
}
