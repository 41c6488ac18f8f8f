//! Bearer tokens: HS256 JWTs whose `sub` is the user's UUID, with `exp` required and `nbf` honoured.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The claims of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's UUID.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default)]
    pub iat: u64,
    /// Not before, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Operator rights (dead letters, quota).
    #[serde(default)]
    pub admin: bool,
}

/// Why a token was refused (all answered with 401, without saying more than needed).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// Expired, not yet valid, badly signed or malformed.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Issues and verifies tokens with one HS256 secret.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(HS256)")
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Auth {
    /// Tokens signed with `secret`.
    pub fn hs256(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// A token for `user`, valid for `ttl`.
    pub fn issue(&self, user: Uuid, ttl: Duration, admin: bool) -> String {
        let claims = Claims {
            sub: user.to_string(),
            exp: now() + ttl.as_secs(),
            iat: now(),
            nbf: None,
            admin,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Signs arbitrary claims (tests and tools that need unusual tokens).
    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Checks a token and returns its user.
    pub fn verify(&self, token: &str) -> Result<(Uuid, Claims), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let user = Uuid::parse_str(&data.claims.sub)
            .map_err(|_| AuthError::Invalid("sub is not a UUID".into()))?;
        Ok((user, data.claims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let auth = Auth::hs256("a-secret-of-sixteen-chars");
        let user = Uuid::new_v4();
        let (got, claims) = auth
            .verify(&auth.issue(user, Duration::from_secs(60), true))
            .unwrap();
        assert_eq!(got, user);
        assert!(claims.admin);
        let forged =
            Auth::hs256("another-secret-entirely").issue(user, Duration::from_secs(60), false);
        assert!(auth.verify(&forged).is_err());
        let expired = Claims {
            sub: user.to_string(),
            exp: now() - 3600,
            iat: now() - 7200,
            nbf: None,
            admin: false,
        };
        let expired = jsonwebtoken::encode(
            &Header::default(),
            &expired,
            &EncodingKey::from_secret(b"a-secret-of-sixteen-chars"),
        )
        .unwrap();
        assert!(auth.verify(&expired).is_err());
        assert!(auth.verify("not.a.token").is_err());
    }
}
