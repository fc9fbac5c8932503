//! A throwaway PostgreSQL cluster of a test's own (`scripts/cluster.sh` under another name and
//! port), for tests that restart or crash the server: the shared test cluster must stay up for
//! the suites running beside them.

use std::path::PathBuf;
use std::process::Command;

use listener::config::{Config, HandlerConfig};

use crate::connect;

/// A private cluster, destroyed on drop.
pub struct PrivateCluster {
    /// Its `PGDE_CLUSTER_NAME` (the directory under the state dir).
    pub name: String,
    /// Its loopback port.
    pub port: u16,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh")
}

/// A loopback port no one listens on right now.
pub fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    socket.local_addr().expect("local address").port()
}

impl PrivateCluster {
    /// Initialises and starts a cluster named `pgde-<prefix>-<random>` on a free port.
    pub fn start(prefix: &str) -> PrivateCluster {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let cluster = PrivateCluster {
            name: format!("pgde-{prefix}-{}", &id[..8]),
            port: free_port(),
        };
        cluster.run(&["start"]);
        cluster
    }

    fn run(&self, args: &[&str]) {
        let output = Command::new("bash")
            .arg(script())
            .args(args)
            .env("PGDE_CLUSTER_NAME", &self.name)
            .env("PGDE_PORT", self.port.to_string())
            .env_remove("PGDE_PRELOAD")
            .output()
            .expect("run scripts/cluster.sh");
        assert!(
            output.status.success(),
            "cluster.sh {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Stops the server with `mode` (`fast`: clean shutdown; `immediate`: no checkpoint, crash
    /// recovery at the next start) and starts it again.
    pub fn restart(&self, mode: &str) {
        self.run(&["restart", mode]);
    }

    /// Connection string for `dbname` as the superuser.
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    /// Creates database `dbname` with the extension installed.
    pub async fn create_database(&self, dbname: &str) {
        let admin = connect(&self.dsn("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {dbname}"))
            .await
            .expect("CREATE DATABASE");
        connect(&self.dsn(dbname))
            .await
            .batch_execute("CREATE EXTENSION pg_domain_events")
            .await
            .expect("CREATE EXTENSION");
    }

    /// A listener configuration for `dbname` of this cluster: slot and publication `name`, one
    /// stdout handler, quick acknowledgements and reconnects.
    pub fn listener_config(&self, dbname: &str, name: &str) -> Config {
        let mut config = Config::default();
        config.database.host = "127.0.0.1".into();
        config.database.port = self.port;
        config.database.user = "postgres".into();
        config.database.dbname = dbname.into();
        config.replication.slot = name.into();
        config.replication.publication = name.into();
        config.replication.ack_interval_ms = 50;
        config.replication.checkpoint_interval_ms = 200;
        config.replication.reconnect_min_backoff_ms = 100;
        config.replication.reconnect_max_backoff_ms = 1000;
        config.handlers =
            vec![toml::from_str::<HandlerConfig>("kind = \"stdout\"").expect("stdout handler")];
        config
    }
}

/// Makes a checkpoint invalidate slot `name` (`wal_status = lost`): sets a 1 MB
/// `max_slot_wal_keep_size`, writes and switches WAL segments until it is, and resets the
/// setting. Only for a private cluster: every slot of the cluster that lags behind is
/// invalidated too.
pub async fn invalidate_slot(client: &tokio_postgres::Client, name: &str) {
    // One statement per call: ALTER SYSTEM refuses a transaction block.
    client
        .batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await
        .expect("set max_slot_wal_keep_size");
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let mut status = String::new();
    for _ in 0..20 {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS public.filler (pad text); \
                 INSERT INTO public.filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)",
            )
            .await
            .expect("generate WAL");
        client
            .batch_execute("SELECT pg_switch_wal()")
            .await
            .expect("switch WAL");
        client
            .batch_execute("CHECKPOINT")
            .await
            .expect("checkpoint");
        status = client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .expect("slot")
            .get(0);
        if status == "lost" {
            break;
        }
    }
    assert_eq!(status, "lost", "the slot was not invalidated");
    // Back to unlimited: a slot made afterwards must not be invalidated by the test's WAL.
    client
        .batch_execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        .await
        .expect("reset max_slot_wal_keep_size");
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("destroy")
            .env("PGDE_CLUSTER_NAME", &self.name)
            .env("PGDE_PORT", self.port.to_string())
            .output();
    }
}
