//! Recovery from a lost slot, without a gap.
//!
//! When the slot is invalidated (`wal_status = lost`) or dropped, the WAL it would have
//! decoded is gone, but the events are not: they are rows of `domain_events.event`. Positions
//! are taken at insert, not at commit, so "events after the last position" would skip a
//! transaction that took a lower position and committed later. Recovery therefore works with
//! snapshots, as notify mode does ([`crate::replication::notify`]):
//!
//! 1. **The boundary.** While streaming, the subscription row keeps a *delivered snapshot*:
//!    every transaction visible in it has been handled and confirmed
//!    ([`crate::replication::subscription::SubscriptionStore::save`]). Everything the lost slot may not have
//!    delivered is invisible in it.
//! 2. **Catch-up.** The listener marks the row as recovering, drops what is left of the slot,
//!    and delivers *snapshot transitions* starting at the boundary: the events visible in a new
//!    snapshot and not in the previous one, committed transaction by committed transaction,
//!    with the row saved after every batch (a crash resumes where it was).
//! 3. **A new slot**, created meanwhile (creation waits for the transactions running at that
//!    moment). Every transaction committing after its consistent point `C` is streamed by it.
//!    Right after the creation the listener reads `x = pg_snapshot_xmax(pg_current_snapshot())`:
//!    a transaction with an id from `x` on took it after the slot existed, so it commits after
//!    `C` and is the new slot's; transitions read only ids below `x`.
//! 4. **The switch.** Once a transition's snapshot has `xmin >= x`, every transaction below
//!    `x` has ended, and those that committed were delivered. The row gets `lsn = C`, the last
//!    snapshot becomes the delivered snapshot, and the next session streams from `C`.
//!
//! The two overlap: a transaction below `x` that committed after `C` is delivered twice (by
//! a transition and by the stream), recognisable by event id. None is delivered by neither.
//! Events of the catch-up carry `commit_lsn = <last confirmed LSN> + <transition>`, ordered
//! after everything the lost slot delivered and before the new slot's transactions.

use std::sync::Arc;

use tokio_postgres::Client;
use tracing::info;

use crate::error::Error;
use crate::lsn::Lsn;
use crate::replication::notify::State;
use crate::replication::subscription::parse_row_lsn;

const BEGIN: &str = "UPDATE domain_events.subscription \
        SET recovery_started_at = COALESCE(recovery_started_at, now()), updated_at = now() \
      WHERE name = $1 AND mode = 'replication' \
  RETURNING lsn::text, delivered_snapshot::text, recovery_lsn::text, recovery_until::text, \
            snapshot_prev::text, snapshot_cur::text, position, transition";

const START_CATCH_UP: &str = "UPDATE domain_events.subscription \
        SET snapshot_prev = delivered_snapshot, snapshot_cur = NULL, position = 0, \
            transition = 1, updated_at = now() \
      WHERE name = $1 AND mode = 'replication' AND recovery_started_at IS NOT NULL";

const NEW_SLOT: &str = "UPDATE domain_events.subscription \
        SET recovery_lsn = $2::text::pg_lsn, \
            recovery_until = pg_snapshot_xmax(pg_current_snapshot()), updated_at = now() \
      WHERE name = $1 AND mode = 'replication' AND recovery_started_at IS NOT NULL \
  RETURNING recovery_until::text";

const FINISH: &str = "UPDATE domain_events.subscription \
        SET lsn = recovery_lsn, delivered_snapshot = snapshot_prev, \
            pending_snapshot = NULL, pending_lsn = NULL, \
            position = GREATEST(position, \
                COALESCE((SELECT max(e.position) FROM domain_events.event e), 0)), \
            recovery_started_at = NULL, recovery_lsn = NULL, recovery_until = NULL, \
            snapshot_prev = NULL, snapshot_cur = NULL, transition = 0, updated_at = now() \
      WHERE name = $1 AND mode = 'replication' AND recovery_started_at IS NOT NULL \
        AND recovery_lsn IS NOT NULL";

const ABANDON: &str = "UPDATE domain_events.subscription \
        SET recovery_started_at = NULL, recovery_lsn = NULL, recovery_until = NULL, \
            updated_at = now() \
      WHERE name = $1 AND mode = 'replication'";

/// Where a recovery stands, as [`RecoveryStore::begin`] found the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// The subscription has no row, or one without a delivered snapshot and without a
    /// confirmed position: it never delivered anything, so there is nothing to recover; a new
    /// slot is all it needs.
    NothingDelivered,
    /// The row has a confirmed position but no delivered snapshot (it was written by a listener
    /// older than 0.2.0): the events the slot missed cannot be told apart from the others.
    NoBoundary {
        /// The last confirmed LSN.
        lsn: Lsn,
    },
    /// Catching up (a new one, or one resumed after a restart).
    CatchingUp {
        /// The lost slot's last confirmed LSN (0/0 if none).
        base: Lsn,
        /// The transitions' progress.
        state: State,
        /// The new slot's consistent point and first transaction id of its own, once created.
        new_slot: Option<(Lsn, u64)>,
    },
}

/// The recovery's statements on the subscription row of replication-mode subscription `name`.
pub struct RecoveryStore {
    client: Arc<Client>,
    name: String,
}

impl RecoveryStore {
    /// A store for subscription `name` over `client`.
    pub fn new(client: Arc<Client>, name: impl Into<String>) -> RecoveryStore {
        RecoveryStore {
            client,
            name: name.into(),
        }
    }

    /// Marks the row as recovering (or finds it already is) and says where the recovery stands.
    pub async fn begin(&self) -> Result<Begun, Error> {
        let Some(row) = self
            .client
            .query_opt(BEGIN, &[&self.name])
            .await
            .map_err(Error::sql("starting the recovery of the subscription"))?
        else {
            return Ok(Begun::NothingDelivered);
        };
        let lsn = parse_row_lsn(row.get(0))?;
        let delivered: Option<String> = row.get(1);
        let recovery_lsn = parse_row_lsn(row.get(2))?;
        let until: Option<String> = row.get(3);
        let prev: Option<String> = row.get(4);
        let Some(delivered) = delivered else {
            return Ok(match lsn {
                None => Begun::NothingDelivered,
                Some(lsn) => Begun::NoBoundary { lsn },
            });
        };
        let new_slot = match (recovery_lsn, until) {
            (Some(at), Some(until)) => Some((
                at,
                until.parse().map_err(|_| {
                    Error::Protocol(format!("subscription row holds an invalid xid {until:?}"))
                })?,
            )),
            _ => None,
        };
        let state = match (new_slot, prev) {
            // Resumed with the new slot made: the catch-up's progress is in the row.
            (Some(_), Some(prev)) => State {
                prev,
                cur: row.get(5),
                position: row.get(6),
                transition: row.get::<_, i64>(7).max(1),
            },
            // New, or interrupted before its slot existed: (re)start from the boundary.
            // Transitions already delivered then come again: duplicates, never a gap.
            _ => {
                self.client
                    .execute(START_CATCH_UP, &[&self.name])
                    .await
                    .map_err(Error::sql("starting the catch-up"))?;
                State {
                    prev: delivered,
                    cur: None,
                    position: 0,
                    transition: 1,
                }
            }
        };
        Ok(Begun::CatchingUp {
            base: lsn.unwrap_or_default(),
            state,
            new_slot,
        })
    }

    /// Drops slot `slot` if it exists (lost, or half made by an interrupted recovery). Fails
    /// with SQLSTATE 55006 (transient) while a walsender still holds it.
    pub async fn drop_slot(&self, slot: &str) -> Result<bool, Error> {
        let dropped = !self
            .client
            .query(crate::ops::operations::DROP_SLOT, &[&slot])
            .await
            .map_err(Error::sql("dropping the lost replication slot"))?
            .is_empty();
        if dropped {
            info!(slot, "dropped the lost replication slot");
        }
        Ok(dropped)
    }

    /// Records the new slot's consistent point and returns the first transaction id it is
    /// sure to deliver (read now, after the slot exists).
    pub async fn new_slot(&self, consistent_point: Lsn) -> Result<u64, Error> {
        let row = self
            .client
            .query_one(NEW_SLOT, &[&self.name, &consistent_point.to_string()])
            .await
            .map_err(Error::sql("recording the new slot"))?;
        let until: String = row.get(0);
        until
            .parse()
            .map_err(|_| Error::Protocol(format!("pg_snapshot_xmax returned {until:?}")))
    }

    /// Clears the recovery mark without streaming from a new slot: for a subscription that
    /// had nothing to recover, or cannot be recovered from (see [`Begun`]).
    pub async fn abandon(&self) -> Result<(), Error> {
        self.client
            .execute(ABANDON, &[&self.name])
            .await
            .map_err(Error::sql("clearing the recovery mark"))?;
        Ok(())
    }

    /// Ends the recovery: the row streams from the new slot's consistent point.
    pub async fn finish(&self) -> Result<(), Error> {
        self.client
            .execute(FINISH, &[&self.name])
            .await
            .map_err(Error::sql("finishing the recovery"))?;
        Ok(())
    }
}
