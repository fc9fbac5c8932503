//! The API's routes: each checks the caller's role, then its parameters, then reads through
//! [`super::data`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use super::auth;
use super::data::{self, List};
use super::error::ApiError;
use super::params::{checked_text, Params};
use super::role::Role;
use super::state::Console;

type Shared = State<Arc<Console>>;

/// The console's routes (API and page), with the security headers on every answer.
pub fn router(state: Arc<Console>) -> Router {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/events", get(events))
        .route(
            "/api/aggregates/{aggregate_type}/{aggregate_id}",
            get(aggregate),
        )
        .route("/api/event-types", get(event_types))
        .route("/api/subscriptions", get(subscriptions))
        .route("/api/subscriptions/{name}/outbox", get(outbox))
        .route("/api/dead-letters", get(dead_letters))
        .route("/api/dead-letters/redrive", post(redrive))
        .route("/api/handlers", get(handlers))
        .merge(super::page::routes())
        .layer(axum::middleware::from_fn(super::security::headers))
        .with_state(state)
}

/// A JSON answer.
fn json_response(body: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Path parameters, decoded; a 400 naming the route's parameters when they are not text.
fn path_text<T>(path: Result<Path<T>, PathRejection>, names: &str) -> Result<T, ApiError> {
    path.map(|Path(p)| p)
        .map_err(|e| ApiError::bad(names, format!("cannot be decoded: {e}")))
}

async fn openapi() -> Response {
    json_response(&super::openapi::document())
}

async fn events(
    State(c): Shared,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let role = auth::require(&c.tokens, &headers, Role::Viewer)?;
    let p = Params::parse(q.as_deref(), &data::EVENT_FILTERS)?;
    Ok(json_response(
        &data::events(&c.db, &p, role).await?.to_json(),
    ))
}

async fn aggregate(
    State(c): Shared,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let role = auth::require(&c.tokens, &headers, Role::Viewer)?;
    let (aggregate_type, aggregate_id) = path_text(path, "aggregate_type, aggregate_id")?;
    let p = Params::parse(q.as_deref(), &data::AGGREGATE_PAGING)?;
    let page = data::aggregate(&c.db, &aggregate_type, &aggregate_id, &p, role).await?;
    Ok(json_response(&page.to_json()))
}

async fn outbox(
    State(c): Shared,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    auth::require(&c.tokens, &headers, Role::Developer)?;
    let name = path_text(path, "name")?;
    let p = Params::parse(q.as_deref(), &data::OUTBOX_FILTERS)?;
    Ok(json_response(
        &data::outbox(&c.db, &name, &p).await?.to_json(),
    ))
}

async fn dead_letters(
    State(c): Shared,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    auth::require(&c.tokens, &headers, Role::Developer)?;
    let p = Params::parse(q.as_deref(), &data::DEAD_LETTER_FILTERS)?;
    Ok(json_response(
        &data::dead_letters(&c.db, &p).await?.to_json(),
    ))
}

async fn listed(
    c: &Console,
    headers: &HeaderMap,
    q: Option<&str>,
    what: List,
) -> Result<Response, ApiError> {
    let role = auth::require(&c.tokens, headers, Role::Viewer)?;
    Params::parse(q, &[])?;
    let items = data::list(&c.db, what, role).await?;
    Ok(json_response(&json!({"items": items})))
}

async fn event_types(
    State(c): Shared,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    listed(&c, &headers, q.as_deref(), List::EventTypes).await
}

async fn subscriptions(
    State(c): Shared,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    listed(&c, &headers, q.as_deref(), List::Subscriptions).await
}

async fn handlers(
    State(c): Shared,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    listed(&c, &headers, q.as_deref(), List::Handlers).await
}

/// `POST /api/dead-letters/redrive` with `{"subscription": …, "event_id": …}`.
async fn redrive(
    State(c): Shared,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    auth::require(&c.tokens, &headers, Role::Operator)?;
    super::security::same_origin_post(&headers)?;
    Params::parse(q.as_deref(), &[])?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad("body", format!("is not JSON: {e}")))?;
    let Some(fields) = body.as_object() else {
        return Err(ApiError::bad("body", "must be an object"));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| *k != "subscription" && *k != "event_id")
    {
        return Err(ApiError::bad(
            unknown.as_str(),
            "unknown field; the body takes subscription and event_id",
        ));
    }
    let subscription = match fields.get("subscription") {
        Some(Value::String(s)) => checked_text("subscription", s)?.to_string(),
        _ => return Err(ApiError::bad("subscription", "must be a string")),
    };
    let event_id = fields
        .get("event_id")
        .and_then(Value::as_str)
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .ok_or_else(|| ApiError::bad("event_id", "must be a UUID"))?;
    let marked = c.db.redrive(&subscription, event_id).await?;
    if marked == 0 {
        return Err(ApiError::NotFound(format!(
            "no dead letter of event {event_id} in subscription {subscription:?}"
        )));
    }
    Ok(json_response(&json!({"redrive_requested": marked})))
}
