//! The W3C trace context an event carries (`metadata.traceparent`, set by the raising code or
//! `domain_events.traceparent`, and `metadata.tracestate`), passed on by the publishing sinks as
//! `traceparent` / `tracestate` headers (HTTP, NATS, Kafka), so that a consumer's spans join the
//! trace of the code that raised the event. With telemetry on, the headers name the handler
//! call's span instead (same trace): the consumer's span is then a child of that call.

use crate::event::Event;

/// The header (and metadata key) of the trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The header (and metadata key) of vendor trace state.
pub const TRACESTATE: &str = "tracestate";

/// The trace context to pass on with `event`: the current handler call's span when telemetry
/// is on; otherwise the event's `traceparent` and `tracestate` that are strings of visible ASCII
/// (the extension checks `traceparent`; anything else could not be a header value); absent
/// ones give none.
pub fn headers(event: &Event) -> Vec<(&'static str, String)> {
    if let Some(call) = crate::ops::traces::current_headers() {
        return call
            .into_iter()
            .filter_map(|(key, value)| match key.as_str() {
                TRACEPARENT => Some((TRACEPARENT, value)),
                TRACESTATE => Some((TRACESTATE, value)),
                _ => None,
            })
            .collect();
    }
    #[derive(serde::Deserialize)]
    struct Context {
        #[serde(default)]
        traceparent: Option<serde_json::Value>,
        #[serde(default)]
        tracestate: Option<serde_json::Value>,
    }
    let Ok(context) = serde_json::from_str::<Context>(event.metadata.get()) else {
        return Vec::new();
    };
    [
        (TRACEPARENT, context.traceparent),
        (TRACESTATE, context.tracestate),
    ]
    .into_iter()
    .filter_map(|(key, value)| match value? {
        serde_json::Value::String(s)
            if !s.is_empty() && s.bytes().all(|b| (0x20..0x7f).contains(&b)) =>
        {
            Some((key, s))
        }
        _ => None,
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_with(metadata: &str) -> Event {
        crate::event::sample(serde_json::json!({
            "metadata": serde_json::from_str::<serde_json::Value>(metadata).unwrap(),
        }))
    }

    #[test]
    fn passes_on_string_trace_context_only() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let event = event_with(&format!(
            r#"{{"traceparent": "{tp}", "tracestate": "a=b"}}"#
        ));
        assert_eq!(
            headers(&event),
            vec![
                (TRACEPARENT, tp.to_string()),
                (TRACESTATE, "a=b".to_string())
            ]
        );
        assert!(headers(&event_with(r#"{"traceparent": 7}"#)).is_empty());
        assert!(headers(&event_with(r#"{"traceparent": "a\nb"}"#)).is_empty());
        assert!(headers(&event_with("{}")).is_empty());
    }

    #[test]
    fn a_traced_call_passes_on_its_own_span() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId};
        let event = event_with(
            r#"{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "tracestate": "a=b"}"#,
        );
        let call = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            false,
            "a=b".parse().unwrap(),
        );
        let _current = opentelemetry::Context::new()
            .with_remote_span_context(call)
            .attach();
        assert_eq!(
            headers(&event),
            vec![
                (
                    TRACEPARENT,
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01".to_string()
                ),
                (TRACESTATE, "a=b".to_string())
            ]
        );
    }
}
