//! `cargo xtask install`: the daemon binary, the systemd units, the example
//! drop-ins and a commented default config, where an operator (or a package
//! build, with `--destdir`) wants them.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{self, say};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Installation prefix: the binary goes to PREFIX/bin, the examples to
    /// PREFIX/share/gateway/examples.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Stage everything below this directory instead of `/` (package
    /// builds, tests); systemd is then never reloaded.
    #[arg(long)]
    pub destdir: Option<PathBuf>,
    /// Do not run `systemctl daemon-reload` afterwards.
    #[arg(long)]
    pub no_reload: bool,
    /// Install this already-built daemon binary instead of building
    /// (`cargo xtask build`) first.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

/// The path the unit in `systemd/` starts; rewritten to PREFIX/bin/gateway.
const UNIT_BINARY: &str = "/usr/local/bin/gateway";
/// Where the shipped config says the examples are; rewritten likewise.
const SHARE_DIR: &str = "/usr/local/share/gateway";

/// One file to put in place.
struct Item {
    source: PathBuf,
    /// The final path on the target system (without DESTDIR).
    target: PathBuf,
    mode: u32,
    /// Text replacements (from, to) applied to the source's content.
    rewrite: Vec<(String, String)>,
    /// Leave an existing target alone.
    keep_existing: bool,
}

/// What goes where, for a prefix. The binary's source is `binary`.
fn plan(prefix: &Path, binary: &Path) -> Vec<Item> {
    let root = util::root_dir();
    let sys = root.join("systemd");
    let bin = prefix.join("bin/gateway");
    let share = prefix.join("share/gateway");
    let units = Path::new("/etc/systemd/system");
    let item = |source: PathBuf, target: PathBuf, mode: u32| Item {
        source,
        target,
        mode,
        rewrite: Vec::new(),
        keep_existing: false,
    };
    let share_rewrite = vec![(SHARE_DIR.to_string(), share.to_string_lossy().into_owned())];
    vec![
        item(binary.to_path_buf(), bin.clone(), 0o755),
        Item {
            rewrite: vec![(
                format!("ExecStart={UNIT_BINARY} "),
                format!("ExecStart={} ", bin.display()),
            )],
            ..item(
                sys.join("gateway.service"),
                units.join("gateway.service"),
                0o644,
            )
        },
        item(
            sys.join("gateway-runners.slice"),
            units.join("gateway-runners.slice"),
            0o644,
        ),
        item(
            sys.join("examples/github-actions-runner.conf"),
            share.join("examples/github-actions-runner.conf"),
            0o644,
        ),
        item(
            sys.join("examples/gitlab-runner.conf"),
            share.join("examples/gitlab-runner.conf"),
            0o644,
        ),
        // The shipped default, also as a reference next to the examples
        // (the one in /etc is never overwritten).
        Item {
            rewrite: share_rewrite.clone(),
            ..item(
                sys.join("gateway.toml"),
                share.join("examples/gateway.toml"),
                0o644,
            )
        },
        Item {
            rewrite: share_rewrite,
            keep_existing: true,
            ..item(
                sys.join("gateway.toml"),
                PathBuf::from("/etc/gateway/gateway.toml"),
                0o644,
            )
        },
    ]
}

/// `DESTDIR` + an absolute target path.
fn staged(destdir: Option<&Path>, target: &Path) -> PathBuf {
    match destdir {
        Some(d) => d.join(target.strip_prefix("/").unwrap_or(target)),
        None => target.to_path_buf(),
    }
}

pub fn install(args: &Args) -> Result<()> {
    if !args.prefix.is_absolute() {
        bail!("--prefix must be absolute: {}", args.prefix.display());
    }
    let destdir = match &args.destdir {
        // An empty DESTDIR (as `make` passes it) means `/`.
        Some(d) if d.as_os_str().is_empty() => None,
        Some(d) => Some(
            std::path::absolute(d)
                .with_context(|| format!("resolving --destdir {}", d.display()))?,
        ),
        None => None,
    };
    if destdir.is_none() {
        util::require_root("install")?;
    }
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => {
            crate::build()?;
            util::gateway_bin()
        }
    };
    if !binary.is_file() {
        bail!(
            "{} does not exist; build it with `cargo xtask build`",
            binary.display()
        );
    }

    for item in plan(&args.prefix, &binary) {
        let dest = staged(destdir.as_deref(), &item.target);
        if item.keep_existing && fs::symlink_metadata(&dest).is_ok() {
            say(format!(
                "kept    {} (exists; not overwritten — the shipped default is in {})",
                dest.display(),
                staged(
                    destdir.as_deref(),
                    &args.prefix.join("share/gateway/examples/gateway.toml")
                )
                .display()
            ));
            continue;
        }
        put(&item, &dest)?;
        say(format!("put     {}", dest.display()));
    }

    let systemd_runs = Path::new("/run/systemd/system").exists();
    if destdir.is_some() {
        say("staged under --destdir: systemd not reloaded");
    } else if args.no_reload {
        say("--no-reload: run `systemctl daemon-reload` yourself");
    } else if !systemd_runs {
        say("systemd is not running here (no /run/systemd/system): not reloaded");
    } else {
        util::run(Command::new("systemctl").arg("daemon-reload"))?;
    }
    if destdir.is_none() {
        say("next: edit /etc/gateway/gateway.toml, `gateway check`, then");
        say("      systemctl enable --now gateway.service");
    }
    Ok(())
}

/// Writes the item's content to `dest` through a temporary file renamed into
/// place, so a running daemon's binary is replaced, never written over
/// ("text file busy"), and no reader sees half a file.
fn put(item: &Item, dest: &Path) -> Result<()> {
    let source = &item.source;
    let mut content = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    if !item.rewrite.is_empty() {
        let mut text = String::from_utf8(content)
            .with_context(|| format!("{} is not text", source.display()))?;
        for (from, to) in &item.rewrite {
            if !text.contains(from.as_str()) {
                bail!("{} no longer contains {from:?}", source.display());
            }
            text = text.replace(from.as_str(), to);
        }
        content = text.into_bytes();
    }
    let dir = dest
        .parent()
        .with_context(|| format!("{} has no parent", dest.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.xtask-install"));
    fs::write(&tmp, &content).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(item.mode))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    fs::rename(&tmp, dest).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("moving {} to {}", tmp.display(), dest.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_follows_prefix_and_keeps_the_config() {
        let items = plan(Path::new("/opt/gw"), Path::new("/b/gateway"));
        let targets: Vec<String> = items
            .iter()
            .map(|i| i.target.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            targets,
            [
                "/opt/gw/bin/gateway",
                "/etc/systemd/system/gateway.service",
                "/etc/systemd/system/gateway-runners.slice",
                "/opt/gw/share/gateway/examples/github-actions-runner.conf",
                "/opt/gw/share/gateway/examples/gitlab-runner.conf",
                "/opt/gw/share/gateway/examples/gateway.toml",
                "/etc/gateway/gateway.toml",
            ]
        );
        let kept: Vec<bool> = items.iter().map(|i| i.keep_existing).collect();
        assert_eq!(kept, [false, false, false, false, false, false, true]);
        assert_eq!(
            items[1].rewrite,
            [(
                "ExecStart=/usr/local/bin/gateway ".to_string(),
                "ExecStart=/opt/gw/bin/gateway ".to_string()
            )]
        );
    }

    #[test]
    fn destdir_prefixes_absolute_targets() {
        assert_eq!(
            staged(Some(Path::new("/tmp/d")), Path::new("/etc/x")),
            PathBuf::from("/tmp/d/etc/x")
        );
        assert_eq!(staged(None, Path::new("/etc/x")), PathBuf::from("/etc/x"));
    }

    #[test]
    fn the_shipped_files_hold_what_install_rewrites() {
        let sys = util::root_dir().join("systemd");
        let unit = fs::read_to_string(sys.join("gateway.service")).unwrap();
        assert!(unit.contains(&format!("ExecStart={UNIT_BINARY} ")));
        let cfg = fs::read_to_string(sys.join("gateway.toml")).unwrap();
        assert!(cfg.contains(SHARE_DIR));
    }
}
