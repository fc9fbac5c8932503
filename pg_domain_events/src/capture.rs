//! Table capture: `track()` turns a table's row changes into events, without application code.
//!
//! `track()` installs an AFTER row trigger whose single argument is the capture configuration
//! (JSON). The trigger checks that the user who changed the row may execute
//! `domain_events.raise_events` (so writing to a tracked table requires `domain_events_writer`,
//! exactly like raising by hand), then stores the events the way that SECURITY DEFINER function
//! does: as the extension owner, with `search_path` pinned. An event commits or rolls back with
//! its row change.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::prelude::*;
use pgrx::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::api;
use crate::errors::{EventError, OrReport};
use crate::event::NewEvent;
use crate::jsonb::Jsonb;
use crate::rights;
use crate::store;
use crate::validation;

/// What `track()` stored for one table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureConfig {
    /// Aggregate type of the events, e.g. `Loan`.
    pub aggregate_type: String,
    /// Columns whose values, joined by `:`, form the aggregate id.
    pub id_columns: Vec<String>,
    /// Columns to capture; `None` = all, including columns added later.
    pub columns: Option<Vec<String>>,
    /// Columns never captured.
    pub ignore_columns: Vec<String>,
    /// Column → event type raised when that column changes (payload `old_<c>`, `new_<c>`).
    pub column_events: HashMap<String, String>,
    /// The table, for messages and metadata.
    pub table: String,
}

impl CaptureConfig {
    fn captures(&self, column: &str) -> bool {
        !self.ignore_columns.iter().any(|c| c == column)
            && self
                .columns
                .as_ref()
                .is_none_or(|cols| cols.iter().any(|c| c == column))
    }

    fn filtered(&self, row: &Map<String, Value>) -> Map<String, Value> {
        row.iter()
            .filter(|(k, _)| self.captures(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn aggregate_id(&self, row: &Map<String, Value>) -> Result<String, EventError> {
        let mut parts = Vec::with_capacity(self.id_columns.len());
        for column in &self.id_columns {
            match row.get(column) {
                None => {
                    return Err(EventError::invalid(
                        format!("table {}", self.table),
                        format!("has no id column {column:?} any more"),
                        "Run domain_events.track() again with the new id column.",
                    ))
                }
                Some(Value::Null) => {
                    return Err(EventError::null(format!(
                        "table {} id column {column:?}",
                        self.table
                    )))
                }
                Some(Value::String(s)) => parts.push(s.clone()),
                Some(other) => parts.push(other.to_string()),
            }
        }
        Ok(parts.join(":"))
    }

    /// The events one row change raises, as `raise_events` items.
    pub fn events_for(
        &self,
        operation: &str,
        old: Option<&Map<String, Value>>,
        new: Option<&Map<String, Value>>,
    ) -> Result<Vec<Value>, EventError> {
        let metadata = serde_json::json!({"source": "capture", "table": self.table});
        let event = |row: &Map<String, Value>, event_type: String, payload: Map<String, Value>| {
            Ok::<Value, EventError>(serde_json::json!({
                "aggregate_type": self.aggregate_type,
                "aggregate_id": self.aggregate_id(row)?,
                "event_type": event_type,
                "payload": payload,
                "metadata": metadata,
            }))
        };
        let kind = |suffix: &str| format!("{}.{suffix}", self.aggregate_type);
        match (operation, old, new) {
            ("INSERT", _, Some(new)) => Ok(vec![event(new, kind("Created"), self.filtered(new))?]),
            ("DELETE", Some(old), _) => Ok(vec![event(old, kind("Deleted"), self.filtered(old))?]),
            ("UPDATE", Some(old), Some(new)) => {
                let mut changes = Map::new();
                let mut column_events = Vec::new();
                for (column, new_value) in new.iter().filter(|(k, _)| self.captures(k)) {
                    let old_value = old.get(column).unwrap_or(&Value::Null);
                    if old_value == new_value {
                        continue;
                    }
                    if let Some(event_type) = self.column_events.get(column) {
                        let mut payload = Map::new();
                        payload.insert(format!("old_{column}"), old_value.clone());
                        payload.insert(format!("new_{column}"), new_value.clone());
                        column_events.push(event(new, event_type.clone(), payload)?);
                    } else {
                        changes.insert(
                            column.clone(),
                            serde_json::json!({"old": old_value, "new": new_value}),
                        );
                    }
                }
                let mut events = Vec::new();
                if !changes.is_empty() {
                    events.push(event(new, kind("Updated"), changes)?);
                }
                events.extend(column_events);
                Ok(events)
            }
            _ => Ok(Vec::new()),
        }
    }
}

thread_local! {
    /// Parsed configurations by trigger OID: a trigger's arguments never change (re-tracking
    /// creates a new trigger), so each is parsed once per backend.
    static CONFIGS: RefCell<HashMap<pg_sys::Oid, CaptureConfig>> = RefCell::new(HashMap::new());
}

fn row_json(tuple: *mut pg_sys::HeapTupleData, desc: pg_sys::TupleDesc) -> Map<String, Value> {
    // SAFETY: the tuple and descriptor come from the trigger data of the current call;
    // row_to_json reads the composite's own type from the datum header.
    let json = unsafe {
        let datum = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        pgrx::direct_function_call::<Json>(pg_sys::row_to_json, &[Some(datum)])
    };
    match json {
        Some(Json(Value::Object(map))) => map,
        _ => Map::new(),
    }
}

/// The capture trigger. Its one argument is the [`CaptureConfig`] as JSON.
#[pg_trigger]
fn capture_row_change<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgHeapTupleError> {
    let data = trigger.trigger_data();
    let trigger_oid = trigger.trigger().tgoid;
    let config = CONFIGS.with(|configs| {
        if let Some(config) = configs.borrow().get(&trigger_oid) {
            return config.clone();
        }
        let args = trigger.extra_args().unwrap_or_default();
        let config: CaptureConfig = args
            .first()
            .and_then(|a| serde_json::from_str(a).ok())
            .unwrap_or_else(|| {
                EventError::invalid(
                    "capture trigger",
                    "has no valid configuration",
                    "Re-create it with domain_events.track().",
                )
                .report()
            });
        configs.borrow_mut().insert(trigger_oid, config.clone());
        config
    });
    // SAFETY: the relation of a firing trigger is open and its descriptor valid.
    let desc = unsafe { (*data.tg_relation).rd_att };
    let operation = match trigger.op() {
        Ok(PgTriggerOperation::Insert) => "INSERT",
        Ok(PgTriggerOperation::Update) => "UPDATE",
        Ok(PgTriggerOperation::Delete) => "DELETE",
        _ => return Ok(None),
    };
    let (old, new) = match operation {
        "INSERT" => (None, Some(row_json(data.tg_trigtuple, desc))),
        "DELETE" => (Some(row_json(data.tg_trigtuple, desc)), None),
        _ => (
            Some(row_json(data.tg_trigtuple, desc)),
            Some(row_json(data.tg_newtuple, desc)),
        ),
    };
    let events = config
        .events_for(operation, old.as_ref(), new.as_ref())
        .or_report();
    if !events.is_empty() && api::short_circuit().is_none() {
        let rights = rights::extension_rights();
        // The same check `raise_events` gets from Postgres.
        rights::require_execute(rights.raise_events, c"raise_events");
        // Validation reads the schema registry, which only the owner may read.
        rights::as_extension_owner(rights.owner, || {
            let events = Jsonb::parse(&Value::Array(events).to_string());
            let events = NewEvent::from_batch(events, false).or_report();
            api::append(events)
        });
    }
    Ok(None)
}

fn text_array(
    field: &str,
    value: Option<Vec<Option<String>>>,
) -> Result<Option<Vec<String>>, EventError> {
    value
        .map(|items| {
            items
                .into_iter()
                .map(|c| c.ok_or_else(|| EventError::null(format!("{field} element"))))
                .collect()
        })
        .transpose()
}

/// Starts capturing a table's row changes as `<aggregate_type>.Created/Updated/Deleted` events.
/// Called through `domain_events.track(regclass, ...)` (finalize.sql), which gives it typed
/// arguments (`regclass`, `name`) that pgrx has no Rust type for.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn track_relation(
    tbl: Option<pg_sys::Oid>,
    aggregate_type: Option<&str>,
    id_column: default!(Option<&str>, "'id'"),
    columns: default!(Option<Vec<Option<String>>>, "NULL"),
    ignore_columns: default!(Option<Vec<Option<String>>>, "'{}'"),
    column_events: default!(Option<crate::json_arg::JsonbText>, "'{}'"),
    id_columns: default!(Option<Vec<Option<String>>>, "NULL"),
) {
    let tbl = tbl.ok_or_else(|| EventError::null("tbl")).or_report();
    let aggregate_type = aggregate_type
        .ok_or_else(|| EventError::null("aggregate_type"))
        .or_report();
    validation::check_name("aggregate_type", aggregate_type).or_report();
    let table = store::describe_table(tbl).unwrap_or_else(|| {
        EventError::invalid(
            "tbl",
            format!("relation {} is not a table", tbl.to_u32()),
            "Track an ordinary or partitioned table.",
        )
        .report()
    });
    let id_columns = match text_array("id_columns", id_columns).or_report() {
        Some(cols) if !cols.is_empty() => cols,
        Some(_) => EventError::invalid(
            "id_columns",
            "must not be empty",
            "Name the primary key column(s).",
        )
        .report(),
        None => vec![id_column
            .ok_or_else(|| EventError::null("id_column"))
            .or_report()
            .to_string()],
    };
    let columns = text_array("columns", columns).or_report();
    let ignore_columns = text_array("ignore_columns", ignore_columns)
        .or_report()
        .unwrap_or_default();
    let column_events = column_events
        .map(|j| j.parse("column_events"))
        .transpose()
        .or_report();
    let column_events: HashMap<String, String> = match column_events {
        None => EventError::null("column_events").report(),
        Some(Value::Object(map)) => map
            .into_iter()
            .map(|(column, event)| match event {
                Value::String(event_type) => {
                    validation::check_name(&format!("column_events.{column}"), &event_type).map(|_| (column, event_type))
                }
                other => Err(EventError::invalid(
                    format!("column_events.{column}"),
                    format!("must be an event type name, got {}", validation::json_kind(&other)),
                    "Map a column to the event its change raises: '{\"status\": \"Loan.StatusChanged\"}'.",
                )),
            })
            .collect::<Result<_, _>>()
            .or_report(),
        Some(other) => EventError::invalid(
            "column_events",
            format!("must be a JSON object, got {}", validation::json_kind(&other)),
            "Map a column to the event its change raises: '{\"status\": \"Loan.StatusChanged\"}'.",
        )
        .report(),
    };
    let known: Vec<String> = store::table_columns(tbl);
    let named = id_columns
        .iter()
        .chain(columns.iter().flatten())
        .chain(ignore_columns.iter())
        .chain(column_events.keys());
    for column in named {
        if !known.contains(column) {
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("table {table} has no column {column:?}"),
                "pg_domain_events",
            )
            .set_detail("Nothing was changed.")
            .set_hint(format!("Its columns are: {}.", known.join(", ")))
            .report(PgLogLevel::ERROR);
        }
    }
    let config = CaptureConfig {
        aggregate_type: aggregate_type.to_string(),
        id_columns,
        columns,
        ignore_columns,
        column_events,
        table: table.clone(),
    };
    let config = serde_json::to_string(&config).expect("the configuration serialises");
    // Tracking again replaces the configuration.
    if store::query_bool(store::IS_TRACKED, &[tbl.into()]) {
        store::run(&store::drop_capture_trigger(&table));
    }
    store::run(&store::create_capture_trigger(&table, &config));
}

/// Stops capturing a table's row changes; called through `domain_events.untrack(regclass)`.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn untrack_relation(tbl: Option<pg_sys::Oid>) {
    let tbl = tbl.ok_or_else(|| EventError::null("tbl")).or_report();
    let table = store::describe_table(tbl).unwrap_or_else(|| {
        EventError::invalid("tbl", "is not a table", "Pass a tracked table.").report()
    });
    if !store::query_bool(store::IS_TRACKED, &[tbl.into()]) {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("table {table} is not tracked"),
            "pg_domain_events",
        )
        .set_hint("SELECT * FROM domain_events.tracked_tables lists the tracked tables.")
        .report(PgLogLevel::ERROR);
    }
    store::run(&store::drop_capture_trigger(&table));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn loans() -> CaptureConfig {
        CaptureConfig {
            aggregate_type: "Loan".into(),
            id_columns: vec!["id".into()],
            columns: None,
            ignore_columns: vec!["updated_at".into()],
            column_events: HashMap::from([("status".into(), "Loan.StatusChanged".into())]),
            table: "public.loans".into(),
        }
    }

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn updates_carry_only_changed_columns_and_mapped_events() {
        let old = row(json!({"id": 42, "status": "approved", "amount": 10, "updated_at": "a"}));
        let new = row(json!({"id": 42, "status": "funded", "amount": 12, "updated_at": "b"}));
        let events = loans()
            .events_for("UPDATE", Some(&old), Some(&new))
            .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["event_type"], "Loan.Updated");
        assert_eq!(events[0]["aggregate_id"], "42");
        assert_eq!(
            events[0]["payload"],
            json!({"amount": {"old": 10, "new": 12}})
        );
        assert_eq!(events[1]["event_type"], "Loan.StatusChanged");
        assert_eq!(
            events[1]["payload"],
            json!({"old_status": "approved", "new_status": "funded"})
        );
    }

    #[test]
    fn an_update_of_ignored_columns_raises_nothing() {
        let old = row(json!({"id": 42, "status": "a", "updated_at": "a"}));
        let new = row(json!({"id": 42, "status": "a", "updated_at": "b"}));
        assert!(loans()
            .events_for("UPDATE", Some(&old), Some(&new))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn composite_ids_are_joined_and_null_ids_refused() {
        let mut config = loans();
        config.id_columns = vec!["tenant".into(), "id".into()];
        let new = row(json!({"tenant": "acme", "id": 7, "status": "new"}));
        let events = config.events_for("INSERT", None, Some(&new)).unwrap();
        assert_eq!(events[0]["aggregate_id"], "acme:7");
        assert_eq!(events[0]["event_type"], "Loan.Created");
        let bad = row(json!({"tenant": null, "id": 7}));
        assert!(config.events_for("DELETE", Some(&bad), None).is_err());
    }
}
