//! Origin servers for the tests. They log one JSON line per connection or
//! query, so a test can assert what reached the origin and from where, and
//! that nothing else did.

use gateway_tests::dns;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::ops::RangeInclusive;

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

fn bind_error(what: &str, e: std::io::Error) -> ! {
    crate::emit(&json!({"ok": false, "error": format!("bind {what}: {e}")}));
    std::process::exit(1)
}

/// Greet with `port=<P>\n`, then echo until EOF, then close.
fn origin_conn(mut s: TcpStream, port: u16) {
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    crate::emit(&json!({"accepted": port, "peer": peer, "local": local}));
    if s.write_all(format!("port={port}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    let mut echoed = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
                echoed += n;
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    crate::emit(&json!({"closed": port, "peer": peer, "echoed": echoed}));
}

/// Listen on every port of `ports` on every address of `binds`.
pub fn tcp(binds: &[IpAddr], ports: RangeInclusive<u16>) -> ! {
    let mut listening = Vec::new();
    for ip in binds {
        for port in ports.clone() {
            let addr = SocketAddr::new(*ip, port);
            let l = TcpListener::bind(addr).unwrap_or_else(|e| bind_error(&addr.to_string(), e));
            listening.push(addr.to_string());
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    std::thread::spawn(move || origin_conn(s, port));
                }
            });
        }
    }
    crate::emit(&json!({"listening": listening}));
    park_forever()
}

/// Answer A queries: the configured addresses for a known name, NXDOMAIN
/// otherwise.
pub fn dns(binds: &[SocketAddr], answers: Vec<(String, Ipv4Addr)>) -> ! {
    let mut listening = Vec::new();
    for addr in binds {
        let s = UdpSocket::bind(addr).unwrap_or_else(|e| bind_error(&addr.to_string(), e));
        listening.push(addr.to_string());
        let answers = answers.clone();
        std::thread::spawn(move || {
            let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                let msg = &buf[..n];
                let Some(q) = dns::parse_question(msg) else {
                    crate::emit(&json!({"garbage": n, "peer": peer.to_string()}));
                    continue;
                };
                let addrs: Vec<Ipv4Addr> = answers
                    .iter()
                    .filter(|(name, _)| {
                        q.qtype == dns::TYPE_A && name.eq_ignore_ascii_case(&q.name)
                    })
                    .map(|(_, ip)| *ip)
                    .collect();
                crate::emit(&json!({
                    "query": q.name,
                    "qtype": q.qtype,
                    "peer": peer.to_string(),
                    "local": local,
                    "answers": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                }));
                let _ = s.send_to(&dns::answer(msg, &q, &addrs), peer);
            }
        });
    }
    crate::emit(&json!({"listening": listening}));
    park_forever()
}
