//! Mailbox client cryptography: identities, signatures, end-to-end sealing and the 6-digit
//! verification code. Pure functions over bytes; the only IO is [`Identity::load_or_create`].
//!
//! - An [`Identity`] is one Ed25519 key and a self-signed X.509 certificate for it. The
//!   certificate (DER) is the whole public identity: peers index clients by its SHA-256
//!   [`fingerprint`], and the X25519 key used for encryption is derived from the same key.
//! - [`cert_public_key`] reads the key out of a certificate with a small, strict DER walk and
//!   checks the certificate's self-signature, so a certificate whose key and signature disagree
//!   is refused before anything else trusts it.
//! - [`seal`] / [`open`]: HPKE (RFC 9180) in Auth mode, DHKEM(X25519, HKDF-SHA256),
//!   HKDF-SHA256, ChaCha20Poly1305, one message at a time (the recipient may be offline).
//! - [`sign_http_proof`] / [`verify_http_proof`]: the proof of possession of a registration
//!   over HTTP, bound to a time instead of a peer's challenge.
//! - [`commit`], [`check_commit`], [`verification_code`]: the code two people compare to rule
//!   out a man in the middle, with a commit-reveal so that the middle cannot grind for a match.
//!
//! Trust (which certificate belongs to whom) is the caller's business: these functions only
//! prove that bytes match a given certificate.

use std::io::Read;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tube_proto::mailbox::http_proof_message;

/// File name of the identity key (64 hex digits of the Ed25519 seed and a newline, mode 0600).
pub const KEY_FILE: &str = "mailbox-identity.key";
/// File name of the identity certificate (DER, not PEM: the same bytes that go on the wire).
pub const CERT_FILE: &str = "mailbox-identity.crt";

/// Length of the encapsulated key that starts every sealed message.
pub const ENCAPPED_LEN: usize = 32;
/// Bytes [`seal`] adds to the plaintext: the encapsulated key and the Poly1305 tag.
pub const SEAL_OVERHEAD: usize = ENCAPPED_LEN + 16;

/// Prefix of the HPKE `info`; the sender's and recipient's fingerprints follow it.
const INFO_PREFIX: &[u8] = b"tube-mailbox v1";
/// Prepended to every message [`Identity::sign`] signs (see there for why).
const SIGN_CONTEXT: &[u8] = b"tube-mailbox v1 signature\0";
/// Domain tag of [`commit`].
const COMMIT_TAG: &[u8] = b"tube-mailbox v1 code commit\0";
/// Domain tag of [`verification_code`].
const CODE_TAG: &[u8] = b"tube-mailbox v1 code\0";
/// Subject common name of the certificates we make.
const CERT_CN: &str = "tube mailbox client";
/// Larger files in the data dir are not ours; refuse to read them whole.
const MAX_CERT_FILE: u64 = 64 * 1024;

type Kem = X25519HkdfSha256;

/// What can go wrong in this module. No variant ever carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Rng,
    /// rcgen could not build the self-signed certificate.
    #[error("could not build the identity certificate")]
    CertificateBuild(#[source] rcgen::Error),
    /// Not a well-formed X.509 certificate with an Ed25519 key and an Ed25519 signature; the
    /// text names the part that failed.
    #[error("malformed or unsupported certificate: {0}")]
    BadCertificate(&'static str),
    /// The certificate's self-signature does not verify with the key it carries.
    #[error("certificate self-signature does not verify")]
    BadCertificateSignature,
    /// A signature does not verify with the certificate's key (or is not 64 bytes).
    #[error("signature does not verify")]
    BadSignature,
    /// HPKE refused to seal (in practice: an unusable recipient key).
    #[error("could not seal the message")]
    Seal,
    /// A sealed message did not open: tampered, truncated, wrong sender certificate, wrong
    /// recipient or wrong associated data. Deliberately one variant: no oracle for which.
    #[error("message could not be opened")]
    Open,
    /// Reading or writing an identity file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The key file is not 64 hex digits (optionally followed by a newline).
    #[error("{}: not a mailbox identity key (64 hex digits expected)", path.display())]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
    },
    /// The certificate file does not belong to the key file next to it.
    #[error("{}: certificate does not belong to the identity key", path.display())]
    CertKeyMismatch {
        /// The certificate file.
        path: PathBuf,
    },
}

/// A mailbox client identity: an Ed25519 signing key and a self-signed certificate for it.
///
/// `Debug` prints the fingerprint only; the key is zeroed on drop (ed25519-dalek does that).
pub struct Identity {
    key: SigningKey,
    cert: Vec<u8>,
    fingerprint: [u8; 32],
}

impl Identity {
    /// Makes a new identity from 32 bytes of OS randomness.
    pub fn generate() -> Result<Identity, CryptoError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|_| CryptoError::Rng)?;
        Identity::from_seed(&seed)
    }

    /// Loads the identity kept in `dir`, or creates one there; `true` means it was created.
    ///
    /// The key file ([`KEY_FILE`]) is the identity: its 32-byte seed as 64 hex digits and a
    /// newline, created owner-only and exclusively (two processes racing end up sharing one
    /// key). The certificate file ([`CERT_FILE`]) holds the DER certificate; on load its key is
    /// checked against the key file and a mismatch is an error. A missing certificate next to an
    /// existing key is made again (rcgen's output for a given key is deterministic: serial and
    /// dates are fixed, Ed25519 signatures are deterministic). A certificate without its key is
    /// worthless and gets replaced when a new key is created.
    pub fn load_or_create(dir: &Path) -> Result<(Identity, bool), CryptoError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CryptoError::Io { path, source }
        };

        let (seed, created) = match read_key_file(&key_path)? {
            Some(seed) => (seed, false),
            None => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|_| CryptoError::Rng)?;
                let text = format!("{}\n", hex::encode(seed));
                match tube_net::files::write_private_new(&key_path, text.as_bytes()) {
                    Ok(()) => (seed, true),
                    // Another process created it between our read and our write: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let seed =
                            read_key_file(&key_path)?.ok_or_else(|| CryptoError::BadKeyFile {
                                path: key_path.clone(),
                            })?;
                        (seed, false)
                    }
                    Err(e) => return Err(io(&key_path)(e)),
                }
            }
        };
        let key = SigningKey::from_bytes(&seed);

        let stored_cert = if created {
            None
        } else {
            read_cert_file(&cert_path)?
        };
        let identity = match stored_cert {
            Some(cert) => {
                let matches =
                    cert_public_key(&cert).is_ok_and(|pk| pk == key.verifying_key().to_bytes());
                if !matches {
                    return Err(CryptoError::CertKeyMismatch { path: cert_path });
                }
                Identity::from_parts(key, cert)
            }
            None => {
                let identity = Identity::from_parts(key, self_signed_cert(&seed)?);
                tube_net::files::write_private_atomic(&cert_path, &identity.cert)
                    .map_err(io(&cert_path))?;
                identity
            }
        };
        Ok((identity, created))
    }

    /// The self-signed certificate, DER: the public identity to register and hand out.
    pub fn cert(&self) -> &[u8] {
        &self.cert
    }

    /// SHA-256 of [`cert`](Self::cert): the name peers and clients know this identity by.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The raw Ed25519 public key (the one inside the certificate).
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs `msg` with Ed25519; check it with [`verify`].
    ///
    /// What gets signed is `"tube-mailbox v1 signature\0" || msg`, not `msg` itself: the same
    /// key signs its certificate, so without a context a peer could ask us to sign bytes that
    /// are a certificate body (which starts with 0x30, never with our context). [`verify`]
    /// adds the same prefix; plain Ed25519 tools will not verify these signatures.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut data = Vec::with_capacity(SIGN_CONTEXT.len() + msg.len());
        data.extend_from_slice(SIGN_CONTEXT);
        data.extend_from_slice(msg);
        self.key.sign(&data).to_bytes()
    }

    fn from_seed(seed: &[u8; 32]) -> Result<Identity, CryptoError> {
        let cert = self_signed_cert(seed)?;
        Ok(Identity::from_parts(SigningKey::from_bytes(seed), cert))
    }

    fn from_parts(key: SigningKey, cert: Vec<u8>) -> Identity {
        let fingerprint = fingerprint(&cert);
        Identity {
            key,
            cert,
            fingerprint,
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &hex::encode(self.fingerprint))
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a certificate's DER bytes: how peers and clients name an identity.
pub fn fingerprint(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

/// The Ed25519 public key of a certificate, after checking the certificate's self-signature.
///
/// Accepts exactly one DER `Certificate` (nothing after it) whose `subjectPublicKeyInfo` and
/// both signature algorithm fields are Ed25519 (OID 1.3.101.112, no parameters), whose key is
/// a 32-byte BIT STRING and whose signature a 64-byte BIT STRING verifying (strictly) over the
/// exact `tbsCertificate` bytes with that key. Lengths must be definite, minimal and at most 4
/// bytes long. Names, validity and extensions are only checked to be well-formed TLVs: dates
/// and names mean nothing here, the fingerprint is the identity. Never panics.
pub fn cert_public_key(cert_der: &[u8]) -> Result<[u8; 32], CryptoError> {
    let parsed = parse_cert(cert_der)?;
    let key = VerifyingKey::from_bytes(&parsed.public_key)
        .map_err(|_| CryptoError::BadCertificate("public key is not an Ed25519 point"))?;
    // verify_strict also refuses small-order keys, which keeps the derived X25519 key sound.
    key.verify_strict(parsed.tbs, &Signature::from_bytes(&parsed.signature))
        .map_err(|_| CryptoError::BadCertificateSignature)?;
    Ok(parsed.public_key)
}

/// Checks a signature made by [`Identity::sign`] with the key of `cert_der` (strict Ed25519:
/// no malleable or small-order signatures, no weak keys).
pub fn verify(cert_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
    let key = verifying_key(cert_der)?;
    let sig: [u8; 64] = sig.try_into().map_err(|_| CryptoError::BadSignature)?;
    let mut data = Vec::with_capacity(SIGN_CONTEXT.len() + msg.len());
    data.extend_from_slice(SIGN_CONTEXT);
    data.extend_from_slice(msg);
    key.verify_strict(&data, &Signature::from_bytes(&sig))
        .map_err(|_| CryptoError::BadSignature)
}

/// The HTTP registration proof (`longpoll.md` section 7): [`Identity::sign`] over
/// `"tube-mailbox http register v1\0" || time_ms || SHA-256(cert)`, with the signing context
/// of every tube signature. `time_ms` is the signer's clock (Unix ms); the peer bounds it.
pub fn sign_http_proof(id: &Identity, time_ms: u64) -> [u8; 64] {
    id.sign(&http_proof_message(time_ms, &id.fingerprint()))
}

/// Checks an HTTP registration proof made by [`sign_http_proof`] for `cert_der` (which must
/// be a well-formed self-signed Ed25519 certificate). The caller checks the time window.
pub fn verify_http_proof(cert_der: &[u8], time_ms: u64, sig: &[u8; 64]) -> Result<(), CryptoError> {
    verify(
        cert_der,
        &http_proof_message(time_ms, &fingerprint(cert_der)),
        sig,
    )
}

/// Encrypts `plaintext` to the holder of `recipient_cert`, authenticated as `sender`.
///
/// HPKE (RFC 9180) Auth mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305,
/// single-shot. `info` is `"tube-mailbox v1" || fingerprint(sender) || fingerprint(recipient)`,
/// so a message is bound to both certificates; `aad` (a message id, say) is authenticated but
/// not encrypted and must be given again to [`open`]. Returns the 32-byte encapsulated key
/// followed by the ciphertext ([`SEAL_OVERHEAD`] bytes longer than the plaintext in all).
///
/// The X25519 keys are derived from the Ed25519 identity keys, so the certificate is the whole
/// public identity and needs no second, separately signed key: the X25519 public key is the
/// Ed25519 public key in Montgomery form, the secret is the clamped first half of
/// SHA-512(seed), the scalar Ed25519 signs with (before its reduction mod l). libsodium's
/// `crypto_sign_ed25519_pk_to_curve25519` / `_sk_to_curve25519` do exactly this, and using one
/// key for Ed25519 and an X25519 KEM was analysed by Thormarker, "On using the same key pair for
/// Ed25519 and an X25519 based KEM" (eprint 2021/509). The price: no separate encryption key to
/// rotate, and no forward secrecy for the recipient's side (inherent to one-shot HPKE anyway).
///
/// Panics only if the OS random number generator fails (hpke unwraps it).
pub fn seal(
    sender: &Identity,
    recipient_cert: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let recipient_pk =
        x25519_public(&verifying_key(recipient_cert)?).map_err(|_| CryptoError::Seal)?;
    let sender_sk = x25519_secret(&sender.key).map_err(|_| CryptoError::Seal)?;
    let sender_pk = Kem::sk_to_pk(&sender_sk);
    let info = hpke_info(&sender.fingerprint, &fingerprint(recipient_cert));
    let mode = OpModeS::Auth((sender_sk, sender_pk));
    let (encapped, ciphertext) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &mode,
        &recipient_pk,
        &info,
        plaintext,
        aad,
    )
    .map_err(|_| CryptoError::Seal)?;
    let mut out = Vec::with_capacity(ENCAPPED_LEN + ciphertext.len());
    out.extend_from_slice(&encapped.to_bytes());
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Decrypts what [`seal`] made for `recipient`, checking it came from the holder of
/// `sender_cert` (look the certificate up by the sender's fingerprint yourself: never take it
/// from the message's carrier). Any change to `sealed`, `aad` or either party is
/// [`CryptoError::Open`]; a `sender_cert` that is not a valid certificate at all is
/// [`CryptoError::BadCertificate`] or [`CryptoError::BadCertificateSignature`].
pub fn open(
    recipient: &Identity,
    sender_cert: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(CryptoError::Open);
    }
    let (encapped, ciphertext) = sealed.split_at(ENCAPPED_LEN);
    let encapped =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(encapped).map_err(|_| CryptoError::Open)?;
    let sender_pk = x25519_public(&verifying_key(sender_cert)?).map_err(|_| CryptoError::Open)?;
    let recipient_sk = x25519_secret(&recipient.key).map_err(|_| CryptoError::Open)?;
    let info = hpke_info(&fingerprint(sender_cert), &recipient.fingerprint);
    hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeR::Auth(sender_pk),
        &recipient_sk,
        &encapped,
        &info,
        ciphertext,
        aad,
    )
    .map_err(|_| CryptoError::Open)
}

/// A fresh 32-byte random nonce for [`commit`] and [`verification_code`].
///
/// Panics if the OS random number generator fails (as [`seal`] does; there is no sane way on).
pub fn new_nonce() -> [u8; 32] {
    let mut nonce = [0u8; 32];
    // A failing OS RNG is not recoverable; hpke's sealing panics in the same case.
    getrandom::fill(&mut nonce).expect("the system random number generator failed");
    nonce
}

/// The commitment to a nonce: SHA-256("tube-mailbox v1 code commit\0" || nonce).
pub fn commit(nonce: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(COMMIT_TAG);
    h.update(nonce);
    h.finalize().into()
}

/// Whether `nonce` is the one `commit` was made from (constant time).
pub fn check_commit(commit: &[u8; 32], nonce: &[u8; 32]) -> bool {
    self::commit(nonce).ct_eq(commit).into()
}

/// The 6-digit code two people read to each other to check they see each other's certificates.
///
/// The code is SHA-256("tube-mailbox v1 code\0" || fp_1 || nonce_1 || fp_2 || nonce_2), where
/// the two (fingerprint, nonce) pairs are sorted so that both sides, each passing its own pair
/// first, get the same code. The first 8 bytes, read big-endian (64 bits), are reduced mod
/// 10^6: codes are off uniform by less than 10^6 / 2^64, about 5e-14. Zero-padded to 6 digits.
///
/// Why nonces (a ZRTP-style commit-reveal): without them a man in the middle could generate
/// certificates until the code it shows each side matches; 10^6 tries is cheap. So:
/// 1. A's first message of a conversation carries `commit(nonce_A)`;
/// 2. B's reply reveals `nonce_B`;
/// 3. A's next message reveals `nonce_A`; B checks it with [`check_commit`].
///
/// A man in the middle has to fix its nonce on each side before it learns the honest one
/// there: towards B it must commit before B reveals `nonce_B`, towards A it must reveal its
/// reply nonce while `nonce_A` is still hidden behind A's commit. Each honest nonce then moves
/// the code unpredictably, so the middle gets one try, matching with probability 10^-6,
/// instead of grinding certificates until the codes agree. A commit that does not check must
/// be treated as an attack, not retried; nonces are fresh per conversation.
pub fn verification_code(
    fp_a: &[u8; 32],
    nonce_a: &[u8; 32],
    fp_b: &[u8; 32],
    nonce_b: &[u8; 32],
) -> String {
    let (first, second) = if (fp_a, nonce_a) <= (fp_b, nonce_b) {
        ((fp_a, nonce_a), (fp_b, nonce_b))
    } else {
        ((fp_b, nonce_b), (fp_a, nonce_a))
    };
    let mut h = Sha256::new();
    h.update(CODE_TAG);
    h.update(first.0);
    h.update(first.1);
    h.update(second.0);
    h.update(second.1);
    let digest = h.finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    format!("{:06}", u64::from_be_bytes(head) % 1_000_000)
}

// ---- helpers ----

/// The certificate for the key made from `seed`, signed by that key (through rcgen's
/// `SigningKey` trait, so the secret never leaves ed25519-dalek's zeroizing type).
fn self_signed_cert(seed: &[u8; 32]) -> Result<Vec<u8>, CryptoError> {
    let key = SigningKey::from_bytes(seed);
    let signer = RcgenSigner {
        public: key.verifying_key().to_bytes(),
        key,
    };
    let mut params = rcgen::CertificateParams::default();
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, CERT_CN);
    params.distinguished_name = name;
    let cert = params
        .self_signed(&signer)
        .map_err(CryptoError::CertificateBuild)?;
    Ok(cert.der().to_vec())
}

/// Lets rcgen sign with a dalek key.
struct RcgenSigner {
    key: SigningKey,
    public: [u8; 32],
}

impl rcgen::PublicKeyData for RcgenSigner {
    fn der_bytes(&self) -> &[u8] {
        // For Ed25519 rcgen wants the raw 32-byte key here (it wraps it in the BIT STRING).
        &self.public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

impl rcgen::SigningKey for RcgenSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.key.sign(msg).to_bytes().to_vec())
    }
}

/// `Ok(None)` if the key file does not exist.
fn read_key_file(path: &Path) -> Result<Option<[u8; 32]>, CryptoError> {
    let bad = || CryptoError::BadKeyFile {
        path: path.to_path_buf(),
    };
    let Some(bytes) = read_capped(path, 128)? else {
        return Ok(None);
    };
    let text = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text, &mut seed).map_err(|_| bad())?;
    Ok(Some(seed))
}

/// `Ok(None)` if the certificate file does not exist.
fn read_cert_file(path: &Path) -> Result<Option<Vec<u8>>, CryptoError> {
    read_capped(path, MAX_CERT_FILE)
}

/// Reads at most `cap` bytes; a longer file is an error.
fn read_capped(path: &Path, cap: u64) -> Result<Option<Vec<u8>>, CryptoError> {
    let io = |source| CryptoError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > cap {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "file too large",
        )));
    }
    Ok(Some(bytes))
}

fn verifying_key(cert_der: &[u8]) -> Result<VerifyingKey, CryptoError> {
    let pk = cert_public_key(cert_der)?;
    VerifyingKey::from_bytes(&pk)
        .map_err(|_| CryptoError::BadCertificate("public key is not an Ed25519 point"))
}

fn x25519_public(key: &VerifyingKey) -> Result<<Kem as hpke::Kem>::PublicKey, hpke::HpkeError> {
    <Kem as hpke::Kem>::PublicKey::from_bytes(&key.to_montgomery().to_bytes())
}

fn x25519_secret(key: &SigningKey) -> Result<<Kem as hpke::Kem>::PrivateKey, hpke::HpkeError> {
    // hpke clamps on deserialisation, as X25519 does anyway.
    <Kem as hpke::Kem>::PrivateKey::from_bytes(&key.to_scalar_bytes())
}

fn hpke_info(sender_fp: &[u8; 32], recipient_fp: &[u8; 32]) -> Vec<u8> {
    let mut info = Vec::with_capacity(INFO_PREFIX.len() + 64);
    info.extend_from_slice(INFO_PREFIX);
    info.extend_from_slice(sender_fp);
    info.extend_from_slice(recipient_fp);
    info
}

// ---- the DER walk ----

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_VERSION: u8 = 0xa0; // [0] EXPLICIT, constructed
/// Contents of the AlgorithmIdentifier SEQUENCE for Ed25519: OID 1.3.101.112, no parameters
/// (RFC 8410 section 3).
const ED25519_ALG_ID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

struct ParsedCert<'a> {
    /// The whole tbsCertificate TLV: what the signature covers.
    tbs: &'a [u8],
    public_key: [u8; 32],
    signature: [u8; 64],
}

fn parse_cert(der: &[u8]) -> Result<ParsedCert<'_>, CryptoError> {
    let mut top = Der(der);
    let cert = top.read(TAG_SEQUENCE, "Certificate")?;
    top.finish("data after the Certificate")?;

    let mut cert = Der(cert.contents);
    let tbs = cert.read(TAG_SEQUENCE, "tbsCertificate")?;
    let sig_alg = cert.read(TAG_SEQUENCE, "signatureAlgorithm")?;
    let sig = cert.read(TAG_BIT_STRING, "signatureValue")?;
    cert.finish("data after signatureValue")?;
    if sig_alg.contents != ED25519_ALG_ID {
        return Err(CryptoError::BadCertificate(
            "signature algorithm is not Ed25519",
        ));
    }
    let signature = bit_string::<64>(sig.contents)
        .ok_or(CryptoError::BadCertificate("signature is not 64 bytes"))?;

    let mut body = Der(tbs.contents);
    if body.peek_tag() == Some(TAG_VERSION) {
        let version = body.read(TAG_VERSION, "version")?;
        let mut version = Der(version.contents);
        version.read(TAG_INTEGER, "version")?;
        version.finish("version")?;
    }
    body.read(TAG_INTEGER, "serialNumber")?;
    let inner_alg = body.read(TAG_SEQUENCE, "signature")?;
    if inner_alg.contents != ED25519_ALG_ID {
        return Err(CryptoError::BadCertificate(
            "signature algorithm is not Ed25519",
        ));
    }
    body.read(TAG_SEQUENCE, "issuer")?;
    body.read(TAG_SEQUENCE, "validity")?;
    body.read(TAG_SEQUENCE, "subject")?;
    let spki = body.read(TAG_SEQUENCE, "subjectPublicKeyInfo")?;
    // issuerUniqueID, subjectUniqueID, extensions: signed, so only well-formedness matters.
    while !body.is_empty() {
        body.read_any("extensions")?;
    }

    let mut spki = Der(spki.contents);
    let key_alg = spki.read(TAG_SEQUENCE, "subjectPublicKeyInfo algorithm")?;
    let key = spki.read(TAG_BIT_STRING, "subjectPublicKey")?;
    spki.finish("data after subjectPublicKey")?;
    if key_alg.contents != ED25519_ALG_ID {
        return Err(CryptoError::BadCertificate("public key is not Ed25519"));
    }
    let public_key = bit_string::<32>(key.contents)
        .ok_or(CryptoError::BadCertificate("public key is not 32 bytes"))?;

    Ok(ParsedCert {
        tbs: tbs.whole,
        public_key,
        signature,
    })
}

/// The bytes of a BIT STRING with no unused bits, if there are exactly `N` of them.
fn bit_string<const N: usize>(contents: &[u8]) -> Option<[u8; N]> {
    match contents.split_first() {
        Some((0, bytes)) => bytes.try_into().ok(),
        _ => None,
    }
}

/// One TLV: its contents and its whole encoding (header included).
struct Tlv<'a> {
    contents: &'a [u8],
    whole: &'a [u8],
}

/// A cursor over DER: reads TLVs with low tag numbers and definite, minimal lengths of at most
/// 4 length bytes. Every slice access is checked; nothing here can panic.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.0.first().copied()
    }

    fn finish(&self, what: &'static str) -> Result<(), CryptoError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(CryptoError::BadCertificate(what))
        }
    }

    fn read(&mut self, tag: u8, what: &'static str) -> Result<Tlv<'a>, CryptoError> {
        if self.peek_tag() != Some(tag) {
            return Err(CryptoError::BadCertificate(what));
        }
        self.read_any(what)
    }

    fn read_any(&mut self, what: &'static str) -> Result<Tlv<'a>, CryptoError> {
        let bad = CryptoError::BadCertificate(what);
        let Some((&tag, rest)) = self.0.split_first() else {
            return Err(bad);
        };
        if tag & 0x1f == 0x1f {
            return Err(bad); // high tag number form: never in a certificate we accept
        }
        let Some((&first, mut rest)) = rest.split_first() else {
            return Err(bad);
        };
        let len = match first {
            0..=0x7f => usize::from(first),
            0x81..=0x84 => {
                let Some((len_bytes, after)) = rest.split_at_checked(usize::from(first & 0x7f))
                else {
                    return Err(bad);
                };
                if len_bytes.first() == Some(&0) {
                    return Err(bad); // not minimal
                }
                let len = len_bytes
                    .iter()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
                if len < 0x80 {
                    return Err(bad); // long form where the short one fits
                }
                rest = after;
                len
            }
            _ => return Err(bad), // 0x80: indefinite; 0x85..: more than 4 length bytes
        };
        let header = self.0.len() - rest.len();
        let Some(total) = header.checked_add(len) else {
            return Err(bad);
        };
        let Some((whole, after)) = self.0.split_at_checked(total) else {
            return Err(bad);
        };
        let Some(contents) = whole.get(header..) else {
            return Err(bad);
        };
        self.0 = after;
        Ok(Tlv { contents, whole })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn alice() -> &'static Identity {
        static ID: OnceLock<Identity> = OnceLock::new();
        ID.get_or_init(|| Identity::from_seed(&[1; 32]).unwrap())
    }

    fn bob() -> &'static Identity {
        static ID: OnceLock<Identity> = OnceLock::new();
        ID.get_or_init(|| Identity::from_seed(&[2; 32]).unwrap())
    }

    fn mallory() -> &'static Identity {
        static ID: OnceLock<Identity> = OnceLock::new();
        ID.get_or_init(|| Identity::from_seed(&[3; 32]).unwrap())
    }

    #[test]
    fn generate_then_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (made, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(created);
        let (loaded, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(made.cert(), loaded.cert());
        assert_eq!(made.public_key(), loaded.public_key());

        let key_text = std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(key_text.len(), 65);
        assert!(key_text.ends_with('\n'));
        assert_eq!(
            std::fs::read(dir.path().join(CERT_FILE)).unwrap(),
            made.cert()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }

        // A lost certificate is made again, byte for byte.
        std::fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let (again, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(again.cert(), made.cert());
    }

    #[test]
    fn foreign_certificate_or_bad_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        std::fs::write(dir.path().join(CERT_FILE), bob().cert()).unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(err, CryptoError::CertKeyMismatch { .. }),
            "{err:?}"
        );

        std::fs::write(dir.path().join(KEY_FILE), "not hex\n").unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CryptoError::BadKeyFile { .. }), "{err:?}");
        assert!(!err.to_string().contains("not hex"));
    }

    #[test]
    fn generated_identities_differ_and_debug_hides_the_key() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        assert_ne!(a.public_key(), b.public_key());
        let shown = format!("{a:?}");
        assert!(shown.contains(&hex::encode(a.fingerprint())));
        assert!(!shown.contains(&hex::encode(a.key.to_bytes())));
        let shown = format!("{:?}", alice());
        assert!(!shown.contains(&hex::encode([1u8; 32])));
    }

    #[test]
    fn fingerprint_is_sha256_of_the_der() {
        let id = alice();
        let expected: [u8; 32] = Sha256::digest(id.cert()).into();
        assert_eq!(id.fingerprint(), expected);
        assert_eq!(fingerprint(id.cert()), expected);
    }

    #[test]
    fn certificate_carries_the_signing_key() {
        for id in [alice(), bob()] {
            assert_eq!(cert_public_key(id.cert()).unwrap(), id.public_key());
        }
        // Same key, same certificate: the file can be regenerated.
        assert_eq!(
            Identity::from_seed(&[1; 32]).unwrap().cert(),
            alice().cert()
        );
    }

    #[test]
    fn every_single_byte_change_is_refused() {
        let der = alice().cert();
        for i in 0..der.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = der.to_vec();
                bad[i] ^= flip;
                assert!(
                    cert_public_key(&bad).is_err(),
                    "byte {i} ^ {flip:#x} accepted"
                );
            }
        }
    }

    #[test]
    fn key_swapped_under_a_signature_is_refused() {
        let der = alice().cert().to_vec();
        let pos = der
            .windows(32)
            .position(|w| w == alice().public_key())
            .unwrap();
        let mut swapped = der.clone();
        swapped[pos..pos + 32].copy_from_slice(&bob().public_key());
        assert!(matches!(
            cert_public_key(&swapped),
            Err(CryptoError::BadCertificateSignature)
        ));
    }

    #[test]
    fn framing_errors_are_refused() {
        let der = alice().cert();
        let mut trailing = der.to_vec();
        trailing.push(0);
        assert!(cert_public_key(&trailing).is_err());
        assert!(cert_public_key(&der[..der.len() - 1]).is_err());
        assert!(cert_public_key(&[]).is_err());
        // Indefinite length, 5 length bytes, non-minimal long form.
        assert!(cert_public_key(&[0x30, 0x80, 0x00, 0x00]).is_err());
        assert!(cert_public_key(&[0x30, 0x85, 0, 0, 0, 0, 1, 0]).is_err());
        assert!(cert_public_key(&[0x30, 0x81, 0x01, 0x00]).is_err());
        // Outer length one byte longer, with a byte appended inside: trailing data in the SEQUENCE.
        // (Our certificates are 128..255 bytes long, so the length is `81 xx`.)
        let mut inner = trailing.clone();
        assert_eq!(&inner[..2], &[0x30, 0x81]);
        inner[2] += 1;
        assert!(cert_public_key(&inner).is_err());
    }

    #[test]
    fn non_ed25519_certificate_is_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(matches!(
            cert_public_key(cert.der()),
            Err(CryptoError::BadCertificate(_))
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = cert_public_key(&bytes);
        }

        #[test]
        fn mutated_certificates_never_panic_and_are_refused(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bad = alice().cert().to_vec();
            for (at, flip) in &edits {
                let i = at.index(bad.len());
                bad[i] ^= flip;
            }
            let _ = cert_public_key(&bad);
            let _ = cert_public_key(&bad[..cut.index(bad.len())]);
            if edits.len() == 1 {
                prop_assert!(cert_public_key(&bad).is_err());
            }
        }
    }

    #[test]
    fn sign_and_verify() {
        let sig = alice().sign(b"hello");
        verify(alice().cert(), b"hello", &sig).unwrap();
        assert!(verify(alice().cert(), b"hellp", &sig).is_err());
        assert!(verify(bob().cert(), b"hello", &sig).is_err());
        assert!(verify(alice().cert(), b"hello", &sig[..63]).is_err());
        let mut bad = sig;
        bad[10] ^= 1;
        assert!(matches!(
            verify(alice().cert(), b"hello", &bad),
            Err(CryptoError::BadSignature)
        ));
        // The context prefix: a plain Ed25519 signature of the message does not pass.
        let plain = alice().key.sign(b"hello").to_bytes();
        assert!(verify(alice().cert(), b"hello", &plain).is_err());
    }

    #[test]
    fn http_proofs_bind_time_and_certificate() {
        let sig = sign_http_proof(alice(), 1_700_000_000_000);
        verify_http_proof(alice().cert(), 1_700_000_000_000, &sig).unwrap();
        // Another time, another certificate, a flipped bit: refused.
        assert!(verify_http_proof(alice().cert(), 1_700_000_000_001, &sig).is_err());
        assert!(verify_http_proof(bob().cert(), 1_700_000_000_000, &sig).is_err());
        let mut bad = sig;
        bad[0] ^= 1;
        assert!(verify_http_proof(alice().cert(), 1_700_000_000_000, &bad).is_err());
        // Not interchangeable with the TCP challenge proof.
        let nonce = [0u8; 32];
        let tcp = alice().sign(&tube_proto::mailbox::proof_message(
            &nonce,
            &alice().fingerprint(),
        ));
        assert!(verify_http_proof(alice().cert(), 0, &tcp).is_err());
        // Garbage as a certificate never panics.
        assert!(verify_http_proof(b"not a certificate", 0, &sig).is_err());
    }

    #[test]
    fn derived_x25519_keys_agree() {
        let sk = x25519_secret(&alice().key).unwrap();
        let from_cert = x25519_public(&verifying_key(alice().cert()).unwrap()).unwrap();
        assert_eq!(Kem::sk_to_pk(&sk), from_cert);
    }

    #[test]
    fn seal_open_round_trip() {
        for msg in [&b""[..], b"hi bob", &[7u8; 5000]] {
            let sealed = seal(alice(), bob().cert(), b"msg-1", msg).unwrap();
            assert_eq!(sealed.len(), msg.len() + SEAL_OVERHEAD);
            assert_eq!(open(bob(), alice().cert(), b"msg-1", &sealed).unwrap(), msg);
        }
        // Fresh ephemeral key each time.
        let a = seal(alice(), bob().cert(), b"", b"x").unwrap();
        let b = seal(alice(), bob().cert(), b"", b"x").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn any_tampering_fails_to_open() {
        let sealed = seal(alice(), bob().cert(), b"msg-1", b"hello").unwrap();
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    open(bob(), alice().cert(), b"msg-1", &bad).is_err(),
                    "{i}/{bit}"
                );
            }
        }
        assert!(open(bob(), alice().cert(), b"msg-2", &sealed).is_err());
        assert!(open(bob(), alice().cert(), b"", &sealed).is_err());
        assert!(open(bob(), mallory().cert(), b"msg-1", &sealed).is_err());
        assert!(open(mallory(), alice().cert(), b"msg-1", &sealed).is_err());
        assert!(open(alice(), bob().cert(), b"msg-1", &sealed).is_err());
        assert!(open(bob(), alice().cert(), b"msg-1", &sealed[..sealed.len() - 1]).is_err());
        assert!(
            open(
                bob(),
                alice().cert(),
                b"msg-1",
                &sealed[..SEAL_OVERHEAD - 1]
            )
            .is_err()
        );
        assert!(matches!(
            open(bob(), b"junk", b"msg-1", &sealed),
            Err(CryptoError::BadCertificate(_))
        ));
        assert!(seal(alice(), b"junk", b"", b"x").is_err());
    }

    #[test]
    fn commit_checks() {
        let n = new_nonce();
        let c = commit(&n);
        assert!(check_commit(&c, &n));
        let mut other = n;
        other[31] ^= 1;
        assert!(!check_commit(&c, &other));
        assert_ne!(new_nonce(), n);
        assert_ne!(commit(&n), n);
    }

    #[test]
    fn verification_code_is_symmetric_six_digits_and_sensitive() {
        let (fa, fb) = (alice().fingerprint(), bob().fingerprint());
        let (na, nb) = ([5u8; 32], [6u8; 32]);
        let code = verification_code(&fa, &na, &fb, &nb);
        assert_eq!(code.len(), 6);
        assert!(code.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(code, verification_code(&fb, &nb, &fa, &na));

        let mut changed = Vec::new();
        let flip = |mut x: [u8; 32]| {
            x[0] ^= 1;
            x
        };
        changed.push(verification_code(&flip(fa), &na, &fb, &nb));
        changed.push(verification_code(&fa, &flip(na), &fb, &nb));
        changed.push(verification_code(&fa, &na, &flip(fb), &nb));
        changed.push(verification_code(&fa, &na, &fb, &flip(nb)));
        // Swapping nonces between the sides is a different conversation.
        changed.push(verification_code(&fa, &nb, &fb, &na));
        for other in changed {
            assert_ne!(other, code);
        }

        // Same fingerprint on both sides (talking to oneself) is still symmetric.
        assert_eq!(
            verification_code(&fa, &na, &fa, &nb),
            verification_code(&fa, &nb, &fa, &na)
        );
        // Leading zeros are kept: find a code below 100000 among a few nonces.
        let small = (0u8..=255)
            .map(|i| verification_code(&fa, &[i; 32], &fb, &nb))
            .find(|c| c.starts_with('0'))
            .unwrap();
        assert_eq!(small.len(), 6);
    }
}
