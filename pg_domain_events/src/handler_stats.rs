//! Statistics of sync handlers, kept out of the writers' transactions, and the processing log.
//!
//! A sync handler's failure rolls its transaction back, and a counter row updated per event
//! would make every writer wait for the previous one's commit. So the counters live in shared
//! memory, as atomics in one slot per handler: a call adds to them without a lock, whatever
//! happens to the transaction afterwards. Shared memory exists only when the library is in
//! `shared_preload_libraries`; otherwise nothing is counted and `handler_stats` shows NULLs.
//! Counters start at zero with the server.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::shmem::AssertPGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic};

use crate::gucs;
use crate::store;

/// Handlers counted per server (all databases, since start). A handler beyond that is not
/// counted; its `handler_stats` row shows NULLs.
const SLOTS: usize = 1024;
/// Bytes of the last error message kept per handler.
const ERROR_BYTES: usize = 240;

const FREE: u32 = 0;
const CLAIMING: u32 = 1;
const READY: u32 = 2;

/// One handler's counters, identified by database and name.
#[repr(C)]
struct Slot {
    state: AtomicU32,
    database: AtomicU32,
    name_hash: AtomicU64,
    calls: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
    /// Postgres timestamp (µs since 2000); `i64::MIN`: no failure yet.
    last_error_at: AtomicI64,
    /// Guards `error` and `error_len` (a spin lock: held for a copy of at most 240 bytes).
    error_lock: AtomicBool,
    error_len: AtomicU32,
    error: UnsafeCell<[u8; ERROR_BYTES]>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: AtomicU32::new(FREE),
            database: AtomicU32::new(0),
            name_hash: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            last_error_at: AtomicI64::new(i64::MIN),
            error_lock: AtomicBool::new(false),
            error_len: AtomicU32::new(0),
            error: UnsafeCell::new([0; ERROR_BYTES]),
        }
    }

    fn with_error<R>(&self, f: impl FnOnce(&mut [u8; ERROR_BYTES], &AtomicU32) -> R) -> R {
        while self
            .error_lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the spin lock gives exclusive access to the buffer.
        let result = f(unsafe { &mut *self.error.get() }, &self.error_len);
        self.error_lock.store(false, Ordering::Release);
        result
    }
}

/// The counters of every handler of the server.
pub struct Counters {
    slots: [Slot; SLOTS],
}

impl Counters {
    fn new() -> Counters {
        Counters {
            slots: std::array::from_fn(|_| Slot::new()),
        }
    }
}

static COUNTERS: PgAtomic<AssertPGRXSharedMemory<Counters>> =
    unsafe { PgAtomic::new(c"pg_domain_events handler counters") };

/// Set in the postmaster when the library is preloaded; inherited by every backend it forks.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Requests the counters' shared memory; called from `_PG_init` while preloading.
// The macro tests features for other Postgres versions than this crate declares.
#[allow(unexpected_cfgs)]
pub fn init_shared_memory() {
    // SAFETY: Counters is plain atomics and a buffer guarded by its own lock.
    pg_shmem_init!(COUNTERS = unsafe { AssertPGRXSharedMemory::new(Counters::new()) });
    PRELOADED.store(true, Ordering::Relaxed);
}

/// Whether the library was preloaded, so that the counters' shared memory exists.
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// FNV-1a: the same in every process, whatever the Rust version.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The slot of handler `name` in this database; claimed when `claim` and not there yet.
fn slot_index(name: &str, claim: bool) -> Option<usize> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    let counters = COUNTERS.get();
    // SAFETY: a backend global.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let hash = name_hash(name);
    let start = (hash as usize) % SLOTS;
    for probe in 0..SLOTS {
        let index = (start + probe) % SLOTS;
        let slot = &counters.slots[index];
        loop {
            match slot.state.load(Ordering::Acquire) {
                READY => {
                    if slot.database.load(Ordering::Relaxed) == database
                        && slot.name_hash.load(Ordering::Relaxed) == hash
                    {
                        return Some(index);
                    }
                    break;
                }
                CLAIMING => std::hint::spin_loop(),
                _ if !claim => return None,
                _ => {
                    if slot
                        .state
                        .compare_exchange(FREE, CLAIMING, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        slot.database.store(database, Ordering::Relaxed);
                        slot.name_hash.store(hash, Ordering::Relaxed);
                        slot.state.store(READY, Ordering::Release);
                        return Some(index);
                    }
                }
            }
        }
    }
    None
}

/// Where a handler's executions are counted, found once per backend and registry version.
#[derive(Default)]
pub struct CounterRef {
    index: std::cell::Cell<Option<Option<usize>>>,
}

impl CounterRef {
    /// Counts one execution of handler `name`: its duration and, for a failure, its message.
    /// Lock-free except for a failure's message; never touches the transaction.
    pub fn count(&self, name: &str, duration: Duration, error: Option<&str>) {
        if !gucs::HANDLER_STATS.get() {
            return;
        }
        let index = match self.index.get() {
            Some(index) => index,
            None => {
                let index = slot_index(name, true);
                self.index.set(Some(index));
                index
            }
        };
        let Some(index) = index else {
            return;
        };
        let slot = &COUNTERS.get().slots[index];
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        slot.calls.fetch_add(1, Ordering::Relaxed);
        slot.total_ns.fetch_add(nanos, Ordering::Relaxed);
        slot.max_ns.fetch_max(nanos, Ordering::Relaxed);
        match error {
            None => {
                slot.successes.fetch_add(1, Ordering::Relaxed);
            }
            Some(message) => {
                slot.failures.fetch_add(1, Ordering::Relaxed);
                // SAFETY: reads the clock.
                let now = unsafe { pg_sys::GetCurrentTimestamp() };
                let mut end = message.len().min(ERROR_BYTES);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                slot.with_error(|buffer, len| {
                    buffer[..end].copy_from_slice(&message.as_bytes()[..end]);
                    len.store(end as u32, Ordering::Relaxed);
                    slot.last_error_at.store(now, Ordering::Relaxed);
                });
            }
        }
    }
}

/// Counters of one handler as `handler_counters()` returns them.
type CounterRow = (
    String,
    i64,
    i64,
    i64,
    f64,
    f64,
    Option<String>,
    Option<TimestampWithTimeZone>,
);

fn counter_row(name: String) -> CounterRow {
    let Some(index) = slot_index(&name, false) else {
        return (name, 0, 0, 0, 0.0, 0.0, None, None);
    };
    let slot = &COUNTERS.get().slots[index];
    let load =
        |counter: &AtomicU64| i64::try_from(counter.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
    let (error, at) = slot.with_error(|buffer, len| {
        let at = slot.last_error_at.load(Ordering::Relaxed);
        let text = String::from_utf8_lossy(&buffer[..len.load(Ordering::Relaxed) as usize]);
        (
            (at != i64::MIN).then(|| text.into_owned()),
            (at != i64::MIN).then_some(at),
        )
    });
    let millis = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as f64 / 1e6;
    (
        name,
        load(&slot.calls),
        load(&slot.successes),
        load(&slot.failures),
        millis(&slot.total_ns),
        millis(&slot.max_ns),
        error,
        at.and_then(|micros| TimestampWithTimeZone::try_from(micros).ok()),
    )
}

/// The counters of this database's sync handlers (no rows without preloading): what the view
/// `domain_events.handler_stats` shows. Reads the registry with the caller's rights.
#[pg_extern(stable, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
// Spelled out: the SQL generator does not see through type aliases.
#[allow(clippy::type_complexity)]
fn handler_counters() -> TableIterator<
    'static,
    (
        name!(handler, String),
        name!(calls, i64),
        name!(successes, i64),
        name!(failures, i64),
        name!(total_ms, f64),
        name!(max_ms, f64),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
    ),
> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return TableIterator::new(Vec::new());
    }
    let names: Vec<String> = store::query_column(store::COUNTED_HANDLER_NAMES, &[]);
    TableIterator::new(names.into_iter().map(counter_row).collect::<Vec<_>>())
}

/// One execution for `domain_events.handler_log`, written in the current transaction.
pub struct Execution<'a> {
    /// The handler.
    pub handler: &'a str,
    /// The event's id.
    pub event_id: pgrx::Uuid,
    /// The event's position.
    pub position: i64,
    /// The event's type.
    pub event_type: &'a str,
    /// When the handler was called (Postgres timestamp).
    pub started_at: TimestampWithTimeZone,
    /// How long it ran.
    pub duration: Duration,
    /// `sync` or `async`.
    pub mode: &'static str,
}

/// Logs a successful execution (log level `all`) in the current transaction: the raising one
/// for a sync handler, the listener's (with its position) for an async one.
pub fn log_success(execution: Execution<'_>) {
    store::run_with(
        store::LOG_SUCCESS,
        &[
            execution.handler.into(),
            execution.event_id.into(),
            execution.position.into(),
            execution.event_type.into(),
            execution.started_at.into(),
            execution.duration.as_secs_f64().into(),
            execution.mode.into(),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hash_the_same_everywhere() {
        assert_eq!(name_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(name_hash("audit"), name_hash("audi"));
    }
}
