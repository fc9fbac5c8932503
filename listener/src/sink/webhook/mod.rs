//! The `webhook` handler: one signed HTTP POST per event.

mod config;
mod sink;

pub use config::WebhookConfig;
pub use sink::{
    parse_url, signature, WebhookError, WebhookSink, AGGREGATE_TYPE_HEADER, DEFAULT_TIMEOUT,
    EVENT_ID_HEADER, EVENT_TYPE_HEADER, SIGNATURE_HEADER,
};
