//! The console's database connections, as the console's own role: one shared connection for
//! reads, in read-only transactions, and a short-lived one per redrive.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::error::Error;
use crate::postgres::database::DatabaseConfig;
use crate::replication::subscription::connect;

/// Connections for the console, opened on first use and reopened after a failure.
pub struct Db {
    config: DatabaseConfig,
    reader: Mutex<Option<(Arc<Client>, JoinHandle<()>)>>,
}

impl Db {
    /// Connections as `config` says (the console's role).
    pub fn new(config: DatabaseConfig) -> Db {
        Db {
            config,
            reader: Mutex::new(None),
        }
    }

    /// The shared read connection. Its transactions are read-only besides the role's lack of
    /// write privileges: a bug in a query cannot write through it.
    pub async fn reader(&self) -> Result<Arc<Client>, Error> {
        let mut slot = self.reader.lock().await;
        if let Some((client, _)) = slot.as_ref() {
            if !client.is_closed() {
                return Ok(Arc::clone(client));
            }
        }
        if let Some((_, task)) = slot.take() {
            task.abort();
        }
        let (client, task) = connect(&self.config).await?;
        client
            .batch_execute(super::queries::READ_ONLY_SESSION)
            .await
            .map_err(Error::sql("making the console's session read-only"))?;
        let client = Arc::new(client);
        *slot = Some((Arc::clone(&client), task));
        Ok(client)
    }

    /// Runs `redrive_dead_letter` on a connection of its own (the shared one is read-only);
    /// returns how many dead letters were marked.
    pub async fn redrive(&self, subscription: &str, event_id: uuid::Uuid) -> Result<i32, Error> {
        let (client, task) = connect(&self.config).await?;
        let marked = client
            .query_one(super::queries::REDRIVE, &[&subscription, &event_id])
            .await
            .map(|row| row.get::<_, i32>(0))
            .map_err(Error::sql("requesting a redrive"));
        drop(client);
        let _ = task.await;
        marked
    }
}
