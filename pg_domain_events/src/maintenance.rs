//! The maintenance background workers: one per database listed in
//! `domain_events.maintenance_databases`, each running `domain_events.maintain()` every
//! `domain_events.maintenance_interval` seconds, so partitions exist before they are needed
//! (month after month) and retention happens without a cron job. Registered only when the
//! library is in `shared_preload_libraries`.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use crate::gucs;

/// Registers one worker per listed database; called from `_PG_init` while preloading.
pub fn register() {
    for database in gucs::maintenance_databases() {
        BackgroundWorkerBuilder::new(&format!("pg_domain_events maintenance {database}"))
            .set_type("pg_domain_events maintenance")
            .set_library("pg_domain_events")
            .set_function("pg_domain_events_maintenance_main")
            .set_extra(&database)
            .enable_spi_access()
            // After a crash or a failed connection (database not created yet), try again soon.
            .set_restart_time(Some(Duration::from_secs(5)))
            .load();
    }
}

/// Entry point of the worker process.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_domain_events_maintenance_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    log!("pg_domain_events maintenance worker started in database \"{database}\"");
    loop {
        let interval = gucs::MAINTENANCE_INTERVAL.get();
        if interval > 0 {
            run_once();
        }
        // A paused worker still wakes up now and then to notice a configuration reload.
        let wait = Duration::from_secs(if interval > 0 { interval as u64 } else { 60 });
        if !BackgroundWorker::wait_latch(Some(wait)) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads postgresql.conf, as every backend does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}

fn run_once() {
    BackgroundWorker::transaction(|| {
        Spi::connect_mut(|client| {
            let installed = client
                .select(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_domain_events')",
                    None,
                    &[],
                )
                .and_then(|t| t.first().get_one::<bool>())
                .ok()
                .flatten()
                .unwrap_or(false);
            if installed {
                let actions = client
                    .update("SELECT count(*) FROM domain_events.maintain()", None, &[])
                    .and_then(|t| t.first().get_one::<i64>())
                    .unwrap_or_else(|e| panic!("domain_events.maintain() failed: {e}"))
                    .unwrap_or(0);
                if actions > 0 {
                    log!("pg_domain_events maintenance: {actions} partition action(s)");
                }
            }
        })
    });
}
