//! The interception CA (`gateway ca init | show | trust`) and the [`Minter`]
//! that signs short-lived leaf certificates for intercepted hosts.

use std::{
    collections::HashMap,
    fmt, fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject as _,
    },
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use sha2::{Digest as _, Sha256};

/// File names inside the CA directory.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
/// The nickname the CA gets in an NSS database.
pub const NSS_NICKNAME: &str = "gateway CA";
/// Where `trust --system` puts the certificate (Debian's `update-ca-certificates`).
pub const SYSTEM_CERT: &str = "/usr/local/share/ca-certificates/gateway-ca.crt";

/// How long a minted leaf is valid, and how far it is backdated for clock skew.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
pub const LEAF_BACKDATE: Duration = Duration::from_secs(3600);
/// A cached leaf is re-minted once less than this much validity remains.
const LEAF_REFRESH_MARGIN: Duration = Duration::from_secs(2 * 3600);
/// Default bound on the number of cached leaves.
pub const DEFAULT_CACHE_CAPACITY: usize = 4096;
/// The CA's own validity.
const CA_VALIDITY_DAYS: i64 = 3650;

/// The CA directory under the daemon's state directory.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ca")
}

fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The loaded CA: its certificate and the key that signs leaves.
pub struct Ca {
    dir: PathBuf,
    cert_der: CertificateDer<'static>,
    /// The CA re-expressed for rcgen as an issuer (same subject and key).
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("fingerprint", &fingerprint(&self.cert_der))
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generate a new ECDSA P-256 CA in `dir` (0700): key 0600, cert 0644.
    /// Refuses to replace an existing CA unless `force`.
    pub fn init(dir: &Path, force: bool) -> anyhow::Result<Ca> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if !force && (cert_path.exists() || key_path.exists()) {
            bail!(
                "a CA already exists in {} — refusing to overwrite it (clients that trust it would \
                 stop trusting intercepted connections); pass --force to replace it, then re-run \
                 `gateway ca trust`",
                dir.display()
            );
        }
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting mode 0700 on {}", dir.display()))?;

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = ca_name();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;

        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ca::load(dir)
    }

    /// Load the CA from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Ca> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        let cert_pem = fs::read_to_string(&cert_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "no CA certificate at {} — create one with `gateway ca init`",
                    cert_path.display()
                )
            } else {
                anyhow!("reading {}: {e}", cert_path.display())
            }
        })?;
        let key_pem = fs::read_to_string(&key_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!(
                "no CA key at {} — create a CA with `gateway ca init --force`",
                key_path.display()
            ),
            std::io::ErrorKind::PermissionDenied => anyhow!(
                "cannot read the CA key {} (it is readable by its owner only): run as root",
                key_path.display()
            ),
            _ => anyhow!("reading {}: {e}", key_path.display()),
        })?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("parsing the CA key {}", key_path.display()))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .with_context(|| format!("parsing the CA certificate {}", cert_path.display()))?;
        let params = CertificateParams::from_ca_cert_der(&cert_der)
            .with_context(|| format!("parsing the CA certificate {}", cert_path.display()))?;
        // rcgen needs the issuer as a `Certificate`; re-signing the parsed
        // params keeps subject and key identifier, which is all a leaf uses.
        let issuer = params.self_signed(&key)?;
        // The key must belong to the certificate.
        let spki = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| anyhow!("parsing the CA certificate {}: {e}", cert_path.display()))?
            .1
            .public_key()
            .raw
            .to_vec();
        if spki != key.public_key_der() {
            bail!(
                "the CA key {} does not match the certificate {} — re-create both with `gateway ca init --force`",
                key_path.display(),
                cert_path.display()
            );
        }
        Ok(Ca {
            dir: dir.to_path_buf(),
            cert_der,
            issuer,
            key,
        })
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Sign a fresh leaf for `name` (a DNS name or an IP address).
    pub fn mint(&self, name: &str) -> anyhow::Result<Leaf> {
        let name = normalize(name)?;
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(|e| anyhow!("{name:?} is not a valid DNS name: {e}"))?,
            ),
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = now + LEAF_VALIDITY;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;

        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = ring()
            .key_provider
            .load_private_key(der)
            .map_err(|e| anyhow!("loading the leaf key: {e}"))?;
        let certified = CertifiedKey::new(vec![cert.der().clone()], signing);
        Ok(Leaf {
            name,
            key: Arc::new(certified),
            expires: Instant::now() + LEAF_VALIDITY,
        })
    }
}

/// A minted leaf certificate with its key, ready for rustls.
#[derive(Debug, Clone)]
pub struct Leaf {
    #[cfg_attr(not(test), allow(dead_code))]
    pub name: String,
    pub key: Arc<CertifiedKey>,
    /// When the certificate stops being valid (monotonic clock).
    pub expires: Instant,
}

fn ca_name() -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "gateway");
    dn.push(
        DnType::CommonName,
        format!("gateway interception CA ({})", hostname()),
    );
    dn
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero octet
    rcgen::SerialNumber::from_slice(&bytes)
}

/// Lower-case, strip a trailing dot and IPv6 brackets; reject the empty name.
fn normalize(name: &str) -> anyhow::Result<String> {
    let n = name.trim().trim_end_matches('.').to_ascii_lowercase();
    let n = n
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .map(str::to_string)
        .unwrap_or(n);
    if n.is_empty() {
        bail!("cannot mint a certificate for an empty name");
    }
    if n.parse::<IpAddr>().is_err() && ServerName::try_from(n.as_str()).is_err() {
        bail!("{name:?} is neither a DNS name nor an IP address");
    }
    Ok(n)
}

/// Write `bytes` to `path` with `mode`, atomically (temp file + rename).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    // The umask may have narrowed the mode; set it exactly.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// SHA-256 over the DER, as colon-separated upper-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `gateway ca init`.
pub fn init(dir: &Path, force: bool) -> anyhow::Result<()> {
    let ca = Ca::init(dir, force)?;
    println!("created the interception CA in {}", dir.display());
    print_ca(&ca)?;
    println!(
        "next: `gateway ca trust --nssdb ~/.pki/nssdb` (Chromium) or `gateway ca trust --system` (curl, OpenSSL)"
    );
    Ok(())
}

/// `gateway ca show`.
pub fn show(dir: &Path) -> anyhow::Result<()> {
    let cert_path = dir.join(CERT_FILE);
    let pem = fs::read(&cert_path).map_err(|e| {
        anyhow!(
            "reading {}: {e} — create the CA with `gateway ca init`",
            cert_path.display()
        )
    })?;
    let der = CertificateDer::from_pem_slice(&pem)
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    print_cert(&der, dir)
}

fn print_ca(ca: &Ca) -> anyhow::Result<()> {
    print_cert(&ca.cert_der, &ca.dir)
}

fn print_cert(der: &[u8], dir: &Path) -> anyhow::Result<()> {
    let (_, x) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow!("parsing the CA certificate: {e}"))?;
    let v = x.validity();
    println!("subject:     {}", x.subject());
    println!("sha256:      {}", fingerprint(der));
    println!("not before:  {}", v.not_before);
    println!("not after:   {}", v.not_after);
    println!("certificate: {}", dir.join(CERT_FILE).display());
    let key_path = dir.join(KEY_FILE);
    match fs::metadata(&key_path) {
        Ok(m) => {
            let mode = m.mode() & 0o777;
            let warn = if mode & 0o077 != 0 {
                "  WARNING: readable by others; run `chmod 600` on it"
            } else {
                ""
            };
            println!(
                "key:         {} (mode {mode:04o}, uid {}){warn}",
                key_path.display(),
                m.uid()
            );
        }
        Err(e) => println!("key:         {} ({e})", key_path.display()),
    }
    Ok(())
}

/// `gateway ca trust [--nssdb DIR] [--system]`.
pub fn trust(dir: &Path, nssdb: Option<&Path>, system: bool) -> anyhow::Result<()> {
    if nssdb.is_none() && !system {
        bail!(
            "say where to install the CA: --nssdb DIR (Chromium, e.g. ~/.pki/nssdb) and/or --system"
        );
    }
    let cert_path = dir.join(CERT_FILE);
    if !cert_path.exists() {
        bail!(
            "no CA certificate at {} — create one with `gateway ca init`",
            cert_path.display()
        );
    }
    if let Some(db) = nssdb {
        trust_nssdb(&cert_path, db)?;
        println!(
            "installed {NSS_NICKNAME:?} into the NSS database {}",
            db.display()
        );
    }
    if system {
        trust_system(&cert_path, Path::new(SYSTEM_CERT))?;
        println!("installed the CA as {SYSTEM_CERT} and ran update-ca-certificates");
    }
    Ok(())
}

fn run(cmd: &mut Command, what: &str, package: &str) -> anyhow::Result<String> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("{prog} is not installed: apt-get install {package}")
        } else {
            anyhow!("running {prog}: {e}")
        }
    })?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Install the CA into a Chromium/NSS database (creating it if needed);
/// a previous "gateway CA" entry is replaced.
pub fn trust_nssdb(cert_path: &Path, db: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(db).with_context(|| format!("creating {}", db.display()))?;
    let sql = format!("sql:{}", db.display());
    if !db.join("cert9.db").exists() {
        run(
            Command::new("certutil").args(["-N", "--empty-password", "-d", &sql]),
            "creating the NSS database",
            "libnss3-tools",
        )?;
    }
    let listed = run(
        Command::new("certutil").args(["-L", "-d", &sql]),
        "listing the NSS database",
        "libnss3-tools",
    )?;
    if listed.lines().any(|l| l.starts_with(NSS_NICKNAME)) {
        run(
            Command::new("certutil").args(["-D", "-n", NSS_NICKNAME, "-d", &sql]),
            "removing the previous gateway CA",
            "libnss3-tools",
        )?;
    }
    run(
        Command::new("certutil")
            .args(["-A", "-n", NSS_NICKNAME, "-t", "C,,", "-i"])
            .arg(cert_path)
            .args(["-d", &sql]),
        "adding the CA to the NSS database",
        "libnss3-tools",
    )?;
    // Run as root for a user's ~/.pki/nssdb: hand the files back to the owner.
    if let Ok(owner) = fs::metadata(db) {
        for entry in fs::read_dir(db)?.flatten() {
            let _ = std::os::unix::fs::chown(entry.path(), Some(owner.uid()), Some(owner.gid()));
        }
    }
    Ok(())
}

fn trust_system(cert_path: &Path, dest: &Path) -> anyhow::Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| {
            format!(
                "creating {} (is the ca-certificates package installed? apt-get install ca-certificates)",
                parent.display()
            )
        })?;
    }
    let pem = fs::read(cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
    write_file(dest, &pem, 0o644)
        .map_err(|e| anyhow!("{e:#} — installing into the system store needs root"))?;
    run(
        &mut Command::new("update-ca-certificates"),
        "update-ca-certificates",
        "ca-certificates",
    )?;
    Ok(())
}

/// Mints and caches leaf certificates signed by the CA.
pub struct Minter {
    ca: Ca,
    capacity: usize,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    tick: u64,
    entries: HashMap<String, (Leaf, u64)>,
}

impl fmt::Debug for Minter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minter")
            .field("ca", &self.ca)
            .field("capacity", &self.capacity)
            .field("cached", &self.cached())
            .finish()
    }
}

impl Minter {
    pub fn new(ca: Ca) -> Minter {
        Minter::with_capacity(ca, DEFAULT_CACHE_CAPACITY)
    }

    pub fn with_capacity(ca: Ca, capacity: usize) -> Minter {
        Minter {
            ca,
            capacity: capacity.max(1),
            cache: Mutex::new(Cache::default()),
        }
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Number of cached leaves.
    pub fn cached(&self) -> usize {
        self.cache.lock().map(|c| c.entries.len()).unwrap_or(0)
    }

    /// The leaf for `name`, from the cache while it has validity to spare;
    /// least recently used entries are evicted beyond the capacity.
    pub fn get(&self, name: &str) -> anyhow::Result<Arc<CertifiedKey>> {
        let key = normalize(name)?;
        let now = Instant::now();
        {
            let mut c = self
                .cache
                .lock()
                .map_err(|_| anyhow!("leaf cache poisoned"))?;
            c.tick += 1;
            let tick = c.tick;
            if let Some((leaf, used)) = c.entries.get_mut(&key)
                && leaf.expires > now + LEAF_REFRESH_MARGIN
            {
                *used = tick;
                return Ok(leaf.key.clone());
            }
        }
        // Mint outside the lock; two racing mints for one name are harmless.
        let leaf = self.ca.mint(&key)?;
        let out = leaf.key.clone();
        let mut c = self
            .cache
            .lock()
            .map_err(|_| anyhow!("leaf cache poisoned"))?;
        c.tick += 1;
        let tick = c.tick;
        c.entries.insert(key, (leaf, tick));
        while c.entries.len() > self.capacity {
            let Some(oldest) = c
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            c.entries.remove(&oldest);
        }
        Ok(out)
    }

    /// A rustls server config that presents minted leaves: named by the
    /// client's SNI, else by `fallback` (e.g. the original destination IP).
    /// ALPN offers h2 and http/1.1.
    pub fn server_config(
        self: &Arc<Self>,
        fallback: Option<String>,
    ) -> anyhow::Result<Arc<ServerConfig>> {
        let mut cfg = ServerConfig::builder_with_provider(ring())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(MintingResolver {
                minter: self.clone(),
                fallback,
            }));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Resolves a server certificate by minting one for the requested name.
#[derive(Debug)]
pub struct MintingResolver {
    pub minter: Arc<Minter>,
    pub fallback: Option<String>,
}

impl ResolvesServerCert for MintingResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()
            .map(str::to_string)
            .or_else(|| self.fallback.clone())?;
        match self.minter.get(&name) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(event = "tls_mint_failed", name = %name, error = %format!("{e:#}"));
                None
            }
        }
    }
}
