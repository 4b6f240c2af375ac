//! JWT authentication for agents: HS256 tokens signed with a secret kept in the relay's data
//! dir. The algorithm is pinned, `exp` and `sub` are required, and the leeway is fixed at
//! [`EXP_LEEWAY_SECS`] (none), so a token is refused from the second its `exp` names (RFC 7519
//! section 4.1.4: the current time must be before `exp`).

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tube_proto::ErrorCode;

/// File name of the secret inside the data dir.
pub const SECRET_FILE: &str = "relay-jwt.key";

/// Seconds of clock skew tolerated past a token's `exp`: none. It is a constant, not a
/// setting: tokens are minted by the relay's own clock (`tube token`), so there is no skew to
/// absorb.
pub const EXP_LEEWAY_SECS: u64 = 0;

/// The HMAC secret tokens are signed with. Its `Debug` never prints the bytes.
#[derive(Clone)]
pub struct JwtSecret(Vec<u8>);

impl fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JwtSecret(<redacted>)")
    }
}

/// The claims tube puts in a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token is for (used for per-identity limits and logs).
    pub sub: String,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Expires at, seconds since the epoch.
    pub exp: u64,
}

/// Why a token was refused: the protocol code and a message that reveals nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailure(pub ErrorCode);

impl AuthFailure {
    /// The message sent to the agent.
    pub fn message(self) -> &'static str {
        match self.0 {
            ErrorCode::TokenExpired => "token expired",
            ErrorCode::InvalidToken => "invalid token",
            _ => "authentication failed",
        }
    }

    /// The `details.reason` sent to the agent.
    pub fn reason(self) -> &'static str {
        match self.0 {
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::InvalidToken => "invalid_token",
            _ => "auth_failed",
        }
    }
}

impl JwtSecret {
    /// A secret from raw bytes (at least 32 of them are recommended).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// A fresh random 32-byte secret.
    pub fn generate() -> std::io::Result<Self> {
        let mut b = vec![0u8; 32];
        getrandom::fill(&mut b).map_err(std::io::Error::other)?;
        Ok(Self(b))
    }

    /// Loads `<dir>/relay-jwt.key` (hex), creating it with mode 0600 if missing. Returns the
    /// secret and whether it was created now.
    pub fn load_or_create(dir: &Path) -> std::io::Result<(Self, bool)> {
        let path = dir.join(SECRET_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim()).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: not a hex secret", path.display()),
                    )
                })?;
                Ok((Self(bytes), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)?;
                let secret = Self::generate()?;
                tube_net::files::write_private_new(&path, hex::encode(&secret.0).as_bytes())?;
                Ok((secret, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Mints a token for `subject` valid for `ttl` from now.
    pub fn mint(&self, subject: &str, ttl: Duration) -> String {
        let now = unix_now();
        self.mint_at(subject, now, now.saturating_add(ttl.as_secs()))
    }

    /// Mints a token with explicit `iat` and `exp` (seconds since the epoch).
    pub fn mint_at(&self, subject: &str, iat: u64, exp: u64) -> String {
        let claims = Claims {
            sub: subject.to_owned(),
            iat,
            exp,
        };
        // HS256 signing over serialisable claims with an HMAC key of any length cannot fail.
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.0),
        )
        .unwrap_or_default()
    }

    /// Checks a token: signature (HS256 only), `exp` (no leeway) and `sub`.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthFailure> {
        self.verify_at(token, unix_now())
    }

    /// [`JwtSecret::verify`] at `now` (seconds since the epoch): valid while
    /// `now < exp + EXP_LEEWAY_SECS`. A token that fails the signature or the algorithm check
    /// is `INVALID_TOKEN` whatever its `exp`.
    pub fn verify_at(&self, token: &str, now: u64) -> Result<Claims, AuthFailure> {
        if token.is_empty() {
            return Err(AuthFailure(ErrorCode::AuthFailed));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` is compared below, against `now`: the library's own check reads its own clock
        // and still accepts a token during the second its `exp` names.
        validation.validate_exp = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims =
            jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&self.0), &validation)
                .map_err(|_| AuthFailure(ErrorCode::InvalidToken))?
                .claims;
        if now >= claims.exp.saturating_add(EXP_LEEWAY_SECS) {
            return Err(AuthFailure(ErrorCode::TokenExpired));
        }
        Ok(claims)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_verifies_and_carries_the_subject() {
        let s = JwtSecret::generate().unwrap();
        let t = s.mint("alice", Duration::from_secs(60));
        assert_eq!(s.verify(&t).unwrap().sub, "alice");
    }

    #[test]
    fn wrong_secret_expired_and_garbage_are_refused_with_their_codes() {
        let s = JwtSecret::generate().unwrap();
        let other = JwtSecret::generate().unwrap();
        let t = other.mint("alice", Duration::from_secs(60));
        assert_eq!(s.verify(&t), Err(AuthFailure(ErrorCode::InvalidToken)));
        let now = unix_now();
        let expired = s.mint_at("alice", now - 100, now - 1);
        assert_eq!(
            s.verify(&expired),
            Err(AuthFailure(ErrorCode::TokenExpired))
        );
        // Expiry edge: a token whose exp is well in the future passes with zero leeway.
        let fresh = s.mint_at("alice", now, now + 5);
        assert!(s.verify(&fresh).is_ok());
        assert_eq!(
            s.verify("not.a.jwt"),
            Err(AuthFailure(ErrorCode::InvalidToken))
        );
        assert_eq!(s.verify(""), Err(AuthFailure(ErrorCode::AuthFailed)));
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    /// `header.claims.signature` with `header` given as base64url text and the signature made
    /// with HMAC `alg` over the first two parts.
    fn forge(header_b64: &str, claims_b64: &str, alg: Algorithm) -> String {
        let message = format!("{header_b64}.{claims_b64}");
        let sig =
            jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(KEY), alg)
                .unwrap();
        format!("{message}.{sig}")
    }

    #[test]
    fn the_algorithm_is_pinned_to_hs256() {
        let s = JwtSecret::from_bytes(KEY.to_vec());
        let claims = Claims {
            sub: "a".into(),
            iat: 0,
            exp: unix_now() + 600,
        };
        let good = s.mint_at("a", 0, claims.exp);
        assert!(s.verify(&good).is_ok());
        let claims_b64 = good.split('.').nth(1).unwrap();
        let invalid = Err(AuthFailure(ErrorCode::InvalidToken));
        // Other HMAC algorithms, signed with the right secret.
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let t =
                jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(KEY))
                    .unwrap();
            assert_eq!(s.verify(&t), invalid, "{alg:?}");
        }
        // `{"alg":"none","typ":"JWT"}` and `{"alg":"None","typ":"JWT"}`: unsigned, or carrying
        // a valid HS256 signature over the forged header.
        for none in [
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
            "eyJhbGciOiJOb25lIiwidHlwIjoiSldUIn0",
        ] {
            assert_eq!(s.verify(&format!("{none}.{claims_b64}.")), invalid);
            assert_eq!(s.verify(&format!("{none}.{claims_b64}")), invalid);
            assert_eq!(
                s.verify(&forge(none, claims_b64, Algorithm::HS256)),
                invalid
            );
        }
        // Public-key algorithms named in the header, "signed" with the secret as an HMAC key
        // (the key-confusion attack): `RS256`, `EdDSA`, and a header without `alg`.
        for header in [
            "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9",
            "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9",
            "eyJ0eXAiOiJKV1QifQ",
        ] {
            assert_eq!(
                s.verify(&forge(header, claims_b64, Algorithm::HS256)),
                invalid
            );
        }
        // The HS256 header with another algorithm's signature.
        let hs256_header = good.split('.').next().unwrap();
        assert_eq!(
            s.verify(&forge(hs256_header, claims_b64, Algorithm::HS512)),
            invalid
        );
        // And the control: the same forging helper with HS256 makes a valid token.
        assert!(
            s.verify(&forge(hs256_header, claims_b64, Algorithm::HS256))
                .is_ok()
        );
    }

    #[test]
    fn expiry_has_no_leeway_at_either_edge() {
        assert_eq!(EXP_LEEWAY_SECS, 0);
        let s = JwtSecret::generate().unwrap();
        let now = 1_800_000_000;
        let t = s.mint_at("alice", now - 100, now);
        let expired = Err(AuthFailure(ErrorCode::TokenExpired));
        assert_eq!(s.verify_at(&t, now - 1).map(|c| c.sub), Ok("alice".into()));
        assert_eq!(
            s.verify_at(&t, now),
            expired,
            "refused from the second exp names"
        );
        assert_eq!(s.verify_at(&t, now + 1), expired);
        // The wall-clock check agrees: a second past is refused, a minute ahead accepted.
        let wall = unix_now();
        assert_eq!(s.verify(&s.mint_at("a", wall - 60, wall - 1)), expired);
        assert!(s.verify(&s.mint_at("a", wall, wall + 60)).is_ok());
        // A forged token stays INVALID_TOKEN even when it is also expired.
        let other = JwtSecret::generate().unwrap();
        assert_eq!(
            s.verify_at(&other.mint_at("alice", now - 100, now), now + 5),
            Err(AuthFailure(ErrorCode::InvalidToken))
        );
    }

    #[test]
    fn secret_file_is_created_once_and_debug_hides_it() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = JwtSecret::load_or_create(dir.path()).unwrap();
        assert!(created);
        let (b, created) = JwtSecret::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert!(b.verify(&a.mint("x", Duration::from_secs(5))).is_ok());
        let dbg = format!("{a:?}");
        assert!(!dbg.contains(&hex::encode(&a.0)) && dbg.contains("redacted"));
    }
}
