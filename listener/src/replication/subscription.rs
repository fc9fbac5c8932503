//! The ordinary SQL connection and the durable high-water mark kept in
//! `domain_events.subscription`.
//!
//! PG 15 does not persist a slot's `confirmed_flush_lsn` across a clean server restart by itself
//! (it may fall back and re-send the last transactions), so the listener also stores the end LSN of
//! the last fully handled transaction in its subscription row and starts replication from there.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};
use tracing::debug;

use crate::delivery::dispatch::Ack;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::postgres::database::DatabaseConfig;
use crate::replication::publication::Schema;

/// How the listener follows committed events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Logical replication (`pgoutput`) through a slot.
    #[default]
    Replication,
    /// `LISTEN`/`NOTIFY` wake-ups and polling of the event table by snapshot transitions.
    Notify,
}

impl Mode {
    /// The value of `domain_events.subscription.mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Replication => "replication",
            Mode::Notify => "notify",
        }
    }
}

/// Prefix of the heartbeat messages (`pg_logical_emit_message`).
pub const HEARTBEAT_PREFIX: &str = "pg_domain_events.heartbeat";

/// Opens an ordinary (non-replication) connection, driven by the returned task, which ends when
/// the client is dropped.
pub async fn connect(db: &DatabaseConfig) -> Result<(Client, JoinHandle<()>), Error> {
    connect_inner(db, None).await
}

/// Like [`connect`], and forwards the connection's notifications (`LISTEN`) to the returned
/// receiver, which closes when the connection ends.
pub async fn connect_listening(
    db: &DatabaseConfig,
) -> Result<
    (
        Client,
        JoinHandle<()>,
        mpsc::UnboundedReceiver<Notification>,
    ),
    Error,
> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (client, task) = connect_inner(db, Some(tx)).await?;
    Ok((client, task, rx))
}

async fn connect_inner(
    db: &DatabaseConfig,
    notifications: Option<mpsc::UnboundedSender<Notification>>,
) -> Result<(Client, JoinHandle<()>), Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&db.host)
        .port(db.port)
        .user(&db.user)
        .dbname(&db.dbname)
        .application_name(&db.application_name)
        .connect_timeout(std::time::Duration::from_secs(db.connect_timeout_secs));
    if let Some(password) = &db.password {
        config.password(password);
    }
    let connector = crate::postgres::tls::connector(db.sslmode, db.sslrootcert.as_deref())?;
    let connected = match connector {
        None => {
            config.ssl_mode(SslMode::Disable);
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(Error::sql("connecting to the database"))?;
            (client, tokio::spawn(drive(connection, notifications)))
        }
        Some(connector) => {
            config.ssl_mode(if db.sslmode.requires_tls() {
                SslMode::Require
            } else {
                SslMode::Prefer
            });
            let mut tls = postgres_openssl::MakeTlsConnector::new(connector);
            let verify_hostname = db.sslmode == crate::postgres::tls::SslMode::VerifyFull;
            // libpq checks the host name in verify-full only.
            tls.set_callback(move |connect, _| {
                connect.set_verify_hostname(verify_hostname);
                Ok(())
            });
            let (client, connection) = config
                .connect(tls)
                .await
                .map_err(Error::sql("connecting to the database"))?;
            (client, tokio::spawn(drive(connection, notifications)))
        }
    };
    Ok(connected)
}

async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notifications: Option<mpsc::UnboundedSender<Notification>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(notifications) = notifications else {
        if let Err(err) = connection.await {
            debug!(error = %err, "sql connection ended");
        }
        return;
    };
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(notification))) => {
                // The receiver may be gone while the client is still in use: ignore.
                let _ = notifications.send(notification);
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                debug!(error = %err, "sql connection ended");
                return;
            }
            None => return,
        }
    }
}

/// An `lsn::text` column of a subscription row.
pub(crate) fn parse_row_lsn(text: Option<String>) -> Result<Option<Lsn>, Error> {
    text.map(|t| {
        t.parse()
            .map_err(|_| Error::Protocol(format!("subscription row holds an invalid lsn {t:?}")))
    })
    .transpose()
}

/// What a replication-mode subscription row says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durable {
    /// The end LSN of the last handled transaction, if any was.
    pub lsn: Option<Lsn>,
    /// A recovery from a lost slot started and has not finished ([`crate::replication::recovery`]).
    pub recovering: bool,
}

/// Reads and writes one subscription row.
pub struct SubscriptionStore {
    client: Arc<Client>,
    name: String,
    schema: Schema,
}

impl SubscriptionStore {
    /// A store for row `name` over `client`, in a database whose extension has `schema`.
    pub fn new(client: Arc<Client>, name: impl Into<String>, schema: Schema) -> SubscriptionStore {
        SubscriptionStore {
            client,
            name: name.into(),
            schema,
        }
    }

    /// The client, for other statements on the same connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// What the row says: the durable position, and whether a recovery from a lost slot is in
    /// progress. A row of another mode is an error.
    pub async fn load(&self) -> Result<Durable, Error> {
        let sql = if self.schema.lost_slot_recovery {
            "SELECT lsn::text, mode, recovery_started_at IS NOT NULL \
             FROM domain_events.subscription WHERE name = $1"
        } else {
            "SELECT lsn::text, mode, false FROM domain_events.subscription WHERE name = $1"
        };
        let row = self
            .client
            .query_opt(sql, &[&self.name])
            .await
            .map_err(Error::sql("reading the subscription row"))?;
        let Some(row) = row else {
            return Ok(Durable::default());
        };
        let mode: String = row.get(1);
        if mode != "replication" {
            return Err(Error::Subscription {
                name: self.name.clone(),
                problem: format!(
                    "the row belongs to a {mode}-mode subscription; choose another \
                     replication.subscription name for replication mode"
                ),
            });
        }
        Ok(Durable {
            lsn: parse_row_lsn(row.get(0))?,
            recovering: row.get(2),
        })
    }

    /// Creates the row of a new subscription, before its slot: the snapshot it records marks
    /// every transaction that committed before the slot as not this subscription's, so that a
    /// slot lost before the first checkpoint still has a boundary to recover from.
    pub async fn start_new(&self) -> Result<(), Error> {
        if !self.schema.lost_slot_recovery {
            return Ok(());
        }
        self.client
            .execute(
                "INSERT INTO domain_events.subscription AS s (name, mode, delivered_snapshot) \
                 VALUES ($1, 'replication', pg_current_snapshot()) \
                 ON CONFLICT (name) DO UPDATE SET delivered_snapshot = EXCLUDED.delivered_snapshot \
                 WHERE s.mode = 'replication' AND s.lsn IS NULL AND s.delivered_snapshot IS NULL",
                &[&self.name],
            )
            .await
            .map_err(Error::sql("creating the subscription row"))?;
        Ok(())
    }

    /// Records `ack` (never moving the row backwards), and moves the delivered snapshot on.
    ///
    /// The delivered snapshot is the boundary a recovery from a lost slot starts from: every
    /// transaction visible in it has been handled. Each save proposes a *pending* snapshot
    /// together with the WAL insert position read after it (a transaction is visible only once
    /// its commit record is in the WAL, so every transaction visible in the snapshot commits
    /// before that position); a later save whose confirmed LSN has reached that position
    /// promotes it. The boundary thus trails the confirmed position by about two checkpoints.
    pub async fn save(&self, ack: Ack) -> Result<(), Error> {
        let sql = if self.schema.lost_slot_recovery {
            "INSERT INTO domain_events.subscription AS s \
                (name, mode, position, lsn, updated_at, pending_snapshot, pending_lsn) \
             VALUES ($1, 'replication', $2, $3::text::pg_lsn, now(), \
                     pg_current_snapshot(), pg_current_wal_insert_lsn()) \
             ON CONFLICT (name) DO UPDATE SET \
                mode = 'replication', \
                position = GREATEST(s.position, EXCLUDED.position), \
                lsn = GREATEST(s.lsn, EXCLUDED.lsn), \
                updated_at = now(), \
                delivered_snapshot = CASE WHEN s.pending_lsn <= EXCLUDED.lsn \
                    THEN s.pending_snapshot ELSE s.delivered_snapshot END, \
                pending_snapshot = CASE WHEN s.pending_lsn IS NULL OR s.pending_lsn <= EXCLUDED.lsn \
                    THEN EXCLUDED.pending_snapshot ELSE s.pending_snapshot END, \
                pending_lsn = CASE WHEN s.pending_lsn IS NULL OR s.pending_lsn <= EXCLUDED.lsn \
                    THEN EXCLUDED.pending_lsn ELSE s.pending_lsn END \
             WHERE s.recovery_started_at IS NULL"
        } else {
            "INSERT INTO domain_events.subscription AS s (name, mode, position, lsn, updated_at) \
             VALUES ($1, 'replication', $2, $3::text::pg_lsn, now()) \
             ON CONFLICT (name) DO UPDATE SET \
                mode = 'replication', \
                position = GREATEST(s.position, EXCLUDED.position), \
                lsn = GREATEST(s.lsn, EXCLUDED.lsn), \
                updated_at = now()"
        };
        self.client
            .execute(sql, &[&self.name, &ack.position, &ack.lsn.to_string()])
            .await
            .map_err(Error::sql("saving the subscription position"))?;
        Ok(())
    }

    /// Emits a transactional heartbeat message into the WAL. It travels through the slot like a
    /// transaction of ours, so confirming it advances the slot even when no event is written.
    pub async fn heartbeat(&self) -> Result<(), Error> {
        self.client
            .execute(
                "SELECT pg_logical_emit_message(true, $1::text, ''::text)",
                &[&HEARTBEAT_PREFIX],
            )
            .await
            .map_err(Error::sql("emitting a heartbeat"))?;
        Ok(())
    }
}
