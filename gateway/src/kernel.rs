//! The kernel programs from userspace: load the embedded object, attach it
//! to the configured cgroups through bpf links pinned in bpffs (so
//! enforcement outlives the daemon), adopt those pins after a restart, and
//! read and write the shared maps.
//!
//! Pin layout under `<pin_dir>/v<ABI>/`:
//! - `maps/GW_*`: the maps, shared by every generation of the programs;
//! - `links/<cgroup id>/<program>@<object hash>`: one link per hook;
//! - `progs/<program>@<object hash>`.
//!
//! A daemon whose object hash matches the pinned links adopts them as they
//! are. A different build attaches its own links first and only then unpins
//! the old generation, so there is no moment without enforcement.

mod raw;

use std::{
    collections::HashSet,
    ffi::CString,
    fs, io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, links::FdLink},
};
use gateway_common::{
    ABI_VERSION, Control, FastKey, FastVal, MAP_CONTROL, MAP_EVENTS, MAP_FAST, MAP_SOCKS,
    MAP_STATS, MAP_TUPLES, MAP_UDP_ALLOW, OrigDst, STAT_COUNT, TupleKey, UdpAllowKey, prog,
};

pub use raw::RawMap;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf.o"));

/// Every hook, by program name, in attach order. The LSM hook is optional
/// (kernels without BPF LSM in their `lsm=` list cannot load it): the inet
/// hooks still refuse raw inet sockets there.
const HOOKS: [&str; 12] = [
    prog::LSM_SOCKET_CREATE,
    prog::SOCK_CREATE,
    prog::SOCK_RELEASE,
    prog::SOCK_OPS,
    prog::GETPEERNAME4,
    prog::GETPEERNAME6,
    prog::RECVMSG4,
    prog::RECVMSG6,
    prog::SENDMSG4,
    prog::SENDMSG6,
    prog::CONNECT4,
    prog::CONNECT6,
];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this gateway binary was built without its eBPF object; build with `cargo xtask build` (or `cargo xtask build-ebpf` before `cargo build`)"
    )]
    NoObject,
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinning {}: {reason}", path.display())]
    Pin { path: PathBuf, reason: String },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("cgroup {}: {source}", path.display())]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

/// Handles to the pinned maps. Cheap to share: the daemon reads them from
/// many tasks through plain syscalls.
#[derive(Debug)]
pub struct Maps {
    pub socks: RawMap,
    pub tuples: RawMap,
    pub control: RawMap,
    pub udp_allow: RawMap,
    pub stats: RawMap,
    pub fast: RawMap,
}

impl Maps {
    /// Takes the record of a redirected TCP connection (one syscall).
    pub fn take_tuple(&self, key: &TupleKey) -> Option<OrigDst> {
        self.tuples.lookup_and_delete(key)
    }

    pub fn sock(&self, cookie: u64) -> Option<OrigDst> {
        self.socks.lookup(&cookie)
    }

    pub fn set_control(&self, ctl: &Control) -> io::Result<()> {
        self.control.update(&0u32, ctl)
    }

    pub fn control(&self) -> Option<Control> {
        self.control.lookup(&0u32)
    }

    /// Replaces the UDP allow-list with `keys`.
    pub fn set_udp_allow(&self, keys: &[UdpAllowKey]) -> io::Result<()> {
        let wanted: HashSet<_> = keys.iter().collect();
        for old in self.udp_allow.keys::<UdpAllowKey>() {
            if !wanted.contains(&old) {
                let _ = self.udp_allow.delete(&old);
            }
        }
        for k in keys {
            self.udp_allow.update(k, &1u32)?;
        }
        Ok(())
    }

    /// Lets `key` connect direct until `expires_ns` (monotonic).
    pub fn allow_fast(&self, key: &FastKey, expires_ns: u64) -> io::Result<()> {
        self.fast.update(key, &FastVal { expires_ns })
    }

    /// Forgets every fast-path decision (policy or identities changed).
    pub fn clear_fast(&self) {
        for k in self.fast.keys::<FastKey>() {
            let _ = self.fast.delete(&k);
        }
    }

    /// Per-counter totals over all CPUs.
    pub fn stats(&self) -> Vec<u64> {
        (0..STAT_COUNT)
            .map(|i| self.stats.lookup_percpu_sum(&i))
            .collect()
    }

    /// Drops tuple records older than `max_age_ns` (connects whose SYN went
    /// out but which never reached `accept`).
    pub fn sweep_tuples(&self, now_ns: u64, max_age_ns: u64) -> usize {
        let mut removed = 0;
        for k in self.tuples.keys::<TupleKey>() {
            if let Some(v) = self.tuples.lookup::<TupleKey, OrigDst>(&k)
                && now_ns.saturating_sub(v.ktime_ns) > max_age_ns
                && self.tuples.delete(&k).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }
}

/// A cgroup enforcement is attached to.
#[derive(Debug, Clone)]
pub struct Attached {
    pub path: PathBuf,
    pub id: u64,
    /// Whether the links were adopted from an earlier daemon.
    pub adopted: bool,
    /// Whether the BPF LSM hook refusing non-inet socket families is
    /// attached (kernels that cannot load BPF LSM programs lack it).
    pub family_guard: bool,
}

fn versioned(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{ABI_VERSION}"))
}

/// Stable 64-bit FNV-1a of the embedded object: identifies a generation.
fn object_hash() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Mounts bpffs at /sys/fs/bpf when `pin_dir` is not on one already.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), KernelError> {
    let on_bpffs = crate::cgroup::mount_points("bpf")
        .map_err(|source| KernelError::Io {
            what: "reading /proc/self/mountinfo".into(),
            source,
        })?
        .iter()
        .any(|m| pin_dir.starts_with(m));
    if on_bpffs {
        return Ok(());
    }
    if !pin_dir.starts_with("/sys/fs/bpf") {
        return Err(KernelError::Bpffs(format!(
            "{} is not on a bpf filesystem; put pin_dir under /sys/fs/bpf or mount bpffs there",
            pin_dir.display()
        )));
    }
    let target = CString::new("/sys/fs/bpf").expect("no NUL");
    let fstype = CString::new("bpf").expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(KernelError::Bpffs(format!(
            "mounting bpffs at /sys/fs/bpf: {}",
            io::Error::last_os_error()
        )));
    }
    tracing::info!(
        event = "bpffs_mounted",
        path = "/sys/fs/bpf",
        "mounted bpffs"
    );
    Ok(())
}

/// Loads (or adopts) the programs, attaches them to every cgroup in
/// `cgroups`, and returns the pinned maps.
/// The ring buffer of fast-path socket events.
pub type Events = aya::maps::RingBuf<aya::maps::MapData>;

pub fn attach(
    pin_dir: &Path,
    cgroups: &[PathBuf],
) -> Result<(Maps, Events, Vec<Attached>), KernelError> {
    if OBJECT.is_empty() {
        return Err(KernelError::NoObject);
    }
    ensure_bpffs(pin_dir)?;
    let base = versioned(pin_dir);
    let maps_dir = base.join("maps");
    for d in [&maps_dir, &base.join("links"), &base.join("progs")] {
        fs::create_dir_all(d).map_err(|source| KernelError::Io {
            what: format!("creating {}", d.display()),
            source,
        })?;
    }
    let hash = object_hash();
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&maps_dir)
        .load(OBJECT)?;
    let maps = Maps {
        socks: take_map(&mut ebpf, MAP_SOCKS)?,
        tuples: take_map(&mut ebpf, MAP_TUPLES)?,
        control: take_map(&mut ebpf, MAP_CONTROL)?,
        udp_allow: take_map(&mut ebpf, MAP_UDP_ALLOW)?,
        stats: take_map(&mut ebpf, MAP_STATS)?,
        fast: take_map(&mut ebpf, MAP_FAST)?,
    };

    let mut loaded = false;
    let mut lsm_ok = true;
    let mut attached = Vec::new();
    for cg in cgroups {
        let dir = fs::File::open(cg).map_err(|source| KernelError::Cgroup {
            path: cg.clone(),
            source,
        })?;
        let id = crate::cgroup::id_of(cg).map_err(|source| KernelError::Cgroup {
            path: cg.clone(),
            source,
        })?;
        let link_dir = base.join("links").join(id.to_string());
        fs::create_dir_all(&link_dir).map_err(|source| KernelError::Io {
            what: format!("creating {}", link_dir.display()),
            source,
        })?;
        let mut adopted = true;
        for name in HOOKS {
            let pin = link_dir.join(format!("{name}@{hash}"));
            if pin.exists() {
                continue;
            }
            adopted = false;
            if !loaded {
                lsm_ok = load_all(&mut ebpf, &base.join("progs"), &hash)?;
                loaded = true;
            }
            if name == prog::LSM_SOCKET_CREATE && !lsm_ok {
                continue;
            }
            let link = attach_one(&mut ebpf, name, &dir)?;
            link.pin(&pin).map_err(|e| KernelError::Pin {
                path: pin.clone(),
                reason: e.to_string(),
            })?;
        }
        // Only now that this generation is attached, retire older ones.
        remove_other_generations(&link_dir, &hash);
        let family_guard = link_dir
            .join(format!("{}@{hash}", prog::LSM_SOCKET_CREATE))
            .exists();
        attached.push(Attached {
            path: cg.clone(),
            id,
            adopted,
            family_guard,
        });
    }
    if loaded {
        remove_other_generations(&base.join("progs"), &hash);
    }
    retire_other_abis(pin_dir);
    // Taken last: the programs were relocated against this map's fd.
    let events = ebpf
        .take_map(MAP_EVENTS)
        .ok_or(KernelError::MissingMap(MAP_EVENTS))?;
    let events = aya::maps::RingBuf::try_from(events).map_err(|e| KernelError::Io {
        what: format!("opening ring buffer {MAP_EVENTS}"),
        source: io::Error::other(e.to_string()),
    })?;
    Ok((maps, events, attached))
}

/// A duplicate fd of map `name`. The map stays in `ebpf`: programs loaded
/// later were relocated against its original fd, which must stay open.
fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<RawMap, KernelError> {
    let map = ebpf.map(name).ok_or(KernelError::MissingMap(name))?;
    let fd: OwnedFd = match map {
        aya::maps::Map::HashMap(d) | aya::maps::Map::Array(d) | aya::maps::Map::PerCpuArray(d) => d
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| KernelError::Io {
                what: format!("duplicating fd of map {name}"),
                source,
            })?,
        _ => return Err(KernelError::MissingMap(name)),
    };
    Ok(RawMap::new(name, fd))
}

/// Loads and pins every program. Returns whether the optional LSM program
/// loaded.
fn load_all(ebpf: &mut Ebpf, progs_dir: &Path, hash: &str) -> Result<bool, KernelError> {
    let mut lsm_ok = true;
    for name in HOOKS {
        let program = ebpf.program_mut(name).ok_or(KernelError::Program {
            name,
            source: aya::programs::ProgramError::NotLoaded,
        })?;
        let err = |source| KernelError::Program { name, source };
        let pin = progs_dir.join(format!("{name}@{hash}"));
        let _ = fs::remove_file(&pin);
        let pin_err = |e: aya::pin::PinError| KernelError::Pin {
            path: pin.clone(),
            reason: e.to_string(),
        };
        match program {
            aya::programs::Program::CgroupSockAddr(p) => {
                p.load().map_err(err)?;
                p.pin(&pin).map_err(pin_err)?;
            }
            aya::programs::Program::CgroupSock(p) => {
                p.load().map_err(err)?;
                p.pin(&pin).map_err(pin_err)?;
            }
            aya::programs::Program::SockOps(p) => {
                p.load().map_err(err)?;
                p.pin(&pin).map_err(pin_err)?;
            }
            aya::programs::Program::LsmCgroup(p) => {
                let loaded = aya::Btf::from_sys_fs()
                    .map_err(|e| e.to_string())
                    .and_then(|btf| p.load("socket_create", &btf).map_err(|e| e.to_string()));
                match loaded {
                    Ok(()) => p.pin(&pin).map_err(pin_err)?,
                    Err(e) => {
                        lsm_ok = false;
                        tracing::warn!(
                            program = name,
                            error = %e,
                            "this kernel cannot load BPF LSM programs (`bpf` missing from lsm=, or kernel lockdown); packet, vsock and other non-inet sockets of tagged processes are refused only for `gateway exec` (seccomp) and runner units with RestrictAddressFamilies="
                        );
                    }
                }
            }
            _ => return Err(err(aya::programs::ProgramError::NotLoaded)),
        }
    }
    Ok(lsm_ok)
}

fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
) -> Result<FdLink, KernelError> {
    let err = |source| KernelError::Program { name, source };
    let program = ebpf.program_mut(name).ok_or(KernelError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    // Links are multi-attach by nature; `Single` passes flags 0, which is
    // what bpf_link_create wants (pitfall 3 of the research notes).
    macro_rules! attach_cgroup_link {
        ($p:expr) => {{
            let id = $p.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
            FdLink::try_from($p.take_link(id).map_err(err)?).map_err(|e| KernelError::Pin {
                path: PathBuf::from(name),
                reason: e.to_string(),
            })?
        }};
    }
    let link: FdLink = match program {
        aya::programs::Program::CgroupSockAddr(p) => attach_cgroup_link!(p),
        aya::programs::Program::CgroupSock(p) => attach_cgroup_link!(p),
        aya::programs::Program::SockOps(p) => attach_cgroup_link!(p),
        aya::programs::Program::LsmCgroup(p) => {
            let id = p.attach(cgroup).map_err(err)?;
            p.take_link(id).map_err(err)?.into()
        }
        _ => return Err(err(aya::programs::ProgramError::NotLoaded)),
    };
    Ok(link)
}

fn remove_other_generations(dir: &Path, hash: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let suffix = format!("@{hash}");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains('@') && !name.ends_with(&suffix) {
            if let Err(err) = fs::remove_file(e.path()) {
                tracing::warn!(pin = %e.path().display(), %err, "could not unpin an old program generation");
            } else {
                tracing::info!(event = "unpinned_old_generation", pin = %e.path().display());
            }
        }
    }
}

/// Pins of an older (or newer) layout under `pin_dir/v<N>`: this
/// generation's links are attached by now, so the others can go.
fn retire_other_abis(pin_dir: &Path) {
    let current = format!("v{ABI_VERSION}");
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != current && name.starts_with('v') && name[1..].parse::<u32>().is_ok() {
            match detach(&e.path()) {
                Ok(pins) => {
                    tracing::info!(event = "retired_old_abi", dir = %e.path().display(), pins = pins.len())
                }
                Err(err) => {
                    tracing::warn!(dir = %e.path().display(), error = %err, "could not retire pins of another ABI")
                }
            }
        }
    }
}

/// Whether links of some generation are pinned for cgroup `id`: what
/// `gateway exec` checks before it runs anything.
pub fn enforced(pin_dir: &Path, cgroup_id: u64) -> bool {
    let dir = versioned(pin_dir).join("links").join(cgroup_id.to_string());
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    [prog::CONNECT4, prog::CONNECT6, prog::SOCK_CREATE]
        .iter()
        .all(|p| names.iter().any(|n| n.starts_with(&format!("{p}@"))))
}

/// Every pin under `pin_dir`, for `gateway status`.
pub fn pins(pin_dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(pin_dir, &mut out);
    out
}

/// Removes every pin under `pin_dir`: links (which ends enforcement), programs
/// and maps. The only way enforcement is removed.
pub fn detach(pin_dir: &Path) -> Result<Vec<PathBuf>, KernelError> {
    let pins = pins(pin_dir);
    // Links first: from here on the cgroups are no longer enforced.
    let (links, rest): (Vec<_>, Vec<_>) = pins
        .iter()
        .partition(|p| p.components().any(|c| c.as_os_str() == "links"));
    for p in &links {
        // Synchronous: when detach returns, the cgroup is no longer enforced.
        if let Err(e) = raw::detach_pinned_link(p) {
            tracing::warn!(pin = %p.display(), error = %e, "link detach failed; unpinning releases it shortly");
        }
    }
    for p in links.iter().chain(rest.iter()) {
        fs::remove_file(p).map_err(|source| KernelError::Io {
            what: format!("unpinning {}", p.display()),
            source,
        })?;
    }
    if pin_dir.exists() {
        remove_empty_dirs(pin_dir).map_err(|source| KernelError::Io {
            what: format!("removing {}", pin_dir.display()),
            source,
        })?;
    }
    Ok(pins)
}

fn remove_empty_dirs(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)?.flatten() {
        if e.file_type()?.is_dir() {
            remove_empty_dirs(&e.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// The network-namespace cookie of the calling process's namespace.
pub fn own_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for SO_NETNS_COOKIE (a u64).
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
