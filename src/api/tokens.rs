//! API token handlers. Tokens live in the cluster state (as hashes), so a token made on
//! one node works on every node.

use axum::extract::{Path, State};
use axum::Json;
use rampart_raft::Command;

use super::error::ApiError;
use super::json::ApiJson;
use super::views::{Committed, CreatedToken, NewToken, TokenSummary};
use super::Context;
use crate::node::context::{random_hex, token_hash};

pub async fn list(State(context): State<Context>) -> Json<Vec<TokenSummary>> {
    Json(context.view.read(|s| {
        s.cluster
            .api_tokens
            .iter()
            .map(|(name, t)| TokenSummary {
                name: name.clone(),
                role: t.role,
            })
            .collect()
    }))
}

pub async fn add(
    State(context): State<Context>,
    ApiJson(request): ApiJson<NewToken>,
) -> Result<Json<CreatedToken>, ApiError> {
    let token = random_hex(24);
    context
        .write(Command::AddApiToken {
            name: request.name.clone(),
            role: request.role,
            token_hash: token_hash(&token),
        })
        .await?;
    Ok(Json(CreatedToken {
        name: request.name,
        role: request.role,
        token,
    }))
}

pub async fn revoke(
    State(context): State<Context>,
    Path(name): Path<String>,
) -> Result<Json<Committed>, ApiError> {
    if context
        .view
        .read(|s| !s.cluster.api_tokens.contains_key(&name))
    {
        return Err(ApiError::NotFound(format!("no token named '{name}'")));
    }
    let receipt = context.write(Command::RevokeApiToken { name }).await?;
    Ok(Json(Committed {
        log_index: receipt.log_index,
    }))
}
