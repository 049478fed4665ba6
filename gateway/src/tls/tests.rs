use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use rustls::{
    ClientConfig, RootCertStore,
    client::{WebPkiServerVerifier, danger::ServerCertVerifier as _},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject as _},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    ca::{self, Ca, Minter},
    sniff::{MAX_SNIFF, Sniffed, sniff},
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "gateway-tls-{tag}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn new_ca(t: &TempDir) -> Ca {
    Ca::init(&t.path().join("ca"), false).unwrap()
}

fn roots(ca: &Ca) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    Arc::new(roots)
}

fn verify(ca: &Ca, leaf: &CertificateDer<'static>, name: &str) -> Result<(), rustls::Error> {
    let v = WebPkiServerVerifier::builder_with_provider(roots(ca), provider())
        .build()
        .unwrap();
    v.verify_server_cert(
        leaf,
        &[],
        &ServerName::try_from(name.to_string()).unwrap(),
        &[],
        UnixTime::now(),
    )
    .map(|_| ())
}

#[test]
fn ca_init_modes_and_refuses_overwrite() {
    let t = TempDir::new("init");
    let dir = t.path().join("ca");
    let ca = Ca::init(&dir, false).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(ca::KEY_FILE)), 0o600);
    assert_eq!(mode(&dir.join(ca::CERT_FILE)), 0o644);
    let fp = ca::fingerprint(ca.cert_der());

    let err = Ca::init(&dir, false).unwrap_err().to_string();
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    // Unchanged by the refused init.
    assert_eq!(ca::fingerprint(Ca::load(&dir).unwrap().cert_der()), fp);

    let again = Ca::init(&dir, true).unwrap();
    assert_ne!(ca::fingerprint(again.cert_der()), fp);
    assert_eq!(mode(&dir.join(ca::KEY_FILE)), 0o600);
    assert!(!dir.join("key.tmp").exists());

    // The CA certificate is a P-256 CA.
    let (_, x) = x509_parser::parse_x509_certificate(again.cert_der()).unwrap();
    assert!(x.is_ca());
    assert_eq!(
        x.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    ca::show(&dir).unwrap();
}

#[test]
fn ca_load_errors_say_how_to_fix() {
    let t = TempDir::new("load");
    let err = Ca::load(&t.path().join("ca")).unwrap_err().to_string();
    assert!(err.contains("gateway ca init"), "{err}");
    let err = ca::show(&t.path().join("ca")).unwrap_err().to_string();
    assert!(err.contains("gateway ca init"), "{err}");
    let err = ca::trust(&t.path().join("ca"), Some(t.path()), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("gateway ca init"), "{err}");

    // A key that does not belong to the certificate is refused.
    let a = Ca::init(&t.path().join("a"), false).unwrap();
    let _b = Ca::init(&t.path().join("b"), false).unwrap();
    std::fs::copy(
        t.path().join("b").join(ca::KEY_FILE),
        a.dir().join(ca::KEY_FILE),
    )
    .unwrap();
    let err = Ca::load(a.dir()).unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
}

#[test]
fn leaf_verifies_for_its_name_only() {
    let t = TempDir::new("leaf");
    let ca = new_ca(&t);
    let leaf = ca.mint("Example.COM.").unwrap();
    assert_eq!(leaf.name, "example.com");
    let der = &leaf.key.cert[0];
    verify(&ca, der, "example.com").unwrap();
    assert!(verify(&ca, der, "other.example.com").is_err());
    assert!(verify(&ca, der, "example.org").is_err());

    // Short validity, backdated, ECDSA P-256, not a CA.
    let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
    let v = x.validity();
    let span = v.not_after.timestamp() - v.not_before.timestamp();
    assert_eq!(span, 25 * 3600);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(v.not_before.timestamp() <= now - 3500);
    assert!(!x.is_ca());
    assert_eq!(
        x.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );

    // A leaf from another CA does not verify.
    let t2 = TempDir::new("leaf2");
    let other = new_ca(&t2);
    let foreign = other.mint("example.com").unwrap();
    assert!(verify(&ca, &foreign.key.cert[0], "example.com").is_err());
}

#[test]
fn leaf_for_ip_has_ip_san() {
    let t = TempDir::new("ip");
    let ca = new_ca(&t);
    for ip in ["10.1.2.3", "::1", "[2001:db8::1]"] {
        let leaf = ca.mint(ip).unwrap();
        let bare = ip.trim_matches(['[', ']']);
        verify(&ca, &leaf.key.cert[0], bare).unwrap();
        assert!(verify(&ca, &leaf.key.cert[0], "10.9.9.9").is_err());
    }
    assert!(ca.mint("").is_err());
    assert!(ca.mint("bad name!").is_err());
}

#[test]
fn minter_caches_and_evicts() {
    let t = TempDir::new("cache");
    let m = Minter::with_capacity(new_ca(&t), 2);
    let a1 = m.get("a.example").unwrap();
    let a2 = m.get("A.Example.").unwrap();
    assert!(Arc::ptr_eq(&a1, &a2));
    let b = m.get("b.example").unwrap();
    assert!(!Arc::ptr_eq(&a1, &b));
    assert_eq!(m.cached(), 2);
    // a is more recently used than b: c evicts b.
    m.get("a.example").unwrap();
    m.get("c.example").unwrap();
    assert_eq!(m.cached(), 2);
    assert!(Arc::ptr_eq(&a1, &m.get("a.example").unwrap()));
    assert!(!Arc::ptr_eq(&b, &m.get("b.example").unwrap()));
}

fn client_config(ca: &Ca, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Serve one echo connection over loopback with the minting resolver;
/// connect with a rustls client trusting the CA; return the ALPN chosen.
async fn handshake(
    minter: &Arc<Minter>,
    fallback: Option<String>,
    name: &str,
    alpn: &[&[u8]],
) -> Result<Option<Vec<u8>>, std::io::Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(minter.server_config(fallback).unwrap());
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let connector = tokio_rustls::TlsConnector::from(client_config(minter.ca(), alpn));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let res = async {
        let mut tls = connector
            .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
            .await?;
        let proto = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        tls.write_all(b"hello").await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"hello");
        Ok(proto)
    }
    .await;
    let _ = server.await;
    res
}

#[tokio::test]
async fn loopback_handshake_negotiates_h2() {
    let t = TempDir::new("hs");
    let minter = Arc::new(Minter::new(new_ca(&t)));
    let p = handshake(&minter, None, "api.example.test", &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(p.as_deref(), Some(&b"h2"[..]));
    let p = handshake(&minter, None, "api.example.test", &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(p.as_deref(), Some(&b"http/1.1"[..]));
    let p = handshake(&minter, None, "api.example.test", &[])
        .await
        .unwrap();
    assert_eq!(p, None);
    assert_eq!(minter.cached(), 1);
}

#[tokio::test]
async fn loopback_handshake_without_sni_uses_fallback() {
    let t = TempDir::new("hsip");
    let minter = Arc::new(Minter::new(new_ca(&t)));
    // A rustls client connecting to an IP sends no SNI.
    handshake(&minter, Some("127.0.0.1".into()), "127.0.0.1", &[b"h2"])
        .await
        .unwrap();
    // Without a fallback there is no certificate to present.
    assert!(
        handshake(&minter, None, "127.0.0.1", &[b"h2"])
            .await
            .is_err()
    );
}

/// The first bytes a real rustls client sends.
fn real_client_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        ServerName::try_from(name.to_string()).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

#[tokio::test]
async fn sniff_client_hello_through_a_pipe() {
    // Capture a tokio-rustls client's first bytes through an in-memory pipe,
    // reading in small pieces as a proxy would.
    let (client, mut server) = tokio::io::duplex(64);
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let task = tokio::spawn(async move {
        let _ = connector
            .connect(ServerName::try_from("Www.Example.COM").unwrap(), client)
            .await;
    });
    let mut buf = Vec::new();
    let mut reads = 0;
    let got = loop {
        let mut chunk = [0u8; 37];
        let n = server.read(&mut chunk).await.unwrap();
        assert!(n > 0, "client closed before the hello was complete");
        buf.extend_from_slice(&chunk[..n]);
        reads += 1;
        match sniff(&buf) {
            Sniffed::NeedMore => continue,
            other => break other,
        }
    };
    assert!(reads > 1);
    assert_eq!(
        got,
        Sniffed::Tls {
            sni: Some("www.example.com".into()),
            alpn: vec!["h2".into(), "http/1.1".into()]
        }
    );
    drop(server);
    let _ = task.await;
}

#[test]
fn sniff_real_client_hello_and_every_prefix() {
    let hello = real_client_hello("api.example.test", &[b"h2", b"http/1.1"]);
    let want = Sniffed::Tls {
        sni: Some("api.example.test".into()),
        alpn: vec!["h2".into(), "http/1.1".into()],
    };
    assert_eq!(sniff(&hello), want);
    for n in 0..hello.len() {
        assert_eq!(sniff(&hello[..n]), Sniffed::NeedMore, "prefix {n}");
    }
    // Trailing bytes (e.g. early data) don't matter.
    let mut more = hello.clone();
    more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
    assert_eq!(sniff(&more), want);

    // An IP target: no SNI.
    let hello = real_client_hello("192.0.2.7", &[]);
    assert_eq!(
        sniff(&hello),
        Sniffed::Tls {
            sni: None,
            alpn: vec![]
        }
    );
}

#[test]
fn sniff_hello_split_over_records() {
    let hello = real_client_hello("split.example", &[b"http/1.1"]);
    let payload = &hello[5..];
    for size in [1usize, 7, 100, 300] {
        let mut split = Vec::new();
        for chunk in payload.chunks(size) {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            split.extend_from_slice(chunk);
        }
        let want = Sniffed::Tls {
            sni: Some("split.example".into()),
            alpn: vec!["http/1.1".into()],
        };
        assert_eq!(sniff(&split), want, "records of {size}");
        for n in 0..split.len() {
            assert_eq!(
                sniff(&split[..n]),
                Sniffed::NeedMore,
                "size {size} prefix {n}"
            );
        }
    }
}

#[test]
fn sniff_malformed_tls_is_opaque() {
    let hello = real_client_hello("x.example", &[b"h2"]);
    // Not a ClientHello handshake type.
    let mut h = hello.clone();
    h[5] = 2;
    assert_eq!(sniff(&h), Sniffed::Opaque);
    // Wrong record version.
    let mut h = hello.clone();
    h[1] = 9;
    assert_eq!(sniff(&h), Sniffed::Opaque);
    // A record of another type in the middle of the hello.
    let mut two = vec![0x16, 0x03, 0x01, 0x00, 0x04];
    two.extend_from_slice(&hello[5..9]);
    two.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0]);
    assert_eq!(sniff(&two), Sniffed::Opaque);
    // A hello announced longer than the sniff bound.
    assert_eq!(
        sniff(&[0x16, 0x03, 0x01, 0x00, 0x04, 1, 0x01, 0, 0]),
        Sniffed::Opaque
    );
    // Inner lengths overrunning the message.
    let mut h = hello.clone();
    let sid = 5 + 4 + 2 + 32; // session id length
    h[sid] = 0xff;
    assert_eq!(sniff(&h), Sniffed::Opaque);
    // A huge stream of valid-looking but endless records stops at the bound.
    let mut endless = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0xff, 0xff];
    endless.resize(MAX_SNIFF + 100, 0);
    assert_eq!(sniff(&endless), Sniffed::Opaque);
}

#[test]
fn sniff_garbage_never_panics() {
    let mut rng = StdRng::seed_from_u64(0x6a7e_3a11);
    let hello = real_client_hello("fuzz.example", &[b"h2", b"http/1.1"]);
    for i in 0..20_000 {
        let buf: Vec<u8> = match i % 4 {
            0 => (0..rng.gen_range(0..600)).map(|_| rng.r#gen()).collect(),
            1 => {
                // Plausible record header, random rest.
                let mut b = vec![0x16, 0x03, rng.gen_range(0..4)];
                b.extend((0..rng.gen_range(0..400)).map(|_| rng.r#gen::<u8>()));
                b
            }
            2 => {
                // The real hello with a few bytes flipped and maybe truncated.
                let mut b = hello.clone();
                for _ in 0..rng.gen_range(1..6) {
                    let at = rng.gen_range(0..b.len());
                    b[at] = rng.r#gen();
                }
                b.truncate(rng.gen_range(0..=b.len()));
                b
            }
            _ => {
                // Text-ish: upper-case start, random printable and CR/LF.
                let alphabet = b"GETPOSHDLUC :/\r\nHost:abc.123[]";
                let mut b = vec![b"GPDHO"[rng.gen_range(0..5)]];
                b.extend(
                    (0..rng.gen_range(0..200)).map(|_| alphabet[rng.gen_range(0..alphabet.len())]),
                );
                b
            }
        };
        let _ = sniff(&buf);
    }
    assert_eq!(sniff(b"\x00\x01\x02\x03"), Sniffed::Opaque);
    assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.6\r\n"), Sniffed::Opaque);
    assert_eq!(sniff(&[0xff; MAX_SNIFF * 2]), Sniffed::Opaque);
}

#[test]
fn sniff_http1() {
    let http = |method: &str, host: Option<&str>| Sniffed::Http1 {
        method: method.into(),
        host: host.map(str::to_string),
    };
    assert_eq!(
        sniff(b"GET /path?q=1 HTTP/1.1\r\nUser-Agent: x\r\nHost: Example.com:8080\r\n\r\n"),
        http("GET", Some("example.com"))
    );
    assert_eq!(
        sniff(b"DELETE /x HTTP/1.0\r\nhost:[::1]:80\r\n"),
        http("DELETE", Some("::1"))
    );
    assert_eq!(
        sniff(b"POST http://a.example/ HTTP/1.1\nHOST: a.example\n\n"),
        http("POST", Some("a.example"))
    );
    // Head complete without Host.
    assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), http("GET", None));
    // Incomplete request line or head: need more.
    for p in [
        "G",
        "GET",
        "GET ",
        "GET /index",
        "GET / HTTP/1.1",
        "GET / HTTP/1.1\r\nAccept: */*\r\n",
    ] {
        assert_eq!(sniff(p.as_bytes()), Sniffed::NeedMore, "{p:?}");
    }
    // Every prefix of a request is NeedMore until the Host line is complete.
    let req = b"PUT /a HTTP/1.1\r\nHost: b.example\r\n\r\n";
    let host_end = req.windows(2).position(|w| w == b"e\r").unwrap() + 2;
    for n in 0..host_end {
        assert_eq!(sniff(&req[..n]), Sniffed::NeedMore, "prefix {n}");
    }
    // A head longer than the bound without Host.
    let mut long = b"GET / HTTP/1.1\r\n".to_vec();
    while long.len() < MAX_SNIFF {
        long.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    assert_eq!(sniff(&long), http("GET", None));
    // Not HTTP/1.x.
    assert_eq!(sniff(b"GET / HTTP/2.0\r\n\r\n"), Sniffed::Opaque);
    assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniffed::Opaque);
    assert_eq!(sniff(b"GET /\r\n"), Sniffed::Opaque);
    assert_eq!(sniff(b"get / HTTP/1.1\r\n"), Sniffed::Opaque);
    assert_eq!(sniff(b"HELLO\x00world"), Sniffed::Opaque);
    assert_eq!(sniff(b"GET /a\x01b HTTP/1.1"), Sniffed::Opaque);
}

fn certutil_present() -> bool {
    std::process::Command::new("certutil")
        .arg("-H")
        .output()
        .is_ok()
}

#[test]
fn trust_nssdb_with_real_certutil() {
    assert!(
        certutil_present(),
        "certutil is missing: apt-get install libnss3-tools"
    );
    let t = TempDir::new("nss");
    let ca = new_ca(&t);
    let db = t.path().join("nssdb");
    ca::trust(ca.dir(), Some(&db), false).unwrap();
    let list = |db: &Path| {
        let out = std::process::Command::new("certutil")
            .args(["-L", "-d"])
            .arg(format!("sql:{}", db.display()))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let l = list(&db);
    let line = l
        .lines()
        .find(|l| l.starts_with(ca::NSS_NICKNAME))
        .unwrap_or_else(|| panic!("no gateway CA in:\n{l}"));
    assert!(line.trim_end().ends_with("C,,"), "{line}");

    // Re-trusting after a re-init replaces the entry instead of failing.
    let ca2 = Ca::init(ca.dir(), true).unwrap();
    ca::trust(ca2.dir(), Some(&db), false).unwrap();
    let l = list(&db);
    assert_eq!(
        l.lines()
            .filter(|l| l.starts_with(ca::NSS_NICKNAME))
            .count(),
        1
    );
    let out = std::process::Command::new("certutil")
        .args(["-L", "-n", ca::NSS_NICKNAME, "-a", "-d"])
        .arg(format!("sql:{}", db.display()))
        .output()
        .unwrap();
    let der = CertificateDer::from_pem_slice(&out.stdout).unwrap();
    assert_eq!(ca::fingerprint(&der), ca::fingerprint(ca2.cert_der()));
}

#[test]
fn trust_needs_a_target() {
    let t = TempDir::new("target");
    let ca = new_ca(&t);
    let err = ca::trust(ca.dir(), None, false).unwrap_err().to_string();
    assert!(err.contains("--nssdb") && err.contains("--system"), "{err}");
}
