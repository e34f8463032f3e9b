//! Bearer-token authentication and role checks.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use rampart_raft::command::ApiRole;

use super::error::ApiError;
use super::Context;

/// Middleware: admits the request when its bearer token grants at least the role in
/// the state; 401 without a valid token, 403 with a token of a lesser role.
pub async fn require(
    State((context, needed)): State<(Context, ApiRole)>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = request.headers().get(AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized("missing 'Authorization: Bearer <token>' header".into())
    })?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::Unauthorized("the Authorization header must be 'Bearer <token>'".into())
        })?;
    let role = context
        .role_of_token(token.trim())
        .ok_or_else(|| ApiError::Unauthorized("unknown or revoked token".into()))?;
    if !role.allows(needed) {
        return Err(ApiError::Forbidden(format!(
            "this token has the {role:?} role; the {needed:?} role is needed"
        )));
    }
    Ok(next.run(request).await)
}
