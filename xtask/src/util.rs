//! Small helpers shared by the xtask commands: running commands loudly,
//! workspace paths, root checks, mount lookups, signals.

use std::{
    env,
    ffi::{OsStr, OsString, c_int},
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The workspace root (the directory holding the top `Cargo.toml`).
pub fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// `<root>/target`. Every cargo call made by xtask builds there (it drops
/// `CARGO_TARGET_DIR`), because `gateway/build.rs` looks for the eBPF object
/// at that place and the tests are handed `target/release/gateway`.
pub fn target_dir() -> PathBuf {
    root_dir().join("target")
}

/// The daemon binary that `cargo xtask build` produces.
pub fn gateway_bin() -> PathBuf {
    target_dir().join("release/gateway")
}

/// A `cargo` command for the host toolchain xtask itself runs on, started in
/// the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root_dir()).env_remove("CARGO_TARGET_DIR");
    cmd
}

/// The command line, for messages.
pub fn show(cmd: &Command) -> String {
    let mut words = vec![quote(cmd.get_program())];
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

fn quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%^".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Prints a progress line.
pub fn say(msg: impl AsRef<str>) {
    eprintln!("xtask: {}", msg.as_ref());
}

/// Prints and runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    say(format!("$ {}", show(cmd)));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; fails (with its stderr) unless
/// it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Looks `name` up in `PATH` like a shell would.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Adds the sbin directories to `PATH` when they are missing (a non-login
/// root shell may lack them, and `ip`, `nginx`, `bpftool` live there).
pub fn ensure_sbin_on_path() {
    let current = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    let mut changed = false;
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d == Path::new(extra)) {
            dirs.push(extra.into());
            changed = true;
        }
    }
    if changed && let Ok(joined) = env::join_paths(dirs) {
        // SAFETY: called first thing in `main`, before any thread exists.
        unsafe { env::set_var("PATH", joined) };
    }
}

/// `PATH` with `dir` in front.
pub fn path_with(dir: &Path) -> OsString {
    let current = env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(dir.to_path_buf()).chain(env::split_paths(&current));
    env::join_paths(dirs).unwrap_or(current)
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            // Uid: real effective saved fs
            Some(line.split_whitespace().nth(2)? == "0")
        })
        .unwrap_or(false)
}

pub fn require_root(task: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {task}` must run as root (it loads eBPF programs and attaches them \
             to cgroups). Run it from a root shell, or with \
             `sudo -E env \"PATH=$PATH\" cargo xtask {task}`"
        );
    }
    Ok(())
}

/// One line of `/proc/self/mountinfo`.
pub struct Mount {
    pub point: PathBuf,
    pub fstype: String,
}

pub fn mounts() -> Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: the
/// mount point is the fifth field, the type follows the ` - ` separator.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let point = left.split(' ').nth(4)?;
    let fstype = right.split(' ').next()?;
    Some(Mount {
        point: PathBuf::from(unescape_octal(point)),
        fstype: fstype.to_owned(),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on most
/// systemd hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.point)
        .context(
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo); gateway needs cgroup v2",
        )
}

/// Mounts bpffs at /sys/fs/bpf unless it already is.
pub fn ensure_bpffs() -> Result<()> {
    let point = Path::new("/sys/fs/bpf");
    if mounts()?
        .iter()
        .any(|m| m.point == point && m.fstype == "bpf")
    {
        return Ok(());
    }
    say("bpffs is not mounted at /sys/fs/bpf; mounting it");
    fs::create_dir_all(point).context("create /sys/fs/bpf")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// Random bits from the kernel.
pub fn random_u64() -> Result<u64> {
    let mut buf = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(u64::from_ne_bytes(buf))
}

/// Calls `probe` until it returns `Some`, `deadline` passes (error naming
/// `what`), or the user interrupts. `probe` may fail to stop early.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        // Polling interval, not synchronisation: the deadline bounds the wait.
        thread::sleep(Duration::from_millis(25));
    }
}

/// Like [`poll`] for cleanup paths: ignores interrupts, never fails, and
/// says whether `done` came true before `timeout`.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub const SIGINT: c_int = 2;
pub const SIGKILL: c_int = 9;
pub const SIGTERM: c_int = 15;

unsafe extern "C" {
    fn signal(signum: c_int, handler: extern "C" fn(c_int)) -> usize;
    fn kill(pid: c_int, sig: c_int) -> c_int;
}

extern "C" fn on_interrupt(_: c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM only set a flag, so that the command can
/// clean up after itself (children in the terminal's process group still get
/// the SIGINT and stop).
pub fn trap_interrupts() {
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe.
    unsafe {
        signal(SIGINT, on_interrupt);
        signal(SIGTERM, on_interrupt);
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sends `sig` to `pid`; false if it is gone (or not ours).
pub fn send_signal(pid: u32, sig: c_int) -> bool {
    let Ok(pid) = c_int::try_from(pid) else {
        return false;
    };
    // SAFETY: plain syscall wrapper; a positive pid names one process.
    pid > 0 && unsafe { kill(pid, sig) } == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let m = parse_mountinfo_line(
            "35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw",
        )
        .unwrap();
        assert_eq!(m.point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m.fstype, "cgroup2");
        let m = parse_mountinfo_line("1 2 0:3 / /mnt/a\\040b rw - tmpfs none rw").unwrap();
        assert_eq!(m.point, Path::new("/mnt/a b"));
        assert_eq!(m.fstype, "tmpfs");
    }

    #[test]
    fn quoting() {
        let mut c = Command::new("wrk");
        c.args(["-H", "Connection: close", "http://10.1.2.3:8080/small"]);
        assert_eq!(
            show(&c),
            "wrk -H 'Connection: close' http://10.1.2.3:8080/small"
        );
    }
}
