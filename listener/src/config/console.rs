//! `[console]`: the operator console on the admin HTTP server.

use serde::{Deserialize, Serialize};

/// `[console]`: a read-only event and outbox browser with a JSON API (`/api/...`) and a page
/// (`/`), served by the admin HTTP server (`admin.listen`). Off unless `enabled`.
///
/// Tokens come from environment variables named here, never from the file; a role whose
/// variable is not configured has no token. The console connects to the database as `user`,
/// a role granted `domain_events_console` (read-only, plus redrive of one dead letter).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the console (needs `admin.listen`).
    pub enabled: bool,
    /// Database role of the console's connections; `[database]` gives the rest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Name of the environment variable holding that role's password, if it needs one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Variable holding the `viewer` token: counts, lag, types; no payloads or metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viewer_token_env: Option<String>,
    /// Variable holding the `developer` token: also payloads, metadata, outbox, dead letters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub developer_token_env: Option<String>,
    /// Variable holding the `operator` token: also redrive of dead letters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator_token_env: Option<String>,
    /// Seconds a sign-in on the page lasts: the session cookie's `Max-Age`, also checked by
    /// the console (a browser that restores an old cookie is signed out). Bearer tokens of the
    /// API are not affected.
    pub session_max_age_secs: u64,
}

/// The default lifetime of a sign-in on the page: a working day.
pub const DEFAULT_SESSION_MAX_AGE_SECS: u64 = 8 * 60 * 60;
/// The longest lifetime allowed: a stolen cookie should not outlive a week.
pub const MAX_SESSION_MAX_AGE_SECS: u64 = 7 * 24 * 60 * 60;

impl Default for ConsoleConfig {
    fn default() -> ConsoleConfig {
        ConsoleConfig {
            enabled: false,
            user: None,
            password_env: None,
            viewer_token_env: None,
            developer_token_env: None,
            operator_token_env: None,
            session_max_age_secs: DEFAULT_SESSION_MAX_AGE_SECS,
        }
    }
}

impl ConsoleConfig {
    /// Whether no key is set (the file has no `[console]` table, or an empty one).
    pub fn is_unset(&self) -> bool {
        self == &ConsoleConfig::default()
    }

    /// The token variables by role name, for checks and messages.
    pub fn token_envs(&self) -> [(&'static str, Option<&str>); 3] {
        [
            ("viewer_token_env", self.viewer_token_env.as_deref()),
            ("developer_token_env", self.developer_token_env.as_deref()),
            ("operator_token_env", self.operator_token_env.as_deref()),
        ]
    }
}

impl ConsoleConfig {
    /// Checks the keys (no environment read): an enabled console needs the admin server, a
    /// database role, and at least one token variable.
    pub fn validate(&self, admin_listens: bool) -> Result<(), crate::error::ConfigError> {
        let invalid = |key: &str, message: String| {
            Err(crate::error::ConfigError::invalid(
                Some(format!("console.{key}")),
                message,
            ))
        };
        let names = self
            .token_envs()
            .into_iter()
            .chain([("password_env", self.password_env.as_deref())]);
        for (key, name) in names {
            if let Some(name) = name {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return invalid(
                        key,
                        format!("{name:?}: name an environment variable (letters, digits, _)"),
                    );
                }
            }
        }
        if !(60..=MAX_SESSION_MAX_AGE_SECS).contains(&self.session_max_age_secs) {
            return invalid(
                "session_max_age_secs",
                format!(
                    "{}: a sign-in lasts between 60 seconds and {MAX_SESSION_MAX_AGE_SECS} (7 days)",
                    self.session_max_age_secs
                ),
            );
        }
        if !self.enabled {
            return Ok(());
        }
        if !admin_listens {
            return invalid(
                "enabled",
                "the console is served by the admin HTTP server: set admin.listen".into(),
            );
        }
        if self.user.as_deref().is_none_or(str::is_empty) {
            return invalid(
                "user",
                "name the console's database role (granted domain_events_console)".into(),
            );
        }
        if self.token_envs().iter().all(|(_, name)| name.is_none()) {
            return invalid(
                "enabled",
                "set at least one of viewer_token_env, developer_token_env, operator_token_env"
                    .into(),
            );
        }
        Ok(())
    }
}
