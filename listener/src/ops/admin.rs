//! The admin HTTP server: `GET /health` (200 while streaming or standing by) and `GET /metrics`
//! (Prometheus text), optionally behind a bearer token.
//!
//! It runs inside [`crate::Listener::run`] when `admin.listen` is set, so an application that
//! embeds the library gets it too, and it stops when `run` returns.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::ops::metrics::Metrics;

/// What the listener is doing, as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and preparing the first session.
    Starting,
    /// A replication stream (CopyBoth) or a notify-mode poller is running.
    Streaming,
    /// The last session failed transiently; waiting for the reconnect backoff.
    Reconnecting(String),
    /// The slot was lost: delivering what it missed from the event table, then streaming from a
    /// new slot ([`crate::replication::recovery`]). Events are delivered, but the stream is not running.
    Recovering,
    /// Another listener streams from the slot (server process `holder_pid`); this one takes
    /// over when it is free ([`crate::replication::standby`]).
    Standby {
        /// `pg_replication_slots.active_pid`: the walsender serving the active listener.
        holder_pid: i32,
    },
}

/// The listener's phase, shared between its sessions and the admin server.
#[derive(Debug, Clone)]
pub struct Health {
    phase: Arc<watch::Sender<Phase>>,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            phase: Arc::new(watch::Sender::new(Phase::Starting)),
        }
    }
}

impl Health {
    /// Records a new phase.
    pub fn set(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }
}

/// What the handlers read.
#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: Arc<Metrics>,
    /// SHA-256 of the expected bearer token.
    token: Option<[u8; 32]>,
    /// The listener's cancellation: set means shutting down.
    shutdown: CancellationToken,
}

/// Serves `/health` and `/metrics` on `listener` until `stop` fires.
///
/// `token`: when `Some`, both endpoints answer 401 unless the request carries
/// `Authorization: Bearer <token>`. `shutdown` is the listener's own cancellation token, so that
/// `/health` says "shutting down" while the last transaction is finished. `console`: more
/// routes served alongside (the operator console), with their own authentication.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    metrics: Arc<Metrics>,
    token: Option<String>,
    shutdown: CancellationToken,
    stop: CancellationToken,
    console: Option<Router>,
) -> std::io::Result<()> {
    let state = AdminState {
        health,
        metrics,
        token: token.map(|t| digest(t.as_bytes())),
        shutdown,
    };
    let mut app = Router::new()
        .route("/health", get(health_endpoint))
        .route("/metrics", get(metrics_endpoint))
        .with_state(state);
    if let Some(console) = console {
        app = app.merge(console);
    }
    if let Ok(addr) = listener.local_addr() {
        info!(addr = %addr, "admin HTTP server listening");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Whether the request carries the expected token. Both sides are hashed first, so the
/// comparison takes the same time whatever the length or content of the guess.
fn authorized(state: &AdminState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    let given = digest(given);
    given
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "unauthorized\n",
    )
        .into_response()
}

async fn health_endpoint(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match state.health.phase() {
        Phase::Streaming => (StatusCode::OK, "streaming\n").into_response(),
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response(),
        Phase::Reconnecting(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("reconnecting: {reason}\n"),
        )
            .into_response(),
        Phase::Recovering => (
            StatusCode::SERVICE_UNAVAILABLE,
            "recovering from a lost slot\n",
        )
            .into_response(),
        // A healthy standby: ready to take over, so a liveness probe must not restart it.
        Phase::Standby { holder_pid } => (
            StatusCode::OK,
            format!("standby: the slot is held by server process {holder_pid}\n"),
        )
            .into_response(),
    }
}

async fn metrics_endpoint(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
