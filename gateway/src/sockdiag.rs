//! Finds the socket cookie of a local UDP socket from its addresses through
//! `NETLINK_SOCK_DIAG`. The DNS forwarder uses it to learn which tagged
//! socket (and so which cgroup and pid) sent a query: UDP has no accept and
//! no sock_ops, but the kernel's record of the socket is keyed by cookie.

use std::{io, mem::size_of, net::SocketAddr};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_NOCOOKIE: u32 = !0;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    hdr: NlMsgHdr,
    req: ReqV2,
}

fn words(a: SocketAddr) -> [u32; 4] {
    match a {
        SocketAddr::V4(v4) => [u32::from_ne_bytes(v4.ip().octets()), 0, 0, 0],
        SocketAddr::V6(v6) => crate::proxy::octets_to_words(v6.ip().octets()),
    }
}

/// The cookie of the UDP socket bound at `local` that would receive a
/// datagram from `remote` — i.e. the client socket a query came from.
pub fn udp_cookie(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    } as u8;
    // udp_diag looks the socket up like an arriving packet: `src` is the
    // packet's source (the socket's peer), `dst` the socket's own address.
    let req = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            ty: SOCK_DIAG_BY_FAMILY,
            flags: libc::NLM_F_REQUEST as u16,
            seq: 1,
            pid: 0,
        },
        req: ReqV2 {
            family,
            protocol: libc::IPPROTO_UDP as u8,
            ext: 0,
            pad: 0,
            states: !0,
            id: SockId {
                sport: remote.port().to_be(),
                dport: local.port().to_be(),
                src: words(remote),
                dst: words(local),
                ifindex: 0,
                cookie: [INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE],
            },
        },
    };
    // SAFETY: plain socket syscalls on an fd we own and close; buffers are
    // valid for the lengths given.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let guard = Fd(fd);
        let sent = libc::send(guard.0, (&raw const req).cast(), size_of::<Request>(), 0);
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        let n = libc::recv(guard.0, buf.as_mut_ptr().cast(), buf.len(), 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        parse_reply(&buf[..n as usize])
    }
}

struct Fd(libc::c_int);
impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

fn parse_reply(buf: &[u8]) -> io::Result<Option<u64>> {
    let hdr_len = size_of::<NlMsgHdr>();
    if buf.len() < hdr_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink reply",
        ));
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    if ty == NLMSG_ERROR {
        let errno = buf
            .get(hdr_len..hdr_len + 4)
            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        if errno == -libc::ENOENT {
            return Ok(None);
        }
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if ty != SOCK_DIAG_BY_FAMILY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected netlink reply",
        ));
    }
    // inet_diag_msg: 4 bytes of state, then the sockid, whose cookie sits at
    // offset 40.
    let at = hdr_len + 4 + 40;
    let c = buf
        .get(at..at + 8)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short inet_diag_msg"))?;
    let lo = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    let hi = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
    Ok(Some(u64::from(lo) | (u64::from(hi) << 32)))
}
