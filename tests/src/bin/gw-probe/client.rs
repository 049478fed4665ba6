//! Client subcommands: each returns the JSON result a test asserts on.

use gateway_tests::{dns, errno};
use serde_json::{Map, Value, json};
use std::io::{BufRead, ErrorKind, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Fields every result carries: the operation, our pid and our cgroup.
fn base(op: &str) -> Map<String, Value> {
    let pid = std::process::id();
    let cgroup = gateway_tests::cgroup::cgroup_of(pid).unwrap_or_default();
    let mut m = Map::new();
    m.insert("op".into(), json!(op));
    m.insert("pid".into(), json!(pid));
    m.insert("cgroup".into(), json!(cgroup));
    m
}

fn set_err(m: &mut Map<String, Value>, stage: &str, e: &std::io::Error) {
    m.insert("ok".into(), json!(false));
    m.insert("stage".into(), json!(stage));
    match e.raw_os_error() {
        Some(n) => {
            m.insert("errno".into(), json!(n));
            m.insert("error".into(), json!(errno::name(n)));
        }
        None => {
            m.insert("errno".into(), Value::Null);
            m.insert("error".into(), json!(e.to_string()));
        }
    }
}

/// `{"ok":bool,"errno":n,"error":"ENAME"}` for a libc call's return value.
fn call_result(rc: i32) -> Value {
    if rc < 0 {
        let n = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        json!({"ok": false, "errno": n, "error": errno::name(n)})
    } else {
        json!({"ok": true, "errno": null, "error": null})
    }
}

fn elapsed_ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

fn read_to_end_lossy(s: &mut TcpStream) -> Result<String, (String, std::io::Error)> {
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => Ok(String::from_utf8_lossy(&buf).into_owned()),
        Err(e) => Err((String::from_utf8_lossy(&buf).into_owned(), e)),
    }
}

/// Connect, send `send`, half-close, read until EOF.
pub fn tcp(addr: SocketAddr, send: &str) -> Value {
    let start = Instant::now();
    let mut m = base("tcp");
    m.insert("target".into(), json!(addr.to_string()));
    m.insert("sent".into(), json!(send));
    m.insert("ok".into(), json!(true));
    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Err(e) => set_err(&mut m, "connect", &e),
        Ok(mut s) => {
            m.insert("connect_ms".into(), json!(elapsed_ms(start)));
            let peer = s.peer_addr().map(|a| a.to_string());
            let local = s.local_addr().map(|a| a.to_string());
            m.insert("peer".into(), json!(peer.as_ref().ok()));
            m.insert("local".into(), json!(local.as_ref().ok()));
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            let written = if send.is_empty() {
                Ok(())
            } else {
                s.write_all(send.as_bytes())
            };
            match written.and_then(|()| s.shutdown(Shutdown::Write)) {
                Err(e) => set_err(&mut m, "send", &e),
                Ok(()) => match read_to_end_lossy(&mut s) {
                    Ok(r) => {
                        m.insert("received".into(), json!(r));
                    }
                    Err((r, e)) => {
                        m.insert("received".into(), json!(r));
                        set_err(&mut m, "read", &e);
                    }
                },
            }
        }
    }
    m.insert("elapsed_ms".into(), json!(elapsed_ms(start)));
    Value::Object(m)
}

enum Outcome {
    Ok(SocketAddr, SocketAddr),
    Mismatch(String),
    Error(String),
}

/// `count` connections, all open at once (a barrier holds every thread
/// between connect and send), spread round-robin over `addrs`. Each sends a
/// unique token; the origin must answer `port=<its port>\n<token>`.
pub fn many(count: usize, addrs: &[SocketAddr]) -> Value {
    let start = Instant::now();
    let barrier = Arc::new(Barrier::new(count));
    let run = std::process::id();
    let threads: Vec<_> = (0..count)
        .map(|i| {
            let addr = addrs[i % addrs.len()];
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let token = format!("token-{run}-{i}-{:08x}", rand::random::<u32>());
                    let conn = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT);
                    barrier.wait();
                    let mut s = match conn {
                        Ok(s) => s,
                        Err(e) => return Outcome::Error(format!("{addr} connect: {e}")),
                    };
                    let local = s
                        .local_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                    if let Err(e) = s
                        .write_all(token.as_bytes())
                        .and_then(|()| s.shutdown(Shutdown::Write))
                    {
                        return Outcome::Error(format!("{addr} send: {e}"));
                    }
                    match read_to_end_lossy(&mut s) {
                        Ok(r) if r == format!("port={}\n{token}", addr.port()) => {
                            Outcome::Ok(local, addr)
                        }
                        Ok(r) => Outcome::Mismatch(format!("{addr}: sent {token:?} got {r:?}")),
                        Err((r, e)) => Outcome::Error(format!("{addr} read: {e} after {r:?}")),
                    }
                })
                .expect("spawn connection thread")
        })
        .collect();
    let (mut ok, mut mismatch, mut errors) = (0, 0, 0);
    let mut local_ports = Vec::new();
    let mut connections = Vec::new();
    let mut samples = Vec::new();
    for t in threads {
        match t.join().expect("connection thread panicked") {
            Outcome::Ok(local, target) => {
                ok += 1;
                local_ports.push(local.port());
                connections.push(json!([local.to_string(), target.to_string()]));
            }
            Outcome::Mismatch(s) => {
                mismatch += 1;
                samples.push(s);
            }
            Outcome::Error(s) => {
                errors += 1;
                samples.push(s);
            }
        }
    }
    samples.truncate(10);
    let mut m = base("many");
    m.insert("ok".into(), json!(ok == count));
    m.insert("count".into(), json!(count));
    m.insert("ok_count".into(), json!(ok));
    m.insert("mismatch".into(), json!(mismatch));
    m.insert("errors".into(), json!(errors));
    m.insert("samples".into(), json!(samples));
    m.insert("local_ports".into(), json!(local_ports));
    // (client socket, target) per connection: the pair is what is unique,
    // as a source port may be reused towards a different destination.
    m.insert("connections".into(), json!(connections));
    m.insert("elapsed_ms".into(), json!(elapsed_ms(start)));
    Value::Object(m)
}

fn unspecified_for(addr: &SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    }
}

/// One datagram, by `sendto` or by `connect` + `send`.
pub fn udp(addr: SocketAddr, connect: bool) -> Value {
    let mut m = base("udp");
    m.insert("target".into(), json!(addr.to_string()));
    m.insert(
        "mode".into(),
        json!(if connect { "connect" } else { "sendto" }),
    );
    m.insert("ok".into(), json!(true));
    let start = Instant::now();
    let r = UdpSocket::bind(unspecified_for(&addr))
        .map_err(|e| ("socket", e))
        .and_then(|s| {
            if connect {
                s.connect(addr).map_err(|e| ("connect", e))?;
                s.send(b"gw-probe").map_err(|e| ("send", e))
            } else {
                s.send_to(b"gw-probe", addr).map_err(|e| ("sendto", e))
            }
        });
    if let Err((stage, e)) = r {
        set_err(&mut m, stage, &e);
    }
    m.insert("elapsed_ms".into(), json!(elapsed_ms(start)));
    Value::Object(m)
}

fn try_socket(domain: i32, ty: i32, proto: i32) -> Value {
    // SAFETY: plain socket(2); the fd is closed right away.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    let r = call_result(fd);
    if fd >= 0 {
        // SAFETY: we own the fresh fd.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    r
}

/// Raw and ICMP ("ping") sockets of both families, and a packet socket
/// (which bypasses the inet hooks entirely).
pub fn raw() -> Value {
    let mut m = base("raw");
    let raw4 = try_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
    let raw6 = try_socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6);
    let ping4 = try_socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP);
    let ping6 = try_socket(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6);
    let packet = try_socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        i32::from((libc::ETH_P_ALL as u16).to_be()),
    );
    m.insert("ok".into(), raw4["ok"].clone());
    m.insert("raw4".into(), raw4);
    m.insert("raw6".into(), raw6);
    m.insert("ping4".into(), ping4);
    m.insert("ping6".into(), ping6);
    m.insert("packet".into(), packet);
    Value::Object(m)
}

/// One A query over an unconnected UDP socket; reports the answers and
/// where the reply came from (recvfrom's address).
pub fn dns(name: &str, server: SocketAddr) -> Value {
    let mut m = base("dns");
    m.insert("name".into(), json!(name));
    m.insert("server".into(), json!(server.to_string()));
    m.insert("ok".into(), json!(true));
    let start = Instant::now();
    let id: u16 = rand::random();
    let r = UdpSocket::bind(unspecified_for(&server))
        .map_err(|e| ("socket", e))
        .and_then(|s| {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(&dns::query(id, name, dns::TYPE_A), server)
                .map_err(|e| ("sendto", e))?;
            let mut buf = [0u8; 1500];
            let (n, from) = s.recv_from(&mut buf).map_err(|e| ("recvfrom", e))?;
            Ok((buf[..n].to_vec(), from))
        });
    match r {
        Err((stage, e)) => set_err(&mut m, stage, &e),
        Ok((msg, from)) => {
            m.insert("from".into(), json!(from.to_string()));
            match dns::parse_response(&msg) {
                Some(resp) => {
                    m.insert("id_ok".into(), json!(resp.id == id));
                    m.insert("rcode".into(), json!(resp.rcode));
                    let answers: Vec<String> = resp.a.iter().map(|a| a.to_string()).collect();
                    m.insert("answers".into(), json!(answers));
                    if resp.id != id {
                        m.insert("ok".into(), json!(false));
                    }
                }
                None => {
                    m.insert("ok".into(), json!(false));
                    m.insert("error".into(), json!("unparseable DNS reply"));
                }
            }
        }
    }
    m.insert("elapsed_ms".into(), json!(elapsed_ms(start)));
    Value::Object(m)
}

/// `sockaddr_in`/`sockaddr_in6` for a `SocketAddr`.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Enter a network namespace (a fresh one by `unshare`, or an existing one
/// by `setns`), then try `socket()` and `connect()` there.
pub fn netns_connect(addr: SocketAddr, setns: Option<&str>) -> Value {
    let mut m = base("netns-connect");
    m.insert("target".into(), json!(addr.to_string()));
    m.insert("setns".into(), json!(setns));
    let entered = match setns {
        None => {
            // SAFETY: plain syscall.
            call_result(unsafe { libc::unshare(libc::CLONE_NEWNET) })
        }
        Some(path) => match std::fs::File::open(path) {
            // SAFETY: fd owned by `f`, alive for the call.
            Ok(f) => call_result(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }),
            Err(e) => json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string()}),
        },
    };
    m.insert("ok".into(), json!(false));
    let entered_ok = entered["ok"] == json!(true);
    m.insert("enter".into(), entered);
    if !entered_ok {
        return Value::Object(m);
    }
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    m.insert("socket".into(), call_result(fd));
    if fd < 0 {
        return Value::Object(m);
    }
    // SAFETY: we own the fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 3,
        tv_usec: 0,
    };
    let (ss, len) = sockaddr(&addr);
    // SAFETY: valid fd and pointers of the stated lengths.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const _ as *const libc::c_void,
            size_of::<libc::timeval>() as libc::socklen_t,
        );
        libc::connect(
            fd.as_raw_fd(),
            &ss as *const _ as *const libc::sockaddr,
            len,
        )
    };
    let connect = call_result(rc);
    m.insert("ok".into(), connect["ok"].clone());
    m.insert("connect".into(), connect);
    Value::Object(m)
}

/// Read one `\n`-terminated line from a stream (the origin's greeting).
fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "EOF before newline",
                ));
            }
            _ if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ => line.push(b[0]),
        }
    }
}

/// Commands on stdin, one JSON result per line on stdout. The process stays
/// the same (same pid, same cgroup) across commands, which lets a test
/// resolve then connect, or connect before and after a daemon restart.
///
/// ```text
/// tcp ADDR [TEXT]      as `gw-probe tcp ADDR --send TEXT`
/// dns NAME SERVER      as `gw-probe dns`
/// udp ADDR [connect]   as `gw-probe udp`
/// raw                  as `gw-probe raw`
/// open ADDR            connect, read the origin's greeting line, keep it open
/// close                half-close every open connection and read it to EOF
/// ```
pub fn repl() {
    let mut held: Vec<TcpStream> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = |i: usize| words.get(i).and_then(|w| w.parse::<SocketAddr>().ok());
        let result = match words.as_slice() {
            ["tcp", _, rest @ ..] if addr(1).is_some() => tcp(addr(1).unwrap(), &rest.join(" ")),
            ["dns", name, _] if addr(2).is_some() => dns(name, addr(2).unwrap()),
            ["udp", _] if addr(1).is_some() => udp(addr(1).unwrap(), false),
            ["raw"] => raw(),
            ["udp", _, "connect"] if addr(1).is_some() => udp(addr(1).unwrap(), true),
            ["open", _] if addr(1).is_some() => {
                let mut m = base("open");
                m.insert("target".into(), json!(words[1]));
                m.insert("ok".into(), json!(true));
                let r = TcpStream::connect_timeout(&addr(1).unwrap(), CONNECT_TIMEOUT)
                    .map_err(|e| ("connect", e))
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                        let greeting = read_line(&mut s).map_err(|e| ("read", e))?;
                        Ok((s, greeting))
                    });
                match r {
                    Ok((s, greeting)) => {
                        m.insert(
                            "peer".into(),
                            json!(s.peer_addr().ok().map(|a| a.to_string())),
                        );
                        m.insert(
                            "local".into(),
                            json!(s.local_addr().ok().map(|a| a.to_string())),
                        );
                        m.insert("greeting".into(), json!(greeting));
                        held.push(s);
                    }
                    Err((stage, e)) => set_err(&mut m, stage, &e),
                }
                Value::Object(m)
            }
            ["close"] => {
                let mut m = base("close");
                let mut received = Vec::new();
                for mut s in held.drain(..) {
                    let _ = s.shutdown(Shutdown::Write);
                    received.push(read_to_end_lossy(&mut s).unwrap_or_else(|(r, _)| r));
                }
                m.insert("ok".into(), json!(true));
                m.insert("received".into(), json!(received));
                Value::Object(m)
            }
            _ => json!({"op": "repl", "ok": false, "error": format!("bad command {line:?}")}),
        };
        crate::emit(&result);
    }
}
