//! Sync handlers: called inside the raising transaction, after the events are stored.
//!
//! Every raising path (`raise_event`, `raise_events`, table capture) stores its events, then
//! calls each enabled sync handler whose filter matches each event, event by event, in
//! priority order. A handler gets the stored event as `jsonb` (id, position and versions
//! included) and runs with the rights of the role that registered it and with the
//! `search_path` of the raising function (`pg_catalog, pg_temp`): it names what it touches
//! with their schema, or sets its own `search_path`.
//!
//! An error in a handler aborts the raise with the handler's own SQLSTATE, message, detail and
//! hint, and a context line naming the handler and the event. A handler may raise events
//! itself: they carry the triggering event's id as `causation_id` and its `correlation_id` (or
//! its id), and `domain_events.handler_max_depth` bounds the cascade.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::Value;

use crate::errors;
use crate::gucs;
use crate::handler_registry::{LogLevel, SyncHandler};
use crate::handler_stats::{self, Execution};
use crate::jsonb::{Jsonb, Node, ObjectBuilder};
use crate::rights;

/// A stored event, as handlers receive it.
pub struct StoredEvent {
    /// Event id.
    pub id: pgrx::Uuid,
    /// Global position.
    pub position: i64,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Version within its aggregate.
    pub aggregate_version: i64,
    /// Event type.
    pub event_type: String,
    /// Payload schema version.
    pub event_version: i32,
    /// Payload.
    pub payload: Jsonb,
    /// Metadata.
    pub metadata: Jsonb,
    /// Business time; `None` = the transaction's start.
    pub occurred_at: Option<TimestampWithTimeZone>,
    /// Server time.
    pub recorded_at: TimestampWithTimeZone,
}

impl StoredEvent {
    /// The event as the listener's handlers see it (same keys and formats), built as `jsonb`
    /// directly: the payload and metadata are copied in, never printed and parsed. Keys are
    /// pushed in jsonb's own order (shorter first, then bytewise), so the sort that closes the
    /// object only confirms it.
    fn jsonb(&self) -> Jsonb {
        let occurred_at = self.occurred_at.unwrap_or_else(transaction_start);
        // SAFETY: the transaction has an id: it just wrote the event.
        let txid = unsafe { pg_sys::GetTopFullTransactionIdIfAny() }.value;
        let mut event = ObjectBuilder::new();
        event.string("id", id_text(&self.id));
        event.integer(
            "txid",
            i64::try_from(txid).expect("a 64-bit transaction id below 2^63"),
        );
        event.document("payload", self.payload);
        event.document("metadata", self.metadata);
        event.integer("position", self.position);
        event.string("event_type", self.event_type.clone());
        event.string("occurred_at", time_text(occurred_at));
        event.string("recorded_at", time_text(self.recorded_at));
        event.string("aggregate_id", self.aggregate_id.clone());
        event.integer("event_version", self.event_version.into());
        event.string("aggregate_type", self.aggregate_type.clone());
        event.integer("aggregate_version", self.aggregate_version);
        event.finish()
    }
}

/// An event id as text (`8-4-4-4-12` lower-case hex), without the formatting machinery.
fn id_text(id: &pgrx::Uuid) -> String {
    let mut buffer = uuid::Uuid::encode_buffer();
    uuid::Uuid::from_bytes(*id.as_bytes())
        .hyphenated()
        .encode_lower(&mut buffer)
        .to_string()
}

thread_local! {
    /// The last two timestamps printed, with the session time zone they were printed in: the
    /// events of one transaction share `recorded_at` and mostly `occurred_at`.
    static TIME_TEXTS: RefCell<[Option<(i64, usize, String)>; 2]> = const { RefCell::new([None, None]) };
}

/// A timestamp as handlers see it (ISO 8601 in the session's time zone, as `to_json` prints it).
fn time_text(time: TimestampWithTimeZone) -> String {
    let micros = time.into_inner();
    // SAFETY: reads a backend global; it changes when the TimeZone setting does.
    let zone = unsafe { pg_sys::session_timezone } as usize;
    TIME_TEXTS.with(|texts| {
        let mut texts = texts.borrow_mut();
        if let Some((_, _, text)) = texts
            .iter()
            .flatten()
            .find(|(m, z, _)| *m == micros && *z == zone)
        {
            return text.clone();
        }
        let text = match serde_json::to_value(time) {
            Ok(Value::String(text)) => text,
            _ => unreachable!("a timestamp serialises as a string"),
        };
        texts.swap(0, 1);
        texts[0] = Some((micros, zone, text.clone()));
        text
    })
}

/// The correlation id in an event's metadata.
fn correlation_id(metadata: Jsonb) -> Option<String> {
    let Node::Object(metadata) = metadata.root() else {
        return None;
    };
    match metadata.get("correlation_id")? {
        node @ Node::String(..) => node.as_str().map(str::to_string),
        node @ Node::Number(_) => node.number_text(),
        _ => None,
    }
}

fn transaction_start() -> TimestampWithTimeZone {
    // SAFETY: reads a backend global.
    let micros = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    TimestampWithTimeZone::try_from(micros).expect("a finite transaction start")
}

/// An event whose handlers are running in this backend (innermost last).
/// Kept as given: texts are made only when a handler raises events (`cascade_metadata`).
struct Cause {
    event_id: pgrx::Uuid,
    metadata: Jsonb,
}

thread_local! {
    static CAUSES: RefCell<Vec<Cause>> = const { RefCell::new(Vec::new()) };
}

/// Pops the innermost cause, also when a handler's error unwinds through.
struct CauseGuard;

impl Drop for CauseGuard {
    fn drop(&mut self) {
        CAUSES.with(|c| c.borrow_mut().pop());
    }
}

/// Refuses to raise events deeper than `domain_events.handler_max_depth` handlers down.
pub fn check_depth() {
    let depth = CAUSES.with(|c| c.borrow().len());
    let max = usize::try_from(gucs::HANDLER_MAX_DEPTH.get()).unwrap_or(0);
    if depth > 0 && depth >= max {
        let chain = CAUSES.with(|c| {
            c.borrow()
                .iter()
                .map(|cause| id_text(&cause.event_id))
                .collect::<Vec<_>>()
                .join(" -> ")
        });
        errors::raise(
            PgSqlErrorCode::ERRCODE_STATEMENT_TOO_COMPLEX,
            format!(
                "sync handlers raised events {depth} levels deep (domain_events.handler_max_depth = {max})"
            ),
            format!("Causing events, outermost first: {chain}. Nothing of this raise was written."),
            "A handler probably reacts to the events it raises itself; narrow its filter, or raise domain_events.handler_max_depth.",
        );
    }
}

/// For an event raised by a handler: `(causation_id, correlation_id)`, the triggering event's
/// id and its correlation id (or, when it has none, its id).
pub fn cascade_metadata() -> Option<(String, String)> {
    CAUSES.with(|c| {
        let causes = c.borrow();
        let cause = causes.last()?;
        let id = id_text(&cause.event_id);
        let correlation = correlation_id(cause.metadata).unwrap_or_else(|| id.clone());
        Some((id, correlation))
    })
}

/// Calls the handlers wanting each event, event by event, in the handlers' order.
pub fn run(handlers: &[SyncHandler], events: &[StoredEvent]) {
    for event in events {
        let mut argument: Option<pg_sys::Datum> = None;
        for handler in handlers.iter().filter(|h| h.wants(&event.event_type)) {
            let datum = *argument.get_or_insert_with(|| event.jsonb().datum());
            call(handler, event, datum);
        }
    }
}

/// `FunctionCallInfoBaseData` with room for one argument (its flexible array member).
#[repr(C)]
struct OneArgumentCall {
    base: pg_sys::FunctionCallInfoBaseData,
    argument: pg_sys::NullableDatum,
}

/// Calls `handler` with `event` (`argument`: its jsonb) as the registering role, counting the
/// execution and logging it per the handler's log level; an ERROR gets a context line naming
/// the handler and the event.
pub(crate) fn call(handler: &SyncHandler, event: &StoredEvent, argument: pg_sys::Datum) {
    if let Some(reason) = &handler.broken {
        errors::raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
            format!("{} handler {:?} cannot run: {reason}", handler.mode, handler.name),
            format!(
                "It was called for event {} ({}). Nothing of this raise was written.",
                event.id, event.event_type
            ),
            "Register it again with an existing function (unregister_handler, register_handler), or disable_handler() it.",
        );
    }
    let flinfo = handler.function_info();
    let _active = handler.enter();
    CAUSES.with(|c| {
        c.borrow_mut().push(Cause {
            event_id: event.id,
            metadata: event.metadata,
        })
    });
    let _cause = CauseGuard;
    let started = Instant::now();
    let started_at = (handler.log_level == LogLevel::All).then(now);
    PgTryBuilder::new(AssertUnwindSafe(|| {
        rights::as_role(handler.run_as, || {
            let mut call = OneArgumentCall {
                // SAFETY: all-zero is a valid (empty) call info; filled in below.
                base: unsafe { std::mem::zeroed() },
                argument: pg_sys::NullableDatum {
                    value: argument,
                    isnull: false,
                },
            };
            call.base.flinfo = flinfo;
            call.base.nargs = 1;
            call.base.fncollation = pg_sys::InvalidOid;
            // SAFETY: flinfo was set up by fmgr_info for this one-argument function; an
            // ERROR inside becomes a Rust panic at the boundary.
            unsafe {
                let function = (*flinfo).fn_addr.expect("fmgr_info sets fn_addr");
                pg_sys::ffi::pg_guard_ffi_boundary(|| function(&mut call.base));
            }
        });
    }))
    .catch_others({
        let (handler, event) = (AssertUnwindSafe(handler), AssertUnwindSafe(event));
        move |error: CaughtError| {
            handler
                .counter
                .count(&handler.name, started.elapsed(), Some(message_of(&error)));
            push_context_line(&handler, &event);
            error.rethrow()
        }
    })
    .execute();
    let elapsed = started.elapsed();
    handler.counter.count(&handler.name, elapsed, None);
    if let Some(started_at) = started_at {
        handler_stats::log_success(Execution {
            handler: &handler.name,
            event_id: event.id,
            position: event.position,
            event_type: &event.event_type,
            started_at,
            duration: elapsed,
            mode: handler.mode,
        });
    }
}

fn now() -> TimestampWithTimeZone {
    // SAFETY: reads the clock.
    let micros = unsafe { pg_sys::GetCurrentTimestamp() };
    TimestampWithTimeZone::try_from(micros).expect("a finite clock")
}

fn message_of(error: &CaughtError) -> &str {
    match error {
        CaughtError::PostgresError(report)
        | CaughtError::ErrorReport(report)
        | CaughtError::RustPanic {
            ereport: report, ..
        } => report.message(),
    }
}

unsafe extern "C-unwind" {
    /// Postgres' `errcontext_msg`; not in pgrx's bindings.
    fn errcontext_msg(fmt: *const c_char, ...) -> std::ffi::c_int;
}

/// Error context callback: adds the line it was given.
unsafe extern "C-unwind" fn context_line(line: *mut c_void) {
    // SAFETY: called by errfinish with the NUL-terminated line stored below.
    unsafe { errcontext_msg(c"%s".as_ptr(), line.cast::<c_char>()) };
}

/// Leaves a context line naming the handler and the event on Postgres' error context stack,
/// for the ERROR being rethrown: it is reported when that ERROR leaves the extension, and the
/// stack is reset by whoever catches it. (pgrx drops the context of an ERROR it catches, so
/// the line is added on the way out rather than around the call.)
fn push_context_line(handler: &SyncHandler, event: &StoredEvent) {
    let line = CString::new(format!(
        "{} handler \"{}\" handling event {} ({}, {} {} version {})",
        handler.mode,
        handler.name,
        event.id,
        event.event_type,
        event.aggregate_type,
        event.aggregate_id,
        event.aggregate_version
    ))
    .unwrap_or_else(|_| c"sync handler".to_owned());
    // SAFETY: allocated in the top transaction's memory, which outlives the error's reporting;
    // the callback record is linked in the way Postgres' own PG_TRY users do.
    unsafe {
        let context = pg_sys::TopTransactionContext;
        let callback = pg_sys::MemoryContextAllocZero(
            context,
            std::mem::size_of::<pg_sys::ErrorContextCallback>(),
        )
        .cast::<pg_sys::ErrorContextCallback>();
        (*callback).callback = Some(context_line);
        (*callback).arg = pg_sys::MemoryContextStrdup(context, line.as_ptr()).cast();
        (*callback).previous = pg_sys::error_context_stack;
        pg_sys::error_context_stack = callback;
    }
}
