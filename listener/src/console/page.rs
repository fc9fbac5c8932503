//! The console's page: `/` renders one view on the server (events, an aggregate's timeline,
//! an outbox, dead letters, handlers, subscriptions) from the same reads as the API. Signing in
//! with a token sets an `HttpOnly`, `SameSite=Strict` session cookie holding it, for
//! `console.session_max_age_secs` (`Secure` when the page was reached over HTTPS).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::auth::{self, SESSION_COOKIE};
use super::data::{self, List};
use super::error::ApiError;
use super::params::Params;
use super::render::{self, View};
use super::role::Role;
use super::state::Console;

/// Every parameter a view of the page reads.
const PAGE_PARAMS: [&str; 12] = [
    "view",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "from",
    "to",
    "after_position",
    "after_version",
    "after_id",
    "subscription",
    "status",
    "limit",
];

/// The page's routes.
pub fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/", get(index))
        .route("/session", post(sign_in))
        .route("/session/end", post(sign_out))
        .route("/console.js", get(script))
        .route("/console.css", get(style))
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
        .into_response()
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn index(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let Some(role) = auth::token(&headers).and_then(|t| c.tokens.role_of(&t)) else {
        return html(StatusCode::OK, render::sign_in(None));
    };
    match view(&c, role, q.as_deref()).await {
        Ok((view, body)) => html(StatusCode::OK, render::layout(view, role, &body)),
        Err((view, err)) => {
            let status = err.status();
            let body = render::error(status, &err.to_string());
            html(status, render::layout(view, role, &body))
        }
    }
}

/// The view `q` asks for, rendered.
async fn view(
    c: &Console,
    role: Role,
    q: Option<&str>,
) -> Result<(View, String), (View, ApiError)> {
    let p = Params::parse_form(q, &PAGE_PARAMS).map_err(|e| (View::Events, e))?;
    let name = p
        .choice("view", &View::NAMES, "events")
        .map_err(|e| (View::Events, e))?;
    let view = View::from_name(name);
    let body = render_view(c, role, view, &p)
        .await
        .map_err(|e| (view, e))?;
    Ok((view, body))
}

async fn render_view(c: &Console, role: Role, view: View, p: &Params) -> Result<String, ApiError> {
    if role < view.needs() {
        return Err(ApiError::Forbidden {
            needed: view.needs(),
        });
    }
    Ok(match view {
        View::Events => render::events(&data::events(&c.db, p, role).await?, p, role)?,
        View::Aggregate => {
            let aggregate_type = p
                .text("aggregate_type")?
                .ok_or_else(|| ApiError::bad("aggregate_type", "is required"))?;
            let aggregate_id = p
                .text("aggregate_id")?
                .ok_or_else(|| ApiError::bad("aggregate_id", "is required"))?;
            let page = data::aggregate(&c.db, &aggregate_type, &aggregate_id, p, role).await?;
            render::timeline(&aggregate_type, &aggregate_id, &page, role)
        }
        View::Outbox => {
            let subscriptions = data::list(&c.db, List::Subscriptions, role).await?;
            let chosen = match p.text("subscription")? {
                Some(name) => Some(name),
                None => subscriptions
                    .first()
                    .and_then(|s| s["name"].as_str())
                    .map(str::to_string),
            };
            let page = match &chosen {
                Some(name) => Some(data::outbox(&c.db, name, p).await?),
                None => None,
            };
            render::outbox(&subscriptions, chosen.as_deref(), page.as_ref(), p)?
        }
        View::DeadLetters => render::dead_letters(&data::dead_letters(&c.db, p).await?, role),
        View::Handlers => render::handlers(&data::list(&c.db, List::Handlers, role).await?),
        View::Subscriptions => {
            render::subscriptions(&data::list(&c.db, List::Subscriptions, role).await?)
        }
    })
}

/// `POST /session` with the form field `token`: sets the session cookie and goes to `/`.
async fn sign_in(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(err) = super::security::same_origin_form(&headers) {
        return html(
            StatusCode::FORBIDDEN,
            render::sign_in(Some(&err.to_string())),
        );
    }
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let token = fields
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
        .unwrap_or_default();
    if c.tokens.role_of(token.as_bytes()).is_none() {
        return html(
            StatusCode::UNAUTHORIZED,
            render::sign_in(Some("unknown token")),
        );
    }
    let max_age = c.session_max_age_secs;
    let secure = if over_https(&headers) { "; Secure" } else { "" };
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}",
        auth::session_value(token.as_bytes(), max_age)
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/".to_string()),
        ],
    )
        .into_response()
}

/// Whether the browser reached the console over HTTPS: the server itself speaks plain HTTP, so
/// that is a TLS-terminating proxy in front of it (`X-Forwarded-Proto: https`) or a form posted
/// from an `https://` origin. Then the cookie is `Secure`: a browser never sends it over plain
/// HTTP. (On plain HTTP it cannot be: the browser would drop it.)
fn over_https(headers: &HeaderMap) -> bool {
    let is = |name: &str, prefix: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with(prefix))
    };
    is("x-forwarded-proto", "https") || is("origin", "https://")
}

/// `POST /session/end`: clears the session cookie.
async fn sign_out(headers: HeaderMap) -> Response {
    if let Err(err) = super::security::same_origin_form(&headers) {
        return html(
            StatusCode::FORBIDDEN,
            render::sign_in(Some(&err.to_string())),
        );
    }
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/".to_string()),
        ],
    )
        .into_response()
}
