//! The sink: a signed HTTP POST per event.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use sha2::Sha256;

use crate::delivery::dispatch::{Handler, HandlerError};
use crate::event::Event;

/// Header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-signature";
/// Header carrying the event id (the receiver's deduplication key).
pub const EVENT_ID_HEADER: &str = "x-event-id";
/// Header carrying the event type.
pub const EVENT_TYPE_HEADER: &str = "x-event-type";
/// Header carrying the aggregate type.
pub const AGGREGATE_TYPE_HEADER: &str = "x-aggregate-type";

/// Per-request timeout when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// POSTs each event, as the same JSON object the `stdout` handler writes, to a URL.
///
/// - The request is sent and its response awaited inside [`Handler::handle`]: one request at a
///   time per worker, so a receiver sees each aggregate's events in order (and, with one
///   worker, the whole stream in commit order).
/// - `2xx` is success. `408`, `429`, `5xx`, timeouts and connection failures are transient
///   (retried with the handler's backoff); any other status, redirects included (they are not
///   followed: a POST must not silently become a GET elsewhere), is definite.
/// - With a secret, `X-Signature: sha256=<hex>` carries the HMAC-SHA256 of the exact body bytes.
/// - Delivery is at least once: receivers deduplicate on `X-Event-Id`.
///
/// One `reqwest::Client` (one connection pool) serves every request of the handler.
pub struct WebhookSink {
    url: reqwest::Url,
    client: reqwest::Client,
    /// The HMAC key; `None` sends no signature.
    secret: Option<Vec<u8>>,
}

/// Why a webhook handler cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// The URL does not parse or is not `http(s)`.
    #[error("invalid url {url:?}: {reason}")]
    Url {
        /// The configured value.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The HTTP client could not be initialised (e.g. the TLS backend).
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// Parses and checks a webhook URL (`http` or `https`, with a host).
pub fn parse_url(url: &str) -> Result<reqwest::Url, WebhookError> {
    let bad = |reason: String| WebhookError::Url {
        url: url.to_string(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {:?}: use http or https",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host".into()));
    }
    Ok(parsed)
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`, as sent in [`SIGNATURE_HEADER`].
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length: new_from_slice cannot fail for it.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl WebhookSink {
    /// A sink posting to `url`, each request bounded by `timeout`, signed with `secret` if any.
    pub fn new(
        url: &str,
        timeout: Duration,
        secret: Option<Vec<u8>>,
    ) -> Result<WebhookSink, WebhookError> {
        let url = parse_url(url)?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "pg_domain_events-listener/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(WebhookError::Client)?;
        Ok(WebhookSink {
            url,
            client,
            secret,
        })
    }

    fn headers(&self, event: &Event, body: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let mut put = |name: &'static str, value: &str| {
            // Validated names are header-safe; a value that is not is left out, not fatal.
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        put(EVENT_ID_HEADER, &event.id.to_string());
        put(EVENT_TYPE_HEADER, &event.event_type);
        put(AGGREGATE_TYPE_HEADER, &event.aggregate_type);
        for (name, value) in crate::sink::trace_context::headers(event) {
            put(name, &value);
        }
        if let Some(secret) = &self.secret {
            put(SIGNATURE_HEADER, &signature(secret, body));
        }
        headers
    }
}

/// Whether a non-success status is worth retrying.
fn is_transient_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

#[async_trait::async_trait]
impl Handler for WebhookSink {
    /// `host:port`: the path may hold ids, the host does not.
    fn target(&self) -> Option<String> {
        let host = self.url.host_str()?;
        Some(match self.url.port_or_known_default() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        })
    }

    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let body = serde_json::to_vec(event).map_err(|e| {
            HandlerError::definite("cannot serialize the event as JSON").with_source(e)
        })?;
        let headers = self.headers(event, &body);
        let response = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                // Timeouts, refused or reset connections, DNS: the receiver may come back. A
                // request that cannot even be built will not get better.
                let message = if e.is_timeout() {
                    "the webhook request timed out"
                } else if e.is_connect() {
                    "cannot connect to the webhook"
                } else {
                    "the webhook request failed"
                };
                if e.is_builder() {
                    HandlerError::definite(message).with_source(e.without_url())
                } else if e.is_timeout() {
                    HandlerError::timeout(message).with_source(e.without_url())
                } else {
                    HandlerError::transient(message).with_source(e.without_url())
                }
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let message = format!("the webhook answered {status}");
        Err(if is_transient_status(status) {
            HandlerError::transient(message)
        } else {
            HandlerError::definite(message)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_the_rfc4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn urls_must_be_http_with_a_host() {
        assert!(parse_url("https://hooks.example.com/events").is_ok());
        assert!(parse_url("http://127.0.0.1:8080").is_ok());
        assert!(parse_url("ftp://example.com").is_err());
        assert!(parse_url("example.com/hook").is_err());
        assert!(parse_url("").is_err());
    }

    #[test]
    fn statuses_are_classified() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient_status(StatusCode::from_u16(code).unwrap()));
        }
        for code in [301, 400, 401, 403, 404, 410, 413, 422] {
            assert!(!is_transient_status(StatusCode::from_u16(code).unwrap()));
        }
    }
}
