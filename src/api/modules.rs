//! Module handlers: packages, configuration, operations, state, log and events.
//!
//! Start and stop change the cluster state (per node); restart, stopstart, state and
//! log concern one node's runtime: asked on another node, they are forwarded to the
//! node named by `?node=`, with the caller's token.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use rampart_raft::{Command, NodeId};
use serde::Deserialize;

use super::error::ApiError;
use super::views::{Committed, LogPage, ModuleDetail};
use super::Context;
use crate::module::log::LogEntry;
use crate::module::package::Package;
use crate::module::runtime::{Control, ModuleStatus};

#[derive(Debug, Deserialize)]
pub struct NodeQuery {
    /// A node name; default: the node answering.
    pub node: Option<String>,
}

fn package_error(e: crate::module::package::PackageError) -> ApiError {
    ApiError::BadRequest(format!("package refused: {e}"))
}

fn current_package(context: &Context, name: &str) -> Result<Vec<u8>, ApiError> {
    context
        .view
        .read(|s| s.cluster.modules.get(name).map(|m| m.package.clone()))
        .ok_or_else(|| ApiError::NotFound(format!("no module named '{name}'")))
}

fn detail(context: &Context, name: &str) -> Result<ModuleDetail, ApiError> {
    context.view.read(|s| {
        let m = s
            .cluster
            .modules
            .get(name)
            .ok_or_else(|| ApiError::NotFound(format!("no module named '{name}'")))?;
        Ok(ModuleDetail {
            name: m.name.clone(),
            kind: m.kind,
            digest: m.digest.clone(),
            previous_digests: m.previous.iter().map(|p| p.digest.clone()).collect(),
            failover: m.failover,
            started_on: s.cluster.node_names(&m.started_on),
            warnings: Vec::new(),
        })
    })
}

/// Validates a package and commits it: install, or replace with a new version.
async fn commit_package(
    context: &Context,
    package: Package,
) -> Result<Json<ModuleDetail>, ApiError> {
    context
        .write(Command::InstallModule {
            name: package.name.clone(),
            kind: package.config.mode,
            digest: package.digest.clone(),
            package: package.bytes.clone(),
        })
        .await?;
    let mut detail = detail(context, &package.name)?;
    detail.warnings = package.config.warnings;
    Ok(Json(detail))
}

pub async fn install(
    State(context): State<Context>,
    body: Bytes,
) -> Result<Json<ModuleDetail>, ApiError> {
    let package = Package::open(body.to_vec()).map_err(package_error)?;
    commit_package(&context, package).await
}

pub async fn get(
    State(context): State<Context>,
    Path(name): Path<String>,
) -> Result<Json<ModuleDetail>, ApiError> {
    Ok(Json(detail(&context, &name)?))
}

pub async fn export(
    State(context): State<Context>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = current_package(&context, &name)?;
    Ok(([(CONTENT_TYPE, "application/zip")], bytes).into_response())
}

pub async fn uninstall(
    State(context): State<Context>,
    Path(name): Path<String>,
) -> Result<Json<Committed>, ApiError> {
    let running = detail(&context, &name)?.started_on;
    if !running.is_empty() {
        return Err(ApiError::Conflict(format!(
            "module '{name}' is started on {}: stop it first",
            running.join(", ")
        )));
    }
    let receipt = context.write(Command::UninstallModule { name }).await?;
    Ok(Json(Committed {
        log_index: receipt.log_index,
    }))
}

pub async fn config_get(
    State(context): State<Context>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let package = Package::open(current_package(&context, &name)?).map_err(package_error)?;
    Ok(([(CONTENT_TYPE, "application/xml")], package.userconfig).into_response())
}

/// Validated before anything is committed: a refused edit changes nothing.
pub async fn config_set(
    State(context): State<Context>,
    Path(name): Path<String>,
    body: String,
) -> Result<Json<ModuleDetail>, ApiError> {
    let current = Package::open(current_package(&context, &name)?).map_err(package_error)?;
    let edited = current
        .with_userconfig(&body)
        .map_err(|e| ApiError::BadRequest(format!("configuration refused: {e}")))?;
    if edited.config.mode != current.config.mode {
        return Err(ApiError::BadRequest(
            "the configuration changes the module's mode: uninstall and install instead".into(),
        ));
    }
    commit_package(&context, edited).await
}

fn node_id(context: &Context, node: Option<&str>) -> Result<(NodeId, String), ApiError> {
    match node {
        None => Ok((context.me.id, context.me.name.clone())),
        Some(name) => context
            .view
            .read(|s| s.cluster.node_by_name(name).map(|n| (n.id, n.name.clone())))
            .ok_or_else(|| ApiError::NotFound(format!("no node named '{name}'"))),
    }
}

async fn set_started(
    context: &Context,
    name: String,
    node: Option<&str>,
    started: bool,
) -> Result<Json<Committed>, ApiError> {
    detail(context, &name)?;
    let (node, _) = node_id(context, node)?;
    let receipt = context
        .write(Command::SetModuleStarted {
            name,
            node,
            started,
        })
        .await?;
    Ok(Json(Committed {
        log_index: receipt.log_index,
    }))
}

pub async fn start(
    State(context): State<Context>,
    Path(name): Path<String>,
    Query(query): Query<NodeQuery>,
) -> Result<Json<Committed>, ApiError> {
    set_started(&context, name, query.node.as_deref(), true).await
}

pub async fn stop(
    State(context): State<Context>,
    Path(name): Path<String>,
    Query(query): Query<NodeQuery>,
) -> Result<Json<Committed>, ApiError> {
    set_started(&context, name, query.node.as_deref(), false).await
}

/// What is needed to pass a request on to another node.
pub struct Incoming {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Incoming {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Infallible> {
        Ok(Incoming {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        })
    }
}

/// Forwards the request to `node`'s API when it is not this node.
async fn forward_if_elsewhere(
    context: &Context,
    node: Option<&str>,
    request: &Incoming,
) -> Result<Option<Response>, ApiError> {
    let Some(node) = node.filter(|n| *n != context.me.name) else {
        return Ok(None);
    };
    let api = context
        .view
        .read(|s| {
            let id = s.cluster.node_by_name(node)?.id;
            s.last_membership
                .membership()
                .get_node(&id)
                .map(|n| n.api_addr.clone())
        })
        .ok_or_else(|| ApiError::NotFound(format!("no node named '{node}'")))?;
    // The target answers for itself: drop `node`, keep the other parameters.
    let query: Vec<&str> = request
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("node="))
        .collect();
    let path = match query.is_empty() {
        true => request.uri.path().to_string(),
        false => format!("{}?{}", request.uri.path(), query.join("&")),
    };
    let mut forwarded = reqwest::Client::new()
        .request(request.method.clone(), format!("http://{api}{path}"))
        .timeout(Duration::from_secs(60));
    if let Some(auth) = request.headers.get(AUTHORIZATION) {
        forwarded = forwarded.header(AUTHORIZATION, auth.clone());
    }
    let response = forwarded
        .send()
        .await
        .map_err(|e| ApiError::BadGateway(format!("cannot reach node '{node}' at {api}: {e}")))?;
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = response.headers().get(CONTENT_TYPE).cloned();
    let body = response
        .bytes()
        .await
        .map_err(|e| ApiError::BadGateway(format!("node '{node}': {e}")))?;
    let mut reply = (status, body).into_response();
    if let Some(content_type) = content_type {
        reply.headers_mut().insert(CONTENT_TYPE, content_type);
    }
    Ok(Some(reply))
}

fn local_status(context: &Context, name: &str) -> Result<ModuleStatus, ApiError> {
    context.modules.status(name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no module named '{name}' on node '{}'",
            context.me.name
        ))
    })
}

async fn control(
    context: Context,
    name: String,
    query: NodeQuery,
    request: Incoming,
    what: Control,
) -> Result<Response, ApiError> {
    if let Some(reply) = forward_if_elsewhere(&context, query.node.as_deref(), &request).await? {
        return Ok(reply);
    }
    let status = local_status(&context, &name)?;
    if status.state == crate::module::state::ModuleState::Stop {
        return Err(ApiError::Conflict(format!(
            "module '{name}' is stopped on node '{}'",
            context.me.name
        )));
    }
    if !context.modules.control(&name, what) {
        return Err(ApiError::Unavailable(format!(
            "module '{name}' is being set up again on node '{}': retry",
            context.me.name
        )));
    }
    Ok(Json(local_status(&context, &name)?).into_response())
}

pub async fn restart(
    State(context): State<Context>,
    Path(name): Path<String>,
    Query(query): Query<NodeQuery>,
    request: Incoming,
) -> Result<Response, ApiError> {
    control(context, name, query, request, Control::Restart).await
}

pub async fn stopstart(
    State(context): State<Context>,
    Path(name): Path<String>,
    Query(query): Query<NodeQuery>,
    request: Incoming,
) -> Result<Response, ApiError> {
    control(context, name, query, request, Control::StopStart).await
}

pub async fn state(
    State(context): State<Context>,
    Path(name): Path<String>,
    Query(query): Query<NodeQuery>,
    request: Incoming,
) -> Result<Response, ApiError> {
    if let Some(reply) = forward_if_elsewhere(&context, query.node.as_deref(), &request).await? {
        return Ok(reply);
    }
    Ok(Json(local_status(&context, &name)?).into_response())
}

#[derive(Debug, Deserialize)]
pub struct LogQuery {
    pub node: Option<String>,
    #[serde(default)]
    pub offset: usize,
    pub limit: Option<usize>,
    #[serde(default)]
    pub verbose: bool,
}

pub async fn log(
    State(context): State<Context>,
    Path(name): Path<String>,
    Query(query): Query<LogQuery>,
    request: Incoming,
) -> Result<Response, ApiError> {
    if let Some(reply) = forward_if_elsewhere(&context, query.node.as_deref(), &request).await? {
        return Ok(reply);
    }
    let log = context.modules.log(&name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no module named '{name}' on node '{}'",
            context.me.name
        ))
    })?;
    let limit = query.limit.unwrap_or(200).min(5000);
    let (entries, next_offset): (Vec<LogEntry>, usize) = log
        .read(query.offset, limit, query.verbose)
        .map_err(|e| ApiError::Internal(format!("reading the module log: {e}")))?;
    Ok(Json(LogPage {
        entries,
        next_offset,
    })
    .into_response())
}

/// Server-sent events: every state and resource change of this node's modules.
pub async fn events(
    State(context): State<Context>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = context.modules.subscribe();
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = match receiver.recv().await {
            Ok(status) => Event::default()
                .event("module")
                .json_data(&status)
                .unwrap_or_else(|_| Event::default().comment("unencodable status")),
            // A slow reader missed some changes: tell it, and go on.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                Event::default().event("lagged").data(missed.to_string())
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), receiver))
    });
    // End with the node, or its graceful shutdown would wait for this stream forever.
    let stream = futures::StreamExt::take_until(stream, context.shutdown.clone().cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default())
}
