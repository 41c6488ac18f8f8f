//! The extractors the handlers take: the authenticated caller (any user, or an operator) and a document id from
//! the path.

use axum::{
    extract::{FromRequestParts, Path},
    http::request::Parts,
};
use uuid::Uuid;

use super::{
    ApiState,
    error::{ApiError, ErrorCode},
};

/// The authenticated caller.
pub struct Caller(pub Uuid);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        identify(parts, state).map(|id| Self(id.user))
    }
}

/// An authenticated caller whose token carries the admin claim (operator endpoints); others get 403.
pub struct Admin(pub Uuid);

impl FromRequestParts<ApiState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let id = identify(parts, state)?;
        if !id.admin {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "this endpoint needs a token with the admin claim",
            ));
        }
        Ok(Self(id.user))
    }
}

/// Verifies the bearer token of a request.
fn identify(parts: &Parts, state: &ApiState) -> Result<crate::auth::Identity, ApiError> {
    let header = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some(token) = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
    else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "send Authorization: Bearer <token>",
        ));
    };
    match state.auth.verify(token.trim()) {
        Ok(id) => Ok(id),
        Err(e) => {
            tracing::debug!(error = %e, "Token refused");
            Err(ApiError::new(
                ErrorCode::Unauthorized,
                "the token is invalid or expired",
            ))
        }
    }
}

/// A document id from the path; one that is not a UUID is as unknown as any other (404).
pub struct DocumentId(pub Uuid);

impl FromRequestParts<ApiState> for DocumentId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let Path(id) = Path::<Uuid>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found())?;
        Ok(Self(id))
    }
}
