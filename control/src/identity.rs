//! Fleet identities: a fleet CA, certificates for operators and nodes, and the mutual-TLS QUIC
//! configurations built from them.
//!
//! A certificate's role is a SAN URI (`urn:edged:role:operator` or `urn:edged:role:node`):
//! operators may push, activate, roll back and remove; nodes may only sync and read `ls` and
//! `status` ([`crate::wire::Request::required_role`] says which for each request). Every node
//! certificate also carries the DNS name [`NODE_SERVER_NAME`], which clients verify, so nodes
//! can be addressed by IP without per-node names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::signing::{self, TrustedKeys};
use crate::wire::ALPN;

/// Unacknowledged bytes one connection may have in flight (see `transport`).
pub const SEND_WINDOW: u64 = 8 << 20;

/// The server name clients verify on every node's certificate.
pub const NODE_SERVER_NAME: &str = "edged-node";
const ROLE_PREFIX: &str = "urn:edged:role:";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("peer certificate: {0}")]
    Peer(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Operator,
    Node,
}

impl Role {
    fn uri(self) -> String {
        format!(
            "{ROLE_PREFIX}{}",
            match self {
                Role::Operator => "operator",
                Role::Node => "node",
            }
        )
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Operator => "operator",
            Role::Node => "node",
        })
    }
}

/// PEM certificate and private key.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Creates a fleet CA.
pub fn create_ca(fleet: &str) -> Result<CertifiedKey, IdentityError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{fleet} fleet CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    Ok(CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate for `name` with `role`, signed by `ca`.
pub fn issue(ca: &CertifiedKey, role: Role, name: &str) -> Result<CertifiedKey, IdentityError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .subject_alt_names
        .push(SanType::URI(role.uri().try_into()?));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if role == Role::Node {
        params
            .subject_alt_names
            .push(SanType::DnsName(NODE_SERVER_NAME.try_into()?));
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The role a (CA-verified) peer certificate carries.
pub fn role_of(cert: &CertificateDer<'_>) -> Result<Role, IdentityError> {
    use x509_parser::prelude::*;
    let (_, parsed) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| IdentityError::Peer(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityError::Peer(e.to_string()))?
        .ok_or_else(|| IdentityError::Peer("no subjectAltName, so no role".into()))?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            match uri.strip_prefix(ROLE_PREFIX) {
                Some("operator") => return Ok(Role::Operator),
                Some("node") => return Ok(Role::Node),
                _ => {}
            }
        }
    }
    Err(IdentityError::Peer(
        "certificate carries no edged role".into(),
    ))
}

/// The certificate chain the other end of `conn` presented (verified against the fleet CA by the
/// handshake), leaf first.
pub fn peer_certificates(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|certs| *certs)
}

/// The common name of a peer certificate, for logs.
pub fn common_name(cert: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::*;
    X509Certificate::from_der(cert.as_ref())
        .ok()
        .and_then(|(_, c)| {
            c.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok().map(String::from))
        })
        .unwrap_or_else(|| "?".into())
}

/// The set of files an operator (or a node) holds. Layout of an identity directory:
/// `ca.pem` (+ `ca.key` on the operator's machine), `<me>.pem`/`<me>.key`, and for operators
/// `signing.key`/`signing.pub`.
#[derive(Clone)]
pub struct FleetIdentity {
    pub ca_cert_pem: String,
    pub me: CertifiedKey,
    /// The congestion controller of every connection made with it.
    pub congestion: Congestion,
}

/// Which of quinn's congestion controllers a connection uses. Edge links (LTE, Wi-Fi) lose
/// packets without being congested: loss-based controllers (Cubic, NewReno) read every random
/// loss as congestion and hold far below the link rate (at 100 ms RTT and 1 % loss, the Mathis
/// bound is ~1.4 Mbit/s); BBR paces by the bandwidth and RTT it measures, so it is the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    #[default]
    Bbr,
    Cubic,
    NewReno,
}

impl Congestion {
    pub const ALL: [Congestion; 3] = [Congestion::Bbr, Congestion::Cubic, Congestion::NewReno];

    pub fn name(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
        }
    }

    fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        match self {
            Congestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(text: &str) -> Result<Congestion, String> {
        Congestion::ALL
            .into_iter()
            .find(|c| c.name() == text)
            .ok_or_else(|| {
                format!("unknown congestion controller `{text}` (bbr, cubic or newreno)")
            })
    }
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|e| IdentityError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes a file that must not exist yet, with mode 0600 (keys) or 0644.
pub fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| IdentityError::File {
            path: path.to_path_buf(),
            reason: if e.kind() == std::io::ErrorKind::AlreadyExists {
                "already exists; refusing to overwrite".into()
            } else {
                e.to_string()
            },
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| IdentityError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

impl FleetIdentity {
    /// Loads `ca.pem` and `<me>.pem`/`<me>.key` from `dir`.
    pub fn load(dir: &Path, me: &str) -> Result<FleetIdentity, IdentityError> {
        Ok(FleetIdentity {
            ca_cert_pem: read(&dir.join("ca.pem"))?,
            me: CertifiedKey {
                cert_pem: read(&dir.join(format!("{me}.pem")))?,
                key_pem: read(&dir.join(format!("{me}.key")))?,
            },
            congestion: Congestion::default(),
        })
    }

    /// The same identity, its connections using `congestion`.
    pub fn with_congestion(mut self, congestion: Congestion) -> FleetIdentity {
        self.congestion = congestion;
        self
    }

    fn roots(&self) -> Result<RootCertStore, IdentityError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_cert_pem.as_bytes()) {
            let cert = cert.map_err(|e| IdentityError::Tls(format!("fleet CA: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| IdentityError::Tls(format!("fleet CA: {e}")))?;
        }
        Ok(roots)
    }

    fn chain(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IdentityError> {
        let certs = CertificateDer::pem_slice_iter(self.me.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::Tls(format!("certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.me.key_pem.as_bytes())
            .map_err(|e| IdentityError::Tls(format!("private key: {e}")))?;
        Ok((certs, key))
    }

    /// A QUIC server that requires a client certificate from the fleet CA.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, IdentityError> {
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let (certs, key) = self.chain()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport(self.congestion));
        Ok(config)
    }

    /// A QUIC client presenting this identity and trusting only the fleet CA.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, IdentityError> {
        let (certs, key) = self.chain()?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs, key)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport(self.congestion));
        Ok(config)
    }
}

/// ring, explicitly: quinn and rustls default to different providers, and two compiled-in
/// providers with none chosen panic at start-up.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Flaky edge links: notice a dead peer within 30 s, keep NATs open with 10 s keep-alives, a
/// loss-tolerant congestion controller by default (see [`Congestion`]), and receive windows
/// large enough for a push to saturate a good link. The send window bounds what one connection
/// buffers unacknowledged (memory a node spends on a slow peer): 8 MiB still fills 640 Mbit/s
/// at 100 ms RTT.
fn transport(congestion: Congestion) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30)).expect("30 s fits"),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(32 << 20));
    t.send_window(SEND_WINDOW);
    t.congestion_controller_factory(congestion.factory());
    Arc::new(t)
}

/// Creates an operator identity directory: fleet CA, operator certificate, signing key.
/// Refuses to overwrite anything.
pub fn init_operator_dir(dir: &Path, operator: &str) -> Result<(), IdentityError> {
    std::fs::create_dir_all(dir).map_err(|e| IdentityError::File {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    for file in [
        "ca.pem",
        "ca.key",
        "operator.pem",
        "operator.key",
        "signing.key",
        "signing.pub",
    ] {
        if dir.join(file).exists() {
            return Err(IdentityError::File {
                path: dir.join(file),
                reason: "already exists; refusing to overwrite".into(),
            });
        }
    }
    let ca = create_ca(operator)?;
    let op = issue(&ca, Role::Operator, operator)?;
    let signing = signing::generate_signing_key();
    write_new(&dir.join("ca.pem"), &ca.cert_pem, false)?;
    write_new(&dir.join("ca.key"), &ca.key_pem, true)?;
    write_new(&dir.join("operator.pem"), &op.cert_pem, false)?;
    write_new(&dir.join("operator.key"), &op.key_pem, true)?;
    write_new(
        &dir.join("signing.key"),
        &signing::signing_key_to_hex(&signing),
        true,
    )?;
    write_new(
        &dir.join("signing.pub"),
        &format!("{}\n", hex::encode(signing.verifying_key().as_bytes())),
        false,
    )?;
    Ok(())
}

/// Issues a node certificate from the operator directory's CA into `out` as `<name>.pem`/`.key`
/// plus a copy of `ca.pem` and `signing.pub` (what a node needs to verify pushes).
pub fn issue_node_files(operator_dir: &Path, name: &str, out: &Path) -> Result<(), IdentityError> {
    let ca = CertifiedKey {
        cert_pem: read(&operator_dir.join("ca.pem"))?,
        key_pem: read(&operator_dir.join("ca.key"))?,
    };
    let node = issue(&ca, Role::Node, name)?;
    std::fs::create_dir_all(out).map_err(|e| IdentityError::File {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_new(&out.join(format!("{name}.pem")), &node.cert_pem, false)?;
    write_new(&out.join(format!("{name}.key")), &node.key_pem, true)?;
    if !out.join("ca.pem").exists() {
        write_new(&out.join("ca.pem"), &ca.cert_pem, false)?;
    }
    let public = operator_dir.join("signing.pub");
    if public.exists() && !out.join("signing.pub").exists() {
        write_new(&out.join("signing.pub"), &read(&public)?, false)?;
    }
    Ok(())
}

/// Trusted operator keys from public-key files.
pub fn trusted_keys(files: &[PathBuf]) -> Result<TrustedKeys, signing::SignError> {
    let mut keys = TrustedKeys::default();
    for file in files {
        keys.add_file(file)?;
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_names_round_trip_and_bbr_is_the_default() {
        for c in Congestion::ALL {
            assert_eq!(c.name().parse::<Congestion>().unwrap(), c);
            let toml_value: Congestion = serde_json::from_str(&format!("\"{c}\"")).unwrap();
            assert_eq!(toml_value, c);
        }
        assert_eq!(Congestion::default(), Congestion::Bbr);
        let refused = "reno".parse::<Congestion>().unwrap_err();
        assert!(refused.contains("bbr, cubic or newreno"), "{refused}");
    }

    #[test]
    fn roles_survive_issuing_and_parsing() {
        let ca = create_ca("test").unwrap();
        for role in [Role::Operator, Role::Node] {
            let issued = issue(&ca, role, "x").unwrap();
            let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
            assert_eq!(role_of(&der).unwrap(), role);
            assert_eq!(common_name(&der), "x");
        }
    }

    #[test]
    fn init_refuses_to_overwrite_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        init_operator_dir(dir.path(), "ops").unwrap();
        for (file, mode) in [
            ("ca.key", 0o600),
            ("operator.key", 0o600),
            ("signing.key", 0o600),
            ("ca.pem", 0o644),
        ] {
            let meta = std::fs::metadata(dir.path().join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }
        let err = init_operator_dir(dir.path(), "ops").unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    }
}
