//! `kind = "webhook"`: where to POST, the signing key's variable, the timeout.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sink::{parse_url, WebhookSink, DEFAULT_TIMEOUT};
use crate::delivery::dispatch::Handler;
use crate::sink::config::timeout;
use crate::sink::config::{SinkConfig, SinkConfigError, SinkContext, SinkKind};

/// A signed HTTP POST per event ([`WebhookSink`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The `http(s)` URL each event is POSTed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Name of the environment variable holding the HMAC-SHA256 key of the `X-Signature`
    /// header (no secret, no header). Secrets never come from the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// Per-request timeout in milliseconds, default 10 000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl WebhookConfig {
    /// A webhook posting to `url`, unsigned, with the default timeout.
    pub fn new(url: impl Into<String>) -> WebhookConfig {
        WebhookConfig {
            url: Some(url.into()),
            ..WebhookConfig::default()
        }
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Result<Duration, SinkConfigError> {
        timeout(self.timeout_ms, DEFAULT_TIMEOUT)
    }

    /// The HMAC key, read through `env`; `None` without `secret_env`.
    pub fn secret(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Vec<u8>>, SinkConfigError> {
        self.secret_env
            .as_deref()
            .map(|name| match env(name) {
                Some(secret) if !secret.is_empty() => Ok(secret.into_bytes()),
                _ => Err(SinkConfigError(format!(
                    "environment variable {name} (secret_env) is not set or empty"
                ))),
            })
            .transpose()
    }

    fn url(&self) -> Result<&str, SinkConfigError> {
        let url = self.url.as_deref().ok_or_else(|| {
            SinkConfigError::new("kind = \"webhook\" needs url = \"https://...\"")
        })?;
        parse_url(url).map_err(|e| SinkConfigError(e.to_string()))?;
        Ok(url)
    }
}

impl SinkConfig for WebhookConfig {
    fn validate(&self) -> Result<(), SinkConfigError> {
        self.timeout()?;
        self.url()?;
        Ok(())
    }

    fn build(&self, context: &SinkContext<'_>) -> Result<Arc<dyn Handler>, SinkConfigError> {
        let secret = self.secret(context.env)?;
        let sink = WebhookSink::new(self.url()?, self.timeout()?, secret)
            .map_err(|e| SinkConfigError(crate::error::report(&e)))?;
        Ok(Arc::new(sink))
    }

    fn secret_vars(&self) -> Vec<&str> {
        self.secret_env.as_deref().into_iter().collect()
    }
}

impl SinkKind for WebhookConfig {
    const KIND: &'static str = "webhook";
    const KEYS: &'static [&'static str] = &["url", "secret_env", "timeout_ms"];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_handler, load_sink};

    #[test]
    fn loading_does_not_read_the_secret_building_does() {
        let hook: WebhookConfig = load_sink(
            "url = \"https://h.example/e\"\nsecret_env = \"HOOK_SECRET\"\ntimeout_ms = 500\n",
        );
        assert_eq!(hook.timeout().unwrap(), Duration::from_millis(500));
        let env = |name: &str| (name == "HOOK_SECRET").then(|| "s3cret".to_string());
        assert_eq!(hook.secret(&env).unwrap(), Some(b"s3cret".to_vec()));
        for value in [None, Some("")] {
            let env = |_: &str| value.map(str::to_string);
            let err = hook.secret(&env).unwrap_err().to_string();
            assert!(err.contains("HOOK_SECRET"), "{err}");
        }
    }

    #[test]
    fn bad_keys_are_refused() {
        for (text, expected) in [
            ("", "needs url"),
            ("url = \"ftp://x\"\n", "scheme"),
            (
                "url = \"http://x\"\nsubject = \"a\"\n",
                "subject is for kind = \"nats\" only",
            ),
            ("url = \"http://x\"\ntimeout_ms = 0\n", "positive"),
        ] {
            let err = load_handler(&format!("kind = \"webhook\"\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
