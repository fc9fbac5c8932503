//! A notify-mode session: `LISTEN` wake-ups and polling by snapshot transitions.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::delivery::dispatch::Ack;
use crate::error::Error;
use crate::ops::admin::Phase;
use crate::replication::subscription::{self};
use crate::service::listener::Listener;
use crate::service::session::{outcome, SessionTokens};

impl Listener {
    /// A notify-mode session: one SQL connection that listens for wake-ups, polls the event table
    /// by snapshot transitions (see [`crate::replication::notify`]) and saves the position after each batch.
    pub(super) async fn notify_session(
        &self,
        tokens: &SessionTokens,
        streamed: &mut bool,
    ) -> Result<(), Error> {
        let db = &self.config.database;
        let r = &self.config.replication;
        let (client, sql_task, notifications) = subscription::connect_listening(db).await?;
        crate::replication::publication::check_extension(&client, &db.dbname).await?;
        client
            .batch_execute(&format!("LISTEN {}", crate::replication::notify::CHANNEL))
            .await
            .map_err(Error::sql("listening for notifications"))?;
        let client = Arc::new(client);
        let delivery_sql = Arc::clone(&client);
        let store = crate::replication::notify::NotifyStore::new(client, r.subscription_name());
        let state = store.load_or_start().await?;
        *streamed = true;
        self.health.set(Phase::Streaming);
        info!(
            subscription = %r.subscription_name(),
            transition = state.transition,
            position = state.position,
            poll_interval_ms = r.poll_interval_ms,
            "polling (notify mode)"
        );

        // Without wake-ups every event waits for the next poll: a silent default that looks
        // like a slow listener. Say so once, with the way out.
        if !crate::replication::notify::writers_notify(&delivery_sql).await? {
            warn!(
                setting = "domain_events.notify",
                poll_interval_ms = r.poll_interval_ms,
                "domain_events.notify is off: writers do not wake this listener, so events are \
                 delivered by polling, up to poll_interval_ms after their commit; to deliver \
                 them at commit, turn it on for the writers (as a superuser: {})",
                crate::replication::notify::notify_on_statement(&db.dbname)
            );
        }
        let (items_tx, acks_rx, dispatch) =
            self.start_delivery(delivery_sql, Ack::default(), tokens);
        let poller = crate::replication::notify::Poller {
            store,
            notifications: Some(notifications),
            items: items_tx,
            acks: acks_rx,
            poll_interval: Duration::from_millis(r.poll_interval_ms),
            batch_size: r.poll_batch_size,
            lsn_base: 0,
        };
        let polled = poller.run(state, tokens.stop.clone()).await;
        let dispatched = dispatch.finish(tokens, &polled).await;
        let _ = sql_task.await;
        outcome(dispatched, polled)
    }
}
