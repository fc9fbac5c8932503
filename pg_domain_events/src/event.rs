//! A new event as the caller describes it, before it is stored, and the batch it belongs to.

use std::collections::BTreeMap;
use std::ffi::CString;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use serde_json::{Map, Value};

use crate::contract::Contracts;
use crate::errors::EventError;
use crate::gucs;
use crate::jsonb::{self, Jsonb, Node};
use crate::store::BatchColumns;
use crate::sync_handlers;
use crate::validation::{self, Shape};

/// One event to append, validated.
#[derive(Clone)]
pub struct NewEvent {
    /// Aggregate type name.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Event type name.
    pub event_type: String,
    /// Payload (an object).
    pub payload: Jsonb,
    /// Metadata (an object, session defaults merged).
    pub metadata: Jsonb,
    /// Version the aggregate must be at before this event.
    pub expected_version: Option<i64>,
    /// Business time; `None` = `now()`.
    pub occurred_at: Option<TimestampWithTimeZone>,
    /// Payload schema version.
    pub event_version: i32,
    /// Server time; only imports set it.
    pub recorded_at: Option<TimestampWithTimeZone>,
}

/// Raw arguments of `raise_event`, each still nullable.
pub struct Arguments<'a> {
    pub aggregate_type: Option<&'a str>,
    pub aggregate_id: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub payload: Option<Jsonb>,
    pub metadata: Option<Jsonb>,
    pub expected_version: Option<i64>,
    pub occurred_at: Option<TimestampWithTimeZone>,
    pub event_version: Option<i32>,
}

/// Metadata an event gets unless it carries the key itself: inside a sync handler the
/// triggering event's ids, otherwise the session's settings.
fn session_metadata() -> [(&'static str, Option<String>); 4] {
    let (causation, correlation) = match sync_handlers::cascade_metadata() {
        Some((causation, correlation)) => (Some(causation), Some(correlation)),
        None => (
            gucs::text(&gucs::CAUSATION_ID),
            gucs::text(&gucs::CORRELATION_ID),
        ),
    };
    [
        ("actor", gucs::text(&gucs::ACTOR)),
        ("correlation_id", correlation),
        ("causation_id", causation),
        (validation::TRACEPARENT, gucs::text(&gucs::TRACEPARENT)),
    ]
}

fn max_payload_bytes() -> usize {
    usize::try_from(gucs::MAX_PAYLOAD_BYTES.get()).unwrap_or(usize::MAX)
}

fn check_occurred_at(field: &str, ts: TimestampWithTimeZone) -> Result<(), EventError> {
    if ts.is_finite() {
        Ok(())
    } else {
        Err(EventError::invalid(
            field,
            "must be a finite timestamp",
            "Pass the time the business fact happened, or omit it for now().",
        ))
    }
}

impl NewEvent {
    /// Validates the arguments of `raise_event`. `expected_version` and NULL-able defaults:
    /// every argument is required to be non-NULL except `expected_version`.
    pub fn from_arguments(args: Arguments<'_>) -> Result<NewEvent, EventError> {
        let aggregate_type = args
            .aggregate_type
            .ok_or_else(|| EventError::null("aggregate_type"))?;
        let aggregate_id = args
            .aggregate_id
            .ok_or_else(|| EventError::null("aggregate_id"))?;
        let event_type = args
            .event_type
            .ok_or_else(|| EventError::null("event_type"))?;
        let payload = args.payload.ok_or_else(|| EventError::null("payload"))?;
        let metadata = args.metadata.ok_or_else(|| EventError::null("metadata"))?;
        let occurred_at = args
            .occurred_at
            .ok_or_else(|| EventError::null("occurred_at"))?;
        let event_version = args
            .event_version
            .ok_or_else(|| EventError::null("event_version"))?;
        validation::check_name("aggregate_type", aggregate_type)?;
        validation::check_aggregate_id("aggregate_id", aggregate_id)?;
        validation::check_name("event_type", event_type)?;
        if let Some(expected) = args.expected_version {
            validation::check_expected_version("expected_version", expected)?;
        }
        check_occurred_at("occurred_at", occurred_at)?;
        check_depth("payload", &payload)?;
        check_depth("metadata", &metadata)?;
        let payload_node = payload.root();
        check_payload("payload", payload_node, max_payload_bytes())?;
        let metadata = with_session_metadata("metadata", metadata, &session_metadata())?;
        let event_version = validation::check_event_version("event_version", event_version.into())?;
        check_contract(
            &Contracts::current(),
            "payload",
            event_type,
            event_version,
            payload_node,
        )?;
        Ok(NewEvent {
            aggregate_type: aggregate_type.to_string(),
            aggregate_id: aggregate_id.to_string(),
            event_type: event_type.to_string(),
            payload,
            metadata,
            expected_version: args.expected_version,
            occurred_at: Some(occurred_at),
            event_version,
            recorded_at: None,
        })
    }

    /// Validates the JSON array given to `raise_events` (or `import_events`, which also
    /// accepts `recorded_at`; or table capture), payloads against their registered schemas.
    pub fn from_batch(events: Jsonb, allow_recorded_at: bool) -> Result<Vec<NewEvent>, EventError> {
        check_depth("events", &events)?;
        let Node::Array(items) = events.root() else {
            return Err(EventError::invalid(
                "events",
                format!("must be a JSON array of event objects, got {}", events.root().kind()),
                "Pass e.g. '[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"42\", \"event_type\": \"Loan.Funded\"}]'.",
            ));
        };
        let max_bytes = max_payload_bytes();
        let session = session_metadata();
        let contracts = Contracts::current();
        // What an absent payload or metadata stands for (each event's own copy is not needed:
        // nothing writes to it).
        let empty = Jsonb::parse("{}");
        (0..items.len())
            .map(|n| {
                Self::from_item(
                    n,
                    items.element(n),
                    Context {
                        allow_recorded_at,
                        max_bytes,
                        session: &session,
                        contracts: &contracts,
                        empty,
                    },
                )
            })
            .collect()
    }

    fn from_item(n: usize, item: Node, context: Context<'_>) -> Result<NewEvent, EventError> {
        let Context {
            allow_recorded_at,
            max_bytes,
            session,
            contracts,
            empty,
        } = context;
        let field = |key: &str| format!("events[{n}].{key}");
        let Node::Object(map) = item else {
            return Err(EventError::invalid(
                format!("events[{n}]"),
                format!("must be an object, got {}", item.kind()),
                "Each element describes one event: aggregate_type, aggregate_id, event_type, payload, ...",
            ));
        };
        const KEYS: [&str; 9] = [
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "metadata",
            "expected_version",
            "occurred_at",
            "event_version",
            "recorded_at",
        ];
        let known = KEYS
            .iter()
            .filter(|k| allow_recorded_at || **k != "recorded_at")
            .filter(|k| map.get(k).is_some())
            .count();
        if known != map.len() {
            // The error path names the key; only it lists them.
            let key = map
                .keys()
                .into_iter()
                .find(|k| !KEYS.contains(&k.as_str()) || (!allow_recorded_at && k == "recorded_at"))
                .unwrap_or_default();
            return Err(EventError::invalid(
                format!("events[{n}]"),
                format!("has the unknown key {key:?}"),
                "Known keys: aggregate_type, aggregate_id, event_type, payload, metadata, expected_version, occurred_at, event_version.",
            ));
        }
        let required_text = |key: &str| -> Result<String, EventError> {
            match map.get(key) {
                None => Err(EventError::invalid(
                    field(key),
                    "is missing",
                    "Each event needs aggregate_type, aggregate_id and event_type.",
                )),
                Some(Node::Null) => Err(EventError::null(field(key))),
                Some(node @ Node::String(..)) => Ok(node.as_str().unwrap_or_default().to_string()),
                Some(other) => Err(EventError::invalid(
                    field(key),
                    format!("must be a string, got {}", other.kind()),
                    "Names and ids are strings.",
                )),
            }
        };
        let aggregate_type = required_text("aggregate_type")?;
        validation::check_name(&field("aggregate_type"), &aggregate_type)?;
        let event_type = required_text("event_type")?;
        validation::check_name(&field("event_type"), &event_type)?;
        let aggregate_id = match map.get("aggregate_id").and_then(Node::as_integer_text) {
            Some(number) => number,
            None => required_text("aggregate_id")?,
        };
        validation::check_aggregate_id(&field("aggregate_id"), &aggregate_id)?;
        let optional = |key: &str| map.get(key).filter(|v| !matches!(v, Node::Null));
        let payload = match optional("payload") {
            Some(node) => {
                check_payload(&field("payload"), node, max_bytes)?;
                let Node::Object(payload) = node else {
                    unreachable!("checked to be an object")
                };
                payload.to_jsonb()
            }
            None => empty,
        };
        let metadata = match optional("metadata") {
            Some(Node::Object(c)) => c.to_jsonb(),
            // The metadata rule refuses what is not an object.
            Some(other) => {
                validation::check_metadata(&field("metadata"), other.kind(), |_| None, &[])?;
                unreachable!("only objects pass the metadata rule")
            }
            None => empty,
        };
        let metadata = with_session_metadata(&field("metadata"), metadata, session)?;
        let integer = |key: &str| -> Result<Option<i64>, EventError> {
            match optional(key) {
                None => Ok(None),
                Some(node) => match node.as_i64() {
                    Some(value) => Ok(Some(value)),
                    None => Err(EventError::invalid(
                        field(key),
                        format!("must be an integer, got {}", node.text()),
                        "Versions are whole numbers.",
                    )),
                },
            }
        };
        let expected_version = integer("expected_version")?;
        if let Some(expected) = expected_version {
            validation::check_expected_version(&field("expected_version"), expected)?;
        }
        let event_version = match integer("event_version")? {
            Some(v) => validation::check_event_version(&field("event_version"), v)?,
            None => 1,
        };
        let occurred_at = optional("occurred_at")
            .map(|v| timestamp(&field("occurred_at"), v))
            .transpose()?;
        let recorded_at = optional("recorded_at")
            .map(|v| timestamp(&field("recorded_at"), v))
            .transpose()?;
        check_contract(
            contracts,
            &field("payload"),
            &event_type,
            event_version,
            payload.root(),
        )?;
        Ok(NewEvent {
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            metadata,
            expected_version,
            occurred_at,
            event_version,
            recorded_at,
        })
    }
}

/// What every item of one batch is checked with.
#[derive(Clone, Copy)]
struct Context<'a> {
    allow_recorded_at: bool,
    max_bytes: usize,
    session: &'a [(&'a str, Option<String>)],
    contracts: &'a Contracts,
    empty: Jsonb,
}

/// How deep a `jsonb` argument may nest (the JSON parser's limit when arguments were parsed
/// as text, kept as the documented rule).
const MAX_DEPTH: usize = 128;

/// Refuses an argument nested deeper than [`MAX_DEPTH`].
fn check_depth(field: &str, document: &Jsonb) -> Result<(), EventError> {
    if document.nests_deeper_than(MAX_DEPTH) {
        return Err(EventError::invalid(
            field,
            format!("is nested too deeply; documents may nest at most {MAX_DEPTH} levels deep"),
            "Flatten the document, or store it elsewhere and put a reference in the event.",
        ));
    }
    Ok(())
}

/// Checks a payload: an object whose JSON text (as Postgres prints it) fits the size limit.
fn check_payload(field: &str, payload: Node, max_bytes: usize) -> Result<(), EventError> {
    validation::check_payload(field, payload.kind(), || payload.text().len(), max_bytes)
}

/// Checks a payload against its registered schema, if the registry has one to check.
fn check_contract(
    contracts: &Contracts,
    field: &str,
    event_type: &str,
    event_version: i32,
    payload: Node,
) -> Result<(), EventError> {
    contracts.check(field, event_type, event_version, || payload.to_value(field))
}

/// Checks metadata and adds the session defaults for the keys it does not carry.
fn with_session_metadata(
    field: &str,
    metadata: Jsonb,
    session: &[(&str, Option<String>)],
) -> Result<Jsonb, EventError> {
    let root = metadata.root();
    let lookup = |key: &str| {
        let Node::Object(map) = root else {
            return None;
        };
        map.get(key).map(|node| match node {
            Node::String(..) => Shape::String(node.as_str().unwrap_or_default()),
            Node::Number(_) => Shape::Number,
            other => Shape::Other(other.kind()),
        })
    };
    let missing = validation::check_metadata(field, root.kind(), lookup, session)?;
    if missing.is_empty() {
        return Ok(metadata);
    }
    let defaults: Map<String, Value> = missing
        .into_iter()
        .map(|(key, value)| (key.to_string(), Value::String(value.clone())))
        .collect();
    // The event's own keys win: they are the right operand.
    Ok(jsonb::concat(
        Jsonb::parse(&Value::Object(defaults).to_string()),
        metadata,
    ))
}

/// Parses an RFC 3339 / ISO 8601 timestamp string with Postgres' own `timestamptz` input.
fn timestamp(field: &str, value: Node) -> Result<TimestampWithTimeZone, EventError> {
    let hint = "Use an RFC 3339 timestamp such as \"2026-11-23T10:15:00Z\".";
    let Some(text) = value.as_str() else {
        return Err(EventError::invalid(
            field,
            format!("must be a timestamp string, got {}", value.kind()),
            hint,
        ));
    };
    let is_keyword = matches!(
        text.trim().to_ascii_lowercase().as_str(),
        "infinity"
            | "+infinity"
            | "-infinity"
            | "now"
            | "today"
            | "tomorrow"
            | "yesterday"
            | "epoch"
            | "allballs"
    );
    let cstr = CString::new(text)
        .map_err(|_| EventError::invalid(field, "contains a NUL character", hint))?;
    if is_keyword || !text.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        return Err(EventError::invalid(
            field,
            format!("{text:?} is not a timestamp"),
            hint,
        ));
    }
    // Malformed dates raise Postgres' own 22007/22008 here, naming the bad text.
    // SAFETY: timestamptz_in takes (cstring, oid, typmod).
    let parsed = unsafe {
        pgrx::direct_function_call::<TimestampWithTimeZone>(
            pg_sys::timestamptz_in,
            &[
                cstr.as_c_str().into_datum(),
                pg_sys::InvalidOid.into_datum(),
                (-1i32).into_datum(),
            ],
        )
    };
    match parsed {
        Some(ts) if ts.is_finite() => Ok(ts),
        _ => Err(EventError::invalid(
            field,
            format!("{text:?} is not a timestamp"),
            hint,
        )),
    }
}

/// A new event id: UUIDv7, time-ordered, monotonic within this backend.
pub fn new_id() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*uuid::Uuid::now_v7().as_bytes())
}

/// Builds the statement's columns for `events` with their new `ids`: versions per aggregate
/// are assigned in batch order.
pub fn columns(events: Vec<NewEvent>, ids: &[pgrx::Uuid]) -> BatchColumns {
    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut batch = BatchColumns::default();
    for event in &events {
        let count = counts
            .entry((event.aggregate_type.clone(), event.aggregate_id.clone()))
            .or_default();
        *count += 1;
        batch.ordinals.push(*count);
    }
    for ((aggregate_type, aggregate_id), count) in &counts {
        batch.head_types.push(aggregate_type.clone());
        batch.head_ids.push(aggregate_id.clone());
        batch.head_counts.push(*count);
    }
    batch.ids = ids.to_vec();
    for event in events {
        batch
            .counts
            .push(counts[&(event.aggregate_type.clone(), event.aggregate_id.clone())]);
        batch.aggregate_types.push(event.aggregate_type);
        batch.aggregate_ids.push(event.aggregate_id);
        batch.event_types.push(event.event_type);
        batch.event_versions.push(event.event_version);
        batch.payloads.push(event.payload);
        batch.metadata.push(event.metadata);
        batch.occurred_at.push(event.occurred_at);
        batch.recorded_at.push(event.recorded_at);
    }
    batch
}
