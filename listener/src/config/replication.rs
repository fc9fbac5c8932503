//! `[replication]`: how the listener follows commits, and what it does when its slot is lost.

use serde::{Deserialize, Serialize};

use crate::replication::subscription::Mode;

/// `[replication]`: slot, publication, durable position and stream timing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// How committed events are followed: `replication` (a logical replication slot; needs the
    /// `REPLICATION` attribute) or `notify` (`LISTEN domain_events` wake-ups plus polling of
    /// `domain_events.event`; needs `domain_events_listener` only).
    pub mode: Mode,
    /// `mode = "notify"`: the longest wait between two polls when no notification arrives, in
    /// milliseconds (the safety net for a lost or disabled `NOTIFY`). Also the poll period of a
    /// recovery from a lost slot.
    pub poll_interval_ms: u64,
    /// `mode = "notify"` and lost-slot recovery: events read per query, handled and
    /// acknowledged as one poll batch.
    pub poll_batch_size: i64,
    /// What happens when the slot is invalidated (`wal_status = lost`) or dropped while the
    /// subscription row says events were delivered through it: `recover` (catch up from the
    /// event table by snapshot-safe polling, create a new slot, stream again; no gap) or `stop`
    /// (exit with an error that says how to recover without a gap).
    pub on_slot_lost: SlotLostPolicy,
    /// Logical replication slot (`pgoutput`); created when missing if `create_slot`.
    pub slot: String,
    /// Publication of `domain_events.event`; created when missing if `create_publication`.
    pub publication: String,
    /// Row name in `domain_events.subscription` holding the durable position; defaults to the slot.
    pub subscription: Option<String>,
    /// Create the slot when it does not exist.
    pub create_slot: bool,
    /// Create the publication when it does not exist (needs ownership of the event table).
    pub create_publication: bool,
    /// Maximum seconds between two standby status updates (keep below `wal_sender_timeout`).
    pub status_interval_secs: u64,
    /// Seconds without any message from the server (while reading) after which the connection is
    /// considered dead and re-opened; periodic status updates ask the server for a reply, so a
    /// live server is never silent that long. 0 turns the check off.
    pub server_timeout_secs: u64,
    /// How often newly handled transactions are confirmed to the server, in milliseconds.
    pub ack_interval_ms: u64,
    /// How often the durable position is written to the subscription row, in milliseconds.
    pub checkpoint_interval_ms: u64,
    /// Seconds between heartbeats (`pg_logical_emit_message(true, ...)`); 0 turns them off.
    pub heartbeat_interval_secs: u64,
    /// Events and commits buffered between the stream and the handlers.
    pub queue_capacity: usize,
    /// First delay before reconnecting after a transient failure, in milliseconds.
    pub reconnect_min_backoff_ms: u64,
    /// Largest delay between reconnect attempts, in milliseconds.
    pub reconnect_max_backoff_ms: u64,
    /// How often requested redeliveries of dead letters are looked for, in milliseconds (also
    /// at the start of every session); `0` turns redrive off.
    pub redrive_interval_ms: u64,
    /// Handler tasks. Events are routed by a hash of (aggregate type, aggregate id): per
    /// aggregate order holds, unrelated aggregates are handled in parallel. `1`: one task, in
    /// commit order.
    pub workers: usize,
    /// Log a warning (at most once a minute) while the slot retains more WAL than this many
    /// bytes; checked every `status_interval_secs`. 0 turns the warning off (the
    /// `slot_retained_wal_bytes` metric is exported either way).
    pub slot_wal_warning_bytes: u64,
    /// On shutdown (SIGTERM, SIGINT, or the library's cancellation), how long the listener may
    /// take to finish the transaction in flight: receive it up to its commit, handle it
    /// (retries included), confirm it. After that it stops at once, and what it did not confirm
    /// is delivered again on the next start.
    pub shutdown_timeout_secs: u64,
    /// Replication mode: while another listener streams from the slot, this one stands by and
    /// checks this often (in milliseconds) whether the slot is free, then takes over.
    pub standby_check_interval_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> ReplicationConfig {
        ReplicationConfig {
            mode: Mode::Replication,
            poll_interval_ms: 1000,
            poll_batch_size: 1000,
            on_slot_lost: SlotLostPolicy::Recover,
            slot: "pg_domain_events".into(),
            publication: "pg_domain_events".into(),
            subscription: None,
            create_slot: true,
            create_publication: true,
            status_interval_secs: 10,
            server_timeout_secs: 120,
            ack_interval_ms: 100,
            checkpoint_interval_ms: 1000,
            heartbeat_interval_secs: 0,
            queue_capacity: 4096,
            reconnect_min_backoff_ms: 500,
            reconnect_max_backoff_ms: 30_000,
            redrive_interval_ms: 5_000,
            workers: 1,
            slot_wal_warning_bytes: 1 << 30,
            shutdown_timeout_secs: 30,
            standby_check_interval_ms: 1000,
        }
    }
}

impl ReplicationConfig {
    /// The subscription row's name.
    pub fn subscription_name(&self) -> &str {
        self.subscription.as_deref().unwrap_or(&self.slot)
    }
}

/// What the listener does when its slot is lost (`replication.on_slot_lost`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotLostPolicy {
    /// Deliver what the lost slot did not by polling the event table from the subscription's
    /// delivered snapshot, create a new slot, and stream again (see [`crate::replication::recovery`]).
    #[default]
    Recover,
    /// Stop with [`crate::Error::SlotLost`], whose message says how to recover.
    Stop,
}
