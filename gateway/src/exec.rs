//! `gateway exec --identity NAME -- CMD…`: run a command under enforcement,
//! in a fresh child cgroup of the identity's cgroup, and exit with its
//! status. Refuses to run anything if enforcement is not attached there:
//! starting the command untagged would be a silent direct path out.

use std::{
    ffi::CString,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::Path,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};

use crate::{cgroup, config::Config, kernel};

mod seccomp;

pub fn run(config: &Config, identity: &str, argv: &[String]) -> anyhow::Result<i32> {
    let Some(ident) = config.identity(identity) else {
        let known: Vec<_> = config.identities.iter().map(|i| i.name.as_str()).collect();
        bail!(
            "no identity {identity:?} in {}; known identities: {}",
            config.origin,
            known.join(", ")
        );
    };
    let Some((program, args)) = argv.split_first() else {
        bail!("nothing to run; usage: gateway exec --identity {identity} -- CMD [ARGS...]");
    };
    let mount = cgroup::mount()?;
    let parent = mount.join(&ident.cgroups[0]);
    let parent_id = cgroup::id_of(&parent).with_context(|| {
        format!(
            "cgroup {} of identity {identity} does not exist; start `gateway run` first",
            parent.display()
        )
    })?;
    if !kernel::enforced(&config.daemon.pin_dir, parent_id) {
        bail!(
            "enforcement is not attached to {} (no pinned links under {}); start `gateway run` with this config first",
            parent.display(),
            config.daemon.pin_dir.display()
        );
    }
    let child = parent.join(unique_name());
    std::fs::create_dir(&child).with_context(|| format!("creating cgroup {}", child.display()))?;
    let procs = CString::new(
        child
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .context("cgroup path contains NUL")?;

    let filter = seccomp::program();
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: the closure only calls async-signal-safe functions (open,
    // write, close, prctl) on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            seccomp::install(&filter)
        });
    }
    let status = cmd.status();
    cleanup(&child);
    let status = status.with_context(|| format!("running {program:?} in {}", child.display()))?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "exec-{}-{}{:08x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Removes the per-invocation cgroup once its processes are gone; if the
/// command left daemons behind, they stay enforced and the cgroup stays.
fn cleanup(child: &Path) {
    // Right after the last process is reaped the kernel may still count the
    // cgroup as populated for a moment (EBUSY); give it a short deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut result = cgroup::remove_tree(child);
    while matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
        result = cgroup::remove_tree(child);
    }
    if let Err(e) = result {
        eprintln!(
            "gateway: left cgroup {} in place ({e}); processes started by the command still run there under enforcement",
            child.display()
        );
    }
}
