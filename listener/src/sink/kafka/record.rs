//! The record produced for an event: key, value, headers and timestamp.

use std::collections::BTreeMap;

use rskafka::record::Record;

use crate::delivery::dispatch::HandlerError;
use crate::event::Event;

/// The record the handler produces for `event`: key, value, headers and timestamp.
pub fn record(event: &Event) -> Result<Record, HandlerError> {
    let value = serde_json::to_vec(event)
        .map_err(|e| HandlerError::definite("cannot serialize the event as JSON").with_source(e))?;
    let mut headers = BTreeMap::from([
        ("event_id".to_string(), event.id.to_string().into_bytes()),
        (
            "event_type".to_string(),
            event.event_type.clone().into_bytes(),
        ),
        (
            "event_version".to_string(),
            event.event_version.to_string().into_bytes(),
        ),
        (
            "aggregate_type".to_string(),
            event.aggregate_type.clone().into_bytes(),
        ),
        (
            "aggregate_version".to_string(),
            event.aggregate_version.to_string().into_bytes(),
        ),
        ("content-type".to_string(), b"application/json".to_vec()),
    ]);
    for (key, value) in trace_ids(event)
        .into_iter()
        .chain(crate::sink::trace_context::headers(event))
    {
        headers.insert(key.to_string(), value.into_bytes());
    }
    Ok(Record {
        key: Some(event.aggregate_id.clone().into_bytes()),
        value: Some(value),
        headers,
        // Whole milliseconds: Kafka's precision. The client encodes each record as a truncated
        // millisecond delta from the batch's first record, which is off by one for
        // sub-millisecond times that are not in order within the batch.
        timestamp: chrono::DateTime::from_timestamp_millis(event.recorded_at.timestamp_millis())
            .unwrap_or(event.recorded_at),
    })
}

/// The `correlation_id` and `causation_id` of the event's metadata that can be header text:
/// strings as they are, numbers as written; absent, null, objects and arrays give none. The
/// metadata is parsed once for both.
fn trace_ids(event: &Event) -> Vec<(&'static str, String)> {
    #[derive(serde::Deserialize)]
    struct Ids<'a> {
        #[serde(borrow, default)]
        correlation_id: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        causation_id: Option<&'a serde_json::value::RawValue>,
    }
    let Ok(ids) = serde_json::from_str::<Ids<'_>>(event.metadata.get()) else {
        return Vec::new();
    };
    [
        ("correlation_id", ids.correlation_id),
        ("causation_id", ids.causation_id),
    ]
    .into_iter()
    .filter_map(
        |(key, raw)| match serde_json::from_str::<serde_json::Value>(raw?.get()).ok()? {
            serde_json::Value::String(s) => Some((key, s)),
            serde_json::Value::Number(n) => Some((key, n.to_string())),
            _ => None,
        },
    )
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::kafka::topic::tests::event;

    #[test]
    fn records_carry_key_headers_and_the_event() {
        let e = event(
            "Loan",
            "Loan.Funded",
            r#"{"correlation_id": "c-1", "causation_id": 17, "actor": "u"}"#,
        );
        let r = record(&e).unwrap();
        assert_eq!(r.key.as_deref(), Some(&b"42"[..]));
        let header = |k: &str| String::from_utf8(r.headers[k].clone()).unwrap();
        assert_eq!(header("event_id"), e.id.to_string());
        assert_eq!(header("event_type"), "Loan.Funded");
        assert_eq!(header("event_version"), "2");
        assert_eq!(header("aggregate_type"), "Loan");
        assert_eq!(header("aggregate_version"), "3");
        assert_eq!(header("correlation_id"), "c-1");
        assert_eq!(header("causation_id"), "17");
        assert_eq!(r.timestamp.to_rfc3339(), "2026-11-23T16:37:01.123+00:00");
        let value: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        assert_eq!(value["id"], e.id.to_string());

        let bare = record(&event("Loan", "Loan.Funded", r#"{"correlation_id": null}"#)).unwrap();
        assert!(!bare.headers.contains_key("correlation_id"));
        assert!(!bare.headers.contains_key("causation_id"));
    }
}
