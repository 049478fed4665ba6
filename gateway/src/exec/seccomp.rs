//! A seccomp filter for commands started by `gateway exec`: `socket()` and
//! `socketpair()` only for Unix, IPv4, IPv6 and netlink. Packet, vsock,
//! XDP and other families would bypass the inet cgroup hooks; the kernel's
//! cgroup-scoped BPF LSM could refuse them too, but is not available on
//! every kernel, so this covers what `gateway exec` starts everywhere.

use std::io;

// From <linux/filter.h>, <linux/seccomp.h>, <linux/audit.h>.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LO: u32 = 16;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

const ALLOWED_FAMILIES: [u32; 4] = [
    libc::AF_UNIX as u32,
    libc::AF_INET as u32,
    libc::AF_INET6 as u32,
    libc::AF_NETLINK as u32,
];

const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: BPF_JMP_JEQ_K,
        jt,
        jf,
        k,
    }
}

/// The filter program. Built before fork: `install` runs between fork and
/// exec, where only async-signal-safe calls are allowed.
pub fn program() -> Vec<libc::sock_filter> {
    let n = ALLOWED_FAMILIES.len() as u8;
    let mut p = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jeq(AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
        jeq(libc::SYS_socket as u32, 1, 0),
        // Neither socket call: skip the family tests and the EPERM return.
        jeq(libc::SYS_socketpair as u32, 0, n + 2),
        stmt(BPF_LD_W_ABS, OFF_ARG0_LO),
    ];
    // Each family test jumps to ALLOW on a match; falling through = EPERM.
    for (i, fam) in ALLOWED_FAMILIES.iter().enumerate() {
        p.push(jeq(*fam, n - i as u8, 0));
    }
    p.push(stmt(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32));
    p.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
    p
}

/// Installs `prog` on the calling thread (with no_new_privs, which seccomp
/// requires of unprivileged callers and which also stops setuid escalation).
///
/// # Safety
/// Async-signal-safe: only two prctl calls on memory prepared before fork.
pub unsafe fn install(prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl calls; `fprog` points at live memory.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &raw const fprog,
            0,
            0,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the instructions `program` uses.
    fn run(p: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let mut pc = 0usize;
        let mut acc = 0u32;
        loop {
            let i = p[pc];
            match i.code {
                BPF_LD_W_ABS => {
                    acc = match i.k {
                        OFF_NR => nr,
                        OFF_ARCH => arch,
                        OFF_ARG0_LO => arg0,
                        _ => panic!("unexpected load"),
                    };
                    pc += 1;
                }
                BPF_JMP_JEQ_K => pc += 1 + usize::from(if acc == i.k { i.jt } else { i.jf }),
                BPF_RET_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn only_socket_families_are_filtered() {
        let p = program();
        let eperm = SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let sock = libc::SYS_socket as u32;
        let pair = libc::SYS_socketpair as u32;
        assert_eq!(
            run(&p, AUDIT_ARCH, libc::SYS_execve as u32, 17),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&p, AUDIT_ARCH, libc::SYS_mmap as u32, 0),
            SECCOMP_RET_ALLOW
        );
        for fam in ALLOWED_FAMILIES {
            assert_eq!(run(&p, AUDIT_ARCH, sock, fam), SECCOMP_RET_ALLOW, "{fam}");
            assert_eq!(run(&p, AUDIT_ARCH, pair, fam), SECCOMP_RET_ALLOW, "{fam}");
        }
        for fam in [libc::AF_PACKET, libc::AF_VSOCK, libc::AF_XDP, libc::AF_CAN] {
            assert_eq!(run(&p, AUDIT_ARCH, sock, fam as u32), eperm, "{fam}");
        }
        assert_eq!(
            run(&p, 0x4000_0003, sock, 2),
            SECCOMP_RET_KILL_PROCESS,
            "foreign arch"
        );
    }
}
