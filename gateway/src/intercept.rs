//! Looking inside HTTP and TLS, for connections the policy needs to see
//! into (a rule for this identity and destination has methods, paths,
//! headers, mask or inject).
//!
//! The client side is served by hyper (HTTP/1.1 and h2, chosen by ALPN or
//! the h2 preface), behind a TLS server that presents a leaf minted on the
//! fly by the gateway's CA for the client's SNI. Every request is decided
//! on its own (`Policy::decide_request`): blocked requests get a 403 naming
//! the rule and a request id and never reach the origin; allowed ones are
//! sent on through a client pool private to this client connection, always
//! to the connection's original destination, over TLS verified against the
//! system roots plus the configured CAs (a certificate error fails the
//! request with a 502 naming it, never falls back). Credentials are injected
//! (a same-named client header is dropped), response bodies are masked as
//! they stream, and WebSocket upgrades are passed through. One audit record
//! per exchange.

mod body;
mod io;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version,
    header::{self, HeaderName},
};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use self::{
    body::{BoxBody, Counted, ResponseBody},
    io::{BoxError, Connector, Prefixed},
};
use crate::{
    approvals,
    audit::{HttpRecord, Outcome},
    config::{self, Action},
    daemon::State,
    mask::{BodyKind, EncodedMasker},
    policy::{Destination, Request as PolicyRequest, RequestDecision},
    relay::Counters,
    tls::ca::{self, Ca, Minter},
};

/// The daemon-wide parts of interception.
pub struct Interception {
    minter: Arc<Minter>,
    /// Presents minted leaves named by the client's SNI.
    server: Arc<ServerConfig>,
    /// Upstream TLS offering h2 and http/1.1 (requests), and http/1.1 only
    /// (WebSocket upgrades).
    upstream: Arc<ClientConfig>,
    upstream_h1: Arc<ClientConfig>,
    pub sniff_timeout: Duration,
    pub max_decoded_bytes: u64,
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interception")
            .field("ca", self.minter.ca())
            .field("sniff_timeout", &self.sniff_timeout)
            .finish_non_exhaustive()
    }
}

impl Interception {
    /// Loads the CA from `<state_dir>/ca` (creating it on first start) and
    /// builds the upstream trust store.
    pub fn new(cfg: &config::Interception, state_dir: &Path) -> anyhow::Result<Interception> {
        let dir = ca::dir(state_dir);
        let ca = if dir.join(ca::CERT_FILE).exists() || dir.join(ca::KEY_FILE).exists() {
            Ca::load(&dir)?
        } else {
            let ca = Ca::init(&dir, false)?;
            tracing::info!(
                event = "ca_created",
                dir = %dir.display(),
                "created the interception CA; give it to browsers with `gateway ca trust --nssdb DIR`"
            );
            ca
        };
        let minter = Arc::new(Minter::new(ca));
        let server = minter
            .server_config(None)
            .context("building the interception TLS server")?;

        let mut roots = RootCertStore::empty();
        if cfg.system_roots {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading a system root certificate failed");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system roots for upstream TLS");
        }
        for der in &cfg.upstream_cas {
            roots.add(der.clone()).context(
                "adding a certificate of [interception] upstream_ca_files to the upstream trust store",
            )?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let base = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .context("building the upstream TLS client")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut upstream = base.clone();
        upstream.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut upstream_h1 = base;
        upstream_h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Interception {
            minter,
            server,
            upstream: Arc::new(upstream),
            upstream_h1: Arc::new(upstream_h1),
            sniff_timeout: cfg.sniff_timeout,
            max_decoded_bytes: cfg.max_decoded_bytes,
        })
    }
}

/// What the connection-level pipeline knows when it hands over.
#[derive(Debug, Clone)]
pub struct Conn {
    pub session: u64,
    pub dst: SocketAddr,
    pub cgroup: String,
    pub pid: u32,
    pub exe: String,
    /// The host the connection was decided for (SNI, Host, or DNS name).
    pub host: String,
}

/// How the client speaks.
#[derive(Debug, Clone)]
pub enum Kind {
    Tls { sni: Option<String> },
    Http,
}

struct Ctx {
    state: Arc<State>,
    conn: Conn,
    /// `Some` for TLS: requests must be for this name.
    sni: Option<String>,
    tls: bool,
    client: Client<Connector, BoxBody>,
    ws: Connector,
    next: AtomicU64,
}

/// Serves one intercepted client connection until it closes. Returns how
/// it ended, for the connection's audit record.
pub async fn serve(
    client: TcpStream,
    prefix: Vec<u8>,
    kind: Kind,
    conn: Conn,
    state: Arc<State>,
    counters: Arc<Counters>,
) -> (Outcome, String) {
    let icpt = &state.interception;
    state.sessions.open(conn.session);
    let stream = Prefixed::new(prefix, client, counters);
    let (tls, sni) = match &kind {
        Kind::Tls { sni } => (true, sni.clone()),
        Kind::Http => (false, None),
    };
    let connector = Connector {
        dst: conn.dst,
        tls: tls.then(|| icpt.upstream.clone()),
        mark: state.mark,
        timeout: state.connect_timeout,
    };
    let ws = Connector {
        tls: tls.then(|| icpt.upstream_h1.clone()),
        ..connector.clone()
    };
    let pool = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(state.idle_timeout)
        .build(connector);
    let ctx = Arc::new(Ctx {
        state: state.clone(),
        conn,
        sni: sni.clone(),
        tls,
        client: pool,
        ws,
        next: AtomicU64::new(0),
    });

    let result = if tls {
        let server = match &sni {
            Some(_) => icpt.server.clone(),
            // No SNI: the client asked for an address; the leaf names it.
            None => match icpt
                .minter
                .server_config(Some(ctx.conn.dst.ip().to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    return (
                        Outcome::Refused,
                        format!("cannot mint a certificate for {}: {e:#}", ctx.conn.dst.ip()),
                    );
                }
            },
        };
        let accept = tokio_rustls::TlsAcceptor::from(server).accept(stream);
        let tls_stream = match tokio::time::timeout(state.idle_timeout, accept).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return (
                    Outcome::Closed,
                    format!(
                        "TLS handshake with the client failed (does it trust the gateway CA? `gateway ca trust`): {e}"
                    ),
                );
            }
            Err(_) => {
                return (
                    Outcome::IdleTimeout,
                    "TLS handshake with the client timed out".into(),
                );
            }
        };
        serve_http(TokioIo::new(tls_stream), ctx.clone()).await
    } else {
        serve_http(TokioIo::new(stream), ctx.clone()).await
    };
    let n = ctx.next.load(Ordering::Relaxed);
    match result {
        Ok(()) => (
            Outcome::Closed,
            format!(
                "intercepted {}: {n} request(s)",
                if tls { "TLS" } else { "HTTP" }
            ),
        ),
        Err(e) => (
            Outcome::Closed,
            format!(
                "intercepted {}: {n} request(s); the connection ended with: {e}",
                if tls { "TLS" } else { "HTTP" }
            ),
        ),
    }
}

async fn serve_http<I>(io: TokioIo<I>, ctx: Arc<Ctx>) -> Result<(), BoxError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Some(ctx.state.idle_timeout));
    builder.http2().timer(TokioTimer::new());
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(recorded(ctx, req).await) }
    });
    builder.serve_connection_with_upgrades(io, svc).await
}

/// [`handle`], with the exchange captured for the session recording
/// (`crate::sessions`): the request as received, the response as sent.
async fn recorded(ctx: Arc<Ctx>, mut req: Request<Incoming>) -> Response<ResponseBody> {
    let cap = ctx
        .state
        .sessions
        .capture(ctx.conn.session, &req, ctx.tls, &ctx.conn.host);
    req.extensions_mut().insert(cap.clone());
    let resp = handle(ctx, req).await;
    cap.response(resp.status(), resp.headers());
    resp.map(|b| b.with_capture(cap))
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// The authority the client addressed: `:authority` (h2, absolute-form) or
/// the Host header.
fn authority_of(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .filter(|a| !a.is_empty())
}

/// `Host[:port]` → lower-case host, IPv6 brackets kept off.
fn host_of(authority: &str) -> String {
    let a = authority.rsplit('@').next().unwrap_or(authority);
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        a.rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map_or(a, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

async fn handle(ctx: Arc<Ctx>, mut req: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let n = ctx.next.fetch_add(1, Ordering::Relaxed) + 1;
    let up = Arc::new(AtomicU64::new(0));
    let conn = &ctx.conn;
    let authority = authority_of(&req);
    let host = authority
        .as_deref()
        .map(host_of)
        .unwrap_or_else(|| conn.host.clone());
    let mut rec = HttpRecord {
        session: conn.session,
        request_id: format!("{}-{n}", conn.session),
        cgroup: conn.cgroup.clone(),
        pid: conn.pid,
        exe: conn.exe.clone(),
        orig_dst: Some(conn.dst),
        host: host.clone(),
        tls: ctx.tls,
        version: version_str(req.version()),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        decision: "block",
        ..HttpRecord::default()
    };

    if let Some(sni) = &ctx.sni
        && *sni != host
    {
        rec.rule = "gateway".into();
        rec.reason = format!(
            "request for host {host} on a TLS connection opened for {sni}; open a connection for {host}"
        );
        return gateway_response(StatusCode::MISDIRECTED_REQUEST, rec, up, started, "blocked");
    }

    let identity = match ctx.state.identities.resolve(&conn.cgroup) {
        Ok(i) => i,
        Err(reason) => {
            rec.rule = "identity".into();
            rec.reason = reason;
            return gateway_response(StatusCode::FORBIDDEN, rec, up, started, "blocked");
        }
    };
    rec.identity.clone_from(&identity.name);
    rec.subject.clone_from(&identity.subject);
    rec.duties.clone_from(&identity.duties);

    let policy = ctx.state.policy();
    let rd = policy.decide_request(
        &identity.policy_subject(),
        &Destination {
            ip: conn.dst.ip(),
            port: conn.dst.port(),
            host: &host,
        },
        &PolicyRequest {
            method: req.method().as_str(),
            path: req.uri().path(),
            headers: req.headers(),
        },
    );
    rec.rule.clone_from(&rd.decision.rule);
    rec.reason.clone_from(&rd.decision.reason);
    match rd.decision.action {
        Action::Allow => rec.decision = "allow",
        Action::Block => {
            return gateway_response(StatusCode::FORBIDDEN, rec, up, started, "blocked");
        }
        Action::Approve if is_websocket(&req) => {
            rec.decision = "approve";
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            if let Err(status) = hold(&ctx, &method, &path, None, &identity, &host, &mut rec).await
            {
                return gateway_response(status, rec, up, started, "blocked");
            }
        }
        Action::Approve => {
            rec.decision = "approve";
            let (parts, incoming) = req.into_parts();
            let bytes = match read_held_body(incoming, &up).await {
                Ok(b) => b,
                Err((status, outcome, why)) => {
                    rec.reason = format!("{}; {why}", rec.reason);
                    return gateway_response(status, rec, up, started, outcome);
                }
            };
            crate::sessions::Capture::of(&parts.extensions).request_body(&bytes);
            let path = parts.uri.path().to_string();
            if let Err(status) = hold(
                &ctx,
                &parts.method,
                &path,
                Some(&bytes),
                &identity,
                &host,
                &mut rec,
            )
            .await
            {
                return gateway_response(status, rec, up, started, "blocked");
            }
            let req = Request::from_parts(parts, body::full(bytes));
            return forward(&ctx, req, authority, &rd, rec, &host, up, started).await;
        }
    }

    if is_websocket(&req) {
        let client_upgrade = hyper::upgrade::on(&mut req);
        return websocket(&ctx, req, client_upgrade, &rd, rec, &host, up, started).await;
    }
    let cap = crate::sessions::Capture::of(req.extensions());
    let req = req.map(|b| cap.tee(Counted::new(b, up.clone())).boxed_unsync());
    forward(&ctx, req, authority, &rd, rec, &host, up, started).await
}

/// Request bodies held for approval are kept in memory up to this size.
const HOLD_BODY_MAX: usize = 8 * 1024 * 1024;

/// The body of a request held for approval, read whole (bounded), so that
/// what is forwarded is exactly what the approver saw summarised.
async fn read_held_body(
    incoming: Incoming,
    up: &Arc<AtomicU64>,
) -> Result<bytes::Bytes, (StatusCode, &'static str, String)> {
    let limited = http_body_util::Limited::new(Counted::new(incoming, up.clone()), HOLD_BODY_MAX);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                "blocked",
                format!(
                    "the request body is larger than {HOLD_BODY_MAX} bytes, the most a request held for approval may carry"
                ),
            ))
        }
        Err(e) => Err((
            StatusCode::BAD_REQUEST,
            "failed",
            format!("reading the request body failed: {e}"),
        )),
    }
}

/// Holds a request until an approver decides: `Ok` when approved (now or
/// by a window), else the status to refuse with; either way `rec` gets the
/// approval id, the approver and the outcome in its reason. The client
/// going away drops this future, which cancels the approval.
#[allow(clippy::too_many_arguments)]
async fn hold(
    ctx: &Ctx,
    method: &Method,
    path: &str,
    body: Option<&bytes::Bytes>,
    identity: &crate::identity::Identity,
    host: &str,
    rec: &mut HttpRecord,
) -> Result<(), StatusCode> {
    let approvals = &ctx.state.approvals;
    let mut summary = approvals::Summary {
        kind: "http".into(),
        destination: ctx.conn.dst.to_string(),
        host: host.to_string(),
        method: method.to_string(),
        path: path.to_string(),
        body_bytes: None,
        body_sha256: None,
        preview: None,
        preview_truncated: false,
    };
    if let Some(b) = body {
        approvals.summarize_body(b, &mut summary);
    }
    let ask = approvals::Ask {
        rule: rec.rule.clone(),
        reason: rec.reason.clone(),
        approvers: ctx.state.policy().approvers_of(&rec.rule),
        requester: approvals::requester(identity, &ctx.conn.cgroup, ctx.conn.pid, &ctx.conn.exe),
        request: summary,
    };
    let outcome = match approvals.ask(ask) {
        Err(o) => o,
        Ok(ticket) => {
            rec.approval_id = ticket.id().to_string();
            ticket.wait().await
        }
    };
    let what = outcome.settle(&mut rec.approval_id, &mut rec.approver, approvals.timeout());
    rec.reason = format!("{}; {what}", rec.reason);
    if outcome.approved() {
        Ok(())
    } else {
        Err(StatusCode::FORBIDDEN)
    }
}

/// A response the gateway writes itself: a short text naming the rule and
/// the request id.
fn gateway_response(
    status: StatusCode,
    rec: HttpRecord,
    up: Arc<AtomicU64>,
    started: Instant,
    outcome: &'static str,
) -> Response<ResponseBody> {
    let text = match status {
        StatusCode::FORBIDDEN if !rec.approval_id.is_empty() => format!(
            "Held for approval by the gateway: rule {}; {}.\nApproval id: {}\nRequest id: {}\n",
            rec.rule, rec.reason, rec.approval_id, rec.request_id
        ),
        StatusCode::FORBIDDEN => format!(
            "Blocked by the gateway: rule {} ({}).\nRequest id: {}\n",
            rec.rule, rec.reason, rec.request_id
        ),
        _ => format!(
            "The gateway could not complete this request: {}.\nRequest id: {}\n",
            rec.reason, rec.request_id
        ),
    };
    let id = HeaderValue::from_str(&rec.request_id).unwrap_or(HeaderValue::from_static("-"));
    let approval = rec.approval_id.clone();
    let mut rec = rec;
    rec.status = status.as_u16();
    let mut resp = Response::new(ResponseBody::gateway(text, rec, up, started, outcome));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(HeaderName::from_static("x-gateway-request-id"), id);
    if let Ok(v) = HeaderValue::from_str(&approval) {
        h.insert(HeaderName::from_static("x-gateway-approval-id"), v);
    }
    resp
}

/// Connection-specific headers never cross the gateway (RFC 9110 §7.6.1),
/// except the pair that asks for a WebSocket upgrade when `keep_upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && *n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "transfer-encoding",
        "trailer",
    ] {
        h.remove(n);
    }
    if h.get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("trailers"))
    {
        h.remove(header::TE);
    }
    if !keep_upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

fn is_websocket(req: &Request<Incoming>) -> bool {
    req.version() <= Version::HTTP_11
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Injected credentials replace whatever the client sent under that name.
fn inject(h: &mut HeaderMap, rd: &RequestDecision, rec: &mut HttpRecord) {
    for inj in &rd.inject {
        h.remove(&inj.header);
        h.insert(inj.header.clone(), inj.value.header_value().clone());
        rec.injected.push(format!("{}<-{}", inj.header, inj.secret));
    }
}

/// A masked response must come in an encoding the masker can read.
fn restrict_accept_encoding(h: &mut HeaderMap) {
    let Some(v) = h.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let kept: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|t| {
            let name = t.split(';').next().unwrap_or("").trim();
            ["gzip", "deflate", "br", "identity"]
                .iter()
                .any(|k| name.eq_ignore_ascii_case(k))
        })
        .collect();
    match HeaderValue::from_str(&kept.join(", ")) {
        Ok(v) if !kept.is_empty() => {
            h.insert(header::ACCEPT_ENCODING, v);
        }
        _ => {
            h.remove(header::ACCEPT_ENCODING);
        }
    }
}

/// The reason chain of a client error, outermost last (hyper's own wording
/// is generic; the cause says what happened).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    // The innermost error is the most specific (e.g. the certificate).
    parts.dedup();
    parts.reverse();
    parts.join(" <- ")
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    ctx: &Ctx,
    req: Request<BoxBody>,
    authority: Option<String>,
    rd: &RequestDecision,
    mut rec: HttpRecord,
    host: &str,
    up: Arc<AtomicU64>,
    started: Instant,
) -> Response<ResponseBody> {
    let method = req.method().clone();
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    inject(&mut parts.headers, rd, &mut rec);
    crate::sessions::Capture::of(&parts.extensions).injected(&rd.inject);
    if rd.mask.is_some() {
        restrict_accept_encoding(&mut parts.headers);
    }
    let scheme = if ctx.tls { "https" } else { "http" };
    let authority = authority.unwrap_or_else(|| match ctx.conn.dst.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", ctx.conn.dst.port()),
        ip => format!("{ip}:{}", ctx.conn.dst.port()),
    });
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = match format!("{scheme}://{authority}{pq}").parse() {
        Ok(u) => u,
        Err(e) => {
            rec.decision = "block";
            rec.rule = "gateway".into();
            rec.reason = format!("the request target {authority}{pq} is not a valid URI: {e}");
            return gateway_response(StatusCode::BAD_REQUEST, rec, up, started, "blocked");
        }
    };
    parts.version = Version::HTTP_11;
    // The authority travels in the URI: the pool writes it as Host for an
    // HTTP/1.1 upstream and as :authority for h2, where a Host header as
    // well is refused by servers such as nginx.
    parts.headers.remove(header::HOST);
    let resp = match ctx.client.request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            rec.reason = format!(
                "{}; upstream {} ({host}) failed: {}",
                rec.reason,
                ctx.conn.dst,
                error_chain(&e)
            );
            return gateway_response(StatusCode::BAD_GATEWAY, rec, up, started, "upstream_error");
        }
    };
    let (mut parts, body) = resp.into_parts();
    rec.status = parts.status.as_u16();
    strip_hop_by_hop(&mut parts.headers, false);

    let may_have_body = method != Method::HEAD
        && !parts.status.is_informational()
        && parts.status != StatusCode::NO_CONTENT
        && parts.status != StatusCode::NOT_MODIFIED;
    let masker = match &rd.mask {
        Some(spec) if may_have_body => {
            let ct = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            if BodyKind::from_content_type(ct) == BodyKind::Opaque {
                rec.reason = format!(
                    "{}; body not masked: content-type {} is not text",
                    rec.reason,
                    ct.unwrap_or("")
                );
                None
            } else {
                let ce: Vec<&str> = parts
                    .headers
                    .get_all(header::CONTENT_ENCODING)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                let ce = (!ce.is_empty()).then(|| ce.join(", "));
                match EncodedMasker::new(
                    spec.clone(),
                    ct,
                    ce.as_deref(),
                    ctx.state.interception.max_decoded_bytes,
                ) {
                    Ok(m) => {
                        parts.headers.remove(header::CONTENT_LENGTH);
                        if m.decodes() {
                            parts.headers.remove(header::CONTENT_ENCODING);
                        }
                        Some(m)
                    }
                    Err(e) => {
                        rec.reason = format!(
                            "{}; the response cannot be masked, so it is not passed on: {e}",
                            rec.reason
                        );
                        return gateway_response(
                            StatusCode::BAD_GATEWAY,
                            rec,
                            up,
                            started,
                            "upstream_error",
                        );
                    }
                }
            }
        }
        _ => None,
    };
    let body = body.map_err(BoxError::from).boxed_unsync();
    Response::from_parts(parts, ResponseBody::new(body, masker, rec, up, started))
}

/// Passes a WebSocket upgrade through on its own upstream HTTP/1.1
/// connection, then relays the frames both ways; one audit record when the
/// session ends.
#[allow(clippy::too_many_arguments)]
async fn websocket(
    ctx: &Ctx,
    req: Request<Incoming>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    rd: &RequestDecision,
    mut rec: HttpRecord,
    host: &str,
    up: Arc<AtomicU64>,
    started: Instant,
) -> Response<ResponseBody> {
    rec.websocket = true;
    let (mut parts, _) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    inject(&mut parts.headers, rd, &mut rec);
    crate::sessions::Capture::of(&parts.extensions).injected(&rd.inject);
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = match pq.parse() {
        Ok(u) => u,
        Err(_) => "/".parse().unwrap_or_default(),
    };
    let fail = |mut rec: HttpRecord, why: String| {
        rec.reason = format!("{}; {why}", rec.reason);
        gateway_response(
            StatusCode::BAD_GATEWAY,
            rec,
            up.clone(),
            started,
            "upstream_error",
        )
    };
    let conn = match ctx.ws.connect(host).await {
        Ok(c) => c,
        Err(e) => return fail(rec, format!("upstream {} failed: {e}", ctx.conn.dst)),
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake::<_, BoxBody>(conn).await {
            Ok(x) => x,
            Err(e) => return fail(rec, format!("upstream {} failed: {e}", ctx.conn.dst)),
        };
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let body = Empty::new().map_err(|never| match never {}).boxed_unsync();
    let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            return fail(
                rec,
                format!("upstream {} failed: {}", ctx.conn.dst, error_chain(&e)),
            );
        }
    };
    rec.status = resp.status().as_u16();
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The origin declined the upgrade: an ordinary response.
        rec.websocket = false;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let body = body.map_err(BoxError::from).boxed_unsync();
        return Response::from_parts(parts, ResponseBody::new(body, None, rec, up, started));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let (parts, _) = resp.into_parts();
    tokio::spawn(async move {
        let (c, u) = tokio::join!(client_upgrade, upstream_upgrade);
        let outcome = match (c, u) {
            (Ok(c), Ok(u)) => {
                // Counted as they pass: a session that ends in an error
                // still reports what it moved.
                let counters = Arc::new(Counters::default());
                let mut c = Prefixed::new(Vec::new(), TokioIo::new(c), counters.clone());
                let mut u = TokioIo::new(u);
                let end = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                rec.bytes_up = counters.up.load(Ordering::Relaxed);
                rec.bytes_down = counters.down.load(Ordering::Relaxed);
                match end {
                    Ok(_) => {}
                    // Peers that drop TCP without a TLS close_notify are
                    // common at the end of a WebSocket session.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                    Err(e) => {
                        rec.reason = format!("{}; the session ended with: {e}", rec.reason);
                    }
                }
                "closed"
            }
            (Err(e), _) | (_, Err(e)) => {
                rec.reason = format!("{}; the upgrade did not complete: {e}", rec.reason);
                "failed"
            }
        };
        rec.duration = started.elapsed();
        rec.emit(outcome);
    });
    Response::from_parts(parts, ResponseBody::untracked())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_authorities() {
        for (a, h) in [
            ("Example.COM", "example.com"),
            ("example.com:8443", "example.com"),
            ("[::1]:443", "::1"),
            ("[fd00::2]", "fd00::2"),
            ("10.1.2.3:80", "10.1.2.3"),
            ("user@host.test:1", "host.test"),
            ("shop.test.", "shop.test"),
        ] {
            assert_eq!(host_of(a), h, "{a}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key("upgrade") && h.contains_key("connection") && h.contains_key("te"));
    }

    #[test]
    fn accept_encoding_keeps_only_what_the_masker_reads() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, deflate, br, zstd;q=0.9"),
        );
        restrict_accept_encoding(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "gzip, deflate, br");
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("zstd"));
        restrict_accept_encoding(&mut h);
        assert!(!h.contains_key(header::ACCEPT_ENCODING));
    }
}
