//! `gw-origin`: a real HTTP/1.1, HTTP/2 and WebSocket origin for the
//! interception tests (driven by `gateway_tests::web::WebOrigin`).
//!
//! ```text
//! gw-origin --bind IP [--bind IP]... [--http-port N] [--https-port N
//!           --cert PEM --key PEM [--alpn h2,http/1.1]] [--docroot DIR]
//! ```
//!
//! `--http-port` serves plain HTTP/1.1 (with upgrades). `--https-port`
//! serves TLS with the given certificate chain and PKCS#8 key; ALPN offers
//! `h2` and `http/1.1` (a client without ALPN gets HTTP/1.1). `--alpn`
//! (repeatable or comma-separated) restricts the list, e.g. `--alpn
//! http/1.1` for an h1-only origin. Port 0 picks a free port per listener.
//!
//! Routes (every response carries `Cache-Control: no-store`):
//! - `GET|HEAD /<file>`: a file below `--docroot` (`/` is `/index.html`),
//!   Content-Type from the extension (html, js, mjs, json, txt, css, svg,
//!   png, ico, gz, br; else application/octet-stream). When `X.br` or `X.gz`
//!   exists next to `X` and the request's Accept-Encoding allows it, that
//!   file is sent with `Content-Encoding: br|gzip` (br preferred). Missing
//!   file, a path segment starting with `.` → 404; other methods → 405.
//!   The path is not percent-decoded.
//! - `/echo` (any method): the request as JSON `{"method", "path", "query",
//!   "version", "host", "headers": {name: [values]}, "body_len",
//!   "body_sha256", "body" (the body if UTF-8 and ≤ 64 KiB, else null),
//!   "tls", "alpn", "peer"}` with `Access-Control-Allow-Origin: *` (and
//!   allow-headers/methods `*`, so a CORS preflight passes).
//! - `/ws`: WebSocket echo of text and binary messages (HTTP/1.1 upgrade,
//!   on the plain and the TLS port; an HTTP/2 request gets 400).
//! - `/big?bytes=N` (default 1 MiB): N bytes of text/plain streamed in 16
//!   KiB chunks without Content-Length (chunked on HTTP/1.1). Every 1 KiB
//!   block starts `<block index, 8 digits> card 4111111111111111 ` and is
//!   padded with `.` up to a final `\n`.
//! - `/slow-close`: announces Content-Length 65536, sends 32768 bytes, then
//!   aborts: the connection is closed (HTTP/1.1) or the stream reset
//!   (HTTP/2) mid-body.
//!
//! `?encoding=gzip|deflate|br` on a file, `/echo` or `/big` compresses the
//! response on the fly (streaming for `/big`, flushed per chunk) and sets
//! Content-Encoding whatever the Accept-Encoding; `identity` sends it as is.
//!
//! stdout, one JSON object per line:
//! - `{"listening": ["ip:port", ...], "http": [...], "https": [...]}` once
//!   every listener is bound; `{"ok": false, "error": "..."}` and exit 1 if
//!   starting fails (exit 2 on bad usage).
//! - `{"request": {"id", "method", "path", "query", "version": "HTTP/1.1" |
//!   "HTTP/2.0", "host", "headers": {lower-name: [values]}, "tls", "alpn",
//!   "sni", "peer": "ip:port", "local": "ip:port"}}` when a request's headers
//!   have arrived.
//! - `{"done": {"id", "method", "path", "status", "body_bytes", "complete",
//!   "error"}}` when the response body is finished or abandoned
//!   (`complete: false` when it did not reach its end).
//! - `{"ws": {"id", "text": "..."}}` / `{"ws": {"id", "binary": len}}` per
//!   WebSocket message, plus `open`, `ping`, `close` (code from the peer),
//!   `close_sent` and `gone` lines; `id` is the upgrade request's id.
//! - `{"tls_error": "...", "peer"}` for a failed TLS handshake,
//!   `{"conn_error": "...", "peer"}` for an HTTP connection ending in error.
//!
//! The process exits when stdout is gone (its test has ended).

mod ws;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Map, Value, json};
use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RespBody = BoxBody<Bytes, BoxError>;

/// The card number in every 1 KiB block of `/big` (a Luhn-valid test Visa).
const BIG_CARD: &str = "4111111111111111";
const BIG_CHUNK: usize = 16 * 1024;
const SLOW_CLOSE_LEN: usize = 65536;
const ECHO_BODY_MAX: usize = 64 * 1024;

/// Print one JSON line and flush. If stdout is gone, so is the test that
/// started us: exit.
pub fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{v}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

fn fail(code: i32, error: String) -> ! {
    emit(&json!({"ok": false, "error": error}));
    std::process::exit(code)
}

#[derive(Default)]
struct Args {
    binds: Vec<IpAddr>,
    http_port: Option<u16>,
    https_port: Option<u16>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    alpn: Vec<String>,
    docroot: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--bind" => {
                let v = value()?;
                a.binds
                    .push(v.parse().map_err(|_| format!("--bind {v:?}: not an IP"))?);
            }
            "--http-port" | "--https-port" => {
                let v = value()?;
                let p: u16 = v.parse().map_err(|_| format!("{flag} {v:?}: not a port"))?;
                if flag == "--http-port" {
                    a.http_port = Some(p);
                } else {
                    a.https_port = Some(p);
                }
            }
            "--cert" => a.cert = Some(value()?.into()),
            "--key" => a.key = Some(value()?.into()),
            "--docroot" => a.docroot = Some(value()?.into()),
            "--alpn" => {
                for p in value()?.split(',').filter(|p| !p.is_empty()) {
                    if p != "h2" && p != "http/1.1" {
                        return Err(format!("--alpn {p:?}: only h2 and http/1.1"));
                    }
                    a.alpn.push(p.to_owned());
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.binds.is_empty() {
        return Err("at least one --bind IP".into());
    }
    if a.http_port.is_none() && a.https_port.is_none() {
        return Err("--http-port and/or --https-port".into());
    }
    if a.https_port.is_some() && (a.cert.is_none() || a.key.is_none()) {
        return Err("--https-port needs --cert and --key".into());
    }
    if a.alpn.is_empty() {
        a.alpn = vec!["h2".into(), "http/1.1".into()];
    }
    Ok(a)
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("gw-origin: {e} (see tests/src/bin/gw-origin/main.rs)");
        fail(2, e)
    });
    // One thread: the HTTP/2 `/slow-close` relies on the connection task
    // not running while a response body is being polled (see `SlowClose`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(1, format!("tokio runtime: {e}")));
    if let Err(e) = rt.block_on(run(args)) {
        fail(1, e);
    }
}

fn tls_config(a: &Args) -> Result<Arc<rustls::ServerConfig>, String> {
    let (cert, key) = (a.cert.as_ref().unwrap(), a.key.as_ref().unwrap());
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("--cert {}: no certificate", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    cfg.alpn_protocols = a.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(cfg))
}

struct State {
    next_id: AtomicU64,
    docroot: Option<PathBuf>,
}

/// What a request's connection is.
struct Conn {
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    alpn: Option<String>,
    sni: Option<String>,
}

async fn run(a: Args) -> Result<(), String> {
    let tls = match a.https_port {
        Some(_) => Some(TlsAcceptor::from(tls_config(&a)?)),
        None => None,
    };
    let docroot = match &a.docroot {
        Some(d) => {
            Some(std::fs::canonicalize(d).map_err(|e| format!("--docroot {}: {e}", d.display()))?)
        }
        None => None,
    };
    let state = Arc::new(State {
        next_id: AtomicU64::new(1),
        docroot,
    });
    let mut listeners = Vec::new();
    for ip in &a.binds {
        for (port, is_tls) in [(a.http_port, false), (a.https_port, true)] {
            let Some(port) = port else { continue };
            let addr = SocketAddr::new(*ip, port);
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("bind {addr}: {e}"))?;
            listeners.push((l, is_tls));
        }
    }
    let mut all = Vec::new();
    let (mut http, mut https) = (Vec::new(), Vec::new());
    for (l, is_tls) in &listeners {
        let addr = l.local_addr().map_err(|e| e.to_string())?.to_string();
        all.push(addr.clone());
        if *is_tls { &mut https } else { &mut http }.push(addr);
    }
    let mut tasks = Vec::new();
    for (l, is_tls) in listeners {
        let tls = if is_tls { tls.clone() } else { None };
        tasks.push(tokio::spawn(accept_loop(l, tls, state.clone())));
    }
    emit(&json!({"listening": all, "http": http, "https": https}));
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn accept_loop(l: TcpListener, tls: Option<TlsAcceptor>, state: Arc<State>) {
    loop {
        match l.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(connection(stream, peer, tls.clone(), state.clone()));
            }
            Err(e) => {
                emit(&json!({"accept_error": e.to_string()}));
                // Back off on EMFILE and friends rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
) {
    let local = stream.local_addr().unwrap_or(peer);
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = tls else {
        let conn = Arc::new(Conn {
            peer,
            local,
            tls: false,
            alpn: None,
            sni: None,
        });
        return serve_h1(TokioIo::new(stream), conn, state).await;
    };
    let stream = match acceptor.accept(stream).await {
        Ok(s) => s,
        Err(e) => {
            emit(&json!({"tls_error": e.to_string(), "peer": peer.to_string()}));
            return;
        }
    };
    let (_, session) = stream.get_ref();
    let alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let conn = Arc::new(Conn {
        peer,
        local,
        tls: true,
        sni: session.server_name().map(str::to_owned),
        alpn,
    });
    if conn.alpn.as_deref() == Some("h2") {
        let svc = service(conn.clone(), state);
        // A per-stream send buffer of one byte: hyper hands a body chunk to
        // h2 only once the previous one has gone to the connection's write
        // buffer. `SlowClose` needs that; other bodies just stream in
        // lock-step with the socket.
        let r = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_send_buf_size(1)
            .serve_connection(TokioIo::new(stream), svc)
            .await;
        if let Err(e) = r {
            emit(&json!({"conn_error": e.to_string(), "peer": peer.to_string()}));
        }
    } else {
        serve_h1(TokioIo::new(stream), conn, state).await;
    }
}

async fn serve_h1<S>(io: TokioIo<S>, conn: Arc<Conn>, state: Arc<State>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let svc = service(conn, state);
    let r = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .with_upgrades()
        .await;
    if let Err(e) = r {
        emit(&json!({"conn_error": e.to_string(), "peer": peer.to_string()}));
    }
}

fn service(
    conn: Arc<Conn>,
    state: Arc<State>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<RespBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<RespBody>, Infallible>> + Send,
> + Clone {
    service_fn(move |req| handle(req, conn.clone(), state.clone()))
}

fn headers_json(h: &HeaderMap) -> Value {
    let mut m = Map::new();
    for name in h.keys() {
        let values: Vec<Value> = h
            .get_all(name)
            .iter()
            .map(|v| Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        m.insert(name.as_str().to_owned(), Value::Array(values));
    }
    Value::Object(m)
}

fn host_of<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn handle(
    req: Request<Incoming>,
    conn: Arc<Conn>,
    state: Arc<State>,
) -> Result<Response<RespBody>, Infallible> {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    emit(&json!({"request": {
        "id": id,
        "method": method,
        "path": path,
        "query": req.uri().query(),
        "version": format!("{:?}", req.version()),
        "host": host_of(&req),
        "headers": headers_json(req.headers()),
        "tls": conn.tls,
        "alpn": conn.alpn,
        "sni": conn.sni,
        "peer": conn.peer.to_string(),
        "local": conn.local.to_string(),
    }}));
    let mut resp = route(req, &conn, &state, id).await;
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let (parts, body) = resp.into_parts();
    let logged = Logged {
        inner: body,
        id,
        method,
        path,
        status: parts.status.as_u16(),
        bytes: 0,
        ended: false,
        error: None,
    };
    Ok(Response::from_parts(parts, logged.boxed()))
}

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn plain(status: StatusCode, text: &str) -> Response<RespBody> {
    let mut r = Response::new(full(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn route(req: Request<Incoming>, conn: &Conn, state: &State, id: u64) -> Response<RespBody> {
    let encoding = query_param(req.uri().query(), "encoding").map(str::to_owned);
    let encoding = match encoding.as_deref() {
        None | Some("identity") | Some("") => None,
        Some(e) => match Encoder::new(e) {
            Some(_) => Some(e.to_owned()),
            None => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "encoding must be gzip, deflate, br or identity",
                );
            }
        },
    };
    match req.uri().path() {
        "/echo" => encode_full(echo(req, conn).await, encoding.as_deref()),
        "/ws" => websocket(req, id),
        "/big" => big(&req, encoding.as_deref()),
        "/slow-close" => slow_close(req.version() == hyper::Version::HTTP_2),
        _ => encode_full(file(&req, state).await, encoding.as_deref()),
    }
}

/// Compress a whole (already built) response body for `?encoding=`.
fn encode_full(resp: Response<Bytes>, encoding: Option<&str>) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    let body = match encoding.and_then(Encoder::new) {
        Some(mut enc) if parts.status.is_success() => {
            let mut out = enc.push(&body);
            out.extend(enc.finish());
            parts.headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_str(encoding.unwrap()).unwrap(),
            );
            parts.headers.remove(header::CONTENT_LENGTH);
            Bytes::from(out)
        }
        _ => body,
    };
    Response::from_parts(parts, full(body))
}

fn bytes_response(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Bytes> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

async fn echo(req: Request<Incoming>, conn: &Conn) -> Response<Bytes> {
    let (parts, body) = req.into_parts();
    let (body, body_error) = match body.collect().await {
        Ok(c) => (c.to_bytes(), None),
        Err(e) => (Bytes::new(), Some(e.to_string())),
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, &body);
    let sha: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let text = (body.len() <= ECHO_BODY_MAX)
        .then(|| std::str::from_utf8(&body).ok())
        .flatten();
    let host = parts
        .headers
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    let v = json!({
        "method": parts.method.to_string(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "host": host,
        "headers": headers_json(&parts.headers),
        "body_len": body.len(),
        "body_sha256": sha,
        "body": text,
        "body_error": body_error,
        "tls": conn.tls,
        "alpn": conn.alpn,
        "peer": conn.peer.to_string(),
    });
    let mut r = bytes_response(StatusCode::OK, "application/json", format!("{v}\n"));
    let h = r.headers_mut();
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, "*"),
        (header::ACCESS_CONTROL_ALLOW_METHODS, "*"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}

fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext.to_ascii_lowercase().as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "gz" => "application/gzip",
        _ => "application/octet-stream",
    }
}

/// Whether Accept-Encoding allows `coding` (a listed token or `*` with a
/// non-zero q).
fn accepts(headers: &HeaderMap, coding: &str) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let q_zero = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case(coding) || name == "*") && !q_zero
        })
}

async fn file<B>(req: &Request<B>, state: &State) -> Response<Bytes> {
    let not_found = || bytes_response(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    let path = match req.uri().path() {
        "/" => "/index.html",
        p => p,
    };
    let rel = path.trim_start_matches('/');
    if rel.is_empty()
        || rel
            .split('/')
            .any(|seg| seg.is_empty() || seg.starts_with('.'))
    {
        return not_found();
    }
    let Some(root) = &state.docroot else {
        return not_found();
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = bytes_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET or HEAD\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let target = root.join(rel);
    if !is_file(&target).await {
        return not_found();
    }
    let mut served = target.clone();
    let mut coding = None;
    let mut has_variant = false;
    let explicit = query_param(req.uri().query(), "encoding").is_some();
    for (suffix, name) in [("br", "br"), ("gz", "gzip")] {
        let variant = PathBuf::from(format!("{}.{suffix}", target.display()));
        if is_file(&variant).await {
            has_variant = true;
            if coding.is_none() && !explicit && accepts(req.headers(), name) {
                served = variant;
                coding = Some(name);
            }
        }
    }
    let body = match tokio::fs::read(&served).await {
        Ok(b) => b,
        Err(_) => return not_found(),
    };
    let mut r = bytes_response(StatusCode::OK, content_type(rel), body);
    if let Some(c) = coding {
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static(c));
    }
    if has_variant {
        r.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    r
}

async fn is_file(p: &Path) -> bool {
    tokio::fs::metadata(p).await.is_ok_and(|m| m.is_file())
}

fn websocket(mut req: Request<Incoming>, id: u64) -> Response<RespBody> {
    let h = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if req.method() != Method::GET
        || !has_token(header::UPGRADE, "websocket")
        || !has_token(header::CONNECTION, "upgrade")
    {
        return plain(
            StatusCode::BAD_REQUEST,
            "/ws needs an HTTP/1.1 GET with Upgrade: websocket",
        );
    }
    let Some(key) = h
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| k.to_str().ok())
    else {
        return plain(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key");
    };
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut r = plain(StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 only");
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let accept = ws::accept_key(key);
    // Echo the first offered subprotocol: browsers fail a handshake whose
    // offer went unanswered.
    let protocol = h
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_owned());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => ws::echo(TokioIo::new(upgraded), id).await,
            Err(e) => emit(&json!({"ws": {"id": id, "upgrade_error": e.to_string()}})),
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).unwrap(),
    );
    if let Some(p) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    r
}

fn big<B>(req: &Request<B>, encoding: Option<&str>) -> Response<RespBody> {
    let bytes = match query_param(req.uri().query(), "bytes") {
        None => 1 << 20,
        Some(n) => match n.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "bytes=N"),
        },
    };
    let body = BigBody {
        total: bytes,
        sent: 0,
        encoder: encoding.and_then(Encoder::new),
        finished: false,
    };
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(e) = encoding {
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_str(e).unwrap());
    }
    r
}

/// The 1 KiB block number `i` of `/big`.
fn big_block(i: u64) -> [u8; 1024] {
    let mut b = [b'.'; 1024];
    let head = format!("{i:08} card {BIG_CARD} ");
    b[..head.len()].copy_from_slice(head.as_bytes());
    b[1023] = b'\n';
    b
}

struct BigBody {
    total: u64,
    sent: u64,
    encoder: Option<Encoder>,
    finished: bool,
}

impl Body for BigBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.sent >= this.total {
                if this.finished {
                    return Poll::Ready(None);
                }
                this.finished = true;
                match this.encoder.take().map(Encoder::finish) {
                    Some(tail) if !tail.is_empty() => {
                        return Poll::Ready(Some(Ok(Frame::data(tail.into()))));
                    }
                    _ => return Poll::Ready(None),
                }
            }
            let len = (this.total - this.sent).min(BIG_CHUNK as u64) as usize;
            let mut chunk = Vec::with_capacity(BIG_CHUNK);
            let mut i = this.sent / 1024;
            while chunk.len() < len {
                chunk.extend_from_slice(&big_block(i));
                i += 1;
            }
            chunk.truncate(len);
            this.sent += len as u64;
            let out = match &mut this.encoder {
                Some(enc) => enc.push(&chunk),
                None => chunk,
            };
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out.into()))));
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        // Deliberately inexact, so HTTP/1.1 sends it chunked.
        SizeHint::default()
    }
}

fn slow_close(h2: bool) -> Response<RespBody> {
    let mut r = Response::new(
        SlowClose {
            state: 0,
            h2,
            half: Bytes::from(big_block(0).repeat(SLOW_CLOSE_LEN / 2 / 1024)),
        }
        .boxed(),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Half the announced body, then an error that makes hyper drop the
/// connection (HTTP/1.1) or reset the stream (HTTP/2), after the half has
/// been committed to the connection:
/// - HTTP/1.1: answering Pending (waking itself) twice lets hyper flush the
///   half to the socket before polling again.
/// - HTTP/2: a reset discards the stream's data still queued in h2. With a
///   one-byte send buffer (see `connection`), hyper asks for the next chunk
///   only after h2 moved the previous one to the connection's write buffer,
///   so one more byte is offered; once the body is polled again the half
///   has left the queue, and the error resets the stream. The extra byte is
///   still queued at that moment (the runtime has one thread, so the
///   connection task cannot run in between) and is discarded with it.
struct SlowClose {
    state: u8,
    h2: bool,
    half: Bytes,
}

impl Body for SlowClose {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state += 1;
        match (self.state, self.h2) {
            (1, _) => Poll::Ready(Some(Ok(Frame::data(self.half.clone())))),
            (2, true) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"."))))),
            (2 | 3, false) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            _ => Poll::Ready(Some(Err("slow-close: aborting mid-body".into()))),
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(SLOW_CLOSE_LEN as u64)
    }
}

/// A response body that logs `{"done": ...}` when hyper drops it: after
/// its end was sent, or when the exchange was abandoned.
struct Logged {
    inner: RespBody,
    id: u64,
    method: String,
    path: String,
    status: u16,
    bytes: u64,
    ended: bool,
    error: Option<String>,
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => this.error = Some(e.to_string()),
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let complete = self.error.is_none() && (self.ended || self.inner.is_end_stream());
        emit(&json!({"done": {
            "id": self.id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "body_bytes": self.bytes,
            "complete": complete,
            "error": self.error,
        }}));
    }
}

/// On-the-fly compression for `?encoding=`. `push` returns what the
/// encoder produced for the data after a flush, so a stream of pushes is a
/// stream of decodable prefixes.
enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    /// HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2).
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    fn new(name: &str) -> Option<Encoder> {
        let level = flate2::Compression::default();
        Some(match name {
            "gzip" => Encoder::Gzip(flate2::write::GzEncoder::new(Vec::new(), level)),
            "deflate" => Encoder::Deflate(flate2::write::ZlibEncoder::new(Vec::new(), level)),
            "br" => Encoder::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
            _ => return None,
        })
    }

    fn push(&mut self, data: &[u8]) -> Vec<u8> {
        fn step<W: Write>(w: &mut W, data: &[u8]) {
            // Writes into a Vec cannot fail.
            let _ = w.write_all(data).and_then(|()| w.flush());
        }
        match self {
            Encoder::Gzip(e) => {
                step(e, data);
                std::mem::take(e.get_mut())
            }
            Encoder::Deflate(e) => {
                step(e, data);
                std::mem::take(e.get_mut())
            }
            Encoder::Br(e) => {
                step(e.as_mut(), data);
                std::mem::take(e.get_mut())
            }
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.finish().unwrap_or_default(),
            Encoder::Deflate(e) => e.finish().unwrap_or_default(),
            Encoder::Br(e) => e.into_inner(),
        }
    }
}
