//! The rules of the event model: names, aggregate ids, payload and metadata shapes.
//!
//! Pure functions over Rust values, so they are unit-tested without a backend and shared by
//! every entry point (`raise_event`, `raise_events`, `import_events`, table capture).

use serde_json::{Map, Value};

use crate::errors::EventError;

/// Longest aggregate or event type name.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest aggregate id.
pub const MAX_AGGREGATE_ID_CHARS: usize = 200;
/// Metadata keys with a documented meaning; their values must be strings or numbers.
pub const DOCUMENTED_METADATA_KEYS: [&str; 5] = [
    "actor",
    "correlation_id",
    "causation_id",
    "tenant_id",
    "source",
];

/// The metadata key (and `domain_events.traceparent` setting) carrying the W3C trace context
/// of the code that raised the event.
pub const TRACEPARENT: &str = "traceparent";
const TRACEPARENT_HINT: &str = "A W3C traceparent is version-traceid-parentid-flags in lowercase hex, e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01, as OpenTelemetry's propagators write it.";

/// Checks a W3C `traceparent` (Trace Context level 1): `00-<32 hex>-<16 hex>-<2 hex>`, lowercase,
/// trace and parent ids not all zeros; a later version may append `-…` fields, `ff` is invalid.
pub fn check_traceparent(field: &str, value: &str) -> Result<(), EventError> {
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let parts: Vec<&str> = value.splitn(5, '-').collect();
    let reason = match parts.as_slice() {
        [version, trace, parent, flags, rest @ ..] => {
            if !hex(version, 2) || *version == "ff" {
                Some("has an invalid version")
            } else if *version == "00" && !rest.is_empty() {
                Some("has fields after the flags, which version 00 does not allow")
            } else if !hex(trace, 32) || trace.bytes().all(|b| b == b'0') {
                Some("has an invalid trace id (32 lowercase hex digits, not all zero)")
            } else if !hex(parent, 16) || parent.bytes().all(|b| b == b'0') {
                Some("has an invalid parent id (16 lowercase hex digits, not all zero)")
            } else if !hex(flags, 2) {
                Some("has invalid flags (2 lowercase hex digits)")
            } else {
                None
            }
        }
        _ => Some("is not version-traceid-parentid-flags"),
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(EventError::invalid(field, reason, TRACEPARENT_HINT)),
    }
}

const NAME_HINT: &str = "Names are dot-separated segments of ASCII letters, digits, '_' or '-', each starting with a letter, at most 100 characters: e.g. Loan, Loan.StatusChanged, ticket.created.";

/// Checks an aggregate type or event type name.
///
/// ASCII only on purpose: consumers route on these names (topics, subjects, filters), and a
/// Cyrillic `о` in `Lоan` must not create a second, invisible stream.
pub fn check_name(field: &str, name: &str) -> Result<(), EventError> {
    let reason = if name.is_empty() {
        Some("must not be empty".to_string())
    } else if name.chars().count() > MAX_NAME_CHARS {
        Some(format!("is longer than {MAX_NAME_CHARS} characters"))
    } else if let Some(bad) = name.chars().find(|c| !c.is_ascii()) {
        Some(format!(
            "contains the non-ASCII character {bad:?} (U+{:04X})",
            bad as u32
        ))
    } else {
        name.split('.')
            .find_map(|segment| match segment.chars().next() {
                None => Some("has an empty segment (leading, trailing or double dot)".to_string()),
                Some(first) if !first.is_ascii_alphabetic() => {
                    Some(format!("segment {segment:?} does not start with a letter"))
                }
                Some(_) => segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
                    .map(|c| format!("contains the character {c:?}")),
            })
    };
    match reason {
        Some(reason) => Err(EventError::invalid(
            field,
            format!("{name:?} {reason}"),
            NAME_HINT,
        )),
        None => Ok(()),
    }
}

/// Checks an aggregate id: 1–200 characters, not blank, no control characters.
pub fn check_aggregate_id(field: &str, id: &str) -> Result<(), EventError> {
    const HINT: &str =
        "Aggregate ids are 1 to 200 printable characters: a uuid, a number or a slug.";
    let reason = if id.trim().is_empty() {
        Some("must not be empty or blank".to_string())
    } else if id.chars().count() > MAX_AGGREGATE_ID_CHARS {
        Some(format!(
            "is longer than {MAX_AGGREGATE_ID_CHARS} characters"
        ))
    } else {
        id.chars()
            .find(|c| c.is_control())
            .map(|c| format!("contains the control character U+{:04X}", c as u32))
    };
    match reason {
        Some(reason) => Err(EventError::invalid(field, reason, HINT)),
        None => Ok(()),
    }
}

/// The JSON type name used in messages.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks that a payload is a JSON object and serialises it, enforcing the size limit.
pub fn payload_text(field: &str, payload: &Value, max_bytes: usize) -> Result<String, EventError> {
    if !payload.is_object() {
        return Err(EventError::invalid(
            field,
            format!("must be a JSON object, got {}", json_kind(payload)),
            "Wrap the value in an object, e.g. {\"value\": ...}.",
        ));
    }
    let text = payload.to_string();
    if text.len() > max_bytes {
        return Err(EventError::invalid(
            field,
            format!(
                "is {} bytes, above domain_events.max_payload_bytes ({max_bytes})",
                text.len()
            ),
            "Store large documents elsewhere and put a reference in the event.",
        ));
    }
    Ok(text)
}

/// Checks metadata, merges the session defaults (`domain_events.actor`, …) for absent keys and
/// serialises it.
pub fn metadata_text(
    field: &str,
    metadata: &Value,
    session_defaults: &[(&str, Option<String>)],
) -> Result<String, EventError> {
    let Value::Object(map) = metadata else {
        return Err(EventError::invalid(
            field,
            format!("must be a JSON object, got {}", json_kind(metadata)),
            "Pass metadata as an object such as {\"actor\": \"user-1\"}.",
        ));
    };
    for key in DOCUMENTED_METADATA_KEYS {
        if let Some(value) = map.get(key) {
            if !(value.is_string() || value.is_number()) {
                return Err(EventError::invalid(
                    format!("{field}.{key}"),
                    format!("must be a string or a number, got {}", json_kind(value)),
                    "actor, correlation_id, causation_id, tenant_id and source are strings or numbers.",
                ));
            }
        }
    }
    match map.get(TRACEPARENT) {
        Some(Value::String(value)) => check_traceparent(&format!("{field}.{TRACEPARENT}"), value)?,
        Some(other) => {
            return Err(EventError::invalid(
                format!("{field}.{TRACEPARENT}"),
                format!("must be a string, got {}", json_kind(other)),
                TRACEPARENT_HINT,
            ))
        }
        None => {
            if let Some((_, Some(value))) = session_defaults.iter().find(|(k, _)| *k == TRACEPARENT)
            {
                check_traceparent("domain_events.traceparent", value)?;
            }
        }
    }
    let missing: Vec<(&str, &String)> = session_defaults
        .iter()
        .filter_map(|(key, value)| value.as_ref().map(|v| (*key, v)))
        .filter(|(key, _)| !map.contains_key(*key))
        .collect();
    if missing.is_empty() {
        return Ok(metadata.to_string());
    }
    let mut merged: Map<String, Value> = map.clone();
    for (key, value) in missing {
        merged.insert(key.to_string(), Value::String(value.clone()));
    }
    Ok(Value::Object(merged).to_string())
}

/// Checks an `expected_version` (the version before the event; 0 = new aggregate).
pub fn check_expected_version(field: &str, expected: i64) -> Result<(), EventError> {
    if expected < 0 {
        return Err(EventError::invalid(
            field,
            format!("{expected} is negative"),
            "expected_version is the aggregate's version before this event: 0 for a new aggregate.",
        ));
    }
    Ok(())
}

/// Checks an `event_version` (payload schema version, from 1).
pub fn check_event_version(field: &str, version: i64) -> Result<i32, EventError> {
    i32::try_from(version)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| {
            EventError::invalid(
                field,
                format!("{version} is not a schema version (1 or more)"),
                "event_version numbers the payload's schema, starting at 1.",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_follow_w3c_trace_context() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(check_traceparent("t", ok).is_ok());
        // A later version may append fields.
        assert!(check_traceparent("t", &format!("01{}-extra", &ok[2..])).is_ok());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert!(check_traceparent("t", bad).is_err(), "{bad:?}");
        }
    }
    use serde_json::json;

    #[test]
    fn names_follow_the_documented_rule() {
        for ok in [
            "Loan",
            "UserCreated",
            "Loan.StatusChanged",
            "ticket.created",
            "work-order.v2",
            "a",
        ] {
            assert_eq!(check_name("event_type", ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".x",
            "x.",
            "a..b",
            "1abc",
            "Loan Status",
            "Loan;DROP",
            "L\u{043e}an",
            "a/b",
            "_x",
        ] {
            assert!(check_name("event_type", bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_name("event_type", &"a".repeat(101)).is_err());
        assert!(check_name("event_type", &"a".repeat(100)).is_ok());
    }

    #[test]
    fn aggregate_ids_are_printable_and_bounded() {
        assert!(check_aggregate_id("aggregate_id", "42").is_ok());
        assert!(check_aggregate_id("aggregate_id", "ünïcode-ok").is_ok());
        assert!(check_aggregate_id("aggregate_id", "").is_err());
        assert!(check_aggregate_id("aggregate_id", "   ").is_err());
        assert!(check_aggregate_id("aggregate_id", "a\nb").is_err());
        assert!(check_aggregate_id("aggregate_id", &"x".repeat(201)).is_err());
    }

    #[test]
    fn payloads_must_be_objects_within_the_limit() {
        assert_eq!(
            payload_text("payload", &json!({"a": 1}), 100).unwrap(),
            r#"{"a":1}"#
        );
        for bad in [json!([1]), json!("s"), json!(1), json!(null), json!(true)] {
            assert!(payload_text("payload", &bad, 100).is_err());
        }
        assert!(payload_text("payload", &json!({"a": "x".repeat(100)}), 100).is_err());
    }

    #[test]
    fn metadata_defaults_fill_only_absent_keys() {
        let defaults = [
            ("actor", Some("session-user".to_string())),
            ("correlation_id", None),
        ];
        let text = metadata_text("metadata", &json!({}), &defaults).unwrap();
        assert_eq!(text, r#"{"actor":"session-user"}"#);
        let text = metadata_text("metadata", &json!({"actor": "given"}), &defaults).unwrap();
        assert_eq!(text, r#"{"actor":"given"}"#);
        assert!(metadata_text("metadata", &json!({"actor": {"x": 1}}), &defaults).is_err());
        assert!(metadata_text("metadata", &json!([]), &defaults).is_err());
    }

    #[test]
    fn versions_are_checked() {
        assert!(check_expected_version("expected_version", 0).is_ok());
        assert!(check_expected_version("expected_version", -1).is_err());
        assert_eq!(check_event_version("event_version", 1), Ok(1));
        assert!(check_event_version("event_version", 0).is_err());
        assert!(check_event_version("event_version", i64::from(i32::MAX) + 1).is_err());
    }
}
