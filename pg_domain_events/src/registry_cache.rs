//! When a backend must read a registry table again: its copy of the event schemas
//! (`contract`) or of the handlers (`handler_registry`).
//!
//! Each registry table has a statement trigger that queues a relcache invalidation of the
//! table. Postgres applies it in the changing backend at the end of the changing command (and
//! again on abort) and in every other backend once the changing transaction has committed.
//! Before using its copy, a backend takes the invalidations that have arrived; a reload then
//! reads with a snapshot taken after them (Postgres' own rule for catalog snapshots), so a
//! change committed elsewhere is seen by the next statement here, at every isolation level,
//! and no table is read while nothing changed.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::prelude::*;

use crate::partition;

/// A registry table a backend keeps a copy of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registry {
    /// `domain_events.event_schema`.
    Schemas = 0,
    /// `domain_events.handler`'s sync handlers; their copy also holds looked-up functions, so
    /// it is also stale when any function changes.
    Handlers = 1,
    /// `domain_events.handler`'s async handlers (run by the listener), kept apart from the sync
    /// ones so that each copy notices a change on its own.
    AsyncHandlers = 2,
}

const REGISTRIES: usize = 3;

impl Registry {
    fn table(self) -> &'static str {
        match self {
            Registry::Schemas => "event_schema",
            Registry::Handlers | Registry::AsyncHandlers => "handler",
        }
    }
}

thread_local! {
    /// The OID each copy was read from (`InvalidOid`: the table did not exist).
    static TABLES: [Cell<pg_sys::Oid>; REGISTRIES] = const {
        [
            Cell::new(pg_sys::InvalidOid),
            Cell::new(pg_sys::InvalidOid),
            Cell::new(pg_sys::InvalidOid),
        ]
    };
    /// Set by the callbacks (and initially): the copy must be read again.
    static STALE: [Cell<bool>; REGISTRIES] =
        const { [Cell::new(true), Cell::new(true), Cell::new(true)] };
    static WATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Relcache invalidation callback: `relid` changed, or (InvalidOid) every relation did. A copy
/// read while its table did not exist is stale on any change: the table may just have been
/// created (`ALTER EXTENSION ... UPDATE`).
#[pg_guard]
unsafe extern "C-unwind" fn relation_invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    TABLES.with(|tables| {
        STALE.with(|stale| {
            for (table, stale) in tables.iter().zip(stale) {
                if relid == pg_sys::InvalidOid
                    || table.get() == relid
                    || table.get() == pg_sys::InvalidOid
                {
                    stale.set(true);
                }
            }
        })
    });
}

/// Syscache callback on `pg_proc`: a handler's function was replaced or dropped.
#[pg_guard]
unsafe extern "C-unwind" fn function_invalidated(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    STALE.with(|stale| {
        stale[Registry::Handlers as usize].set(true);
        stale[Registry::AsyncHandlers as usize].set(true);
    });
}

/// Takes the invalidations that have arrived; `Some(oid)` when the copy of `registry` must be
/// read again from table `oid` (`InvalidOid`: the installed schema predates the table, e.g. a
/// 0.1.0 database served by this library until `ALTER EXTENSION ... UPDATE`).
pub fn reload_needed(registry: Registry) -> Option<pg_sys::Oid> {
    if !WATCHING.with(Cell::get) {
        // SAFETY: registers callbacks that only set flags; once per backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(relation_invalidated),
                pg_sys::Datum::from(0),
            );
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::PROCOID as i32,
                Some(function_invalidated),
                pg_sys::Datum::from(0),
            );
        }
        WATCHING.with(|w| w.set(true));
    }
    // SAFETY: what Postgres does at every lock acquisition.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    let index = registry as usize;
    if !STALE.with(|s| s[index].replace(false)) {
        return None;
    }
    let oid = partition::relation_oid(registry.table());
    TABLES.with(|t| t[index].set(oid));
    Some(oid)
}

/// Runs a query with a snapshot taken now (after the invalidations taken), not the
/// transaction's: in REPEATABLE READ a copy read with the transaction snapshot could miss a
/// change whose invalidation was already consumed, and stay stale after it. Each row comes as
/// its columns' text (`None` for NULL).
pub fn read_latest(sql: &CStr, mut row: impl FnMut(&[Option<String>])) {
    Spi::connect(|_client| {
        // SAFETY: SPI is connected for the closure's duration; the plan and tuple table live
        // in SPI's memory context, which SPI_finish frees after the rows were copied out.
        unsafe {
            let plan = pg_sys::SPI_prepare(sql.as_ptr(), 0, std::ptr::null_mut());
            assert!(!plan.is_null(), "preparing a registry read failed");
            let rc = pg_sys::SPI_execute_snapshot(
                plan,
                std::ptr::null_mut(),
                std::ptr::null(),
                pg_sys::GetLatestSnapshot(),
                std::ptr::null_mut(),
                true,
                false,
                0,
            );
            assert_eq!(
                rc,
                pg_sys::SPI_OK_SELECT as i32,
                "reading a registry failed"
            );
            let table = pg_sys::SPI_tuptable;
            let columns = (*(*table).tupdesc).natts;
            let mut values = Vec::with_capacity(columns as usize);
            for n in 0..pg_sys::SPI_processed as usize {
                let tuple = *(*table).vals.add(n);
                values.clear();
                for number in 1..=columns {
                    let text = pg_sys::SPI_getvalue(tuple, (*table).tupdesc, number);
                    values.push(
                        (!text.is_null())
                            .then(|| CStr::from_ptr(text).to_string_lossy().into_owned()),
                    );
                }
                row(&values);
            }
        }
    });
}
