//! The ordinary SQL connection and the durable high-water mark kept in
//! `domain_events.subscription`.
//!
//! PG 15 does not persist a slot's `confirmed_flush_lsn` across a clean server restart by itself
//! (it may fall back and re-send the last transactions), so the listener also stores the end LSN of
//! the last fully handled transaction in its subscription row and starts replication from there.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};
use tracing::debug;

use crate::config::DatabaseConfig;
use crate::dispatch::Ack;
use crate::error::Error;
use crate::lsn::Lsn;

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
    let connector = crate::tls::connector(db.sslmode, db.sslrootcert.as_deref())?;
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
            let verify_hostname = db.sslmode == crate::tls::SslMode::VerifyFull;
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

/// Reads and writes one subscription row.
pub struct SubscriptionStore {
    client: Arc<Client>,
    name: String,
}

impl SubscriptionStore {
    /// A store for row `name` over `client`.
    pub fn new(client: Arc<Client>, name: impl Into<String>) -> SubscriptionStore {
        SubscriptionStore {
            client,
            name: name.into(),
        }
    }

    /// The client, for other statements on the same connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The durable position, if the row exists and has one.
    pub async fn load(&self) -> Result<Option<Lsn>, Error> {
        let row = self
            .client
            .query_opt(
                "SELECT lsn::text, mode FROM domain_events.subscription WHERE name = $1",
                &[&self.name],
            )
            .await
            .map_err(Error::sql("reading the subscription row"))?;
        if let Some(mode) = row.as_ref().map(|r| r.get::<_, String>(1)) {
            if mode != "replication" {
                return Err(Error::Subscription {
                    name: self.name.clone(),
                    problem: format!(
                        "the row belongs to a {mode}-mode subscription; choose another \
                         replication.subscription name for replication mode"
                    ),
                });
            }
        }
        let Some(text) = row.and_then(|r| r.get::<_, Option<String>>(0)) else {
            return Ok(None);
        };
        text.parse()
            .map(Some)
            .map_err(|_| Error::Protocol(format!("subscription row holds an invalid lsn {text:?}")))
    }

    /// Records `ack` (never moving the row backwards).
    pub async fn save(&self, ack: Ack) -> Result<(), Error> {
        self.client
            .execute(
                "INSERT INTO domain_events.subscription AS s (name, mode, position, lsn, updated_at) \
                 VALUES ($1, 'replication', $2, $3::text::pg_lsn, now()) \
                 ON CONFLICT (name) DO UPDATE SET \
                    mode = 'replication', \
                    position = GREATEST(s.position, EXCLUDED.position), \
                    lsn = GREATEST(s.lsn, EXCLUDED.lsn), \
                    updated_at = now()",
                &[&self.name, &ack.position, &ack.lsn.to_string()],
            )
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
