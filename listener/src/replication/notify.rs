//! Notify mode: follows committed events without a replication slot, by `LISTEN domain_events`
//! wake-ups plus polling, for roles without the `REPLICATION` attribute (managed Postgres).
//!
//! # Snapshot transitions
//!
//! Positions are assigned at `INSERT`, not at commit, so "`position > last`" skips events of a
//! transaction that took a position and committed after a later one. Instead the poller delivers
//! *snapshot transitions*: the rows visible in snapshot `cur` but not in the earlier snapshot
//! `prev`. Once both snapshots are taken that set is final (a transaction in progress in `cur` is
//! in no later row set of this transition, and it becomes visible in a later one), and every
//! committed row becomes visible in exactly one transition. A rolled-back transaction is never
//! visible, so its rows are never delivered.
//!
//! Within one transition rows are read in position order, which is per-aggregate version order:
//! writers of one aggregate are serialised by its stream head's row lock and take their positions
//! under it, and a later writer cannot become visible in an earlier transition than the one it
//! waited for.
//!
//! # Durable state
//!
//! The subscription row (`mode = 'notify'`) holds `snapshot_prev`, `snapshot_cur` (the transition
//! being delivered, NULL between transitions), `position` (the last position of that transition
//! handled) and `transition`, a number that grows with every delivered transition. `snapshot_cur`
//! is saved before the first event of its transition is handed out, so that a restart delivers
//! the same transition again (and no row that became visible later); events carry
//! `commit_lsn = 0/transition`, so `(commit_lsn, position)` orders the delivery as in replication
//! mode, and the exactly-once bookkeeping of `sql` handlers works unchanged.
//!
//! A poll batch (at most `poll_batch_size` events) is the acknowledgement unit: it is handed to
//! the dispatcher followed by a commit marker, and its last position is saved once the dispatcher
//! acknowledged it. A crash redelivers at most the batch that was not saved.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, Notification, Row};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use uuid::Uuid;

use crate::delivery::dead_letter::{event_from_row, EVENT_COLUMNS};
use crate::delivery::dispatch::{Ack, Item, Undecodable};
use crate::error::Error;
use crate::lsn::Lsn;

/// The channel `domain_events.notify = on` notifies at the commit of a transaction that raised
/// events.
pub const CHANNEL: &str = "domain_events";

/// Whether writers wake notify-mode listeners (a SQL expression, `true` or `false`):
/// `domain_events.notify` as this session sees it (the server's, the database's and this
/// role's settings), or turned on for any role in this database (`ALTER ROLE … [IN DATABASE …]
/// SET`). A writer that turns it on with `SET` in its own session is not seen: the listener then
/// warns although it is woken.
pub(crate) const WRITERS_NOTIFY: &str = "(coalesce(pg_catalog.lower(\
     pg_catalog.current_setting('domain_events.notify', true)) IN ('on', 'true', 'yes', '1'), false) \
     OR EXISTS (SELECT 1 FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c \
       WHERE s.setdatabase IN (0, (SELECT d.oid FROM pg_catalog.pg_database d \
                                   WHERE d.datname = pg_catalog.current_database())) \
         AND pg_catalog.lower(pg_catalog.replace(c, ' ', '')) IN ('domain_events.notify=on', \
             'domain_events.notify=true', 'domain_events.notify=yes', 'domain_events.notify=1')))";

/// Whether writers' transactions wake this listener ([`WRITERS_NOTIFY`]).
pub async fn writers_notify(client: &Client) -> Result<bool, Error> {
    let row = client
        .query_one(&format!("SELECT {WRITERS_NOTIFY}"), &[])
        .await
        .map_err(Error::sql("reading domain_events.notify"))?;
    Ok(row.get(0))
}

/// The statement that turns wake-ups on for every session of database `dbname` (the name
/// quoted only when it needs to be, so that it reads as typed).
pub fn notify_on_statement(dbname: &str) -> String {
    let plain = dbname
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && dbname
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let name = if plain {
        dbname.to_string()
    } else {
        postgres_protocol::escape::escape_identifier(dbname)
    };
    format!("ALTER DATABASE {name} SET domain_events.notify = on")
}

/// Where a notify-mode subscription is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Every row visible in this snapshot has been delivered (`pg_snapshot` text).
    pub prev: String,
    /// The snapshot of the transition being delivered, if one is.
    pub cur: Option<String>,
    /// Last position handled within the transition (0 at its start).
    pub position: i64,
    /// Number of the transition being (or next to be) delivered; at least 1.
    pub transition: i64,
}

/// Reads and writes a notify-mode subscription row and the events of its transitions.
///
/// A recovery from a lost slot ([`crate::replication::recovery`]) delivers by the same transitions, in the
/// row of a replication-mode subscription: [`NotifyStore::for_recovery`].
pub struct NotifyStore {
    client: Arc<Client>,
    name: String,
    /// The row's mode: `notify`, or `replication` for a recovery.
    mode: &'static str,
    /// Recovery, once the new slot exists: the first transaction id (an `xid8`) it is sure to
    /// deliver, which transitions need not read.
    below_xid: Option<String>,
}

impl NotifyStore {
    /// A store for subscription `name` over `client`.
    pub fn new(client: Arc<Client>, name: impl Into<String>) -> NotifyStore {
        NotifyStore {
            client,
            name: name.into(),
            mode: "notify",
            below_xid: None,
        }
    }

    /// A store for the recovery of replication-mode subscription `name`.
    pub fn for_recovery(client: Arc<Client>, name: impl Into<String>) -> NotifyStore {
        NotifyStore {
            client,
            name: name.into(),
            mode: "replication",
            below_xid: None,
        }
    }

    /// Recovery: transactions from `xid` on (an `xid8`) are left to the new slot.
    pub fn stream_from_xid(&mut self, xid: u64) {
        self.below_xid = Some(xid.to_string());
    }

    /// Loads the row, creating it at the current snapshot when it does not exist (a new
    /// subscription starts from now: events committed before are not delivered).
    pub async fn load_or_start(&self) -> Result<State, Error> {
        let created = self
            .client
            .execute(
                "INSERT INTO domain_events.subscription \
                    (name, mode, position, snapshot_prev, transition) \
                 VALUES ($1, 'notify', 0, pg_current_snapshot(), 1) \
                 ON CONFLICT (name) DO NOTHING",
                &[&self.name],
            )
            .await
            .map_err(Error::sql("creating the subscription row"))?;
        if created == 1 {
            info!(subscription = %self.name, "new notify-mode subscription: delivering events committed from now on");
        }
        let row = self
            .client
            .query_one(
                "SELECT mode, snapshot_prev::text, snapshot_cur::text, position, transition \
                 FROM domain_events.subscription WHERE name = $1",
                &[&self.name],
            )
            .await
            .map_err(Error::sql("reading the subscription row"))?;
        let mode: String = row.get(0);
        let prev: Option<String> = row.get(1);
        match (mode.as_str(), prev) {
            ("notify", Some(prev)) => Ok(State {
                prev,
                cur: row.get(2),
                position: row.get(3),
                transition: row.get::<_, i64>(4).max(1),
            }),
            _ => Err(Error::Subscription {
                name: self.name.clone(),
                problem: format!(
                    "the row belongs to a {mode}-mode subscription; choose another \
                     replication.subscription name for notify mode"
                ),
            }),
        }
    }

    /// Saves `state`.
    pub async fn save(&self, state: &State) -> Result<(), Error> {
        self.client
            .execute(
                "UPDATE domain_events.subscription SET \
                    snapshot_prev = $2::text::pg_snapshot, \
                    snapshot_cur = $3::text::pg_snapshot, \
                    position = $4, transition = $5, updated_at = now() \
                 WHERE name = $1 AND mode = $6",
                &[
                    &self.name,
                    &state.prev,
                    &state.cur,
                    &state.position,
                    &state.transition,
                    &self.mode,
                ],
            )
            .await
            .map_err(Error::sql("saving the subscription position"))?;
        Ok(())
    }

    /// `pg_current_snapshot()`, taken in a statement of its own.
    pub async fn current_snapshot(&self) -> Result<String, Error> {
        let row = self
            .client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(Error::sql("taking a snapshot"))?;
        Ok(row.get(0))
    }

    /// The next `limit` rows of the transition `state.prev → cur` after `state.position`, in
    /// position order.
    pub async fn page(&self, state: &State, cur: &str, limit: i64) -> Result<Vec<Row>, Error> {
        let sql = format!(
            "{EVENT_COLUMNS} \
             WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot) \
               AND txid < pg_snapshot_xmax($2::text::pg_snapshot) \
               AND pg_visible_in_snapshot(txid, $2::text::pg_snapshot) \
               AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot) \
               AND position > $3 \
               AND ($5::text IS NULL OR txid < $5::text::xid8) \
             ORDER BY position LIMIT $4"
        );
        self.client
            .query(
                &sql,
                &[&state.prev, &cur, &state.position, &limit, &self.below_xid],
            )
            .await
            .map_err(Error::sql("reading events"))
    }
}

/// Turns a row into what the dispatcher takes; events carry `commit_lsn = transition` (`0/n`
/// in notify mode).
fn item(row: &Row, transition: Lsn) -> Item {
    match event_from_row(row) {
        Ok(mut event) => {
            event.commit_lsn = transition;
            Item::Event(Box::new(event))
        }
        Err(error) => {
            let position: i64 = row.try_get(0).unwrap_or(0);
            let event_id = row.try_get::<_, Uuid>(1).unwrap_or_else(|_| {
                Uuid::from_u64_pair(transition.0, u64::try_from(position).unwrap_or(0))
            });
            Item::Undecodable(Box::new(Undecodable {
                event_id,
                position,
                commit_lsn: transition,
                error,
            }))
        }
    }
}

/// The poll loop: delivers transitions to the dispatcher until `cancel` fires, the dispatcher
/// stops (its error is reported by the caller) or a statement fails.
pub struct Poller {
    /// The subscription row and the event reads.
    pub store: NotifyStore,
    /// Wake-ups (`LISTEN domain_events` on the store's connection); `None`: poll only.
    pub notifications: Option<mpsc::UnboundedReceiver<Notification>>,
    /// Where events go.
    pub items: mpsc::Sender<Item>,
    /// What the dispatcher finished.
    pub acks: watch::Receiver<Ack>,
    /// Longest wait between polls.
    pub poll_interval: Duration,
    /// Events per batch.
    pub batch_size: i64,
    /// Added to the transition number to make the events' `commit_lsn`: 0 in notify mode; in
    /// a recovery, the lost slot's last confirmed LSN, so that the events order after what the
    /// stream delivered (a `sql` handler skips what orders before its position).
    pub lsn_base: u64,
}

impl Poller {
    /// Runs the loop from `state`.
    pub async fn run(mut self, mut state: State, cancel: CancellationToken) -> Result<(), Error> {
        // Batches handed out in this session; the dispatcher acknowledges them as `0/seq`.
        let mut seq: u64 = 0;
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            match self.transition(&mut state, &mut seq, &cancel).await? {
                Some(0) => {}
                // Something arrived: look again at once, more may have committed meanwhile.
                Some(_) => continue,
                // Shutdown, or the dispatcher went away.
                None => return Ok(()),
            }
            self.wait(&cancel).await?;
        }
    }

    /// Waits for a notification or the poll interval, whichever comes first (returns at once
    /// when cancelled).
    pub async fn wait(&mut self, cancel: &CancellationToken) -> Result<(), Error> {
        let Some(notifications) = self.notifications.as_mut() else {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
            return Ok(());
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(self.poll_interval) => {}
            notification = notifications.recv() => {
                if notification.is_none() {
                    return Err(Error::ConnectionLost(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the SQL connection closed",
                    )));
                }
                // One poll answers every wake-up received so far.
                while notifications.try_recv().is_ok() {}
            }
        }
        Ok(())
    }

    /// Delivers one transition (taking a new snapshot unless one is in progress); returns how
    /// many events it held, or `None` when it stopped early (shutdown, or the dispatcher is
    /// gone).
    pub async fn transition(
        &mut self,
        state: &mut State,
        seq: &mut u64,
        cancel: &CancellationToken,
    ) -> Result<Option<u64>, Error> {
        let (cur, mut cur_saved) = match &state.cur {
            Some(cur) => (cur.clone(), true),
            None => (self.store.current_snapshot().await?, false),
        };
        let mut delivered = 0u64;
        loop {
            let rows = self.store.page(state, &cur, self.batch_size).await?;
            let Some(last) = rows.last() else {
                break;
            };
            let last: i64 = last.get(0);
            if !cur_saved {
                // Before any event of it is handed out: a restart must resume this transition.
                state.cur = Some(cur.clone());
                self.store.save(state).await?;
                cur_saved = true;
            }
            let transition = Lsn(self.lsn_base + u64::try_from(state.transition).unwrap_or(1));
            let full = rows.len() as i64 >= self.batch_size;
            let count = rows.len() as u64;
            for row in &rows {
                if self.items.send(item(row, transition)).await.is_err() {
                    return Ok(None);
                }
            }
            *seq += 1;
            if self
                .items
                .send(Item::Commit { end_lsn: Lsn(*seq) })
                .await
                .is_err()
            {
                return Ok(None);
            }
            // The dispatcher stops at a batch boundary on shutdown, so this returns either way.
            let target = Lsn(*seq);
            if self.acks.wait_for(|ack| ack.lsn >= target).await.is_err() {
                return Ok(None);
            }
            delivered += count;
            state.position = last;
            debug!(
                transition = state.transition,
                events = count,
                position = last,
                "poll batch handled"
            );
            if !full {
                break;
            }
            self.store.save(state).await?;
            if cancel.is_cancelled() {
                return Ok(None);
            }
        }
        // The transition is exhausted: every row visible in `cur` has been delivered.
        state.prev = cur;
        state.cur = None;
        state.position = 0;
        if cur_saved {
            // Its number was saved with it (and events may have been handled under it before a
            // restart): the next transition needs a greater one.
            state.transition += 1;
        }
        self.store.save(state).await?;
        Ok(Some(delivered))
    }
}

/// The `xmin` of a `pg_snapshot` in its text form (`xmin:xmax:xip,…`): every transaction
/// before it has ended.
pub fn snapshot_xmin(snapshot: &str) -> Option<u64> {
    snapshot.split(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{notify_on_statement, snapshot_xmin};

    #[test]
    fn the_statement_that_turns_notify_on_quotes_only_odd_names() {
        assert_eq!(
            notify_on_statement("app_1"),
            "ALTER DATABASE app_1 SET domain_events.notify = on"
        );
        assert_eq!(
            notify_on_statement("My App"),
            "ALTER DATABASE \"My App\" SET domain_events.notify = on"
        );
        assert_eq!(
            notify_on_statement("1st"),
            "ALTER DATABASE \"1st\" SET domain_events.notify = on"
        );
    }

    #[test]
    fn snapshot_xmin_reads_the_first_field() {
        assert_eq!(snapshot_xmin("745:750:745,748"), Some(745));
        assert_eq!(snapshot_xmin("12:12:"), Some(12));
        assert_eq!(snapshot_xmin("garbage"), None);
    }
}
