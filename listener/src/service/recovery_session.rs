//! Recovery from a lost slot (`listener slot recover`, or automatic): the catch-up session that
//! delivers from the event table while a new slot is created (see
//! [`crate::replication::recovery`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::delivery::dispatch::Ack;
use crate::error::Error;
use crate::ops::admin::Phase;
use crate::replication::stream::SlotState;
use crate::replication::subscription::{self, SubscriptionStore};
use crate::service::listener::Listener;
use crate::service::session::{outcome, SessionTokens};

impl Listener {
    /// `listener slot recover`: recovers from the loss of the configured slot (see
    /// [`crate::replication::recovery`]) and returns once the subscription can stream from a new slot.
    /// Refuses (with [`Error::Slot`]) when the slot is not lost and no recovery is pending.
    pub async fn recover_slot(&self, cancel: &CancellationToken) -> Result<(), Error> {
        let r = &self.config.replication;
        let db = &self.config.database;
        let (client, sql_task) = subscription::connect(db).await?;
        let schema = crate::replication::publication::check_extension(&client, &db.dbname).await?;
        let wal_status: Option<String> = client
            .query_opt(
                "SELECT wal_status FROM pg_catalog.pg_replication_slots \
                  WHERE slot_name = $1 AND database = pg_catalog.current_database()",
                &[&r.slot],
            )
            .await
            .map_err(Error::sql("looking up the slot"))?
            .and_then(|row| row.get(0));
        let durable = SubscriptionStore::new(Arc::new(client), r.subscription_name(), schema)
            .load()
            .await;
        let _ = sql_task.await;
        let durable = durable?;
        // Lost: invalidated, or gone while the row says events were delivered through it.
        let lost = match wal_status.as_deref() {
            Some(status) => status == "lost",
            None => durable.lsn.is_some(),
        };
        if !lost && !durable.recovering {
            return Err(Error::Slot {
                name: r.slot.clone(),
                problem: "is not lost and no recovery is pending: nothing to recover".into(),
            });
        }
        // A one-shot command: a signal stops it at the next batch, no draining.
        self.recover_lost_slot(&SessionTokens::child_of(cancel, cancel))
            .await
    }

    /// Delivers what a lost slot missed by snapshot transitions from the subscription's
    /// delivered snapshot, creates a new slot meanwhile, and switches the row to it (see
    /// [`crate::replication::recovery`]). Returns `Ok` when done or cancelled (the row then says where to
    /// resume).
    pub(super) async fn recover_lost_slot(&self, tokens: &SessionTokens) -> Result<(), Error> {
        use crate::replication::notify::{snapshot_xmin, NotifyStore, Poller};
        use crate::replication::recovery::{Begun, RecoveryStore};

        let db = &self.config.database;
        let r = &self.config.replication;
        let (client, sql_task) = subscription::connect(db).await?;
        let schema = crate::replication::publication::check_extension(&client, &db.dbname).await?;
        if !schema.lost_slot_recovery {
            return Err(Error::SlotLost {
                name: r.slot.clone(),
                how: "is lost".into(),
                remedy: "this database's pg_domain_events schema predates 0.2.0 and keeps no \
                         delivered snapshot to recover from: run ALTER EXTENSION \
                         pg_domain_events UPDATE, `listener slot drop`, and `listener replay` \
                         for the events committed since the slot's last confirmed position"
                    .into(),
            });
        }
        let client = Arc::new(client);
        let recovery = RecoveryStore::new(Arc::clone(&client), r.subscription_name());
        let (base, mut state, new_slot) = match recovery.begin().await? {
            Begun::NothingDelivered => {
                recovery.drop_slot(&r.slot).await?;
                recovery.abandon().await?;
                info!(slot = %r.slot, "the lost slot had delivered nothing: starting with a new slot");
                return Ok(());
            }
            Begun::NoBoundary { lsn } => {
                recovery.abandon().await?;
                return Err(Error::SlotLost {
                    name: r.slot.clone(),
                    how: "is lost".into(),
                    remedy: format!(
                        "subscription {:?} was last saved by a listener older than 0.2.0 and \
                         has no delivered snapshot, so the events the slot missed cannot be \
                         told apart: run `listener slot drop`, start the listener, and \
                         `listener replay` the events committed around and after LSN {lsn}",
                        r.subscription_name()
                    ),
                });
            }
            Begun::CatchingUp {
                base,
                state,
                new_slot,
            } => (base, state, new_slot),
        };
        self.health.set(Phase::Recovering);
        self.metrics.slot_recoveries.increment(1);
        info!(
            slot = %r.slot,
            subscription = %r.subscription_name(),
            from = %state.prev,
            "recovering from the lost slot: delivering from the event table by snapshot transitions"
        );
        let mut store = NotifyStore::for_recovery(Arc::clone(&client), r.subscription_name());
        let mut stream_from = None;
        let mut creation = None;
        match new_slot {
            Some((at, xid)) => {
                store.stream_from_xid(xid);
                stream_from = Some((at, xid));
            }
            None => {
                // Lost, or half made by an interrupted recovery: the new one starts from now.
                recovery.drop_slot(&r.slot).await?;
                let mut conn = self.replication_connection().await?;
                let slot = r.slot.clone();
                creation = Some(tokio::spawn(async move {
                    let created = conn.create_slot(&slot).await;
                    (conn, created)
                }));
            }
        }

        let session_cancel = tokens.stop.clone();
        let (items_tx, acks_rx, dispatch) =
            self.start_delivery(Arc::clone(&client), Ack::default(), tokens);
        let mut poller = Poller {
            store,
            notifications: None,
            items: items_tx,
            acks: acks_rx,
            poll_interval: Duration::from_millis(r.poll_interval_ms),
            batch_size: r.poll_batch_size,
            lsn_base: base.0,
        };
        let caught_up: Result<bool, Error> = async {
            let mut seq = 0u64;
            let mut delivered = 0u64;
            loop {
                if session_cancel.is_cancelled() {
                    return Ok(false);
                }
                if creation.as_ref().is_some_and(|task: &JoinHandle<_>| task.is_finished()) {
                    let (conn, created) = creation.take().expect("checked").await.map_err(|e| {
                        Error::Task {
                            task: "slot creation",
                            reason: e.to_string(),
                        }
                    })?;
                    drop(conn);
                    let at = match created? {
                        SlotState::Created(at) => at,
                        SlotState::CreatedConcurrently => {
                            return Err(Error::Slot {
                                name: r.slot.clone(),
                                problem: "was created by another listener while this one \
                                          recovered from its loss; run one listener per \
                                          subscription"
                                    .into(),
                            })
                        }
                    };
                    let xid = recovery.new_slot(at).await?;
                    poller.store.stream_from_xid(xid);
                    stream_from = Some((at, xid));
                    info!(slot = %r.slot, lsn = %at, first_xid = xid, "created the new slot; catching up to it");
                }
                let Some(n) = poller.transition(&mut state, &mut seq, &session_cancel).await? else {
                    return Ok(false);
                };
                delivered += n;
                if let Some((at, xid)) = stream_from {
                    if snapshot_xmin(&state.prev).is_some_and(|xmin| xmin >= xid) {
                        info!(
                            slot = %r.slot,
                            events = delivered,
                            lsn = %at,
                            "caught up from the event table; streaming from the new slot"
                        );
                        return Ok(true);
                    }
                }
                if n == 0 {
                    poller.wait(&session_cancel).await?;
                }
            }
        }
        .await;
        // Its item sender closes the dispatcher's queue: the dispatcher ends once it is gone.
        drop(poller);
        if let Some(task) = creation {
            // Dropping the connection abandons the creation: the server removes the slot.
            task.abort();
        }
        let dispatched = dispatch.finish(tokens, &caught_up).await;
        let finished = if outcome(dispatched, caught_up)? {
            recovery.finish().await
        } else {
            Ok(())
        };
        drop(recovery);
        drop(client);
        let _ = sql_task.await;
        finished
    }
}
