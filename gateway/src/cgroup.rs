//! cgroup v2: finding the mount, creating the tagged cgroups, and turning
//! the cgroup id the kernel reports back into a path.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::RwLock,
};

/// Mount points of filesystems of type `fstype`, from /proc/self/mountinfo.
pub fn mount_points(fstype: &str) -> io::Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next() == Some(fstype))
                .then(|| left.split(' ').nth(4).map(PathBuf::from))
                .flatten()
        })
        .collect())
}

/// The cgroup2 mount point, from /proc/self/mountinfo (never assumed: it is
/// /sys/fs/cgroup on most systemd hosts, /sys/fs/cgroup/unified on hybrid).
pub fn mount() -> io::Result<PathBuf> {
    mount_points("cgroup2")?
        .into_iter()
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 filesystem is mounted (see /proc/self/mountinfo); the gateway needs cgroup v2",
            )
        })
}

/// The cgroup id as `bpf_get_current_cgroup_id` reports it: the inode
/// number of the cgroup's directory.
pub fn id_of(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// Maps cgroup ids to paths relative to the mount (with a leading `/`).
/// Learns lazily: on a miss it walks the configured subtrees once.
#[derive(Debug)]
pub struct Resolver {
    mount: PathBuf,
    roots: Vec<String>,
    cache: RwLock<HashMap<u64, String>>,
}

impl Resolver {
    pub fn new(mount: PathBuf, roots: Vec<String>) -> Self {
        Self {
            mount,
            roots,
            cache: RwLock::new(HashMap::new()),
        }
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The path of cgroup `id`, or `None` if it is not inside any
    /// configured cgroup (or is gone). `pid` is a fallback for a cgroup
    /// created and removed between two walks.
    pub fn path(&self, id: u64, pid: u32) -> Option<String> {
        if let Some(p) = self.cache.read().ok()?.get(&id) {
            return Some(p.clone());
        }
        let mut found = None;
        let mut learned = HashMap::new();
        for root in &self.roots {
            walk(&self.mount, &self.mount.join(root), &mut learned);
        }
        if let Some(p) = learned.get(&id) {
            found = Some(p.clone());
        } else if let Ok(s) = fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            // "0::/path" is the v2 line.
            if let Some(p) = s.lines().find_map(|l| l.strip_prefix("0::"))
                && id_of(&self.mount.join(p.trim_start_matches('/'))).ok() == Some(id)
            {
                found = Some(p.to_string());
                learned.insert(id, p.to_string());
            }
        }
        if let Ok(mut c) = self.cache.write() {
            if c.len() > 100_000 {
                c.clear();
            }
            c.extend(learned);
        }
        found
    }
}

fn walk(mount: &Path, dir: &Path, out: &mut HashMap<u64, String>) {
    let Ok(meta) = fs::metadata(dir) else {
        return;
    };
    let rel = dir.strip_prefix(mount).unwrap_or(dir);
    out.insert(meta.ino(), format!("/{}", rel.display()));
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(mount, &e.path(), out);
        }
    }
}

/// Removes `dir` and every (empty) cgroup below it, deepest first.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path())?;
            }
        }
    }
    fs::remove_dir(dir)
}
