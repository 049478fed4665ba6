//! Map access through the `bpf(2)` syscall directly: aya 0.14 has no
//! lookup-and-delete, and the proxy wants exactly one syscall per accepted
//! connection with no lock around a typed map.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd, OwnedFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The `bpf_attr` layout used by the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// A map by fd. Keys and values must be `#[repr(C)]` plain data matching
/// the kernel program's definition.
#[derive(Debug)]
pub struct RawMap {
    name: &'static str,
    fd: OwnedFd,
}

impl RawMap {
    pub fn new(name: &'static str, fd: OwnedFd) -> Self {
        Self { name, fd }
    }

    fn call(&self, cmd: libc::c_long, key: u64, value: u64, flags: u64) -> io::Result<()> {
        let attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key,
            value_or_next_key: value,
            flags,
        };
        // SAFETY: `attr` is a valid bpf_attr prefix for this command and the
        // pointers inside it point at live buffers of the map's sizes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &raw const attr,
                size_of::<ElemAttr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Runs an element command that fills a value buffer for `key`.
    fn read_value<K: Copy, V: Copy>(&self, cmd: libc::c_long, key: &K) -> Option<V> {
        let mut v = MaybeUninit::<V>::uninit();
        self.call(
            cmd,
            std::ptr::from_ref(key) as u64,
            v.as_mut_ptr() as u64,
            0,
        )
        .ok()?;
        // SAFETY: the kernel filled all `size_of::<V>()` bytes.
        Some(unsafe { v.assume_init() })
    }

    pub fn lookup<K: Copy, V: Copy>(&self, key: &K) -> Option<V> {
        self.read_value(BPF_MAP_LOOKUP_ELEM, key)
    }

    pub fn lookup_and_delete<K: Copy, V: Copy>(&self, key: &K) -> Option<V> {
        self.read_value(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key)
    }

    pub fn update<K: Copy, V: Copy>(&self, key: &K, value: &V) -> io::Result<()> {
        self.call(
            BPF_MAP_UPDATE_ELEM,
            std::ptr::from_ref(key) as u64,
            std::ptr::from_ref(value) as u64,
            0,
        )
        .map_err(|e| io::Error::new(e.kind(), format!("updating map {}: {e}", self.name)))
    }

    pub fn delete<K: Copy>(&self, key: &K) -> io::Result<()> {
        self.call(BPF_MAP_DELETE_ELEM, std::ptr::from_ref(key) as u64, 0, 0)
    }

    /// All keys at the moment of the call (a snapshot; entries may come and
    /// go meanwhile).
    pub fn keys<K: Copy>(&self) -> Vec<K> {
        let mut out = Vec::new();
        let mut next = MaybeUninit::<K>::uninit();
        let mut prev: Option<K> = None;
        loop {
            let key_ptr = prev.as_ref().map_or(0, |k| std::ptr::from_ref(k) as u64);
            if self
                .call(BPF_MAP_GET_NEXT_KEY, key_ptr, next.as_mut_ptr() as u64, 0)
                .is_err()
            {
                break;
            }
            // SAFETY: the kernel filled the key.
            let k = unsafe { next.assume_init() };
            out.push(k);
            prev = Some(k);
            if out.len() > 1 << 22 {
                break;
            }
        }
        out
    }

    /// Sum of a per-CPU `u64` slot over every possible CPU.
    pub fn lookup_percpu_sum(&self, index: &u32) -> u64 {
        let cpus = possible_cpus();
        let mut vals = vec![0u64; cpus];
        if self
            .call(
                BPF_MAP_LOOKUP_ELEM,
                std::ptr::from_ref(index) as u64,
                vals.as_mut_ptr() as u64,
                0,
            )
            .is_err()
        {
            return 0;
        }
        vals.iter().sum()
    }
}

fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((_, hi)) => hi.parse::<usize>().ok(),
                    None => r.parse::<usize>().ok(),
                })
                .max()
                .flatten()
        })
        .map_or(1, |max| max + 1)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches the bpf link pinned at `path` now, rather than when its last
/// reference goes (which the kernel does a moment after the unlink).
pub fn detach_pinned_link(path: &std::path::Path) -> io::Result<()> {
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    #[repr(C)]
    struct LinkAttr {
        link_fd: u32,
        _pad: [u32; 3],
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let get = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: BPF_OBJ_GET with a valid NUL-terminated path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const get,
            size_of::<ObjAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let attr = LinkAttr {
        link_fd: fd as u32,
        _pad: [0; 3],
    };
    // SAFETY: BPF_LINK_DETACH on the fd we just got; then close it.
    unsafe {
        let rc = libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &raw const attr,
            size_of::<LinkAttr>() as libc::c_uint,
        );
        let err = io::Error::last_os_error();
        libc::close(fd as i32);
        if rc < 0 { Err(err) } else { Ok(()) }
    }
}
