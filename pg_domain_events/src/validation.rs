//! The rules of the event model: names, aggregate ids, payload and metadata shapes.
//!
//! Pure functions over Rust values, so they are unit-tested without a backend and shared by
//! every entry point (`raise_event`, `raise_events`, `import_events`, table capture).

use serde_json::Value;

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

/// What the payload and metadata rules need to know of one JSON value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Shape<'a> {
    /// A string, with its text.
    String(&'a str),
    /// A number.
    Number,
    /// Anything else, by its kind ([`json_kind`]'s words).
    Other(&'static str),
}

/// Checks a payload given its kind and the length of its JSON text: an object within the
/// size limit.
pub fn check_payload(
    field: &str,
    kind: &str,
    text_bytes: impl FnOnce() -> usize,
    max_bytes: usize,
) -> Result<(), EventError> {
    if kind != "an object" {
        return Err(EventError::invalid(
            field,
            format!("must be a JSON object, got {kind}"),
            "Wrap the value in an object, e.g. {\"value\": ...}.",
        ));
    }
    let bytes = text_bytes();
    if bytes > max_bytes {
        return Err(EventError::invalid(
            field,
            format!("is {bytes} bytes, above domain_events.max_payload_bytes ({max_bytes})"),
            "Store large documents elsewhere and put a reference in the event.",
        ));
    }
    Ok(())
}

/// Checks metadata (of kind `kind`, whose values `lookup` reads) and returns the session
/// defaults (`domain_events.actor`, …) to add for the keys it does not carry.
pub fn check_metadata<'d, 's>(
    field: &str,
    kind: &str,
    lookup: impl Fn(&str) -> Option<Shape<'s>>,
    session_defaults: &'d [(&'d str, Option<String>)],
) -> Result<Vec<(&'d str, &'d String)>, EventError> {
    if kind != "an object" {
        return Err(EventError::invalid(
            field,
            format!("must be a JSON object, got {kind}"),
            "Pass metadata as an object such as {\"actor\": \"user-1\"}.",
        ));
    }
    for key in DOCUMENTED_METADATA_KEYS {
        match lookup(key) {
            None | Some(Shape::String(_) | Shape::Number) => {}
            Some(Shape::Other(kind)) => {
                return Err(EventError::invalid(
                    format!("{field}.{key}"),
                    format!("must be a string or a number, got {kind}"),
                    "actor, correlation_id, causation_id, tenant_id and source are strings or numbers.",
                ));
            }
        }
    }
    match lookup(TRACEPARENT) {
        Some(Shape::String(value)) => check_traceparent(&format!("{field}.{TRACEPARENT}"), value)?,
        Some(other) => {
            let kind = match other {
                Shape::Number => "a number",
                Shape::Other(kind) => kind,
                Shape::String(_) => unreachable!("matched above"),
            };
            return Err(EventError::invalid(
                format!("{field}.{TRACEPARENT}"),
                format!("must be a string, got {kind}"),
                TRACEPARENT_HINT,
            ));
        }
        None => {
            if let Some((_, Some(value))) = session_defaults.iter().find(|(k, _)| *k == TRACEPARENT)
            {
                check_traceparent("domain_events.traceparent", value)?;
            }
        }
    }
    Ok(session_defaults
        .iter()
        .filter_map(|(key, value)| value.as_ref().map(|v| (*key, v)))
        .filter(|(key, _)| lookup(key).is_none())
        .collect())
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
        assert!(check_payload("payload", "an object", || 100, 100).is_ok());
        for kind in ["an array", "a string", "a number", "null", "a boolean"] {
            let err = check_payload("payload", kind, || 1, 100).unwrap_err();
            assert!(err.to_string().contains(kind), "{err}");
        }
        let err = check_payload("payload", "an object", || 101, 100).unwrap_err();
        assert!(err.to_string().contains("is 101 bytes"), "{err}");
    }

    fn shape_of(value: &Value) -> Shape<'_> {
        match value {
            Value::String(s) => Shape::String(s),
            Value::Number(_) => Shape::Number,
            other => Shape::Other(json_kind(other)),
        }
    }

    #[test]
    fn metadata_defaults_fill_only_absent_keys() {
        let defaults = [
            ("actor", Some("session-user".to_string())),
            ("correlation_id", None),
        ];
        let check = |metadata: &Value| {
            check_metadata(
                "metadata",
                json_kind(metadata),
                |key| metadata.get(key).map(shape_of),
                &defaults,
            )
            .map(|missing| {
                missing
                    .into_iter()
                    .map(|(k, v)| (k, v.clone()))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            check(&json!({})).unwrap(),
            vec![("actor", "session-user".to_string())]
        );
        assert!(check(&json!({"actor": "given"})).unwrap().is_empty());
        assert!(check(&json!({"actor": 7})).unwrap().is_empty());
        assert!(check(&json!({"actor": {"x": 1}})).is_err());
        assert!(check(&json!({"traceparent": 1})).is_err());
        assert!(check(&json!({"traceparent": "00-x"})).is_err());
        assert!(check(&json!([])).is_err());
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
