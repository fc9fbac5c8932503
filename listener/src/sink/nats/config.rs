//! `kind = "nats"`: servers, subject template, stream, credentials' variables, timeout.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::options::{
    NatsCredentials, NatsOptions, DEFAULT_SERVER, DEFAULT_STREAM, DEFAULT_SUBJECT, DEFAULT_TIMEOUT,
};
use super::sink::NatsSink;
use super::subject::{check_stream_name, SubjectTemplate};
use crate::delivery::dispatch::Handler;
use crate::sink::config::{any_secret, secret, timeout};
use crate::sink::config::{SinkConfig, SinkConfigError, SinkContext, SinkKind};

/// A JetStream publish per event ([`NatsSink`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Connect, API and publish-ack timeout in milliseconds, default 10 000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Server URLs, default `["nats://127.0.0.1:4222"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers: Option<Vec<String>>,
    /// Subject template, default `events.{aggregate_type}.{event_type}` (placeholders
    /// `{aggregate_type}`, `{event_type}`, `{aggregate_id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// JetStream stream capturing the subjects, default `DOMAIN_EVENTS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Create the stream when missing (default `true`), capturing the template's fixed prefix
    /// (`events.>` for the default template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_stream: Option<bool>,
    /// Duplicate window of a stream the listener creates, in seconds (default: the server's,
    /// 2 minutes). A replay later than this after its first publish is stored twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_window_secs: Option<u64>,
    /// Name of the environment variable holding the user name (with `password_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_env: Option<String>,
    /// Name of the environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Name of the environment variable holding an authentication token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl NatsConfig {
    /// The sink's options, secrets read through `env`; `max_attempts` is the handler's.
    pub fn options(
        &self,
        max_attempts: u32,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<NatsOptions, SinkConfigError> {
        let invalid = |e: &dyn std::fmt::Display| SinkConfigError(e.to_string());
        let timeout = timeout(self.timeout_ms, DEFAULT_TIMEOUT)?;
        let subject = SubjectTemplate::parse(self.subject.as_deref().unwrap_or(DEFAULT_SUBJECT))
            .map_err(|e| invalid(&e))?;
        let stream = self.stream.clone().unwrap_or_else(|| DEFAULT_STREAM.into());
        check_stream_name(&stream).map_err(|e| invalid(&e))?;
        let create_stream = self.create_stream.unwrap_or(true);
        if create_stream && subject.stream_subject().is_none() {
            return Err(SinkConfigError::new(
                "create_stream needs a subject template that starts with a fixed token \
                 (e.g. \"events.{aggregate_type}\"); or create the stream yourself and set \
                 create_stream = false",
            ));
        }
        if self.duplicate_window_secs.is_some() && !create_stream {
            return Err(SinkConfigError::new(
                "duplicate_window_secs applies to a stream the listener creates (create_stream = true)",
            ));
        }
        if self.duplicate_window_secs == Some(0) {
            return Err(SinkConfigError::new(
                "duplicate_window_secs must be positive",
            ));
        }
        let servers = self
            .servers
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_SERVER.into()]);
        if servers.is_empty() {
            return Err(SinkConfigError::new("servers is empty"));
        }
        if let Some((server, e)) = servers.iter().find_map(|s| {
            s.parse::<async_nats::ServerAddr>()
                .err()
                .map(|e| (s.clone(), e))
        }) {
            return Err(SinkConfigError(format!("server {server:?}: {e}")));
        }
        let read = |var: &Option<String>| var.as_deref().map(|name| secret(env, name)).transpose();
        let credentials = match (
            read(&self.user_env)?,
            read(&self.password_env)?,
            read(&self.token_env)?,
        ) {
            (None, None, None) => None,
            (Some(user), Some(password), None) => {
                Some(NatsCredentials::UserPassword(user, password))
            }
            (None, None, Some(token)) => Some(NatsCredentials::Token(token)),
            _ => {
                return Err(SinkConfigError::new(
                    "set user_env with password_env, or token_env alone",
                ))
            }
        };
        Ok(NatsOptions {
            servers,
            subject,
            stream,
            create_stream,
            duplicate_window: self.duplicate_window_secs.map(Duration::from_secs),
            timeout,
            credentials,
            max_attempts,
        })
    }
}

impl SinkConfig for NatsConfig {
    fn validate(&self) -> Result<(), SinkConfigError> {
        self.options(1, &any_secret).map(|_| ())
    }

    fn build(&self, context: &SinkContext<'_>) -> Result<Arc<dyn Handler>, SinkConfigError> {
        let options = self.options(context.max_attempts, context.env)?;
        Ok(Arc::new(NatsSink::new(options)))
    }

    fn secret_vars(&self) -> Vec<&str> {
        [&self.user_env, &self.password_env, &self.token_env]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }
}

impl SinkKind for NatsConfig {
    const KIND: &'static str = "nats";
    const KEYS: &'static [&'static str] = &[
        "servers",
        "subject",
        "stream",
        "create_stream",
        "duplicate_window_secs",
        "timeout_ms",
        "user_env",
        "password_env",
        "token_env",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_handler, load_sink};

    fn nats(text: &str) -> NatsConfig {
        load_sink(text)
    }

    #[test]
    fn defaults_and_credentials_from_the_environment() {
        let bus = nats("user_env = \"NU\"\npassword_env = \"NP\"\n");
        let env = |name: &str| match name {
            "NU" => Some("u".to_string()),
            "NP" => Some("p".to_string()),
            _ => None,
        };
        let options = bus.options(3, &env).unwrap();
        assert_eq!(options.stream, "DOMAIN_EVENTS");
        assert!(options.create_stream);
        assert_eq!(options.servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(options.timeout, Duration::from_secs(10));
        assert_eq!(options.max_attempts, 3);
        assert!(matches!(
            options.credentials,
            Some(NatsCredentials::UserPassword(ref u, ref p)) if u == "u" && p == "p"
        ));
        let only_user = |name: &str| (name == "NU").then(|| "u".to_string());
        let err = bus.options(3, &only_user).unwrap_err().to_string();
        assert!(err.contains("NP is not set"), "{err}");
    }

    #[test]
    fn bad_keys_are_refused() {
        for (text, expected) in [
            ("user_env = \"NU\"\n", "password_env"),
            (
                "subject = \"events.{tenant}\"\n",
                "unknown placeholder {tenant}",
            ),
            ("subject = \"{aggregate_type}.x\"\n", "create_stream"),
            ("stream = \"a.b\"\n", "stream \"a.b\""),
            ("servers = []\n", "servers is empty"),
            (
                "create_stream = false\nduplicate_window_secs = 60\n",
                "create_stream = true",
            ),
            (
                "servers = [\"http://x:4222\"]\n",
                "server \"http://x:4222\"",
            ),
            ("url = \"http://x\"\n", "url is for kind = \"webhook\" only"),
        ] {
            let err = load_handler(&format!("kind = \"nats\"\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
        // A template starting with a placeholder is fine for a stream made by hand.
        nats("subject = \"{aggregate_type}.x\"\ncreate_stream = false\n");
    }
}
