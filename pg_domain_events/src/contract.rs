//! Event contracts: a JSON Schema per event type and version, registered in
//! `domain_events.event_schema` and enforced inside the raising transaction.
//!
//! Each backend keeps the registry's rows, and the validators compiled from them, in memory:
//! checking a payload reads no table. The copy is read again whenever the registry changes
//! (see `registry_cache`): a schema committed by another backend is enforced by the next
//! statement here, at every isolation level.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use jsonschema::{Draft, Validator};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use serde_json::{Map, Value};

use crate::compatibility::{self, pointer_segment, Change};
use crate::errors::{EventError, OrReport, SchemaFailure};
use crate::gucs::{self, SchemaValidation};
use crate::json_arg::JsonbText;
use crate::registry_cache::{self, Registry};
use crate::store;
use crate::validation;

/// Failures listed in a violation's message; the detail says how many more there are.
const LISTED_FAILURES: usize = 5;

const SCHEMA_HINT: &str = "Register a self-contained JSON Schema (2020-12, or draft-07 with \"$schema\": \"http://json-schema.org/draft-07/schema#\") whose root describes a JSON object; shared parts go under $defs.";

/// The schema drafts a registered schema may declare in `$schema`; none means 2020-12.
fn draft_of(schema: &Map<String, Value>) -> Result<Draft, String> {
    let Some(declared) = schema.get("$schema") else {
        return Ok(Draft::Draft202012);
    };
    let Value::String(uri) = declared else {
        return Err(format!(
            "$schema must be a string, got {}",
            validation::json_kind(declared)
        ));
    };
    let bare = uri.trim_end_matches('#');
    let bare = bare
        .strip_prefix("https://")
        .or_else(|| bare.strip_prefix("http://"))
        .unwrap_or(bare);
    match bare {
        "json-schema.org/draft/2020-12/schema" => Ok(Draft::Draft202012),
        "json-schema.org/draft-07/schema" => Ok(Draft::Draft7),
        _ => Err(format!(
            "declares the unknown draft {uri:?} in $schema; supported are 2020-12 (https://json-schema.org/draft/2020-12/schema) and draft-07 (http://json-schema.org/draft-07/schema#)"
        )),
    }
}

/// Refuses every reference outside the schema document: a backend must not reach out to the
/// network or the file system, and a contract must not change when a remote document does.
struct NoExternalReferences;

impl jsonschema::Retrieve for NoExternalReferences {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!(
            "the external $ref {} is refused: registered schemas are self-contained",
            uri.as_str()
        )
        .into())
    }
}

/// Compiles a schema as registered: its draft, formats asserted, no external references.
/// The error says what is wrong, in terms of the schema (never of a payload).
pub fn compile(schema: &Value) -> Result<Validator, String> {
    let Value::Object(map) = schema else {
        return Err(format!(
            "must be a JSON object, got {}",
            validation::json_kind(schema)
        ));
    };
    let draft = draft_of(map)?;
    let validator = jsonschema::options()
        .with_draft(draft)
        .should_validate_formats(true)
        .with_retriever(NoExternalReferences)
        .build(schema)
        .map_err(|err| {
            let at = err.instance_path().as_str();
            let at = if at.is_empty() { "its root" } else { at };
            match err.kind() {
                jsonschema::error::ValidationErrorKind::Referencing(inner) => {
                    format!("cannot be compiled: {inner}")
                }
                _ => format!("is not a valid JSON Schema at {at}: {err}"),
            }
        })?;
    // After the draft's own rules, so that a misspelt type is reported as such.
    if let Some(kind) = map.get("type") {
        let types: Vec<&Value> = match kind {
            Value::Array(types) => types.iter().collect(),
            single => vec![single],
        };
        if !types.iter().any(|t| t.as_str() == Some("object")) {
            return Err(
                "describes no JSON object at its root (\"type\" does not include \"object\"); payloads are objects"
                    .to_string(),
            );
        }
    }
    Ok(validator)
}

/// Where `payload` breaks `validator`: the first [`LISTED_FAILURES`] failures and how many
/// there are. Locations and keywords only: a value of the payload never leaves this function.
fn failures(validator: &Validator, payload: &Value) -> (Vec<SchemaFailure>, usize) {
    use jsonschema::error::ValidationErrorKind as Kind;
    let mut listed = Vec::new();
    let mut total = 0;
    for error in validator.iter_errors(payload) {
        let base = error.instance_path().as_str();
        let keyword = error.kind().keyword().to_string();
        let schema_path = error.schema_path().as_str().to_string();
        // Point at the missing or unexpected property itself: its name comes from the schema
        // (required) or is a key of the payload (a location, not a value).
        let pointers: Vec<String> = match error.kind() {
            Kind::Required { property } => vec![format!(
                "{base}/{}",
                pointer_segment(property.as_str().unwrap_or_default())
            )],
            Kind::AdditionalProperties { unexpected }
            | Kind::UnevaluatedProperties { unexpected } => unexpected
                .iter()
                .map(|name| format!("{base}/{}", pointer_segment(name)))
                .collect(),
            _ => vec![base.to_string()],
        };
        for pointer in pointers {
            total += 1;
            if listed.len() < LISTED_FAILURES {
                listed.push(SchemaFailure {
                    pointer,
                    keyword: keyword.clone(),
                    schema_path: schema_path.clone(),
                });
            }
        }
    }
    (listed, total)
}

/// One registered schema, compiled on first use.
struct Entry {
    schema: Value,
    compiled: Option<Rc<Validator>>,
}

/// This backend's copy of the registry: event type → version → schema.
type Schemas = HashMap<String, HashMap<i32, Entry>>;

thread_local! {
    static SCHEMAS: RefCell<Option<Schemas>> = const { RefCell::new(None) };
}

/// Reads every registered schema (see [`registry_cache::read_latest`]).
fn load() -> Schemas {
    let mut schemas: Schemas = HashMap::new();
    registry_cache::read_latest(store::LOAD_SCHEMAS, |columns| {
        let column = |n: usize| columns[n].clone().expect("registry columns are NOT NULL");
        let version: i32 = column(1).parse().expect("event_version is an integer");
        let schema: Value = serde_json::from_str(&column(2)).expect("jsonb prints valid JSON");
        schemas.entry(column(0)).or_default().insert(
            version,
            Entry {
                schema,
                compiled: None,
            },
        );
    });
    schemas
}

/// Brings this backend's copy of the registry up to date (cheap when nothing changed).
fn refresh() {
    if let Some(table) = registry_cache::reload_needed(Registry::Schemas) {
        let schemas = if table == pg_sys::InvalidOid {
            HashMap::new()
        } else {
            load()
        };
        SCHEMAS.with(|s| *s.borrow_mut() = Some(schemas));
    }
}

/// The registry as one raising call sees it; take it once per call, check each event.
pub struct Contracts {
    mode: SchemaValidation,
}

impl Contracts {
    /// The registry per `domain_events.schema_validation`, brought up to date unless `off`.
    pub fn current() -> Contracts {
        let mode = gucs::SCHEMA_VALIDATION.get();
        if mode != SchemaValidation::Off {
            refresh();
        }
        Contracts { mode }
    }

    /// Checks one payload against the schema of its event type and version. `field` names
    /// the payload in an error (`payload`, `events[3].payload`); `payload` reads it, only when
    /// a schema is there to check it.
    pub fn check(
        &self,
        field: &str,
        event_type: &str,
        event_version: i32,
        payload: impl FnOnce() -> Result<Value, EventError>,
    ) -> Result<(), EventError> {
        if self.mode == SchemaValidation::Off {
            return Ok(());
        }
        let validator = SCHEMAS.with(|s| {
            let mut schemas = s.borrow_mut();
            let entry = schemas
                .as_mut()?
                .get_mut(event_type)?
                .get_mut(&event_version)?;
            Some(match &entry.compiled {
                Some(validator) => Ok(validator.clone()),
                None => compile(&entry.schema).map(|validator| {
                    let validator = Rc::new(validator);
                    entry.compiled = Some(validator.clone());
                    validator
                }),
            })
        });
        match validator {
            None if self.mode == SchemaValidation::Strict => Err(EventError::SchemaRequired {
                field: field.to_string(),
                event_type: event_type.to_string(),
                event_version,
            }),
            None => Ok(()),
            Some(Err(reason)) => Err(EventError::invalid(
                format!("registered schema of {event_type} version {event_version}"),
                reason,
                "The registry was changed by hand; drop and register the schema again.",
            )),
            Some(Ok(validator)) => {
                let payload = payload()?;
                if validator.is_valid(&payload) {
                    return Ok(());
                }
                let (failures, total) = failures(&validator, &payload);
                Err(EventError::SchemaViolation {
                    field: field.to_string(),
                    event_type: event_type.to_string(),
                    event_version,
                    failures,
                    total,
                })
            }
        }
    }
}

/// Refuses a schema argument that [`compile`] refuses, as `22023` naming what is wrong.
fn compile_or_report(field: &str, schema: &Value) {
    if let Err(reason) = compile(schema) {
        EventError::invalid(field, reason, SCHEMA_HINT).report();
    }
}

/// Registers the JSON Schema of an event type and version; `true` when this call registered
/// it, `false` when the identical schema was registered already (migrations may run twice).
/// See docs/schemas.md.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn register_schema(
    event_type: Option<&str>,
    event_version: Option<i32>,
    schema: Option<JsonbText>,
) -> bool {
    let event_type = event_type
        .ok_or_else(|| EventError::null("event_type"))
        .or_report();
    let event_version = event_version
        .ok_or_else(|| EventError::null("event_version"))
        .or_report();
    let schema = schema
        .ok_or_else(|| EventError::null("schema"))
        .and_then(|j| j.parse("schema"))
        .or_report();
    validation::check_name("event_type", event_type).or_report();
    validation::check_event_version("event_version", event_version.into()).or_report();
    compile_or_report("schema", &schema);
    let args = || {
        [
            event_type.into(),
            event_version.into(),
            schema.to_string().into(),
        ]
    };
    if store::query_bool(store::REGISTER_SCHEMA, &args()) {
        return true;
    }
    if store::query_bool(store::SAME_SCHEMA, &args()) {
        return false;
    }
    EventError::SchemaExists {
        event_type: event_type.to_string(),
        event_version,
    }
    .report()
}

/// Drops the schema of an event type and version, only while no stored event uses it.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn drop_schema(event_type: Option<&str>, event_version: Option<i32>) {
    let event_type = event_type
        .ok_or_else(|| EventError::null("event_type"))
        .or_report();
    let event_version = event_version
        .ok_or_else(|| EventError::null("event_version"))
        .or_report();
    // Waits for transactions raising events right now: one of them may be storing an event
    // of this version, which the check below must see.
    store::run(store::LOCK_EVENTS_AGAINST_RAISING);
    let args = || [event_type.into(), event_version.into()];
    if !store::query_bool(store::SCHEMA_REGISTERED, &args()) {
        EventError::SchemaNotFound {
            event_type: event_type.to_string(),
            event_version: Some(event_version),
        }
        .report();
    }
    if store::query_bool(store::SCHEMA_IN_USE, &args()) {
        EventError::SchemaInUse {
            event_type: event_type.to_string(),
            event_version,
        }
        .report();
    }
    store::run_with(store::DROP_SCHEMA, &args());
}

/// What a new schema for an event type would break for consumers of its latest registered
/// version; no rows when nothing. Advisory: nothing is registered.
#[pg_extern(stable, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn check_schema_compatibility(
    event_type: Option<&str>,
    new_schema: Option<JsonbText>,
) -> TableIterator<
    'static,
    (
        name!(location, String),
        name!(change, String),
        name!(detail, String),
    ),
> {
    let event_type = event_type
        .ok_or_else(|| EventError::null("event_type"))
        .or_report();
    let new_schema = new_schema
        .ok_or_else(|| EventError::null("new_schema"))
        .and_then(|j| j.parse("new_schema"))
        .or_report();
    compile_or_report("new_schema", &new_schema);
    let latest: Option<String> =
        store::query_column::<String>(store::LATEST_SCHEMA, &[event_type.into()])
            .into_iter()
            .next();
    let Some(latest) = latest else {
        EventError::SchemaNotFound {
            event_type: event_type.to_string(),
            event_version: None,
        }
        .report()
    };
    let old: Value = serde_json::from_str(&latest).expect("jsonb prints valid JSON");
    TableIterator::new(
        compatibility::breaking_changes(&old, &new_schema)
            .into_iter()
            .map(
                |Change {
                     location,
                     change,
                     detail,
                 }| (location, change.to_string(), detail),
            ),
    )
}

/// Trigger on `domain_events.event_schema`: refuses UPDATE (a registered version is
/// immutable) and, after every other change, invalidates the backends' copies of the registry.
#[pg_trigger]
fn event_schema_changed<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgHeapTupleError> {
    if matches!(trigger.op(), Ok(PgTriggerOperation::Update)) {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "domain_events.event_schema: a registered schema version is immutable",
            "pg_domain_events",
        )
        .set_detail("Consumers rely on a registered version not changing. Nothing was changed.")
        .set_hint("Register the changed schema as the next event_version.")
        .report(PgLogLevel::ERROR);
    }
    // SAFETY: the relation of a firing trigger is open; the invalidation is transactional.
    unsafe {
        let relation = trigger.trigger_data().tg_relation;
        pg_sys::CacheInvalidateRelcacheByRelid((*relation).rd_id);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn violations(schema: Value, payload: Value) -> Vec<(String, String)> {
        let validator = compile(&schema).expect("schema compiles");
        failures(&validator, &payload)
            .0
            .into_iter()
            .map(|f| (f.pointer, f.keyword))
            .collect()
    }

    #[test]
    fn drafts_are_recognised_and_unknown_ones_refused() {
        for ok in [
            json!({}),
            json!({"$schema": "https://json-schema.org/draft/2020-12/schema"}),
            json!({"$schema": "http://json-schema.org/draft-07/schema#"}),
            json!({"$schema": "https://json-schema.org/draft-07/schema"}),
        ] {
            assert!(compile(&ok).is_ok(), "{ok}");
        }
        let err = compile(&json!({"$schema": "http://json-schema.org/draft-04/schema#"}))
            .err()
            .unwrap();
        assert!(err.contains("unknown draft"), "{err}");
    }

    #[test]
    fn malformed_schemas_say_what_is_wrong() {
        let err = compile(&json!({"type": "object", "properties": {"a": {"type": "strin"}}}))
            .err()
            .unwrap();
        assert!(err.contains("/properties/a/type"), "{err}");
        let err = compile(&json!({"type": "array"})).err().unwrap();
        assert!(err.contains("no JSON object"), "{err}");
        let err = compile(&json!([1])).err().unwrap();
        assert!(err.contains("must be a JSON object"), "{err}");
        let err = compile(&json!({"$ref": "https://example.com/s.json"}))
            .err()
            .unwrap();
        assert!(err.contains("https://example.com/s.json"), "{err}");
    }

    #[test]
    fn failures_point_at_locations_and_keywords_only() {
        let schema = json!({
            "type": "object",
            "required": ["amount", "a/b"],
            "additionalProperties": false,
            "properties": {
                "amount": {"type": "integer"},
                "a/b": {"type": "string"},
                "tags": {"type": "array", "items": {"enum": ["x", "y"]}}
            }
        });
        let found = violations(
            schema,
            json!({"amount": "secret-value", "tags": ["x", "secret-tag"], "extra": 1}),
        );
        let text = format!("{found:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(found.contains(&("/amount".into(), "type".into())), "{text}");
        assert!(
            found.contains(&("/a~1b".into(), "required".into())),
            "{text}"
        );
        assert!(
            found.contains(&("/extra".into(), "additionalProperties".into())),
            "{text}"
        );
        assert!(found.contains(&("/tags/1".into(), "enum".into())), "{text}");
    }
}
