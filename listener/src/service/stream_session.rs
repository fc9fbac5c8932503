//! A replication-mode session: stand by while another listener holds the slot, start
//! replication, run the stream loop, the dispatcher, the slot watch and the checkpointer, and
//! confirm what was handled.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::delivery::dispatch::Ack;
use crate::error::{report, Error};
use crate::lsn::Lsn;
use crate::ops::admin::Phase;
use crate::replication::apply::StreamState;
use crate::replication::stream::SlotState;
use crate::replication::subscription::{self, SubscriptionStore};
use crate::service::listener::Listener;
use crate::service::session::{outcome, SessionTokens};

impl Listener {
    pub(super) async fn session(
        &self,
        tokens: &SessionTokens,
        streamed: &mut bool,
    ) -> Result<(), Error> {
        let db = &self.config.database;
        let r = &self.config.replication;

        // The replication connection comes first: its authentication errors are the clearest.
        let mut conn = self.replication_connection().await?;
        let (client, sql_task) = subscription::connect(db).await?;
        let schema = crate::replication::publication::check_extension(&client, &db.dbname).await?;
        crate::replication::publication::ensure_publication(
            &client,
            &r.publication,
            r.create_publication,
        )
        .await?;
        let client = Arc::new(client);
        let delivery_sql = Arc::clone(&client);
        let slot_watch = crate::replication::retention::SlotWatch {
            client: Arc::clone(&client),
            slot: r.slot.clone(),
            warn_above: r.slot_wal_warning_bytes,
            every: Duration::from_secs(r.status_interval_secs),
            gauge: self.metrics.slot_retained_wal.clone(),
        };
        // Stand by while another listener streams from the slot (before reading the row, which
        // the active listener keeps moving, and the slot's position).
        let standby_client = Arc::clone(&client);
        let store = SubscriptionStore::new(client, r.subscription_name(), schema);
        let free = crate::replication::standby::wait_for_slot(
            &standby_client,
            &r.slot,
            r.subscription_name(),
            &db.application_name,
            Duration::from_millis(r.standby_check_interval_ms),
            &self.health,
            &tokens.stop,
        )
        .await?;
        drop(standby_client);
        if !free {
            return Ok(());
        }
        let durable = store.load().await?;
        if durable.recovering {
            return Err(crate::replication::retention::slot_lost(
                &r.slot,
                "is being replaced: a recovery from its loss has not finished",
            ));
        }
        let durable = durable.lsn;
        let system = conn.identify_system().await?;
        debug!(system_id = %system.system_id, timeline = system.timeline, xlogpos = %system.xlogpos, "identified the server");
        let slot_error = |problem: String| Error::Slot {
            name: r.slot.clone(),
            problem,
        };
        let start = match conn.find_slot(&r.slot, &db.dbname).await? {
            Some(confirmed) => durable
                .unwrap_or_default()
                .max(confirmed.unwrap_or_default()),
            // Recreating it silently would skip every event committed since it disappeared.
            None if durable.is_some() => {
                return Err(crate::replication::retention::slot_lost(
                    &r.slot,
                    format!(
                        "was dropped, but subscription {:?} has delivered up to {} through it",
                        r.subscription_name(),
                        durable.unwrap_or_default()
                    ),
                ))
            }
            None if !r.create_slot => {
                return Err(slot_error(
                    "does not exist and replication.create_slot is false".into(),
                ))
            }
            None => {
                // The row first: its snapshot is the boundary should this slot be lost early.
                store.start_new().await?;
                match conn.create_slot(&r.slot).await? {
                    SlotState::Created(consistent_point) => consistent_point,
                    SlotState::CreatedConcurrently => {
                        match conn.find_slot(&r.slot, &db.dbname).await? {
                            Some(confirmed) => confirmed.unwrap_or_default(),
                            None => {
                                return Err(slot_error(
                                    "was created concurrently and dropped again".into(),
                                ))
                            }
                        }
                    }
                }
            }
        };
        conn.start_replication(&r.slot, &r.publication, start)
            .await?;
        *streamed = true;
        self.health.set(Phase::Streaming);
        info!(slot = %r.slot, publication = %r.publication, lsn = %start, "streaming");

        // The SQL connection closes once its last user is gone (awaited below).
        let first_ack = Ack {
            lsn: start,
            position: 0,
        };
        let (items_tx, acks_rx, dispatch) = self.start_delivery(delivery_sql, first_ack, tokens);
        let checkpointer = tokio::spawn(checkpoint(
            store,
            acks_rx.clone(),
            durable.unwrap_or_default(),
            Duration::from_millis(r.checkpoint_interval_ms),
            Duration::from_secs(r.heartbeat_interval_secs),
        ));

        // A lost slot stops the session with its own error (the walsender is usually killed at
        // the same moment, which alone would look like a transient connection loss).
        let watcher = tokio::spawn({
            let stop = tokens.stop.clone();
            let abort = tokens.abort.clone();
            async move {
                let result = slot_watch.run(stop.clone()).await;
                if result.is_err() {
                    stop.cancel();
                    abort.cancel();
                }
                result
            }
        });
        let mut stream = StreamState::new(
            start,
            Duration::from_secs(r.status_interval_secs),
            Duration::from_secs(r.server_timeout_secs),
        )
        .with_lag_gauge(self.metrics.replication_lag.clone());
        let streamed_result = stream
            .run(
                &mut conn,
                items_tx,
                acks_rx.clone(),
                &tokens.stop,
                &tokens.abort,
                r.ack_interval_ms,
            )
            .await;
        let dispatched = dispatch.finish(tokens, &streamed_result).await;
        let watched = watcher.await.unwrap_or_else(|e| {
            Err(Error::Task {
                task: "slot watch",
                reason: e.to_string(),
            })
        });
        let checkpointed = checkpointer.await;
        if let Err(e) = &checkpointed {
            warn!(error = %e, "the checkpoint task failed");
        }
        let _ = sql_task.await;

        let final_ack = acks_rx.borrow().lsn;
        if streamed_result.is_ok() {
            // Confirm what the dispatcher finished before we close, then end the copy cleanly.
            let confirm = stream.confirmable(final_ack);
            if let Err(err) = conn.send_status(confirm, false).await {
                warn!(error = %report(&err), "could not send the final status update");
            } else {
                info!(lsn = %confirm, "confirmed the last handled transaction");
            }
            conn.close(Duration::from_secs(5)).await;
        }
        // A lost slot explains a stream that was cancelled or cut.
        outcome(dispatched, watched.and(streamed_result))
    }
}

/// Periodically saves the dispatcher's progress into the subscription row and emits heartbeats;
/// after the dispatcher finished (its watch sender dropped), saves one last time.
async fn checkpoint(
    store: SubscriptionStore,
    mut acks: watch::Receiver<Ack>,
    mut saved: Lsn,
    every: Duration,
    heartbeat_every: Duration,
) {
    let mut save_tick = tokio::time::interval(every);
    save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeats = !heartbeat_every.is_zero();
    let mut heartbeat_tick = tokio::time::interval(heartbeat_every.max(Duration::from_millis(1)));
    heartbeat_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat_failed = false;
    loop {
        tokio::select! {
            changed = acks.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = save_tick.tick() => {
                let ack = *acks.borrow();
                if ack.lsn > saved {
                    match store.save(ack).await {
                        Ok(()) => saved = ack.lsn,
                        Err(err) => warn!(error = %report(&err), "could not save the subscription position"),
                    }
                }
            }
            _ = heartbeat_tick.tick(), if heartbeats => {
                match store.heartbeat().await {
                    Ok(()) => heartbeat_failed = false,
                    // Log the first failure of a streak only: a missing grant would flood the log.
                    Err(err) if !heartbeat_failed => {
                        heartbeat_failed = true;
                        warn!(error = %report(&err), "heartbeat failed (may the role execute pg_logical_emit_message?)");
                    }
                    Err(_) => {}
                }
            }
        }
    }
    let ack = *acks.borrow();
    if ack.lsn > saved {
        // Bounded: a shutdown must not hang on an unreachable server. The slot's confirmed
        // position (sent separately) and redelivery cover a position that was not saved.
        match tokio::time::timeout(Duration::from_secs(5), store.save(ack)).await {
            Ok(Ok(())) => debug!(lsn = %ack.lsn, "saved the final subscription position"),
            Ok(Err(err)) => {
                warn!(error = %report(&err), "could not save the final subscription position")
            }
            Err(_) => warn!("timed out saving the final subscription position"),
        }
    }
}
