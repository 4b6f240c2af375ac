//! JWT authentication for agents: HS256 tokens signed with a secret kept in the relay's data
//! dir. The algorithm is pinned, `exp` and `sub` are required, and there is no leeway, so a
//! token is refused from the second its `exp` names.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tube_proto::ErrorCode;

/// File name of the secret inside the data dir.
pub const SECRET_FILE: &str = "relay-jwt.key";

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
        if token.is_empty() {
            return Err(AuthFailure(ErrorCode::AuthFailed));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&self.0), &validation)
        {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(AuthFailure(match e.kind() {
                ErrorKind::ExpiredSignature => ErrorCode::TokenExpired,
                _ => ErrorCode::InvalidToken,
            })),
        }
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

    #[test]
    fn other_algorithms_are_refused() {
        let s = JwtSecret::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec());
        let claims = Claims {
            sub: "a".into(),
            iat: 0,
            exp: unix_now() + 60,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert_eq!(s.verify(&t), Err(AuthFailure(ErrorCode::InvalidToken)));
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
