//! `Hook`: a small recording HTTP/1.1 server on std sockets, one thread per
//! connection. The approvals tests use it as the webhook receiver (on
//! loopback, answering, or accepting and then never answering) and as a
//! payments origin (TLS, inside a `TestNet`), where what matters is exactly
//! what arrived: method, path, headers and the body byte for byte.
//!
//! Its log is a [`JsonLines`] of objects, so tests wait on it with a
//! deadline:
//! - `{"accepted": N, "peer": "ip:port"}` per connection (N counts from 1);
//! - `{"request": {"conn", "method", "path", "headers": {lower-name:
//!   [values]}, "body", "body_len", "body_sha256"}}` per request, once its
//!   body is read (`body` is the body as text, lossily);
//! - `{"hung": N}` when a request on connection N gets no answer, by the
//!   handler's choice ([`Reply::Hang`]);
//! - `{"closed": N}` when the peer closed connection N (or the hook
//!   stopped);
//! - `{"tls_error": "...", "conn": N}` for a failed handshake.
//!
//! Also here: [`request`], a one-shot HTTP/1.1 client for plain-HTTP APIs
//! (the approvals admin API).

use crate::jsonlog::JsonLines;
use crate::net::TestNet;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest request head and body the hook reads.
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;

/// A request as the hook received it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Lower-case names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the handler answers.
#[derive(Debug, Clone)]
pub enum Reply {
    Respond {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
    /// Keep the connection open and never answer (until the peer closes it
    /// or the hook is dropped).
    Hang,
}

impl Reply {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Reply {
        Reply::Respond {
            status,
            content_type: content_type.to_owned(),
            body: body.into(),
        }
    }

    pub fn json(status: u16, body: &Value) -> Reply {
        Reply::new(status, "application/json", body.to_string())
    }
}

pub type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// How to start a [`Hook`].
pub struct HookOptions {
    bind: SocketAddr,
    netns: Option<PathBuf>,
    tls: Option<(PathBuf, PathBuf)>,
    handler: Handler,
}

impl HookOptions {
    /// Plain HTTP on 127.0.0.1, any free port, answering `200 ok` to
    /// everything.
    pub fn new() -> HookOptions {
        HookOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            netns: None,
            tls: None,
            handler: Arc::new(|_| Reply::new(200, "text/plain", "ok\n")),
        }
    }

    pub fn bind(mut self, addr: SocketAddr) -> HookOptions {
        self.bind = addr;
        self
    }

    /// Bind inside the test network namespace (the address must be one of
    /// the namespace's).
    pub fn netns(mut self, net: &TestNet) -> HookOptions {
        self.netns = Some(net.ns_path());
        self
    }

    /// Serve TLS (ALPN `http/1.1`) with this PEM chain and PKCS#8 key.
    pub fn tls(mut self, cert: &Path, key: &Path) -> HookOptions {
        self.tls = Some((cert.to_owned(), key.to_owned()));
        self
    }

    pub fn handler(mut self, f: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> HookOptions {
        self.handler = Arc::new(f);
        self
    }

    /// Accept, read the request, never answer.
    pub fn hang(self) -> HookOptions {
        self.handler(|_| Reply::Hang)
    }
}

impl Default for HookOptions {
    fn default() -> Self {
        Self::new()
    }
}

trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

struct Shared {
    log: JsonLines,
    handler: Handler,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// A clone of every accepted socket, to end them on drop.
    conns: Mutex<Vec<TcpStream>>,
    next: AtomicU64,
}

/// A running recording server, stopped (listener and every connection
/// shut down, threads joined) on drop.
pub struct Hook {
    addr: SocketAddr,
    listener: TcpListener,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Hook {
    pub fn start(opts: HookOptions) -> Hook {
        let listener = match &opts.netns {
            None => TcpListener::bind(opts.bind),
            Some(ns) => bind_in_netns(ns, opts.bind),
        }
        .unwrap_or_else(|e| panic!("hook: bind {}: {e}", opts.bind));
        let addr = listener.local_addr().unwrap();
        let tls = opts.tls.as_ref().map(|(c, k)| server_config(c, k));
        let shared = Arc::new(Shared {
            log: JsonLines::new(),
            handler: opts.handler,
            tls,
            conns: Mutex::new(Vec::new()),
            next: AtomicU64::new(1),
        });
        let threads = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let listener = listener.try_clone().unwrap();
            let shared = shared.clone();
            let threads = threads.clone();
            std::thread::spawn(move || {
                // Ends when the listener is shut down (accept fails).
                while let Ok((stream, peer)) = listener.accept() {
                    let n = shared.next.fetch_add(1, Ordering::Relaxed);
                    if let Ok(c) = stream.try_clone() {
                        shared.conns.lock().unwrap().push(c);
                    }
                    shared
                        .log
                        .push(&json!({"accepted": n, "peer": peer.to_string()}).to_string());
                    let shared = shared.clone();
                    let t = std::thread::spawn(move || serve(stream, n, &shared));
                    threads.lock().unwrap().push(t);
                }
            })
        };
        Hook {
            addr,
            listener,
            shared,
            acceptor: Some(acceptor),
            threads,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> &JsonLines {
        &self.shared.log
    }

    /// The `request` objects so far.
    pub fn requests(&self) -> Vec<Value> {
        self.of_kind("request")
    }

    /// Wait for a request matching `pred` (given the `request` object).
    /// Panics with the log's tail on timeout.
    pub fn wait_request(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        match self
            .shared
            .log
            .wait(0, timeout, |v| v.get("request").is_some_and(&pred))
        {
            Ok(mut v) => v["request"].take(),
            Err(e) => panic!(
                "the hook at {} got no matching request ({e:?}); its log: {}",
                self.addr,
                self.shared.log.tail(30)
            ),
        }
    }

    /// Connections the hook accepted so far.
    pub fn accepted(&self) -> usize {
        self.of_kind("accepted").len()
    }

    /// Connections holding an unanswered request that the peer has not
    /// closed: the hook is still keeping them waiting.
    pub fn hanging(&self) -> Vec<u64> {
        let closed: Vec<u64> = self
            .of_kind("closed")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        self.of_kind("hung")
            .iter()
            .filter_map(Value::as_u64)
            .filter(|n| !closed.contains(n))
            .collect()
    }

    fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.shared
            .log
            .values()
            .into_iter()
            .filter_map(|mut v| v.get_mut(kind).map(Value::take))
            .collect()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        // shutdown(2) on a listening socket wakes the blocked accept.
        // SAFETY: a valid socket fd owned by self.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        let threads: Vec<JoinHandle<()>> = self.threads.lock().unwrap().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Bind on a thread that has entered the namespace: the socket stays in
/// the namespace it was created in, whichever thread uses it later.
fn bind_in_netns(ns: &Path, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let ns = File::open(ns)?;
    std::thread::spawn(move || {
        // SAFETY: setns on this (short-lived) thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        TcpListener::bind(addr)
    })
    .join()
    .expect("bind thread")
}

fn server_config(cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap_or_else(|e| panic!("hook: read {}: {e}", cert.display()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("hook: parse {}: {e}", cert.display()));
    let key = PrivateKeyDer::from_pem_file(key)
        .unwrap_or_else(|e| panic!("hook: read {}: {e}", key.display()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap_or_else(|e| panic!("hook: certificate and key: {e}"));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One connection: requests in turn (keep-alive) until the peer closes it,
/// or the handler hangs it.
fn serve(stream: TcpStream, n: u64, shared: &Shared) {
    // The clone kept for `Drop` holds the socket open: end it explicitly.
    if let Ok(own) = stream.try_clone() {
        serve_conn(stream, n, shared);
        let _ = own.shutdown(Shutdown::Both);
    }
    shared.log.push(&json!({"closed": n}).to_string());
}

fn serve_conn(stream: TcpStream, n: u64, shared: &Shared) {
    let io: Box<dyn Io> = match &shared.tls {
        None => Box::new(stream),
        Some(cfg) => {
            let conn = match rustls::ServerConnection::new(cfg.clone()) {
                Ok(c) => c,
                Err(e) => {
                    shared
                        .log
                        .push(&json!({"tls_error": e.to_string(), "conn": n}).to_string());
                    return;
                }
            };
            let mut tls = rustls::StreamOwned::new(conn, stream);
            while tls.conn.is_handshaking() {
                if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                    shared
                        .log
                        .push(&json!({"tls_error": e.to_string(), "conn": n}).to_string());
                    return;
                }
            }
            Box::new(tls)
        }
    };
    let mut io = BufReader::new(io);
    while let Ok(Some(req)) = read_request(&mut io) {
        shared
            .log
            .push(&json!({"request": request_json(&req, n)}).to_string());
        match (shared.handler)(&req) {
            Reply::Hang => {
                shared.log.push(&json!({"hung": n}).to_string());
                // Read (and drop) whatever else comes, until the peer closes.
                let mut sink = [0u8; 4096];
                while matches!(io.read(&mut sink), Ok(k) if k > 0) {}
                break;
            }
            Reply::Respond {
                status,
                content_type,
                body,
            } => {
                let close = req
                    .header("connection")
                    .is_some_and(|c| c.eq_ignore_ascii_case("close"));
                let head = format!(
                    "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\n{}\r\n",
                    reason(status),
                    body.len(),
                    if close { "connection: close\r\n" } else { "" }
                );
                let w = io.get_mut();
                if w.write_all(head.as_bytes())
                    .and_then(|()| w.write_all(&body))
                    .and_then(|()| w.flush())
                    .is_err()
                    || close
                {
                    break;
                }
            }
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

fn request_json(req: &Request, conn: u64) -> Value {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &req.headers {
        headers.entry(k.clone()).or_default().push(v.clone());
    }
    let mut m = Map::new();
    m.insert("conn".into(), json!(conn));
    m.insert("method".into(), json!(req.method));
    m.insert("path".into(), json!(req.path));
    m.insert("headers".into(), json!(headers));
    m.insert(
        "body".into(),
        json!(String::from_utf8_lossy(&req.body).into_owned()),
    );
    m.insert("body_len".into(), json!(req.body.len()));
    m.insert("body_sha256".into(), json!(sha256_hex(&req.body)));
    Value::Object(m)
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One request: head, then a Content-Length or chunked body. `None` at a
/// clean EOF before a request starts.
fn read_request(r: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(bad("EOF in the request head"))
            };
        }
        if head.is_empty() && (line == b"\r\n" || line == b"\n") {
            continue;
        }
        let end = line == b"\r\n" || line == b"\n";
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(bad("request head too long"));
        }
        if end {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let start = lines.next().unwrap_or_default();
    let mut words = start.split_whitespace();
    let (Some(method), Some(path)) = (words.next(), words.next()) else {
        return Err(bad("bad request line"));
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let find = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let body =
        if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            read_chunked(r)?
        } else {
            let len: usize = find("content-length")
                .map(|v| v.parse().map_err(|_| bad("bad content-length")))
                .transpose()?
                .unwrap_or(0);
            if len > MAX_BODY {
                return Err(bad("body too large"));
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body)?;
            body
        };
    Ok(Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body,
    }))
}

fn read_chunked(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the blank line.
            loop {
                let mut t = String::new();
                if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        if body.len() + size > MAX_BODY {
            return Err(bad("body too large"));
        }
        let at = body.len();
        body.resize(at + size, 0);
        r.read_exact(&mut body[at..])?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
    }
}

/// A response from [`request`].
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// One HTTP/1.1 request on a fresh connection (`connection: close`), from
/// the test process itself; the response is read to EOF.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let timeout = Duration::from_secs(10);
    let mut conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes())?;
    conn.write_all(body)?;
    let mut r = BufReader::new(conn);
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let mut status_line = String::new();
    r.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        read_chunked(&mut r)?
    } else {
        let mut b = Vec::new();
        r.read_to_end(&mut b)?;
        b
    };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_answers_and_hangs() {
        let hook = Hook::start(HookOptions::new().handler(|r| {
            if r.path == "/hang" {
                Reply::Hang
            } else {
                Reply::json(201, &json!({"len": r.body.len()}))
            }
        }));
        let r = request(hook.addr(), "POST", "/x", &[("x-test", "1")], b"hello").unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.json()["len"], 5);
        let got = hook.wait_request(|r| r["path"] == "/x", Duration::from_secs(5));
        assert_eq!(got["body"], "hello");
        assert_eq!(got["headers"]["x-test"][0], "1");
        assert_eq!(got["body_sha256"], sha256_hex(b"hello"));

        // A hung request: the client times out, the hook saw it close.
        let mut c = TcpStream::connect(hook.addr()).unwrap();
        c.write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let hung = crate::poll(Duration::from_secs(5), || {
            (!hook.hanging().is_empty()).then(|| hook.hanging())
        })
        .expect("the request is held unanswered");
        assert_eq!(hung.len(), 1);
        drop(c);
        let gone = crate::poll(Duration::from_secs(5), || {
            hook.hanging().is_empty().then_some(())
        });
        assert!(gone.is_some(), "{}", hook.log().tail(10));
    }
}
