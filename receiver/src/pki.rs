//! The receiver's own certificate authority.
//!
//! Every receiver is its own CA: `init` creates a CA and a server certificate,
//! `enroll` issues each source server a client certificate whose subject CN is the
//! server's name. Agents trust only this CA (from their bundle); the receiver
//! accepts only client certificates this CA signed. So the CA key is the root of
//! all trust in a deployment, and [`client_name_from_cert`] — applied to the
//! certificate rustls has *verified* — is the only way the receiver learns who an
//! agent is. Nothing the agent says about itself on the wire overrides it.
//!
//! # Layout under the receiver directory `D`
//!
//! | file                        | mode | what                                       |
//! |-----------------------------|------|--------------------------------------------|
//! | `D/pki/`                    | 0700 |                                            |
//! | `D/pki/ca.pem`              | 0644 | CA certificate (10 years)                  |
//! | `D/pki/ca.key`              | 0600 | CA private key, PKCS#8 PEM                 |
//! | `D/pki/server.pem`          | 0644 | receiver certificate, serverAuth (5 years) |
//! | `D/pki/server.key`          | 0600 | its private key                            |
//! | `D/pki/issued/<server>.pem` | 0644 | latest client certificate issued to it     |
//! | `D/pki/issued/<server>.<serial>.pem` | 0644 | earlier ones, kept for `revoke`   |
//! | `D/pki/revoked.txt`         | 0644 | revoked serials: `<serial hex> <server> <unix s>` |
//!
//! All keys are ECDSA P-256. `D/pki` is built in a hidden sibling directory and
//! renamed into place, so a crash during `init` leaves either no PKI or a whole one.
//!
//! # Certificates
//! - CA: CN `Lifeboat receiver CA`, O `Lifeboat`, OU `receiver <16 hex digits>`
//!   (the random 64-bit CA id, also its serial), so two receivers' CAs have distinct
//!   names and a bundle from the wrong receiver fails with "unknown issuer" rather
//!   than a confusing signature error. Basic constraints CA, path length 0 (it signs
//!   only end-entity certificates), key usages keyCertSign + cRLSign.
//! - Server: CN `lifeboat-receiver`, SANs `localhost`, `127.0.0.1`, `::1` and every
//!   extra name given to [`Pki::create`]; EKU serverAuth.
//! - Client: CN = the source server's name, EKU clientAuth, random 128-bit serial.
//!   A client certificate cannot act as the receiver, nor the receiver's as a client,
//!   because rustls/webpki enforce the EKUs.
//!
//! Certificates are backdated by 30 days to tolerate clock skew between the
//! receiver and its agents.
//!
//! # Revocation
//! `lifeboat-receiver revoke --server NAME` ([`Pki::revoke`]) adds the serial of
//! every certificate ever issued to NAME (the current record and the earlier
//! ones `enroll` archived) to `D/pki/revoked.txt`. `serve` checks each new
//! connection's certificate serial against that list ([`Revocations`]) and,
//! within a second of the file changing, closes live connections whose
//! certificate was revoked. Re-enrolling afterwards issues a new serial, which
//! is not revoked. Re-enrolling without revoking leaves the earlier
//! certificate valid until it expires (the usual reason to revoke).

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lifeboat_protocol::ServerName;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use crate::fsutil;

/// The ALPN protocol id of Lifeboat's wire protocol, version 1.
pub const ALPN_LIFEBOAT_V1: &[u8] = b"lifeboat/1";

/// The CA certificate's common name.
pub const CA_COMMON_NAME: &str = "Lifeboat receiver CA";

/// The receiver certificate's common name.
pub const SERVER_COMMON_NAME: &str = "lifeboat-receiver";

/// Names always present in the receiver certificate.
pub const DEFAULT_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 1825;
/// How far back certificates are valid from: a source server whose clock is
/// behind the receiver's (a bad NTP step, a VM restored from a snapshot) by
/// up to this still accepts the receiver's certificate.
const BACKDATE: Duration = Duration::days(30);

/// Errors of the receiver's PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// `init` found a PKI (or something in its place) already there.
    #[error("{} already exists: this receiver already has a PKI (refusing to overwrite it)", path.display())]
    AlreadyExists {
        /// The existing path.
        path: PathBuf,
    },
    /// A file the PKI needs is missing.
    #[error("{} is missing: is {} a receiver directory made by `lifeboat-receiver init`?", path.display(), dir.display())]
    Missing {
        /// The missing file.
        path: PathBuf,
        /// The receiver directory.
        dir: PathBuf,
    },
    /// Reading or writing a PKI file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A PKI file does not hold what it should.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An extra subject alternative name for the receiver certificate is unusable.
    #[error("invalid receiver certificate name {name:?}: {reason}")]
    BadSan {
        /// The rejected name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Generating a key or signing a certificate failed.
    #[error("generating the {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The underlying error.
        source: rcgen::Error,
    },
    /// `revoke` was asked for a server that was never enrolled.
    #[error("no certificate was ever issued to {server:?} (see {})", dir.display())]
    NeverIssued {
        /// The server name.
        server: String,
        /// `D/pki/issued`.
        dir: PathBuf,
    },
    /// A peer's certificate does not name a valid source server.
    #[error("peer certificate: {0}")]
    PeerCert(String),
    /// rustls refused the configuration built from the PKI files.
    #[error("building the TLS server configuration: {0}")]
    Tls(String),
}

/// A client certificate and key freshly issued to a source server.
#[derive(Clone)]
pub struct IssuedClient {
    /// The client certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM. A secret: it goes into the bundle and nowhere else.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedClient")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A receiver's PKI on disk (see the module documentation for the layout).
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

/// A random positive serial of `bytes` bytes (top bit clear, so DER needs no pad).
fn random_serial(bytes: usize) -> SerialNumber {
    let mut v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    v[0] &= 0x7f;
    // A zero leading byte would shorten the DER integer; harmless, but keep the length.
    v[0] |= 0x01;
    SerialNumber::from_slice(&v)
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days);
}

/// Parses a subject alternative name: an IP address if it parses as one, else a
/// DNS name (checked to be IA5 and plausible).
fn parse_san(name: &str) -> Result<SanType, PkiError> {
    let bad = |reason: &str| PkiError::BadSan {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // Strip IPv6 brackets a user may copy from a `[::1]:7443` address.
    if let Some(inner) = name.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        if let Ok(ip) = inner.parse::<IpAddr>() {
            return Ok(SanType::IpAddress(ip));
        }
    }
    if rustls::pki_types::DnsName::try_from(name).is_err() {
        return Err(bad("neither an IP address nor a valid DNS name"));
    }
    let ia5 = rcgen::string::Ia5String::try_from(name).map_err(|e| bad(&e.to_string()))?;
    Ok(SanType::DnsName(ia5))
}

fn read_to_string(path: &Path, dir: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            PkiError::Missing {
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
            }
        } else {
            PkiError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Parses all certificates of a PEM file (at least one).
fn certs_from_pem(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate: {e}"),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Corrupt {
            path: path.to_path_buf(),
            reason: "holds no PEM certificate".into(),
        });
    }
    Ok(certs)
}

impl Pki {
    /// Creates a new PKI under `dir/pki`: CA, receiver certificate (with
    /// [`DEFAULT_SANS`] plus `extra_sans`, each an IP if it parses as one, else a DNS
    /// name) and an empty `issued/`.
    ///
    /// Refuses with [`PkiError::AlreadyExists`] if `dir/pki` exists at all, even
    /// empty or partial. `dir` itself must exist.
    pub fn create(dir: &Path, extra_sans: &[String]) -> Result<Pki, PkiError> {
        let pki_dir = dir.join("pki");
        let ca_pem_path = pki_dir.join("ca.pem");
        for p in [&ca_pem_path, &pki_dir] {
            if p.symlink_metadata().is_ok() {
                return Err(PkiError::AlreadyExists { path: p.clone() });
            }
        }

        // Everything is generated in memory first: a bad --san fails before any file.
        let mut sans = Vec::new();
        for name in DEFAULT_SANS
            .iter()
            .copied()
            .chain(extra_sans.iter().map(String::as_str))
        {
            let san = parse_san(name)?;
            if !sans.contains(&san) {
                sans.push(san);
            }
        }

        // 62 random bits under a fixed top bit: positive, always 16 hex digits.
        let ca_id: u64 = (rand::random::<u64>() >> 2) | (1 << 62);
        let ca_key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        ca.distinguished_name
            .push(DnType::OrganizationName, "Lifeboat");
        ca.distinguished_name.push(
            DnType::OrganizationalUnitName,
            format!("receiver {ca_id:016x}"),
        );
        ca.serial_number = Some(SerialNumber::from(ca_id));
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut ca, CA_VALIDITY_DAYS);
        let ca_cert = ca.self_signed(&ca_key).map_err(gen_err("CA certificate"))?;
        let issuer = Issuer::new(ca, &ca_key);

        let server_key = KeyPair::generate().map_err(gen_err("receiver key"))?;
        let mut server = CertificateParams::default();
        server.distinguished_name = rcgen::DistinguishedName::new();
        server
            .distinguished_name
            .push(DnType::CommonName, SERVER_COMMON_NAME);
        server.subject_alt_names = sans;
        server.serial_number = Some(random_serial(16));
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.use_authority_key_identifier_extension = true;
        validity(&mut server, LEAF_VALIDITY_DAYS);
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .map_err(gen_err("receiver certificate"))?;

        // Build aside, then rename into place: all or nothing.
        let tmp = dir.join(format!(".pki.tmp.{:016x}", rand::random::<u64>()));
        let build = || -> Result<(), PkiError> {
            fsutil::create_private_dir(&tmp).map_err(io_err(&tmp))?;
            let issued = tmp.join("issued");
            fsutil::create_private_dir(&issued).map_err(io_err(&issued))?;
            for (name, contents, mode) in [
                ("ca.key", ca_key.serialize_pem(), 0o600),
                ("ca.pem", ca_cert.pem(), 0o644),
                ("server.key", server_key.serialize_pem(), 0o600),
                ("server.pem", server_cert.pem(), 0o644),
            ] {
                let p = tmp.join(name);
                fsutil::create_new(&p, contents.as_bytes(), mode).map_err(io_err(&p))?;
            }
            fsutil::fsync_dir(&issued).map_err(io_err(&issued))?;
            fsutil::fsync_dir(&tmp).map_err(io_err(&tmp))?;
            if pki_dir.symlink_metadata().is_ok() {
                return Err(PkiError::AlreadyExists {
                    path: pki_dir.clone(),
                });
            }
            fs::rename(&tmp, &pki_dir).map_err(io_err(&pki_dir))?;
            fsutil::fsync_dir(dir).map_err(io_err(dir))
        };
        if let Err(e) = build() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        tracing::debug!(dir = %pki_dir.display(), ca_id = format_args!("{ca_id:016x}"), "created receiver PKI");
        Ok(Pki {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens the PKI of receiver directory `dir`, checking that every file is there
    /// and that the CA certificate parses.
    pub fn open(dir: &Path) -> Result<Pki, PkiError> {
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        for p in [
            pki.ca_pem_path(),
            pki.ca_key_path(),
            pki.server_pem_path(),
            pki.server_key_path(),
        ] {
            if !p.exists() {
                return Err(PkiError::Missing {
                    path: p,
                    dir: dir.to_path_buf(),
                });
            }
        }
        let ca = pki.ca_cert_pem()?;
        certs_from_pem(&pki.ca_pem_path(), &ca)?;
        Ok(pki)
    }

    /// The receiver directory this PKI belongs to.
    pub fn receiver_dir(&self) -> &Path {
        &self.dir
    }

    /// `D/pki`.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// `D/pki/ca.pem`.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.pki_dir().join("ca.pem")
    }

    /// `D/pki/ca.key`.
    pub fn ca_key_path(&self) -> PathBuf {
        self.pki_dir().join("ca.key")
    }

    /// `D/pki/server.pem`.
    pub fn server_pem_path(&self) -> PathBuf {
        self.pki_dir().join("server.pem")
    }

    /// `D/pki/server.key`.
    pub fn server_key_path(&self) -> PathBuf {
        self.pki_dir().join("server.key")
    }

    /// `D/pki/issued/<server>.pem`: the record of the latest certificate issued to `server`.
    pub fn issued_path(&self, server: &ServerName) -> PathBuf {
        self.pki_dir()
            .join("issued")
            .join(format!("{}.pem", server.as_str()))
    }

    /// The CA certificate, PEM (what goes into bundles).
    pub fn ca_cert_pem(&self) -> Result<String, PkiError> {
        read_to_string(&self.ca_pem_path(), &self.dir)
    }

    /// The names (DNS names lower-cased, IPs in canonical form) the receiver
    /// certificate is valid for; a bundle's `tls_name` must be one of them.
    pub fn server_names(&self) -> Result<Vec<String>, PkiError> {
        let path = self.server_pem_path();
        let pem = read_to_string(&path, &self.dir)?;
        let der = certs_from_pem(&path, &pem)?.remove(0);
        let corrupt = |reason: String| PkiError::Corrupt {
            path: path.clone(),
            reason,
        };
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| corrupt(format!("unparseable certificate: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| corrupt(format!("unparseable subjectAltName: {e}")))?
            .ok_or_else(|| corrupt("certificate has no subjectAltName".into()))?;
        let mut names = Vec::new();
        for name in &san.value.general_names {
            use x509_parser::extensions::GeneralName;
            match name {
                GeneralName::DNSName(n) => names.push(n.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(*b).expect("length checked")),
                        16 => IpAddr::from(<[u8; 16]>::try_from(*b).expect("length checked")),
                        _ => return Err(corrupt("malformed IP address in subjectAltName".into())),
                    };
                    names.push(ip.to_string());
                }
                _ => {}
            }
        }
        Ok(names)
    }

    /// Issues `server` a client certificate (CN = its name, clientAuth, 5 years)
    /// signed by the CA, and records it in `D/pki/issued/<server>.pem`, replacing
    /// the record (the earlier one is archived as `<server>.<serial>.pem`; the
    /// earlier certificate stays valid until it expires or is revoked).
    pub fn issue_client(&self, server: &ServerName) -> Result<IssuedClient, PkiError> {
        let ca_key_path = self.ca_key_path();
        let ca_key_pem = read_to_string(&ca_key_path, &self.dir)?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Corrupt {
            path: ca_key_path.clone(),
            reason: format!("not a usable private key: {e}"),
        })?;
        let ca_pem = self.ca_cert_pem()?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(|e| PkiError::Corrupt {
            path: self.ca_pem_path(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;

        let key = KeyPair::generate().map_err(gen_err("client key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, server.as_str());
        params.serial_number = Some(random_serial(16));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, LEAF_VALIDITY_DAYS);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(gen_err("client certificate"))?;
        let issued = IssuedClient {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };

        let record = self.issued_path(server);
        // The earlier certificate stays valid until it expires or is revoked:
        // keep its record so `revoke` can find its serial.
        if let Ok(old) = fs::read_to_string(&record) {
            if let Some(serial) = serial_of_pem(&old) {
                let archive = record.with_file_name(format!("{server}.{serial}.pem"));
                fsutil::write_atomic(&archive, old.as_bytes(), 0o644).map_err(io_err(&archive))?;
            }
        }
        fsutil::write_atomic(&record, issued.cert_pem.as_bytes(), 0o644)
            .map_err(io_err(&record))?;
        tracing::info!(%server, record = %record.display(), "issued client certificate");
        Ok(issued)
    }

    /// `D/pki/revoked.txt`.
    pub fn revoked_path(&self) -> PathBuf {
        self.pki_dir().join("revoked.txt")
    }

    /// The serials (hex) of every certificate issued to `server`: the current
    /// record and the archived earlier ones.
    pub fn issued_serials(&self, server: &ServerName) -> Result<Vec<String>, PkiError> {
        let dir = self.pki_dir().join("issued");
        let entries = fs::read_dir(&dir).map_err(io_err(&dir))?;
        let current = format!("{server}.pem");
        let archived = format!("{server}.");
        let mut serials = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_archive = name.strip_prefix(&archived).is_some_and(|rest| {
                rest.strip_suffix(".pem").is_some_and(|hex| {
                    !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit())
                })
            });
            if name != current && !is_archive {
                continue;
            }
            let path = entry.path();
            let pem = read_to_string(&path, &self.dir)?;
            let serial = serial_of_pem(&pem).ok_or_else(|| PkiError::Corrupt {
                path: path.clone(),
                reason: "not a PEM certificate".into(),
            })?;
            serials.push(serial);
        }
        serials.sort();
        serials.dedup();
        Ok(serials)
    }

    /// Revokes every certificate issued to `server`: their serials are added
    /// to `D/pki/revoked.txt` (written atomically). Returns the serials newly
    /// revoked (empty if all already were).
    pub fn revoke(&self, server: &ServerName) -> Result<Vec<String>, PkiError> {
        let serials = self.issued_serials(server)?;
        if serials.is_empty() {
            return Err(PkiError::NeverIssued {
                server: server.to_string(),
                dir: self.pki_dir().join("issued"),
            });
        }
        let path = self.revoked_path();
        let mut text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(PkiError::Io { path, source: e }),
        };
        let known = Revocations::parse(&text);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut added = Vec::new();
        for serial in serials {
            if !known.is_revoked(&serial) {
                text.push_str(&format!("{serial} {server} {now}\n"));
                added.push(serial);
            }
        }
        if !added.is_empty() {
            fsutil::write_atomic(&path, text.as_bytes(), 0o644).map_err(io_err(&path))?;
            tracing::info!(%server, serials = ?added, "revoked client certificates");
        }
        Ok(added)
    }

    /// The revoked serials (none if `D/pki/revoked.txt` does not exist).
    pub fn revocations(&self) -> Result<Revocations, PkiError> {
        let path = self.revoked_path();
        match fs::read_to_string(&path) {
            Ok(t) => Ok(Revocations::parse(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Revocations::default()),
            Err(e) => Err(PkiError::Io { path, source: e }),
        }
    }

    /// The rustls configuration `serve` uses: TLS 1.3 only, aws-lc-rs, the receiver
    /// certificate, client certificates *required* and verified against this CA
    /// only, ALPN [`ALPN_LIFEBOAT_V1`].
    pub fn server_tls_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());

        let ca_path = self.ca_pem_path();
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs_from_pem(&ca_path, &self.ca_cert_pem()?)? {
            roots.add(ca).map_err(|e| PkiError::Corrupt {
                path: ca_path.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| PkiError::Tls(format!("client certificate verifier: {e}")))?;

        let cert_path = self.server_pem_path();
        let chain = certs_from_pem(&cert_path, &read_to_string(&cert_path, &self.dir)?)?;
        let key_path = self.server_key_path();
        let key = PrivateKeyDer::from_pem_slice(read_to_string(&key_path, &self.dir)?.as_bytes())
            .map_err(|e| PkiError::Corrupt {
            path: key_path.clone(),
            reason: format!("not a PEM private key: {e}"),
        })?;

        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| {
                PkiError::Tls(format!(
                    "{} and {} do not form a usable pair: {e}",
                    cert_path.display(),
                    key_path.display()
                ))
            })?;
        config.alpn_protocols = vec![ALPN_LIFEBOAT_V1.to_vec()];
        Ok(config)
    }
}

/// Revoked certificate serials (lowercase hex), from `D/pki/revoked.txt`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    serials: std::collections::HashSet<String>,
}

impl Revocations {
    /// Parses the file's lines (`<serial hex> <server> <unix s>`); the serial
    /// is what counts, unreadable lines are skipped.
    pub fn parse(text: &str) -> Revocations {
        Revocations {
            serials: text
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|s| s.chars().all(|c| c.is_ascii_hexdigit()))
                .map(str::to_ascii_lowercase)
                .collect(),
        }
    }

    /// Whether the certificate with this serial (hex) is revoked.
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.serials.contains(&serial_hex.to_ascii_lowercase())
    }

    /// How many serials are revoked.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }
}

/// The serial number of a DER certificate, as lowercase hex without leading
/// zero bytes.
pub fn cert_serial_hex(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::PeerCert(format!("not an X.509 certificate: {e}")))?;
    Ok(hex_serial(cert.raw_serial()))
}

fn hex_serial(raw: &[u8]) -> String {
    let trimmed = match raw.iter().position(|&b| b != 0) {
        Some(i) => &raw[i..],
        None => &raw[raw.len().saturating_sub(1)..],
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// The serial (hex) of the first certificate in a PEM text.
fn serial_of_pem(pem: &str) -> Option<String> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    cert_serial_hex(der.as_ref()).ok()
}

/// The source server a client certificate was issued to: its subject CN, validated
/// as a [`ServerName`].
///
/// Call it only on a certificate the TLS layer has verified against the receiver
/// CA (the end-entity certificate of `peer_certificates()`); this function checks
/// the name, not the signature. A certificate with no CN or several is refused.
pub fn client_name_from_cert(der: &[u8]) -> Result<ServerName, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::PeerCert(format!("not an X.509 certificate: {e}")))?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns
        .next()
        .ok_or_else(|| PkiError::PeerCert("subject has no common name".into()))?;
    if cns.next().is_some() {
        return Err(PkiError::PeerCert(
            "subject has more than one common name".into(),
        ));
    }
    let cn = cn
        .as_str()
        .map_err(|e| PkiError::PeerCert(format!("subject common name is not a string: {e}")))?;
    ServerName::new(cn).map_err(|e| PkiError::PeerCert(e.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use lifeboat_protocol::bundle::BUNDLE_FORMAT_V1;
    use lifeboat_protocol::Bundle;
    use rustls::{ClientConnection, ServerConnection};

    /// Moves TLS records between the two ends until both finish the handshake or
    /// one fails; returns the first error and which side raised it.
    fn handshake(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> Result<(), (&'static str, rustls::Error)> {
        for _ in 0..20 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
                server.process_new_packets().map_err(|e| ("server", e))?;
            }
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().map_err(|e| ("client", e))?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    pub(crate) fn bundle_for(pki: &Pki, server: &str) -> Bundle {
        let server = ServerName::new(server).unwrap();
        let issued = pki.issue_client(&server).unwrap();
        Bundle {
            format: BUNDLE_FORMAT_V1.into(),
            server,
            receiver: "127.0.0.1:7443".into(),
            tls_name: "localhost".into(),
            ca_cert: pki.ca_cert_pem().unwrap(),
            client_cert: issued.cert_pem,
            client_key: issued.key_pem,
        }
    }

    fn connect(
        pki: &Pki,
        bundle: &Bundle,
    ) -> (
        ClientConnection,
        ServerConnection,
        Result<(), (&'static str, rustls::Error)>,
    ) {
        let client_cfg = lifeboat_agent::tls::client_tls_config(bundle).unwrap();
        let name = rustls::pki_types::ServerName::try_from(bundle.tls_name.clone()).unwrap();
        let mut client = ClientConnection::new(Arc::new(client_cfg), name).unwrap();
        let mut server = ServerConnection::new(Arc::new(pki.server_tls_config().unwrap())).unwrap();
        let r = handshake(&mut client, &mut server);
        (client, server, r)
    }

    #[test]
    fn enrolled_agent_completes_mutual_tls_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), &["dr.example.com".into(), "10.0.0.7".into()]).unwrap();
        let pki = Pki::open(pki.receiver_dir()).unwrap();
        let bundle = Bundle::from_toml(&bundle_for(&pki, "web-1").to_toml()).unwrap();

        let (client, server, r) = connect(&pki, &bundle);
        r.unwrap();
        assert_eq!(client.alpn_protocol(), Some(ALPN_LIFEBOAT_V1));
        assert_eq!(server.alpn_protocol(), Some(ALPN_LIFEBOAT_V1));
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let peer = server.peer_certificates().unwrap();
        assert_eq!(client_name_from_cert(&peer[0]).unwrap().as_str(), "web-1");

        // The issued record is the certificate the agent presented.
        let record = fs::read_to_string(pki.issued_path(&bundle.server)).unwrap();
        assert_eq!(record, bundle.client_cert);

        // quinn accepts both configurations as they are.
        quinn::crypto::rustls::QuicServerConfig::try_from(pki.server_tls_config().unwrap())
            .unwrap();
        quinn::crypto::rustls::QuicClientConfig::try_from(
            lifeboat_agent::tls::client_tls_config(&bundle).unwrap(),
        )
        .unwrap();

        let names = pki.server_names().unwrap();
        for n in [
            "localhost",
            "127.0.0.1",
            "::1",
            "dr.example.com",
            "10.0.0.7",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
    }

    #[test]
    fn client_certificate_from_a_foreign_ca_is_rejected() {
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        let ours = Pki::create(ours.path(), &[]).unwrap();
        let theirs = Pki::create(theirs.path(), &[]).unwrap();

        // The agent trusts our CA but presents a certificate from another receiver.
        let mut bundle = bundle_for(&theirs, "web-1");
        bundle.ca_cert = ours.ca_cert_pem().unwrap();
        let (_, _, r) = connect(&ours, &bundle);
        let (side, err) = r.unwrap_err();
        assert_eq!(side, "server");
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );

        // And an agent enrolled elsewhere does not trust our receiver certificate.
        let bundle = bundle_for(&theirs, "web-1");
        let (_, _, r) = connect(&ours, &bundle);
        let (side, err) = r.unwrap_err();
        assert_eq!(side, "client");
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
    }

    #[test]
    fn agent_config_names_mismatched_bundle_fields() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), &[]).unwrap();
        let mut bundle = bundle_for(&pki, "web-1");
        bundle.client_key = bundle_for(&pki, "web-2").client_key;
        let e = format!(
            "{:#}",
            lifeboat_agent::tls::client_tls_config(&bundle).unwrap_err()
        );
        assert!(e.contains("client_cert") && e.contains("client_key"), "{e}");

        let mut bundle = bundle_for(&pki, "web-1");
        bundle.client_key = "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n".into();
        let e = format!(
            "{:#}",
            lifeboat_agent::tls::client_tls_config(&bundle).unwrap_err()
        );
        assert!(e.contains("client_key"), "{e}");
    }

    #[test]
    fn revoke_lists_every_certificate_ever_issued() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), &[]).unwrap();
        let server = ServerName::new("web-1").unwrap();
        let first = bundle_for(&pki, "web-1");
        let second = bundle_for(&pki, "web-1");
        let serial = |pem: &str| serial_of_pem(pem).unwrap();
        let (a, b) = (serial(&first.client_cert), serial(&second.client_cert));
        assert_ne!(a, b);
        let mut want = vec![a.clone(), b.clone()];
        want.sort();
        assert_eq!(pki.issued_serials(&server).unwrap(), want);
        assert!(pki.revocations().unwrap().is_empty());
        assert_eq!(pki.revoke(&server).unwrap(), want);
        let r = pki.revocations().unwrap();
        assert!(r.is_revoked(&a) && r.is_revoked(&b.to_uppercase()));
        assert!(pki.revoke(&server).unwrap().is_empty(), "already revoked");
        // A new certificate is not revoked.
        let third = bundle_for(&pki, "web-1");
        assert!(!pki
            .revocations()
            .unwrap()
            .is_revoked(&serial(&third.client_cert)));
        assert!(matches!(
            pki.revoke(&ServerName::new("db-9").unwrap()),
            Err(PkiError::NeverIssued { .. })
        ));
        assert_eq!(hex_serial(&[0, 0, 0x0a, 0xff]), "0aff");
        assert_eq!(hex_serial(&[0]), "00");
        assert_eq!(Revocations::parse("zz web-1 1\n\n0A web 2\n").len(), 1);
    }

    #[test]
    fn two_receivers_have_distinguishable_cas() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let subject = |p: &Pki| {
            let der = certs_from_pem(&p.ca_pem_path(), &p.ca_cert_pem().unwrap())
                .unwrap()
                .remove(0);
            let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert!(c.is_ca());
            c.subject().to_string()
        };
        let sa = subject(&Pki::create(a.path(), &[]).unwrap());
        let sb = subject(&Pki::create(b.path(), &[]).unwrap());
        assert!(sa.contains(CA_COMMON_NAME), "{sa}");
        assert_ne!(sa, sb);
    }

    #[test]
    fn client_name_comes_from_the_certificate_cn() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), &[]).unwrap();
        let issued = pki
            .issue_client(&ServerName::new("db_primary.2").unwrap())
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            client_name_from_cert(&der).unwrap().as_str(),
            "db_primary.2"
        );
        assert!(matches!(
            client_name_from_cert(b"not a certificate"),
            Err(PkiError::PeerCert(_))
        ));
    }

    #[test]
    fn create_refuses_an_existing_pki_and_open_names_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = Pki::open(dir.path()).unwrap_err();
        assert!(matches!(e, PkiError::Missing { .. }), "{e:?}");
        assert!(e.to_string().contains("ca.pem"), "{e}");

        Pki::create(dir.path(), &[]).unwrap();
        let e = Pki::create(dir.path(), &[]).unwrap_err();
        assert!(matches!(e, PkiError::AlreadyExists { .. }), "{e:?}");

        fs::remove_file(dir.path().join("pki/server.key")).unwrap();
        let e = Pki::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("server.key"), "{e}");

        // No temporary build directory is left behind.
        let entries: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("pki")]);
    }

    #[test]
    fn keys_are_private_and_bad_sans_fail_before_writing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let e = Pki::create(dir.path(), &["not a name!".into()]).unwrap_err();
        assert!(matches!(e, PkiError::BadSan { .. }), "{e:?}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

        let pki = Pki::create(dir.path(), &["[fd00::1]".into()]).unwrap();
        assert!(pki.server_names().unwrap().contains(&"fd00::1".to_string()));
        for (p, mode) in [
            (pki.ca_key_path(), 0o600),
            (pki.server_key_path(), 0o600),
            (pki.ca_pem_path(), 0o644),
            (pki.server_pem_path(), 0o644),
            (pki.pki_dir(), 0o700),
            (pki.pki_dir().join("issued"), 0o700),
        ] {
            let m = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, mode, "{}", p.display());
        }
    }
}
