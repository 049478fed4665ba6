//! The DNS forwarder: every UDP/53 datagram from a tagged cgroup arrives
//! here (the kernel rewrote its destination and will rewrite the reply's
//! source back). Queries are attributed to their socket's cgroup, forwarded
//! to the configured upstreams, audited, and the answers remembered per
//! cgroup so a later L4 connection's audit can name the host it was for.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::Message,
    rr::{RData, RecordType},
};
use tokio::net::UdpSocket;

use crate::{audit::DnsRecord, daemon::State, proxy::orig_addr, sockdiag};

const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_TTL: Duration = Duration::from_secs(60);
const MAX_TTL: Duration = Duration::from_secs(3600);
const CACHE_MAX: usize = 100_000;

/// (cgroup id, address) → name it was resolved from, until expiry.
#[derive(Debug, Default)]
pub struct Names {
    map: Mutex<HashMap<(u64, IpAddr), (String, Instant)>>,
}

impl Names {
    pub fn host_for(&self, cgroup_id: u64, ip: IpAddr) -> Option<String> {
        let map = self.map.lock().ok()?;
        let (name, until) = map.get(&(cgroup_id, ip.to_canonical()))?;
        (Instant::now() < *until).then(|| name.clone())
    }

    fn remember(&self, cgroup_id: u64, ip: IpAddr, name: &str, ttl: Duration) {
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        let now = Instant::now();
        if map.len() >= CACHE_MAX {
            map.retain(|_, (_, until)| *until > now);
        }
        if map.len() < CACHE_MAX {
            map.insert(
                (cgroup_id, ip.to_canonical()),
                (name.to_string(), now + ttl.clamp(MIN_TTL, MAX_TTL)),
            );
        }
    }
}

/// Binds the forwarder on 127.0.0.1 and ::1 (same port for both).
pub fn bind_pair_udp(port: u16) -> std::io::Result<(UdpSocket, Option<UdpSocket>, u16)> {
    for _ in 0..20 {
        let v4 = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port))?;
        let chosen = v4.local_addr()?.port();
        v4.set_nonblocking(true)?;
        match std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, chosen)) {
            Ok(v6) => {
                v6.set_nonblocking(true)?;
                return Ok((
                    UdpSocket::from_std(v4)?,
                    Some(UdpSocket::from_std(v6)?),
                    chosen,
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && port == 0 => continue,
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                return Ok((UdpSocket::from_std(v4)?, None, chosen));
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no UDP port free on both 127.0.0.1 and ::1",
    ))
}

pub async fn serve(socket: UdpSocket, state: Arc<State>) {
    let socket = Arc::new(socket);
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "DNS forwarder socket has no address");
            return;
        }
    };
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "DNS forwarder receive failed");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (socket, state) = (socket.clone(), state.clone());
        tokio::spawn(async move { answer(query, client, local, socket, state).await });
    }
}

async fn answer(
    query: Vec<u8>,
    client: SocketAddr,
    local: SocketAddr,
    socket: Arc<UdpSocket>,
    state: Arc<State>,
) {
    let mut rec = DnsRecord {
        client: Some(client),
        ..DnsRecord::default()
    };
    if let Ok(m) = Message::from_vec(&query)
        && let Some(q) = m.queries().first()
    {
        rec.name = q.name().to_ascii().trim_end_matches('.').to_string();
    }
    let cgroup_id = match attribute(client, local, &state, &mut rec) {
        Ok(id) => id,
        Err(reason) => {
            if let Some(r) = refused(&query) {
                let _ = socket.send_to(&r, client).await;
            }
            rec.emit("refused", &reason);
            return;
        }
    };
    match forward(&query, &state).await {
        Ok((reply, upstream)) => {
            rec.upstream = upstream.to_string();
            let mut min_ttl = MAX_TTL;
            let mut ips = Vec::new();
            if let Ok(m) = Message::from_vec(&reply) {
                for r in m.answers() {
                    let ip = match r.data() {
                        Some(RData::A(a)) if r.record_type() == RecordType::A => IpAddr::V4(a.0),
                        Some(RData::AAAA(a)) => IpAddr::V6(a.0),
                        _ => continue,
                    };
                    min_ttl = min_ttl.min(Duration::from_secs(u64::from(r.ttl())));
                    ips.push(ip);
                }
            }
            for ip in &ips {
                state.dns.remember(cgroup_id, *ip, &rec.name, min_ttl);
            }
            rec.answers = ips.iter().map(ToString::to_string).collect();
            if let Err(e) = socket.send_to(&reply, client).await {
                rec.emit("error", &format!("sending the answer to {client}: {e}"));
                return;
            }
            rec.emit("answered", "forwarded");
        }
        Err(reason) => {
            if let Some(r) = servfail(&query) {
                let _ = socket.send_to(&r, client).await;
            }
            rec.emit("upstream_error", &reason);
        }
    }
}

/// Who sent this query: the kernel's record of the client socket.
fn attribute(
    client: SocketAddr,
    local: SocketAddr,
    state: &State,
    rec: &mut DnsRecord,
) -> Result<u64, String> {
    let cookie = sockdiag::udp_cookie(client, local)
        .map_err(|e| format!("cannot look up the socket of {client}: {e}"))?
        .ok_or_else(|| format!("no socket found for {client}"))?;
    let orig = state.maps.sock(cookie).ok_or_else(|| {
        format!("{client} was not redirected from a tagged cgroup; the forwarder serves only those")
    })?;
    rec.pid = orig.pid;
    rec.server = Some(orig_addr(&orig));
    let cgroup = state
        .resolver
        .path(orig.cgroup_id, orig.pid)
        .ok_or_else(|| {
            format!(
                "cgroup id {} is not inside any configured cgroup",
                orig.cgroup_id
            )
        })?;
    rec.cgroup.clone_from(&cgroup);
    let identity = state.identities.resolve(&cgroup)?;
    rec.identity.clone_from(&identity.name);
    Ok(orig.cgroup_id)
}

async fn forward(query: &[u8], state: &State) -> Result<(Vec<u8>, SocketAddr), String> {
    let mut last = String::from("no DNS upstream configured");
    for &up in state.dns_upstreams.iter() {
        match ask(query, up, state.mark).await {
            Ok(reply) => return Ok((reply, up)),
            Err(e) => last = format!("upstream {up}: {e}"),
        }
    }
    Err(last)
}

async fn ask(query: &[u8], upstream: SocketAddr, mark: u32) -> std::io::Result<Vec<u8>> {
    let domain = if upstream.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_mark(mark)?;
    s.set_nonblocking(true)?;
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    s.bind(&bind.into())?;
    let sock = UdpSocket::from_std(s.into())?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 4096];
    let id = query.get(..2);
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 2s"))??;
        // Ignore stray datagrams that do not answer this query id.
        if n >= 12 && buf.get(..2) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// The query turned into an answer with `rcode`, no records.
fn with_rcode(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let mut r = query.get(..12)?.to_vec();
    r[2] = (r[2] | 0x80) & !0x04; // QR=1, AA=0, keep opcode and RD
    r[3] = (r[3] & 0x70) | 0x80 | rcode; // RA=1, keep Z/AD/CD bits
    // Keep the question count but drop the records: answer with the
    // question section only when it parses cleanly; otherwise a bare header.
    r[6..12].fill(0);
    let qd = u16::from_be_bytes([query[4], query[5]]);
    if qd == 1
        && let Some(end) = question_end(query)
    {
        r[4..6].copy_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&query[12..end]);
    } else {
        r[4..6].fill(0);
    }
    Some(r)
}

fn question_end(q: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        let len = *q.get(i)? as usize;
        if len == 0 {
            i += 1;
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        i += 1 + len;
    }
    (i + 4 <= q.len()).then_some(i + 4)
}

fn refused(query: &[u8]) -> Option<Vec<u8>> {
    with_rcode(query, 5)
}

fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    with_rcode(query, 2)
}

/// Nameservers of /etc/resolv.conf, the default upstreams.
pub fn resolv_conf_upstreams() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next()?.parse::<IpAddr>().ok())
                .flatten()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_keeps_id_and_question() {
        // id 0xabcd, RD, one question "a.b" A IN
        let q = [
            0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 1, b'b', 0, 0, 1, 0, 1,
        ];
        let r = refused(&q).unwrap();
        assert_eq!(&r[..2], &[0xab, 0xcd]);
        assert_eq!(r[2] & 0x80, 0x80, "QR set");
        assert_eq!(r[3] & 0x0f, 5, "REFUSED");
        assert_eq!(&r[12..], &q[12..]);
        // Garbage: no panic, no answer.
        assert!(refused(&[1, 2, 3]).is_none());
        let junk = [0u8, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        assert_eq!(refused(&junk).unwrap().len(), 12);
    }
}
