//! The fast path: once the proxy has allowed a flow at L4 (this exact
//! cgroup, to this address and port), the kernel lets further connects of
//! that flow go direct for a short while instead of through the proxy —
//! the only way a new connection costs close to nothing extra. Safety
//! rests on three things the kernel checks per connect: the entry has not
//! expired, the daemon is ready, and the daemon's marked listener is up (it
//! vanishes the instant the daemon dies). Every fast-path connection is
//! still audited: the kernel reports its open and close with byte counts
//! through a ring buffer, and this module turns them into the same
//! connection records the proxy writes.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use gateway_common::{EVENT_CLOSE, EVENT_OPEN, FastEvent, FastKey};
use tokio::io::unix::AsyncFd;

use crate::{
    audit::{ConnRecord, Outcome},
    daemon::State,
    identity::Identity,
    kernel::{Events, monotonic_ns},
    proxy::{OpenConn, ip_to_words, orig_addr, words_to_ip},
    relay::Counters,
};

/// How long an allow decision is reused before the proxy decides again.
const TTL: Duration = Duration::from_secs(30);
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

/// Payload bytes each way from the kernel's sequence-space counters.
/// `bytes_acked` counts the SYN once the connection is established and
/// our FIN once acknowledged; `bytes_received` counts the peer's FIN.
/// `states` has bit `1 << s` for each state entered; `last` is the state
/// the socket left for CLOSE.
fn payload(bytes_acked: u64, bytes_received: u64, states: u16, last: u32) -> (u64, u64) {
    let seen = |s: u32| states & (1 << s) != 0;
    let syn = u64::from(seen(TCP_ESTABLISHED));
    // Our FIN was acked when we got to FIN_WAIT2, or closed from LAST_ACK
    // or CLOSING (or from FIN_WAIT1 straight into TIME_WAIT, which the
    // socket leaves as CLOSE after a peer FIN arrived with the ack).
    let our_fin_acked =
        u64::from(seen(TCP_FIN_WAIT2) || last == TCP_LAST_ACK || last == TCP_CLOSING);
    // The peer's FIN arrived if we passed CLOSE_WAIT, or closed out of
    // FIN_WAIT2 / CLOSING (time-wait) rather than by a reset.
    let peer_fin = u64::from(
        seen(TCP_CLOSE_WAIT)
            || last == TCP_FIN_WAIT2
            || last == TCP_CLOSING
            || last == TCP_LAST_ACK,
    );
    (
        bytes_acked.saturating_sub(syn + our_fin_acked),
        bytes_received.saturating_sub(peer_fin),
    )
}

/// What the audit needs about a flow decided once for many connections.
#[derive(Debug, Clone)]
struct Decided {
    identity: Arc<Identity>,
    rule: String,
    reason: String,
    host: String,
    session: u64,
}

#[derive(Debug, Default)]
pub struct FastPath {
    decided: Mutex<HashMap<FastKey, Decided>>,
}

fn key(cgroup_id: u64, dst: SocketAddr) -> FastKey {
    FastKey {
        cgroup_id,
        addr: ip_to_words(dst.ip()),
        port: dst.port(),
        _pad: [0; 6],
    }
}

impl FastPath {
    /// Records an allow decision the proxy just made and lets the kernel
    /// reuse it until the TTL or the identity's token expiry, whichever
    /// comes first.
    #[allow(clippy::too_many_arguments)]
    pub fn remember(
        &self,
        state: &State,
        cgroup_id: u64,
        dst: SocketAddr,
        identity: &Arc<Identity>,
        rule: &str,
        reason: &str,
        host: &str,
        session: u64,
    ) {
        let mut ttl = TTL;
        if let Some(exp) = identity.expires_at {
            match exp.duration_since(SystemTime::now()) {
                Ok(left) => ttl = ttl.min(left),
                Err(_) => return,
            }
        }
        let k = key(cgroup_id, dst);
        if let Ok(mut d) = self.decided.lock() {
            if d.len() > 65_536 {
                d.clear();
            }
            d.insert(
                k,
                Decided {
                    identity: identity.clone(),
                    rule: rule.to_string(),
                    reason: reason.to_string(),
                    host: host.to_string(),
                    session,
                },
            );
        }
        let expires = monotonic_ns() + ttl.as_nanos() as u64;
        if let Err(e) = state.maps.allow_fast(&k, expires) {
            tracing::debug!(error = %e, "fast-path map full; this flow keeps going through the proxy");
        }
    }

    /// Forgets every decision: the policy or an identity changed.
    pub fn clear(&self, state: &State) {
        state.maps.clear_fast();
        if let Ok(mut d) = self.decided.lock() {
            d.clear();
        }
    }

    fn lookup(&self, k: &FastKey) -> Option<Decided> {
        self.decided.lock().ok()?.get(k).cloned()
    }
}

/// Reads the kernel's fast-path events and audits them.
pub async fn read_events(events: Events, state: Arc<State>) {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged,
    // for as long as the AsyncFd owns the ring buffer.
    let mut fd = match unsafe { AsyncFd::register(events) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the fast-path ring buffer; fast-path connections will not be audited");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "fast-path ring buffer poll failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<FastEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole `FastEvent` (plain data,
            // valid for any bit pattern); read unaligned from the ring.
            let ev: FastEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            handle(&ev, &state);
        }
        guard.clear_ready();
    }
}

fn handle(ev: &FastEvent, state: &State) {
    let o = &ev.orig;
    let dst = orig_addr(o);
    let decided = state.fast.lookup(&key(o.cgroup_id, dst));
    let session = ev.cookie;
    match ev.kind {
        EVENT_OPEN => {
            state.registry.insert(OpenConn {
                session,
                identity: decided
                    .as_ref()
                    .map(|d| d.identity.name.clone())
                    .unwrap_or_default(),
                cgroup: state.resolver.path(o.cgroup_id, o.pid).unwrap_or_default(),
                pid: o.pid,
                exe: state.exes.get(o.pid),
                orig_dst: dst.to_string(),
                host: decided.as_ref().map(|d| d.host.clone()).unwrap_or_default(),
                since_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                counters: Arc::new(Counters::default()),
            });
        }
        EVENT_CLOSE => {
            state.registry.remove(session);
            let (up, down) = payload(ev.bytes_up, ev.bytes_down, o.states, ev.old_state);
            let mut rec = ConnRecord {
                session,
                client: Some(SocketAddr::new(words_to_ip(&ev.local_addr), ev.local_port)),
                cgroup: state.resolver.path(o.cgroup_id, o.pid).unwrap_or_default(),
                pid: o.pid,
                uid: o.uid,
                exe: state.exes.get(o.pid),
                orig_dst: Some(dst),
                decision: "allow",
                bytes_up: up,
                bytes_down: down,
                duration: Duration::from_nanos(ev.ktime_ns.saturating_sub(o.ktime_ns)),
                ..ConnRecord::default()
            };
            let why = match &decided {
                Some(d) => {
                    rec.identity.clone_from(&d.identity.name);
                    rec.subject.clone_from(&d.identity.subject);
                    rec.duties.clone_from(&d.identity.duties);
                    rec.identity_source = d.identity.source;
                    rec.claims.clone_from(&d.identity.claims);
                    rec.rule.clone_from(&d.rule);
                    rec.host.clone_from(&d.host);
                    format!("{}; fast path (decided in session {})", d.reason, d.session)
                }
                None => "fast path (decision no longer cached)".to_string(),
            };
            let (outcome, how) = if ev.old_state == TCP_SYN_SENT {
                (
                    Outcome::UpstreamError,
                    format!("connecting to {dst} failed"),
                )
            } else {
                (Outcome::Closed, "closed by the peers".to_string())
            };
            rec.emit(outcome, &format!("{why}; {how}"));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIN_WAIT1: u32 = 4;

    fn bits(states: &[u32]) -> u16 {
        states.iter().fold(0, |b, s| b | (1 << s))
    }

    #[test]
    fn sequence_space_becomes_payload() {
        // (name, acked, received, states entered, last state, payload up, down)
        let cases = [
            // We close first: FIN_WAIT1 → FIN_WAIT2 → (time-wait) CLOSE.
            (
                "active close",
                66,
                1436,
                bits(&[TCP_ESTABLISHED, FIN_WAIT1, TCP_FIN_WAIT2]),
                TCP_FIN_WAIT2,
                64,
                1435,
            ),
            // Peer closes first: CLOSE_WAIT → LAST_ACK → CLOSE.
            (
                "passive close",
                66,
                1436,
                bits(&[TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_LAST_ACK]),
                TCP_LAST_ACK,
                64,
                1435,
            ),
            // Reset while established: no FINs.
            (
                "reset",
                11,
                20,
                bits(&[TCP_ESTABLISHED]),
                TCP_ESTABLISHED,
                10,
                20,
            ),
            // Refused connect: nothing.
            ("refused", 0, 0, 0, TCP_SYN_SENT, 0, 0),
            // Opened and closed without payload (SYN + FIN each way).
            (
                "empty",
                2,
                1,
                bits(&[TCP_ESTABLISHED, FIN_WAIT1, TCP_FIN_WAIT2]),
                TCP_FIN_WAIT2,
                0,
                0,
            ),
        ];
        for (name, acked, recv, states, last, up, down) in cases {
            assert_eq!(payload(acked, recv, states, last), (up, down), "{name}");
        }
    }
}
