//! Operator commands that read or repair a subscription without streaming: `listener status`
//! and `listener slot drop`.

use tokio_postgres::Client;

use crate::error::Error;

/// One row of `domain_events.subscription_lag`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionStatus {
    /// Subscription (and, in replication mode, slot) name.
    pub name: String,
    /// `replication` or `notify`.
    pub mode: String,
    /// Last handled position.
    pub position: i64,
    /// Confirmed commit LSN (replication mode).
    pub lsn: Option<String>,
    /// Committed events not yet delivered (an estimate in replication mode).
    pub events_behind: i64,
    /// WAL bytes between the server's position and the confirmed LSN.
    pub bytes_behind: Option<i64>,
    /// WAL the slot keeps on disk.
    pub slot_wal_retained: Option<i64>,
    /// Whether a listener is streaming from the slot.
    pub slot_active: Option<bool>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub slot_wal_status: Option<String>,
    /// The server process (walsender) streaming from the slot to the active listener.
    pub active_pid: Option<i32>,
    /// Server processes of the listeners standing by for the slot ([`crate::replication::standby`]).
    pub standby_pids: Vec<i32>,
    /// Notify mode: whether writers wake the listener (`domain_events.notify` on, see
    /// [`crate::replication::notify::writers_notify`]); when not, it delivers by polling only.
    /// `None` in replication mode.
    pub wakeups: Option<bool>,
}

impl SubscriptionStatus {
    /// A notify-mode subscription whose listener is woken by nothing but its poll interval.
    pub fn polling_only(&self) -> bool {
        self.wakeups == Some(false)
    }
}

/// `$1`: [`crate::replication::standby::STANDBY_PREFIX`]. A standby's `application_name` is its marker,
/// cut to 63 bytes for long names (matched by prefix then).
const STATUS: &str = "SELECT l.name, l.mode, l.position, l.lsn::text, l.events_behind, \
     l.bytes_behind, l.slot_wal_retained, l.slot_active, l.slot_wal_status, \
     (SELECT r.active_pid FROM pg_catalog.pg_replication_slots r \
       WHERE r.slot_name = l.name AND r.database = pg_catalog.current_database() \
         AND r.active), \
     ARRAY(SELECT a.pid FROM pg_catalog.pg_stat_activity a \
            WHERE a.datname = pg_catalog.current_database() \
              AND (a.application_name = $1 || l.name \
                   OR (pg_catalog.octet_length($1 || l.name) > 63 \
                       AND pg_catalog.octet_length(a.application_name) > 59 \
                       AND pg_catalog.starts_with($1 || l.name, a.application_name))) \
            ORDER BY a.pid), \
     CASE WHEN l.mode = 'notify' THEN {wakeups} END \
     FROM domain_events.subscription_lag l ORDER BY l.name";

/// Drops slot `$1` of the current database (no row when there is none).
pub(crate) const DROP_SLOT: &str = "SELECT pg_catalog.pg_drop_replication_slot(slot_name) \
     FROM pg_catalog.pg_replication_slots \
     WHERE slot_name = $1 AND database = pg_catalog.current_database()";

const FORGET_LSN: &str = "UPDATE domain_events.subscription SET lsn = NULL, updated_at = now() \
     WHERE name = $1 AND mode = 'replication' RETURNING position";

/// Every subscription of the database, from the `subscription_lag` view.
pub async fn status(client: &Client) -> Result<Vec<SubscriptionStatus>, Error> {
    let sql = STATUS.replace("{wakeups}", crate::replication::notify::WRITERS_NOTIFY);
    let rows = client
        .query(&sql, &[&crate::replication::standby::STANDBY_PREFIX])
        .await
        .map_err(Error::sql("reading domain_events.subscription_lag"))?;
    Ok(rows
        .iter()
        .map(|r| SubscriptionStatus {
            name: r.get(0),
            mode: r.get(1),
            position: r.get(2),
            lsn: r.get(3),
            events_behind: r.get(4),
            bytes_behind: r.get(5),
            slot_wal_retained: r.get(6),
            slot_active: r.get(7),
            slot_wal_status: r.get(8),
            active_pid: r.get(9),
            standby_pids: r.get(10),
            wakeups: r.get(11),
        })
        .collect())
}

/// The status as a tab-separated table with a header line.
pub fn render_status(rows: &[SubscriptionStatus]) -> String {
    fn opt<T: ToString>(v: &Option<T>) -> String {
        v.as_ref().map(T::to_string).unwrap_or_else(|| "-".into())
    }
    let mut out = String::from(
        "name\tmode\tposition\tlsn\tevents_behind\tbytes_behind\tslot_wal_retained\tslot_active\tslot_wal_status\tactive_pid\tstandby_pids\twakeups\n",
    );
    for r in rows {
        let standbys = if r.standby_pids.is_empty() {
            "-".to_string()
        } else {
            let pids: Vec<String> = r.standby_pids.iter().map(i32::to_string).collect();
            pids.join(",")
        };
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            r.name,
            r.mode,
            r.position,
            opt(&r.lsn),
            r.events_behind,
            opt(&r.bytes_behind),
            opt(&r.slot_wal_retained),
            opt(&r.slot_active),
            opt(&r.slot_wal_status),
            opt(&r.active_pid),
            standbys,
            match r.wakeups {
                Some(true) => "notify",
                Some(false) => "polling",
                None => "-",
            }
        ));
    }
    out
}

/// What `slot drop` did.
#[derive(Debug, Clone, PartialEq)]
pub struct DroppedSlot {
    /// Whether a slot of that name existed in this database and was dropped.
    pub dropped: bool,
    /// The subscription's last handled position, when it had a row: events after it that were
    /// committed while no slot existed must be replayed from the table.
    pub last_position: Option<i64>,
}

/// Drops slot `slot` and forgets the subscription's confirmed LSN, so the next `run` creates a
/// fresh slot instead of refusing to start. Fails (SQLSTATE 55006) while a listener streams
/// from the slot.
pub async fn drop_slot(
    client: &Client,
    slot: &str,
    subscription: &str,
) -> Result<DroppedSlot, Error> {
    let dropped = !client
        .query(DROP_SLOT, &[&slot])
        .await
        .map_err(Error::sql("dropping the replication slot"))?
        .is_empty();
    let last_position = client
        .query_opt(FORGET_LSN, &[&subscription])
        .await
        .map_err(Error::sql(
            "resetting the subscription's confirmed position",
        ))?
        .map(|r| r.get::<_, i64>(0));
    Ok(DroppedSlot {
        dropped,
        last_position,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_renders_missing_values_as_dashes() {
        let rows = [SubscriptionStatus {
            name: "poller".into(),
            mode: "notify".into(),
            position: 0,
            lsn: None,
            events_behind: 2,
            bytes_behind: None,
            slot_wal_retained: None,
            slot_active: None,
            slot_wal_status: None,
            active_pid: None,
            standby_pids: Vec::new(),
            wakeups: Some(false),
        }];
        assert_eq!(
            render_status(&rows).lines().nth(1),
            Some("poller\tnotify\t0\t-\t2\t-\t-\t-\t-\t-\t-\tpolling")
        );
    }
}
