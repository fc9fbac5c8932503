//! Async registry handlers: the listener runs each enabled one after commit, calling
//! `domain_events.run_async_handler(name, event)` in the transaction that also moves the
//! handler's position (exactly once). The call runs the registered function the way a sync
//! handler runs: with the rights of the role that registered it, this function's pinned
//! `search_path`, the triggering event as the cause of events it raises, its executions
//! counted in shared memory and its successes logged per its `log_level`.
//!
//! The listener needs only `EXECUTE` on this function (granted to `domain_events_listener`):
//! no right on the handler's function or on what it touches.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use serde_json::Value;

use crate::errors::{EventError, OrReport};
use crate::handler_registry::{self, HandlerError};
use crate::jsonb::Jsonb;
use crate::sync_handlers::{self, StoredEvent};

/// Runs the async handler `handler` with `event` (the listener's event JSON). Disabled
/// handlers run too: the listener pauses them at a batch boundary, and an event it was already
/// handling when the handler was disabled completes.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn run_async_handler(handler: Option<&str>, event: Option<pgrx::JsonB>) {
    let name = handler
        .ok_or_else(|| EventError::null("handler"))
        .or_report();
    let event = event.ok_or_else(|| EventError::null("event")).or_report().0;
    let handlers = handler_registry::async_handlers();
    let Some(handler) = handlers.iter().find(|h| h.name == name) else {
        HandlerError::NoAsyncHandler {
            name: name.to_string(),
        }
        .report()
    };
    let stored = stored_event(&event).or_report();
    let text = serde_json::to_string(&event).expect("a JSON value serialises");
    sync_handlers::call(handler, &stored, Jsonb::parse(&text).datum());
}

/// The fields of the listener's event JSON a call needs (for the context line of an error,
/// the log and the cause of cascaded events).
fn stored_event(event: &Value) -> Result<StoredEvent, EventError> {
    let text = |key: &str| -> Result<String, EventError> {
        match event.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => Err(EventError::invalid(
                "event",
                format!("has no {key:?}"),
                "Pass the event as the listener sends it (the keys of docs/handlers.md).",
            )),
        }
    };
    let number = |key: &str| -> Result<i64, EventError> {
        text(key)?.parse().map_err(|_| {
            EventError::invalid(
                "event",
                format!("{key:?} is not an integer"),
                "Pass the event as the listener sends it (the keys of docs/handlers.md).",
            )
        })
    };
    let id = text("id")?;
    let id = uuid::Uuid::parse_str(&id).map_err(|_| {
        EventError::invalid(
            "event",
            "\"id\" is not a UUID",
            "Pass the event as the listener sends it (the keys of docs/handlers.md).",
        )
    })?;
    // SAFETY: reads the clock.
    let now = TimestampWithTimeZone::try_from(unsafe { pg_sys::GetCurrentTimestamp() })
        .expect("a finite clock");
    Ok(StoredEvent {
        id: pgrx::Uuid::from_bytes(*id.as_bytes()),
        position: number("position")?,
        aggregate_type: text("aggregate_type")?,
        aggregate_id: text("aggregate_id")?,
        aggregate_version: number("aggregate_version")?,
        event_type: text("event_type")?,
        event_version: number("event_version")? as i32,
        payload: Jsonb::parse(
            &event
                .get("payload")
                .map_or_else(|| "{}".to_string(), Value::to_string),
        ),
        metadata: Jsonb::parse(
            &event
                .get("metadata")
                .map_or_else(|| "{}".to_string(), Value::to_string),
        ),
        occurred_at: None,
        recorded_at: now,
    })
}
