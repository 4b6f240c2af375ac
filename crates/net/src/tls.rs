//! TLS 1.3 for every tube connection: server identities, client pinning, configs.
//!
//! A server keeps a self-signed certificate and key as PEM files in its data dir, made on first
//! start. Clients pin the server by the SHA-256 of its certificate (`sha256:<64 hex>`), compared
//! in constant time; the handshake signature is still verified against the pinned certificate,
//! so a replayed certificate without its key does not pass. No other TLS version is offered.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Errors building identities or TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing identity files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A PEM file did not hold what it should.
    #[error("{path}: not a valid PEM {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
    },
    /// Certificate generation failed.
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A fingerprint string is not `sha256:<64 hex>`.
    #[error("fingerprint must be sha256:<64 hex digits>")]
    BadFingerprint,
}

/// SHA-256 of a certificate's DER encoding, written `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time comparison.
    pub fn ct_eq(&self, other: &Fingerprint) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl PartialEq for Fingerprint {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other)
    }
}
impl Eq for Fingerprint {}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        let hex_part = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part.to_ascii_lowercase(), &mut out)
            .map_err(|_| TlsError::BadFingerprint)?;
        Ok(Self(out))
    }
}

/// A certificate chain and its private key: what a TLS server presents.
pub struct Identity {
    /// Certificate chain, end entity first.
    pub certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// A fresh self-signed identity (ECDSA P-256) for `names`, kept in memory only.
    pub fn generate(names: &[&str]) -> Result<Self, TlsError> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names)?;
        let key =
            PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|_| TlsError::Pem {
                path: PathBuf::new(),
                what: "private key",
            })?;
        Ok(Self {
            certs: vec![ck.cert.der().clone()],
            key,
        })
    }

    /// Loads `<dir>/<name>-cert.pem` and `<dir>/<name>-key.pem`, creating both (key mode 0600)
    /// if neither exists. Returns the identity and whether it was created now.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<(Self, bool), TlsError> {
        let cert_path = dir.join(format!("{name}-cert.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        if cert_path.exists() || key_path.exists() {
            return Ok((Self::load(&cert_path, &key_path)?, false));
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| TlsError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), name.into()])?;
        crate::files::write_private_new(&key_path, ck.signing_key.serialize_pem().as_bytes())
            .map_err(io(&key_path))?;
        std::fs::write(&cert_path, ck.cert.pem()).map_err(io(&cert_path))?;
        Ok((Self::load(&cert_path, &key_path)?, true))
    }

    /// Loads a PEM certificate chain and private key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let certs = CertificateDer::pem_file_iter(cert_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|_| TlsError::Pem {
                path: cert_path.into(),
                what: "certificate",
            })?;
        if certs.is_empty() {
            return Err(TlsError::Pem {
                path: cert_path.into(),
                what: "certificate",
            });
        }
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|_| TlsError::Pem {
            path: key_path.into(),
            what: "private key",
        })?;
        Ok(Self { certs, key })
    }

    /// The fingerprint clients pin.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self.certs[0].as_ref())
    }

    /// A TLS 1.3-only server configuration presenting this identity.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        // Lets crate::secure take the traffic keys after the handshake; nothing else does.
        cfg.enable_secret_extraction = true;
        Ok(Arc::new(cfg))
    }
}

/// The one crypto provider tube uses: aws-lc-rs for key exchange (the post-quantum hybrid
/// X25519MLKEM768 first), signatures and randomness, with the record encryption (the AEAD of
/// the cipher suites) from ring and AES-128-GCM preferred.
///
/// The record encryption is the largest single cost of moving bytes (a fifth of the relay's
/// and agent's CPU in a bulk profile). ring has an AES-GCM for CPUs with VAES and VPCLMULQDQ
/// (256-bit AES rounds, e.g. AMD Zen 3, Intel Ice Lake and later) that aws-lc (as of aws-lc-sys
/// 0.47) lacks without AVX-512; on such a machine it cut CPU per GiB carried to 0.80-0.83x
/// (docs/performance.md). Elsewhere both use the same AES-NI code. The suites on the wire are
/// the standard TLS 1.3 ones, so nothing changes for peers. The default order puts AES-256-GCM
/// first; both have 128-bit or better security and AES-128 takes 10 rounds instead of 14.
/// ChaCha20 stays for peers without AES instructions. TLS 1.3 suites only.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..aws_lc_rs::default_provider()
    })
}

/// A TLS 1.3-only client configuration that accepts exactly the server whose certificate has
/// the `pinned` fingerprint.
pub fn pinned_client_config(pinned: Fingerprint) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedVerifier {
        pinned,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// The server name sent in SNI; pinning ignores names, so any fixed valid name does.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("tube").unwrap_or_else(|_| ServerName::from(std::net::Ipv4Addr::LOCALHOST))
}

/// The text of the rustls error a client sees when the fingerprint does not match.
pub const PIN_MISMATCH: &str = "server certificate fingerprint does not match the pinned one";

#[derive(Debug)]
struct PinnedVerifier {
    pinned: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Fingerprint::of(end_entity.as_ref()).ct_eq(&self.pinned) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(PIN_MISMATCH.into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_parses_and_prints() {
        let fp = Fingerprint::of(b"abc");
        let s = fp.to_string();
        assert!(s.starts_with("sha256:") && s.len() == 7 + 64);
        assert_eq!(s.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            s.to_uppercase()
                .replace("SHA256:", "sha256:")
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
        assert!("sha256:abcd".parse::<Fingerprint>().is_err());
        assert!(
            format!("sha256:{}", "zz".repeat(32))
                .parse::<Fingerprint>()
                .is_err()
        );
    }

    #[test]
    fn identity_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = Identity::load_or_create(dir.path(), "relay").unwrap();
        assert!(created);
        let (b, created) = Identity::load_or_create(dir.path(), "relay").unwrap();
        assert!(!created);
        assert_eq!(a.fingerprint(), b.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("relay-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        a.server_config().unwrap();
    }

    /// Moves every TLS byte `from` has to send into `to`, which processes it.
    fn transfer(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut wire = Vec::new();
        from.write_tls(&mut wire).unwrap();
        to.read_tls(&mut wire.as_slice()).unwrap();
        to.process_new_packets().unwrap();
    }

    /// Sends `msg` as application data from `from` to `to` and returns what `to` reads.
    fn carry(from: &mut rustls::Connection, to: &mut rustls::Connection, msg: &[u8]) -> Vec<u8> {
        use std::io::{Read, Write};
        from.writer().write_all(msg).unwrap();
        transfer(from, to);
        let mut got = vec![0; msg.len()];
        to.reader().read_exact(&mut got).unwrap();
        got
    }

    #[test]
    fn tube_negotiates_tls13_aes128_gcm_over_a_post_quantum_key_exchange() {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = Identity::load_or_create(dir.path(), "relay").unwrap();
        let mut server: rustls::Connection =
            rustls::ServerConnection::new(id.server_config().unwrap())
                .unwrap()
                .into();
        let mut client: rustls::Connection = rustls::ClientConnection::new(
            pinned_client_config(id.fingerprint()).unwrap(),
            server_name(),
        )
        .unwrap()
        .into();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            transfer(&mut client, &mut server);
            transfer(&mut server, &mut client);
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            client.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert_eq!(
            server.negotiated_key_exchange_group().map(|g| g.name()),
            Some(rustls::NamedGroup::X25519MLKEM768)
        );
        // Records sealed by one end open at the other, both ways.
        assert_eq!(
            carry(&mut client, &mut server, b"to the server"),
            b"to the server"
        );
        assert_eq!(carry(&mut server, &mut client, b"and back"), b"and back");
    }
}
