//! Types and names shared by the kernel programs (`gateway-ebpf`) and the
//! userspace daemon (`gateway`). Every struct is `#[repr(C)]` with explicit
//! padding so both sides agree on the layout byte for byte.
//!
//! Addresses are stored as four `u32` words holding the address bytes in
//! network order (exactly as the kernel's `user_ip4`/`user_ip6` fields load
//! them); IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`). Ports are
//! stored in host byte order.
#![no_std]

/// Bumped whenever a pinned map's layout changes; pins live under
/// `<pin_dir>/v<ABI_VERSION>/` so an incompatible daemon never adopts them.
pub const ABI_VERSION: u32 = 2;

/// `cookie (u64) -> OrigDst`: written by connect/sendmsg, read by getpeername,
/// recvmsg and sock_ops, removed by sock_release.
pub const MAP_SOCKS: &str = "GW_SOCKS";
/// `TupleKey -> OrigDst`: written by sock_ops when a redirected TCP connect
/// sends its SYN; taken (lookup-and-delete) by the proxy after `accept`.
pub const MAP_TUPLES: &str = "GW_TUPLES";
/// `Array<Control>` with one entry: what the daemon tells the programs.
pub const MAP_CONTROL: &str = "GW_CONTROL";
/// `UdpAllowKey -> u32`: UDP destinations (other than DNS) allowed direct.
pub const MAP_UDP_ALLOW: &str = "GW_UDP_ALLOW";
/// `PerCpuArray<u64>` of counters, indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "GW_STATS";
/// `FastKey -> FastVal`: flows the daemon has decided may connect direct.
pub const MAP_FAST: &str = "GW_FAST";
/// `cookie (u64) -> OrigDst`: sockets that took the fast path, until their
/// close has been reported.
pub const MAP_FAST_SOCKS: &str = "GW_FAST_SOCKS";
/// Ring buffer of `FastEvent`s (open and close of fast-path sockets).
pub const MAP_EVENTS: &str = "GW_EVENTS";

pub const FAST_MAX_ENTRIES: u32 = 65_536;
pub const FAST_SOCKS_MAX_ENTRIES: u32 = 65_536;
pub const EVENTS_BYTES: u32 = 1 << 20;

pub const SOCKS_MAX_ENTRIES: u32 = 262_144;
pub const TUPLES_MAX_ENTRIES: u32 = 262_144;
pub const UDP_ALLOW_MAX_ENTRIES: u32 = 4096;

pub const STAT_TCP_REDIRECTED: u32 = 0;
pub const STAT_DNS_REDIRECTED: u32 = 1;
pub const STAT_DENIED_NOT_READY: u32 = 2;
pub const STAT_DENIED_QUIC: u32 = 3;
pub const STAT_DENIED_UDP: u32 = 4;
pub const STAT_DENIED_NETNS: u32 = 5;
pub const STAT_DENIED_SOCKET: u32 = 6;
pub const STAT_DENIED_MAP_FULL: u32 = 7;
pub const STAT_DENIED_FAMILY: u32 = 8;
pub const STAT_FAST_PATH: u32 = 9;
pub const STAT_EVENTS_LOST: u32 = 10;
pub const STAT_COUNT: u32 = 11;

/// Names of the kernel programs, as the ELF object exports them.
pub mod prog {
    pub const CONNECT4: &str = "gw_connect4";
    pub const CONNECT6: &str = "gw_connect6";
    pub const SENDMSG4: &str = "gw_sendmsg4";
    pub const SENDMSG6: &str = "gw_sendmsg6";
    pub const RECVMSG4: &str = "gw_recvmsg4";
    pub const RECVMSG6: &str = "gw_recvmsg6";
    pub const GETPEERNAME4: &str = "gw_getpeername4";
    pub const GETPEERNAME6: &str = "gw_getpeername6";
    pub const SOCK_CREATE: &str = "gw_sock_create";
    pub const SOCK_RELEASE: &str = "gw_sock_release";
    pub const SOCK_OPS: &str = "gw_sock_ops";
    /// cgroup-scoped BPF LSM on `socket_create`: address families.
    pub const LSM_SOCKET_CREATE: &str = "gw_lsm_socket_create";
}

/// `Control::ready`: the daemon listens and may receive redirected traffic.
pub const READY: u32 = 1;
/// `Control::flags`: let sockets in other network namespaces through
/// (unredirected). Off by default: foreign namespaces are refused.
pub const FLAG_ALLOW_FOREIGN_NETNS: u32 = 1;

/// What the daemon tells the kernel programs. Lives in `MAP_CONTROL[0]`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Control {
    /// `READY` once the proxy listens; anything else refuses redirectable
    /// traffic (fail closed).
    pub ready: u32,
    /// `SO_MARK` the daemon puts on its own sockets; the hooks never touch a
    /// socket carrying it. Zero disables the check.
    pub mark: u32,
    /// The network namespace cookie of the daemon's namespace.
    pub netns_cookie: u64,
    /// TCP proxy port on 127.0.0.1 and ::1 (host order).
    pub proxy_port: u16,
    /// DNS forwarder port (UDP) on 127.0.0.1 and ::1 (host order).
    pub dns_port: u16,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// Protocol tags for `OrigDst::proto`.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The destination a process asked for, and who asked.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct OrigDst {
    /// Original destination address (network order words, v4 mapped).
    pub addr: [u32; 4],
    /// Original destination port (host order).
    pub port: u16,
    /// Address family of the socket: 2 (AF_INET) or 10 (AF_INET6).
    pub family: u16,
    /// Thread-group id (the pid users know) of the connecting process.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 id (the inode number of its directory).
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns` when the entry was written (janitor uses it).
    pub ktime_ns: u64,
    pub proto: u8,
    /// `SOCK_FAST`, `SOCK_CONNECTED`.
    pub flags: u8,
    pub _pad: u8,
    /// Fast-path sockets: bit `1 << state` for each TCP state entered.
    pub states: u16,
    pub _pad2: [u8; 2],
}

/// `OrigDst::flags`: the socket connected direct (fast path).
pub const SOCK_FAST: u8 = 1;
/// `OrigDst::flags`: sock_ops saw its SYN; its close will be reported.
pub const SOCK_CONNECTED: u8 = 2;

/// A flow the daemon allowed at L4: this exact cgroup to this address and
/// port. While an unexpired entry exists (and the daemon's listener is up),
/// connects of that flow go direct instead of through the proxy.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct FastKey {
    pub cgroup_id: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: [u8; 6],
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FastVal {
    /// `bpf_ktime_get_ns` after which the entry no longer applies.
    pub expires_ns: u64,
}

pub const EVENT_OPEN: u32 = 1;
pub const EVENT_CLOSE: u32 = 2;

/// What the kernel reports about a fast-path socket.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FastEvent {
    /// `EVENT_OPEN` or `EVENT_CLOSE`.
    pub kind: u32,
    /// TCP state before the transition (SYN_SENT = 2 on a failed connect).
    pub old_state: u32,
    pub cookie: u64,
    pub orig: OrigDst,
    /// `tcp_sock.bytes_acked`: sequence space the peer acknowledged
    /// (payload, plus one for the SYN and one for our FIN once acked).
    pub bytes_up: u64,
    /// `tcp_sock.bytes_received`: payload plus one for the peer's FIN.
    pub bytes_down: u64,
    pub ktime_ns: u64,
    /// The client socket's own address (v4 mapped) and port.
    pub local_addr: [u32; 4],
    pub local_port: u16,
    pub _pad: [u8; 6],
}

/// The loopback 4-tuple of a redirected TCP connection, as seen from the
/// client side. Unique among live connections in the namespace, so it cannot
/// collide however many connects race.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct TupleKey {
    pub client_addr: [u32; 4],
    pub proxy_addr: [u32; 4],
    pub client_port: u16,
    pub proxy_port: u16,
}

/// A UDP destination allowed to go out direct. `port == 0` matches any port.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct UdpAllowKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// IPv4 address word (network order bytes) to the v4-mapped word array.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    // `::ffff:` as it sits in memory on a little-endian host.
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be]
}

/// Whether the word array is an IPv4-mapped IPv6 address.
#[inline(always)]
pub const fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` data with explicit padding, valid for any
    // bit pattern.
    unsafe impl aya::Pod for Control {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for UdpAllowKey {}
    unsafe impl aya::Pod for FastKey {}
    unsafe impl aya::Pod for FastVal {}
    unsafe impl aya::Pod for FastEvent {}
}
