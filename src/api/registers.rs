//! Register handlers: linearizable reads, writes and compare-and-set.

use axum::extract::{Path, State};
use axum::Json;
use rampart_raft::Command;

use super::error::ApiError;
use super::json::ApiJson;
use super::views::{Committed, RegisterCas, RegisterValue, RegisterWrite};
use super::Context;

pub async fn read(
    State(context): State<Context>,
    Path(key): Path<String>,
) -> Result<Json<RegisterValue>, ApiError> {
    let value = context.read_register(&key).await?;
    Ok(Json(RegisterValue { key, value }))
}

pub async fn write(
    State(context): State<Context>,
    Path(key): Path<String>,
    ApiJson(body): ApiJson<RegisterWrite>,
) -> Result<Json<Committed>, ApiError> {
    let receipt = context
        .write(Command::RegisterWrite {
            key,
            value: body.value,
        })
        .await?;
    Ok(Json(Committed {
        log_index: receipt.log_index,
    }))
}

/// 409 when the register does not hold `expected`.
pub async fn cas(
    State(context): State<Context>,
    Path(key): Path<String>,
    ApiJson(body): ApiJson<RegisterCas>,
) -> Result<Json<Committed>, ApiError> {
    let receipt = context
        .write(Command::RegisterCas {
            key,
            expected: body.expected,
            new: body.new,
        })
        .await?;
    Ok(Json(Committed {
        log_index: receipt.log_index,
    }))
}
