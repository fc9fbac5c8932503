//! pg_domain_events: domain events for PostgreSQL.
//!
//! `CREATE EXTENSION pg_domain_events` gives the schema `domain_events` with an append-only,
//! monthly-partitioned event store and `raise_event(...)`, so that an event commits or rolls back
//! with the business change that caused it. See `docs/sql-api.md`.

use pgrx::prelude::*;

mod api;
mod async_handlers;
mod capture;
mod compatibility;
mod contract;
mod direct_append;
mod errors;
mod event;
mod gucs;
mod handler_registry;
mod handler_stats;
mod held_heads;
mod immutability;
mod json_arg;
mod jsonb;
mod maintenance;
mod partition;
mod pg_major;
mod raise_stats;
mod registry_cache;
mod rights;
mod store;
mod sync_handlers;
mod validation;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

/// Called once per backend when the library loads.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain flag Postgres sets while loading shared_preload_libraries.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    gucs::init(preloading);
    if preloading {
        maintenance::register();
        handler_stats::init_shared_memory();
        raise_stats::init_shared_memory();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    /// One-off set-up before the test cluster starts.
    pub fn setup(_options: Vec<&str>) {}

    /// Settings of the throwaway cluster `cargo pgrx test` runs.
    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "wal_level = logical",
            "shared_preload_libraries = 'pg_domain_events'",
            "domain_events.maintenance_databases = 'postgres, pgrx_tests'",
            "domain_events.maintenance_interval = 1",
        ]
    }
}
