//! Raise-side figures for operators: events stored per aggregate type and event type, and how
//! long each store operation took, as `domain_events.raise_stats` and
//! `domain_events.store_stats` show them (and the listener exports as metrics).
//!
//! Like the sync handlers' counters (`handler_stats`), they live in shared memory as atomics:
//! a counter row would make every writer wait for the previous one's commit. They count at
//! statement time, so events of transactions that roll back afterwards count too (compare with
//! the listener's `events_received_total` for committed ones); an aborted statement counts
//! nothing. Shared memory exists only when the library is in `shared_preload_libraries`;
//! otherwise nothing is counted and both views are empty. Counters start at zero with the
//! server.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use pgrx::prelude::*;
use pgrx::shmem::AssertPGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic};

use crate::event::NewEvent;
use crate::validation::MAX_NAME_CHARS;

/// (aggregate type, event type) pairs counted per server (all databases). A pair beyond that
/// is not counted.
const TYPE_SLOTS: usize = 512;
/// Databases whose store operations are timed.
const DATABASE_SLOTS: usize = 64;
/// Room for a name of `MAX_NAME_CHARS` characters of up to 4 bytes each.
const NAME_BYTES: usize = MAX_NAME_CHARS * 4;
/// Upper bounds (seconds) of the store-duration buckets, around the spec's 5 ms alert.
pub const STORE_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

const FREE: u32 = 0;
const CLAIMING: u32 = 1;
const READY: u32 = 2;

/// Events of one (aggregate type, event type) pair in one database. The names are written
/// once, while the slot is claimed, and only read once it is ready.
#[repr(C)]
struct TypeSlot {
    state: AtomicU32,
    database: AtomicU32,
    hash: AtomicU64,
    events: AtomicU64,
    aggregate_len: AtomicU32,
    event_len: AtomicU32,
    names: UnsafeCell<[u8; 2 * NAME_BYTES]>,
}

/// The store operations of one database.
#[repr(C)]
struct DatabaseSlot {
    state: AtomicU32,
    database: AtomicU32,
    hash: AtomicU64,
    operations: AtomicU64,
    total_ns: AtomicU64,
    buckets: [AtomicU64; STORE_BUCKETS.len()],
}

/// A slot of an open-addressing table in shared memory, keyed by database and hash.
trait Keyed {
    fn state(&self) -> &AtomicU32;
    fn key(&self) -> (&AtomicU32, &AtomicU64);
}

impl Keyed for TypeSlot {
    fn state(&self) -> &AtomicU32 {
        &self.state
    }
    fn key(&self) -> (&AtomicU32, &AtomicU64) {
        (&self.database, &self.hash)
    }
}

impl Keyed for DatabaseSlot {
    fn state(&self) -> &AtomicU32 {
        &self.state
    }
    fn key(&self) -> (&AtomicU32, &AtomicU64) {
        (&self.database, &self.hash)
    }
}

/// The counters of the server.
pub struct Counters {
    types: [TypeSlot; TYPE_SLOTS],
    databases: [DatabaseSlot; DATABASE_SLOTS],
}

impl Counters {
    fn new() -> Counters {
        Counters {
            types: std::array::from_fn(|_| TypeSlot {
                state: AtomicU32::new(FREE),
                database: AtomicU32::new(0),
                hash: AtomicU64::new(0),
                events: AtomicU64::new(0),
                aggregate_len: AtomicU32::new(0),
                event_len: AtomicU32::new(0),
                names: UnsafeCell::new([0; 2 * NAME_BYTES]),
            }),
            databases: std::array::from_fn(|_| DatabaseSlot {
                state: AtomicU32::new(FREE),
                database: AtomicU32::new(0),
                hash: AtomicU64::new(0),
                operations: AtomicU64::new(0),
                total_ns: AtomicU64::new(0),
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
        }
    }
}

static COUNTERS: PgAtomic<AssertPGRXSharedMemory<Counters>> =
    unsafe { PgAtomic::new(c"pg_domain_events raise counters") };

/// Requests the counters' shared memory; called from `_PG_init` while preloading.
// The macro tests features for other Postgres versions than this crate declares.
#[allow(unexpected_cfgs)]
pub fn init_shared_memory() {
    // SAFETY: Counters is atomics and name buffers written only while a slot is claimed.
    pg_shmem_init!(COUNTERS = unsafe { AssertPGRXSharedMemory::new(Counters::new()) });
}

fn preloaded() -> bool {
    crate::handler_stats::preloaded()
}

fn database() -> u32 {
    // SAFETY: a backend global.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// FNV-1a over the pair, with a separator no name contains.
fn pair_hash(aggregate_type: &str, event_type: &str) -> u64 {
    let bytes = aggregate_type.bytes().chain([0]).chain(event_type.bytes());
    bytes.fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The index of the slot for `(database, hash)` in `slots`, claimed (and set up by `init`
/// before anyone reads it) when missing; `None` when the table is full.
fn find_or_claim<T: Keyed>(
    slots: &[T],
    database: u32,
    hash: u64,
    init: impl FnOnce(&T),
) -> Option<usize> {
    let start = (hash as usize) % slots.len();
    for probe in 0..slots.len() {
        let index = (start + probe) % slots.len();
        let slot = &slots[index];
        let (slot_database, slot_hash) = slot.key();
        loop {
            match slot.state().load(Ordering::Acquire) {
                READY => {
                    if slot_database.load(Ordering::Relaxed) == database
                        && slot_hash.load(Ordering::Relaxed) == hash
                    {
                        return Some(index);
                    }
                    break;
                }
                CLAIMING => std::hint::spin_loop(),
                _ => {
                    if slot
                        .state()
                        .compare_exchange(FREE, CLAIMING, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        slot_database.store(database, Ordering::Relaxed);
                        slot_hash.store(hash, Ordering::Relaxed);
                        init(slot);
                        slot.state().store(READY, Ordering::Release);
                        return Some(index);
                    }
                }
            }
        }
    }
    None
}

/// The events of one store operation, by type pair: taken before the events are consumed.
pub struct Tally {
    pairs: Vec<(String, String, u64)>,
}

impl Tally {
    /// Counts `events` by pair; `None` (nothing to do) without shared memory.
    pub fn of(events: &[NewEvent]) -> Option<Tally> {
        if !preloaded() {
            return None;
        }
        let mut pairs: Vec<(String, String, u64)> = Vec::new();
        for event in events {
            match pairs
                .iter_mut()
                .find(|(a, e, _)| *a == event.aggregate_type && *e == event.event_type)
            {
                Some((_, _, n)) => *n += 1,
                None => pairs.push((event.aggregate_type.clone(), event.event_type.clone(), 1)),
            }
        }
        Some(Tally { pairs })
    }

    /// Records the stored events and the operation's duration. Lock-free; never touches the
    /// transaction.
    pub fn record(self, took: Duration) {
        let counters = COUNTERS.get();
        let database = database();
        for (aggregate_type, event_type, n) in &self.pairs {
            let hash = pair_hash(aggregate_type, event_type);
            let index = find_or_claim(&counters.types, database, hash, |slot| {
                // SAFETY: the slot is claimed by this backend: nobody reads the names yet.
                let names = unsafe { &mut *slot.names.get() };
                let (a, e) = (aggregate_type.as_bytes(), event_type.as_bytes());
                let (a, e) = (&a[..a.len().min(NAME_BYTES)], &e[..e.len().min(NAME_BYTES)]);
                names[..a.len()].copy_from_slice(a);
                names[NAME_BYTES..NAME_BYTES + e.len()].copy_from_slice(e);
                slot.aggregate_len.store(a.len() as u32, Ordering::Relaxed);
                slot.event_len.store(e.len() as u32, Ordering::Relaxed);
            });
            if let Some(index) = index {
                counters.types[index]
                    .events
                    .fetch_add(*n, Ordering::Relaxed);
            }
        }
        let Some(index) = find_or_claim(&counters.databases, database, 0, |_| {}) else {
            return;
        };
        let slot = &counters.databases[index];
        let seconds = took.as_secs_f64();
        slot.operations.fetch_add(1, Ordering::Relaxed);
        slot.total_ns.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        // Buckets are cumulative when read; each operation counts in its own bucket here.
        if let Some(bucket) = STORE_BUCKETS.iter().position(|&le| seconds <= le) {
            slot.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn read_name(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// This database's raised events per aggregate type and event type since the server started
/// (no rows without preloading): what `domain_events.raise_stats` shows.
#[pg_extern(stable, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raise_counters() -> TableIterator<
    'static,
    (
        name!(aggregate_type, String),
        name!(event_type, String),
        name!(events, i64),
    ),
> {
    if !preloaded() {
        return TableIterator::new(Vec::new());
    }
    let database = database();
    let rows: Vec<_> = COUNTERS
        .get()
        .types
        .iter()
        .filter(|s| {
            s.state.load(Ordering::Acquire) == READY
                && s.database.load(Ordering::Relaxed) == database
        })
        .map(|s| {
            // SAFETY: a ready slot's names are never written again.
            let names = unsafe { &*s.names.get() };
            let a = s.aggregate_len.load(Ordering::Relaxed) as usize;
            let e = s.event_len.load(Ordering::Relaxed) as usize;
            (
                read_name(&names[..a]),
                read_name(&names[NAME_BYTES..NAME_BYTES + e]),
                i64::try_from(s.events.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// This database's store operations since the server started: their number, total seconds,
/// and cumulative counts per bucket upper bound (`bucket_le`, the last one `Infinity`); one
/// row, zeros without preloading. What `domain_events.store_stats` shows.
#[pg_extern(stable, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn store_counters() -> TableIterator<
    'static,
    (
        name!(operations, i64),
        name!(total_seconds, f64),
        name!(bucket_le, Vec<f64>),
        name!(bucket_operations, Vec<i64>),
    ),
> {
    let mut le: Vec<f64> = STORE_BUCKETS.to_vec();
    le.push(f64::INFINITY);
    let mut cumulative = vec![0i64; le.len()];
    let (mut operations, mut total_ns) = (0u64, 0u64);
    if preloaded() {
        let database = database();
        if let Some(slot) = COUNTERS.get().databases.iter().find(|s| {
            s.state.load(Ordering::Acquire) == READY
                && s.database.load(Ordering::Relaxed) == database
        }) {
            operations = slot.operations.load(Ordering::Relaxed);
            total_ns = slot.total_ns.load(Ordering::Relaxed);
            let mut sum = 0u64;
            for (i, bucket) in slot.buckets.iter().enumerate() {
                sum += bucket.load(Ordering::Relaxed);
                cumulative[i] = i64::try_from(sum).unwrap_or(i64::MAX);
            }
            // Read after the buckets: never below their sum.
            *cumulative.last_mut().expect("+Inf") =
                i64::try_from(operations.max(sum)).unwrap_or(i64::MAX);
        }
    }
    TableIterator::new(vec![(
        i64::try_from(operations).unwrap_or(i64::MAX),
        total_ns as f64 / 1e9,
        le,
        cumulative,
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_hash_apart() {
        assert_ne!(pair_hash("Loan", "Funded"), pair_hash("LoanF", "unded"));
        assert_eq!(pair_hash("", ""), pair_hash("", ""));
    }
}
