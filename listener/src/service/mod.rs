//! The listener service: connects, streams, dispatches, confirms, and reconnects after transient
//! failures until cancelled.
//!
//! One session = one SQL connection (extension check, publication, subscription row, heartbeats)
//! plus one replication connection. Inside a session three tasks cooperate:
//!
//! ```text
//!  server ──XLogData──▶ stream loop ──Item (bounded)──▶ dispatcher ──▶ handlers
//!     ▲                     │  ▲                             │
//!     └──status updates─────┘  └──────── Ack (watch) ────────┤
//!                                                            ▼
//!                                          checkpointer ──▶ domain_events.subscription
//! ```
//!
//! The stream loop confirms to the server only what the dispatcher acknowledged (a transaction's
//! commit end LSN after all of its events were handled), or, when nothing of ours is in flight,
//! the server's keepalive position, so that WAL is not retained while other tables are busy.
//!
//! Files: `listener` (the `Listener`, its reconnect loop and the admin server), `session` (what
//! every session shares: cancellation, the dispatcher's tasks, the shutdown deadline),
//! `stream_session` (replication mode, with its checkpointer), `notify_session`,
//! `recovery_session` (a lost slot), `registry` (the built-in handlers from the
//! configuration), `registry_lanes` (the async handlers registered in the database, each in a
//! notify-mode lane of its own) and `figures_watch` (what only the database knows, into the
//! metrics).

mod figures_watch;
mod listener;
mod notify_session;
mod recovery_session;
mod registry;
mod registry_lanes;
mod session;
mod stream_session;

pub use listener::Listener;
pub use registry::{build_registry, registry_from_config, Purpose};
pub use registry_lanes::{lane_subscription, LANE_PREFIX};
