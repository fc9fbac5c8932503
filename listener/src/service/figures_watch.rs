//! Reads what only the database knows (ops::database_figures) into the listener's metrics every
//! `status_interval_secs`, on a connection of its own (so that a busy or failing session does
//! not hold them back). Runs while the admin server does.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{report, Error};
use crate::ops::database_figures::DatabaseFigures;
use crate::ops::metrics::Metrics;
use crate::postgres::database::DatabaseConfig;
use crate::replication::subscription;

/// Reads the figures every `every` until `stop` fires. A failure (the server away, an extension
/// without the views) is logged once until a read succeeds again; the last figures stay.
pub(super) async fn run(
    db: DatabaseConfig,
    metrics: Arc<Metrics>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if client.is_none() {
            client = tokio::select! {
                _ = stop.cancelled() => return,
                connected = subscription::connect(&db) => match connected {
                    Ok((c, _task)) => Some(c),
                    Err(err) => {
                        if !failing {
                            warn!(error = %report(&err), "cannot connect to read the database figures");
                        }
                        failing = true;
                        continue;
                    }
                },
            };
        }
        let Some(c) = &client else { continue };
        match DatabaseFigures::read(c).await {
            Ok(figures) => {
                failing = false;
                debug!(pairs = figures.raised.len(), "read the database figures");
                metrics.set_database_figures(figures);
            }
            Err(err) => {
                if !failing && !stop.is_cancelled() {
                    let err = Error::sql(
                        "reading raise_stats, store_stats, the store size and subscription_lag",
                    )(err);
                    warn!(error = %report(&err), "cannot read the database figures");
                }
                failing = true;
                // Reconnect at the next tick: the connection may be the problem.
                client = None;
            }
        }
    }
}
