//! Immutable history: UPDATE, DELETE and TRUNCATE of events are refused for every role.
//!
//! The one exception is internal: moving stray rows out of the default partition into their
//! monthly partition. That permission lives in backend memory, set only by this crate's code
//! for the duration of the move, so no SQL (not even a superuser's `SET`) can turn it on.

use std::cell::Cell;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};

thread_local! {
    static MOVING: Cell<bool> = const { Cell::new(false) };
}

/// Resets the flag even when the move raises an error and unwinds.
struct MoveGuard;

impl Drop for MoveGuard {
    fn drop(&mut self) {
        MOVING.with(|m| m.set(false));
    }
}

/// Runs `f` with deletes from the event table allowed.
pub fn allow_moves<R>(f: impl FnOnce() -> R) -> R {
    MOVING.with(|m| m.set(true));
    let _guard = MoveGuard;
    f()
}

/// Trigger on the event table and its partitions: refuses UPDATE, DELETE and TRUNCATE.
#[pg_trigger]
fn refuse_event_change<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgHeapTupleError> {
    let op = trigger
        .op()
        .map(|op| op.to_string())
        .unwrap_or_else(|_| "change".to_string());
    if MOVING.with(|m| m.get()) && matches!(trigger.op(), Ok(PgTriggerOperation::Delete)) {
        return Ok(trigger.old());
    }
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("domain_events.event is append-only: {op} is not allowed"),
        "pg_domain_events",
    )
    .set_detail("Events are immutable history.")
    .set_hint(
        "Raise a compensating event instead. Old history is retired a whole partition at a time by domain_events.maintain() with domain_events.retention.",
    )
    .report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}
