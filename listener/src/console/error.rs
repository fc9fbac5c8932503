//! The API's errors and how they answer: a status and a JSON body
//! `{"error": <code>, "message": <text>, "parameter": <name, for 400>}`.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::warn;

use super::role::Role;

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A query or path parameter is missing, unknown or malformed (400).
    #[error("invalid parameter {parameter}: {message}")]
    BadParameter {
        /// The parameter, as the request spells it.
        parameter: String,
        /// What is wrong with it.
        message: String,
    },
    /// No token, or one no role has (401).
    #[error("a valid token is required (Authorization: Bearer <token>)")]
    Unauthorized,
    /// The token's role is below what the route needs (403).
    #[error("this needs the {} role", needed.name())]
    Forbidden {
        /// The lowest role allowed.
        needed: Role,
    },
    /// A POST that may come from another site (403).
    #[error("cross-site request refused: {0}")]
    CrossSite(&'static str),
    /// The subscription, aggregate or dead letter does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The database could not answer (503).
    #[error("the database is unavailable")]
    Database(#[source] crate::Error),
}

impl ApiError {
    /// A 400 naming `parameter`.
    pub fn bad(parameter: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::BadParameter {
            parameter: parameter.into(),
            message: message.into(),
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadParameter { .. } => (StatusCode::BAD_REQUEST, "bad_parameter"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::CrossSite(_) => (StatusCode::FORBIDDEN, "cross_site"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Database(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
}

impl From<crate::Error> for ApiError {
    fn from(err: crate::Error) -> ApiError {
        ApiError::Database(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Database(err) = &self {
            warn!(error = %err, "console query failed");
        }
        let mut body = json!({"error": code, "message": self.to_string()});
        if let ApiError::BadParameter { parameter, .. } = &self {
            body["parameter"] = json!(parameter);
        }
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("header value"),
            );
        }
        response
    }
}
