//! Hot standby: a second listener on a subscription whose slot another listener streams from.
//!
//! A slot streams to one walsender at a time. Instead of retrying `START_REPLICATION` with
//! warnings and a growing backoff, a listener that finds the slot active stands by: it says so
//! once (naming the server process that holds the slot), marks its SQL session so that
//! `listener status` can list it, checks every `replication.standby_check_interval_ms`, and
//! starts streaming as soon as the slot is free — when the active listener stopped or died
//! (the server releases the slot as soon as it sees the connection closed).

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::error::Error;
use crate::ops::admin::{Health, Phase};

/// The server process streaming from slot `$1` of this database, if any.
const SLOT_HOLDER: &str = "SELECT active_pid FROM pg_catalog.pg_replication_slots \
     WHERE slot_name = $1 AND database = pg_catalog.current_database() AND active";

/// Sets this session's `application_name` (visible to every role in `pg_stat_activity`).
const SET_APPLICATION_NAME: &str = "SELECT pg_catalog.set_config('application_name', $1, false)";

/// The `application_name` a standby of `subscription` shows in `pg_stat_activity` while it
/// waits (`application_name` holds at most 63 bytes; `listener status` truncates alike).
pub fn marker(subscription: &str) -> String {
    let mut name = format!("{STANDBY_PREFIX}{subscription}");
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

/// Prefix of [`marker`]; `operations::status` matches on it in SQL.
pub const STANDBY_PREFIX: &str = "pg_domain_events standby: ";

/// Waits while another process streams from `slot`. Returns `Ok(true)` once the slot is free
/// (or does not exist), `Ok(false)` when `cancel` fired first.
///
/// `client` is the session's SQL connection; while standing by its `application_name` is the
/// [`marker`] of `subscription`, and `application_name` again once the wait is over.
pub async fn wait_for_slot(
    client: &Client,
    slot: &str,
    subscription: &str,
    application_name: &str,
    every: Duration,
    health: &Health,
    cancel: &CancellationToken,
) -> Result<bool, Error> {
    let mut standing_by: Option<i32> = None;
    loop {
        let holder: Option<i32> = client
            .query_opt(SLOT_HOLDER, &[&slot])
            .await
            .map_err(Error::sql("looking up who streams from the slot"))?
            .and_then(|row| row.get(0));
        match holder {
            None => {
                if standing_by.is_some() {
                    mark(client, application_name).await?;
                    info!(slot = %slot, "the slot is free: taking over");
                }
                return Ok(true);
            }
            Some(pid) => {
                if standing_by.is_none() {
                    mark(client, &marker(subscription)).await?;
                }
                if standing_by != Some(pid) {
                    info!(
                        slot = %slot,
                        holder_pid = pid,
                        check_interval_ms = every.as_millis() as u64,
                        "standing by: another listener streams from the slot (server process \
                         holder_pid); taking over when it is free"
                    );
                    health.set(Phase::Standby { holder_pid: pid });
                    standing_by = Some(pid);
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(every) => {}
                }
            }
        }
    }
}

async fn mark(client: &Client, application_name: &str) -> Result<(), Error> {
    client
        .query_one(SET_APPLICATION_NAME, &[&application_name])
        .await
        .map_err(Error::sql("setting application_name"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_fits_application_name() {
        assert_eq!(marker("orders"), "pg_domain_events standby: orders");
        let long = "é".repeat(40);
        let m = marker(&long);
        assert!(m.len() <= 63, "{}", m.len());
        assert!(m.starts_with(STANDBY_PREFIX));
    }
}
