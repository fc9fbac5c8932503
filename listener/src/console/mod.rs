//! The operator console: a read-only event and outbox browser over HTTP, mounted on the admin
//! server when `console.enabled` is set.
//!
//! `/api/...` is a JSON API described by the OpenAPI document at `/api/openapi.json`; `/` is a
//! server-rendered page over the same queries. Every route requires a token of a role
//! ([`Role`]): `viewer` sees counts, lag and types, `developer` also payloads, metadata, outbox
//! entries and dead letters, `operator` also redrives dead letters. The console connects to the
//! database as its own role, which can read and request a redrive, nothing else.

mod auth;
mod data;
mod db;
mod error;
mod openapi;
mod page;
mod params;
// Public for the end-to-end suite, which checks how the server plans them.
#[doc(hidden)]
pub mod queries;
mod render;
mod role;
mod routes;
mod security;
mod state;

use std::sync::Arc;

use axum::Router;

pub use role::Role;

use crate::config::Config;
use crate::error::ConfigError;

/// Builds the console's router from `config`, reading its tokens and password through `env`;
/// `None` when the console is not enabled. A configured variable that is unset or empty is an
/// error: the console fails closed.
pub fn router(
    config: &Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Router>, ConfigError> {
    let console = &config.console;
    if !console.enabled {
        return Ok(None);
    }
    let read = |key: &str, name: &str| match env(name) {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(ConfigError::invalid(
            Some(format!("console.{key}")),
            format!("environment variable {name} is not set or empty"),
        )),
    };
    let mut tokens = Vec::new();
    for ((key, name), role) in console.token_envs().into_iter().zip(Role::ALL) {
        if let Some(name) = name {
            tokens.push((role, read(key, name)?));
        }
    }
    let mut database = config.database.clone();
    database.user = console.user.clone().unwrap_or_default();
    database.application_name = "pg_domain_events_console".into();
    database.password = match console.password_env.as_deref() {
        Some(name) => Some(read("password_env", name)?),
        None => None,
    };
    let state = Arc::new(state::Console {
        tokens: auth::Tokens::new(tokens),
        db: db::Db::new(database),
        session_max_age_secs: console.session_max_age_secs,
    });
    Ok(Some(routes::router(state)))
}
