//! The event model (DESIGN §2) and its decoding from replicated rows.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::lsn::Lsn;
use crate::replication::pgoutput::{Relation, Tuple, TupleValue};

/// Schema of the event table.
pub const EVENT_SCHEMA: &str = "domain_events";
/// Name of the event table (the partition root, which the publication publishes through).
pub const EVENT_TABLE: &str = "event";

/// One domain event, as stored in `domain_events.event`, handed to every handler.
///
/// JSON columns are kept as the exact text Postgres produced ([`RawValue`]): nothing is lost
/// (big numbers, key order of the stored `jsonb`), and handlers that only forward the payload never
/// parse it. Use [`Event::payload_as`] to deserialize.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Global position from the sequence; monotonic in assignment order, not in commit order.
    pub position: i64,
    /// UUIDv7, unique: deduplicate on it (delivery is at least once).
    pub id: Uuid,
    /// E.g. `Loan`.
    pub aggregate_type: String,
    /// Any id of the aggregate.
    pub aggregate_id: String,
    /// 1, 2, 3… per aggregate, gap-free.
    pub aggregate_version: i64,
    /// E.g. `Loan.StatusChanged`.
    pub event_type: String,
    /// Payload schema version.
    pub event_version: i32,
    /// A JSON object.
    pub payload: Box<RawValue>,
    /// A JSON object (actor, correlation_id, causation_id, tenant_id, source, …).
    pub metadata: Box<RawValue>,
    /// Business time.
    pub occurred_at: DateTime<Utc>,
    /// Server time of the raising transaction.
    pub recorded_at: DateTime<Utc>,
    /// `pg_current_xact_id()` of the raising transaction.
    pub txid: u64,
    /// Not a column: LSN of the commit record of the transaction that raised the event. Events of
    /// one transaction share it; it grows in commit order, so it orders the stream. In notify mode
    /// it is `0/N`, `N` the number of the snapshot transition that delivered the event (it orders
    /// delivery the same way, but is no WAL position).
    pub commit_lsn: Lsn,
}

impl Event {
    /// Deserializes the payload into `T`.
    pub fn payload_as<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.payload.get())
    }
}

/// Why a replicated row is not a valid event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The event table lacks a column the listener needs (an incompatible extension version).
    #[error("relation {relation} has no column {column:?}")]
    MissingColumn {
        /// `schema.table`.
        relation: String,
        /// Column name.
        column: &'static str,
    },
    /// A row arrived for a relation oid with no prior Relation message.
    #[error("row for unknown relation oid {0}")]
    UnknownRelation(u32),
    /// A column value is missing, NULL, or not in the expected text format.
    #[error("column {column:?}: {problem}")]
    Column {
        /// Column name.
        column: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// Positions of the event columns inside a row of one relation.
#[derive(Debug, Clone)]
struct ColumnMap {
    position: usize,
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    aggregate_version: usize,
    event_type: usize,
    event_version: usize,
    payload: usize,
    metadata: usize,
    occurred_at: usize,
    recorded_at: usize,
    txid: usize,
}

impl ColumnMap {
    fn new(relation: &Relation) -> Result<ColumnMap, EventError> {
        let find = |column: &'static str| {
            relation
                .columns
                .iter()
                .position(|c| c.name == column)
                .ok_or_else(|| EventError::MissingColumn {
                    relation: format!("{}.{}", relation.namespace, relation.name),
                    column,
                })
        };
        Ok(ColumnMap {
            position: find("position")?,
            id: find("id")?,
            aggregate_type: find("aggregate_type")?,
            aggregate_id: find("aggregate_id")?,
            aggregate_version: find("aggregate_version")?,
            event_type: find("event_type")?,
            event_version: find("event_version")?,
            payload: find("payload")?,
            metadata: find("metadata")?,
            occurred_at: find("occurred_at")?,
            recorded_at: find("recorded_at")?,
            txid: find("txid")?,
        })
    }
}

/// What the decoder knows about one relation oid.
#[derive(Debug, Clone)]
enum Known {
    /// `domain_events.event`: rows are events.
    Events(ColumnMap),
    /// Some other table in the publication: its rows are not ours.
    Other(String),
}

/// Outcome of [`EventDecoder::decode_insert`].
#[derive(Debug)]
pub enum Decoded {
    /// The row is an event.
    Event(Box<Event>),
    /// The row belongs to another table (named) and is not an event.
    NotAnEvent(String),
}

/// Turns replicated rows into [`Event`]s, remembering each relation's column layout.
#[derive(Debug, Default)]
pub struct EventDecoder {
    relations: HashMap<u32, Known>,
}

impl EventDecoder {
    /// Records a Relation message (sent before a table's first row, and after its shape changes).
    pub fn relation(&mut self, relation: &Relation) -> Result<(), EventError> {
        let known = if relation.namespace == EVENT_SCHEMA && relation.name == EVENT_TABLE {
            Known::Events(ColumnMap::new(relation)?)
        } else {
            Known::Other(format!("{}.{}", relation.namespace, relation.name))
        };
        self.relations.insert(relation.oid, known);
        Ok(())
    }

    /// Whether `oid` is the event table.
    pub fn is_event_relation(&self, oid: u32) -> bool {
        matches!(self.relations.get(&oid), Some(Known::Events(_)))
    }

    /// Best effort for a row [`EventDecoder::decode_insert`] refused: its `id` and `position`
    /// when those columns parse.
    pub fn identify(&self, oid: u32, row: &Tuple) -> (Option<Uuid>, Option<i64>) {
        let Some(Known::Events(map)) = self.relations.get(&oid) else {
            return (None, None);
        };
        let text = |index: usize| match row.0.get(index) {
            Some(TupleValue::Text(bytes)) => std::str::from_utf8(bytes).ok(),
            _ => None,
        };
        (
            text(map.id).and_then(|s| Uuid::parse_str(s).ok()),
            text(map.position).and_then(|s| s.parse().ok()),
        )
    }

    /// Decodes an inserted row of relation `oid`.
    pub fn decode_insert(
        &self,
        oid: u32,
        row: &Tuple,
        commit_lsn: Lsn,
    ) -> Result<Decoded, EventError> {
        let map = match self.relations.get(&oid) {
            Some(Known::Events(map)) => map,
            Some(Known::Other(name)) => return Ok(Decoded::NotAnEvent(name.clone())),
            None => return Err(EventError::UnknownRelation(oid)),
        };
        let text = |index: usize, column: &'static str| -> Result<&str, EventError> {
            match row.0.get(index) {
                Some(TupleValue::Text(bytes)) => {
                    std::str::from_utf8(bytes).map_err(|_| EventError::Column {
                        column,
                        problem: "not valid UTF-8".into(),
                    })
                }
                Some(TupleValue::Null) => Err(EventError::Column {
                    column,
                    problem: "is NULL".into(),
                }),
                Some(TupleValue::UnchangedToast) | Some(TupleValue::Binary(_)) | None => {
                    Err(EventError::Column {
                        column,
                        problem: "value missing or not in text format".into(),
                    })
                }
            }
        };
        let json = |index: usize, column: &'static str| -> Result<Box<RawValue>, EventError> {
            RawValue::from_string(text(index, column)?.to_owned()).map_err(|e| EventError::Column {
                column,
                problem: format!("not JSON: {e}"),
            })
        };
        fn number<T: std::str::FromStr>(s: &str, column: &'static str) -> Result<T, EventError> {
            s.parse().map_err(|_| EventError::Column {
                column,
                problem: format!("not a number: {s:?}"),
            })
        }
        Ok(Decoded::Event(Box::new(Event {
            position: number(text(map.position, "position")?, "position")?,
            id: {
                let s = text(map.id, "id")?;
                Uuid::parse_str(s).map_err(|_| EventError::Column {
                    column: "id",
                    problem: format!("not a uuid: {s:?}"),
                })?
            },
            aggregate_type: text(map.aggregate_type, "aggregate_type")?.to_owned(),
            aggregate_id: text(map.aggregate_id, "aggregate_id")?.to_owned(),
            aggregate_version: number(
                text(map.aggregate_version, "aggregate_version")?,
                "aggregate_version",
            )?,
            event_type: text(map.event_type, "event_type")?.to_owned(),
            event_version: number(text(map.event_version, "event_version")?, "event_version")?,
            payload: json(map.payload, "payload")?,
            metadata: json(map.metadata, "metadata")?,
            occurred_at: timestamp(text(map.occurred_at, "occurred_at")?, "occurred_at")?,
            recorded_at: timestamp(text(map.recorded_at, "recorded_at")?, "recorded_at")?,
            txid: number(text(map.txid, "txid")?, "txid")?,
            commit_lsn,
        })))
    }
}

/// Parses `timestamptz` text output. The replication connection sets `DateStyle=ISO`, so values look
/// like `2026-11-23 16:37:00.123456+00` (offset hours only when minutes are zero).
pub fn timestamp(s: &str, column: &'static str) -> Result<DateTime<Utc>, EventError> {
    DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z")
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| EventError::Column {
            column,
            problem: format!("not an ISO timestamptz ({e}): {s:?}"),
        })
}

/// An event for unit tests: fixed sample values, with the fields in `overrides` (a JSON
/// object) replaced.
#[cfg(test)]
pub(crate) fn sample(overrides: serde_json::Value) -> Event {
    let mut event = serde_json::json!({
        "position": 1, "id": "018f0000-0000-7000-8000-000000000001",
        "aggregate_type": "Loan", "aggregate_id": "42", "aggregate_version": 1,
        "event_type": "Loan.Funded", "event_version": 1, "payload": {}, "metadata": {},
        "occurred_at": "2026-11-23T16:37:00Z", "recorded_at": "2026-11-23T16:37:00Z",
        "txid": 1, "commit_lsn": "0/1"
    });
    if let (Some(event), serde_json::Value::Object(overrides)) = (event.as_object_mut(), overrides)
    {
        event.extend(overrides);
    }
    serde_json::from_value(event).expect("a valid sample event")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iso_timestamptz_with_any_offset_form() {
        let t = timestamp("2026-11-23 16:37:00.123456+00", "t").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-23T16:37:00.123456+00:00");
        let t = timestamp("2026-11-23 18:37:00+02", "t").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-23T16:37:00+00:00");
        let t = timestamp("2026-11-23 22:07:00.5+05:30", "t").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-23T16:37:00.500+00:00");
        assert!(timestamp("infinity", "t").is_err());
        assert!(timestamp("2026-11-23T16:37:00Z junk", "t").is_err());
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;
    use crate::replication::pgoutput::{decode, PgOutputMessage};

    fn load(prefix: &str) -> PgOutputMessage {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let path = std::fs::read_dir(&dir)
            .expect("fixtures")
            .map(|e| e.expect("entry").path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .expect("fixture");
        decode(std::fs::read(path).expect("read").into()).expect("decode")
    }

    #[test]
    fn decodes_a_raised_event_from_a_real_stream() {
        let mut decoder = EventDecoder::default();
        let PgOutputMessage::Relation(root) = load("04-relation-event") else {
            panic!()
        };
        let PgOutputMessage::Relation(partition) = load("05-relation-event_p") else {
            panic!()
        };
        let PgOutputMessage::Relation(aggregate) = load("02-relation-aggregate") else {
            panic!()
        };
        decoder.relation(&root).unwrap();
        decoder.relation(&partition).unwrap();
        decoder.relation(&aggregate).unwrap();
        assert!(decoder.is_event_relation(root.oid));
        assert!(!decoder.is_event_relation(partition.oid));

        let PgOutputMessage::Insert(insert) = load("06-insert") else {
            panic!()
        };
        assert_eq!(
            insert.relation, root.oid,
            "published through the partition root"
        );
        let Decoded::Event(event) = decoder
            .decode_insert(insert.relation, &insert.new, Lsn(7))
            .unwrap()
        else {
            panic!("not an event")
        };
        assert_eq!(event.aggregate_type, "Loan");
        assert_eq!(event.aggregate_id, "42");
        assert_eq!(event.aggregate_version, 1);
        assert_eq!(event.event_type, "Loan.Funded");
        assert_eq!(event.event_version, 1);
        assert_eq!(event.position, 1);
        assert_eq!(event.id.get_version_num(), 7);
        assert_eq!(event.commit_lsn, Lsn(7));
        assert!(event.txid > 0);
        assert_eq!(event.occurred_at, event.recorded_at);
        let payload: serde_json::Value = event.payload_as().unwrap();
        assert_eq!(
            payload,
            serde_json::json!({"amount": 100, "name": "Zo\u{eb} \u{1f680}", "nested": {"a": [1, 2.5, null]}})
        );
        let metadata: serde_json::Value = serde_json::from_str(event.metadata.get()).unwrap();
        assert_eq!(metadata, serde_json::json!({"actor": "fixture"}));

        let PgOutputMessage::Insert(other) = load("03-insert") else {
            panic!()
        };
        assert!(matches!(
            decoder.decode_insert(other.relation, &other.new, Lsn(7)).unwrap(),
            Decoded::NotAnEvent(name) if name == "domain_events.aggregate"
        ));
        assert!(matches!(
            decoder.decode_insert(12345, &insert.new, Lsn(7)),
            Err(EventError::UnknownRelation(12345))
        ));
    }

    #[test]
    fn a_relation_without_event_columns_is_refused() {
        let PgOutputMessage::Relation(mut root) = load("04-relation-event") else {
            panic!()
        };
        root.columns.retain(|c| c.name != "payload");
        let err = EventDecoder::default().relation(&root).unwrap_err();
        assert!(
            matches!(
                err,
                EventError::MissingColumn {
                    column: "payload",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_column_values_are_errors() {
        let mut decoder = EventDecoder::default();
        let PgOutputMessage::Relation(root) = load("04-relation-event") else {
            panic!()
        };
        decoder.relation(&root).unwrap();
        let PgOutputMessage::Insert(insert) = load("06-insert") else {
            panic!()
        };
        let payload = root
            .columns
            .iter()
            .position(|c| c.name == "payload")
            .unwrap();
        let id = root.columns.iter().position(|c| c.name == "id").unwrap();
        for (index, value) in [
            (payload, TupleValue::Text("{not json".into())),
            (payload, TupleValue::Null),
            (id, TupleValue::Text("nope".into())),
            (id, TupleValue::UnchangedToast),
        ] {
            let mut row = insert.new.clone();
            row.0[index] = value;
            assert!(decoder.decode_insert(root.oid, &row, Lsn(1)).is_err());
        }
        let mut short = insert.new.clone();
        short.0.truncate(3);
        assert!(decoder.decode_insert(root.oid, &short, Lsn(1)).is_err());
    }
}
