//! `TestCa`: a throwaway certificate authority for the tests' TLS origins.
//!
//! The CA and every leaf it issues are ECDSA P-256. Leaves carry what
//! Chromium (and rustls/webpki) insist on: subjectAltName entries for every
//! DNS name and IP, the serverAuth extended key usage, digitalSignature key
//! usage, `CA:FALSE`, an authority key identifier, a random serial, and a
//! validity of now-1h .. now+30d (well under the 398-day cap).
//!
//! The CA's subject carries a per-run unique organisational unit, so two
//! CAs with the same common name never collide in one NSS database.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

pub struct TestCa {
    dir: PathBuf,
    cert: Certificate,
    key: KeyPair,
    pem_path: PathBuf,
    key_path: PathBuf,
    issued: u32,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("pem_path", &self.pem_path)
            .field("issued", &self.issued)
            .finish()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero octet: 127 bits of randomness.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

impl TestCa {
    /// Create a CA named `common_name` and write its certificate to
    /// `<dir>/ca.pem` (and its key to `<dir>/ca-key.pem`). `dir` must exist;
    /// the caller owns its cleanup (usually a `TempDir`).
    pub fn new(dir: &Path, common_name: &str) -> TestCa {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "gateway-tests");
        dn.push(
            DnType::OrganizationalUnitName,
            crate::unique(crate::PREFIX).as_str(),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).expect("self-sign the test CA");
        let pem_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        write(&pem_path, &cert.pem());
        write(&key_path, &key.serialize_pem());
        TestCa {
            dir: dir.to_path_buf(),
            cert,
            key,
            pem_path,
            key_path,
            issued: 0,
        }
    }

    /// `<dir>/ca.pem`: the CA certificate, for `curl --cacert`, a trust
    /// store, or `certutil -A`.
    pub fn pem_path(&self) -> &Path {
        &self.pem_path
    }

    /// `<dir>/ca-key.pem`: the CA's PKCS#8 private key.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// The CA certificate in PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA certificate in DER.
    pub fn der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    /// Issue a server leaf for `names` (DNS SANs; the first is also the
    /// subject CN) and `ips` (IP SANs). Writes `<dir>/leaf-N.pem` and
    /// `<dir>/leaf-N-key.pem` and returns (certificate path, key path).
    pub fn issue(&mut self, names: &[&str], ips: &[IpAddr]) -> (PathBuf, PathBuf) {
        assert!(
            !names.is_empty() || !ips.is_empty(),
            "a leaf needs at least one name or IP"
        );
        let key = KeyPair::generate().expect("generate leaf key");
        let mut params = CertificateParams::default();
        let mut sans = Vec::new();
        for n in names {
            let dns = (*n)
                .to_owned()
                .try_into()
                .unwrap_or_else(|e| panic!("{n:?} is not a DNS name: {e}"));
            sans.push(SanType::DnsName(dns));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        let cn = names
            .first()
            .map(|n| n.to_string())
            .unwrap_or_else(|| ips[0].to_string());
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(30);
        params.serial_number = Some(random_serial());
        let leaf = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign the leaf");
        self.issued += 1;
        let cert_path = self.dir.join(format!("leaf-{}.pem", self.issued));
        let key_path = self.dir.join(format!("leaf-{}-key.pem", self.issued));
        write(&cert_path, &leaf.pem());
        write(&key_path, &key.serialize_pem());
        (cert_path, key_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    /// webpki (what rustls clients use) accepts the leaf for each of its
    /// names and IPs as a server certificate, and rejects other names.
    #[test]
    fn issued_leaves_verify_as_server_certificates() {
        let dir = crate::TempDir::new();
        let mut ca = TestCa::new(dir.path(), "gateway-tests CA");
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let (cert, key) = ca.issue(&["origin.test", "www.origin.test"], &[ip]);
        assert!(
            std::fs::read_to_string(&key)
                .unwrap()
                .contains("BEGIN PRIVATE KEY")
        );
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(ca.pem_path()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let leaf = CertificateDer::from_pem_file(&cert).unwrap();
        let verify = |name: &str| {
            verifier.verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
        };
        for ok in ["origin.test", "www.origin.test", "10.1.2.3"] {
            verify(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert!(verify("other.test").is_err());
    }
}
