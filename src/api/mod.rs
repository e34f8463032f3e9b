//! The admin HTTP API (JSON under `/v1`), health checks and metrics.
//!
//! - [`error`]: the one mapping from errors to HTTP status codes and JSON bodies.
//! - [`auth`]: bearer tokens and roles (monitor < control < admin) on every route but
//!   the health checks.
//! - [`json`]: the JSON body extractor whose rejections are [`error::ApiError`]s.
//! - [`views`]: response and request bodies, shared with the CLI.
//! - [`cluster`], [`tokens`], [`registers`]: the handlers.

mod auth;
mod cluster;
pub mod error;
mod json;
mod metrics;
mod modules;
mod registers;
mod tokens;
pub mod views;

use std::sync::Arc;

use axum::middleware;
use axum::routing::{delete, get, post, put};
use axum::Router;
use rampart_raft::command::ApiRole;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::node::NodeContext;
use error::ApiError;

pub type Context = Arc<NodeContext>;

pub fn router(context: Context) -> Router {
    let monitor = Router::new()
        .route("/v1/cluster", get(cluster::status))
        .route("/v1/nodes", get(cluster::nodes))
        .route("/v1/nodes/{name}", get(cluster::node))
        .route("/v1/modules", get(cluster::modules))
        .route("/v1/registers/{key}", get(registers::read))
        .route("/v1/modules/{name}", get(modules::get))
        .route("/v1/modules/{name}/config", get(modules::config_get))
        .route("/v1/modules/{name}/state", get(modules::state))
        .route("/v1/modules/{name}/log", get(modules::log))
        .route("/v1/events", get(modules::events))
        .route("/metrics", get(metrics::prometheus))
        .route_layer(middleware::from_fn_with_state(
            (context.clone(), ApiRole::Monitor),
            auth::require,
        ));
    let control = Router::new()
        .route("/v1/registers/{key}", put(registers::write))
        .route("/v1/registers/{key}/cas", post(registers::cas))
        .route("/v1/modules/{name}/start", post(modules::start))
        .route("/v1/modules/{name}/stop", post(modules::stop))
        .route("/v1/modules/{name}/restart", post(modules::restart))
        .route("/v1/modules/{name}/stopstart", post(modules::stopstart))
        .route_layer(middleware::from_fn_with_state(
            (context.clone(), ApiRole::Control),
            auth::require,
        ));
    let admin = Router::new()
        .route("/v1/cluster/init", post(cluster::init))
        .route("/v1/modules", post(modules::install))
        .route("/v1/modules/{name}", delete(modules::uninstall))
        .route("/v1/modules/{name}/package", get(modules::export))
        .route("/v1/modules/{name}/config", put(modules::config_set))
        .route("/v1/cluster/join", post(cluster::join))
        .route("/v1/cluster/leave", post(cluster::leave))
        .route("/v1/nodes/{name}", delete(cluster::remove_node))
        .route("/v1/tokens", get(tokens::list).post(tokens::add))
        .route("/v1/tokens/{name}", delete(tokens::revoke))
        .route_layer(middleware::from_fn_with_state(
            (context.clone(), ApiRole::Admin),
            auth::require,
        ));
    Router::new()
        .route("/health", get(cluster::health))
        .merge(monitor)
        .merge(control)
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::module::package::MAX_PACKAGE_BYTES + 1,
        ))
        .merge(admin)
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .with_state(context)
}

/// Serves the API until `shutdown` is cancelled, then finishes in-flight requests.
pub async fn serve(listener: TcpListener, context: Context, shutdown: CancellationToken) {
    let app = router(context);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin API stopped");
    }
}
