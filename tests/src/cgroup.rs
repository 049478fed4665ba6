//! cgroup v2 helpers: finding the mount, reading a process's cgroup, and
//! removing a cgroup tree bottom-up after killing what is left in it.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> PathBuf {
    try_cgroup2_mount().expect("no cgroup2 filesystem in /proc/self/mountinfo; mount one")
}

pub fn try_cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&info)
}

/// mountinfo: `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`
fn parse_mountinfo(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mountpoint = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1..i + 4)
                .is_some_and(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 path (relative to the mount, with a leading `/`) of a process.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Kill every process in the tree and remove its directories, children first.
/// Best effort: failures are reported on stderr, never panics (runs in Drop).
pub fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    // cgroup.kill (5.14+) SIGKILLs everything below; wait until it is empty
    // because rmdir of a populated cgroup fails with EBUSY.
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let empty = crate::poll(Duration::from_secs(5), || {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        procs.trim().is_empty().then_some(())
    });
    if empty.is_none() {
        eprintln!(
            "gateway-tests: processes still in {} after cgroup.kill",
            dir.display()
        );
    }
    let removed = crate::poll(Duration::from_secs(5), || {
        match std::fs::remove_dir(dir) {
            Ok(()) => Some(Ok(())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Ok(())),
            // EBUSY lingers briefly while killed tasks are reaped.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => None,
            Err(e) => Some(Err(e)),
        }
    });
    match removed {
        Some(Ok(())) => {}
        Some(Err(e)) => eprintln!("gateway-tests: cannot remove cgroup {}: {e}", dir.display()),
        None => eprintln!("gateway-tests: cgroup {} stayed busy", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_mounts() {
        let info = "\
24 1 0:22 / /sys rw,nosuid - sysfs sysfs rw
31 24 0:27 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            parse_mountinfo(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let spaced = "41 31 0:38 / /mnt/c\\040g rw shared:1 - cgroup2 none rw\n";
        assert_eq!(parse_mountinfo(spaced), Some(PathBuf::from("/mnt/c g")));
        assert_eq!(
            parse_mountinfo("24 1 0:22 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }
}
