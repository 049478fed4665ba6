//! `cargo xtask build-ebpf`: the kernel programs, and what building them
//! needs (a nightly toolchain with `rust-src`, and `bpf-linker`).

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{self, cargo, say};

const TOOLCHAIN: &str = "nightly";
const TARGET: &str = "bpfel-unknown-none";

/// Where `build-ebpf` leaves the object (and where `gateway/build.rs` looks).
pub fn object_path() -> PathBuf {
    util::target_dir().join(TARGET).join("release/gateway-ebpf")
}

/// Installs what is missing, then builds the eBPF object.
pub fn build_ebpf() -> Result<()> {
    ensure_nightly()?;
    ensure_rust_src()?;
    let linker = ensure_bpf_linker()?;

    // `rustup run nightly cargo` is `cargo +nightly`, but does not depend on
    // which `cargo` comes first in PATH. The variables `cargo run` and the
    // rustup proxy put in xtask's environment would point the nested build
    // at the host toolchain, so they go.
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "-p", "gateway-ebpf"])
        .args(["--target", TARGET, "-Z", "build-std=core", "--release"])
        .current_dir(util::root_dir())
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC");
    if let Some(dir) = linker.parent() {
        cmd.env("PATH", util::path_with(dir));
    }
    util::run(&mut cmd)?;

    let obj = object_path();
    if !obj.is_file() {
        bail!(
            "the eBPF build succeeded but left no object at {}",
            obj.display()
        );
    }
    say(format!("eBPF object: {}", obj.display()));
    Ok(())
}

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn ensure_nightly() -> Result<()> {
    let list = util::output(rustup().args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (https://rustup.rs)")?;
    if list.lines().any(|l| l.trim_start().starts_with(TOOLCHAIN)) {
        return Ok(());
    }
    say("the nightly toolchain is missing (the eBPF target needs -Z build-std); installing it");
    util::run(rustup().args(["toolchain", "install", TOOLCHAIN, "--profile", "minimal"]))
}

fn ensure_rust_src() -> Result<()> {
    let installed = util::output(rustup().args([
        "component",
        "list",
        "--toolchain",
        TOOLCHAIN,
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim() == "rust-src") {
        return Ok(());
    }
    say(
        "component rust-src of the nightly toolchain is missing (build-std needs it); installing it",
    );
    util::run(rustup().args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN]))
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
}

fn home() -> PathBuf {
    env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

/// A `bpf-linker` on PATH or in `$CARGO_HOME/bin`.
fn find_bpf_linker() -> Option<PathBuf> {
    util::which("bpf-linker").or_else(|| {
        let p = cargo_home().join("bin/bpf-linker");
        util::is_executable(&p).then_some(p)
    })
}

/// Whether the binary starts (it does not when the LLVM library its rpath
/// points at has gone, e.g. after a nightly update).
fn runs(linker: &Path) -> bool {
    Command::new(linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Returns the path of a working `bpf-linker`, building one when needed.
fn ensure_bpf_linker() -> Result<PathBuf> {
    match find_bpf_linker() {
        Some(p) if runs(&p) => return Ok(p),
        Some(p) => say(format!(
            "{} does not run (its LLVM library is gone?); rebuilding it",
            p.display()
        )),
        None => say("bpf-linker is missing (not on PATH nor in $CARGO_HOME/bin)"),
    }
    install_bpf_linker()?;
    match find_bpf_linker() {
        Some(p) if runs(&p) => Ok(p),
        Some(p) => bail!("the freshly built {} does not run", p.display()),
        None => bail!(
            "`cargo install bpf-linker` succeeded but bpf-linker is neither on PATH nor in {}",
            cargo_home().join("bin").display()
        ),
    }
}

/// Builds `bpf-linker` against the LLVM shared library that ships inside the
/// nightly toolchain (no system LLVM needed, and it matches rustc's LLVM).
fn install_bpf_linker() -> Result<()> {
    let sysroot = util::output(rustup().args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let (lib, major) = find_llvm(&libdir)?;
    let name = lib.file_name().expect("a file found in a directory");

    // bpf-linker's build looks for `<prefix>/lib/libLLVM.so`; the binary then
    // loads the library under its own name through an rpath to `<prefix>/lib`,
    // so this directory must stay where it is.
    let prefix = home().join(".local/share/gateway-llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib).with_context(|| format!("create {}", prefix_lib.display()))?;
    for link_name in [Path::new("libLLVM.so"), Path::new(name)] {
        let link = prefix_lib.join(link_name);
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("remove old {}", link.display()))?;
        }
        symlink(&lib, &link)
            .with_context(|| format!("symlink {} -> {}", link.display(), lib.display()))?;
    }

    say(format!(
        "building bpf-linker against the nightly toolchain's LLVM {major} ({}); \
         `cargo install bpf-linker` takes about a minute",
        lib.display()
    ));
    util::run(
        cargo()
            .args(["install", "bpf-linker", "--force", "--no-default-features"])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// The real LLVM shared object in a toolchain's `lib/`, named like
/// `libLLVM.so.22.1-rust-1.97.0-nightly`, and its major version. (The
/// `libLLVM-22-rust-….so` next to it is a one-line linker script.)
fn find_llvm(libdir: &Path) -> Result<(PathBuf, u32)> {
    let entries = fs::read_dir(libdir).with_context(|| format!("read {}", libdir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(major) = name.to_str().and_then(llvm_major) {
            return Ok((entry.path(), major));
        }
    }
    bail!(
        "no libLLVM.so.<version>-rust-* in {}; the nightly toolchain should ship one",
        libdir.display()
    )
}

fn llvm_major(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix("libLLVM.so.")?;
    if !rest.contains("-rust-") {
        return None;
    }
    rest.split(['.', '-']).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn llvm_file_names() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.23-rust-1.99.0-nightly"), Some(23));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(llvm_major("libLLVM.so"), None);
    }
}
