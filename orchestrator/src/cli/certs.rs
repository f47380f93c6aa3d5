//! `drover certs`: a small certificate authority for a fleet, with rcgen
//! (ECDSA P-256, ring; no openssl needed).
//!
//! - `ca`: a CA certificate and key (`ca.pem`, `ca-key.pem`);
//! - `server`: a certificate for the orchestrator's MQTTS and HTTPS
//!   listeners, valid for the DNS names and IP addresses clients use;
//! - `client`: a device certificate whose subject Common Name is the device
//!   id, for mutual TLS.
//!
//! Private keys are written with mode 0600, and nothing is overwritten
//! without `--force`. A certificate never outlives the CA that signs it (it
//! would stop verifying the day the CA expires): an explicit `--days` beyond
//! the CA's expiry is refused, the default is cut to it, and an expired CA
//! signs nothing.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use drover_shared::DeviceId;
use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create a certificate authority: ca.pem and ca-key.pem.
    Ca {
        /// Subject Common Name of the CA.
        #[arg(long, default_value = "Drover fleet CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Create the orchestrator's server certificate: server.pem and server-key.pem.
    Server {
        /// Directory with ca.pem and ca-key.pem.
        #[arg(long)]
        ca: PathBuf,
        /// DNS name clients connect to (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
        /// IP address clients connect to (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Validity in days [default: 825, or until the CA expires if that is sooner].
        #[arg(long)]
        days: Option<u32>,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Create a device's client certificate (CN = device id): client.pem and client-key.pem.
    Client {
        /// Directory with ca.pem and ca-key.pem.
        #[arg(long)]
        ca: PathBuf,
        /// The device id the certificate is for.
        #[arg(long)]
        device_id: String,
        /// Validity in days [default: 825, or until the CA expires if that is sooner].
        #[arg(long)]
        days: Option<u32>,
        #[command(flatten)]
        out: OutArgs,
    },
}

#[derive(Debug, Args)]
pub struct OutArgs {
    /// Directory to write to (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable CA {what}: {source}")]
    BadCa {
        path: PathBuf,
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{key} is not the private key of {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("a server certificate needs at least one --name or --ip")]
    NoNames,
    #[error("invalid DNS name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("invalid device id {id:?}: {source}")]
    BadDeviceId {
        id: String,
        source: drover_shared::IdError,
    },
    #[error("--days must be at least 1")]
    Days,
    #[error("the CA in {path} expired on {until}; create a new one with `drover certs ca`")]
    CaExpired { path: PathBuf, until: time::Date },
    #[error(
        "--days {days} would outlive the CA in {path}, which expires on {until}: \
         give at most --days {max_days}, or renew the CA"
    )]
    OutlivesCa {
        days: u32,
        max_days: i64,
        path: PathBuf,
        until: time::Date,
    },
    #[error("cannot create certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// One file written, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    pub what: String,
}

/// Runs a `drover certs` subcommand and returns what it wrote.
pub fn run(cmd: &CertsCmd) -> Result<Vec<Written>, CertsError> {
    match cmd {
        CertsCmd::Ca { name, days, out } => create_ca(name, *days, &out.out, out.force),
        CertsCmd::Server {
            ca,
            names,
            ips,
            days,
            out,
        } => create_server(ca, names, ips, *days, &out.out, out.force),
        CertsCmd::Client {
            ca,
            device_id,
            days,
            out,
        } => create_client(ca, device_id, *days, &out.out, out.force),
    }
}

/// Leaf certificates' default validity in days (the longest TLS clients
/// have accepted for server certificates).
pub const LEAF_DAYS: u32 = 825;

/// Validity from an hour ago (devices' clocks drift) for `days`.
fn validity(params: &mut CertificateParams, days: u32) -> Result<OffsetDateTime, CertsError> {
    if days == 0 {
        return Err(CertsError::Days);
    }
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    Ok(params.not_after)
}

/// A random positive 128-bit serial number.
fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// A CA loaded from its directory, ready to sign.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    until: OffsetDateTime,
}

/// The validity of a certificate `ca` signs: `days` (default
/// [`LEAF_DAYS`]), but never past the CA's own expiry. An explicit `days`
/// that would outlive it is an error; the default is cut to it.
fn within_ca(
    params: &mut CertificateParams,
    days: Option<u32>,
    ca: &Ca,
) -> Result<OffsetDateTime, CertsError> {
    let now = OffsetDateTime::now_utc();
    if ca.until <= now {
        return Err(CertsError::CaExpired {
            path: ca.dir.clone(),
            until: ca.until.date(),
        });
    }
    let until = validity(params, days.unwrap_or(LEAF_DAYS))?;
    if until <= ca.until {
        return Ok(until);
    }
    // Within a day of it is cut, not refused: `--days 30` right after a
    // 30-day CA would otherwise miss by the seconds in between.
    match days {
        Some(days) if until - ca.until > Duration::days(1) => Err(CertsError::OutlivesCa {
            days,
            max_days: (ca.until - now).whole_days() + 1,
            path: ca.dir.clone(),
            until: ca.until.date(),
        }),
        _ => {
            params.not_after = ca.until;
            Ok(ca.until)
        }
    }
}

fn leaf_params(
    cn: &str,
    days: Option<u32>,
    ca: &Ca,
) -> Result<(CertificateParams, OffsetDateTime), CertsError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.serial_number = Some(serial());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let until = within_ca(&mut params, days, ca)?;
    Ok((params, until))
}

pub fn create_ca(
    name: &str,
    days: u32,
    out: &Path,
    force: bool,
) -> Result<Vec<Written>, CertsError> {
    let files = [out.join(CA_CERT), out.join(CA_KEY)];
    check_free(&files, force)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.serial_number = Some(serial());
    // Issues device and server certificates only, no sub-CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let until = validity(&mut params, days)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_pair(out, &files, &cert.pem(), &key.serialize_pem(), force)?;
    Ok(report(&files, &format!("CA \"{name}\""), until))
}

pub fn create_server(
    ca_dir: &Path,
    names: &[String],
    ips: &[IpAddr],
    days: Option<u32>,
    out: &Path,
    force: bool,
) -> Result<Vec<Written>, CertsError> {
    if names.is_empty() && ips.is_empty() {
        return Err(CertsError::NoNames);
    }
    let files = [out.join(SERVER_CERT), out.join(SERVER_KEY)];
    check_free(&files, force)?;
    let ca = load_ca(ca_dir)?;
    let cn = names.first().cloned().unwrap_or_else(|| ips[0].to_string());
    let (mut params, until) = leaf_params(&cn, days, &ca)?;
    for name in names {
        let bad = |why| CertsError::BadName {
            name: name.clone(),
            why,
        };
        check_dns_name(name).map_err(bad)?;
        let dns = name
            .clone()
            .try_into()
            .map_err(|_| bad("not an IA5 string"))?;
        params.subject_alt_names.push(SanType::DnsName(dns));
    }
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.issuer)?;
    write_pair(out, &files, &cert.pem(), &key.serialize_pem(), force)?;
    let sans: Vec<String> = names
        .iter()
        .cloned()
        .chain(ips.iter().map(IpAddr::to_string))
        .collect();
    Ok(report(
        &files,
        &format!("server certificate for {}", sans.join(", ")),
        until,
    ))
}

pub fn create_client(
    ca_dir: &Path,
    device_id: &str,
    days: Option<u32>,
    out: &Path,
    force: bool,
) -> Result<Vec<Written>, CertsError> {
    let id = DeviceId::new(device_id).map_err(|source| CertsError::BadDeviceId {
        id: device_id.to_string(),
        source,
    })?;
    let files = [out.join(CLIENT_CERT), out.join(CLIENT_KEY)];
    check_free(&files, force)?;
    let ca = load_ca(ca_dir)?;
    let (mut params, until) = leaf_params(id.as_str(), days, &ca)?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.issuer)?;
    write_pair(out, &files, &cert.pem(), &key.serialize_pem(), force)?;
    Ok(report(
        &files,
        &format!("client certificate for device {id}"),
        until,
    ))
}

/// The CA in `dir`, checked: the key must belong to the certificate.
fn load_ca(dir: &Path) -> Result<Ca, CertsError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CertsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(&cert_path)?;
    let key_pem = read(&key_path)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|source| CertsError::BadCa {
        path: key_path.clone(),
        what: "key",
        source,
    })?;
    let (spki, until) = ca_public_key(&cert_pem).ok_or_else(|| CertsError::BadCa {
        path: cert_path.clone(),
        what: "certificate",
        source: rcgen::Error::CouldNotParseCertificate,
    })?;
    if spki != key.public_key_raw() {
        return Err(CertsError::KeyMismatch {
            cert: cert_path,
            key: key_path,
        });
    }
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| CertsError::BadCa {
        path: cert_path,
        what: "certificate",
        source,
    })?;
    Ok(Ca {
        issuer,
        dir: dir.to_path_buf(),
        until,
    })
}

/// The raw subject public key and the expiry of the first certificate in
/// `pem`.
fn ca_public_key(pem: &str) -> Option<(Vec<u8>, OffsetDateTime)> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let until = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()?;
    Some((cert.public_key().subject_public_key.data.to_vec(), until))
}

/// A host name as TLS clients match it (RFC 1123 labels, a `*.` wildcard
/// for the leftmost one): rcgen takes any ASCII, and a certificate for
/// `bad name!` would simply never match.
fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.parse::<IpAddr>().is_ok() {
        return Err("an IP address; give it with --ip");
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    if host.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label must be 1 to 63 characters");
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err("may only contain letters, digits, '-' and '.' (and a leading '*.')");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label must not start or end with '-'");
        }
    }
    Ok(())
}

fn check_free(files: &[PathBuf], force: bool) -> Result<(), CertsError> {
    if force {
        return Ok(());
    }
    match files.iter().find(|f| f.exists()) {
        Some(f) => Err(CertsError::Exists(f.clone())),
        None => Ok(()),
    }
}

/// Writes a certificate (0644) and its key (0600) into `dir`.
fn write_pair(
    dir: &Path,
    files: &[PathBuf; 2],
    cert_pem: &str,
    key_pem: &str,
    force: bool,
) -> Result<(), CertsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    // The key first: a certificate without its key is useless, a key
    // without its certificate is merely incomplete.
    write_file(&files[1], key_pem, 0o600, force)?;
    write_file(&files[0], cert_pem, 0o644, force)
}

fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), CertsError> {
    let err = |source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    };
    if force {
        // Re-created rather than truncated, so an old file's looser mode
        // does not carry over to a new key.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertsError::Exists(path.to_path_buf())
            } else {
                err(e)
            }
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(err)
}

fn report(files: &[PathBuf; 2], what: &str, until: OffsetDateTime) -> Vec<Written> {
    vec![
        Written {
            path: files[0].clone(),
            what: format!("{what}, valid until {}", until.date()),
        },
        Written {
            path: files[1].clone(),
            what: "its private key (mode 0600)".to_string(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::server::WebPkiClientVerifier;
    use rustls_pki_types::pem::PemObject;

    use super::*;

    fn cert(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).expect("pem certificate")
    }

    fn roots(ca_dir: &Path) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert(&ca_dir.join(CA_CERT))).expect("ca");
        Arc::new(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn client_certificate_names_the_device_and_chains_to_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        let out = dir.path().join("dev");
        create_ca("test CA", 30, &ca, false).expect("ca");
        let written = create_client(&ca, "pi-kitchen-01", Some(30), &out, false).expect("client");
        assert_eq!(written[0].path, out.join(CLIENT_CERT));
        let der = cert(&out.join(CLIENT_CERT));
        assert_eq!(
            drover_broker::tls::common_name(&der).as_deref(),
            Some("pi-kitchen-01")
        );
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
        let eku = parsed
            .extended_key_usage()
            .expect("eku")
            .expect("eku present");
        assert!(eku.value.client_auth && !eku.value.server_auth);

        // Exactly what the broker's mutual TLS checks.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca), provider())
            .build()
            .expect("verifier");
        verifier
            .verify_client_cert(&der, &[], UnixTime::now())
            .expect("client certificate verifies against the CA");

        // And not against another CA.
        let other = dir.path().join("other");
        create_ca("other CA", 30, &other, false).expect("other ca");
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&other), provider())
            .build()
            .expect("verifier");
        assert!(verifier
            .verify_client_cert(&der, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn server_certificate_is_valid_for_its_names_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        let out = dir.path().join("srv");
        create_ca("test CA", 30, &ca, false).expect("ca");
        create_server(
            &ca,
            &["drover.example".into()],
            &["127.0.0.1".parse().expect("ip")],
            Some(30),
            &out,
            false,
        )
        .expect("server");
        let der = cert(&out.join(SERVER_CERT));
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&ca), provider())
                .build()
                .expect("verifier");
        for name in ["drover.example", "127.0.0.1"] {
            let name = ServerName::try_from(name).expect("name");
            verifier
                .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
        let wrong = ServerName::try_from("other.example").expect("name");
        assert!(verifier
            .verify_server_cert(&der, &[], &wrong, &[], UnixTime::now())
            .is_err());
        // The broker accepts the pair as its identity.
        drover_broker::tls::server_config(
            &out.join(SERVER_CERT),
            &out.join(SERVER_KEY),
            Some(&ca.join(CA_CERT)),
            &[],
        )
        .expect("usable server identity");
    }

    #[test]
    fn keys_are_private_and_nothing_is_overwritten_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        create_ca("test CA", 30, &ca, false).expect("ca");
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&ca.join(CA_KEY)), 0o600);
        assert_eq!(mode(&ca.join(CA_CERT)), 0o644);

        let before = std::fs::read(ca.join(CA_KEY)).expect("read");
        let err = create_ca("test CA", 30, &ca, false).expect_err("exists");
        assert!(matches!(err, CertsError::Exists(_)), "{err}");
        assert_eq!(std::fs::read(ca.join(CA_KEY)).expect("read"), before);

        std::fs::set_permissions(ca.join(CA_KEY), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        create_ca("test CA", 30, &ca, true).expect("forced");
        assert_ne!(std::fs::read(ca.join(CA_KEY)).expect("read"), before);
        assert_eq!(mode(&ca.join(CA_KEY)), 0o600);
    }

    fn not_after(path: &Path) -> i64 {
        let der = cert(path);
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
        parsed.validity().not_after.timestamp()
    }

    #[test]
    fn certificates_do_not_outlive_their_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        let out = dir.path().join("dev");
        create_ca("short CA", 30, &ca, false).expect("ca");
        let ca_until = not_after(&ca.join(CA_CERT));

        // The default (825 days) is cut to the CA's expiry, and says so.
        let written = create_client(&ca, "dev-1", None, &out, false).expect("default days");
        assert_eq!(not_after(&out.join(CLIENT_CERT)), ca_until);
        let ca_date = OffsetDateTime::from_unix_timestamp(ca_until)
            .expect("date")
            .date()
            .to_string();
        assert!(written[0].what.contains(&ca_date), "{}", written[0].what);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca), provider())
            .build()
            .expect("verifier");
        verifier
            .verify_client_cert(&cert(&out.join(CLIENT_CERT)), &[], UnixTime::now())
            .expect("cut certificate verifies");

        // As many days as the CA has left is fine; more is refused, naming
        // the most that would do, and writes nothing.
        let out2 = dir.path().join("dev2");
        create_client(&ca, "dev-2", Some(30), &out2, false).expect("30 days under a 30-day CA");
        assert!(not_after(&out2.join(CLIENT_CERT)) <= ca_until);
        let out3 = dir.path().join("dev3");
        let err = create_server(
            &ca,
            &["drover.example".into()],
            &[],
            Some(365),
            &out3,
            false,
        )
        .expect_err("outlives the CA");
        assert!(
            matches!(err, CertsError::OutlivesCa { max_days: 30, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--days 30"), "{err}");
        assert!(!out3.exists());

        // An expired CA signs nothing.
        let old = dir.path().join("old");
        std::fs::create_dir(&old).expect("mkdir");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(10);
        params.not_after = now - Duration::days(1);
        let key = KeyPair::generate().expect("key");
        let expired = params.self_signed(&key).expect("self-signed");
        std::fs::write(old.join(CA_CERT), expired.pem()).expect("write");
        std::fs::write(old.join(CA_KEY), key.serialize_pem()).expect("write");
        let out4 = dir.path().join("dev4");
        let err = create_client(&old, "dev-4", None, &out4, false).expect_err("expired CA");
        assert!(matches!(err, CertsError::CaExpired { .. }), "{err}");
        assert!(err.to_string().contains("expired on"), "{err}");
        assert!(!out4.exists());
    }

    #[test]
    fn bad_input_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        let out = dir.path().join("out");
        assert!(matches!(
            create_client(&ca, "dev-1", Some(30), &out, false),
            Err(CertsError::Read { .. })
        ));
        create_ca("test CA", 30, &ca, false).expect("ca");
        assert!(matches!(
            create_client(&ca, "bad/id", Some(30), &out, false),
            Err(CertsError::BadDeviceId { .. })
        ));
        assert!(matches!(
            create_server(&ca, &[], &[], Some(30), &out, false),
            Err(CertsError::NoNames)
        ));
        for name in [
            "bad name!",
            "a..b",
            "-a.example",
            "x_y.example",
            "192.0.2.1",
            "*.",
        ] {
            assert!(
                matches!(
                    create_server(&ca, &[name.to_string()], &[], Some(30), &out, false),
                    Err(CertsError::BadName { .. })
                ),
                "{name}"
            );
        }
        assert!(!out.join(SERVER_CERT).exists());
        for name in ["localhost", "drover.example", "*.fleet.example", "pi-01"] {
            assert!(check_dns_name(name).is_ok(), "{name}");
        }
        assert!(matches!(
            create_client(&ca, "dev-1", Some(0), &out, false),
            Err(CertsError::Days)
        ));
        // A CA key that does not belong to the CA certificate.
        let other = dir.path().join("other");
        create_ca("other CA", 30, &other, false).expect("other");
        std::fs::copy(other.join(CA_KEY), ca.join(CA_KEY)).expect("copy");
        assert!(matches!(
            create_client(&ca, "dev-1", Some(30), &out, false),
            Err(CertsError::KeyMismatch { .. })
        ));
        assert!(!out.join(CLIENT_KEY).exists());
    }
}
