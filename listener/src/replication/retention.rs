//! Slot safety: how much WAL the replication slot keeps the server from recycling.
//!
//! A slot retains WAL from its `restart_lsn` on. A listener that falls far behind (or a slot
//! whose listener is gone) fills the server's disk unless `max_slot_wal_keep_size` is set, and
//! when it is set and exceeded the slot is invalidated (`wal_status = 'lost'`): events past it
//! are no longer in any WAL. This task exports the retained amount, warns above
//! `replication.slot_wal_warning_bytes`, and turns a lost slot into [`Error::SlotLost`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::metrics::Gauge;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{report, Error};

fn slot_wal_query() -> String {
    format!(
        "SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::bigint, \
                wal_status, safe_wal_size, {INVALIDATION_REASON} \
         FROM pg_catalog.pg_replication_slots s \
         WHERE slot_name = $1 AND database = pg_catalog.current_database()"
    )
}

/// Warnings about retained WAL repeat at most this often while it stays above the threshold.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// `pg_replication_slots.invalidation_reason` of the row `s`, as text, on every supported
/// major: PostgreSQL 17 added the column (15 and 16 have none: NULL), so it is read through
/// `to_jsonb` rather than by name.
pub const INVALIDATION_REASON: &str = "pg_catalog.to_jsonb(s) ->> 'invalidation_reason'";

/// How an invalidated slot (`wal_status = lost`) is described, from its
/// `invalidation_reason` (PostgreSQL 17 and later; `None` before). On a primary, 15 and 16
/// invalidate a slot only for `max_slot_wal_keep_size`; 18 also for
/// `idle_replication_slot_timeout`.
pub fn invalidated(reason: Option<&str>) -> String {
    let why = match reason {
        None | Some("wal_removed") => {
            "wal_status = lost: it retained more WAL than max_slot_wal_keep_size allows"
        }
        Some("idle_timeout") => {
            "invalidation_reason = idle_timeout: it was inactive for longer than \
             idle_replication_slot_timeout allows"
        }
        Some("rows_removed") => {
            "invalidation_reason = rows_removed: a standby's slot lost rows it needed to vacuum \
             on the primary"
        }
        Some("wal_level_insufficient") => {
            "invalidation_reason = wal_level_insufficient: wal_level on the primary is below \
             logical"
        }
        Some(other) => return format!("has been invalidated (invalidation_reason = {other})"),
    };
    format!("has been invalidated ({why})")
}

/// What the operator runs to recover from a lost slot without a gap, when the listener is not
/// to do it by itself (`replication.on_slot_lost = "stop"`).
pub const RECOVER_REMEDY: &str = "events committed since its last confirmed position are in no \
     slot. Run `listener slot recover`: it delivers them from domain_events.event by \
     snapshot-safe polling (none is skipped, a few may come twice) and creates a new slot; then \
     start the listener again. Or set replication.on_slot_lost = \"recover\" to do this \
     automatically";

/// The error for slot `slot`, lost as `how` says ([`invalidated`], `was dropped`, …).
pub fn slot_lost(slot: &str, how: impl Into<String>) -> Error {
    Error::SlotLost {
        name: slot.to_string(),
        how: how.into(),
        remedy: RECOVER_REMEDY.to_string(),
    }
}

/// Watches one slot's retained WAL over the session's SQL connection.
pub struct SlotWatch {
    /// The session's SQL connection.
    pub client: Arc<Client>,
    /// Slot name.
    pub slot: String,
    /// Warn above this many bytes; 0: never.
    pub warn_above: u64,
    /// Check period.
    pub every: Duration,
    /// `slot_retained_wal_bytes`.
    pub gauge: Gauge,
}

impl SlotWatch {
    /// Checks every `every` until `cancel` fires; returns a definite [`Error::SlotLost`] when the
    /// slot is lost. A failed query is logged and retried at the next tick: the stream notices
    /// a dead connection on its own.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_warning: Option<Instant> = None;
        let mut query_failed = false;
        let query = slot_wal_query();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let row = match self.client.query_opt(&query, &[&self.slot]).await {
                Ok(row) => {
                    query_failed = false;
                    row
                }
                Err(err) => {
                    if !query_failed && !cancel.is_cancelled() {
                        warn!(slot = %self.slot, error = %report(&Error::sql("reading the slot's retained WAL")(err)), "cannot check the slot's retained WAL");
                    }
                    query_failed = true;
                    continue;
                }
            };
            let Some(row) = row else {
                // Dropped under us: the stream fails with a clear error of its own.
                continue;
            };
            let retained: Option<i64> = row.get(0);
            let wal_status: Option<String> = row.get(1);
            let safe_wal_size: Option<i64> = row.get(2);
            if wal_status.as_deref() == Some("lost") {
                let reason: Option<String> = row.get(3);
                return Err(slot_lost(&self.slot, invalidated(reason.as_deref())));
            }
            let retained = retained.unwrap_or(0).max(0) as u64;
            self.gauge.set(retained as f64);
            debug!(slot = %self.slot, retained_bytes = retained, wal_status = ?wal_status, "slot retained WAL");
            if self.warn_above > 0
                && retained > self.warn_above
                && last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY)
            {
                last_warning = Some(Instant::now());
                warn!(
                    slot = %self.slot,
                    retained_bytes = retained,
                    threshold_bytes = self.warn_above,
                    wal_status = wal_status.as_deref().unwrap_or("unknown"),
                    safe_wal_size = ?safe_wal_size,
                    "the replication slot retains more WAL than replication.slot_wal_warning_bytes; \
                     if max_slot_wal_keep_size is set, the slot is invalidated once it retains more \
                     than that (safe_wal_size bytes remain), otherwise the server's disk fills up"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::invalidated;

    #[test]
    fn an_invalidated_slot_is_described_by_its_reason() {
        // 15 and 16 have no invalidation_reason: the one cause on a primary is the WAL limit.
        assert!(invalidated(None).contains("max_slot_wal_keep_size"));
        assert_eq!(invalidated(None), invalidated(Some("wal_removed")));
        assert!(invalidated(Some("idle_timeout")).contains("idle_replication_slot_timeout"));
        assert!(invalidated(Some("something_new")).contains("something_new"));
    }
}
