//! Bearer tokens: JWTs whose `sub` names the user, HS256 with a shared secret or RS256/ES256 with a JWKS file's
//! keys, with `exp` required, `nbf` honoured, and `iss`/`aud` checked when configured.

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

/// Why a token was refused (all answered with 401, without saying more than needed), or why the verifier could
/// not be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// Expired, not yet valid, badly signed, for another issuer or audience, or malformed.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The JWKS file could not be read or holds no usable key.
    #[error("cannot use the JWKS file {path}: {reason}")]
    Jwks {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The user: `sub` when it is a UUID (Supabase), else a UUID v5 of issuer and `sub` (Auth0's `auth0|…`).
    pub user: Uuid,
    /// Whether the admin claim is true (dead letters, quota).
    pub admin: bool,
}

/// Verifies bearer tokens: HS256 with a shared secret (Supabase's default; what `producer token` issues) and,
/// with a JWKS file, RS256/PS256/ES256 with the file's public keys (Auth0, Supabase asymmetric keys), chosen by the
/// token's `alg` and `kid`. `exp` and `sub` are required, `nbf` is honoured (30 s leeway), and `iss` and `aud`
/// are checked when configured.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    hs256: DecodingKey,
    /// Public keys by `kid` (`None`: a key without one), with their algorithm.
    jwks: Vec<(Option<String>, Algorithm, DecodingKey)>,
    issuer: Option<String>,
    audience: Option<String>,
    /// Dotted path of the boolean admin claim (`admin`, `app_metadata.admin`, `https://example.com/admin`).
    admin_claim: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("jwks_keys", &self.jwks.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Namespace of the UUIDs made from non-UUID subjects (a UUID v5 of `upload-pipeline:subject`).
const SUBJECT_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_1c8e_3b0a_5e7c_9a41_2d7f_0c55_e3a9);

impl Auth {
    /// Tokens signed with `secret` (HS256 only).
    pub fn hs256(secret: &str) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            hs256: DecodingKey::from_secret(secret.as_bytes()),
            jwks: Vec::new(),
            issuer: None,
            audience: None,
            admin_claim: "admin".into(),
        }
    }

    /// The verifier the API settings describe: the HS256 secret, the JWKS file's keys, issuer, audience and admin
    /// claim.
    pub fn from_settings(api: &crate::settings::ApiSettings) -> Result<Self, AuthError> {
        let mut auth = Self::hs256(api.jwt_secret.expose());
        auth.issuer = api.jwt_issuer.clone().filter(|s| !s.is_empty());
        auth.audience = api.jwt_audience.clone().filter(|s| !s.is_empty());
        auth.admin_claim = api.admin_claim.clone();
        if let Some(path) = &api.jwks_file {
            let err = |reason: String| AuthError::Jwks {
                path: path.display().to_string(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&text)
                .map_err(|e| err(format!("not a JWKS document: {e}")))?;
            for jwk in &set.keys {
                let key = DecodingKey::from_jwk(jwk).map_err(|e| err(e.to_string()))?;
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => jwk
                        .common
                        .key_algorithm
                        .and_then(|a| a.to_string().parse().ok())
                        .unwrap_or(Algorithm::RS256),
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => return Err(err("only RSA and EC P-256 public keys are supported".into())),
                };
                auth.jwks.push((jwk.common.key_id.clone(), alg, key));
            }
            if auth.jwks.is_empty() {
                return Err(err("it holds no key".into()));
            }
        }
        Ok(auth)
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
        self.sign(&claims)
    }

    /// Signs arbitrary claims with the HS256 secret (tests and tools that need unusual tokens).
    pub fn sign<T: Serialize>(&self, claims: &T) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Checks a token and returns whom it speaks for.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let invalid = |e: String| AuthError::Invalid(e);
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(e.to_string()))?;
        let key = if header.alg == Algorithm::HS256 {
            &self.hs256
        } else {
            let mut candidates = self
                .jwks
                .iter()
                .filter(|(_, alg, _)| *alg == header.alg)
                .filter(|(kid, _, _)| header.kid.is_none() || *kid == header.kid);
            match (candidates.next(), candidates.next()) {
                (Some((_, _, key)), None) => key,
                (Some(_), Some(_)) => {
                    return Err(invalid("the token names no key id (kid)".into()));
                }
                (None, _) => {
                    return Err(invalid(format!(
                        "no key for algorithm {:?}{}",
                        header.alg,
                        header
                            .kid
                            .as_deref()
                            .map(|k| format!(" and key id {k}"))
                            .unwrap_or_default()
                    )));
                }
            }
        };
        let mut validation = Validation::new(header.alg);
        // A configured issuer or audience must be present, not merely right when present.
        let mut required = vec!["exp", "sub"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        validation.leeway = 30;
        match &self.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
            .map_err(|e| invalid(e.to_string()))?;
        let claims = data.claims;
        let sub = claims["sub"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid("sub is not a string".into()))?;
        let user = Uuid::parse_str(sub).unwrap_or_else(|_| {
            let iss = claims["iss"].as_str().unwrap_or_default();
            Uuid::new_v5(&SUBJECT_NAMESPACE, format!("{iss}|{sub}").as_bytes())
        });
        let admin = claim_at(&claims, &self.admin_claim) == Some(&serde_json::Value::Bool(true));
        Ok(Identity { user, admin })
    }
}

/// The claim at a dotted path; a top-level key containing dots (a namespaced claim) wins.
fn claim_at<'a>(claims: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(claims, |v, key| v.get(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let auth = Auth::hs256("a-secret-of-sixteen-chars");
        let user = Uuid::new_v4();
        let got = auth
            .verify(&auth.issue(user, Duration::from_secs(60), true))
            .unwrap();
        assert_eq!(got.user, user);
        assert!(got.admin);
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
