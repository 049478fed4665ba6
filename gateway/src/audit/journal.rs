//! journald's native protocol (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>):
//! one datagram per entry on `/run/systemd/journal/socket`, fields as
//! `NAME=value\n`, or, for values holding a newline, `NAME\n` followed by the
//! value's length (64-bit little endian), the value and `\n`.

use std::{io, os::unix::net::UnixDatagram, path::Path, time::Duration};

/// Bytes of one entry in the native protocol.
pub fn encode(fields: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.iter().map(|(k, v)| k.len() + v.len() + 10).sum());
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        if value.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            out.push(b'=');
        }
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

/// Whether `name` may be a journal field a client sets: `A-Z`, `0-9`, `_`,
/// not starting with `_` or a digit, at most 64 characters.
pub fn valid_field_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Why an entry did not reach journald.
#[derive(Debug)]
pub struct Unreachable(pub io::Error);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.raw_os_error() {
            Some(libc::ENOENT) => write!(f, "journald's socket does not exist"),
            Some(libc::ECONNREFUSED) => write!(f, "journald is not listening on its socket"),
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                write!(f, "journald is not keeping up (its socket queue is full)")
            }
            _ => write!(f, "{}", self.0),
        }
    }
}

/// An unbound datagram socket that sends to journald's socket path on every
/// send, so a restarted journald (a new socket) is reached without
/// reconnecting.
#[derive(Debug)]
pub struct JournalSocket {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl JournalSocket {
    pub fn new(path: &Path) -> io::Result<JournalSocket> {
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        // Big entries fit in one datagram (entries are capped well below).
        let _ = socket2::SockRef::from(&sock).set_send_buffer_size(1 << 20);
        Ok(JournalSocket {
            sock,
            path: path.to_path_buf(),
        })
    }

    /// Whether journald listens, without sending anything (a datagram
    /// `connect` fails with ENOENT/ECONNREFUSED when nobody does).
    pub fn reachable(&self) -> Result<(), Unreachable> {
        let probe = UnixDatagram::unbound().map_err(Unreachable)?;
        probe.connect(&self.path).map_err(Unreachable)
    }

    /// One entry; a full queue (EAGAIN/ENOBUFS) is retried briefly, every
    /// other error is returned at once.
    pub fn send(&self, fields: &[(String, String)]) -> Result<(), Unreachable> {
        let data = encode(fields);
        let mut pause = Duration::from_millis(1);
        for attempt in 0.. {
            match self.sock.send_to(&data, &self.path) {
                Ok(_) => return Ok(()),
                Err(e)
                    if attempt < 4
                        && matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOBUFS)) =>
                {
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                Err(e) => return Err(Unreachable(e)),
            }
        }
        unreachable!("the retry loop returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn plain_values_are_name_equals_value_lines() {
        let bytes = encode(&[f("MESSAGE", "hello"), f("GATEWAY_EMPTY", "")]);
        assert_eq!(bytes, b"MESSAGE=hello\nGATEWAY_EMPTY=\n");
    }

    #[test]
    fn values_with_newlines_use_the_length_prefixed_form() {
        let bytes = encode(&[f("A", "x"), f("GATEWAY_PATH", "a\nb=c")]);
        let mut want = b"A=x\nGATEWAY_PATH\n".to_vec();
        want.extend_from_slice(&5u64.to_le_bytes());
        want.extend_from_slice(b"a\nb=c\n");
        assert_eq!(bytes, want);
    }

    #[test]
    fn field_names_follow_the_journals_rules() {
        assert!(valid_field_name("GATEWAY_BYTES_UP"));
        assert!(valid_field_name("MESSAGE"));
        assert!(!valid_field_name("_PID"));
        assert!(!valid_field_name("gateway_x"));
        assert!(!valid_field_name("1X"));
        assert!(!valid_field_name("A-B"));
        assert!(!valid_field_name(""));
        assert!(!valid_field_name(&"A".repeat(65)));
    }

    #[test]
    fn a_missing_socket_is_reported_unreachable() {
        let s = JournalSocket::new(Path::new("/nonexistent/gateway-test/socket")).unwrap();
        let e = s.send(&[f("MESSAGE", "x")]).unwrap_err();
        assert_eq!(e.0.raw_os_error(), Some(libc::ENOENT));
        assert!(e.to_string().contains("does not exist"));
    }

    #[test]
    fn entries_arrive_as_one_datagram_in_the_native_format() {
        let dir = std::env::temp_dir().join(format!("gw-journal-unit-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("socket");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let s = JournalSocket::new(&path).unwrap();
        s.send(&[f("MESSAGE", "one\ntwo"), f("PRIORITY", "6")])
            .unwrap();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            &encode(&[f("MESSAGE", "one\ntwo"), f("PRIORITY", "6")])[..]
        );
        assert!(s.reachable().is_ok());
        drop(server);
        // The socket file stays but nobody listens: refused.
        let e = s.send(&[f("MESSAGE", "x")]).unwrap_err();
        assert_eq!(e.0.raw_os_error(), Some(libc::ECONNREFUSED));
        assert!(s.reachable().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
