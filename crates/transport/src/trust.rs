//! Trust: the cluster CA, node certificates, PEM files and the TLS
//! configurations built from them.
//!
//! A cluster has one CA (a self-signed ECDSA P-256 certificate with common
//! name `shoal cluster CA`). Each node has a certificate issued by it whose
//! only DNS subject alternative name is the node's name, usable both as a TLS
//! server and as a TLS client (extended key usages serverAuth and clientAuth).
//! Files, all PEM: `ca.crt` and `ca.key` for the CA (keep the key off the
//! nodes), `node.crt`, `node.key` and `ca.crt` for a node.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::TrustError;
use crate::name::NodeName;

/// ALPN protocol id of shoal's transport, version 1.
pub const ALPN: &[u8] = b"shoal/1";

const CA_COMMON_NAME: &str = "shoal cluster CA";
const CA_YEARS: i32 = 20;
/// Years a node certificate issued by [`ClusterCa::issue`] is valid.
pub const NODE_CERT_YEARS: i32 = 5;

/// A cluster's certificate authority: issues node certificates.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Good to within a day, which the one-year margin below absorbs.
    1970 + (secs / 31_556_952) as i32
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn pem_err(what: &'static str) -> impl Fn(rustls::pki_types::pem::Error) -> TrustError {
    move |e| TrustError::Pem {
        what,
        reason: e.to_string(),
    }
}

impl ClusterCa {
    /// Generates a new CA (P-256 key, valid from the start of last year for
    /// 20 years).
    ///
    /// # Errors
    /// [`TrustError::Generate`] if key or certificate generation fails.
    pub fn generate() -> Result<Self, TrustError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        let year = this_year();
        params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + CA_YEARS, 1, 1);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and private key (PEM text).
    ///
    /// # Errors
    /// [`TrustError::Pem`] for unparsable input, [`TrustError::KeyMismatch`]
    /// when the key is not the certificate's, [`TrustError::Certificate`] when
    /// the certificate is not a shoal CA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TrustError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(pem_err("CA certificate"))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| TrustError::Pem {
            what: "CA key",
            reason: e.to_string(),
        })?;
        let parsed = webpki::EndEntityCert::try_from(&cert_der)
            .map_err(|e| TrustError::Certificate(format!("CA certificate: {e}")))?;
        if parsed.subject_public_key_info().as_ref() != key.subject_public_key_info().as_slice() {
            return Err(TrustError::KeyMismatch("CA"));
        }
        // The issuer is rebuilt from the fixed CA parameters: the subject
        // name must therefore be the one shoal writes.
        let expected = ca_params().self_signed(&key)?;
        let expected = webpki::EndEntityCert::try_from(expected.der())
            .map_err(|e| TrustError::Certificate(e.to_string()))?;
        if expected.subject() != parsed.subject() {
            return Err(TrustError::Certificate(
                "not a shoal cluster CA (unexpected subject name)".into(),
            ));
        }
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der: cert_der.into_owned(),
            issuer: Issuer::new(ca_params(), key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key, PEM (PKCS#8). Secret: keep it off the nodes.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600 on Unix) into `dir`,
    /// creating it if needed.
    ///
    /// # Errors
    /// [`TrustError::Io`] naming the file that failed.
    pub fn write_pem_files(&self, dir: &Path) -> Result<(), TrustError> {
        create_dir(dir)?;
        write_file(&dir.join("ca.crt"), self.cert_pem.as_bytes(), false)?;
        write_file(&dir.join("ca.key"), self.key_pem().as_bytes(), true)
    }

    /// Reads a CA written by [`ClusterCa::write_pem_files`].
    ///
    /// # Errors
    /// As [`ClusterCa::from_pem`], and [`TrustError::Io`].
    pub fn read_pem_files(dir: &Path) -> Result<Self, TrustError> {
        Self::from_pem(
            &read_file(&dir.join("ca.crt"))?,
            &read_file(&dir.join("ca.key"))?,
        )
    }

    /// Issues a certificate and a fresh P-256 key for node `name`, valid from
    /// the start of last year for [`NODE_CERT_YEARS`] years.
    ///
    /// # Errors
    /// [`TrustError::Generate`] if generation fails.
    pub fn issue(&self, name: &NodeName) -> Result<NodeIdentity, TrustError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.as_str().to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let year = this_year();
        params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + NODE_CERT_YEARS, 1, 1);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeIdentity {
            name: name.clone(),
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
            ca: self.cert_der.clone(),
        })
    }
}

/// A node's credentials: its name, certificate and key, and the cluster CA
/// certificate it trusts.
#[derive(Clone)]
pub struct NodeIdentity {
    name: NodeName,
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
    ca: CertificateDer<'static>,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// The node's name, from its certificate.
    pub fn name(&self) -> &NodeName {
        &self.name
    }

    /// The node certificate, PEM.
    pub fn cert_pem(&self) -> String {
        to_pem("CERTIFICATE", &self.cert)
    }

    /// The node private key, PEM (PKCS#8). Secret.
    pub fn key_pem(&self) -> String {
        to_pem("PRIVATE KEY", &self.key_der)
    }

    /// The trusted cluster CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        to_pem("CERTIFICATE", &self.ca)
    }

    /// Loads and checks an identity: the certificate must be issued by the CA
    /// for exactly one valid node name, and the key must be its key.
    ///
    /// # Errors
    /// [`TrustError::Pem`], [`TrustError::Certificate`],
    /// [`TrustError::KeyMismatch`].
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, TrustError> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(pem_err("node certificate"))?;
        let ca =
            CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(pem_err("CA certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("node key"))?;
        let name = node_name_of(&cert)?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)?;
        let parsed = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| TrustError::Certificate(e.to_string()))?;
        if signing.public_key().as_ref().map(|k| k.as_ref())
            != Some(parsed.subject_public_key_info().as_ref())
        {
            return Err(TrustError::KeyMismatch("node"));
        }
        let identity = Self {
            name,
            cert,
            key_der: key.secret_der().to_vec(),
            ca,
        };
        // The certificate must verify against the CA as a server for its name
        // (the same check its peers will make).
        let tls = TlsConfigs::new(&identity)?;
        tls.server_verifier
            .verify_server_cert(
                &identity.cert,
                &[],
                &server_name(&identity.name)?,
                &[],
                UnixTime::now(),
            )
            .map_err(|e| TrustError::Certificate(e.to_string()))?;
        Ok(identity)
    }

    /// Writes `node.crt`, `node.key` (mode 0600 on Unix) and `ca.crt` into
    /// `dir`, creating it if needed.
    ///
    /// # Errors
    /// [`TrustError::Io`] naming the file that failed.
    pub fn write_pem_files(&self, dir: &Path) -> Result<(), TrustError> {
        create_dir(dir)?;
        write_file(&dir.join("node.crt"), self.cert_pem().as_bytes(), false)?;
        write_file(&dir.join("node.key"), self.key_pem().as_bytes(), true)?;
        write_file(&dir.join("ca.crt"), self.ca_pem().as_bytes(), false)
    }

    /// Reads an identity written by [`NodeIdentity::write_pem_files`].
    ///
    /// # Errors
    /// As [`NodeIdentity::from_pem`], and [`TrustError::Io`].
    pub fn read_pem_files(dir: &Path) -> Result<Self, TrustError> {
        Self::from_pem(
            &read_file(&dir.join("node.crt"))?,
            &read_file(&dir.join("node.key"))?,
            &read_file(&dir.join("ca.crt"))?,
        )
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }

    /// HMAC key for QUIC stateless resets, derived from the node key: a
    /// restarted node computes the same reset tokens as its previous run, so
    /// it resets the stale connections its peers still hold at once.
    pub(crate) fn reset_key(&self) -> ring::hmac::Key {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"shoal stateless reset key v1\0");
        ctx.update(&self.key_der);
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ctx.finish().as_ref())
    }
}

fn to_pem(label: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let idx = ((n >> (18 - 6 * i)) & 63) as usize;
                b64.push(char::from(ALPHABET.get(idx).copied().unwrap_or(b'A')));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    let bytes = b64.as_bytes();
    for line in bytes.chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

fn create_dir(dir: &Path) -> Result<(), TrustError> {
    std::fs::create_dir_all(dir).map_err(|source| TrustError::Io {
        path: dir.to_owned(),
        source,
    })
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), TrustError> {
    use std::io::Write;
    let io = |source| TrustError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = opts.open(path).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

fn read_file(path: &Path) -> Result<String, TrustError> {
    std::fs::read_to_string(path).map_err(|source| TrustError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The node name a certificate carries: its only DNS subject alternative name.
pub(crate) fn node_name_of(cert: &CertificateDer<'_>) -> Result<NodeName, TrustError> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| TrustError::Certificate(e.to_string()))?;
    let mut names = parsed.valid_dns_names();
    let (Some(name), None) = (names.next(), names.next()) else {
        return Err(TrustError::Certificate(
            "a node certificate needs exactly one DNS name".into(),
        ));
    };
    NodeName::new(name)
}

fn server_name(name: &NodeName) -> Result<ServerName<'static>, TrustError> {
    ServerName::try_from(name.as_str().to_owned())
        .map_err(|e| TrustError::Certificate(format!("{name}: {e}")))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS configurations of one endpoint.
pub(crate) struct TlsConfigs {
    /// Dial a known node: the server certificate must name it.
    pub(crate) client_named: quinn::ClientConfig,
    /// Dial an address: any node certified by the CA, its name reported.
    pub(crate) client_any: quinn::ClientConfig,
    /// Accept: the client must present a certificate from the CA.
    pub(crate) server: Arc<QuicServerConfig>,
    server_verifier: Arc<WebPkiServerVerifier>,
}

impl TlsConfigs {
    pub(crate) fn new(identity: &NodeIdentity) -> Result<Self, TrustError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        roots.add(identity.ca.clone())?;
        let roots = Arc::new(roots);
        let builder_err = |e: rustls::client::VerifierBuilderError| {
            TrustError::Tls(rustls::Error::General(e.to_string()))
        };
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(builder_err)?;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(builder_err)?;

        let client = |verifier: Arc<dyn ServerCertVerifier>| -> Result<_, TrustError> {
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_auth_cert(vec![identity.cert.clone()], identity.key())?;
            cfg.alpn_protocols = vec![ALPN.to_vec()];
            cfg.enable_early_data = false;
            // No session resumption: no tickets kept per server (they hold
            // its certificate chain), and every handshake checks both
            // certificates. A reconnect costs a full handshake (≈ 1 ms).
            cfg.resumption = rustls::client::Resumption::disabled();
            let quic = QuicClientConfig::try_from(cfg)
                .map_err(|e| TrustError::Tls(rustls::Error::General(e.to_string())))?;
            Ok(quinn::ClientConfig::new(Arc::new(quic)))
        };
        let client_named = client(server_verifier.clone())?;
        let client_any = client(Arc::new(AnyNodeVerifier {
            inner: server_verifier.clone(),
        }))?;

        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(vec![identity.cert.clone()], identity.key())?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        server.max_early_data_size = 0;
        // Clients do not resume (above): issuing tickets would only fill a
        // session cache with copies of their certificate chains.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let server = QuicServerConfig::try_from(server)
            .map_err(|e| TrustError::Tls(rustls::Error::General(e.to_string())))?;
        Ok(Self {
            client_named,
            client_any,
            server: Arc::new(server),
            server_verifier,
        })
    }
}

/// Server verifier for dials by address: the chain must lead to the cluster
/// CA and the certificate must be valid for the node name it carries (which
/// the caller then learns); any such name is accepted.
#[derive(Debug)]
struct AnyNodeVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyNodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = node_name_of(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        let name = ServerName::try_from(name.as_str().to_owned()).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    #[test]
    fn issued_identity_round_trips_through_pem() {
        let ca = ClusterCa::generate().unwrap();
        let id = ca.issue(&name("node-1")).unwrap();
        let back = NodeIdentity::from_pem(&id.cert_pem(), &id.key_pem(), &id.ca_pem()).unwrap();
        assert_eq!(back.name().as_str(), "node-1");
        assert_eq!(back.cert, id.cert);
        assert_eq!(id.ca_pem().trim(), ca.cert_pem().trim());
    }

    #[test]
    fn ca_round_trips_through_files_and_still_issues_valid_certificates() {
        let dir = std::env::temp_dir().join(format!("shoal-trust-{}", std::process::id()));
        let ca = ClusterCa::generate().unwrap();
        ca.write_pem_files(&dir).unwrap();
        let ca2 = ClusterCa::read_pem_files(&dir).unwrap();
        let id = ca2.issue(&name("n2")).unwrap();
        id.write_pem_files(&dir).unwrap();
        let back = NodeIdentity::read_pem_files(&dir).unwrap();
        assert_eq!(back.name().as_str(), "n2");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("node.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by others");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn identity_from_another_ca_or_with_a_foreign_key_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let id = ca.issue(&name("a")).unwrap();
        let err = NodeIdentity::from_pem(&id.cert_pem(), &id.key_pem(), other.cert_pem());
        assert!(matches!(err, Err(TrustError::Certificate(_))), "{err:?}");
        let id2 = ca.issue(&name("b")).unwrap();
        let err = NodeIdentity::from_pem(&id.cert_pem(), &id2.key_pem(), &id.ca_pem());
        assert!(matches!(err, Err(TrustError::KeyMismatch(_))), "{err:?}");
        let err = ClusterCa::from_pem(ca.cert_pem(), &other.key_pem());
        assert!(matches!(err, Err(TrustError::KeyMismatch(_))), "{err:?}");
        assert!(NodeIdentity::from_pem("junk", "junk", "junk").is_err());
    }

    #[test]
    fn pem_encoding_matches_rcgen() {
        let ca = ClusterCa::generate().unwrap();
        assert_eq!(
            to_pem("CERTIFICATE", ca.cert_der()).trim(),
            ca.cert_pem().trim()
        );
    }
}
