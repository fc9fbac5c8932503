//! `[admin]`: the HTTP server for health and metrics.

use serde::{Deserialize, Serialize};

/// `[admin]`: the HTTP server for `/health` and `/metrics`. Off unless `listen` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port` to serve on, e.g. `127.0.0.1:9187`; unset or empty: no admin server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Name of the environment variable holding a bearer token; when set, both endpoints
    /// require `Authorization: Bearer <token>`. The token itself never comes from the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl AdminConfig {
    /// The address to serve on, if the server is enabled.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.listen
            .as_deref()
            .filter(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().parse().ok())
    }
}
