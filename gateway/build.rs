//! Embeds the kernel programs built by `cargo xtask build-ebpf`.
//!
//! The eBPF crate needs a nightly toolchain, `rust-src` and `bpf-linker`;
//! building it from here would hide those installs inside every host build,
//! so xtask builds it once and this script only points the compiler at the
//! object. Without one (say, a bare `cargo clippy` on a fresh clone) the
//! binary is built with an empty object and `gateway run` says how to fix it.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let default = manifest.join("../target/bpfel-unknown-none/release/gateway-ebpf");
    let obj = env::var_os("GATEWAY_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-env-changed=GATEWAY_EBPF_OBJ");
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets it")).join("gateway-ebpf.o");
    match fs::read(&obj) {
        Ok(bytes) => fs::write(&out, bytes).expect("write OUT_DIR object"),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}; run `cargo xtask build-ebpf` (the binary will refuse to run)",
                obj.display()
            );
            fs::write(&out, []).expect("write OUT_DIR object");
        }
    }
}
