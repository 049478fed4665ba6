//! The TCP side of the data path. Each accepted connection runs the
//! pipeline in order — origin → identity → decision → forward → audit — and
//! the audit phase runs on every path, refusals and errors included.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gateway_common::{OrigDst, TupleKey};
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{
    approvals,
    audit::{ConnRecord, Outcome},
    config::Action,
    daemon::State,
    identity::Identity,
    intercept,
    policy::{ConnDecision, ConnPlan, Destination, Traffic},
    relay::{self, Counters, End},
    tls::sniff,
};

// === addresses ===

/// Kernel address words (network-order bytes, IPv4 mapped) to an address.
pub fn words_to_ip(w: &[u32; 4]) -> IpAddr {
    let mut b = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn ip_to_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6, |v4| v4.to_ipv6_mapped()),
    };
    octets_to_words(v6.octets())
}

/// Sixteen address bytes as the four kernel words holding them.
pub fn octets_to_words(b: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| {
        u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
    })
}

/// The original destination of a redirected socket, as the app asked.
pub fn orig_addr(o: &OrigDst) -> SocketAddr {
    SocketAddr::new(words_to_ip(&o.addr), o.port)
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

// === open connections (for `status`) ===

#[derive(Debug, Clone, Serialize)]
pub struct OpenConn {
    pub session: u64,
    pub identity: String,
    pub cgroup: String,
    pub pid: u32,
    pub exe: String,
    pub orig_dst: String,
    pub host: String,
    pub since_unix_ms: u64,
    #[serde(skip)]
    pub counters: Arc<Counters>,
}

#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, OpenConn>>,
}

impl Registry {
    pub fn next_session(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sessions started since the daemon started.
    pub fn total(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    pub(crate) fn insert(&self, c: OpenConn) {
        if let Ok(mut m) = self.open.lock() {
            m.insert(c.session, c);
        }
    }

    pub(crate) fn remove(&self, session: u64) {
        if let Ok(mut m) = self.open.lock() {
            m.remove(&session);
        }
    }

    /// Snapshot with live byte counts.
    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        let Ok(m) = self.open.lock() else {
            return Vec::new();
        };
        let mut v: Vec<_> = m.values().cloned().collect();
        v.sort_by_key(|c| c.session);
        v.into_iter()
            .map(|c| {
                let mut j = serde_json::to_value(&c).unwrap_or_default();
                j["bytes_up"] = c.counters.up.load(Ordering::Relaxed).into();
                j["bytes_down"] = c.counters.down.load(Ordering::Relaxed).into();
                j
            })
            .collect()
    }
}

// === executables ===

/// pid → executable path, remembered briefly: a client opening many
/// connections costs one readlink, and a pid is not reused within seconds.
#[derive(Debug, Default)]
pub struct Exes {
    map: Mutex<HashMap<u32, (String, Instant)>>,
}

impl Exes {
    const TTL: Duration = Duration::from_secs(2);

    pub fn get(&self, pid: u32) -> String {
        let now = Instant::now();
        if let Ok(m) = self.map.lock()
            && let Some((exe, at)) = m.get(&pid)
            && now.duration_since(*at) < Self::TTL
        {
            return exe.clone();
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if let Ok(mut m) = self.map.lock() {
            if m.len() > 4096 {
                m.retain(|_, (_, at)| now.duration_since(*at) < Self::TTL);
            }
            m.insert(pid, (exe.clone(), now));
        }
        exe
    }
}

// === accept loop ===

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    // Every accepted socket's local address is the listener's own (it is
    // bound to one address), which saves a getsockname per connection.
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "proxy listener has no address");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let state = state.clone();
                tokio::spawn(async move { handle(stream, peer, local, state).await });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The pipeline's verdict before forwarding.
enum Verdict {
    Forward(Allowed),
    Refuse(String),
    /// The decision depends on the first bytes (SNI, Host, HTTP request).
    Sniff(Allowed),
    /// Held until an approver decides (`Allowed` once approved).
    Hold(Allowed),
}

async fn handle(client: TcpStream, peer: SocketAddr, local: SocketAddr, state: Arc<State>) {
    let started = Instant::now();
    let mut rec = ConnRecord {
        session: state.registry.next_session(),
        client: Some(canonical(peer)),
        decision: "none",
        ..ConnRecord::default()
    };
    let verdict = decide(peer, local, &state, &mut rec);
    let (outcome, reason) = match verdict {
        Verdict::Refuse(reason) => {
            drop(client);
            (Outcome::Refused, reason)
        }
        Verdict::Forward(allowed) => {
            let (outcome, how) = forward(client, Vec::new(), &allowed, &state, &mut rec).await;
            (outcome, format!("{}; {how}", allowed.reason))
        }
        Verdict::Sniff(pending) => sniffed(client, pending, &state, &mut rec).await,
        Verdict::Hold(allowed) => held(client, Vec::new(), None, allowed, &state, &mut rec).await,
    };
    rec.duration = started.elapsed();
    rec.recording = state.sessions.record(&rec, outcome, &reason);
    rec.emit(outcome, &reason);
}

/// Phases before any byte goes upstream: where it was going, who asked,
/// and whether it may.
fn decide(peer: SocketAddr, local: SocketAddr, state: &State, rec: &mut ConnRecord) -> Verdict {
    // Origin: the record sock_ops filed under this exact 4-tuple.
    let key = TupleKey {
        client_addr: ip_to_words(peer.ip()),
        proxy_addr: ip_to_words(local.ip()),
        client_port: peer.port(),
        proxy_port: local.port(),
    };
    let Some(orig) = state.maps.take_tuple(&key) else {
        return Verdict::Refuse(format!(
            "no recorded original destination for {peer}: only connections redirected from a tagged cgroup are served"
        ));
    };
    let dst = orig_addr(&orig);
    rec.orig_dst = Some(dst);
    rec.pid = orig.pid;
    rec.uid = orig.uid;
    rec.exe = state.exes.get(orig.pid);
    let is_api = state.api_addr.is_some_and(|a| {
        a.port() == dst.port()
            && (a.ip() == dst.ip().to_canonical()
                || a.ip().is_unspecified()
                || dst.ip().is_loopback())
    });
    if is_api
        || dst.ip().is_loopback()
            && (dst.port() == state.proxy_port || dst.port() == state.dns_port)
    {
        return Verdict::Refuse(format!(
            "original destination {dst} is the gateway itself; it is not a proxy to be addressed directly"
        ));
    }

    // Identity: the nearest configured ancestor of the process's cgroup.
    let Some(cgroup) = state.resolver.path(orig.cgroup_id, orig.pid) else {
        return Verdict::Refuse(format!(
            "cgroup id {} of pid {} is not inside any configured cgroup",
            orig.cgroup_id, orig.pid
        ));
    };
    rec.cgroup.clone_from(&cgroup);
    rec.host = state
        .dns
        .host_for(orig.cgroup_id, dst.ip())
        .unwrap_or_default();
    let identity = match state.identities.resolve(&cgroup) {
        Ok(i) => i,
        Err(reason) => {
            if let Some((_, b)) = state.identities.binding(&cgroup) {
                rec.identity.clone_from(&b.config.name);
            }
            return Verdict::Refuse(reason);
        }
    };
    rec.identity.clone_from(&identity.name);
    rec.subject.clone_from(&identity.subject);
    rec.duties.clone_from(&identity.duties);
    rec.identity_source = identity.source;
    rec.claims = identity.claims.clone();

    // Decision: the first matching rule, else the default — unless it
    // depends on what the client is about to say.
    let plan = state.policy().plan(
        &identity.policy_subject(),
        &Destination {
            ip: dst.ip(),
            port: dst.port(),
            host: &rec.host,
        },
    );
    let decision = match plan {
        ConnPlan::Decided(d) => d,
        ConnPlan::Sniff => {
            return Verdict::Sniff(Allowed {
                dst,
                reason: String::new(),
                cgroup_id: orig.cgroup_id,
                identity,
                cacheable: false,
            });
        }
    };
    rec.rule = decision.rule;
    match decision.action {
        Action::Allow => {
            rec.decision = "allow";
            Verdict::Forward(Allowed {
                dst,
                reason: decision.reason,
                cgroup_id: orig.cgroup_id,
                identity,
                cacheable: true,
            })
        }
        Action::Block => {
            rec.decision = "block";
            Verdict::Refuse(decision.reason)
        }
        Action::Approve => {
            rec.decision = "approve";
            Verdict::Hold(Allowed {
                dst,
                reason: decision.reason,
                cgroup_id: orig.cgroup_id,
                identity,
                cacheable: false,
            })
        }
    }
}

/// Client bytes read (and kept for upstream) while a connection is held.
const HOLD_BUFFER: usize = 64 * 1024;

/// A connection held before its upstream connect until an approver decides
/// (rule `rec.rule`). Approved: forwarded with what the client sent
/// meanwhile. Denied, timed out, aborted: refused (plain HTTP gets a 403
/// naming the approval). The client going away cancels the approval.
async fn held(
    mut client: TcpStream,
    mut buf: Vec<u8>,
    kind: Option<intercept::Kind>,
    mut allowed: Allowed,
    state: &Arc<State>,
    rec: &mut ConnRecord,
) -> (Outcome, String) {
    use tokio::io::AsyncReadExt;
    let ask = approvals::Ask {
        rule: rec.rule.clone(),
        reason: allowed.reason.clone(),
        approvers: state.policy().approvers_of(&rec.rule),
        requester: approvals::requester(&allowed.identity, &rec.cgroup, rec.pid, &rec.exe),
        request: approvals::Summary {
            kind: "connection".into(),
            destination: allowed.dst.to_string(),
            host: rec.host.clone(),
            method: String::new(),
            path: String::new(),
            body_bytes: None,
            body_sha256: None,
            preview: None,
            preview_truncated: false,
        },
    };
    let outcome = match state.approvals.ask(ask) {
        Err(outcome) => outcome,
        Ok(ticket) => {
            rec.approval_id = ticket.id().to_string();
            let wait = ticket.wait();
            tokio::pin!(wait);
            let mut chunk = [0u8; 4096];
            loop {
                let room = HOLD_BUFFER.saturating_sub(buf.len()).min(chunk.len());
                tokio::select! {
                    o = &mut wait => break o,
                    r = client.read(&mut chunk[..room]), if room > 0 => match r {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        // Dropping `wait` cancels the approval (audited).
                        _ => {
                            return (
                                Outcome::Closed,
                                format!(
                                    "{}; the client went away while approval {} was pending (cancelled)",
                                    allowed.reason, rec.approval_id
                                ),
                            );
                        }
                    }
                }
            }
        }
    };
    let what = outcome.settle(
        &mut rec.approval_id,
        &mut rec.approver,
        state.approvals.timeout(),
    );
    if outcome.approved() {
        allowed.reason = format!("{}; {what}", allowed.reason);
        let (o, how) = forward(client, buf, &allowed, state, rec).await;
        return (o, format!("{}; {how}", allowed.reason));
    }
    if matches!(kind, Some(intercept::Kind::Http)) {
        refuse_http(client, &rec.rule, rec.session, &what).await;
    } else {
        close_gently(client).await;
    }
    (Outcome::Refused, format!("{}; {what}", allowed.reason))
}

/// An allowed connection, with what the fast path needs to reuse the
/// decision.
struct Allowed {
    dst: SocketAddr,
    reason: String,
    cgroup_id: u64,
    identity: Arc<Identity>,
    /// Whether the kernel fast path may reuse the decision: only for
    /// decisions made on the L4 destination alone, never for ones that read
    /// the connection's bytes (SNI, Host, HTTP).
    cacheable: bool,
}

/// Reads the client's first bytes (bounded in size and time), then decides
/// with what they say: TLS SNI, HTTP Host, or nothing (opaque TCP).
async fn sniffed(
    mut client: TcpStream,
    mut allowed: Allowed,
    state: &Arc<State>,
    rec: &mut ConnRecord,
) -> (Outcome, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + state.interception.sniff_timeout;
    let sniffed = loop {
        let want = (sniff::MAX_SNIFF - buf.len()).min(chunk.len());
        match tokio::time::timeout_at(deadline, client.read(&mut chunk[..want])).await {
            Ok(Ok(0)) => break sniff::Sniffed::Opaque,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                match sniff::sniff(&buf) {
                    sniff::Sniffed::NeedMore if buf.len() < sniff::MAX_SNIFF => continue,
                    sniff::Sniffed::NeedMore => break sniff::Sniffed::Opaque,
                    s => break s,
                }
            }
            Ok(Err(e)) => {
                return (
                    Outcome::Closed,
                    format!("client went away before saying anything: {e}"),
                );
            }
            // Server-speaks-first protocols, or a silent client.
            Err(_) => break sniff::Sniffed::Opaque,
        }
    };
    let dns_host = std::mem::take(&mut rec.host);
    let (traffic, host, kind) = match sniffed {
        sniff::Sniffed::Tls { sni, .. } => {
            // An address is not a server name (RFC 6066 §3); clients that
            // send one anyway are treated as sending none.
            let sni = sni.filter(|s| s.parse::<std::net::IpAddr>().is_err());
            (
                Traffic::Tls,
                sni.clone().unwrap_or_else(|| dns_host.clone()),
                Some(intercept::Kind::Tls { sni }),
            )
        }
        sniff::Sniffed::Http1 { host, .. } => (
            Traffic::Http,
            host.unwrap_or_else(|| dns_host.clone()),
            Some(intercept::Kind::Http),
        ),
        _ => (Traffic::Opaque, dns_host.clone(), None),
    };
    rec.host = host;
    let identity = allowed.identity.clone();
    let decision = state.policy().decide_connection(
        &identity.policy_subject(),
        &Destination {
            ip: allowed.dst.ip(),
            port: allowed.dst.port(),
            host: &rec.host,
        },
        traffic,
    );
    match decision {
        ConnDecision::Decided(d) => {
            rec.rule = d.rule;
            match d.action {
                Action::Allow => {
                    rec.decision = "allow";
                    allowed.reason = d.reason;
                    let (outcome, how) = forward(client, buf, &allowed, state, rec).await;
                    (outcome, format!("{}; {how}", allowed.reason))
                }
                Action::Block => {
                    rec.decision = "block";
                    if matches!(kind, Some(intercept::Kind::Http)) {
                        refuse_http(client, &rec.rule, rec.session, &d.reason).await;
                    } else {
                        close_gently(client).await;
                    }
                    (Outcome::Refused, d.reason)
                }
                Action::Approve => {
                    rec.decision = "approve";
                    allowed.reason = d.reason;
                    held(client, buf, kind, allowed, state, rec).await
                }
            }
        }
        ConnDecision::Inspect => {
            let Some(kind) = kind else {
                // The policy never asks to inspect opaque traffic.
                return (
                    Outcome::Refused,
                    "cannot inspect a non-HTTP connection".into(),
                );
            };
            rec.decision = "inspect";
            rec.rule = "per-request".into();
            let counters = Arc::new(Counters::default());
            let conn = intercept::Conn {
                session: rec.session,
                dst: allowed.dst,
                cgroup: rec.cgroup.clone(),
                pid: rec.pid,
                exe: rec.exe.clone(),
                host: rec.host.clone(),
            };
            let _ = client.set_nodelay(true);
            register(state, rec, allowed.dst, counters.clone());
            let (outcome, reason) =
                intercept::serve(client, buf, kind, conn, state.clone(), counters.clone()).await;
            state.registry.remove(rec.session);
            rec.bytes_up = counters.up.load(Ordering::Relaxed);
            rec.bytes_down = counters.down.load(Ordering::Relaxed);
            (outcome, reason)
        }
    }
}

/// A plaintext HTTP client blocked at connection level still gets an
/// answer it can read.
async fn refuse_http(mut client: TcpStream, rule: &str, session: u64, why: &str) {
    use tokio::io::AsyncWriteExt;
    let body = format!("Blocked by the gateway: rule {rule} ({why}).\nRequest id: {session}-1\n");
    let head = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nx-gateway-request-id: {session}-1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = client.write_all(head.as_bytes()).await;
    let _ = client.write_all(body.as_bytes()).await;
    close_gently(client).await;
}

fn register(state: &State, rec: &ConnRecord, dst: SocketAddr, counters: Arc<Counters>) {
    state.registry.insert(OpenConn {
        session: rec.session,
        identity: rec.identity.clone(),
        cgroup: rec.cgroup.clone(),
        pid: rec.pid,
        exe: rec.exe.clone(),
        orig_dst: dst.to_string(),
        host: rec.host.clone(),
        since_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        counters,
    });
}

async fn forward(
    client: TcpStream,
    prefix: Vec<u8>,
    allowed: &Allowed,
    state: &State,
    rec: &mut ConnRecord,
) -> (Outcome, String) {
    use tokio::io::AsyncWriteExt;
    let dst = allowed.dst;
    let mut upstream = match connect_upstream(dst, state).await {
        Ok(s) => s,
        Err(reason) => {
            close_gently(client).await;
            return (Outcome::UpstreamError, reason);
        }
    };
    if !prefix.is_empty()
        && let Err(e) = upstream.write_all(&prefix).await
    {
        close_gently(client).await;
        return (
            Outcome::UpstreamError,
            format!("upstream {dst} failed before the relay began: {e}"),
        );
    }
    if state.fast_path && allowed.cacheable {
        state.fast.remember(
            state,
            allowed.cgroup_id,
            dst,
            &allowed.identity,
            &rec.rule,
            &allowed.reason,
            &rec.host,
            rec.session,
        );
    }
    let _ = client.set_nodelay(true);
    let counters = Arc::new(Counters::default());
    counters
        .up
        .fetch_add(prefix.len() as u64, Ordering::Relaxed);
    register(state, rec, dst, counters.clone());
    let end = relay::relay(client, upstream, state.idle_timeout, counters.clone()).await;
    state.registry.remove(rec.session);
    rec.bytes_up = counters.up.load(Ordering::Relaxed);
    rec.bytes_down = counters.down.load(Ordering::Relaxed);
    match end {
        End::Closed => (Outcome::Closed, "closed by the peers".into()),
        End::IdleTimeout => (
            Outcome::IdleTimeout,
            format!("no bytes either way for {}s", state.idle_timeout.as_secs()),
        ),
        End::ClientError(e) => (Outcome::Closed, format!("client went away: {e}")),
        End::UpstreamError(e) => (
            Outcome::UpstreamError,
            format!("upstream {dst} failed mid-stream: {e}"),
        ),
    }
}

/// Ends a client connection without a reset: a client that already sent
/// its request would get ECONNRESET if we closed with unread data, so say
/// EOF first and drain what it sent (bounded in time and size).
async fn close_gently(mut client: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = client.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut left: usize = 256 * 1024;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while left > 0 {
        match tokio::time::timeout_at(deadline, client.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// Connects with the gateway's mark (so its own hooks never touch it) and
/// the configured timeout.
async fn connect_upstream(dst: SocketAddr, state: &State) -> Result<TcpStream, String> {
    connect_marked(dst, state.mark, state.connect_timeout).await
}

/// A TCP connection to `dst` carrying `mark`, within `timeout`.
pub async fn connect_marked(
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let socket = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("cannot create a socket for {dst}: {e}"))?;
    socket2::SockRef::from(&socket)
        .set_mark(mark)
        .map_err(|e| format!("cannot mark the upstream socket (needs CAP_NET_ADMIN): {e}"))?;
    let _ = socket.set_nodelay(true);
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("connecting to {dst} failed: {e}")),
        Err(_) => Err(format!(
            "connecting to {dst} timed out after {} ms",
            timeout.as_millis()
        )),
    }
}

/// Binds the proxy on 127.0.0.1 and ::1 at `port` (0: any free port, the
/// same for both families). Returns the listeners and the port.
pub fn bind_pair_tcp(port: u16) -> std::io::Result<(TcpListener, Option<TcpListener>, u16)> {
    for _ in 0..20 {
        let v4 = bind_tcp(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))?;
        let chosen = v4.local_addr()?.port();
        match bind_tcp(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), chosen)) {
            Ok(v6) => return Ok((v4, Some(v6), chosen)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && port == 0 => continue,
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                tracing::warn!("IPv6 loopback unavailable; native IPv6 connects will be refused");
                return Ok((v4, None, chosen));
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no port free on both 127.0.0.1 and ::1",
    ))
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    s.set_reuseaddr(true)?;
    // The kernel's fast path checks that a listener with our mark is up.
    socket2::SockRef::from(&s).set_mark(crate::daemon::SOCKET_MARK)?;
    s.bind(addr)?;
    s.listen(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_words_round_trip() {
        for s in ["10.1.2.3", "::1", "fd00::2", "127.0.0.1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(words_to_ip(&ip_to_words(ip)), ip, "{s}");
        }
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(words_to_ip(&ip_to_words(mapped)).to_string(), "10.0.0.1");
        // The kernel's v4-mapped words and ours agree.
        let w = ip_to_words("10.1.2.3".parse().unwrap());
        assert_eq!(
            w,
            gateway_common::v4_mapped(u32::from_ne_bytes([10, 1, 2, 3]))
        );
    }
}
