//! Classify a client connection from its first bytes: a TLS ClientHello
//! (SNI, ALPN), a plaintext HTTP/1.x request, or opaque TCP.
//!
//! [`sniff`] never panics and never asks for more than [`MAX_SNIFF`] bytes:
//! the caller reads into a buffer, calls [`sniff`], and on
//! [`Sniffed::NeedMore`] reads more (up to [`MAX_SNIFF`]) and calls it again.

/// The most bytes sniffing ever needs; a ClientHello or an HTTP head longer
/// than this is treated as what it can be told from (TLS → `Opaque`).
pub const MAX_SNIFF: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS ClientHello. `sni` is lower-cased, without a trailing dot.
    Tls {
        sni: Option<String>,
        alpn: Vec<String>,
    },
    /// A plaintext HTTP/1.x request. `host` is the Host header, lower-cased,
    /// without the port, when it is in the buffer.
    Http1 {
        method: String,
        host: Option<String>,
    },
    /// Anything else (including malformed TLS or HTTP).
    Opaque,
    /// The bytes so far are a valid prefix: read more and sniff again.
    NeedMore,
}

/// Classify `buf`, the first bytes the client sent.
pub fn sniff(buf: &[u8]) -> Sniffed {
    let buf = &buf[..buf.len().min(MAX_SNIFF)];
    let full = buf.len() >= MAX_SNIFF;
    match buf.first() {
        None => Sniffed::NeedMore,
        Some(0x16) => match client_hello(buf) {
            Hello::Done(s) => s,
            Hello::More if full => Sniffed::Opaque,
            Hello::More => Sniffed::NeedMore,
            Hello::Bad => Sniffed::Opaque,
        },
        Some(b) if b.is_ascii_uppercase() => http1(buf, full),
        Some(_) => Sniffed::Opaque,
    }
}

enum Hello {
    Done(Sniffed),
    More,
    Bad,
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reassemble the handshake bytes from TLS records, then parse the ClientHello.
fn client_hello(buf: &[u8]) -> Hello {
    let mut hs: Vec<u8> = Vec::new();
    let mut rest = buf;
    loop {
        // Record header: type, version (3.x), length.
        if rest.is_empty() {
            return Hello::More;
        }
        if rest[0] != 0x16 {
            return Hello::Bad;
        }
        if rest.len() >= 2 && rest[1] != 3 {
            return Hello::Bad;
        }
        if rest.len() < 5 {
            return Hello::More;
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > 1 << 14 {
            return Hello::Bad;
        }
        let avail = &rest[5..];
        let frag = &avail[..avail.len().min(len)];
        hs.extend_from_slice(frag);
        // Handshake header: type 1 (ClientHello), 24-bit length.
        if let Some(&t) = hs.first()
            && t != 1
        {
            return Hello::Bad;
        }
        if hs.len() >= 4 {
            let body = (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if body + 4 > MAX_SNIFF {
                return Hello::Bad;
            }
            if hs.len() >= body + 4 {
                return match parse_hello(&hs[4..body + 4]) {
                    Some(s) => Hello::Done(s),
                    None => Hello::Bad,
                };
            }
        }
        if avail.len() < len {
            return Hello::More;
        }
        rest = &avail[len..];
    }
}

fn parse_hello(body: &[u8]) -> Option<Sniffed> {
    let mut r = Reader(body);
    let major = r.u8()?;
    let _minor = r.u8()?;
    if major != 3 {
        return None;
    }
    r.take(32)?; // random
    let session = r.vec8()?;
    if session.len() > 32 {
        return None;
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if r.vec8()?.is_empty() {
        return None; // compression methods
    }
    let (mut sni, mut alpn) = (None, Vec::new());
    if r.is_empty() {
        return Some(Sniffed::Tls { sni, alpn });
    }
    let mut exts = Reader(r.vec16()?);
    if !r.is_empty() {
        return None;
    }
    while !exts.is_empty() {
        let ty = exts.u16()?;
        let mut data = Reader(exts.vec16()?);
        match ty {
            0 => {
                let mut list = Reader(data.vec16()?);
                while !list.is_empty() {
                    let kind = list.u8()?;
                    let name = list.vec16()?;
                    if kind == 0 && sni.is_none() {
                        sni = Some(host_name(name)?);
                    }
                }
            }
            16 => {
                let mut list = Reader(data.vec16()?);
                while !list.is_empty() {
                    let p = list.vec8()?;
                    if p.is_empty() {
                        return None;
                    }
                    alpn.push(String::from_utf8_lossy(p).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(Sniffed::Tls { sni, alpn })
}

/// An SNI host name: printable ASCII without spaces, lower-cased.
fn host_name(name: &[u8]) -> Option<String> {
    if name.is_empty() || name.len() > 255 || !name.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let s = std::str::from_utf8(name).ok()?.trim_end_matches('.');
    (!s.is_empty()).then(|| s.to_ascii_lowercase())
}

const MAX_METHOD: usize = 24;

fn http1(buf: &[u8], full: bool) -> Sniffed {
    // Method: upper-case token, then one space.
    let m_end = buf
        .iter()
        .position(|b| !(b.is_ascii_uppercase() || *b == b'-' || *b == b'_'))
        .unwrap_or(buf.len());
    if m_end > MAX_METHOD {
        return Sniffed::Opaque;
    }
    if m_end == buf.len() {
        return Sniffed::NeedMore;
    }
    if buf[m_end] != b' ' {
        return Sniffed::Opaque;
    }
    let method = String::from_utf8_lossy(&buf[..m_end]).into_owned();
    // Request line up to CRLF (or a bare LF).
    let Some(line_end) = buf.iter().position(|&b| b == b'\n') else {
        // Still a plausible request line? Printable bytes only so far.
        if full
            || buf[m_end + 1..]
                .iter()
                .any(|&b| !(b.is_ascii_graphic() || b == b' ' || b == b'\r'))
        {
            return Sniffed::Opaque;
        }
        return Sniffed::NeedMore;
    };
    let line = &buf[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line[m_end + 1..].split(|&b| b == b' ');
    let (Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next()) else {
        return Sniffed::Opaque;
    };
    if target.is_empty() || !target.iter().all(u8::is_ascii_graphic) {
        return Sniffed::Opaque;
    }
    if version.len() != 8 || !version.starts_with(b"HTTP/1.") || !version[7].is_ascii_digit() {
        return Sniffed::Opaque;
    }
    // Headers: look for Host until the blank line.
    let mut rest = &buf[line_end + 1..];
    loop {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            // Head not complete and no Host yet.
            return if full {
                Sniffed::Http1 { method, host: None }
            } else {
                Sniffed::NeedMore
            };
        };
        let h = &rest[..end];
        let h = h.strip_suffix(b"\r").unwrap_or(h);
        if h.is_empty() {
            return Sniffed::Http1 { method, host: None };
        }
        if let Some(colon) = h.iter().position(|&b| b == b':')
            && h[..colon].eq_ignore_ascii_case(b"host")
        {
            let host = std::str::from_utf8(&h[colon + 1..])
                .ok()
                .map(|v| strip_port(v.trim()).to_ascii_lowercase())
                .filter(|v| !v.is_empty());
            return Sniffed::Http1 { method, host };
        }
        rest = &rest[end + 1..];
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `::1`.
fn strip_port(v: &str) -> &str {
    if let Some(inner) = v.strip_prefix('[') {
        return inner.split(']').next().unwrap_or(inner);
    }
    match v.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => v,
    }
}
