//! `TestNet`: a network namespace joined to the host by a veth pair, where
//! the tests run their origin servers. The host side is `10.a.b.1/30` and
//! `fd67:7774:a:b::1/64`; the namespace side `.2` / `::2`.
//!
//! The `a.b` slot is claimed with an `flock` on a per-slot file, so tests
//! running concurrently in one process or in several processes never pick
//! the same subnet; a slot whose addresses are still on a host interface
//! (a crashed run's leftover) is skipped.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const LOCK_DIR: &str = "/run/gateway-tests/net-slots";
/// Slots cover 10.64.0.0 .. 10.127.255.0 (one /30 used per /24).
const SLOT_BASE: u32 = 64 << 8;
const SLOTS: u32 = 64 << 8;

#[derive(Debug)]
pub struct TestNet {
    name: String,
    a: u8,
    b: u8,
    host_if: String,
    ns_if: String,
    /// `/run/netns/<name>`, kept open for `setns` in spawned children.
    ns_file: File,
    /// Holds the slot for as long as this value lives.
    _slot_lock: File,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn host_addresses() -> String {
    Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Claim a free `a.b` slot: lock its file without blocking, then check no
/// host interface already carries that subnet.
fn claim_slot() -> (u8, u8, File) {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    std::fs::create_dir_all(LOCK_DIR).expect("create slot lock dir");
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Start where this process and counter point, so concurrent processes
    // rarely even contend for the same lock.
    let start = std::process::id()
        .wrapping_mul(977)
        .wrapping_add(n.wrapping_mul(131));
    for i in 0..SLOTS {
        let slot = SLOT_BASE + (start.wrapping_add(i) % SLOTS);
        let (a, b) = ((slot >> 8) as u8, slot as u8);
        let path = PathBuf::from(LOCK_DIR).join(format!("{a}.{b}"));
        let Ok(f) = File::options().create(true).append(true).open(&path) else {
            continue;
        };
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        let addrs = host_addresses();
        if addrs.contains(&format!(" 10.{a}.{b}.")) || addrs.contains(&v6_prefix(a, b)) {
            continue;
        }
        return (a, b, f);
    }
    panic!("no free 10.64-127.x.0/30 test subnet slot");
}

fn v6_prefix(a: u8, b: u8) -> String {
    format!("fd67:7774:{a:x}:{b:x}::")
}

impl TestNet {
    pub fn new() -> TestNet {
        crate::require_root();
        let (a, b, lock) = claim_slot();
        let name = crate::unique(crate::PREFIX);
        // Interface names are limited to 15 bytes: "gw" + slot + nonce + side.
        let nonce: u16 = rand::random();
        let host_if = format!("gw{a:02x}{b:02x}{nonce:04x}h");
        let ns_if = format!("gw{a:02x}{b:02x}{nonce:04x}n");
        run(&["ip", "netns", "add", &name]).unwrap_or_else(|e| panic!("{e}"));
        let ns_file = File::open(format!("/run/netns/{name}"))
            .unwrap_or_else(|e| panic!("open /run/netns/{name}: {e}"));
        let net = TestNet {
            name,
            a,
            b,
            host_if,
            ns_if,
            ns_file,
            _slot_lock: lock,
        };
        net.setup()
            .unwrap_or_else(|e| panic!("setting up test netns {}: {e}", net.name));
        net
    }

    fn setup(&self) -> Result<(), String> {
        let (n, h, i) = (&self.name, &self.host_if, &self.ns_if);
        let h4 = format!("{}/30", self.host_v4());
        let n4 = format!("{}/30", self.ns_v4());
        let h6 = format!("{}/64", self.host_v6());
        let n6 = format!("{}/64", self.ns_v6());
        run(&[
            "ip", "link", "add", h, "type", "veth", "peer", "name", i, "netns", n,
        ])?;
        run(&["ip", "addr", "add", &h4, "dev", h])?;
        run(&["ip", "-6", "addr", "add", &h6, "dev", h, "nodad"])?;
        run(&["ip", "link", "set", h, "up"])?;
        run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", n, "addr", "add", &n4, "dev", i])?;
        run(&["ip", "-n", n, "-6", "addr", "add", &n6, "dev", i, "nodad"])?;
        run(&["ip", "-n", n, "link", "set", i, "up"])?;
        Ok(())
    }

    /// The namespace's name (`ip netns` name).
    /// Chromium takes any address change on the host for a network change
    /// and aborts what it is loading (`ERR_NETWORK_CHANGED`). A new veth's
    /// IPv6 link-local address arrives about a second after the link comes
    /// up, once duplicate address detection is done: tests that start a
    /// browser wait for it first.
    pub fn wait_link_local(&self) {
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let with_global = ip(&[
            "-o",
            "-6",
            "addr",
            "show",
            "to",
            &format!("{}/128", self.host_v6()),
        ]);
        let dev = with_global
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("no interface has {}: {with_global}", self.host_v6()))
            .to_owned();
        let conf = |key: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{dev}/{key}"))
                .unwrap_or_default()
        };
        // No link-local address will come.
        if conf("disable_ipv6").trim() == "1" || conf("addr_gen_mode").trim() == "1" {
            return;
        }
        let settled = crate::poll(std::time::Duration::from_secs(10), || {
            let link = ip(&["-o", "-6", "addr", "show", "dev", &dev, "scope", "link"]);
            (link.contains("fe80") && !link.contains("tentative")).then_some(())
        });
        assert!(
            settled.is_some(),
            "{dev} got no settled IPv6 link-local address: {}",
            ip(&["-6", "addr", "show", "dev", &dev])
        );
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    pub fn host_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.a, self.b, 1)
    }

    pub fn ns_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.a, self.b, 2)
    }

    pub fn host_v6(&self) -> Ipv6Addr {
        format!("{}1", v6_prefix(self.a, self.b)).parse().unwrap()
    }

    pub fn ns_v6(&self) -> Ipv6Addr {
        format!("{}2", v6_prefix(self.a, self.b)).parse().unwrap()
    }

    /// `ip -n <ns> <args>`: change the namespace's links, addresses, routes.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Spawn `cmd` inside the namespace (the child `setns`es before exec).
    pub fn spawn_in_ns(&self, mut cmd: Command) -> Child {
        let fd = self.ns_file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; `fd` stays open in the parent
        // (owned by self) until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawn {:?} in netns {}: {e}", cmd.get_program(), self.name))
    }
}

impl Default for TestNet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting the host end removes the pair even if some process still
        // holds the namespace alive.
        let _ = run(&["ip", "link", "del", &self.host_if]);
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            eprintln!("gateway-tests: {e}");
        }
    }
}
