//! The SQL functions that raise events and maintain partitions.

use std::collections::BTreeSet;
use std::ffi::{c_char, CString};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::direct_append;
use crate::errors::{EventError, OrReport};
use crate::event::{self, Arguments, NewEvent};
use crate::gucs::{self, EventsEnabled};
use crate::handler_registry::{self, SyncHandler};
use crate::jsonb::Jsonb;
use crate::partition;
use crate::raise_stats;
use crate::store::{self, Stored};
use crate::sync_handlers::{self, StoredEvent};

/// One returned row per stored event, in input order. (The `#[pg_extern]` signatures spell the
/// table type out: the SQL generator does not see through type aliases.)
type StoredRow = (pgrx::Uuid, i64, i64, TimestampWithTimeZone);

/// Appends one event in the caller's transaction. See docs/sql-api.md.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn raise_event(
    aggregate_type: Option<&str>,
    aggregate_id: Option<&str>,
    event_type: Option<&str>,
    payload: default!(Option<Jsonb>, "'{}'"),
    metadata: default!(Option<Jsonb>, "'{}'"),
    expected_version: default!(Option<i64>, "NULL"),
    occurred_at: default!(Option<TimestampWithTimeZone>, "now()"),
    event_version: default!(Option<i32>, 1),
) -> TableIterator<
    'static,
    (
        name!(id, pgrx::Uuid),
        name!(position, i64),
        name!(aggregate_version, i64),
        name!(recorded_at, TimestampWithTimeZone),
    ),
> {
    if let Some(rows) = short_circuit() {
        return TableIterator::new(rows);
    }
    let event = NewEvent::from_arguments(Arguments {
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        metadata,
        expected_version,
        occurred_at,
        event_version,
    })
    .or_report();
    TableIterator::new(append(vec![event]))
}

/// Appends a batch of events (a JSON array), all or nothing. See docs/sql-api.md.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raise_events(
    events: Option<Jsonb>,
) -> TableIterator<
    'static,
    (
        name!(id, pgrx::Uuid),
        name!(position, i64),
        name!(aggregate_version, i64),
        name!(recorded_at, TimestampWithTimeZone),
    ),
> {
    if let Some(rows) = short_circuit() {
        return TableIterator::new(rows);
    }
    let events = events.ok_or_else(|| EventError::null("events")).or_report();
    TableIterator::new(append(NewEvent::from_batch(events, false).or_report()))
}

/// Imports history (items may carry `recorded_at`); for migrations, owner only.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn import_events(
    events: Option<Jsonb>,
) -> TableIterator<
    'static,
    (
        name!(id, pgrx::Uuid),
        name!(position, i64),
        name!(aggregate_version, i64),
        name!(recorded_at, TimestampWithTimeZone),
    ),
> {
    if let Some(rows) = short_circuit() {
        return TableIterator::new(rows);
    }
    let events = events.ok_or_else(|| EventError::null("events")).or_report();
    // History is imported as it was: sync handlers do not run for it.
    TableIterator::new(store_events(
        NewEvent::from_batch(events, true).or_report(),
        &[],
    ))
}

/// Premakes partitions, moves stray rows out of the default partition, applies retention.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn maintain() -> TableIterator<'static, (name!(action, String), name!(partition_name, String))> {
    TableIterator::new(partition::maintain())
}

/// `off` and `read_only` are decided before any validation: a dark launch must cost nothing.
pub(crate) fn short_circuit() -> Option<Vec<StoredRow>> {
    match gucs::ENABLED.get() {
        EventsEnabled::On => None,
        EventsEnabled::Off => Some(Vec::new()),
        EventsEnabled::ReadOnly => EventError::ReadOnly.report(),
    }
}

/// Stores validated events (partitions, heads, insert, version checks, NOTIFY), then runs the
/// sync handlers. Callers have checked `short_circuit()` and run with the extension owner's
/// rights and `search_path = pg_catalog, pg_temp`.
pub(crate) fn append(events: Vec<NewEvent>) -> Vec<StoredRow> {
    if events.is_empty() {
        return Vec::new();
    }
    sync_handlers::check_depth();
    // Held for the whole call: a handler changing the registry must not free what runs.
    let handlers = handler_registry::sync_handlers();
    store_events(events, &handlers)
}

fn store_events(events: Vec<NewEvent>, handlers: &[SyncHandler]) -> Vec<StoredRow> {
    if events.is_empty() {
        return Vec::new();
    }
    // What handlers see besides the stored columns; copied only when one may want it.
    let handled: Vec<Option<NewEvent>> = events
        .iter()
        .map(|e| {
            handlers
                .iter()
                .any(|h| h.wants(&e.event_type))
                .then(|| e.clone())
        })
        .collect();
    let started = std::time::Instant::now();
    let tally = raise_stats::Tally::of(&events);
    let mut months = BTreeSet::new();
    for event in &events {
        months.insert(match event.recorded_at {
            Some(ts) => partition::month_of(ts),
            None => partition::transaction_month(),
        });
    }
    for month in months {
        partition::ensure(month);
    }
    let expectations: Vec<Option<(String, String, i64)>> = events
        .iter()
        .map(|e| {
            e.expected_version
                .map(|v| (e.aggregate_type.clone(), e.aggregate_id.clone(), v))
        })
        .collect();
    let ids: Vec<pgrx::Uuid> = events.iter().map(|_| event::new_id()).collect();
    // Events of existing streams without an SQL statement; anything else (a new stream,
    // imported history, stricter isolation, triggers on the tables) through the statement,
    // which moves stream heads itself: what this transaction counted in memory is written
    // first, and found afresh afterwards.
    let stored = match direct_append::append(&events, &ids) {
        Some(stored) => stored,
        None => {
            direct_append::release_held_heads();
            if events.len() == 1 && events[0].recorded_at.is_none() {
                let event = events.into_iter().next().expect("one event");
                vec![store::insert_one(store::OneEvent {
                    aggregate_type: event.aggregate_type,
                    aggregate_id: event.aggregate_id,
                    id: ids[0],
                    event_type: event.event_type,
                    event_version: event.event_version,
                    payload: event.payload,
                    metadata: event.metadata,
                    occurred_at: event.occurred_at,
                })]
            } else {
                let batch = event::columns(events, &ids);
                in_input_order(store::insert_batch(batch), &ids)
            }
        }
    };
    for (row, expectation) in stored.iter().zip(expectations) {
        if let Some((aggregate_type, aggregate_id, expected)) = expectation {
            // The statement already wrote; raising the error aborts it, so nothing is kept.
            if row.aggregate_version != expected + 1 {
                EventError::VersionConflict {
                    aggregate_type,
                    aggregate_id,
                    actual: row.aggregate_version - 1,
                    expected,
                }
                .report();
            }
        }
    }
    if let Some(tally) = tally {
        tally.record(started.elapsed());
    }
    if handled.iter().any(Option::is_some) {
        let events: Vec<StoredEvent> = stored
            .iter()
            .zip(handled)
            .filter_map(|(row, event)| {
                let event = event?;
                Some(StoredEvent {
                    id: row.id,
                    position: row.position,
                    aggregate_type: event.aggregate_type,
                    aggregate_id: event.aggregate_id,
                    aggregate_version: row.aggregate_version,
                    event_type: event.event_type,
                    event_version: event.event_version,
                    payload: event.payload,
                    metadata: event.metadata,
                    occurred_at: event.occurred_at,
                    recorded_at: row.recorded_at,
                })
            })
            .collect();
        // Handlers may read stream heads.
        direct_append::write_held_heads();
        sync_handlers::run(handlers, &events);
    }
    if gucs::NOTIFY.get() {
        notify_listeners();
    }
    stored
        .into_iter()
        .map(|s| (s.id, s.position, s.aggregate_version, s.recorded_at))
        .collect()
}

/// RETURNING follows the insert order in practice; this makes it a guarantee.
fn in_input_order(mut stored: Vec<Stored>, ids: &[pgrx::Uuid]) -> Vec<Stored> {
    if stored.iter().zip(ids).all(|(s, id)| s.id == *id) {
        return stored;
    }
    let rank: std::collections::HashMap<[u8; 16], usize> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (*id.as_bytes(), n))
        .collect();
    stored.sort_by_key(|s| rank[s.id.as_bytes()]);
    stored
}

unsafe extern "C-unwind" {
    /// Postgres' NOTIFY; not in pgrx's bindings.
    fn Async_Notify(channel: *const c_char, payload: *const c_char);
}

/// One `NOTIFY domain_events` per transaction: identical notifications of a transaction are
/// collapsed by Postgres, and the listener only needs the wake-up.
fn notify_listeners() {
    let channel = CString::new("domain_events").expect("static channel name");
    let payload = CString::new("").expect("empty payload");
    // SAFETY: valid C strings, which Async_Notify copies; the boundary guard turns a Postgres
    // ERROR raised inside it into a Rust panic instead of a longjmp over Rust frames.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| Async_Notify(channel.as_ptr(), payload.as_ptr()))
    };
}
