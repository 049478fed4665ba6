//! systemd readiness (`sd_notify`): `READY=1` once the programs are attached
//! and the proxy listens, `RELOADING=1` around a SIGHUP reload, `STOPPING=1`
//! on the way out. A no-op when not started by systemd (`$NOTIFY_SOCKET`
//! unset), and never fatal: readiness is a courtesy to the service manager.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to `$NOTIFY_SOCKET`.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify_to(&path, state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

fn notify_to(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        // "@name" is an abstract socket.
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), path)
        }
        .map(|_| ())
    })
}

/// `RELOADING=1` wants the monotonic time of the reload (systemd ≥ 253).
pub fn reloading() {
    let usec = crate::kernel::monotonic_ns() / 1000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_the_state_to_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("gw-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(notify_to(dir.join("absent").as_os_str(), "READY=1").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
