//! Kernel side of the gateway: cgroup hooks that send every outbound socket
//! of a tagged cgroup to the userspace proxy, remember where it really
//! wanted to go, and refuse what must never leave (QUIC, non-DNS UDP, raw
//! sockets, foreign network namespaces).
//!
//! Every program is a thin entry calling a `try_…` body. A cgroup hook's
//! return value is the verdict: 1 lets the syscall proceed, 0 fails it
//! (EPERM unless `bpf_set_retval` chose another errno).
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_addr, bpf_sock_tuple},
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
        bpf_sk_lookup_tcp, bpf_sk_release, bpf_sock_ops_cb_flags_set,
    },
    macros::{cgroup_sock, cgroup_sock_addr, lsm_cgroup, map, sock_ops},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{LsmContext, SockAddrContext, SockContext, SockOpsContext},
};
use gateway_common::{
    Control, EVENT_CLOSE, EVENT_OPEN, EVENTS_BYTES, FAST_MAX_ENTRIES, FAST_SOCKS_MAX_ENTRIES,
    FLAG_ALLOW_FOREIGN_NETNS, FastEvent, FastKey, FastVal, OrigDst, PROTO_TCP, PROTO_UDP, READY,
    SOCK_CONNECTED, SOCK_FAST, SOCKS_MAX_ENTRIES, STAT_COUNT, STAT_DENIED_FAMILY,
    STAT_DENIED_MAP_FULL, STAT_DENIED_NETNS, STAT_DENIED_NOT_READY, STAT_DENIED_QUIC,
    STAT_DENIED_SOCKET, STAT_DENIED_UDP, STAT_DNS_REDIRECTED, STAT_EVENTS_LOST, STAT_FAST_PATH,
    STAT_TCP_REDIRECTED, TUPLES_MAX_ENTRIES, TupleKey, UDP_ALLOW_MAX_ENTRIES, UdpAllowKey,
    is_v4_mapped, v4_mapped,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const ECONNREFUSED: i32 = 111;
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;

/// 127.0.0.1 as `user_ip4` loads it (network order bytes in memory).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 as four words.
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

#[map(name = "GW_SOCKS")]
static SOCKS: HashMap<u64, OrigDst> = HashMap::pinned(SOCKS_MAX_ENTRIES, 0);

#[map(name = "GW_TUPLES")]
static TUPLES: HashMap<TupleKey, OrigDst> = HashMap::pinned(TUPLES_MAX_ENTRIES, 0);

#[map(name = "GW_CONTROL")]
static CONTROL: Array<Control> = Array::pinned(1, 0);

#[map(name = "GW_UDP_ALLOW")]
static UDP_ALLOW: HashMap<UdpAllowKey, u32> = HashMap::pinned(UDP_ALLOW_MAX_ENTRIES, 0);

#[map(name = "GW_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

#[map(name = "GW_FAST")]
static FAST: HashMap<FastKey, FastVal> = HashMap::pinned(FAST_MAX_ENTRIES, 0);

#[map(name = "GW_FAST_SOCKS")]
static FAST_SOCKS: HashMap<u64, OrigDst> = HashMap::pinned(FAST_SOCKS_MAX_ENTRIES, 0);

#[map(name = "GW_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
const BPF_TCP_ESTABLISHED: u32 = 1;
const BPF_TCP_CLOSE: u32 = 7;

#[inline(always)]
fn count(stat: u32) {
    if let Some(p) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn control() -> Option<Control> {
    CONTROL.get(0).copied()
}

/// Refuse with ECONNREFUSED (what a connect to a closed port gives), so a
/// client fails fast instead of waiting out a timeout.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: helper call, no pointers.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// Which of the two sides of a `bpf_sock_addr` hook we are in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// Reads the destination from the context as a v4-mapped-normalised address.
#[inline(always)]
unsafe fn user_addr(sa: *mut bpf_sock_addr, fam: Family) -> ([u32; 4], u16) {
    unsafe {
        // `user_port` must be read with a full 32-bit load; it holds the
        // port in network order in its low 16 bits.
        let port = u16::from_be(read_volatile(&raw const (*sa).user_port) as u16);
        // Only the hook's own family's fields may be read at all.
        let addr = match fam {
            Family::V4 => v4_mapped(read_volatile(&raw const (*sa).user_ip4)),
            Family::V6 => [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
        };
        (addr, port)
    }
}

/// Writes a destination back, keeping the socket's family (an IPv4-mapped
/// address stays mapped on an IPv6 socket). Four 32-bit stores for IPv6.
#[inline(always)]
unsafe fn set_user_addr(sa: *mut bpf_sock_addr, fam: Family, addr: &[u32; 4], port: u16) {
    unsafe {
        match fam {
            Family::V4 => (*sa).user_ip4 = addr[3],
            Family::V6 => {
                (*sa).user_ip6[0] = addr[0];
                (*sa).user_ip6[1] = addr[1];
                (*sa).user_ip6[2] = addr[2];
                (*sa).user_ip6[3] = addr[3];
            }
        }
        (*sa).user_port = u32::from(port.to_be());
    }
}

/// The loopback address of the gateway that matches the original address's
/// kind: 127.0.0.1 (mapped) for IPv4 and IPv4-mapped, ::1 for native IPv6.
#[inline(always)]
fn gateway_addr(orig: &[u32; 4]) -> [u32; 4] {
    if is_v4_mapped(orig) {
        v4_mapped(LOOPBACK4)
    } else {
        LOOPBACK6
    }
}

#[inline(always)]
fn is_gateway_addr(addr: &[u32; 4]) -> bool {
    (is_v4_mapped(addr) && addr[3] == LOOPBACK4)
        || (addr[0] == LOOPBACK6[0]
            && addr[1] == LOOPBACK6[1]
            && addr[2] == LOOPBACK6[2]
            && addr[3] == LOOPBACK6[3])
}

/// Whether the socket behind the hook belongs to the gateway itself.
#[inline(always)]
unsafe fn is_own_socket(sa: *mut bpf_sock_addr, ctl: &Control) -> bool {
    if ctl.mark == 0 {
        return false;
    }
    unsafe {
        let sk: *mut bpf_sock = (*sa).__bindgen_anon_1.sk;
        !sk.is_null() && (*sk).mark == ctl.mark
    }
}

#[inline(always)]
fn in_foreign_netns<C: EbpfContext>(ctx: &C, ctl: &Control) -> bool {
    if ctl.flags & FLAG_ALLOW_FOREIGN_NETNS != 0 {
        return false;
    }
    // SAFETY: helper takes the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    cookie != ctl.netns_cookie
}

/// Who is asking for what: the record filed for a socket, keyed by its
/// cookie (returned alongside).
#[inline(always)]
fn new_record<C: EbpfContext>(
    ctx: &C,
    addr: [u32; 4],
    port: u16,
    fam: Family,
    proto: u8,
    flags: u8,
) -> (u64, OrigDst) {
    // SAFETY: helpers without pointer arguments, or the program's context.
    let (cookie, pid_tgid, uid_gid, cgroup_id, now) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_pid_tgid(),
            bpf_get_current_uid_gid(),
            bpf_get_current_cgroup_id(),
            bpf_ktime_get_ns(),
        )
    };
    let entry = OrigDst {
        addr,
        port,
        family: if fam == Family::V4 {
            AF_INET as u16
        } else {
            AF_INET6 as u16
        },
        pid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        cgroup_id,
        ktime_ns: now,
        proto,
        flags,
        _pad: 0,
        states: 0,
        _pad2: [0; 2],
    };
    (cookie, entry)
}

/// Records who asked for what under the socket's cookie.
#[inline(always)]
fn record<C: EbpfContext>(ctx: &C, addr: [u32; 4], port: u16, fam: Family, proto: u8) -> bool {
    let (cookie, entry) = new_record(ctx, addr, port, fam, proto, 0);
    SOCKS.insert(&cookie, &entry, 0).is_ok()
}

/// Shared body of connect4/connect6.
#[inline(always)]
fn try_connect(ctx: &SockAddrContext, fam: Family) -> i32 {
    let sa = ctx.sock_addr;
    let Some(ctl) = control() else {
        return refuse();
    };
    // SAFETY: `sa` is the kernel-provided context for this hook.
    if unsafe { is_own_socket(sa, &ctl) } {
        return ALLOW;
    }
    if in_foreign_netns(ctx, &ctl) {
        count(STAT_DENIED_NETNS);
        return DENY;
    }
    // SAFETY: as above.
    let (sock_type, (addr, port)) = unsafe { ((*sa).type_, user_addr(sa, fam)) };
    match sock_type {
        SOCK_STREAM => {
            if fast_path(ctx, &ctl, fam, addr, port) {
                count(STAT_FAST_PATH);
                return ALLOW;
            }
            redirect(ctx, &ctl, fam, addr, port, PROTO_TCP, ctl.proxy_port)
        }
        SOCK_DGRAM => udp(ctx, &ctl, fam, addr, port),
        _ => {
            count(STAT_DENIED_SOCKET);
            DENY
        }
    }
}

/// Whether the daemon's proxy listener is up in this namespace: a bound
/// listening socket on 127.0.0.1:proxy_port carrying the daemon's mark.
/// The kernel closes it the instant the daemon dies, so a fast path can
/// never outlive the daemon.
#[inline(always)]
fn daemon_listening<C: EbpfContext>(ctx: &C, ctl: &Control) -> bool {
    // SAFETY: zeroed plain-data tuple, filled below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.daddr = LOOPBACK4;
    tuple.__bindgen_anon_1.ipv4.dport = ctl.proxy_port.to_be();
    // SAFETY: helper with a stack tuple of the ipv4 size; the returned
    // reference is released on every path.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            core::mem::size_of::<[u32; 2]>() as u32 + 4,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        let ours = (*sk).mark == ctl.mark;
        bpf_sk_release(sk.cast());
        ours
    }
}

/// The fast path: a flow the daemon already allowed (this exact cgroup, to
/// this address and port, not expired) connects direct while the daemon is
/// up. Its open and close are still reported for the audit (sock_ops).
#[inline(always)]
fn fast_path(ctx: &SockAddrContext, ctl: &Control, fam: Family, addr: [u32; 4], port: u16) -> bool {
    if ctl.ready != READY {
        return false;
    }
    // SAFETY: helpers without pointer arguments.
    let (cgroup_id, now) = unsafe { (bpf_get_current_cgroup_id(), bpf_ktime_get_ns()) };
    let key = FastKey {
        cgroup_id,
        addr,
        port,
        _pad: [0; 6],
    };
    let Some(val) = FAST.get_ptr(&key) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup.
    if unsafe { (*val).expires_ns } <= now || !daemon_listening(ctx, ctl) {
        return false;
    }
    let (cookie, entry) = new_record(ctx, addr, port, fam, PROTO_TCP, SOCK_FAST);
    // No room to track it for the audit: take the proxy instead.
    FAST_SOCKS.insert(&cookie, &entry, 0).is_ok()
}

/// Rewrites the destination to the gateway's listener after recording the
/// original. Idempotent: a destination that already is the gateway and has a
/// record is left alone (two program generations run in turn during an
/// upgrade).
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    ctl: &Control,
    fam: Family,
    addr: [u32; 4],
    port: u16,
    proto: u8,
    to_port: u16,
) -> i32 {
    if ctl.ready != READY || to_port == 0 {
        count(STAT_DENIED_NOT_READY);
        return refuse();
    }
    if port == to_port && is_gateway_addr(&addr) {
        // SAFETY: helper takes the program's context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if SOCKS.get_ptr(&cookie).is_some() {
            return ALLOW;
        }
    }
    if !record(ctx, addr, port, fam, proto) {
        count(STAT_DENIED_MAP_FULL);
        return refuse();
    }
    let gw = gateway_addr(&addr);
    // SAFETY: kernel-provided context; IPv6 written as four 32-bit stores.
    unsafe { set_user_addr(ctx.sock_addr, fam, &gw, to_port) };
    count(if proto == PROTO_TCP {
        STAT_TCP_REDIRECTED
    } else {
        STAT_DNS_REDIRECTED
    });
    ALLOW
}

/// UDP: DNS goes to the forwarder, QUIC is refused at once so browsers fall
/// back to TCP, anything else only to destinations the config allows.
#[inline(always)]
fn udp(ctx: &SockAddrContext, ctl: &Control, fam: Family, addr: [u32; 4], port: u16) -> i32 {
    if port == 53 {
        return redirect(ctx, ctl, fam, addr, port, PROTO_UDP, ctl.dns_port);
    }
    if port == 443 {
        count(STAT_DENIED_QUIC);
        return DENY;
    }
    // Already pointed at the forwarder by an earlier connect.
    if port == ctl.dns_port && is_gateway_addr(&addr) {
        return ALLOW;
    }
    let exact = UdpAllowKey {
        addr,
        port,
        _pad: 0,
    };
    let any_port = UdpAllowKey {
        addr,
        port: 0,
        _pad: 0,
    };
    if UDP_ALLOW.get_ptr(&exact).is_some() || UDP_ALLOW.get_ptr(&any_port).is_some() {
        return ALLOW;
    }
    count(STAT_DENIED_UDP);
    DENY
}

/// Unconnected UDP (`sendto`): the same rules as a UDP connect.
#[inline(always)]
fn try_sendmsg(ctx: &SockAddrContext, fam: Family) -> i32 {
    let sa = ctx.sock_addr;
    let Some(ctl) = control() else {
        return DENY;
    };
    // SAFETY: kernel-provided context.
    if unsafe { is_own_socket(sa, &ctl) } {
        return ALLOW;
    }
    if in_foreign_netns(ctx, &ctl) {
        count(STAT_DENIED_NETNS);
        return DENY;
    }
    // SAFETY: as above.
    let (addr, port) = unsafe { user_addr(sa, fam) };
    udp(ctx, &ctl, fam, addr, port)
}

/// Puts the original peer back where the kernel reports the gateway's own
/// address: the source of a DNS reply (recvmsg) or a TCP peer (getpeername).
#[inline(always)]
fn try_restore(ctx: &SockAddrContext, fam: Family, udp: bool) -> i32 {
    let sa = ctx.sock_addr;
    let Some(ctl) = control() else {
        return ALLOW;
    };
    // SAFETY: kernel-provided context.
    let (addr, port) = unsafe { user_addr(sa, fam) };
    let gw_port = if udp { ctl.dns_port } else { ctl.proxy_port };
    if port != gw_port || !is_gateway_addr(&addr) {
        return ALLOW;
    }
    // SAFETY: helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = SOCKS.get_ptr(&cookie) {
        // SAFETY: pointer from a successful map lookup.
        let orig = unsafe { *orig };
        // An IPv4 socket can only show an IPv4 address; a record made by the
        // other family cannot be for this socket.
        if fam == Family::V4 && !is_v4_mapped(&orig.addr) {
            return ALLOW;
        }
        // SAFETY: kernel-provided context.
        unsafe { set_user_addr(sa, fam, &orig.addr, orig.port) };
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn gw_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, Family::V4)
}

#[cgroup_sock_addr(connect6)]
pub fn gw_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, Family::V6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn gw_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sendmsg(&ctx, Family::V4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn gw_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sendmsg(&ctx, Family::V6)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn gw_recvmsg4(ctx: SockAddrContext) -> i32 {
    try_restore(&ctx, Family::V4, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn gw_recvmsg6(ctx: SockAddrContext) -> i32 {
    try_restore(&ctx, Family::V6, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn gw_getpeername4(ctx: SockAddrContext) -> i32 {
    try_restore(&ctx, Family::V4, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn gw_getpeername6(ctx: SockAddrContext) -> i32 {
    try_restore(&ctx, Family::V6, false)
}

/// Socket creation: only TCP and UDP inet sockets, and only in the gateway's
/// network namespace. Raw, ICMP ("ping"), SCTP, MPTCP and the like are
/// refused, so nothing bypasses the connect hooks.
#[cgroup_sock(sock_create)]
pub fn gw_sock_create(ctx: SockContext) -> i32 {
    try_sock_create(&ctx)
}

#[inline(always)]
fn try_sock_create(ctx: &SockContext) -> i32 {
    // SAFETY: kernel-provided context.
    let (family, sock_type, protocol) =
        unsafe { ((*ctx.sock).family, (*ctx.sock).type_, (*ctx.sock).protocol) };
    if family != AF_INET && family != AF_INET6 {
        return ALLOW;
    }
    let ok = match sock_type {
        SOCK_STREAM => protocol == IPPROTO_TCP,
        SOCK_DGRAM => protocol == IPPROTO_UDP,
        SOCK_RAW => false,
        _ => false,
    };
    if !ok {
        count(STAT_DENIED_SOCKET);
        return DENY;
    }
    if let Some(ctl) = control()
        && in_foreign_netns(ctx, &ctl)
    {
        count(STAT_DENIED_NETNS);
        return DENY;
    }
    ALLOW
}

/// Every socket family other than Unix, IPv4, IPv6 and netlink is refused
/// to tagged processes: packet sockets (raw frames), vsock (to a
/// hypervisor), XDP, CAN, Bluetooth and the rest would all bypass the inet
/// hooks. Sockets the kernel creates for itself are left alone.
#[lsm_cgroup(hook = "socket_create")]
pub fn gw_lsm_socket_create(ctx: LsmContext) -> i32 {
    const AF_UNIX: i32 = 1;
    const AF_NETLINK: i32 = 16;
    // socket_create(int family, int type, int protocol, int kern)
    let (family, kern): (i32, i32) = (ctx.arg(0), ctx.arg(3));
    if kern != 0 {
        return ALLOW;
    }
    match family {
        AF_UNIX | AF_NETLINK => ALLOW,
        f if f == AF_INET as i32 || f == AF_INET6 as i32 => ALLOW,
        _ => {
            count(STAT_DENIED_FAMILY);
            DENY
        }
    }
}

/// Socket release: forget its record (the map is not LRU, so nothing live
/// is ever evicted; this is what keeps it from filling).
#[cgroup_sock(sock_release)]
pub fn gw_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCKS.remove(&cookie);
    // A fast-path socket whose SYN never went out will never report a
    // close; one that connected is removed when its close is reported.
    if let Some(f) = FAST_SOCKS.get_ptr(&cookie) {
        // SAFETY: pointer from a successful lookup.
        if unsafe { (*f).flags } & SOCK_CONNECTED == 0 {
            let _ = FAST_SOCKS.remove(&cookie);
        }
    }
    ALLOW
}

/// When a redirected TCP connect sends its SYN the 4-tuple is known: file
/// the record under it, which is what the proxy sees after `accept`.
#[sock_ops]
pub fn gw_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if !fast_connect_cb(&ctx) {
                try_connect_cb(&ctx);
            }
        }
        BPF_SOCK_OPS_STATE_CB => fast_state_cb(&ctx),
        _ => {}
    }
    1
}

/// A fast-path socket sends its SYN: ask for state changes, to report its
/// establishment and close.
#[inline(always)]
fn fast_connect_cb(ctx: &SockOpsContext) -> bool {
    // SAFETY: helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(f) = FAST_SOCKS.get_ptr_mut(&cookie) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup; helper on our context.
    unsafe {
        (*f).flags |= SOCK_CONNECTED;
        bpf_sock_ops_cb_flags_set(ctx.ops, BPF_SOCK_OPS_STATE_CB_FLAG);
    }
    true
}

#[inline(always)]
fn fast_state_cb(ctx: &SockOpsContext) {
    let new_state = ctx.arg(1);
    // SAFETY: helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(f) = FAST_SOCKS.get_ptr_mut(&cookie) else {
        return;
    };
    // Which states it went through tells userspace which of SYN and FINs
    // the byte counters include.
    if new_state < 16 {
        // SAFETY: pointer from a successful lookup.
        unsafe { (*f).states |= 1u16 << new_state };
    }
    if new_state != BPF_TCP_ESTABLISHED && new_state != BPF_TCP_CLOSE {
        return;
    }
    let ops = ctx.ops;
    // SAFETY: pointer from a successful lookup; plain context loads, each
    // volatile and unconditional (see try_connect_cb).
    let (orig, up, down, now, family, local4, local6, local_port) = unsafe {
        (
            *f,
            read_volatile(&raw const (*ops).bytes_acked),
            read_volatile(&raw const (*ops).bytes_received),
            bpf_ktime_get_ns(),
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            read_volatile(&raw const (*ops).local_port),
        )
    };
    // A v4-mapped socket keeps its IPv4 fields; a native one its IPv6.
    let local_addr = if family == AF_INET || is_v4_mapped(&orig.addr) {
        v4_mapped(local4)
    } else {
        local6
    };
    let ev = FastEvent {
        kind: if new_state == BPF_TCP_CLOSE {
            EVENT_CLOSE
        } else {
            EVENT_OPEN
        },
        old_state: ctx.arg(0),
        cookie,
        orig,
        bytes_up: up,
        bytes_down: down,
        ktime_ns: now,
        local_addr,
        local_port: local_port as u16,
        _pad: [0; 6],
    };
    if EVENTS.output::<FastEvent>(&ev, 0).is_err() {
        count(STAT_EVENTS_LOST);
    }
    if new_state == BPF_TCP_CLOSE {
        let _ = FAST_SOCKS.remove(&cookie);
    }
}

#[inline(always)]
fn try_connect_cb(ctx: &SockOpsContext) {
    // SAFETY: helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = SOCKS.get_ptr(&cookie) else {
        return;
    };
    // SAFETY: pointer from a successful map lookup.
    let orig = unsafe { *orig };
    if orig.proto != PROTO_TCP {
        return;
    }
    let Some(ctl) = control() else {
        return;
    };
    // Every context field with its own volatile load, before any branch:
    // otherwise LLVM selects between field *pointers*, which the verifier
    // rejects ("dereference of modified ctx ptr").
    let ops = ctx.ops;
    // SAFETY: kernel-provided context; each read is a plain field load.
    let (remote4, local4, remote6, local6, local_port) = unsafe {
        (
            read_volatile(&raw const (*ops).remote_ip4),
            read_volatile(&raw const (*ops).local_ip4),
            [
                read_volatile(&raw const (*ops).remote_ip6[0]),
                read_volatile(&raw const (*ops).remote_ip6[1]),
                read_volatile(&raw const (*ops).remote_ip6[2]),
                read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            read_volatile(&raw const (*ops).local_port),
        )
    };
    // An IPv4 or IPv4-mapped socket has its IPv4 fields set; a native IPv6
    // socket carries 127.0.0.6 there, never 127.0.0.1.
    let (client_addr, proxy_addr) = if remote4 == LOOPBACK4 {
        (v4_mapped(local4), v4_mapped(LOOPBACK4))
    } else {
        (local6, remote6)
    };
    let key = TupleKey {
        client_addr,
        proxy_addr,
        client_port: local_port as u16,
        proxy_port: ctl.proxy_port,
    };
    let _ = TUPLES.insert(&key, &orig, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
