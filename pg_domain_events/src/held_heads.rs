//! Stream heads the current transaction holds, and their versions not yet written.
//!
//! The first event a transaction raises for a stream updates its head row, which locks it for
//! the rest of the transaction: nobody else can move that stream until it ends. Further events
//! of the stream in the same statement then only count on in memory, and the head row is
//! written once, when anything could next read it:
//!
//! - when a query ends, and before and after a utility statement (executor and utility
//!   hooks), so that no later statement's snapshot misses them: a statement never sees its
//!   own later writes anyway, so for every statement that starts afterwards a head written at
//!   the end of the raising one is as current as one written per event;
//! - when a query starts inside the raising statement (a volatile function's query), which
//!   keeps the row close; that query's snapshot, taken just before, does not see this write,
//!   so a volatile function reading `domain_events.aggregate` directly in the raising
//!   statement can see a stream a few events behind (`aggregate_version()` and the raising
//!   functions cannot: the former reads with the statement's snapshot either way, the latter
//!   write first);
//! - before the raising functions store through their SQL statement, and before sync handlers
//!   run;
//! - before the transaction commits or is prepared.
//!
//! Savepoints keep it exact: what a subtransaction counted or wrote is recorded with it
//! (`owner`, and the state it took over in `undo`), so rolling it back restores the counts
//! that were current before it, matching the rows the rollback left.
//!
//! This per-event head update was 40 % of a `raise_event` called once per row
//! (docs/benchmarks.md, "The direct append").

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// A held head: where its newest row version is, the version that row holds, and the version
/// the stream is at.
#[derive(Clone, Copy)]
pub struct Head {
    pub tid: pg_sys::ItemPointerData,
    pub written: i64,
    pub current: i64,
}

struct Stream {
    /// `None`: the row is the truth (the statement path may have moved it).
    head: Option<Head>,
    /// Subtransaction that last changed the entry.
    owner: pg_sys::SubTransactionId,
    /// What the entry was before each subtransaction took it over, oldest first.
    undo: Vec<(pg_sys::SubTransactionId, Option<Head>)>,
}

struct Held {
    transaction: u64,
    streams: HashMap<String, Stream>,
    /// Some head has `current > written`.
    pending: bool,
}

/// Bounds the memory a transaction raising for very many streams spends here; streams beyond
/// it are written per event.
const LIMIT: usize = 4096;

thread_local! {
    static HELD: RefCell<Held> = RefCell::new(Held {
        transaction: 0,
        streams: HashMap::new(),
        pending: false,
    });
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

fn current_transaction() -> u64 {
    // SAFETY: plain accessor; 0 until the transaction has written.
    unsafe { pg_sys::GetTopFullTransactionIdIfAny().value }
}

fn current_subtransaction() -> pg_sys::SubTransactionId {
    // SAFETY: plain accessor.
    unsafe { pg_sys::GetCurrentSubTransactionId() }
}

/// The key of a stream.
pub fn key(aggregate_type: &str, aggregate_id: &str) -> String {
    let mut key = String::with_capacity(aggregate_type.len() + 1 + aggregate_id.len());
    key.push_str(aggregate_type);
    key.push('\0');
    key.push_str(aggregate_id);
    key
}

impl Stream {
    /// Records the entry's state for a rollback of `subtransaction` before it changes it.
    fn take_over(&mut self, subtransaction: pg_sys::SubTransactionId) {
        if self.owner != subtransaction {
            self.undo.push((self.owner, self.head));
            self.owner = subtransaction;
        }
    }
}

/// Whether this transaction holds the stream of `key` with a known head ([`advance`] counts
/// on from it).
pub fn holds(key: &str) -> bool {
    let transaction = current_transaction();
    HELD.with(|held| {
        let held = held.borrow();
        transaction != 0
            && held.transaction == transaction
            && held.streams.get(key).is_some_and(|s| s.head.is_some())
    })
}

/// Moves a held stream `by` events on, counted in memory; its new head, or `None` when the
/// stream is not held with a known head.
pub fn advance(key: &str, by: i64) -> Option<i64> {
    let transaction = current_transaction();
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if transaction == 0 || held.transaction != transaction {
            return None;
        }
        let stream = held.streams.get_mut(key)?;
        stream.head?;
        stream.take_over(current_subtransaction());
        let head = stream.head.as_mut().expect("checked above");
        head.current = head
            .current
            .checked_add(by)
            .expect("fewer than 2^63 events");
        let version = head.current;
        held.pending = true;
        Some(version)
    })
}

/// Records a head this transaction has just written (and so holds) at `version`.
pub fn record(key: String, tid: pg_sys::ItemPointerData, version: i64) {
    let transaction = current_transaction();
    let subtransaction = current_subtransaction();
    install_hooks();
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if held.transaction != transaction {
            held.transaction = transaction;
            held.streams.clear();
            held.pending = false;
        }
        let head = Some(Head {
            tid,
            written: version,
            current: version,
        });
        if let Some(stream) = held.streams.get_mut(&key) {
            stream.take_over(subtransaction);
            stream.head = head;
        } else if held.streams.len() < LIMIT {
            held.streams.insert(
                key,
                Stream {
                    head,
                    owner: subtransaction,
                    undo: Vec::new(),
                },
            );
        }
    });
}

/// Whether some held head has versions not yet written.
pub fn pending() -> bool {
    HELD.with(|held| {
        let held = held.borrow();
        held.pending && held.transaction == current_transaction()
    })
}

/// The heads with versions not yet written, taken over by the current subtransaction (their
/// writing belongs to it).
pub fn to_write() -> Vec<(String, Head)> {
    let subtransaction = current_subtransaction();
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        let mut heads = Vec::new();
        for (key, stream) in held.streams.iter_mut() {
            if let Some(head) = stream.head {
                if head.current > head.written {
                    stream.take_over(subtransaction);
                    heads.push((key.clone(), head));
                }
            }
        }
        heads
    })
}

/// Records that a head's row now holds `head.current`, at `tid`.
pub fn written(key: &str, tid: pg_sys::ItemPointerData) {
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if let Some(head) = held.streams.get_mut(key).and_then(|s| s.head.as_mut()) {
            head.tid = tid;
            head.written = head.current;
        }
    });
}

/// Every head has been written.
pub fn all_written() {
    HELD.with(|held| held.borrow_mut().pending = false);
}

/// Forgets where the held heads are (they have all been written): the statement path is about
/// to move them.
pub fn forget() {
    let subtransaction = current_subtransaction();
    HELD.with(|held| {
        for stream in held.borrow_mut().streams.values_mut() {
            if stream.head.is_some() {
                stream.take_over(subtransaction);
                stream.head = None;
            }
        }
    });
}

fn recompute_pending(held: &mut Held) {
    held.pending = held
        .streams
        .values()
        .any(|s| s.head.is_some_and(|h| h.current > h.written));
}

#[pg_guard]
unsafe extern "C-unwind" fn subtransaction_event(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        crate::direct_append::close_kept_after_error();
    }
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        match event {
            pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
                // The rollback undid this subtransaction's rows: back to the counts before it.
                held.streams.retain(|_, stream| {
                    if stream.owner != subtransaction {
                        return true;
                    }
                    match stream.undo.pop() {
                        Some((owner, head)) => {
                            stream.owner = owner;
                            stream.head = head;
                            true
                        }
                        None => false,
                    }
                });
                recompute_pending(&mut held);
            }
            pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => {
                for stream in held.streams.values_mut() {
                    if stream.owner == subtransaction {
                        stream.owner = parent;
                        // The parent's own earlier state is superseded; what it took over
                        // from further up stays.
                        if stream
                            .undo
                            .last()
                            .is_some_and(|(owner, _)| *owner == parent)
                        {
                            stream.undo.pop();
                        }
                    }
                }
            }
            _ => {}
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn transaction_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT | pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => {
            crate::direct_append::close_kept();
            crate::direct_append::write_held_heads();
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT => {
            crate::direct_append::forget_kept();
            forget_all();
        }
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            forget_all();
        }
        _ => {}
    }
}

/// The transaction ended: nothing is held any more.
fn forget_all() {
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        held.streams.clear();
        held.pending = false;
        held.transaction = 0;
    });
}

static mut PREVIOUS_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREVIOUS_EXECUTOR_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREVIOUS_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, flags: i32) {
    if pending() {
        crate::direct_append::write_held_heads();
    }
    // SAFETY: the hook chain as installed by `install_hooks`.
    unsafe {
        match PREVIOUS_EXECUTOR_START {
            Some(previous) => previous(query, flags),
            None => pg_sys::standard_ExecutorStart(query, flags),
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    // SAFETY: the hook chain as installed by `install_hooks`.
    unsafe {
        match PREVIOUS_EXECUTOR_END {
            Some(previous) => previous(query),
            None => pg_sys::standard_ExecutorEnd(query),
        }
    }
    statement_ended();
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    statement: *mut pg_sys::PlannedStmt,
    text: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    environment: *mut pg_sys::QueryEnvironment,
    destination: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    statement_ended();
    // SAFETY: the hook chain as installed by `install_hooks`.
    unsafe {
        let next = PREVIOUS_PROCESS_UTILITY.unwrap_or(standard_process_utility);
        next(
            statement,
            text,
            read_only_tree,
            context,
            params,
            environment,
            destination,
            completion,
        );
    }
    // A utility statement may have raised events without any query (COPY into a tracked
    // table): written before the next statement takes its snapshot.
    statement_ended();
}

/// A query or utility statement ended (or another is about to start): the append state it
/// kept is closed and the heads it counted in memory are written.
fn statement_ended() {
    crate::direct_append::close_kept();
    if pending() {
        crate::direct_append::write_held_heads();
    }
}

unsafe extern "C-unwind" {
    /// Postgres' own `standard_ProcessUtility`, as the C function the hook chain calls (pgrx
    /// binds it as a Rust function, which a hook pointer cannot hold).
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        statement: *mut pg_sys::PlannedStmt,
        text: *const std::ffi::c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        environment: *mut pg_sys::QueryEnvironment,
        destination: *mut pg_sys::DestReceiver,
        completion: *mut pg_sys::QueryCompletion,
    );
}

/// Installs the callbacks and hooks, once per backend (on the first head held, or the first
/// append state kept for a statement).
pub fn install_hooks() {
    if REGISTERED.with(Cell::get) {
        return;
    }
    REGISTERED.with(|r| r.set(true));
    // SAFETY: hooks and callbacks are process globals set from the one backend thread; the
    // previous hooks are kept and called.
    unsafe {
        pg_sys::RegisterXactCallback(Some(transaction_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subtransaction_event), std::ptr::null_mut());
        PREVIOUS_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREVIOUS_EXECUTOR_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        PREVIOUS_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}
