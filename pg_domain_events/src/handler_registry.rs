//! The handler registry, `domain_events.handler`: registering, enabling, disabling and
//! unregistering handlers, and each backend's copy of the enabled sync handlers.
//!
//! A sync handler runs inside every writer's transaction, so registering one is a privileged
//! act: the functions are granted to `domain_events_admin` only and write the table as the
//! extension's owner, after checking the caller's input and its right to execute the function.
//! The handler later runs with the rights of the role that registered it (`run_as`), like a
//! `SECURITY DEFINER` function of that role: writers need no privilege on what it touches, and
//! nobody gains more than the registering role had.

use std::cell::{Cell, OnceCell, RefCell, UnsafeCell};
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::pg_catalog::pg_proc::{PgProc, ProKind};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::errors::{self, EventError, OrReport};
use crate::handler_stats::CounterRef;
use crate::registry_cache::{self, Registry};
use crate::rights;
use crate::store;
use crate::validation;

/// Most filters one handler may have.
const MAX_FILTERS: usize = 100;
/// Longest description.
const MAX_DESCRIPTION_CHARS: usize = 1000;

/// Why a registry function refused its call. Every variant maps to one SQLSTATE.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandlerError {
    /// A value breaks a rule of the registry (`22023`), or a required value is NULL (`22004`).
    #[error(transparent)]
    Argument(#[from] EventError),
    /// The function cannot be a handler (`42P13`).
    #[error("function {function} cannot be a handler: {reason}")]
    Signature { function: String, reason: String },
    /// A handler of this name exists (`42710`).
    #[error("a handler named {name:?} is already registered")]
    Duplicate { name: String },
    /// No handler of this name (`42704`).
    #[error("no handler named {name:?} is registered")]
    NotFound { name: String },
    /// A listener-managed handler cannot be unregistered from SQL (`55000`).
    #[error("handler {name:?} is managed by a listener's configuration")]
    ListenerManaged { name: String },
    /// `run_async_handler` was given a name that is no async handler registered in SQL (`42704`).
    #[error("no async handler named {name:?} is registered")]
    NoAsyncHandler { name: String },
}

impl HandlerError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            HandlerError::Argument(inner) => inner.sqlstate(),
            HandlerError::Signature { .. } => PgSqlErrorCode::ERRCODE_INVALID_FUNCTION_DEFINITION,
            HandlerError::Duplicate { .. } => PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            HandlerError::NotFound { .. } | HandlerError::NoAsyncHandler { .. } => {
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT
            }
            HandlerError::ListenerManaged { .. } => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            HandlerError::Argument(_) => "See docs/handlers.md for register_handler's arguments.",
            HandlerError::Signature { .. } => {
                "A handler is a plain function taking one jsonb argument, e.g. CREATE FUNCTION app.audit(event jsonb) RETURNS void ..."
            }
            HandlerError::Duplicate { .. } => {
                "Pick another name, or unregister_handler() the existing one first."
            }
            HandlerError::NotFound { .. } => {
                "SELECT name FROM domain_events.handler lists the registered handlers."
            }
            HandlerError::ListenerManaged { .. } => {
                "Remove it from the listener's TOML file; disable_handler() pauses it meanwhile."
            }
            HandlerError::NoAsyncHandler { .. } => {
                "The listener calls the handlers registered with mode => 'async'; it stops calling an unregistered one within about a second."
            }
        }
    }

    /// Raises this error as a Postgres `ERROR`; nothing was changed.
    pub fn report(self) -> ! {
        if let HandlerError::Argument(inner) = self {
            inner.report()
        }
        errors::raise(
            self.sqlstate(),
            self.to_string(),
            "Nothing was changed.",
            self.hint(),
        )
    }
}

/// Which events a handler receives, by event type: the listener's filter syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `*`: every event.
    All,
    /// `Loan.*`: event types starting with `Loan.` (kept with the dot).
    Prefix(String),
    /// `Loan.Funded`: exactly this event type.
    Exact(String),
}

impl Filter {
    /// Parses one filter; the name part must be a valid event type name (prefix).
    pub fn parse(field: &str, text: &str) -> Result<Filter, EventError> {
        if text == "*" {
            return Ok(Filter::All);
        }
        match text.strip_suffix(".*") {
            Some(prefix) => {
                validation::check_name(field, prefix)?;
                Ok(Filter::Prefix(format!("{prefix}.")))
            }
            None => {
                validation::check_name(field, text).map_err(|_| {
                    EventError::invalid(
                        field,
                        format!("{text:?} is not an event filter"),
                        "Use \"*\", \"Prefix.*\" (e.g. \"Loan.*\") or an exact event type such as \"Loan.Funded\".",
                    )
                })?;
                Ok(Filter::Exact(text.to_string()))
            }
        }
    }

    /// Whether an event of type `event_type` passes.
    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            Filter::All => true,
            Filter::Prefix(prefix) => event_type.starts_with(prefix.as_str()),
            Filter::Exact(name) => event_type == name,
        }
    }
}

/// Which executions of a handler `domain_events.handler_log` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// None.
    Off,
    /// Failures (async handlers; a sync failure rolls its own log row back).
    Errors,
    /// Every execution.
    All,
}

impl LogLevel {
    fn parse(text: &str) -> Result<LogLevel, EventError> {
        match text {
            "off" => Ok(LogLevel::Off),
            "errors" => Ok(LogLevel::Errors),
            "all" => Ok(LogLevel::All),
            _ => Err(EventError::invalid(
                "log_level",
                format!("{text:?} is not a log level"),
                "Use off, errors (the default) or all.",
            )),
        }
    }
}

fn check_mode(mode: &str) -> Result<(), EventError> {
    match mode {
        "sync" | "async" => Ok(()),
        _ => Err(EventError::invalid(
            "mode",
            format!("{mode:?} is not a handler mode"),
            "Use sync (inside the raising transaction) or async (run by the listener after commit).",
        )),
    }
}

/// The filters of `events`, checked: at least one, none NULL, each valid.
pub fn parse_filters(events: Option<Vec<Option<String>>>) -> Result<Vec<Filter>, EventError> {
    let events = events.ok_or_else(|| EventError::null("events"))?;
    if events.is_empty() || events.len() > MAX_FILTERS {
        return Err(EventError::invalid(
            "events",
            format!("has {} filters", events.len()),
            "Pass 1 to 100 filters, e.g. ARRAY['Loan.Funded'] or ARRAY['*'].",
        ));
    }
    events
        .iter()
        .enumerate()
        .map(|(n, filter)| {
            let field = format!("events[{}]", n + 1);
            let filter = filter
                .as_deref()
                .ok_or_else(|| EventError::null(field.clone()))?;
            Filter::parse(&field, filter)
        })
        .collect()
}

/// Checks that `function` can be called as `f(event jsonb)` and that the caller may execute it.
fn check_function(function: pg_sys::Oid) -> Result<(), HandlerError> {
    let described = || {
        // SAFETY: format_procedure prints any OID, "???" style for unknown ones.
        unsafe { CStr::from_ptr(pg_sys::format_procedure(function)) }
            .to_string_lossy()
            .into_owned()
    };
    let Some(proc) = PgProc::new(function) else {
        return Err(HandlerError::Signature {
            function: format!("with OID {}", function.to_u32()),
            reason: "it does not exist".to_string(),
        });
    };
    let refuse = |reason: &str| {
        Err(HandlerError::Signature {
            function: described(),
            reason: reason.to_string(),
        })
    };
    if !matches!(proc.prokind(), ProKind::Function) {
        return refuse("it is not a plain function (a procedure, aggregate or window function)");
    }
    if proc.pronargs() != 1 || proc.proargtypes() != [pg_sys::JSONBOID] {
        return refuse("it must take exactly one argument, of type jsonb");
    }
    if proc.proretset() {
        return refuse("it returns a set");
    }
    if [pg_sys::TRIGGEROID, pg_sys::EVENT_TRIGGEROID].contains(&proc.prorettype()) {
        return refuse("it is a trigger function");
    }
    let name = std::ffi::CString::new(described()).expect("no NUL in a function name");
    rights::require_execute(function, &name);
    Ok(())
}

fn required<'a>(field: &str, value: Option<&'a str>) -> Result<&'a str, EventError> {
    value.ok_or_else(|| EventError::null(field))
}

/// Registers a handler. Called through `domain_events.register_handler(name, function
/// regprocedure, events, ...)` (finalize.sql), which has the typed signature. Runs with the
/// caller's rights (they are checked and recorded) and writes as the extension's owner.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn register_handler_function(
    name: Option<&str>,
    function: Option<pg_sys::Oid>,
    events: Option<Vec<Option<String>>>,
    mode: Option<&str>,
    priority: Option<i32>,
    enabled: Option<bool>,
    description: Option<&str>,
    log_level: Option<&str>,
) {
    let result = (|| -> Result<(), HandlerError> {
        let name = required("name", name)?;
        validation::check_name("name", name)?;
        let function = function.ok_or_else(|| EventError::null("function"))?;
        let filters = parse_filters(events)?;
        let mode = required("mode", mode)?;
        check_mode(mode)?;
        let priority = priority.ok_or_else(|| EventError::null("priority"))?;
        let enabled = enabled.ok_or_else(|| EventError::null("enabled"))?;
        let log_level = required("log_level", log_level)?;
        LogLevel::parse(log_level)?;
        if let Some(description) = description {
            if description.chars().count() > MAX_DESCRIPTION_CHARS {
                return Err(EventError::invalid(
                    "description",
                    format!("is longer than {MAX_DESCRIPTION_CHARS} characters"),
                    "Keep it to a sentence or two; link to documentation for more.",
                )
                .into());
            }
        }
        check_function(function)?;
        let filters: Vec<String> = filters.iter().map(filter_text).collect();
        let run_as = rights::current_user();
        let owner = rights::extension_rights().owner;
        let inserted = rights::as_extension_owner(owner, || {
            store::query_bool(
                store::REGISTER_HANDLER,
                &[
                    name.into(),
                    mode.into(),
                    function.into(),
                    filters.into(),
                    priority.into(),
                    enabled.into(),
                    description.into(),
                    log_level.into(),
                    run_as.into(),
                ],
            )
        });
        if inserted {
            Ok(())
        } else {
            Err(HandlerError::Duplicate {
                name: name.to_string(),
            })
        }
    })();
    result.unwrap_or_else(|e| e.report())
}

fn filter_text(filter: &Filter) -> String {
    match filter {
        Filter::All => "*".to_string(),
        Filter::Prefix(prefix) => format!("{prefix}*"),
        Filter::Exact(name) => name.clone(),
    }
}

/// Switches a handler on or off; whether that changed anything. Listener-managed handlers too.
fn set_enabled(name: Option<&str>, enabled: bool) -> bool {
    let name = required("name", name).or_report();
    let owner = rights::extension_rights().owner;
    let found: Vec<bool> = rights::as_extension_owner(owner, || {
        store::query_column(store::SET_HANDLER_ENABLED, &[name.into(), enabled.into()])
    });
    match found.first() {
        Some(changed) => *changed,
        None => HandlerError::NotFound {
            name: name.to_string(),
        }
        .report(),
    }
}

/// Enables a handler; `true` if it was disabled. See docs/handlers.md.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn enable_handler(name: Option<&str>) -> bool {
    set_enabled(name, true)
}

/// Disables a handler; `true` if it was enabled. See docs/handlers.md.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn disable_handler(name: Option<&str>) -> bool {
    set_enabled(name, false)
}

/// Removes a handler registered with `register_handler`. See docs/handlers.md.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn unregister_handler(name: Option<&str>) {
    let name = required("name", name).or_report();
    let owner = rights::extension_rights().owner;
    let managed_by: Vec<String> = rights::as_extension_owner(owner, || {
        store::query_column(store::UNREGISTER_HANDLER, &[name.into()])
    });
    match managed_by.first().map(String::as_str) {
        Some("sql") => {}
        Some(_) => HandlerError::ListenerManaged {
            name: name.to_string(),
        }
        .report(),
        None => HandlerError::NotFound {
            name: name.to_string(),
        }
        .report(),
    }
}

/// Trigger on `domain_events.handler`: after every change, invalidates the backends' copies.
#[pg_trigger]
fn handler_changed<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgHeapTupleError> {
    // SAFETY: the relation of a firing trigger is open; the invalidation is transactional.
    unsafe {
        let relation = trigger.trigger_data().tg_relation;
        pg_sys::CacheInvalidateRelcacheByRelid((*relation).rd_id);
    }
    Ok(None)
}

/// One registered handler as this backend runs it: an enabled sync handler, or an async one
/// the listener calls through `run_async_handler`.
pub struct SyncHandler {
    /// Its name.
    pub name: String,
    /// `sync` or `async`.
    pub mode: &'static str,
    /// The function `f(event jsonb)`.
    pub function: pg_sys::Oid,
    /// Which event types it receives.
    pub filters: Vec<Filter>,
    /// Which executions are logged.
    pub log_level: LogLevel,
    /// The role whose rights it runs with.
    pub run_as: pg_sys::Oid,
    /// Why it cannot run (its function or role was dropped); raised when an event needs it.
    pub broken: Option<String>,
    /// Where its executions are counted.
    pub counter: CounterRef,
    /// Its function, looked up on first use.
    function_info: OnceCell<Box<UnsafeCell<pg_sys::FmgrInfo>>>,
    /// Calls of it in progress in this backend (a handler that raises events it handles).
    active: Cell<u32>,
}

impl SyncHandler {
    /// The looked-up function, ready for one call, and whether it is the kept one. Kept in
    /// the backend's top memory context: the function's own cache (a compiled PL/pgSQL body,
    /// a SQL function's plan) lives there. A call nested in a call of the same handler gets a
    /// fresh one in the current memory context: a SQL function's cached execution state is
    /// not re-entrant, which is why Postgres gives every call site its own.
    pub fn function_info(&self) -> *mut pg_sys::FmgrInfo {
        let looked_up = |context| {
            // SAFETY: all-zero is an empty FmgrInfo; fmgr_info_cxt fills it in (or raises
            // an ERROR for a function that no longer exists).
            let info: Box<UnsafeCell<pg_sys::FmgrInfo>> =
                Box::new(UnsafeCell::new(unsafe { std::mem::zeroed() }));
            unsafe { pg_sys::fmgr_info_cxt(self.function, info.get(), context) };
            info
        };
        if self.active.get() == 0 {
            return self
                .function_info
                .get_or_init(|| looked_up(unsafe { pg_sys::TopMemoryContext }))
                .get();
        }
        // SAFETY: palloc'd in the current context, freed with it, after the call.
        unsafe {
            let info =
                pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>()).cast::<pg_sys::FmgrInfo>();
            pg_sys::fmgr_info_cxt(self.function, info, pg_sys::CurrentMemoryContext);
            info
        }
    }

    /// Marks a call of this handler as running until the guard is dropped.
    pub fn enter(&self) -> ActiveCall<'_> {
        self.active.set(self.active.get() + 1);
        ActiveCall(self)
    }

    /// Whether an event of type `event_type` goes to this handler.
    pub fn wants(&self, event_type: &str) -> bool {
        self.filters.iter().any(|f| f.matches(event_type))
    }
}

/// A call of a handler in progress; see [`SyncHandler::enter`].
pub struct ActiveCall<'a>(&'a SyncHandler);

impl Drop for ActiveCall<'_> {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
    }
}

thread_local! {
    /// This backend's copy of the enabled sync handlers, in the order they run.
    static SYNC_HANDLERS: RefCell<Rc<Vec<SyncHandler>>> = RefCell::new(Rc::new(Vec::new()));
    /// This backend's copy of the async handlers registered in SQL.
    static ASYNC_HANDLERS: RefCell<Rc<Vec<SyncHandler>>> = RefCell::new(Rc::new(Vec::new()));
}

fn oid_column(text: &str) -> pg_sys::Oid {
    pg_sys::Oid::from(text.parse::<u32>().expect("an OID column"))
}

/// Reads the handlers `query` selects ([`store::LOAD_SYNC_HANDLERS`]'s columns), of `mode`.
fn load(query: &CStr, mode: &'static str) -> Vec<SyncHandler> {
    let mut handlers = Vec::new();
    registry_cache::read_latest(query, |columns| {
        let column = |n: usize| columns[n].clone().expect("selected columns are NOT NULL");
        let function = oid_column(&column(1));
        let run_as = oid_column(&column(4));
        let filters = column(2)
            .split(' ')
            .map(|f| Filter::parse("events", f).expect("stored filters were checked"))
            .collect();
        // SAFETY: syscache existence checks.
        let (function_exists, role_exists) = unsafe {
            (
                pg_sys::SearchSysCacheExists(
                    pg_sys::SysCacheIdentifier::PROCOID as i32,
                    function.into(),
                    0.into(),
                    0.into(),
                    0.into(),
                ),
                pg_sys::SearchSysCacheExists(
                    pg_sys::SysCacheIdentifier::AUTHOID as i32,
                    run_as.into(),
                    0.into(),
                    0.into(),
                    0.into(),
                ),
            )
        };
        let broken = match (function_exists, role_exists) {
            (false, _) => Some(format!(
                "its function (OID {}) was dropped",
                function.to_u32()
            )),
            (_, false) => Some(format!(
                "the role that registered it (OID {}) was dropped",
                run_as.to_u32()
            )),
            _ => None,
        };
        handlers.push(SyncHandler {
            name: column(0),
            mode,
            function,
            filters,
            log_level: LogLevel::parse(&column(3)).expect("checked by the table"),
            run_as,
            broken,
            counter: CounterRef::default(),
            function_info: OnceCell::new(),
            active: Cell::new(0),
        });
    });
    handlers
}

/// The enabled sync handlers in the order they run (priority, then name); brought up to date
/// first (cheap when nothing changed: no table is read).
pub fn sync_handlers() -> Rc<Vec<SyncHandler>> {
    current(
        Registry::Handlers,
        store::LOAD_SYNC_HANDLERS,
        "sync",
        &SYNC_HANDLERS,
    )
}

/// The async handlers registered in SQL, by name (byte order); brought up to date first.
pub fn async_handlers() -> Rc<Vec<SyncHandler>> {
    current(
        Registry::AsyncHandlers,
        store::LOAD_ASYNC_HANDLERS,
        "async",
        &ASYNC_HANDLERS,
    )
}

/// This backend's `copy` of the handlers `query` selects, read again when `registry` changed.
fn current(
    registry: Registry,
    query: &CStr,
    mode: &'static str,
    copy: &'static std::thread::LocalKey<RefCell<Rc<Vec<SyncHandler>>>>,
) -> Rc<Vec<SyncHandler>> {
    if let Some(table) = registry_cache::reload_needed(registry) {
        let handlers = if table == pg_sys::InvalidOid {
            Vec::new()
        } else {
            load(query, mode)
        };
        copy.with(|h| *h.borrow_mut() = Rc::new(handlers));
    }
    copy.with(|h| h.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_follow_the_listener_syntax() {
        assert_eq!(Filter::parse("f", "*"), Ok(Filter::All));
        assert_eq!(
            Filter::parse("f", "Loan.*"),
            Ok(Filter::Prefix("Loan.".into()))
        );
        assert_eq!(
            Filter::parse("f", "Loan.Funded"),
            Ok(Filter::Exact("Loan.Funded".into()))
        );
        for bad in [
            "", "Loan.", ".*", "Loan.*.*", "Lo an", "Loan.F*", "**", "Lоan",
        ] {
            assert!(Filter::parse("f", bad).is_err(), "{bad:?}");
        }
        assert!(Filter::Prefix("Loan.".into()).matches("Loan.Funded"));
        assert!(!Filter::Prefix("Loan.".into()).matches("LoanX.Funded"));
        assert!(!Filter::Exact("Loan.Funded".into()).matches("Loan.FundedX"));
    }

    #[test]
    fn stored_filters_read_back_as_given() {
        for text in ["*", "Loan.*", "Loan.Funded"] {
            assert_eq!(filter_text(&Filter::parse("f", text).unwrap()), text);
        }
    }
}
